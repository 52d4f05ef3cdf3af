"""End to end, continued: limits, restarts of charon, a killed TCP connection, clients behind
one NAT and UDP-first fallback.

What tcpencap reports (`tcpencap status`) is compared with what charon reports (VICI
list-sas), as in test_e2e_lifecycle.py, whose helpers are reused. Every test builds its own
lab; needs root, iproute2, iptables, tcpdump, ss and strongSwan (never skips).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest

from tests.lab.test_e2e_lifecycle import (
    NAME,
    conns,
    consistent,
    diagnose,
    extra_children,
    installed_out,
    local_port,
    log_excerpt,
    one_conn,
    peer_port,
    ping_result,
    setup,
    spawn_ping,
    wait_for,
    wait_ping,
)
from tests.labkit import Host, Lab, ping, psk_conf, tcpencap_conf, unanswered
from tests.labkit.e2e import ike_sa, listen_addr

pytestmark = pytest.mark.lab

N_CHILDREN = 20  # the base CHILD SA plus 19 more, each with its own pair of inner /32s


def force_terminate(host: Host, name: str) -> None:
    """Delete IKE SA ``name`` in ``host``'s charon without waiting for the peer's answer
    (the peer may no longer know it)."""
    sess = host.charon.session(timeout=10)
    try:
        for _ in sess.terminate({"ike": name, "force": "yes", "timeout": -1, "loglevel": -1}):
            pass
    finally:
        sess.transport.socket.close()


def vici_state(host: Host) -> str:
    return str(host.tcpencap_status()["vici"])


def tcpencap_log(host: Host) -> str:
    return (host.dir / "tcpencap.log").read_text(errors="replace")


# --- 1. max_spis ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_spis", [16, 32])
def test_twenty_child_sas_and_spi_limit(max_spis: int) -> None:
    """20 CHILD SAs under one IKE SA with ``max_spis`` 16 and 32 on both sides. With 32
    every spi-out is indexed; with 16 exactly 16 are, each refused SPI is logged as a
    "max_spis" warning and counted as drops spi-limit on the connection, and yet all 20
    children ping: the refused ones travel on the connection of their address pair."""
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        extra = range(2, N_CHILDREN + 1)
        cconf, gconf = extra_children(c1, gw, extra)
        lab.block_udp(c1)
        for h in (c1, gw):
            h.start_charon()
        c1.charon.load(cconf)
        gw.charon.load(gconf)
        limit = f"  max_spis = {max_spis}"
        gw.start_tcpencap(tcpencap_conf(gw, listen=[listen_addr(gw, 4, 4500)], extra=limit))
        c1.start_tcpencap(tcpencap_conf(c1, connections={NAME: 4500}, extra=limit))
        c1.charon.initiate(NAME)
        first = one_conn(c1)
        assert first is not None, conns(c1)
        for k in extra:
            c1.charon.initiate(f"{NAME}-{k}", ike=NAME)
        assert len(installed_out(ike_sa(c1, NAME))) == N_CHILDREN, ike_sa(c1, NAME)
        refused = max(0, N_CHILDREN - max_spis)
        indexed = N_CHILDREN - refused
        for h in (c1, gw):
            outs = installed_out(ike_sa(h, NAME))
            assert len(outs) == N_CHILDREN, (h.role, outs)

            def settled(h: Host = h, outs: set[str] = outs) -> dict[str, Any] | None:
                c = one_conn(h)
                if c is None or len(c["esp_spis"]) != indexed:
                    return None
                if c["drops"].get("spi-limit", 0) != refused:
                    return None
                return c

            c, _ = wait_for(f"{h.role}: {indexed} SPIs indexed", settled, 5.0, 0.2, diagnose(h))
            assert set(c["esp_spis"]) <= outs, (h.role, c["esp_spis"], outs)
            assert c["ike_spis"] == [ike_sa(h, NAME)["initiator-spi"]], c
            warnings = [
                line
                for line in tcpencap_log(h).splitlines()
                if " WARNING " in line and "max_spis" in line
            ]
            assert len(warnings) == refused, (h.role, warnings)
            for line in warnings:
                assert f"max_spis ({max_spis}) reached" in line, line
        for k in (1, *extra):
            lost = unanswered(c1, f"198.19.200.{k}", f"198.18.201.{k}", count=2, interval=0.02)
            assert not lost, (f"child {k}: no reply to {lost}", diagnose(c1, gw)())
            lost = unanswered(gw, f"198.18.201.{k}", f"198.19.200.{k}", count=2, interval=0.02)
            assert not lost, (f"child {k} from gw: no reply to {lost}", diagnose(c1, gw)())
        c = one_conn(c1)
        assert c is not None and (c["id"], c["local"]) == (first["id"], first["local"]), c
        assert len(conns(gw)) == 1, conns(gw)


# --- 2. charon restarts --------------------------------------------------------------------


def restart_charon(host: Host, conf: str, how: str = "stop") -> None:
    """Stop ``host``'s charon (``stop``: TERM, a clean shutdown that sends DELETEs; ``kill``:
    SIGKILL, a crash) while tcpencap keeps running: tcpencap's VICI state must go to
    "disconnected..." and, once a new charon has its config, back to "connected"."""
    assert vici_state(host) == "connected"
    if how == "stop":
        host.charon.process.stop()
    else:
        host.charon.process.signal(signal.SIGKILL)
        host.charon.process.popen.wait(5)
    wait_for(
        f"{host.role}: vici disconnected",
        lambda: vici_state(host).startswith("disconnected") or None,
        5.0,
        0.1,
        lambda: log_excerpt(host),
    )
    assert host.tcpencap.alive(), host.tcpencap.log_tail()
    host.start_charon()
    host.charon.load(conf)
    wait_for(
        f"{host.role}: vici connected again",
        lambda: vici_state(host) == "connected" or None,
        12.0,
        0.2,
        lambda: log_excerpt(host),
    )


def test_client_charon_restart() -> None:
    """charon on the client is stopped and started again while both tcpencaps keep running:
    the client's tcpencap loses VICI and gets it back, a new IKE SA (new SPI) comes up over
    a new TCP connection, pings, and both sides' status agree with list-sas again."""
    with Lab(clients=1) as lab:
        c1, gw = setup(lab)
        assert not unanswered(c1, gw.inner4, c1.inner4)
        old_spi = ike_sa(c1, NAME)["initiator-spi"]
        old_conn = one_conn(c1)
        assert old_conn is not None
        restart_charon(c1, psk_conf(c1, gw))
        assert c1.charon.list_sas() == []
        # charon's DELETE on shutdown left over TCP while tcpencap kept running.
        wait_for("gw SA deleted", lambda: gw.charon.list_sas() == [], 3.0, 0.1, diagnose(gw))
        caps = [lab.capture(c1)]
        c1.charon.initiate(NAME, timeout=10)
        new_spi = ike_sa(c1, NAME)["initiator-spi"]
        assert new_spi != old_spi
        wait_ping(c1, gw, "ping over the new SA", 4.0)
        caps[0].stop()
        assert caps[0].count_udp_ike() == 0, "the new SA leaked UDP 500/4500"
        assert caps[0].count_tcp(4500) > 0
        wait_for(
            "gw holds only the new IKE SA",
            lambda: (
                [sa["initiator-spi"] for e in gw.charon.list_sas() for sa in e.values()]
                == [new_spi]
                or None
            ),
            5.0,
            0.2,
            diagnose(c1, gw),
        )
        for h in (c1, gw):
            c = consistent(h, timeout=5)
            assert c["ike_spis"] == [new_spi], c
        c = one_conn(c1)
        assert c is not None and local_port(c) != local_port(old_conn), (c, old_conn)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_gateway_charon_restart(how: str) -> None:
    """charon on the gateway is stopped (clean shutdown, whose DELETE must still reach the
    client over TCP) or killed, then started again: its tcpencap loses VICI and gets it
    back; the new gateway charon does not know the client's SA, so the tunnel is dead until
    the client re-initiates, after which it pings over TCP again."""
    with Lab(clients=1) as lab:
        c1, gw = setup(lab)
        assert not unanswered(c1, gw.inner4, c1.inner4)
        old_spi = ike_sa(c1, NAME)["initiator-spi"]
        restart_charon(gw, psk_conf(gw, c1), how)
        assert gw.charon.list_sas() == [], gw.charon.list_sas()
        if how == "stop":  # the gateway's DELETE travelled over TCP
            wait_for("client SA deleted", lambda: c1.charon.list_sas() == [], 3.0, 0.1)
        else:  # a crash: the client still has its SA, which no longer works
            assert ike_sa(c1, NAME)["initiator-spi"] == old_spi
            sent, received = ping(c1, gw.inner4, c1.inner4, count=3)
            assert received == 0, f"the gateway lost the SA, yet {received}/{sent} pings passed"
            force_terminate(c1, NAME)
        c1.charon.initiate(NAME, timeout=10)
        new_spi = ike_sa(c1, NAME)["initiator-spi"]
        assert new_spi != old_spi
        wait_ping(c1, gw, "ping after re-initiation", 4.0)
        assert ike_sa(gw, NAME)["initiator-spi"] == new_spi
        for h in (c1, gw):
            c = consistent(h, timeout=5)
            assert c["ike_spis"] == [new_spi], c


# --- 3. TCP connection killed --------------------------------------------------------------


def test_tcp_connection_killed_under_traffic() -> None:
    """`ss -K` inside c1 destroys the client's TCP socket (this kernel has socket destroy,
    checked: the socket must be gone afterwards) while a ping runs every 50 ms: the client
    reconnects from a new source port, the gateway takes the existing SA onto the new
    connection, only a few pings are lost and no new IKE SA is created on either side
    (same initiator SPI and charon uniqueid)."""
    with Lab(clients=1) as lab:
        c1, gw = setup(lab)
        before = {h.role: one_conn(h) for h in (c1, gw)}
        assert all(before.values()), before
        ids = {
            h.role: (ike_sa(h, NAME)["initiator-spi"], ike_sa(h, NAME)["uniqueid"])
            for h in (c1, gw)
        }
        proc = spawn_ping(c1, gw.inner4, c1.inner4, 4, "ping.log")
        time.sleep(1.0)
        killed = c1.run("ss", "-K", "-t", "dst", gw.outer4, "dport", "=", ":4500")
        old = f"{c1.outer4}:{local_port(before['c1'])}"
        listed = c1.run("ss", "-tn", "state", "established", "dst", gw.outer4).stdout
        assert old not in listed, f"ss -K did not kill {old}: {killed.stdout}\n{listed}"
        sent, received = ping_result(proc, 6)

        def reconnected() -> tuple[dict[str, Any], dict[str, Any]] | None:
            c, g = one_conn(c1), one_conn(gw)
            if c is None or g is None or local_port(c) == local_port(before["c1"]):
                return None
            return (c, g) if peer_port(g) == local_port(c) else None

        (c, g), _ = wait_for("reconnect", reconnected, 5.0, detail=diagnose(c1, gw))
        assert sent >= 60, (sent, received)
        assert sent - received <= 5, (
            f"lost {sent - received}/{sent} pings around the kill\n{diagnose(c1, gw)()}"
        )
        assert g["id"] != before["gw"]["id"], (g, before["gw"])
        for h in (c1, gw):
            conn = consistent(h, timeout=3)
            assert conn["esp_spis"] and conn["ike_spis"] == [ids[h.role][0]], conn
            sas = h.charon.list_sas()
            assert len(sas) == 1, (h.role, sas)
            sa = ike_sa(h, NAME)
            assert (sa["initiator-spi"], sa["uniqueid"]) == ids[h.role], (h.role, sa, ids)
        assert not unanswered(c1, gw.inner4, c1.inner4)


# --- 4. three clients behind one NAT --------------------------------------------------------


def test_three_clients_behind_one_nat() -> None:
    """fw masquerades everything towards gw, so three clients reach the gateway from
    198.19.0.1. The gateway accepts any address with one connection per client identity.
    Each client gets its own TCP connection (3 on the gateway, same peer address, different
    ports), each tunnel pings both ways, and pinging one client moves only the frame
    counters of that client's connection."""
    with Lab(clients=3) as lab:
        gw, clients = lab.gw, lab.clients
        nat = "198.19.0.1"
        lab.fw.run(
            "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", gw.fw_veth, "-j", "MASQUERADE"
        )  # fmt: skip  (removed with the namespace)
        gw.start_charon()
        gw_conf = "".join(
            psk_conf(gw, c).replace(f"remote_addrs = {c.outer4}", "remote_addrs = %any")
            for c in clients
        )
        gw.charon.load(gw_conf)
        gw.start_tcpencap(tcpencap_conf(gw, listen=[listen_addr(gw, 4, 4500)]))
        names = {c.role: f"{c.role}-gw" for c in clients}
        for c in clients:
            lab.block_udp(c)
            c.start_charon()
            c.charon.load(psk_conf(c, gw))
            c.start_tcpencap(tcpencap_conf(c, connections={names[c.role]: 4500}))
        for c in clients:
            c.charon.initiate(names[c.role], timeout=10)
        spis = {c.role: ike_sa(c, names[c.role])["initiator-spi"] for c in clients}
        assert len(set(spis.values())) == 3, spis
        for c in clients:
            sa = ike_sa(gw, names[c.role])
            assert (sa["remote-host"], sa["initiator-spi"]) == (nat, spis[c.role]), sa

        def gw_conns() -> dict[str, dict[str, Any]] | None:
            """The gateway's connections by client role (matched by IKE SPI)."""
            cs = conns(gw)
            by_role = {
                role: [c for c in cs if c["ike_spis"] == [spi] and c["state"] == "open"]
                for role, spi in spis.items()
            }
            if len(cs) != 3 or any(len(v) != 1 for v in by_role.values()):
                return None
            return {role: v[0] for role, v in by_role.items()}

        by_role, _ = wait_for("3 gateway connections", gw_conns, 3.0, detail=diagnose(gw))
        assert {c["peer"].rsplit(":", 1)[0] for c in by_role.values()} == {nat}, by_role
        assert len({peer_port(c) for c in by_role.values()}) == 3, by_role
        for c in clients:
            own = one_conn(c)
            assert own is not None and own["ike_spis"] == [spis[c.role]], (c.role, own)
            assert own["local"].startswith(f"{c.outer4}:"), own
            sa = ike_sa(gw, names[c.role])
            gw_outs = installed_out(sa)
            assert set(by_role[c.role]["esp_spis"]) == gw_outs, (by_role[c.role], gw_outs)
            for src, dst in ((c, gw), (gw, c)):
                lost = unanswered(src, dst.inner4, src.inner4)
                assert not lost, (src.role, dst.role, lost, diagnose(gw, c)())

        frames = {r: (c["frames_in"], c["frames_out"]) for r, c in gw_conns().items()}
        target = clients[1]
        got = ping(gw, target.inner4, gw.inner4, count=20, interval=0.02, timeout=5)
        assert got == (20, 20), got
        after = {r: (c["frames_in"], c["frames_out"]) for r, c in gw_conns().items()}
        for role in frames:
            d_in = after[role][0] - frames[role][0]
            d_out = after[role][1] - frames[role][1]
            if role == target.role:
                assert d_in >= 20 and d_out >= 20, (role, frames, after)
            else:
                assert (d_in, d_out) == (0, 0), (role, frames, after)


# --- 5. UDP first, then TCP -------------------------------------------------------------


def fallback_conf(host: Host, timeout: str) -> str:
    text = tcpencap_conf(host, connections={NAME: 4500})
    return text.replace(
        "      remote_port = 4500\n",
        "      remote_port = 4500\n      transport = fallback\n"
        f"      fallback_timeout = {timeout}\n",
        1,
    )


def test_fallback_udp_first_then_tcp() -> None:
    """``transport = fallback`` with fallback_timeout 3 s and charon retransmitting after
    1 s, 2.4 s, 4.4 s, 7.1 s: with UDP open the SA uses plain ESP-in-UDP (no TCP on the
    wire, no tcpencap connection); with UDP dropped in fw, the SA comes up over TCP within
    fallback_timeout plus one retransmission interval, and UDP only precedes the switch."""
    with Lab(clients=1) as lab:
        c1, gw = lab.clients[0], lab.gw
        c1.start_charon(settings="  retransmit_timeout = 1.0\n  retransmit_base = 1.4\n")
        gw.start_charon()
        c1.charon.load(psk_conf(c1, gw))
        gw.charon.load(psk_conf(gw, c1))
        gw.start_tcpencap(tcpencap_conf(gw, listen=[listen_addr(gw, 4, 4500)]))
        c1.start_tcpencap(fallback_conf(c1, "3s"))

        # UDP open: plain NAT-T.
        cap = lab.capture(c1)
        c1.charon.initiate(NAME)
        assert not unanswered(c1, gw.inner4, c1.inner4)
        pkts = cap.stop()
        from scapy.layers.inet import UDP

        esp = [p for p in pkts if UDP in p and p[UDP].dport == 4500 and len(p[UDP].payload) > 4
               and bytes(p[UDP].payload)[:4] != b"\0\0\0\0"]  # fmt: skip
        assert len(esp) >= 3, f"no ESP-in-UDP on c1's veth: {len(pkts)} packets"
        assert cap.count_tcp(4500) == 0
        assert conns(c1) == [] and conns(gw) == [], (conns(c1), conns(gw))
        c1.charon.terminate(NAME)
        time.sleep(1.2)  # one fallback poll: the connection has no SA any more

        # UDP dropped: fall back to TCP.
        lab.block_udp(c1)
        cap = lab.capture(c1)
        t0 = time.monotonic()
        c1.charon.initiate(NAME, timeout=20)
        took = time.monotonic() - t0
        assert not unanswered(c1, gw.inner4, c1.inner4)
        pkts = cap.stop()
        assert took < 10.0, f"SA over TCP after {took:.1f}s\n{log_excerpt(c1)}"
        assert took > 3.0, f"SA up after {took:.1f}s: UDP cannot have worked"
        from scapy.layers.inet import TCP

        tcp_t = [float(p.time) for p in pkts if TCP in p and 4500 in (p[TCP].sport, p[TCP].dport)]
        udp_t = [
            float(p.time) for p in pkts if UDP in p and {p[UDP].sport, p[UDP].dport} & {500, 4500}
        ]
        assert tcp_t, "no TCP 4500 on c1's veth"
        assert len(udp_t) >= 2, f"expected IKE_SA_INIT and a retransmission over UDP: {udp_t}"
        assert max(udp_t) < min(tcp_t), (udp_t, tcp_t)
        assert "falling back to TCP" in tcpencap_log(c1), log_excerpt(c1)
        sa = ike_sa(c1, NAME)
        assert sa["state"] == "ESTABLISHED", sa
        c = consistent(c1, timeout=3)
        assert c["ike_spis"] == [sa["initiator-spi"]], c
        assert len(conns(gw)) == 1, conns(gw)
