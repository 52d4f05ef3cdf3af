"""strongSwan's charon in a lab namespace: its strongswan.conf, a private /run, its own VICI
socket, and a handle (``Charon``) for loading swanctl configuration and driving SAs."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import vici
from vici.exception import CommandException

from .configs import KEY_MARK
from .process import LabError, Process, run

if TYPE_CHECKING:
    from .topology import Host

# The daemon each lab host runs: strongswan-charon's, or where only charon-systemd is installed
# (Debian 13, where the two packages conflict; the VM lab's trixie guest) charon-systemd, the
# same daemon, whose settings inherit the `charon` section written below.
CHARON = next(
    (p for p in ("/usr/lib/ipsec/charon", "/usr/sbin/charon-systemd") if os.path.exists(p)),
    "/usr/lib/ipsec/charon",
)
BASE_PLUGINS = (
    "random nonce openssl pem pkcs1 pkcs8 x509 pubkey kdf hmac sha1 sha2 aes gcm curve25519 "
    "kernel-libipsec kernel-netlink socket-default vici"
).split()
# Loaded only by the tests that name them (plugins_extra); scripts/setup.sh checks them too.
OPTIONAL_PLUGINS = ("xauth-generic", "unity", "eap-identity", "eap-md5", "eap-mschapv2")
# Where ESP runs: "libipsec" (user space, a TUN device; this machine's kernel has no ESP) or
# "kernel" (XFRM through kernel-netlink, as on the servers people deploy on; the VM lab).
IPSEC_BACKENDS = ("libipsec", "kernel")
SWANCTL_SUBDIRS = (
    "x509 x509ca x509ocsp x509aa x509ac x509crl pubkey private rsa ecdsa bliss pkcs8 pkcs12"
).split()


@functools.cache
def charon_version() -> tuple[int, ...]:
    """The installed charon's release, ("Linux strongSwan 6.0.1" -> (6, 0, 1)): a test whose
    expectation changed between strongSwan releases branches on it instead of hoping."""
    out = run([CHARON, "--version"]).stdout
    m = re.search(r"strongSwan U?(\d+(?:\.\d+)+)", out)
    if not m:
        raise LabError(f"{CHARON} --version: no strongSwan release in {out!r}")
    return tuple(int(part) for part in m.group(1).split("."))


class CharonError(LabError):
    """A charon command (initiate, load, ...) failed or timed out."""


def spawn_charon(
    host: Host, ipsec: str, plugins_extra: Iterable[str] = (), settings: str = ""
) -> Charon:
    """Start charon in ``host``'s namespace with the IPsec backend ``ipsec``, a private /run
    and its own VICI socket under ``host.dir``/charon; returns at once (``Charon.wait_ready``
    waits until VICI answers).

    ``settings`` is extra strongswan.conf text placed inside the ``charon { }`` section.
    """
    cdir = host.dir / "charon"
    run_dir = cdir / "run"
    swanctl_dir = cdir / "swanctl"
    run_dir.mkdir(parents=True, exist_ok=True)
    for sub in SWANCTL_SUBDIRS:
        (swanctl_dir / sub).mkdir(parents=True, exist_ok=True)
    sock = cdir / "charon.vici"
    log = cdir / "charon.log"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    skip = {"kernel-libipsec"} if ipsec == "kernel" else set()
    plugins = " ".join(p for p in dict.fromkeys([*BASE_PLUGINS, *plugins_extra]) if p not in skip)
    conf = cdir / "strongswan.conf"
    conf.write_text(
        f"""charon {{
  load_modular = no
  load = {plugins}
  filelog {{
    lab {{
      path = {log}
      time_format = %H:%M:%S
      flush_line = yes
      default = 1
      ike = 2
      cfg = 2
      net = 1
    }}
  }}
  syslog {{
    daemon {{
      default = -1
    }}
  }}
  plugins {{
    vici {{
      socket = unix://{sock}
    }}
  }}
{settings}
}}
"""
    )
    # charon writes a fixed /var/run/charon.pid: each instance gets its own /run (ip netns
    # exec gives the process a private mount namespace).
    script = f"mount --bind {run_dir} /run && exec {CHARON}"
    proc = host.spawn(
        ["sh", "-c", script], "charon.out", env={"STRONGSWAN_CONF": str(conf)}, cwd=cdir
    )
    return Charon(host, cdir, sock, log, proc, swanctl_dir)


class Charon:
    """Handle on one charon instance: VICI access and swanctl configuration loading."""

    def __init__(
        self, host: Host, cdir: Path, sock: Path, log: Path, process: Process, swanctl_dir: Path
    ) -> None:
        self.host = host
        self.dir = cdir
        self.vici_socket = sock
        self.uri = f"unix://{sock}"
        self.log = log
        self.process = process
        self.swanctl_dir = swanctl_dir
        self._conf_parts: list[str] = []

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        return "\n".join(text.splitlines()[-lines:]) + "\n" + self.process.log_tail(10)

    def wait_ready(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.session().version()
                return
            except OSError:
                pass
            if not self.process.alive():
                raise LabError(f"charon in {self.host.role} exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise LabError(
                    f"charon in {self.host.role}: no VICI in {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.01)

    def session(self, timeout: float | None = None) -> Any:
        """A new vici.Session (one command at a time per session; use one per thread)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(1.0)
        try:
            sock.connect(str(self.vici_socket))
        except OSError:
            sock.close()
            raise
        sock.settimeout(timeout)
        return vici.Session(sock)

    def load(self, conf_text: str, reset: bool = False) -> None:
        """Add swanctl.conf text to this charon's configuration and load all of it.

        swanctl --load-all unloads what the file lacks, so earlier texts are kept and
        re-sent (strongSwan merges repeated sections); ``reset=True`` drops them. Private
        keys named in ``# lab-key: PATH`` lines (see cert_conf) are copied to private/.
        """
        if reset:
            self._conf_parts.clear()
        for key in re.findall(rf"^{KEY_MARK}(.+)$", conf_text, re.M):
            shutil.copyfile(key.strip(), self.swanctl_dir / "private" / Path(key.strip()).name)
        self._conf_parts.append(conf_text)
        conf = self.swanctl_dir / "swanctl.conf"
        conf.write_text("\n".join(self._conf_parts))
        proc = run(
            ["swanctl", "--load-all", "--noprompt", "--file", str(conf), "--uri", self.uri],
            check=False,
            input="",
            env={"SWANCTL_DIR": str(self.swanctl_dir)},
        )
        out = proc.stdout + proc.stderr
        if proc.returncode != 0 or "failed" in out:
            raise CharonError(f"swanctl --load-all in {self.host.role}:\n{out}\n{self.log_tail()}")

    def initiate(self, child: str, ike: str | None = None, timeout: float = 5.0) -> None:
        """Bring up ``child`` (of ``ike``); raise CharonError if it fails within ``timeout``."""
        msg: dict[str, Any] = {"child": child, "timeout": int(timeout * 1000), "loglevel": -1}
        if ike is not None:
            msg["ike"] = ike
        sess = self.session(timeout=timeout + 5)
        try:
            for _ in sess.initiate(msg):
                pass
        except (CommandException, OSError) as exc:
            raise CharonError(
                f"initiate {child} in {self.host.role}: {exc}\n{self.log_tail()}"
            ) from exc
        finally:
            sess.transport.socket.close()

    def terminate(self, ike: str, timeout: float = 5.0) -> None:
        """Delete the IKE_SA named ``ike`` (and its CHILD_SAs)."""
        sess = self.session(timeout=timeout + 5)
        try:
            for _ in sess.terminate({"ike": ike, "timeout": int(timeout * 1000), "loglevel": -1}):
                pass
        except CommandException as exc:
            raise CharonError(f"terminate {ike} in {self.host.role}: {exc}") from exc
        finally:
            sess.transport.socket.close()

    def list_sas(self) -> list[dict[str, Any]]:
        """``list-sas`` decoded to str: one ``{ike_name: sa}`` dict per IKE_SA."""
        sess = self.session(timeout=10)
        try:
            return [vici_to_str(sa) for sa in sess.list_sas()]
        finally:
            sess.transport.socket.close()


def vici_to_str(obj: Any) -> Any:
    """Turn the bytes vici returns into str, recursively."""
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    if isinstance(obj, dict):
        return {vici_to_str(k): vici_to_str(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [vici_to_str(v) for v in obj]
    return obj
