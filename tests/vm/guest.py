"""Real Debian guests under QEMU, Debian 12 "bookworm" and 13 "trixie" (``SUITES``): the stock
kernel (XFRM with ESP, as modules) and systemd as PID 1.

This machine's kernel has no ESP transform, so everything that needs the kernel's IPsec, or
systemd as PID 1, runs here. Test-side code: never installed with the daemon.

- ``base_rootfs(suite)``: the suite made by debootstrap from the Debian registry, with the
  suite's packages and a venv holding tcpencap's dependencies. Cached outside the repo, one
  directory per key of everything that decides its content, never changed after it is built.
- ``build_image(suite, out)``: that root file system plus this checkout (in SRC, where the
  guest runs the scenarios from) and tcpencap put in by an ``Installer`` (``pip_install``:
  into the lab's venv; tests/vm/package.py's adds the Debian package), as one ext4 image.
- ``boot(image, script, results, timeout)``: boots systemd in the image under software
  emulation (KVM guests hang on these machines), runs ``script`` as root from a unit ordered
  after multi-user.target with ``/results`` shared with the host, and powers off.

Measured here: pure Python runs about 19x slower in the guest (TCG) than on the host, so the
guest is for what only a real kernel or systemd can show, never for performance figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.labkit.topology import failed_logs_dir

MIRROR = "http://deb.debian.org/debian"
CACHE = Path(os.environ.get("TCPENCAP_VM_CACHE", "/var/cache/tcpencap-vm"))
REPO_ROOT = Path(__file__).resolve().parents[2]
VENV = "/opt/tcpencap/.venv"
SRC = "/opt/tcpencap/src"


@dataclass(frozen=True)
class Suite:
    """One Debian release the lab boots: its name and what debootstrap installs into it."""

    name: str
    release: int  # Debian's version number, for messages
    packages: tuple[str, ...]


_BOOT_AND_TOOLS = (
    # a bootable Debian with systemd as PID 1
    "linux-image-amd64 systemd systemd-sysv udev kmod procps iproute2 "
)
_LAB_TOOLS = (
    # what tcpencap and the lab call
    "iptables ipset tcpdump iputils-ping "
    # to build netfilterqueue into the venv
    "python3 python3-venv python3-dev gcc libc6-dev libnetfilter-queue-dev"
)
SUITES = {
    "bookworm": Suite(
        "bookworm",
        12,
        tuple(
            (
                _BOOT_AND_TOOLS
                # strongSwan as a server runs it: charon-systemd (strongswan.service), and the
                # lab's own charon instances (tests/labkit: /usr/lib/ipsec/charon)
                + "charon-systemd strongswan-charon strongswan-swanctl "
                "libstrongswan-standard-plugins libstrongswan-extra-plugins "
                "libcharon-extra-plugins libcharon-extauth-plugins " + _LAB_TOOLS
            ).split()
        ),
    ),
    "trixie": Suite(
        "trixie",
        13,
        tuple(
            (
                _BOOT_AND_TOOLS
                # charon-systemd conflicts with strongswan-charon in trixie: the lab's charon
                # instances run /usr/sbin/charon-systemd there (tests/labkit/charon.py). The
                # plugins the lab loads moved: openssl into libstrongswan; aes, hmac, kdf,
                # sha1, sha2 into libstrongswan-extra-plugins.
                + "charon-systemd strongswan-swanctl libstrongswan "
                "libstrongswan-standard-plugins libstrongswan-extra-plugins "
                "libcharon-extra-plugins libcharon-extauth-plugins " + _LAB_TOOLS
            ).split()
        ),
    ),
}


def selected_suites() -> list[str]:
    """The suites to boot: TCPENCAP_VM_SUITES (comma-separated; scripts/vm-test.sh --suite
    sets it), or all of them."""
    wanted = [s for s in os.environ.get("TCPENCAP_VM_SUITES", "").split(",") if s]
    unknown = sorted(set(wanted) - set(SUITES))
    if unknown:
        raise GuestError(f"unknown suite(s) {unknown}; known: {sorted(SUITES)}")
    return wanted or list(SUITES)


# Written into the guest: fstab for the shares, and the unit that runs the host's script.
FSTAB = """\
/dev/vda / ext4 rw,noatime 0 1
results /results 9p trans=virtio,version=9p2000.L,msize=262144,rw 0 0
"""
RUN_UNIT = """\
[Unit]
Description=Run the host's test script, then power off
After=multi-user.target
RequiresMountsFor=/results
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/sh -c '/bin/sh /results/run.sh >/results/run.log 2>&1; echo $? >/results/rc'
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""


class GuestError(RuntimeError):
    """The guest could not be built or booted; the message carries the log tail."""


def run_logged(argv: list[str], log: Path | None = None, timeout: float = 1800, **kw) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(argv)}\n{res.stdout}{res.stderr}")
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-30:])
        raise GuestError(f"{' '.join(argv[:6])} -> {res.returncode}:\n{tail}")


def _requirements() -> list[str]:
    """tcpencap's runtime and test requirements, read from setup.cfg (one source of truth)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    reqs = cfg["options"]["install_requires"].split()
    reqs += cfg["options.extras_require"]["test"].split()
    return sorted(r for r in reqs if not r.startswith("ruff"))


def cache_key(suite: Suite) -> str:
    """What decides the base root file system's content. Bookworm's text is what it was
    before suites existed, so CI's cached bookworm base keeps its key."""
    text = "\n".join([suite.name, MIRROR, *suite.packages, *_requirements(), FSTAB, RUN_UNIT])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


HOST_CA = "/run/host-ca.pem"  # inside the chroot, on a tmpfs gone with it


def chroot_env() -> dict[str, str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    if _host_ca():
        env["PIP_CERT"] = HOST_CA
    return env


def chroot_apt(root: Path, *args: str, log: Path) -> None:
    """``apt-get -q -y ARGS`` inside ``root`` (mounted with ``chroot_mounts``), unattended."""
    env = chroot_env() | {"DEBIAN_FRONTEND": "noninteractive"}
    run_logged(["chroot", str(root), "apt-get", "-q", "-y", *args], log, env=env)


def cached_layer(name: str, key_text: str, base: Path, fill: Callable[[Path], None]) -> Path:
    """The cached overlay layer ``CACHE/NAME-KEY`` over ``base`` (KEY: a hash of
    ``key_text``), made on first use by ``fill(root)`` in the mounted chroot ``root``. Its
    marker is beside it, not in it, so the layer adds nothing to a root it is part of."""
    layer = CACHE / f"{name}-{hashlib.sha256(key_text.encode()).hexdigest()[:12]}"
    done = layer.with_name(layer.name + ".complete")
    if done.exists():
        return layer
    tmp = layer.with_name(layer.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with overlay([base], tmp) as root, chroot_mounts(root):
        fill(root)
    shutil.rmtree(layer, ignore_errors=True)
    tmp.rename(layer)
    done.touch()
    return layer


def _host_ca() -> str | None:
    """The CA bundle this machine's own pip trusts, if one is set: the network here passes
    TLS through an intercepting proxy whose CA only that bundle has. A property of the
    machine's network, not of the guest, so it goes no further than the chroot's pip."""
    path = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    return path if path and os.path.isfile(path) else None


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys, /dev and a resolv.conf, for package scripts and pip inside ``root``."""
    done: list[Path] = []
    try:
        for fs, target, opts in (
            ("proc", "proc", ["-t", "proc"]),
            ("/sys", "sys", ["--rbind"]),
            ("/dev", "dev", ["--rbind"]),
            ("tmpfs", "run", ["-t", "tmpfs"]),
        ):
            path = root / target
            subprocess.run(["mount", *opts, fs, str(path)], check=True)
            done.append(path)
        shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
        if ca := _host_ca():
            shutil.copyfile(ca, root / HOST_CA.lstrip("/"))
        yield
    finally:
        for path in reversed(done):
            subprocess.run(["umount", "-l", str(path)], check=False)


def base_rootfs(suite: Suite, log: Path) -> Path:
    """The cached guest root file system of ``suite``, built on first use (a few minutes)."""
    base = CACHE / f"guest-{cache_key(suite)}"
    if (base / ".complete").exists():
        return base
    tmp = base.with_name(base.name + ".tmp")
    if not (tmp / ".debootstrapped").exists():  # a finished debootstrap is kept for a retry
        shutil.rmtree(tmp, ignore_errors=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        run_logged(
            ["debootstrap", "--variant=minbase", f"--include={','.join(suite.packages)}"]
            + [suite.name, str(tmp), MIRROR],
            log,
        )
        (tmp / ".debootstrapped").touch()
    with chroot_mounts(tmp):
        run_logged(["chroot", str(tmp), "python3", "-m", "venv", "--clear", VENV], log)
        pip = [f"{VENV}/bin/python", "-m", "pip", "install", "-q", "--no-cache-dir"]
        run_logged(["chroot", str(tmp), *pip, *_requirements()], log, env=chroot_env())
    (tmp / "etc/fstab").write_text(FSTAB)
    (tmp / "etc/hostname").write_text("tcpencap-guest\n")
    (tmp / "results").mkdir(exist_ok=True)
    unit = tmp / "etc/systemd/system/tcpencap-guest-run.service"
    unit.write_text(RUN_UNIT)
    wants = tmp / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")
    # Installing charon-systemd enabled strongswan.service; the tests start it themselves.
    for enabled in wants.glob("strongswan*.service"):
        enabled.unlink()
    (tmp / ".complete").touch()
    tmp.rename(base)
    return base


@dataclass
class Image:
    path: Path
    kernel: Path
    initrd: Path


# Puts tcpencap into the image's root file system ``root`` (mounted, with /proc, /sys, /dev and
# /run for package scripts) from the checkout copied to ``root``/SRC; writes to ``log``.
Installer = Callable[[Path, Path], None]


def pip_install(root: Path, log: Path) -> None:
    """tcpencap into the lab's venv with ``pip install`` (builds the native extension in the
    guest's own toolchain): what the lab's namespaces run. The systemd scenarios also get
    the Debian package (tests/vm/package.py)."""
    pip = [f"{VENV}/bin/python", "-m", "pip", "install", "-q", "--no-deps", "--no-cache-dir"]
    run_logged(["chroot", str(root), *pip, SRC], log, env=chroot_env())


def copy_checkout(tree: Path, dest: Path) -> None:
    """``tree``'s files (tracked and untracked, not ignored) to ``dest``: the guest runs its
    scenarios from there, whatever installed tcpencap."""
    argv = ["git", "-C", str(tree), "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(argv, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        rel = Path(os.fsdecode(name))
        if (tree / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tree / rel, dest / rel)


def kernel_and_initrd(root: Path) -> tuple[Path, Path]:
    """The newest kernel and its initrd in ``root``: /boot's vmlinuz-VERSION and
    initrd.img-VERSION (bookworm's 6.1 and trixie's 6.12 both keep them there), or
    /usr/lib/modules/VERSION/ (where Debian's 7.x kernels keep vmlinuz)."""
    boot_dir = root / "boot"
    kernels = {p.name.removeprefix("vmlinuz-"): p for p in boot_dir.glob("vmlinuz-*")}
    kernels |= {
        p.parent.name: p
        for p in (root / "usr/lib/modules").glob("*/vmlinuz")
        if p.parent.name not in kernels
    }
    if not kernels:
        raise GuestError(f"no kernel in {boot_dir} or {root}/usr/lib/modules/*/")
    version = max(kernels, key=version_key)
    for initrd in (
        boot_dir / f"initrd.img-{version}",
        root / f"usr/lib/modules/{version}/initrd.img",
    ):
        if initrd.exists():
            return kernels[version], initrd
    raise GuestError(f"kernel {version} has no initrd in {boot_dir} or its modules directory")


def version_key(version: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", version)]


def build_image(
    suite: Suite, out: Path, log: Path, tree: Path = REPO_ROOT, install: Installer = pip_install
) -> Image:
    """An ext4 image: ``suite``'s cached base plus ``tree``'s files in SRC, tcpencap put in
    by ``install``, and SRC byte-compiled (imports in the guest are slow enough already)."""
    base = base_rootfs(suite, log)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="guest-overlay.", dir=out))
    try:
        with overlay([base], work / "upper") as merged:
            copy_checkout(tree, merged / SRC.lstrip("/"))
            with chroot_mounts(merged):
                install(merged, log)
                compile_src = [f"{VENV}/bin/python", "-m", "compileall", "-q", SRC]
                run_logged(["chroot", str(merged), *compile_src], log)
            kernel, initrd = kernel_and_initrd(merged)
            image = Image(out / "guest.img", out / "vmlinuz", out / "initrd.img")
            shutil.copyfile(kernel, image.kernel)
            shutil.copyfile(initrd, image.initrd)
            image.path.unlink(missing_ok=True)
            mke2fs = ["mke2fs", "-q", "-t", "ext4", "-L", "root", "-d", str(merged)]
            run_logged([*mke2fs, str(image.path), "4G"], log)
            return image
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def overlay(lowers: list[Path], upper: Path) -> Iterator[Path]:
    """``lowers`` (first on top, never changed) merged under ``upper``, which keeps every
    change: mounted at a sibling of ``upper`` for the ``with`` block. A finished ``upper`` can
    be a lower layer of a later overlay (tests/vm/package.py caches one that way)."""
    merged, wdir = upper.with_name(upper.name + ".merged"), upper.with_name(upper.name + ".work")
    for d in (upper, merged, wdir):
        d.mkdir(parents=True, exist_ok=True)
    lowerdir = ":".join(str(p) for p in lowers)
    opts = f"lowerdir={lowerdir},upperdir={upper},workdir={wdir}"
    run_logged(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)])
    try:
        yield merged
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=False)
        shutil.rmtree(wdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            merged.rmdir()


@dataclass
class Boot:
    returncode: int | None  # the script's exit code; None if it never finished
    seconds: float  # wall time from qemu's start to its exit
    console: str  # what the guest printed on its serial console
    results: Path  # the shared folder: run.log, rc and whatever the script wrote

    def run_log(self) -> str:
        try:
            return (self.results / "run.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def boot(
    image: Image, script: str, results: Path, timeout: float = 900, memory_mb: int = 3072
) -> Boot:
    """Boot the guest, run ``script`` (sh) as root after multi-user.target, return when it powers
    off. qemu is killed (by its PID) if it outlives ``timeout``."""
    if shutil.which("qemu-system-x86_64") is None:
        raise GuestError("qemu-system-x86_64 is needed (qemu-system-x86; scripts/setup.sh)")
    results.mkdir(parents=True, exist_ok=True)
    (results / "run.sh").write_text(script)
    (results / "rc").unlink(missing_ok=True)
    console = results / "console.log"
    argv = [
        "qemu-system-x86_64",
        "-machine", "q35",
        "-cpu", "max",
        "-accel", "tcg,thread=multi",
        "-smp", str(os.cpu_count() or 2),
        "-m", str(memory_mb),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", f"file:{console}",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", "root=/dev/vda rw console=ttyS0 panic=-1 net.ifnames=0 systemd.show_status=1",
        "-drive", f"file={image.path},format=raw,if=virtio,snapshot=on",
        "-fsdev", f"local,id=results,path={results},security_model=none",
        "-device", "virtio-9p-pci,fsdev=results,mount_tag=results",
        "-nic", "none",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    seconds = time.monotonic() - start
    text = console.read_text(errors="replace") if console.exists() else ""
    if out:
        text += "\n[qemu] " + out.decode(errors="replace")
    rc_file = results / "rc"
    rc = int(rc_file.read_text()) if rc_file.exists() else None
    return Boot(rc, seconds, text, results)


def run_pytest(
    suite: Suite, work: Path, test_file: str, timeout: float, install: Installer = pip_install
) -> tuple[Boot, dict[str, dict[str, str]]]:
    """Build ``suite``'s image, boot it once and run ``test_file`` (relative to the checkout)
    under pytest in the guest (its labs choose the kernel backend); returns the boot and, per
    test name, its time, failure text ("" if it passed) and output."""
    import xml.etree.ElementTree as ET

    image = build_image(suite, work / "image", work / "build.log", install=install)
    script = f"""\
cd {SRC}
charon=$({VENV}/bin/python -c 'from tests.labkit.charon import CHARON; print(CHARON)')
strongswan=$(dpkg-query -W -f '${{Version}}' libstrongswan)
echo "guest: $(. /etc/os-release; echo "$PRETTY_NAME"), kernel $(uname -r)," \
    "$(systemctl --version | head -1), strongSwan $strongswan, lab charon $charon"
# The first swanctl after boot took over 30 s once in trixie's guest (its lab timeout; later
# ones well under a second): timed here, outside every scenario, with the kernel's CRNG state.
t0=$(date +%s%N); swanctl --version >/dev/null 2>&1
echo "first swanctl after boot: $(( ($(date +%s%N) - t0) / 1000000 )) ms;" \
    "$(dmesg 2>/dev/null | grep -m1 'crng init' || echo 'no crng init line')"
export PYTHONDONTWRITEBYTECODE=1 TCPENCAP_LAB_FAILED_LOGS=/results/labs
timeout {int(timeout) - 120} {VENV}/bin/python -m pytest -p no:cacheprovider -v -s -rA \\
    --junitxml=/results/junit.xml {test_file}
rc=$?
journalctl -b --no-pager -o short-monotonic >/results/journal.txt 2>&1
lsmod >/results/lsmod.txt  # what the scenarios loaded: a trimmed kernel's module list
exit $rc
"""
    result = boot(image, script, work / "results", timeout=timeout)
    image.path.unlink(missing_ok=True)  # 4 GB (sparse); the logs stay
    print(
        f"\nguest {suite.name}: {test_file}: {result.seconds:.0f} s wall, "
        f"exit {result.returncode}; {work}\n" + "\n".join(result.run_log().splitlines()[:2])
    )
    cases: dict[str, dict[str, str]] = {}
    junit = result.results / "junit.xml"
    if junit.exists():
        for case in ET.parse(junit).iter("testcase"):
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            text = "" if bad is None else f"{bad.get('message', '')}\n{bad.text or ''}"
            cases[case.get("name", "")] = {
                "time": case.get("time", "?"),
                "failure": text,
                "out": case.findtext("system-out") or "",
            }
    return result, cases


def run_suite(
    name: str,
    tmp: Any,
    test_file: str,
    timeout: float,
    installer: Callable[[Suite, Path], Installer] | None = None,
) -> dict[str, Any]:
    """``run_pytest`` in suite ``name``'s guest, in a fresh directory of pytest's
    ``tmp_path_factory`` ``tmp``: what the host-side tests' module fixture returns.
    ``installer(suite, work)`` makes the image's ``Installer`` (default ``pip_install``)."""
    suite = SUITES[name]
    work = tmp.mktemp(f"vm-{Path(test_file).stem}-{name}")
    install = installer(suite, work) if installer else pip_install
    boot, cases = run_pytest(suite, work, test_file, timeout, install=install)
    return {"boot": boot, "cases": cases}


def report(cases: dict[str, dict[str, str]], boot: Boot, name: str) -> str:
    """For one guest test: its time and output, or why it is missing; raises if it failed."""
    case = cases.get(name)
    if case is None:
        raise AssertionError(
            f"{name} did not run in the guest (exit {boot.returncode})\n"
            f"--- run.log tail:\n{boot.run_log()[-3000:]}\n"
            f"--- console tail:\n{boot.console[-2000:]}"
        )
    print(f"{name}: {case['time']} s in the guest\n{section(boot.run_log(), name)}")
    if case["failure"]:
        raise AssertionError(
            f"{name} failed in the guest:\n{case['failure'][-4000:]}{failed_logs(boot, name)}"
        )
    return case["out"]


def failed_logs(boot: Boot, name: str, lines: int = 60) -> str:
    """The tails of the charon and tcpencap logs the failed test's lab left in the results
    (tests/labkit keeps them there, see Lab._keep_failed_logs)."""
    lab = failed_logs_dir(boot.results / "labs", name)
    logs = sorted(lab.glob("*/charon/charon.log")) + sorted(lab.glob("*/tcpencap.log"))
    out = [f"\n--- logs kept in {lab}" if logs else f"\n--- no logs kept in {lab}"]
    for log in logs:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"--- {log.relative_to(lab)} (last {len(tail)} lines):\n" + "\n".join(tail))
    return "\n".join(out)


def section(log: str, name: str) -> str:
    """What one test printed in the guest's verbose pytest log (its -s output)."""
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if f"::{name} " in line), None)
    if start is None:
        return ""
    # pytest -v -s prints the test's first line of output right after its name
    out = [lines[start].split(f"::{name} ", 1)[1]]
    for line in lines[start + 1 :]:
        if "::test_" in line:
            break
        out.append(line)
    return "\n".join(out)
