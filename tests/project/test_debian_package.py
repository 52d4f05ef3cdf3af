"""The Debian package (debian/, scripts/build-deb.sh) and its man pages.

The man page checks are unit tests: tcpencap.conf(5) must name every key of the code with a
default that the reader turns into the code's default, and tcpencap(8) every command and
option. The build and the install are marked ``lab`` (minutes, root): the package is built
from the committed tree with dpkg-buildpackage and lintian, then installed, its rules set,
removed and purged in a throw-away overlay of the fresh-machine check's Debian 12 root file
system, in a network namespace of its own (the rules must not touch this machine's).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcpencap import __version__
from tcpencap.cli import parser
from tcpencap.config import (
    ClientConfig,
    Config,
    ConnectionConfig,
    GatewayConfig,
    default_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs" / "man"))
import build_manpages  # noqa: E402

SECTION_MODELS = {
    "tcpencap": Config,
    "tcpencap.client": ClientConfig,
    "tcpencap.gateway": GatewayConfig,
    "tcpencap.connections.<conn>": ConnectionConfig,
}
NOT_KEYS = {"client", "gateway", "connections", "source", "name"}


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("man")
    return {p.name: p.read_text() for p in build_manpages.build(out)}


def _page_keys(page: str) -> dict[str, str]:
    """Each ``.BR key " [default]"`` of the page, as written there."""
    found = re.findall(r'(?m)^\.BR (tcpencap\.\S+) " \[(.*)\]"$', page)
    keys = dict(found)
    assert len(keys) == len(found), "a key is listed twice"
    return {k: v.replace("\\e", "\\") for k, v in keys.items()}


def _code_keys() -> set[str]:
    return {
        f"{prefix}.{f.name}"
        for prefix, model in SECTION_MODELS.items()
        for f in dataclasses.fields(model)
        if f.name not in NOT_KEYS
    }


def _set_one(key: str, value: str) -> str:
    """A configuration that sets only ``key`` (with a connection ``c`` for its keys)."""
    parts = key.split(".")[1:]
    if parts[0] == "connections":
        parts[1] = "c"
    body = f"{parts[-1]} = {value}\n"
    for name in reversed(["tcpencap", *parts[:-1]]):
        body = f"{name} {{\n{body}}}\n"
    return body


def test_conf_page_lists_exactly_the_keys_of_the_code(pages: dict[str, str]) -> None:
    assert set(_page_keys(pages["tcpencap.conf.5"])) == _code_keys()


def test_conf_page_defaults_are_the_codes(pages: dict[str, str]) -> None:
    """Each default as the page prints it, written into a file, reads as the code's
    default: a changed default in tcpencap/config.py and a stale page cannot both pass."""
    for key, shown in _page_keys(pages["tcpencap.conf.5"]).items():
        cfg = parse_config(_set_one(key, shown), "/man/page")
        if ".connections." in key:
            assert cfg.connections == {"c": ConnectionConfig(name="c")}, key
        else:
            assert dataclasses.replace(cfg, source=default_config().source) == default_config(), (
                key,
                shown,
            )


def test_conf_page_gives_each_key_a_meaning(pages: dict[str, str]) -> None:
    page = pages["tcpencap.conf.5"]
    for key in _code_keys():
        after = page.split(f'.BR {key} "', 1)[1].split("\n", 2)[1]
        assert len(after.split()) >= 3, key


def test_command_page_names_every_command_and_option(pages: dict[str, str]) -> None:
    page = pages["tcpencap.8"].replace("\\-", "-")
    sub = next(a for a in parser()._actions if a.dest == "command")
    for name, cmd in sub.choices.items():  # type: ignore[union-attr]
        assert re.search(rf"(?m)^\.B {name}$", page), name
        for action in cmd._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help"):
                    assert opt in page, (name, opt)


def test_pages_render_without_warnings(pages: dict[str, str], tmp_path: Path) -> None:
    for name, text in pages.items():
        path = tmp_path / name
        path.write_text(text)
        proc = subprocess.run(
            ["man", "--warnings", "-E", "UTF-8", "-l", str(path)],
            capture_output=True,
            text=True,
            env={"LC_ALL": "C.UTF-8", "MANWIDTH": "80", "PATH": "/usr/bin:/bin"},
            check=False,
        )
        assert proc.returncode == 0 and not proc.stderr.strip(), (name, proc.stderr)
        assert "tcpencap" in proc.stdout


def test_package_version_is_the_code_version() -> None:
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"tcpencap ({__version__}) "), first


# ---------------------------------------------------------------- the build (lab)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/build-deb.sh on the committed tree: the .deb's path (its last output line)."""
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-deb.sh"), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    deb = Path(proc.stdout.strip().splitlines()[-1])
    assert deb.name == f"tcpencap_{__version__}_amd64.deb" and deb.is_file()
    return deb


def _contents(deb: Path) -> set[str]:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True)
    return {line.split()[5].removeprefix(".") for line in listing.stdout.splitlines()}


@pytest.mark.lab
def test_package_contents(built: Path) -> None:
    files = _contents(built)
    unit_dir = (
        "/usr/lib/systemd/system" if "/usr/lib/systemd/system/" in files else "/lib/systemd/system"
    )
    for path in (
        "/usr/sbin/tcpencap",
        f"{unit_dir}/tcpencap.service",
        f"{unit_dir}/strongswan.service.d/tcpencap.conf",
        f"{unit_dir}/strongswan-starter.service.d/tcpencap.conf",
        "/usr/lib/sysusers.d/tcpencap.conf",
        "/etc/strongswan.d/tcpencap.conf",
        "/usr/share/man/man8/tcpencap.8.gz",
        "/usr/share/man/man5/tcpencap.conf.5.gz",
        "/usr/lib/tcpencap/vici/session.py",
    ):
        assert path in files, path
    native = [
        f
        for f in files
        if re.fullmatch(
            r"/usr/lib/tcpencap/tcpencap/native/_fastpath\.cpython-\d+-x86_64-linux-gnu\.so", f
        )
    ]
    assert native, "the native extension is not in the package"
    # netfilterqueue: Debian's where the suite has it (trixie on), else a bundled build
    bundled = any(f.startswith("/usr/lib/tcpencap/netfilterqueue/") for f in files)
    depends = subprocess.run(
        ["dpkg-deb", "-f", str(built), "Depends"], capture_output=True, text=True, check=True
    ).stdout
    debian_has_it = host_suite() != "bookworm"
    assert bundled is not debian_has_it, f"{host_suite()}: bundled netfilterqueue {bundled}"
    assert ("python3-netfilterqueue" in depends) is debian_has_it, depends


@pytest.mark.lab
def test_package_conffiles_and_unit(built: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-e", str(built), str(tmp_path / "ctrl")], check=True)
    assert (tmp_path / "ctrl" / "conffiles").read_text().split() == [
        "/etc/strongswan.d/tcpencap.conf"
    ]
    subprocess.run(["dpkg-deb", "-x", str(built), str(tmp_path / "fs")], check=True)
    conf = (tmp_path / "fs" / "etc/strongswan.d/tcpencap.conf").read_text()
    assert conf == (ROOT / "configs" / "tcpencap.conf").read_text()
    unit = next((tmp_path / "fs").glob("**/systemd/system/tcpencap.service")).read_text()
    assert "\nExecStart=/usr/sbin/tcpencap run\n" in unit
    # the confinement is configs/tcpencap.service's, line for line
    source = (ROOT / "configs" / "tcpencap.service").read_text()
    service = source.split("\n[Service]\n", 1)[1].split("\n[Install]\n", 1)[0]
    for line in service.splitlines():
        if line and not line.startswith(("#", "ExecStart=")):
            assert f"\n{line}\n" in unit, line


@pytest.mark.lab
def test_lintian_has_no_errors(built: Path) -> None:
    report = (built.parent / "lintian.txt").read_text()
    assert not re.search(r"(?m)^E: ", report), report


# ---------------------------------------------------------------- install, remove, purge (lab)


def host_suite() -> str:
    """This machine's Debian suite: the package built here installs into the same suite."""
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise AssertionError("/etc/os-release names no VERSION_CODENAME")


def fresh_base() -> Path:
    """The fresh-machine check's pristine root file system of this suite, built once (cached;
    inside the fresh-machine check itself it is built in there, from the Debian archive)."""
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts/fresh-machine-check.sh"),
            "--suite",
            host_suite(),
            "--base-only",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = Path(proc.stdout.strip().splitlines()[-1])
    assert (base / ".complete").is_file(), base
    return base


@pytest.fixture
def chroot(tmp_path: Path) -> Iterator[Path]:
    """A throw-away overlay of the fresh-machine check's base of this suite (never changed)."""
    base = fresh_base()
    root, upper, work = tmp_path / "root", tmp_path / "upper", tmp_path / "work"
    for d in (root, upper, work):
        d.mkdir()
    mounts: list[Path] = []

    def mount(*args: str, target: Path) -> None:
        subprocess.run(["mount", *args, str(target)], check=True)
        mounts.append(target)

    try:
        opts = f"lowerdir={base},upperdir={upper},workdir={work}"
        mount("-t", "overlay", "overlay", "-o", opts, target=root)
        mount("-t", "proc", "proc", target=root / "proc")
        mount("--bind", "/dev", target=root / "dev")
        mount("-t", "tmpfs", "tmpfs", target=root / "run")
        mount("-t", "tmpfs", "tmpfs", target=root / "tmp")
        (root / "etc/resolv.conf").write_text(Path("/etc/resolv.conf").read_text())
        yield root
    finally:
        for target in reversed(mounts):
            subprocess.run(["umount", "-l", str(target)], check=False)


INSTALL_REMOVE_PURGE = r"""
set -ex
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends ipset /tmp/{deb}
tcpencap --help
tcpencap version
python3 -I -c 'import sys; sys.path.insert(0, "/usr/lib/tcpencap")
import tcpencap.native._fastpath as f; print("native:", f.__file__)'
getent passwd tcpencap
unshare --net sh -ex -c '
  tcpencap install-rules
  echo "rules installed:"; iptables-save -t mangle | grep -c TCPENCAP; ipset list -n
  dpkg -r tcpencap
  echo "after dpkg -r:"
  iptables-save -t mangle | grep -c TCPENCAP || true
  ip6tables-save -t mangle | grep -c TCPENCAP || true
  ipset list -n | grep -c TCPENCAP || true
'
ls -l /etc/strongswan.d/tcpencap.conf
dpkg -P tcpencap
test ! -e /etc/strongswan.d/tcpencap.conf && echo "purged: /etc/strongswan.d/tcpencap.conf is gone"
dpkg -l tcpencap 2>&1 | tail -1
"""


@pytest.mark.lab
def test_install_remove_purge_in_a_fresh_debian(built: Path, chroot: Path) -> None:
    (chroot / "tmp" / built.name).write_bytes(built.read_bytes())
    script = INSTALL_REMOVE_PURGE.replace("{deb}", built.name)
    proc = subprocess.run(
        ["chroot", str(chroot), "/bin/bash", "-c", script],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"},
        timeout=900,
        check=False,
    )
    log = proc.stdout + proc.stderr
    Path(built.parent / "install-remove-purge.log").write_text(log)
    assert proc.returncode == 0, log[-4000:]
    assert "usage: tcpencap" in proc.stdout
    assert re.search(r"(?m)^native: /usr/lib/tcpencap/tcpencap/native/_fastpath", proc.stdout)
    installed = proc.stdout.split("rules installed:\n", 1)[1]
    assert int(installed.split("\n", 1)[0]) > 0, "install-rules made no rule"
    after = proc.stdout.split("after dpkg -r:\n", 1)[1].split("\n")[:3]
    assert after == ["0", "0", "0"], f"rules or sets left after dpkg -r: {after}"
    assert "purged: /etc/strongswan.d/tcpencap.conf is gone" in proc.stdout
