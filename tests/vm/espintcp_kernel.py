"""A Debian kernel with the kernel's ESP-in-TCP (espintcp), for the VM lab's libreswan peer.

No Debian kernel sets CONFIG_INET_ESPINTCP (bookworm 6.1 to trixie-backports 7.3), and
libreswan's RFC 8229/9329 needs it. So the lab builds one from Debian's own ``linux-source``
package of the trixie guest's kernel version (``KERNEL_SUITE``), with Debian's configuration
of that kernel, trimmed by ``make localmodconfig`` to the modules the guests load
(``MODULES``, an lsmod taken in the guests: ``tests/vm/guest.py`` leaves one in the results of
every boot) and without debug information, plus::

    CONFIG_INET_ESPINTCP=y, CONFIG_INET6_ESPINTCP=y

It is built in a throw-away overlay of the suite's guest base with a cached layer of the build
tools, and the result is cached under ``guest.CACHE`` keyed by the source package's version,
the module list and the options: a new Debian kernel, or a change to either, builds anew.

The source must have the fix of CVE-2026-46300 ("Fragnesia", ESP-in-TCP receive: a lost
SKBFL_SHARED_FRAG in ``skb_try_coalesce``): the build refuses a source whose Debian changelog
does not name it or whose ``skb_try_coalesce`` does not carry the flag over.

    PYTHONPATH=. .venv/bin/python tests/vm/espintcp_kernel.py   # build (or find) it

Test-side code: never installed with the daemon.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import guest

KERNEL_SUITE = "trixie"
MODULES = Path(__file__).with_name("espintcp-kernel.lsmod")
OPTIONS = {
    "INET_ESPINTCP": "y",
    "INET6_ESPINTCP": "y",
    # the build has no Debian signing key and no use for debug information
    "MODULE_SIG": "n",
    "SYSTEM_TRUSTED_KEYS": '""',
    "SYSTEM_REVOCATION_KEYS": '""',
    "DEBUG_INFO_NONE": "y",
    "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT": "n",
    "DEBUG_INFO_DWARF4": "n",
    "DEBUG_INFO_DWARF5": "n",
    "DEBUG_INFO_BTF": "n",
    "LOCALVERSION": '"-espintcp"',
}
BUILD_TOOLS = (
    "build-essential bc bison flex libssl-dev libelf-dev cpio kmod rsync xz-utils zstd python3"
).split()
CVE = "CVE-2026-46300"


@dataclass(frozen=True)
class Kernel:
    """A built kernel: its directory (vmlinuz, config, lib/modules/RELEASE) and release name."""

    path: Path
    release: str

    @property
    def vmlinuz(self) -> Path:
        return self.path / "vmlinuz"


def source_package(root: Path) -> tuple[str, str]:
    """The guest kernel's ``linux-source-X.Y`` package and version in ``root`` (its base)."""
    out = subprocess.run(
        ["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${Version}\\n",
         "linux-image-[0-9]*"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    images = [line.split() for line in out.splitlines() if not line.endswith("-unsigned")]
    images = [p for p in images if len(p) == 2 and "-unsigned" not in p[0]]
    name, version = max(images, key=lambda p: guest.version_key(p[1]))
    series = re.match(r"linux-image-(\d+\.\d+)", name)
    assert series, name
    return f"linux-source-{series[1]}", version


def tools_layer(suite: guest.Suite, base: Path, source: str, version: str, log: Path) -> Path:
    """The cached layer over the guest base with the build tools and the kernel source."""

    def fill(root: Path) -> None:
        guest.chroot_apt(root, "update", log=log)
        wanted = [f"{source}={version}", *BUILD_TOOLS]
        guest.chroot_apt(root, "install", "--no-install-recommends", *wanted, log=log)
        guest.chroot_apt(root, "clean", log=log)

    text = "\n".join([guest.cache_key(suite), source, version, *BUILD_TOOLS])
    return guest.cached_layer("kbuild", text, base, fill)


BUILD = r"""
set -euo pipefail
cd /build
[ -d {source} ] || tar -xaf /usr/src/{source}.tar.xz  # kept from a failed run: make resumes
cd {source}
# CVE-2026-46300: named in Debian's changelog, and the flag carried over in the code
zgrep -q '{cve}' /usr/share/doc/{source}/changelog.Debian.gz
awk '/^bool skb_try_coalesce\(/,/^}}/' net/core/skbuff.c | grep -q SKBFL_SHARED_FRAG
echo "espintcp-kernel: {cve} fixed in this source (changelog and skb_try_coalesce)"
cp /boot/config-{stock} .config
grep -v '^#' /build/modules.lsmod >/build/lsmod
{{ yes '' || true; }} | make -s LSMOD=/build/lsmod localmodconfig >/build/localmodconfig.log 2>&1 \
  || {{ tail -20 /build/localmodconfig.log >&2; exit 1; }}
{options}
make -s olddefconfig
for opt in INET_ESPINTCP INET6_ESPINTCP; do
  grep -qx "CONFIG_$opt=y" .config || {{ echo "espintcp-kernel: CONFIG_$opt not set" >&2; exit 1; }}
done
! grep -qx 'CONFIG_DEBUG_INFO=y' .config || {{ echo "espintcp-kernel: debug info on" >&2; exit 1; }}
echo "espintcp-kernel: $(grep -c '=m$' .config) modules, building with $(nproc) jobs"
make -s -j"$(nproc)" bzImage modules
make -s modules_install INSTALL_MOD_PATH=/build/out INSTALL_MOD_STRIP=1
cp arch/x86/boot/bzImage /build/out/vmlinuz
cp .config /build/out/config
make -s kernelrelease >/build/out/release
"""


def config_line(name: str, value: str) -> str:
    """The scripts/config command that sets CONFIG_``name`` to ``value`` (y, n or "text")."""
    if value in ("y", "n"):
        return f"scripts/config --{'enable' if value == 'y' else 'disable'} {name}"
    return f"scripts/config --set-str {name} {shlex.quote(value.strip(chr(34)))}"


def build(log: Path) -> Kernel:
    """The espintcp kernel, built on first use (cached)."""
    suite = guest.SUITES[KERNEL_SUITE]
    base = guest.base_rootfs(suite, log)
    source, version = source_package(base)
    stock = max((p.name.removeprefix("config-") for p in (base / "boot").glob("config-*")),
                key=guest.version_key)  # fmt: skip
    modules = MODULES.read_text()
    options = "\n".join(f"{k}={v}" for k, v in sorted(OPTIONS.items()))
    key = hashlib.sha256("\n".join([source, version, stock, modules, options]).encode())
    out = guest.CACHE / f"espintcp-kernel-{key.hexdigest()[:12]}"
    if (out / ".complete").exists():
        return Kernel(out, (out / "release").read_text().strip())
    layer = tools_layer(suite, base, source, version, log)
    start = time.monotonic()
    # Kept when the build fails, so that the next run resumes it; gone once it succeeds.
    work = out.with_name(out.name + ".work")
    with guest.overlay([layer, base], work / "upper") as root, guest.chroot_mounts(root):
        shutil.rmtree(root / "build/out", ignore_errors=True)
        (root / "build/out").mkdir(parents=True)
        (root / "build/modules.lsmod").write_text(modules)
        script = BUILD.format(
            source=source, cve=CVE, stock=stock,
            options="\n".join(config_line(k, v) for k, v in sorted(OPTIONS.items())),
        )  # fmt: skip
        guest.run_logged(["chroot", str(root), "bash", "-c", script], log, timeout=7200,
                         env=guest.chroot_env())  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(root / "build/out", out, symlinks=True)
    shutil.rmtree(work, ignore_errors=True)
    took = time.monotonic() - start
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    (out / "built.txt").write_text(
        f"{source} {version} (stock {stock}): built in {took:.0f} s on {os.cpu_count()} CPUs, "
        f"{size / 1e6:.1f} MB (vmlinuz {(out / 'vmlinuz').stat().st_size / 1e6:.1f} MB)\n"
    )
    (out / ".complete").touch()
    return Kernel(out, (out / "release").read_text().strip())


if __name__ == "__main__":
    log = Path(tempfile.gettempdir()) / "espintcp-kernel.log"
    kernel = build(log)
    print((kernel.path / "built.txt").read_text().strip())
    print(kernel.path)
