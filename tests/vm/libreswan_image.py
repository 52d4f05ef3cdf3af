"""The VM lab's independent RFC 9329 peer: Debian's libreswan, in its own root file system (its
packages conflict with strongSwan's), inside the trixie guest booted on the espintcp kernel
(tests/vm/espintcp_kernel.py). tests/vm/libreswan_scenarios.py runs pluto chrooted into it,
in a lab namespace; strongSwan and tcpencap run from the guest's own root as in every lab.

- ``rootfs(log)``: debootstrap trixie minbase with libreswan and what its updown script calls,
  its NSS database initialised; cached under ``guest.CACHE``, keyed by the package list.
- ``libreswan_installer(suite, work)``: the image's ``guest.Installer``: the lab's venv
  (``guest.pip_install``), the espintcp kernel in place of the stock one (its modules, an
  initramfs made by the guest's own update-initramfs), and the libreswan root at ``LSW``.

Test-side code: never installed with the daemon.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import espintcp_kernel
import guest

SUITE = espintcp_kernel.KERNEL_SUITE
LSW = "/srv/libreswan"  # in the guest
# bind9-host: libreswan depends on the virtual package "host", which debootstrap cannot resolve
PACKAGES = ("libreswan", "bind9-host", "iproute2", "iputils-ping", "procps", "libnss3-tools")


def rootfs(log: Path) -> Path:
    """libreswan's own root file system (cached; ~1 minute to build)."""
    text = "\n".join([SUITE, guest.MIRROR, *PACKAGES])
    root = guest.CACHE / f"libreswan-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if (root / ".complete").exists():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    guest.CACHE.mkdir(parents=True, exist_ok=True)
    guest.run_logged(
        ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}"]
        + [SUITE, str(tmp), guest.MIRROR],
        log,
    )
    with guest.chroot_mounts(tmp):
        guest.run_logged(["chroot", str(tmp), "ipsec", "initnss"], log)
    (tmp / ".complete").touch()
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def libreswan_installer(suite: guest.Suite, work: Path) -> guest.Installer:
    assert suite.name == SUITE, f"the espintcp kernel is {SUITE}'s, not {suite.name}'s"
    kernel = espintcp_kernel.build(work / "kernel.log")
    print((kernel.path / "built.txt").read_text().strip())
    lsw = rootfs(work / "libreswan.log")

    def install(root: Path, log: Path) -> None:
        guest.pip_install(root, log)
        boot = root / "boot"
        for stock in [*boot.glob("vmlinuz-*"), *boot.glob("initrd.img-*")]:
            stock.unlink()  # build_image boots the newest kernel it finds: only this one
        modules = root / "usr/lib/modules" / kernel.release
        shutil.copytree(kernel.path / "lib/modules" / kernel.release, modules, symlinks=True)
        shutil.copyfile(kernel.vmlinuz, boot / f"vmlinuz-{kernel.release}")
        shutil.copyfile(kernel.path / "config", boot / f"config-{kernel.release}")
        guest.run_logged(["chroot", str(root), "update-initramfs", "-c", "-k", kernel.release], log)
        # cp -a: the root has device nodes (/dev/console...), which copytree would read
        guest.run_logged(["cp", "-a", f"{lsw}/.", str(root / LSW.lstrip("/"))], log)

    return install
