"""The lab harness itself: topology, plain-UDP strongSwan tunnels, UDP blocking, teardown.

Needs root, iproute2, iptables, tcpdump and strongSwan; fails (never skips) without them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.labkit import (
    CharonError,
    Host,
    Lab,
    cert_conf,
    default_name,
    ike_id,
    make_ca,
    make_cert,
    ping,
    psk_conf,
    unanswered,
)

pytestmark = pytest.mark.lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(clients=2) as lab:
        yield lab


def _fw_rules(lab: Lab) -> str:
    return "".join(lab.fw.run(t, "-S", "FORWARD").stdout for t in ("iptables", "ip6tables"))


def _assert_tunnel(a: Host, b: Host) -> None:
    """Inner addresses ping each other, both directions, both families."""
    for family in (4, 6):
        assert not unanswered(a, b.inner(family), a.inner(family), count=3)
        assert not unanswered(b, a.inner(family), b.inner(family), count=3)


def _child_states(host: Host, name: str) -> list[str]:
    states = []
    for entry in host.charon.list_sas():
        for ike_name, sa in entry.items():
            if ike_name == name:
                states += [c["state"] for c in sa.get("child-sas", {}).values()]
    return states


def test_topology(lab: Lab) -> None:
    assert len(lab.clients) == 2
    names = {h.name for h in lab.hosts}
    assert len(names) == 4
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert all(n in listed for n in names)
    assert all(len(h.veth) <= 15 and len(h.fw_veth) <= 15 for h in [lab.gw, *lab.clients])
    assert lab.clients[0].inner4 == "198.18.201.1" and lab.gw.inner6 == "fd00:200::1"
    for c in lab.clients:
        assert not unanswered(c, lab.gw.outer4, count=2)
        assert not unanswered(c, lab.gw.outer6, count=2)
        assert not unanswered(lab.gw, c.outer6, count=2)
    # Inner addresses are not routed outside a tunnel: without one they are unreachable.
    c1 = lab.clients[0]
    assert ping(c1, lab.gw.inner4, c1.inner4, count=1, timeout=1)[1] == 0


@pytest.mark.parametrize("family", [4, 6])
def test_psk_tunnel_over_udp(lab: Lab, family: int) -> None:
    c1, gw = lab.clients[0], lab.gw
    c1.start_charon()
    gw.start_charon()
    c1.charon.load(psk_conf(c1, gw, family=family))
    gw.charon.load(psk_conf(gw, c1, family=family))
    cap = lab.capture(c1)
    name = default_name(c1, gw)
    c1.charon.initiate(name, name, timeout=5)
    assert _child_states(c1, name) == ["INSTALLED"]
    _assert_tunnel(c1, gw)
    [sa] = [e[name] for e in gw.charon.list_sas()]
    assert sa["remote-host"] == c1.outer(family) and sa["remote-id"] == ike_id(c1)
    # Everything went over UDP (IKE and ESP-in-UDP on 500/4500), nothing over TCP 4500.
    assert cap.count_udp_ike() >= 4 + 12
    assert cap.count_tcp(4500) == 0


@pytest.mark.parametrize(("family", "kind"), [(4, "ecdsa"), (6, "rsa")])
def test_cert_tunnel_over_udp(lab: Lab, family: int, kind: str, tmp_path: Path) -> None:
    c1, gw = lab.clients[0], lab.gw
    ca = make_ca(tmp_path / "ca", kind)
    c1_cert = make_cert(ca, ike_id(c1), tmp_path / "c1", kind)
    gw_cert = make_cert(ca, ike_id(gw), tmp_path / "gw", kind)
    c1.start_charon()
    gw.start_charon()
    c1.charon.load(cert_conf(c1, gw, c1_cert, ca, family=family))
    gw.charon.load(cert_conf(gw, c1, gw_cert, ca, family=family))
    name = default_name(c1, gw)
    c1.charon.initiate(name, name, timeout=5)
    _assert_tunnel(c1, gw)
    [sa] = [e[name] for e in c1.charon.list_sas()]
    assert sa["remote-id"] == ike_id(gw) and sa["local-host"] == c1.outer(family)


def test_cert_from_wrong_ca_is_refused(lab: Lab, tmp_path: Path) -> None:
    c1, gw = lab.clients[0], lab.gw
    ca, other = make_ca(tmp_path / "ca"), make_ca(tmp_path / "other", name="other CA")
    c1.start_charon()
    gw.start_charon()
    c1.charon.load(cert_conf(c1, gw, make_cert(other, ike_id(c1), tmp_path / "c1"), ca))
    gw.charon.load(cert_conf(gw, c1, make_cert(ca, ike_id(gw), tmp_path / "gw"), ca))
    name = default_name(c1, gw)
    with pytest.raises(CharonError):
        c1.charon.initiate(name, name, timeout=3)


def test_block_udp_stops_only_that_client(lab: Lab) -> None:
    c1, c2, gw = lab.clients[0], lab.clients[1], lab.gw
    for h in (c1, c2, gw):
        h.start_charon()
    c1.charon.load(psk_conf(c1, gw))
    c2.charon.load(psk_conf(c2, gw))
    gw.charon.load(psk_conf(gw, c1))
    gw.charon.load(psk_conf(gw, c2))  # accumulates: both connections stay loaded
    lab.block_udp(c1)
    rules = _fw_rules(lab)
    assert rules.count(f"{c1.fw_veth} -p udp -j DROP") == 4
    assert c2.fw_veth not in rules
    # ICMP still passes; only UDP is dropped.
    assert not unanswered(c1, gw.outer4, count=1)
    with pytest.raises(CharonError):
        c1.charon.initiate(default_name(c1, gw), timeout=1.5)
    assert default_name(c1, gw) not in {n for e in gw.charon.list_sas() for n in e}
    c2.charon.initiate(default_name(c2, gw), timeout=5)
    _assert_tunnel(c2, gw)
    lab.unblock_udp(c1)
    assert "DROP" not in _fw_rules(lab)
    assert lab.rules == []


class _SnoopLab(Lab):
    """Records what is left in the namespaces just before they are deleted."""

    leftover_rules: str = ""
    leftover_pids: str = ""

    def _delete_namespaces(self) -> list[str]:
        self.leftover_rules = _fw_rules(self)
        self.leftover_pids = "".join(
            subprocess.run(["ip", "netns", "pids", h.name], capture_output=True, text=True).stdout
            for h in self.hosts
        )
        return super()._delete_namespaces()


def test_teardown_even_when_body_raises() -> None:
    lab = _SnoopLab(clients=1)
    with pytest.raises(RuntimeError, match="boom"), lab:
        c1, gw = lab.clients[0], lab.gw
        c1.start_charon()
        gw.start_charon()
        lab.block_udp(c1)
        lab.capture(gw)
        lab.gw.spawn(["sleep", "300"], "sleep.log")
        assert "DROP" in _fw_rules(lab)
        pids = [p.pid for p in lab.processes]
        assert len(pids) == 4 and all(Path(f"/proc/{pid}").exists() for pid in pids)
        raise RuntimeError("boom")
    assert "DROP" not in lab.leftover_rules
    assert lab.leftover_pids.strip() == ""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(h.name in listed for h in lab.hosts)
    assert lab.rules == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert all(p.popen.returncode is not None for p in lab.processes)
    assert not lab.dir.exists()


def test_keep_preserves_logs(tmp_path: Path) -> None:
    with Lab(clients=1, workdir=tmp_path / "lab", keep=True) as lab:
        lab.gw.start_charon()
    log = tmp_path / "lab" / "gw" / "charon" / "charon.log"
    assert "[CFG]" in log.read_text() or "[NET]" in log.read_text()
    assert os.path.isdir(tmp_path / "lab" / "c1")


class _FailingLab(Lab):
    def _build(self) -> None:
        super()._build()
        raise RuntimeError("setup broke")


def test_failed_setup_cleans_up() -> None:
    lab = _FailingLab(clients=1)
    with pytest.raises(RuntimeError, match="setup broke"), lab:
        pass
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.prefix not in listed
    assert not lab.dir.exists()
