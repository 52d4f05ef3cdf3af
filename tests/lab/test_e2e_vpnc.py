"""End to end: the Cisco VPN Client dialect (IKEv1 Aggressive Mode, XAuth, mode-config)
over Cisco cTCP, with UDP blocked for the client.

Two clients talk to the same strongSwan gateway set-up (tcpencap ``ctcp_listen`` on 10000,
a pool in 198.18.250.0/24):
- strongSwan itself, ``version = 1, aggressive = yes`` with a second XAuth round;
- vpnc, a real Cisco-dialect client, behind a tcpencap daemon that has no VICI at all
  (its ``vici_socket`` does not exist): tcpencap steers vpnc's UDP 500/4500 into cTCP.
Proofs: login and address assignment, pings between the virtual address and the gateway's
inner address, no UDP on the client's link, and tshark reading every segment as tcpencap.
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.labkit import Host, Lab, Process, unanswered

pytestmark = pytest.mark.lab
PORT = 10000
POOL = "198.18.250.0/24"
GROUP, GROUP_PSK = "labgroup", "lab-group-secret-0123456789"
USER, PASSWORD = "labuser", "lab-xauth-password"
# IKEv1 suites both vpnc (DH group 2 default) and charon's openssl plugin offer
IKE_PROPOSALS = "aes256-sha1-modp1024,aes128-sha1-modp1024,3des-sha1-modp1024"
ESP_PROPOSALS = "aes256-sha1,aes128-sha1,3des-sha1"
PLUGINS = ("xauth-generic", "unity")
# a strongSwan responder refuses Aggressive Mode PSK unless told otherwise (the Cisco
# group-PSK dialect has no other way to authenticate the gateway without certificates)
AGGRESSIVE_PSK = "  i_dont_care_about_security_and_use_aggressive_mode_psk = yes\n"


# The group PSK and the XAuth user, the same on both sides.
SECRETS = f"""secrets {{
  ike-group {{
    secret = "{GROUP_PSK}"
  }}
  xauth-user {{
    id = {USER}
    secret = "{PASSWORD}"
  }}
}}
"""


def gateway_swanctl(gw: Host) -> str:
    """A Cisco Easy VPN style responder: group PSK, XAuth, a mode-config pool."""
    return f"""connections {{
  cisco {{
    version = 1
    aggressive = yes
    local_addrs = {gw.outer4}
    encap = yes
    proposals = {IKE_PROPOSALS}
    pools = vpnpool
    local {{
      auth = psk
      id = {gw.outer4}
    }}
    remote {{
      auth = psk
    }}
    remote-xauth {{
      auth = xauth
    }}
    children {{
      cisco {{
        local_ts = 0.0.0.0/0
        esp_proposals = {ESP_PROPOSALS}
      }}
    }}
  }}
}}
pools {{
  vpnpool {{
    addrs = {POOL}
  }}
}}
{SECRETS}"""


def client_swanctl(gw: Host) -> str:
    """strongSwan as a Cisco VPN Client: Aggressive Mode, group PSK, then XAuth."""
    return f"""connections {{
  cisco {{
    version = 1
    aggressive = yes
    remote_addrs = {gw.outer4}
    encap = yes
    vips = 0.0.0.0
    proposals = {IKE_PROPOSALS}
    local {{
      auth = psk
      id = keyid:{GROUP}
    }}
    local-xauth {{
      auth = xauth
      xauth_id = {USER}
    }}
    remote {{
      auth = psk
      id = {gw.outer4}
    }}
    children {{
      cisco {{
        remote_ts = {gw.inner4}/32
        esp_proposals = {ESP_PROPOSALS}
      }}
    }}
  }}
}}
{SECRETS}"""


def start_gateway(lab: Lab) -> Host:
    gw = lab.gw
    gw.start_charon(plugins_extra=PLUGINS, settings=AGGRESSIVE_PSK)
    gw.charon.load(gateway_swanctl(gw))  # type: ignore[union-attr]
    gw.start_tcpencap(
        f"tcpencap {{\n  vici_socket = {gw.charon.uri}\n"  # type: ignore[union-attr]
        f"  status_socket = {gw.dir}/tcpencap.ctl\n"
        f"  gateway {{\n    ctcp_listen = {gw.outer4}:{PORT}\n  }}\n}}\n"
    )
    return gw


def in_pool(addr: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(addr) in ipaddress.ip_network(POOL)


def check_capture(packets: list, pcap: str, min_esp: int) -> None:
    """No UDP at all on the client's link; every cTCP segment carries the A.4 trailer as
    tshark reads it, IKE on 500 decodes as ISAKMP, and at least ``min_esp`` segments
    carry ESP-in-UDP."""
    from scapy.layers.inet import TCP, UDP

    assert sum(1 for p in packets if UDP in p) == 0, "UDP crossed the client's link"
    from tests.lab.test_e2e_ctcp import check_segments

    check_segments(pcap, min_ike500=2)
    esp = 0
    for p in packets:
        if TCP in p and PORT in (p[TCP].sport, p[TCP].dport):
            inner = bytes(p[TCP].payload)[:-16]
            # inner UDP 4500 -> 4500 without the non-ESP marker: ESP-in-UDP
            if inner[:4] == b"\x11\x94\x11\x94" and inner[8:12] != bytes(4):
                esp += 1
    assert esp >= min_esp, esp


# --- strongSwan as the Cisco-dialect client -----------------------------------------------


def test_strongswan_aggressive_xauth_modecfg_over_ctcp() -> None:
    with Lab(clients=1) as lab:
        c1 = lab.clients[0]
        lab.block_udp(c1)
        gw = start_gateway(lab)
        c1.start_charon(plugins_extra=PLUGINS)
        c1.charon.load(client_swanctl(gw))  # type: ignore[union-attr]
        c1.start_tcpencap(
            f"tcpencap {{\n  vici_socket = {c1.charon.uri}\n"  # type: ignore[union-attr]
            f"  status_socket = {c1.dir}/tcpencap.ctl\n"
            "  connections {\n    cisco {\n      encapsulation = ctcp\n    }\n  }\n}\n"
        )
        cap = lab.capture(c1)
        c1.charon.initiate("cisco", timeout=10)  # type: ignore[union-attr]
        (entry,) = c1.charon.list_sas()  # type: ignore[union-attr]
        sa = entry["cisco"]
        assert sa["version"] == "1" and sa["state"] == "ESTABLISHED", sa
        (vip,) = sa["local-vips"]
        assert in_pool(vip), sa
        lost = unanswered(c1, gw.inner4, vip, count=3)  # type: ignore[arg-type]
        assert not lost, f"ping vip -> gw inner: no reply to {lost}"
        lost = unanswered(gw, vip, gw.inner4, count=3)
        assert not lost, f"ping gw inner -> vip: no reply to {lost}"
        packets = cap.stop()
        log = c1.charon.log.read_text(errors="replace")  # type: ignore[union-attr]
        assert "AGGRESSIVE" in log and "TRANSACTION" in log, "no Aggressive Mode / XAuth"
        gwlog = gw.charon.log.read_text(errors="replace")  # type: ignore[union-attr]
        assert f"XAuth authentication of '{USER}' successful" in gwlog
        check_capture(packets, str(cap.pcap), min_esp=12)


# --- vpnc behind a VICI-less tcpencap client ----------------------------------------------

VPNC_SCRIPT = """#!/bin/sh
# Written by the test: only the tun address and one route to the gateway's inner address.
env | sort > "{dir}/vpnc-env.$reason"
case "$reason" in
  connect)
    ip link set dev "$TUNDEV" up mtu 1300
    ip addr add "$INTERNAL_IP4_ADDRESS/32" dev "$TUNDEV"
    ip route replace {target}/32 dev "$TUNDEV" src "$INTERNAL_IP4_ADDRESS"
    ;;
esac
exit 0
"""


def start_vpnc(c: Host, gw: Host) -> Process:
    vpnc = shutil.which("vpnc")
    assert vpnc, "vpnc is required (apt-get install vpnc)"
    script = c.dir / "vpnc-script"
    script.write_text(VPNC_SCRIPT.format(dir=c.dir, target=gw.inner4))
    script.chmod(0o755)
    conf = c.dir / "vpnc.conf"
    conf.write_text(
        f"IPSec gateway {gw.outer4}\nIPSec ID {GROUP}\nIPSec secret {GROUP_PSK}\n"
        f"Xauth username {USER}\nXauth password {PASSWORD}\n"
        "IKE DH Group dh2\nPerfect Forward Secrecy nopfs\n"
        "NAT Traversal Mode force-natt\nInterface name vpnc0\nNo Detach\nNoninteractive\n"
        f"Pidfile {c.dir}/vpnc.pid\nScript {script}\nDebug 1\n"
    )
    conf.chmod(0o600)
    return c.spawn([vpnc, "--non-inter", str(conf)], "vpnc.log")


def wait_tun_addr(c: Host, proc: Process, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = c.run("ip", "-4", "-o", "addr", "show", "dev", "vpnc0", check=False).stdout
        for word in out.split():
            if "/" in word and in_pool(word.split("/")[0]):
                return word.split("/")[0]
        assert proc.alive(), f"vpnc exited:\n{proc.log_tail(60)}"
        time.sleep(0.1)
    raise AssertionError(f"vpnc0 got no pool address:\n{proc.log_tail(60)}")


def test_vpnc_behind_viciless_tcpencap_over_ctcp() -> None:
    with Lab(clients=1) as lab:
        c1 = lab.clients[0]
        lab.block_udp(c1)
        gw = start_gateway(lab)
        # no charon on c1: the VICI socket does not exist, the daemon must run anyway
        c1.start_tcpencap(
            f"tcpencap {{\n  vici_socket = unix://{c1.dir}/no-such-charon.vici\n"
            f"  status_socket = {c1.dir}/tcpencap.ctl\n"
            f"  connections {{\n    vpnc {{\n      encapsulation = ctcp\n"
            f"      remote_addrs = {gw.outer4}\n      remote_port = {PORT}\n    }}\n  }}\n}}\n"
        )
        st = c1.tcpencap_status()
        assert st["ctcp"] is not None and st["vici"] != "connected", st
        cap = lab.capture(c1)
        proc = start_vpnc(c1, gw)
        addr = wait_tun_addr(c1, proc)
        env = (c1.dir / "vpnc-env.connect").read_text()  # what vpnc handed its script
        assert f"INTERNAL_IP4_ADDRESS={addr}\n" in env and "TUNDEV=vpnc0\n" in env, env
        lost = unanswered(c1, gw.inner4, addr, count=3)  # type: ignore[arg-type]
        assert not lost, f"ping tun -> gw inner: no reply to {lost}\n{proc.log_tail(40)}"
        lost = unanswered(gw, addr, gw.inner4, count=3)
        assert not lost, f"ping gw inner -> tun: no reply to {lost}"
        packets = cap.stop()
        gwlog = gw.charon.log.read_text(errors="replace")  # type: ignore[union-attr]
        assert f"XAuth authentication of '{USER}' successful" in gwlog
        sas = gw.charon.list_sas()  # type: ignore[union-attr]
        assert any(addr in sa["cisco"].get("remote-vips", []) for sa in sas), sas
        (row,) = [r for r in c1.tcpencap_status()["connections"] if r["encapsulation"] == "ctcp"]
        assert row["state"] == "established" and row["frames_in"] > 0, row
        check_capture(packets, str(cap.pcap), min_esp=12)
        proc.stop()
