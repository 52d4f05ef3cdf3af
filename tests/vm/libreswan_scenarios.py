"""tcpencap against an independent RFC 9329 peer: libreswan's pluto with the kernel's
espintcp, run inside the trixie guest booted on the espintcp kernel (tests/vm/
test_vm_libreswan.py boots it). pluto runs chrooted into libreswan's own root file system
(``LSW``) in a lab namespace; charon (kernel-netlink) and tcpencap in the other, as in every
lab. The firewall namespace between them drops UDP, so nothing but TCP can carry the tunnel.

Not collected on the host (the name has no test_ prefix).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from kernel_scenarios import WAIT, wait_for, xfrm_states

from tests.labkit import Capture, Host, Lab, ping, psk_conf
from tests.labkit.configs import ike_id
from tests.labkit.e2e import listen_addr

LSW = Path("/srv/libreswan")
NAME = "c1-gw"
PSK = "lab-shared-secret-0123456789"


class Pluto:
    """libreswan's IKE daemon in ``host``'s namespace, chrooted into ``LSW`` in a mount
    namespace of its own (its /run, /proc and /dev), with ``conf`` as /etc/ipsec.conf."""

    def __init__(self, host: Host, conf: str, secrets: str) -> None:
        self.host = host
        (LSW / "etc/ipsec.conf").write_text(conf)
        (LSW / "etc/ipsec.secrets").write_text(secrets)
        os.chmod(LSW / "etc/ipsec.secrets", 0o600)
        self.log = host.dir / "pluto.log"
        setup = (
            f"mount -t proc proc {LSW}/proc && mount --rbind /dev {LSW}/dev"
            f" && mount --rbind /sys {LSW}/sys && mount -t tmpfs tmpfs {LSW}/run"
            f" && mkdir -p {LSW}/run/pluto"
            f" && exec chroot {LSW} /usr/libexec/ipsec/pluto --config /etc/ipsec.conf"
            " --nofork --stderrlog"
        )
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", host.name, "unshare", "--mount", "--propagation",
                 "private", "sh", "-c", setup],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for("pluto's control socket", lambda: self.ctl_ready(), detail=self.tail)

    def ctl_ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"pluto exited {self.proc.returncode}:\n{self.tail()}")
        return self.ipsec("status", check=False).returncode == 0

    def ipsec(
        self, *args: str, check: bool = True, timeout: float = WAIT
    ) -> subprocess.CompletedProcess[str]:
        """``ipsec ARGS`` in pluto's namespaces and root (its control socket is there)."""
        res = subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "-n", "-r", "-w", "/usr/sbin/ipsec", *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and res.returncode != 0:
            raise AssertionError(f"ipsec {' '.join(args)} -> {res.returncode}\n{res.stdout}"
                                 f"{res.stderr}\n--- pluto log:\n{self.tail()}")  # fmt: skip
        return res

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def ipsec_conf(local: Host, remote: Host, family: int, extra: str = "", setup: str = "") -> str:
    """ipsec.conf for libreswan on ``local``: IKEv2 with a PSK, a tunnel between the inner
    addresses of ``family`` over the outer ones; ``extra`` adds lines to the conn."""
    bits = 32 if family == 4 else 128
    return f"""config setup
    plutodebug=none
{setup}
conn {NAME}
    keyexchange=ikev2
    authby=secret
    left={local.outer(family)}
    leftid=@{ike_id(local)}
    leftsubnet={local.inner(family)}/{bits}
    right={remote.outer(family)}
    rightid=@{ike_id(remote)}
    rightsubnet={remote.inner(family)}/{bits}
{extra}
    auto=add
"""


def only_family(conf: str, host: Host, peer: Host, family: int) -> str:
    """A lab swanctl.conf whose traffic selectors name ``family``'s inner addresses only (a
    libreswan conn has one subnet per side)."""
    for h in (host, peer):
        both = f"{h.inner4}/32,{h.inner6}/128"
        conf = conf.replace(both, f"{h.inner4}/32" if family == 4 else f"{h.inner6}/128")
    return conf


def secrets(c1: Host, gw: Host) -> str:
    return f'@{ike_id(c1)} @{ike_id(gw)} : PSK "{PSK}"\n'


def gateway_conf(gw: Host, listen: str) -> str:
    return (
        f"tcpencap {{\n  vici_socket = {gw.charon.uri}\n"
        f"  status_socket = {gw.dir}/tcpencap.ctl\n"
        f"  gateway {{\n    listen = {listen}\n  }}\n}}\n"
    )


def pings_both_ways(c1: Host, gw: Host, family: int = 4) -> bool:
    there = ping(c1, gw.inner(family), c1.inner(family), timeout=5)
    return there == (3, 3) and ping(gw, c1.inner(family), gw.inner(family), timeout=5) == (3, 3)


@pytest.fixture
def lab():
    with Lab(clients=1, ipsec="kernel") as lab:
        yield lab


def test_espintcp_kernel() -> None:
    ulps = Path("/proc/sys/net/ipv4/tcp_available_ulp").read_text().split()
    print(f"kernel {os.uname().release}; tcp_available_ulp: {ulps}")
    assert "espintcp" in ulps or subprocess.run(["modprobe", "esp4"]).returncode == 0
    ulps = Path("/proc/sys/net/ipv4/tcp_available_ulp").read_text().split()
    assert "espintcp" in ulps, ulps
    version = subprocess.run(["chroot", str(LSW), "ipsec", "--version"], capture_output=True,
                             text=True).stdout.strip()  # fmt: skip
    print(f"libreswan: {version}")


@pytest.mark.parametrize("family, port", [(4, 4500), (6, 4500), (4, 443)],
                         ids=["4-4500", "6-4500", "4-443"])  # fmt: skip
def test_libreswan_client_to_tcpencap_gateway(lab: Lab, family: int, port: int) -> None:
    """libreswan (`enable-tcp=yes`, `tcp-remoteport`) to strongSwan with tcpencap."""
    c1, gw = lab.clients[0], lab.gw
    lab.block_udp(c1)
    gw.start_charon()
    gw.charon.load(only_family(psk_conf(gw, c1, family=family), gw, c1, family))
    gw.start_tcpencap(gateway_conf(gw, listen_addr(gw, family, port)), log_level="info")
    extra = f"    enable-tcp=yes\n    tcp-remoteport={port}"
    pluto = Pluto(c1, ipsec_conf(c1, gw, family, extra), secrets(c1, gw))
    try:
        cap = lab.capture(c1)
        pluto.ipsec("add", NAME)
        t0 = time.monotonic()
        up = pluto.ipsec("up", NAME, check=False, timeout=120)
        print(f"ipsec up: exit {up.returncode} in {time.monotonic() - t0:.1f} s\n"
              + "\n".join(up.stdout.splitlines()[-6:]))  # fmt: skip
        wait_for("pings both ways", lambda: pings_both_ways(c1, gw, family), detail=pluto.tail)
        cap.stop()
        show_and_check(pluto, c1, gw, cap, port)
    finally:
        pluto.stop()


def test_tcpencap_client_to_libreswan_gateway(lab: Lab) -> None:
    """strongSwan with tcpencap (RFC 9329 on 4500) to a libreswan gateway (`listen-tcp=yes`)."""
    c1, gw = lab.clients[0], lab.gw
    lab.block_udp(c1)
    pluto = Pluto(gw, ipsec_conf(gw, c1, 4, setup="    listen-tcp=yes"), secrets(gw, c1))
    try:
        pluto.ipsec("add", NAME)
        c1.start_charon()
        c1.charon.load(only_family(psk_conf(c1, gw), c1, gw, 4))
        c1.start_tcpencap(client_conf(c1), log_level="info")
        cap = lab.capture(c1)
        t0 = time.monotonic()
        c1.charon.initiate(NAME, timeout=WAIT)
        print(f"swanctl --initiate over TCP: {time.monotonic() - t0:.1f} s")
        wait_for("pings both ways", lambda: pings_both_ways(c1, gw), detail=pluto.tail)
        cap.stop()
        show_and_check(pluto, gw, c1, cap, 4500)
    finally:
        pluto.stop()


def client_conf(c1: Host) -> str:
    return (
        f"tcpencap {{\n  vici_socket = {c1.charon.uri}\n"
        f"  status_socket = {c1.dir}/tcpencap.ctl\n"
        f"  connections {{\n    {NAME} {{\n      remote_port = 4500\n    }}\n  }}\n}}\n"
    )


def show_and_check(pluto: Pluto, lsw: Host, swan: Host, cap: Capture, port: int) -> None:
    """Both sides' SA state, printed; libreswan's SAs are espintcp and counted traffic, and
    the capture on the client's link has TCP on ``port`` and no UDP 500/4500."""
    traffic = pluto.ipsec("trafficstatus").stdout
    print(f"libreswan ipsec trafficstatus:\n{traffic.strip()}")
    sas = swan.charon.list_sas()
    print(f"strongSwan list-sas: {sas}")
    lsw_states, swan_states = xfrm_states(lsw), xfrm_states(swan)
    print(f"libreswan ip xfrm state: {lsw_states}\nstrongSwan ip xfrm state: {swan_states}")
    assert lsw_states and all(s["encap"].startswith("espintcp ") for s in lsw_states)
    assert swan_states and all(s["encap"].startswith("espinudp ") for s in swan_states)
    assert re.search(r"inBytes=[1-9]", traffic) and re.search(r"outBytes=[1-9]", traffic)
    assert cap.count_udp_ike() == 0, "UDP 500/4500 on c1's link"
    assert cap.count_tcp(port) > 0
    print(f"capture on c1's link: {cap.count_tcp(port)} TCP segments on {port}, 0 UDP 500/4500")


def test_libreswan_fallback_ends_on_tcp(lab: Lab) -> None:
    """libreswan with `enable-tcp=fallback` while fw drops UDP: its UDP attempt goes
    unanswered (seen leaving c1, never reaching the gateway), then it comes over TCP."""
    c1, gw = lab.clients[0], lab.gw
    lab.block_udp(c1)
    gw.start_charon()
    gw.charon.load(only_family(psk_conf(gw, c1), gw, c1, 4))
    gw.start_tcpencap(gateway_conf(gw, f"{gw.outer4}:4500"), log_level="info")
    # libreswan gives up on a UDP attempt after retransmit-timeout (60 s by default)
    extra = "    enable-tcp=fallback\n    tcp-remoteport=4500\n    retransmit-timeout=10s"
    pluto = Pluto(c1, ipsec_conf(c1, gw, 4, extra), secrets(c1, gw))
    try:
        cap_c1, cap_gw = lab.capture(c1), lab.capture(gw)
        pluto.ipsec("add", NAME)
        t0 = time.monotonic()
        pluto.ipsec("up", NAME, "--asynchronous")
        wait_for("pings both ways", lambda: pings_both_ways(c1, gw), timeout=120,
                 detail=pluto.tail)  # fmt: skip
        print(f"enable-tcp=fallback: pings both ways {time.monotonic() - t0:.1f} s after up")
        tried_udp = cap_c1.count_udp_ike()
        print(f"UDP 500/4500 leaving c1 (dropped in fw): {tried_udp}; "
              f"reaching the gateway: {cap_gw.count_udp_ike()}")  # fmt: skip
        assert tried_udp > 0, "libreswan never tried UDP"
        assert cap_gw.count_udp_ike() == 0
        states = xfrm_states(c1)
        assert states and all(s["encap"].startswith("espintcp ") for s in states), states
        print(f"libreswan ip xfrm state: {states}")
        print(pluto.ipsec("trafficstatus").stdout.strip())
    finally:
        pluto.stop()
