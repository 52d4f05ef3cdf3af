"""Lab harness: real strongSwan charon instances in network namespaces.

Used by the integration tests, the demo and the benchmarks. Needs root, iproute2, iptables,
tcpdump, ping and strongSwan 5.9 (charon with kernel-libipsec, swanctl). Never imported by
the daemon itself.

Topology (names unique per run, prefix ``te`` + 6 hex digits)::

    c1 (198.18.1.2, fd00:1::2) --+
    c2 (198.18.2.2, fd00:2::2) --+-- fw (.1 / ::1 on every link, forwards) -- gw (198.19.0.2,
    ...                          |                                             fd00:100::2)

Client ``i`` has inner (tunnel) addresses 198.18.{200+i}.1/32 and fd00:{200+i}::1/128, the
gateway 198.19.200.1/32 and fd00:200::1/128, all on ``lo`` (this kernel has no dummy links).

API::

    with Lab(clients=2, workdir=None, keep=False, ipsec="libipsec") as lab:  # or "kernel"
        # lab.dir: a new temp dir (removed unless keep) or workdir (never removed);
        # lab.prefix: 'te' + 6 hex; lab.fw, lab.gw: Host; lab.clients: list[Host];
        # lab.hosts: [fw, gw, *clients]; lab.processes, lab.rules: what teardown undoes
        lab.block_udp(host) / lab.unblock_udp(host)  # fw FORWARD: DROP -i/-o host's fw veth,
                                                     # -p udp, iptables and ip6tables
        cap = lab.capture(host, iface=None)          # tcpdump on host.veth, already listening
        cap.stop() -> list of scapy packets; cap.count_udp_ike(); cap.count_tcp(port); cap.pcap
    Host: name (netns), role ('fw'|'gw'|'c1'..), dir, outer4, outer6, inner4, inner6,
          veth (its end of the link to fw), fw_veth (fw's end), charon (after start_charon);
          outer(family) / inner(family) -> str
          run(*argv, check=True, timeout=30, input=None) -> CompletedProcess[str]
          spawn(argv, log_name, env=None, cwd=None) -> Process   # ip netns exec, own session,
                                                                 # stdout+stderr -> dir/log_name
          start_charon(plugins_extra=(), settings="") -> Charon  # settings: extra text inside
                                                                 # charon { }; VICI answers
    Process: pid, argv, log, popen; alive(), log_text(), log_tail(n=30),
          wait_for_log(substring, timeout=5.0), stop(timeout=3.0) (TERM, then KILL)
    Charon: host, dir, vici_socket (Path), uri ('unix://...'), log (Path), process;
          session(timeout=None) -> vici.Session      # a new connection each call
          load(swanctl_conf_text, reset=False)       # accumulates texts, swanctl --load-all
          initiate(child, ike=None, timeout=5.0)     # CharonError (with log tail) on failure
          terminate(ike, timeout=5.0); list_sas() -> [{ike_name: sa}] (str values); log_tail()
    psk_conf(local, remote, family=4, psk=..., name=None, mobike=True, remote_port=None,
             proposals="default", esp_proposals="default") -> str
    cert_conf(local, remote, cert, ca, family=4, remote_id=None, name=None, mobike=True,
              remote_port=None, proposals="default", esp_proposals="default") -> str
        # config for `local`; conn and child name default_name(a, b) ('c1-gw' on both
        # sides); identities ike_id(host) ('c1.lab.test'); TS = both inner /32 and /128
    make_ca(directory, kind="ecdsa"|"rsa", name=...) -> Pki(identity, cert_path, key_path, ...)
    make_cert(ca, identity, directory, kind="ecdsa") -> Pki   # SAN = identity (DNS/IP/email)
    ping(host, dst, src=None, count=3, interval=0.05, timeout=3.0) -> (sent, received)
    LabError, CharonError(LabError)
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHARON = "/usr/lib/ipsec/charon"
REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_PLUGINS = (
    "random nonce openssl pem pkcs1 pkcs8 x509 pubkey kdf hmac sha1 sha2 aes gcm curve25519 "
    "kernel-libipsec kernel-netlink socket-default vici"
).split()
# Where ESP runs: "libipsec" (user space, a TUN device; this machine's kernel has no ESP) or
# "kernel" (XFRM through kernel-netlink, as on the servers people deploy on; the VM lab).
IPSEC_BACKENDS = ("libipsec", "kernel")
SWANCTL_SUBDIRS = (
    "x509 x509ca x509ocsp x509aa x509ac x509crl pubkey private rsa ecdsa bliss pkcs8 pkcs12"
).split()
KEY_MARK = "# lab-key: "
OPTIONAL_PLUGINS = ("xauth-generic", "unity", "eap-identity", "eap-md5", "eap-mschapv2")


class LabError(RuntimeError):
    """A lab step failed; the message carries the relevant log tail."""


class CharonError(LabError):
    """A charon command (initiate, load, ...) failed or timed out."""


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *argv], check=check)


def _run(
    argv: Sequence[str],
    check: bool = True,
    timeout: float = 30,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env} if env else None
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        check=False,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


class Process:
    """A process started in a namespace; its stdout and stderr go to ``log``."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: Sequence[str], log: Path) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.argv = list(argv)
        self.log = log

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, substring: str, timeout: float = 5.0) -> None:
        """Wait until the log contains ``substring``; raise LabError if it exits or times out."""
        deadline = time.monotonic() + timeout
        while substring not in self.log_text():
            if not self.alive():
                raise LabError(f"{self.argv} exited ({self.popen.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise LabError(f"{self.argv}: no {substring!r} in {timeout}s:\n{self.log_tail()}")
            time.sleep(0.01)

    def signal(self, sig: int) -> None:
        """Signal the process group (the process was started as its own session leader)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 3.0) -> int | None:
        """TERM, then KILL after ``timeout``; returns the exit code."""
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout)
            # Children that outlived the leader; its id was reaped just now, not yet reused.
            self.signal(signal.SIGKILL)
        return self.popen.returncode


class Host:
    """One network namespace of the lab."""

    def __init__(self, lab: Lab, role: str, name: str, directory: Path) -> None:
        self.lab = lab
        self.role = role
        self.name = name
        self.dir = directory
        self.outer4: str | None = None
        self.outer6: str | None = None
        self.inner4: str | None = None
        self.inner6: str | None = None
        self.veth: str | None = None  # this host's end of its link to fw (None for fw)
        self.fw_veth: str | None = None  # fw's end of that link
        self.charon: Charon | None = None
        self.tcpencap: Process | None = None

    def __repr__(self) -> str:
        return f"Host({self.role}, {self.name})"

    def outer(self, family: int) -> str:
        addr = self.outer4 if family == 4 else self.outer6
        if addr is None:
            raise LabError(f"{self.role} has no outer IPv{family} address")
        return addr

    def inner(self, family: int) -> str:
        addr = self.inner4 if family == 4 else self.inner6
        if addr is None:
            raise LabError(f"{self.role} has no inner IPv{family} address")
        return addr

    def run(
        self, *argv: str, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside this namespace."""
        return _run(["ip", "netns", "exec", self.name, *argv], check, timeout, input)

    def spawn(
        self,
        argv: Sequence[str],
        log_name: str,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> Process:
        """Start a long-running process in this namespace, tracked and killed at teardown."""
        log = self.dir / log_name
        full_env = dict(os.environ)
        full_env.update(env or {})
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        proc = Process(popen, argv, log)
        self.lab.processes.append(proc)
        return proc

    def start_charon(self, plugins_extra: Iterable[str] = (), settings: str = "") -> Charon:
        """Start charon with the lab's IPsec backend, a private /run and its own VICI socket.

        ``settings`` is extra strongswan.conf text placed inside the ``charon { }`` section.
        """
        if self.charon is not None and self.charon.process.alive():
            raise LabError(f"charon already running in {self.role}")
        cdir = self.dir / "charon"
        run_dir = cdir / "run"
        swanctl_dir = cdir / "swanctl"
        run_dir.mkdir(parents=True, exist_ok=True)
        for sub in SWANCTL_SUBDIRS:
            (swanctl_dir / sub).mkdir(parents=True, exist_ok=True)
        sock = cdir / "charon.vici"
        log = cdir / "charon.log"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        skip = {"kernel-libipsec"} if self.lab.ipsec == "kernel" else set()
        plugins = " ".join(
            p for p in dict.fromkeys([*BASE_PLUGINS, *plugins_extra]) if p not in skip
        )
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
        script = f"mount --bind {run_dir} /run && exec {CHARON}"
        proc = self.spawn(
            ["sh", "-c", script], "charon.out", env={"STRONGSWAN_CONF": str(conf)}, cwd=cdir
        )
        charon = Charon(self, cdir, sock, log, proc, swanctl_dir)
        self.charon = charon
        charon.wait_ready()
        return charon

    def start_tcpencap(self, conf_text: str, log_level: str = "debug") -> Process:
        """Write ``conf_text`` to tcpencap.conf in the host dir and run the daemon in this
        namespace from this checkout; returns once it logs that it is running."""
        conf = self.dir / "tcpencap.conf"
        conf.write_text(conf_text)
        log = self.dir / "tcpencap.log"
        if log.exists():  # a restart: keep the old log, wait for the new process's line
            n = 1
            while (self.dir / f"tcpencap.log.{n}").exists():
                n += 1
            log.rename(self.dir / f"tcpencap.log.{n}")
        proc = self.spawn(
            [sys.executable, "-m", "tcpencap", "run", "--config", str(conf)]
            + ["--log-level", log_level],
            "tcpencap.log",
            cwd=REPO_ROOT,
        )
        proc.wait_for_log("tcpencap running", timeout=15.0)
        self.tcpencap = proc
        return proc

    def tcpencap_status(self) -> dict[str, Any]:
        """``tcpencap status --json`` of this host's daemon."""
        out = self.run(
            "env",
            f"PYTHONPATH={REPO_ROOT}",
            sys.executable,
            "-m",
            "tcpencap",
            "status",
            "--json",
            "--config",
            str(self.dir / "tcpencap.conf"),
        )
        return json.loads(out.stdout)


def tcpencap_conf(
    host: Host,
    *,
    listen: Iterable[str] = (),
    connections: dict[str, int] | None = None,
    extra: str = "",
    gateway_extra: str = "",
) -> str:
    """tcpencap.conf for ``host``: its charon's VICI socket, a control socket in the host dir,
    gateway listeners (``ADDR:PORT``, IPv6 in brackets) and client connections
    (swanctl name -> remote TCP port)."""
    assert host.charon is not None, "start charon first"
    conns = "".join(
        f"    {name} {{\n      remote_port = {port}\n    }}\n"
        for name, port in (connections or {}).items()
    )
    return f"""tcpencap {{
  vici_socket = {host.charon.uri}
  status_socket = {host.dir}/tcpencap.ctl
{extra}
  gateway {{
    listen = {", ".join(listen)}
{gateway_extra}
  }}
  connections {{
{conns}  }}
}}
"""


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
        import vici

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
        proc = _run(
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
        from vici.exception import CommandException

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
        from vici.exception import CommandException

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
            return [_decode(sa) for sa in sess.list_sas()]
        finally:
            sess.transport.socket.close()


def _decode(obj: Any) -> Any:
    """Turn the bytes vici returns into str, recursively."""
    if isinstance(obj, bytes):
        return obj.decode(errors="replace")
    if isinstance(obj, dict):
        return {_decode(k): _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


class Capture:
    """A running tcpdump writing a pcap file."""

    def __init__(self, process: Process, pcap: Path) -> None:
        self.process = process
        self.pcap = pcap
        self.packets: list[Any] | None = None

    def stop(self) -> list[Any]:
        """Stop tcpdump (flushing the file) and return the packets parsed by scapy."""
        if self.packets is None:
            import scapy.layers.inet6  # noqa: F401  (binds IPv6 to Ethernet for rdpcap)
            from scapy.utils import rdpcap

            if self.process.alive():
                time.sleep(0.05)  # let packets just sent reach tcpdump
                self.process.popen.send_signal(signal.SIGINT)
                try:
                    self.process.popen.wait(3)
                except subprocess.TimeoutExpired:
                    self.process.stop()
            self.packets = list(rdpcap(str(self.pcap))) if self.pcap.exists() else []
        return self.packets

    def count_udp_ike(self) -> int:
        """Packets with UDP source or destination port 500 or 4500 (IKE and ESP-in-UDP)."""
        from scapy.layers.inet import UDP

        return sum(
            1 for p in self.stop() if UDP in p and ({p[UDP].sport, p[UDP].dport} & {500, 4500})
        )

    def count_tcp(self, port: int) -> int:
        """TCP packets with source or destination ``port``."""
        from scapy.layers.inet import TCP

        return sum(1 for p in self.stop() if TCP in p and port in (p[TCP].sport, p[TCP].dport))


class Lab:
    """The namespaces, links, processes and rules of one lab; a context manager."""

    def __init__(
        self,
        clients: int = 2,
        workdir: Path | None = None,
        keep: bool = False,
        ipsec: str = "libipsec",
    ) -> None:
        if not 1 <= clients <= 50:
            raise ValueError("clients must be 1..50")
        if ipsec not in IPSEC_BACKENDS:
            raise ValueError(f"ipsec must be one of {IPSEC_BACKENDS}")
        self.ipsec = ipsec
        self.prefix = "te" + secrets.token_hex(3)
        self.keep = keep
        self._own_dir = workdir is None
        self.dir = workdir or Path(tempfile.gettempdir()) / f"tcpencap-lab-{self.prefix}"
        self.processes: list[Process] = []
        self.rules: list[tuple[str, list[str]]] = []  # (iptables binary, rule spec) in fw
        self.namespaces: list[str] = []
        self.fw = self._host("fw")
        self.gw = self._host("gw")
        self.clients = [self._host(f"c{i}") for i in range(1, clients + 1)]
        self.hosts = [self.fw, self.gw, *self.clients]
        self._started = False
        self._made_dir = False
        self._closed = False

    def _host(self, role: str) -> Host:
        return Host(self, role, f"{self.prefix}-{role}", self.dir / role)

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.close()
        except LabError as err:
            if exc_type is None:
                raise
            warnings.warn(str(err), stacklevel=2)  # do not hide the body's exception

    def start(self) -> None:
        """Create namespaces and links; on any failure tear down and re-raise."""
        if self._started:
            return
        self._started = True
        try:
            self.dir.mkdir(parents=True, exist_ok=not self._own_dir)
            self._made_dir = self._own_dir
            for h in self.hosts:
                h.dir.mkdir(exist_ok=True)
            self._build()
        except BaseException:
            with contextlib.suppress(LabError):
                self.close()
            raise

    def _build(self) -> None:
        sysctls = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        for h in self.hosts:
            _ip("netns", "add", h.name)
            self.namespaces.append(h.name)
            extra = ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
            h.run("sysctl", "-q", "-w", *sysctls, *(extra if h is self.fw else []))
            _ip("-n", h.name, "link", "set", "lo", "up")
        links: list[tuple[Host, str, str, str, str]] = [
            (self.gw, "198.19.0", "fd00:100:", "198.19.200.1", "fd00:200::1")
        ]
        for i, c in enumerate(self.clients, start=1):
            links.append(
                (c, f"198.18.{i}", f"fd00:{i}:", f"198.18.{200 + i}.1", f"fd00:{200 + i}::1")
            )
        fw = self.fw.name
        for h, net4, net6, in4, in6 in links:
            h.veth, h.fw_veth = f"{self.prefix}{h.role}", f"{self.prefix}f{h.role}"
            h.outer4, h.outer6 = f"{net4}.2", f"{net6}:2"
            h.inner4, h.inner6 = in4, in6
            _ip("link", "add", h.veth, "netns", h.name, "type", "veth",
                "peer", "name", h.fw_veth, "netns", fw)  # fmt: skip
            _ip("-n", h.name, "link", "set", h.veth, "up")
            _ip("-n", fw, "link", "set", h.fw_veth, "up")
            _ip("-n", h.name, "addr", "add", f"{h.outer4}/24", "dev", h.veth)
            _ip("-n", fw, "addr", "add", f"{net4}.1/24", "dev", h.fw_veth)
            _ip("-n", h.name, "-6", "addr", "add", f"{h.outer6}/64", "dev", h.veth, "nodad")
            _ip("-n", fw, "-6", "addr", "add", f"{net6}:1/64", "dev", h.fw_veth, "nodad")
            _ip("-n", h.name, "addr", "add", f"{in4}/32", "dev", "lo")
            _ip("-n", h.name, "-6", "addr", "add", f"{in6}/128", "dev", "lo", "nodad")
            _ip("-n", h.name, "route", "add", "default", "via", f"{net4}.1")
            _ip("-n", h.name, "-6", "route", "add", "default", "via", f"{net6}:1")

    def close(self) -> None:
        """Tear everything down: processes by PID, fw rules, namespaces, temp dir."""
        if self._closed:
            return
        self._closed = True
        errors = self._stop_processes() + self._remove_rules() + self._delete_namespaces()
        if not self.keep and self._made_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise LabError("teardown: " + "; ".join(errors))

    def _stop_processes(self) -> list[str]:
        errors = []
        for proc in reversed(self.processes):
            try:
                proc.stop()
            except Exception as exc:  # keep tearing down
                errors.append(f"stop {proc.pid}: {exc}")
        return errors

    def _remove_rules(self) -> list[str]:
        errors = []
        for tool, spec in reversed(self.rules):
            proc = _run(["ip", "netns", "exec", self.fw.name, tool, "-D", *spec], check=False)
            if proc.returncode != 0:
                errors.append(f"{tool} -D {spec}: {proc.stderr.strip()}")
        self.rules.clear()
        return errors

    def _delete_namespaces(self) -> list[str]:
        errors = []
        for ns in reversed(self.namespaces):
            proc = _ip("netns", "del", ns, check=False)
            if proc.returncode != 0:
                errors.append(f"netns del {ns}: {proc.stderr.strip()}")
        self.namespaces.clear()
        return errors

    def _udp_rules(self, host: Host) -> list[tuple[str, list[str]]]:
        if host.fw_veth is None:
            raise LabError(f"{host.role} has no link to fw")
        return [
            (tool, ["FORWARD", direction, host.fw_veth, "-p", "udp", "-j", "DROP"])
            for tool in ("iptables", "ip6tables")
            for direction in ("-i", "-o")
        ]

    def block_udp(self, host: Host) -> None:
        """Drop all UDP forwarded to or from ``host`` in fw (IPv4 and IPv6)."""
        for tool, spec in self._udp_rules(host):
            if (tool, spec) in self.rules:
                continue
            self.fw.run(tool, "-I", *spec)
            self.rules.append((tool, spec))

    def unblock_udp(self, host: Host) -> None:
        for tool, spec in self._udp_rules(host):
            if (tool, spec) in self.rules:
                self.fw.run(tool, "-D", *spec)
                self.rules.remove((tool, spec))

    def capture(self, host: Host, iface: str | None = None, timeout: float = 5.0) -> Capture:
        """Start tcpdump on ``host``'s veth (or ``iface``) and wait until it listens."""
        iface = iface or host.veth
        if iface is None:
            raise LabError(f"capture on {host.role}: name an interface")
        stamp = f"{time.monotonic_ns()}"
        pcap = host.dir / f"cap-{iface}-{stamp}.pcap"
        argv = [
            "tcpdump",
            "-Z",
            "root",
            "-U",
            "--immediate-mode",
            "-n",
            "-i",
            iface,
            "-w",
            str(pcap),
        ]
        proc = host.spawn(argv, f"tcpdump-{iface}-{stamp}.log")
        proc.wait_for_log("listening on", timeout)
        return Capture(proc, pcap)


def ping(
    host: Host,
    dst: str,
    src: str | None = None,
    count: int = 3,
    interval: float = 0.05,
    timeout: float = 3.0,
) -> tuple[int, int]:
    """Ping ``dst`` from ``host``; returns (sent, received), never raises on loss."""
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "1"]
    argv += ["-w", str(max(1, round(timeout)))]
    if src:
        argv += ["-I", src]
    proc = host.run(*argv, dst, check=False, timeout=timeout + 5)
    m = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", proc.stdout)
    if not m:
        raise LabError(f"ping {dst} from {host.role}: {proc.stdout}{proc.stderr}")
    return int(m.group(1)), int(m.group(2))


# --- swanctl.conf text -----------------------------------------------------------------


def _ts(host: Host) -> str:
    return f"{host.inner4}/32,{host.inner6}/128"


def _conn(
    name: str,
    local: Host,
    remote: Host,
    family: int,
    local_auth: str,
    remote_auth: str,
    mobike: bool,
    remote_port: int | None,
    proposals: str,
    esp_proposals: str,
) -> str:
    port = f"\n    remote_port = {remote_port}" if remote_port is not None else ""
    return f"""connections {{
  {name} {{
    version = 2
    local_addrs = {local.outer(family)}
    remote_addrs = {remote.outer(family)}{port}
    encap = yes
    mobike = {"yes" if mobike else "no"}
    proposals = {proposals}
    local {{
{local_auth}
    }}
    remote {{
{remote_auth}
    }}
    children {{
      {name} {{
        local_ts = {_ts(local)}
        remote_ts = {_ts(remote)}
        esp_proposals = {esp_proposals}
      }}
    }}
  }}
}}
"""


def default_name(local: Host, remote: Host) -> str:
    """Connection and child name used by both peers: roles sorted, e.g. ``c1-gw``."""
    return "-".join(sorted((local.role, remote.role)))


def ike_id(host: Host) -> str:
    """The FQDN identity of a host in the generated configs."""
    return f"{host.role}.lab.test"


def psk_conf(
    local: Host,
    remote: Host,
    family: int = 4,
    psk: str = "lab-shared-secret-0123456789",
    name: str | None = None,
    mobike: bool = True,
    remote_port: int | None = None,
    proposals: str = "default",
    esp_proposals: str = "default",
) -> str:
    """swanctl.conf for ``local``: IKEv2 PSK tunnel between the inner addresses of both peers,
    over their outer IPv4 or IPv6 addresses, with forced UDP encapsulation."""
    name = name or default_name(local, remote)
    lid, rid = ike_id(local), ike_id(remote)
    conn = _conn(
        name,
        local,
        remote,
        family,
        f"      auth = psk\n      id = {lid}",
        f"      auth = psk\n      id = {rid}",
        mobike,
        remote_port,
        proposals,
        esp_proposals,
    )
    return (
        conn
        + f"""secrets {{
  ike-{name} {{
    id-a = {lid}
    id-b = {rid}
    secret = "{psk}"
  }}
}}
"""
    )


# --- PKI ---------------------------------------------------------------------------------


@dataclass
class Pki:
    """A certificate and its private key, both as PEM files."""

    identity: str
    cert_path: Path
    key_path: Path
    cert: Any = field(repr=False)
    key: Any = field(repr=False)


def _new_key(kind: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key kind {kind!r}: use 'ecdsa' or 'rsa'")


def _write_pki(identity: str, directory: Path, stem: str, cert: Any, key: Any) -> Pki:
    from cryptography.hazmat.primitives import serialization

    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return Pki(identity, cert_path, key_path, cert, key)


def make_ca(directory: Path, kind: str = "ecdsa", name: str = "tcpencap lab CA") -> Pki:
    """A self-signed CA certificate valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _new_key(kind)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return _write_pki(name, directory, "ca", cert, key)


def make_cert(ca: Pki, identity: str, directory: Path, kind: str = "ecdsa") -> Pki:
    """An end-entity certificate signed by ``ca``; SAN = ``identity`` (IP, email or DNS)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    try:
        san: Any = x509.IPAddress(ipaddress.ip_address(identity))
    except ValueError:
        san = x509.RFC822Name(identity) if "@" in identity else x509.DNSName(identity)
    key = _new_key(kind)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
        .sign(ca.key, hashes.SHA256())
    )
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", identity)
    return _write_pki(identity, directory, stem, cert, key)


def cert_conf(
    local: Host,
    remote: Host,
    cert: Pki,
    ca: Pki,
    family: int = 4,
    remote_id: str | None = None,
    name: str | None = None,
    mobike: bool = True,
    remote_port: int | None = None,
    proposals: str = "default",
    esp_proposals: str = "default",
) -> str:
    """swanctl.conf for ``local``: like psk_conf, authenticated with ``cert`` (identity =
    its SAN); the peer must present a certificate from ``ca`` for ``remote_id`` (default
    ``ike_id(remote)``). Certificates are referenced by absolute path; swanctl only loads
    private keys from its private/ directory, so the key path goes into a ``# lab-key:``
    comment that Charon.load copies from."""
    name = name or default_name(local, remote)
    rid = remote_id or ike_id(remote)
    conn = _conn(
        name,
        local,
        remote,
        family,
        f"      auth = pubkey\n      id = {cert.identity}\n      certs = {cert.cert_path}",
        f"      auth = pubkey\n      id = {rid}\n      cacerts = {ca.cert_path}",
        mobike,
        remote_port,
        proposals,
        esp_proposals,
    )
    return f"{KEY_MARK}{cert.key_path}\n" + conn
