"""The lab's topology: clients and a gateway, each in its own network namespace, joined by
veth links to a firewall namespace that forwards between them (see the package docstring for
the addresses). ``Lab`` builds and tears it down; ``Host`` is one namespace."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import netns
from .capture import Capture, start_capture
from .charon import IPSEC_BACKENDS, Charon, spawn_charon
from .process import LabError, Process, run

REPO_ROOT = Path(__file__).resolve().parents[2]


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
        return run(netns.exec_argv(self.name, argv), check, timeout, input)

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
                netns.exec_argv(self.name, argv),
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
        """Start charon with the lab's IPsec backend, a private /run and its own VICI socket;
        returns once VICI answers.

        ``settings`` is extra strongswan.conf text placed inside the ``charon { }`` section.
        """
        if self.charon is not None and self.charon.process.alive():
            raise LabError(f"charon already running in {self.role}")
        self.charon = spawn_charon(self, self.lab.ipsec, plugins_extra, settings)
        self.charon.wait_ready()
        return self.charon

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
        # A deadline, not a wait: the line comes in about 1 s on the host, but the VM guest (TCG,
        # ~19x slower Python) under a loaded host took over 15 s (CI, 7 of 21 guest tests).
        proc.wait_for_log("tcpencap running", timeout=60.0)
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


def failed_logs_dir(root: Path, test: str) -> Path:
    """Where a failed lab of test ``test`` (e.g. ``test_x[ctcp]``) keeps its logs."""
    return root / re.sub(r"[^A-Za-z0-9_.=-]+", "_", test)


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
        if exc_type is not None:
            self._keep_failed_logs()
        try:
            self.close()
        except LabError as err:
            if exc_type is None:
                raise
            warnings.warn(str(err), stacklevel=2)  # do not hide the body's exception

    def _keep_failed_logs(self) -> None:
        """A failed lab's logs (charon, tcpencap, ...) copied under $TCPENCAP_LAB_FAILED_LOGS,
        named after the test, for runs whose lab directory is gone when anyone looks (the
        guest's, CI's)."""
        keep = os.environ.get("TCPENCAP_LAB_FAILED_LOGS")
        if not keep or not self.dir.is_dir():
            return
        test = os.environ.get("PYTEST_CURRENT_TEST", self.prefix).split(" ")[0]
        dest = failed_logs_dir(Path(keep), test.split("::")[-1])
        with contextlib.suppress(OSError):
            shutil.copytree(
                self.dir, dest, dirs_exist_ok=True, symlinks=True,
                ignore=shutil.ignore_patterns("*.vici", "*.ctl", "*.sock", "run"),
            )  # fmt: skip

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
        with contextlib.ExitStack() as sockets:
            nl: dict[str, netns.Netlink] = {}  # one rtnetlink socket per namespace
            for h in self.hosts:
                netns.create(h.name)
                self.namespaces.append(h.name)
                extra = ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
                h.run("sysctl", "-q", "-w", *sysctls, *(extra if h is self.fw else []))
                nl[h.name] = sockets.enter_context(netns.Netlink(h.name))
                nl[h.name].up("lo")
            links: list[tuple[Host, str, str, str, str]] = [
                (self.gw, "198.19.0", "fd00:100:", "198.19.200.1", "fd00:200::1")
            ]
            for i, c in enumerate(self.clients, start=1):
                links.append(
                    (c, f"198.18.{i}", f"fd00:{i}:", f"198.18.{200 + i}.1", f"fd00:{200 + i}::1")
                )
            fw = nl[self.fw.name]
            for h, net4, net6, in4, in6 in links:
                h.veth, h.fw_veth = f"{self.prefix}{h.role}", f"{self.prefix}f{h.role}"
                h.outer4, h.outer6 = f"{net4}.2", f"{net6}:2"
                h.inner4, h.inner6 = in4, in6
                here = nl[h.name]
                here.add_veth(h.veth, h.fw_veth, self.fw.name)
                # up before the IPv6 addresses, or the first IPv6 packet waits about 1 s
                here.up(h.veth)
                fw.up(h.fw_veth)
                here.add_address(h.veth, f"{h.outer4}/24")
                fw.add_address(h.fw_veth, f"{net4}.1/24")
                here.add_address(h.veth, f"{h.outer6}/64")
                fw.add_address(h.fw_veth, f"{net6}:1/64")
                here.add_address("lo", f"{in4}/32")
                here.add_address("lo", f"{in6}/128")
                here.add_default_route(f"{net4}.1")
                here.add_default_route(f"{net6}:1")

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
            proc = self.fw.run(tool, "-D", *spec, check=False)
            if proc.returncode != 0:
                errors.append(f"{tool} -D {spec}: {proc.stderr.strip()}")
        self.rules.clear()
        return errors

    def _delete_namespaces(self) -> list[str]:
        errors = []
        for ns in reversed(self.namespaces):
            try:
                netns.remove(ns)
            except LabError as exc:
                errors.append(str(exc))
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
        return start_capture(host, iface, timeout)


def ping(
    host: Host,
    dst: str,
    src: str | None = None,
    count: int = 3,
    interval: float = 0.05,
    timeout: float = 3.0,
) -> tuple[int, int]:
    """Ping ``dst`` from ``host``; returns (sent, received) of the first ``count`` echo
    requests, never raises on loss. Only those count: ``ping -c N -w T`` sends until N replies
    are in, so on a slow host a late reply makes it send one more, reported as (N+1, N) or
    (N+1, N+1) (see ``unanswered``; seen on Debian 12 and 13 alike)."""
    out = _run_ping(host, dst, src, count, interval, timeout, quiet=False)
    m = re.search(r"(\d+) packets transmitted", out)
    if not m:
        raise LabError(f"ping {dst} from {host.role}: {out}")
    sent = min(int(m.group(1)), count)
    return sent, sent - len(unanswered_in(out, sent))


def unanswered(
    host: Host,
    dst: str,
    src: str | None = None,
    count: int = 3,
    interval: float = 0.05,
    timeout: float = 3.0,
) -> list[int]:
    """The sequence numbers among the first ``count`` echo requests that got no reply.

    ``ping -c N -w T`` sends until N replies are in, so a reply that takes longer than
    ``interval`` makes it send one more and exit before that one's reply: (N+1, N), as a
    loss does. Which requests were answered tells the two apart (CI saw the late kind)."""
    out = _run_ping(host, dst, src, count, interval, timeout, quiet=False)
    if not re.search(r"\d+ packets transmitted", out):
        raise LabError(f"ping {dst} from {host.role}: {out}")
    return unanswered_in(out, count)


def unanswered_in(output: str, count: int) -> list[int]:
    """Of requests 1..``count``, those without an echo reply in ping's ``output``. An ICMP
    error ("From X icmp_seq=2 Destination Host Unreachable") names a request too, and
    answers nothing."""
    replies = re.findall(r"^\d+ bytes from .*?icmp_seq=(\d+) ", output, re.M)
    answered = {int(n) for n in replies}
    return [n for n in range(1, count + 1) if n not in answered]


def _run_ping(
    host: Host,
    dst: str,
    src: str | None,
    count: int,
    interval: float,
    timeout: float,
    quiet: bool,
) -> str:
    argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1"]
    argv += ["-q"] if quiet else []
    argv += ["-w", str(max(1, round(timeout)))]
    if src:
        argv += ["-I", src]
    proc = host.run(*argv, dst, check=False, timeout=timeout + 5)
    return proc.stdout + proc.stderr
