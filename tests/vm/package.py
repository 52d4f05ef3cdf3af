"""tcpencap's Debian package for a guest, as an administrator installs it: built for the
guest's own suite, then ``apt install ./tcpencap_*.deb`` inside the booted guest, with
systemd as PID 1 (tests/vm/systemd_scenarios.py does that step).

- ``build_deb(suite, out, log)``: scripts/build-deb.sh run in a throw-away overlay of the
  suite's guest base (``guest.base_rootfs``) plus a cached layer holding the build
  dependencies debian/control names (``apt-get build-dep``), so the package is built by the
  suite's own Python, debhelper and lintian. It is built from a clone of this checkout's
  HEAD, as build-deb.sh always builds the committed tree.
- ``package_installer(suite, work)``: the ``guest.Installer`` of the systemd image: the lab's
  venv as ``guest.pip_install`` makes it (the client namespace's tcpencap and pytest run from
  there), the .deb in /root, and every package it depends on downloaded into apt's cache,
  because the guest has no network when it runs ``apt install``.

Test-side code: never installed with the daemon.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import guest

# What scripts/build-deb.sh calls beside the Build-Depends.
BUILD_TOOLS = ("build-essential", "dpkg-dev", "fakeroot", "git", "lintian")
DEB_CACHE = Path("/var/cache/tcpencap-deb")  # build-deb.sh's default TCPENCAP_DEB_CACHE
GUEST_DEB_DIR = "/root"  # where the guest finds the .deb, as an administrator's download


def first_alternatives(control: str) -> list[str]:
    """The first package of every ``a | b`` group in debian/control's Build-Depends."""
    field: list[str] = []
    for line in control.splitlines():
        if line.startswith("#"):  # a comment, inside a field or not
            continue
        if field and not line[:1].isspace():
            break
        if field or line.startswith("Build-Depends:"):
            field.append(line.removeprefix("Build-Depends:"))
    groups = [g for g in " ".join(field).split(",") if "|" in g]
    return [g.split("|")[0].split()[0] for g in groups]


def builder_layer(suite: guest.Suite, log: Path) -> Path:
    """The cached layer over ``suite``'s guest base with the package's build dependencies,
    keyed by that base and debian/control (a change to either builds a new one, ~2 min)."""
    base = guest.base_rootfs(suite, log)
    control = (guest.REPO_ROOT / "debian/control").read_text()

    def fill(root: Path) -> None:
        ctl = root / "run/control/debian"
        ctl.mkdir(parents=True)
        (ctl / "control").write_text(control)
        guest.chroot_apt(root, "update", log=log)
        guest.chroot_apt(root, "build-dep", "--no-install-recommends", "/run/control", log=log)
        # apt takes an alternative that is installed already (python3-dev for
        # `python3-netfilterqueue | python3-dev`); Debian's builders take the first one the
        # suite has, and debian/rules follows what is installed.
        for pkg in first_alternatives(control):
            if subprocess.run(["chroot", str(root), "apt-cache", "show", pkg],
                              capture_output=True).returncode == 0:  # fmt: skip
                guest.chroot_apt(root, "install", "--no-install-recommends", pkg, log=log)
        guest.chroot_apt(root, "install", "--no-install-recommends", *BUILD_TOOLS, log=log)
        guest.chroot_apt(root, "clean", log=log)

    text = "\n".join([guest.cache_key(suite), control, *BUILD_TOOLS, *first_alternatives(control)])
    return guest.cached_layer("debbuild", text, base, fill)


def build_deb(suite: guest.Suite, out: Path, log: Path) -> Path:
    """scripts/build-deb.sh for ``suite``, in its builder; returns the .deb (copied to ``out``
    with build-deb.sh's build.log and lintian.txt)."""
    layer = builder_layer(suite, log)
    out.mkdir(parents=True, exist_ok=True)
    dirty = subprocess.run(
        ["git", "-C", str(guest.REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    if dirty:
        print(f"package: uncommitted changes are not in {suite.name}'s .deb (built from HEAD)")
    work = Path(tempfile.mkdtemp(prefix="deb-build.", dir=out))
    try:
        with guest.overlay([layer, guest.base_rootfs(suite, log)], work / "upper") as root:
            src = root / "run/src"
            with guest.chroot_mounts(root):
                guest.run_logged(["git", "clone", "-q", str(guest.REPO_ROOT), str(src)], log)
                cache = root / DEB_CACHE.relative_to("/")
                DEB_CACHE.mkdir(parents=True, exist_ok=True)
                cache.mkdir(parents=True, exist_ok=True)
                guest.run_logged(["mount", "--bind", str(DEB_CACHE), str(cache)])
                try:
                    build = ["bash", "/run/src/scripts/build-deb.sh", "/run/out"]
                    argv = ["chroot", str(root), *build]
                    res = subprocess.run(
                        argv, capture_output=True, text=True, timeout=1800,
                        env=guest.chroot_env(),
                    )  # fmt: skip
                finally:
                    subprocess.run(["umount", "-l", str(cache)], check=False)
                with open(log, "a") as f:
                    f.write(f"$ {' '.join(argv)}\n{res.stdout}{res.stderr}")
                if res.returncode != 0:
                    raise guest.GuestError(f"build-deb.sh in {suite.name}:\n{res.stderr[-3000:]}")
                built = root / res.stdout.strip().splitlines()[-1].lstrip("/")
                for name in ("build.log", "lintian.txt"):
                    shutil.copyfile(root / "run/out" / name, out / name)
                deb = out / built.name
                shutil.copyfile(built, deb)
        print(f"package: {deb.name} built in {suite.name} ({deb.stat().st_size} octets)")
        return deb
    finally:
        shutil.rmtree(work, ignore_errors=True)


def package_installer(suite: guest.Suite, work: Path) -> guest.Installer:
    """The systemd image's installer: ``guest.pip_install`` for the lab's own venv, and the
    suite's .deb staged for an offline ``apt install`` in the booted guest."""
    deb = build_deb(suite, work / "deb", work / "build.log")

    def install(root: Path, log: Path) -> None:
        guest.pip_install(root, log)
        shutil.copyfile(deb, root / GUEST_DEB_DIR.lstrip("/") / deb.name)
        guest.chroot_apt(root, "update", log=log)
        staged = f"{GUEST_DEB_DIR}/{deb.name}"
        only = ["--download-only", "--no-install-recommends"]
        guest.chroot_apt(root, "install", *only, staged, log=log)

    return install
