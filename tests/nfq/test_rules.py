"""Integration tests of nfq.rules.SteeringRules with real iptables/ip6tables, each inside a
private network namespace (fresh, empty netfilter tables; deleted afterwards).

The code under test runs in a child `ip netns exec NS python3 -c ...`; the child prints a
JSON object of `iptables -S` snapshots taken with its own iptables calls (not the module's
helpers), and the assertions are made here. Needs root and iptables: fails loudly without.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.labkit.e2e import private_netns, python_in_netns

REPO = Path(__file__).resolve().parents[2]
CHAIN = "TCPENCAP_OUT"
JUMP = f"-A OUTPUT -p udp -m multiport --sports 500,4500 -j {CHAIN}"
OLD_JUMP = f"-A OUTPUT -j {CHAIN}"  # the layout before the peer sets
PEER4, PEER4B, PEER6 = "198.19.0.2", "198.19.0.3", "fd00:19::2"


def queue_rule(fam: int, queue: int = 4500, chain: str = CHAIN) -> str:
    """The chain's one rule as `iptables -S` prints it: destinations in the family's set."""
    return f"-A {chain} -m set --match-set {chain}_{fam} dst -j NFQUEUE --queue-num {queue}"


def installed(fam: int, queue: int = 4500, chain: str = CHAIN) -> list[str]:
    jump = f"-A OUTPUT -p udp -m multiport --sports 500,4500 -j {chain}"
    return [f"-N {chain}", jump, queue_rule(fam, queue, chain)]


# Rules someone else put into mangle before tcpencap started; they must survive everything.
UNRELATED = {
    4: [
        ["-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "MARK", "--set-mark", "7"],
        ["-N", "OTHER"],
        ["-A", "OTHER", "-p", "udp", "--dport", "4500", "-j", "MARK", "--set-mark", "9"],
        ["-A", "POSTROUTING", "-p", "udp", "--sport", "500", "-j", "RETURN"],
    ],
    6: [
        ["-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "MARK", "--set-mark", "7"],
        ["-N", "OTHER"],
        ["-A", "OTHER", "-p", "udp", "--dport", "4500", "-j", "MARK", "--set-mark", "9"],
    ],
}
UNRELATED_S = {
    4: [
        "-N OTHER",
        "-A OUTPUT -p tcp -m tcp --dport 9 -j MARK --set-xmark 0x7/0xffffffff",
        "-A POSTROUTING -p udp -m udp --sport 500 -j RETURN",
        "-A OTHER -p udp -m udp --dport 4500 -j MARK --set-xmark 0x9/0xffffffff",
    ],
    6: [
        "-N OTHER",
        "-A OUTPUT -p tcp -m tcp --dport 9 -j MARK --set-xmark 0x7/0xffffffff",
        "-A OTHER -p udp -m udp --dport 4500 -j MARK --set-xmark 0x9/0xffffffff",
    ],
}

PRELUDE = textwrap.dedent(
    """
    import json, subprocess, sys
    from nfq.rules import SteeringRules, chain_exists

    def ipt(fam, *args, check=True):
        tool = "iptables" if fam == 4 else "ip6tables"
        p = subprocess.run([tool, "-w", "5", "-t", "mangle", *args],
                           capture_output=True, text=True)
        if check and p.returncode:
            sys.exit(f"{tool} {args}: {p.stderr}")
        return p

    def snap():
        return {fam: [ln for ln in ipt(fam, "-S").stdout.splitlines()
                      if not ln.startswith("-P ")] for fam in (4, 6)}

    def filter_snap():
        return {fam: subprocess.run(["iptables" if fam == 4 else "ip6tables", "-S"],
                                    capture_output=True, text=True).stdout
                for fam in (4, 6)}

    def sets(chain="TCPENCAP_OUT"):
        # Members of the chain's two sets (None: no such set), read with the ipset CLI.
        res = {}
        for fam in (4, 6):
            p = subprocess.run(["ipset", "list", f"{chain}_{fam}"], capture_output=True,
                               text=True)
            if p.returncode:
                res[fam] = None
                continue
            lines = p.stdout.splitlines()
            res[fam] = sorted(ln.strip() for ln in lines[lines.index("Members:") + 1:]
                              if ln.strip())
        return res

    def add_unrelated():
        for fam, rules in UNRELATED.items():
            for r in rules:
                ipt(fam, *r)

    def counted_link():
        # A veth with an address in 198.18.1.0/24 and a POSTROUTING counter for UDP to it.
        for cmd in (
            "link add te0 type veth peer name te1",
            "link set te0 up",
            "link set te1 up",
            "addr add 198.18.1.2/24 dev te0",
        ):
            subprocess.run(["ip", *cmd.split()], check=True)
        ipt(4, "-A", "POSTROUTING", "-p", "udp", "-d", "198.18.1.0/24")

    out = {}
    """
)


def run_in_ns(ns: str, body: str) -> dict:
    code = f"UNRELATED = {UNRELATED!r}\n" + PRELUDE + textwrap.dedent(body)
    res = python_in_netns(ns, code + "\nprint(json.dumps(out))\n")
    # JSON object keys are strings: give the family keys back as ints.
    return {
        k: {int(f): v for f, v in s.items()} if isinstance(s, dict) else s for k, s in res.items()
    }


@pytest.fixture
def ns():
    with private_netns("te-rules", ("ip", "iptables", "ip6tables", "ipset")) as name:
        yield name


def ours(rules: list[str], chain: str = CHAIN) -> list[str]:
    return [r for r in rules if chain in r]


def test_fresh_namespace_has_empty_tables(ns):
    res = run_in_ns(ns, "out['s'] = snap()")
    assert res["s"] == {4: [], 6: []}


def test_install_creates_the_chains_sets_and_one_jump_per_family(ns):
    res = run_in_ns(
        ns,
        """
        add_unrelated()
        r = SteeringRules(4500)
        r.install()
        out["s"] = snap()
        out["sets"] = sets()
        out["exists"] = {4: chain_exists(family=4), 6: chain_exists(family=6)}
        out["installed"] = r.installed
        """,
    )
    for fam in (4, 6):
        rules = res["s"][fam]
        assert ours(rules) == installed(fam)
        # The jump is first in OUTPUT, before the admin's own rule.
        output = [r for r in rules if r.startswith("-A OUTPUT")]
        assert output[0] == JUMP
        assert [r for r in rules if CHAIN not in r] == UNRELATED_S[fam]
    assert res["sets"] == {4: [], 6: []}
    assert res["exists"] == {4: True, 6: True}
    assert res["installed"] is True


def test_add_and_remove_peer_change_exactly_their_set_member(ns):
    res = run_in_ns(
        ns,
        """
        add_unrelated()
        r = SteeringRules(4500)
        r.install()
        out["base"] = snap()
        out["new"] = [r.add_peer("198.19.0.2"), r.add_peer("fd00:19::2"),
                      r.add_peer("198.19.0.3")]
        out["three"] = sets()
        # The same peers again (one spelled differently): nothing changes.
        out["again"] = [r.add_peer("198.19.0.2"), r.add_peer("FD00:19:0::2")]
        out["three_again"] = sets()
        out["peers"] = sorted(r.peers)
        out["gone"] = [r.remove_peer("198.19.0.2"), r.remove_peer("198.19.0.2")]
        out["v4_removed"] = sets()
        out["gone6"] = r.remove_peer("fd00:0019::2")
        out["v6_removed"] = sets()
        out["unknown"] = r.remove_peer("198.19.0.99")
        out["end"] = sets()
        out["rules_end"] = snap()
        """,
    )
    assert res["new"] == [True, True, True]
    assert res["three"] == {4: [PEER4, PEER4B], 6: [PEER6]}
    assert res["again"] == [False, False]
    assert res["three_again"] == res["three"]
    assert res["peers"] == sorted([PEER4, PEER4B, PEER6])
    assert res["gone"] == [True, False]
    assert res["v4_removed"] == {4: [PEER4B], 6: [PEER6]}
    assert res["gone6"] is True
    assert res["v6_removed"] == {4: [PEER4B], 6: []}
    assert res["unknown"] is False
    assert res["end"] == res["v6_removed"]
    assert res["rules_end"] == res["base"]  # peers never change a rule


def test_peers_added_before_install_are_installed_with_the_chain(ns):
    res = run_in_ns(
        ns,
        """
        r = SteeringRules(7, chain="TE_TEST")
        r.add_peer("fd00:19::2")
        r.add_peer("198.19.0.2")
        out["before"] = snap()
        out["sets_before"] = sets("TE_TEST")
        r.install()
        out["after"] = snap()
        out["sets_after"] = sets("TE_TEST")
        r.remove()
        out["removed"] = snap()
        out["sets_removed"] = sets("TE_TEST")
        """,
    )
    assert res["before"] == {4: [], 6: []}  # nothing is touched before install()
    assert res["sets_before"] == {4: None, 6: None}
    assert res["after"] == {fam: installed(fam, 7, "TE_TEST") for fam in (4, 6)}
    assert res["sets_after"] == {4: [PEER4], 6: [PEER6]}
    assert res["removed"] == {4: [], 6: []}
    assert res["sets_removed"] == {4: None, 6: None}


def test_install_after_a_simulated_crash_cleans_up_first(ns):
    """Leftovers of a run that died: the chain of the older per-peer layout with a stale
    peer rule and two jumps, and a set of the current layout with a stale member. The
    stale member stays steered until commit() (never a moment unsteered)."""
    res = run_in_ns(
        ns,
        f"""
        add_unrelated()
        for fam, peer in ((4, "198.19.0.77"), (6, "fd00:19::77")):
            ipt(fam, "-N", "{CHAIN}")
            ipt(fam, "-A", "{CHAIN}", "-d", peer, "-p", "udp", "-j", "NFQUEUE",
                "--queue-num", "4500")
            ipt(fam, "-I", "OUTPUT", "1", "-j", "{CHAIN}")
            ipt(fam, "-A", "OUTPUT", "-j", "{CHAIN}")
        subprocess.run(["ipset", "create", "{CHAIN}_4", "hash:ip"], check=True)
        subprocess.run(["ipset", "add", "{CHAIN}_4", "198.19.0.77"], check=True)
        out["stale"] = snap()
        out["stale_sets"] = sets()
        r = SteeringRules(4500)
        r.add_peer("198.19.0.2")
        r.add_peer("fd00:19::2")
        r.install()
        out["remembered"] = r.remembered
        out["sets_staging"] = sets()
        r.commit()
        out["after"] = snap()
        out["sets"] = sets()
        out["all_sets"] = sorted(subprocess.run(["ipset", "list", "-n"], capture_output=True,
                                                text=True).stdout.split())
        r.remove()
        out["removed"] = snap()
        out["sets_removed"] = sets()
        """,
    )
    assert res["stale_sets"] == {4: ["198.19.0.77"], 6: None}
    assert res["remembered"] == ["198.19.0.77"]
    assert res["sets_staging"] == {4: sorted([PEER4, "198.19.0.77"]), 6: [PEER6]}
    assert res["all_sets"] == [f"{CHAIN}_4", f"{CHAIN}_6"]  # the staging sets are gone
    for fam in (4, 6):
        assert res["stale"][fam].count(OLD_JUMP) == 2
        rules = res["after"][fam]
        assert ours(rules) == installed(fam)
        assert not any("::77" in r or ".77" in r for r in rules)
        assert [r for r in rules if CHAIN not in r] == UNRELATED_S[fam]
        assert res["removed"][fam] == UNRELATED_S[fam]
    assert res["sets"] == {4: [PEER4], 6: [PEER6]}
    assert res["sets_removed"] == {4: None, 6: None}


def test_install_after_a_real_crash_of_another_process(ns):
    """One process installs and dies without cleaning up; the next one starts clean."""
    run_in_ns(
        ns,
        """
        add_unrelated()
        r = SteeringRules(4500)
        r.install()
        r.add_peer("198.19.0.50")
        r.add_peer("fd00:19::50")
        import os
        print(json.dumps(out), flush=True)
        os._exit(0)  # no remove(), no finally: like a SIGKILL
        """,
    )
    res = run_in_ns(
        ns,
        """
        out["left"] = snap()
        out["left_sets"] = sets()
        r = SteeringRules(4500)
        r.add_peer("198.19.0.2")
        r.install()
        out["kept"] = sets()
        r.commit()
        out["after"] = snap()
        out["sets"] = sets()
        r.remove()
        out["removed"] = snap()
        out["sets_removed"] = sets()
        """,
    )
    assert res["kept"] == {4: sorted([PEER4, "198.19.0.50"]), 6: ["fd00:19::50"]}
    # What the dead process left still steers its peers into the queue (fail-closed).
    assert ours(res["left"][4]) == installed(4) and ours(res["left"][6]) == installed(6)
    assert res["left_sets"] == {4: ["198.19.0.50"], 6: ["fd00:19::50"]}
    assert ours(res["after"][4]) == installed(4)
    assert res["sets"] == {4: [PEER4], 6: []}
    assert res["removed"] == UNRELATED_S
    assert res["sets_removed"] == {4: None, 6: None}


def test_remove_leaves_exactly_what_was_there(ns):
    res = run_in_ns(
        ns,
        """
        add_unrelated()
        out["before"] = snap()
        out["filter_before"] = filter_snap()
        r = SteeringRules(4500)
        r.install()
        for p in ("198.19.0.2", "198.19.0.3", "fd00:19::2"):
            r.add_peer(p)
        r.remove()
        out["after"] = snap()
        out["sets_after"] = sets()
        out["filter_after"] = filter_snap()
        out["installed"] = r.installed
        out["exists"] = {4: chain_exists(family=4), 6: chain_exists(family=6)}
        r.remove()  # again: harmless
        out["twice"] = snap()
        r.install()  # and back: the remembered peers come back with it
        out["reinstalled"] = snap()
        out["sets_reinstalled"] = sets()
        r.remove()
        """,
    )
    assert res["before"] == UNRELATED_S
    assert res["after"] == res["before"]
    assert res["sets_after"] == {4: None, 6: None}
    assert res["filter_after"] == res["filter_before"]
    assert res["installed"] is False
    assert res["exists"] == {4: False, 6: False}
    assert res["twice"] == res["before"]
    assert ours(res["reinstalled"][4]) == installed(4)
    assert ours(res["reinstalled"][6]) == installed(6)
    assert res["sets_reinstalled"] == {4: [PEER4, PEER4B], 6: [PEER6]}


def test_steered_packets_hit_the_rule_and_others_do_not(ns):
    """Real UDP through the rules: from charon's ports 500/4500 to a steered peer it is
    queued (and, with no reader bound, dropped); any other source port or peer is not."""
    res = run_in_ns(
        ns,
        f"""
        import socket
        counted_link()
        r = SteeringRules(4500)
        r.install()
        r.add_peer("198.18.1.99")

        def send(sport, dst):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("198.18.1.2", sport))
            try:
                s.sendto(b"x" * 40, (dst, 500))
                return "sent"
            except OSError as e:
                return e.strerror
            finally:
                s.close()

        out["results"] = [send(500, "198.18.1.99"), send(4500, "198.18.1.99"),
                          send(12345, "198.18.1.99"), send(500, "198.18.1.98")]
        counts = ipt(4, "-L", "{CHAIN}", "-v", "-x", "-n").stdout.splitlines()[2:]
        out["packets"] = [int(line.split()[0]) for line in counts]
        post = ipt(4, "-L", "POSTROUTING", "-v", "-x", "-n").stdout.splitlines()[2:]
        out["left"] = [int(line.split()[0]) for line in post]
        r.remove()
        """,
    )
    assert res["results"] == ["sent"] * 4  # a failed queueing is silent to the sender
    # Only UDP from 500/4500 enters the chain; its one rule matched the steered peer twice.
    assert res["packets"] == [2]
    # Queued with nobody reading: the kernel drops them (fail-closed); only the two
    # others reach POSTROUTING.
    assert res["left"] == [2]


def test_release_keeps_the_rules_and_the_next_run_swaps_them(ns):
    """A stop (release) leaves chains and sets as they are; the next run keeps them in
    force, learns their members (``remembered``) and replaces them in one swap."""
    res = run_in_ns(
        ns,
        """
        add_unrelated()
        r = SteeringRules(4500)
        r.install()
        r.commit()
        for p in ("198.19.0.50", "198.19.0.51", "fd00:19::50"):
            r.add_peer(p)
        r.release()
        out["released"] = snap()
        out["sets_released"] = sets()
        r2 = SteeringRules(4500)
        r2.add_peer("198.19.0.2")
        r2.install()
        out["remembered"] = sorted(r2.remembered)
        out["staging"] = sets()
        r2.add_peer("198.19.0.51")  # steered again (charon holds its SAs)
        r2.add_peer("fd00:19::2")
        r2.commit()
        out["committed"] = snap()
        out["sets"] = sets()
        r2.commit()  # again: nothing to do
        out["again"] = sets()
        r2.remove()
        """,
    )
    for fam in (4, 6):
        assert ours(res["released"][fam]) == installed(fam)
    assert res["sets_released"] == {4: ["198.19.0.50", "198.19.0.51"], 6: ["fd00:19::50"]}
    assert res["remembered"] == ["198.19.0.50", "198.19.0.51", "fd00:19::50"]
    assert res["staging"] == {4: [PEER4, "198.19.0.50", "198.19.0.51"], 6: ["fd00:19::50"]}
    assert res["committed"] == res["released"]  # the same rules throughout
    assert res["sets"] == {4: [PEER4, "198.19.0.51"], 6: [PEER6]}
    assert res["again"] == res["sets"]


def test_install_replaces_a_queue_rule_of_another_configuration(ns):
    """The previous run queued to another number: the new rule goes in before the old one
    goes, and nothing else of the chain changes."""
    res = run_in_ns(
        ns,
        """
        r = SteeringRules(4600)
        r.install()
        r.commit()
        r.release()
        r2 = SteeringRules(4500)
        r2.install()
        r2.commit()
        out["after"] = snap()
        r2.remove()
        """,
    )
    for fam in (4, 6):
        assert ours(res["after"][fam]) == installed(fam)


def test_remove_rules_command_refuses_while_a_daemon_answers(tmp_path):
    """``tcpencap remove-rules`` takes the rules away only when no daemon is running."""
    import socket

    sock_path = tmp_path / "ctl"
    conf = tmp_path / "t.conf"
    conf.write_text(f"tcpencap {{\n  status_socket = {sock_path}\n}}\n")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(sock_path))
    srv.listen()
    import threading

    def answer():
        c, _ = srv.accept()
        c.recv(100)
        c.sendall(b'{"pid": 1}\n')
        c.close()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    res = subprocess.run(
        [sys.executable, "-m", "tcpencap", "remove-rules", "--config", str(conf)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    srv.close()
    assert res.returncode == 1 and "stop it first" in res.stderr, res.stderr


def test_release_before_commit_keeps_every_peer_in_force(ns):
    """A daemon that stops (or fails) before its commit leaves the live set as it is, the
    previous run's peers and its own: nothing is unsteered by a stop."""
    res = run_in_ns(
        ns,
        """
        r = SteeringRules(4500)
        r.install()
        r.add_peer("198.19.0.50")
        r.commit()
        r.release()
        r2 = SteeringRules(4500)
        r2.install()
        r2.add_peer("198.19.0.2")
        r2.release()
        out["sets"] = sets()
        out["all_sets"] = sorted(subprocess.run(["ipset", "list", "-n"], capture_output=True,
                                                text=True).stdout.split())
        """,
    )
    assert res["sets"] == {4: [PEER4, "198.19.0.50"], 6: []}
    assert res["all_sets"] == [f"{CHAIN}_4", f"{CHAIN}_6"]


def test_install_rules_before_charon_drops_a_clients_ike_to_anyone(ns, tmp_path):
    """`tcpencap install-rules` (strongswan.service's ExecStartPre=) on a TCP client: with
    no daemon yet, charon's IKE to any address is queued to nobody and dropped, ESP is not
    touched; a running daemon's set would be left as it is (no swap)."""
    conf = tmp_path / "client.conf"
    conf.write_text(
        "tcpencap {\n  connections {\n    home {\n      remote_addrs = 198.18.1.99\n    }\n  }\n}\n"
    )
    res = run_in_ns(
        ns,
        f"""
        import socket
        for cmd in ("link add te0 type veth peer name te1", "link set te0 up",
                    "link set te1 up", "addr add 198.18.1.2/24 dev te0"):
            subprocess.run(["ip", *cmd.split()], check=True)
        ipt(4, "-A", "POSTROUTING", "-p", "udp", "-d", "198.18.1.0/24")  # a counter
        r = SteeringRules(4500)
        r.install()
        r.add_peer("198.19.0.7")  # a running daemon's peer
        r.commit()
        r.release()
        cli = subprocess.run([sys.executable, "-m", "tcpencap", "install-rules", "--config",
                              "{conf}"], capture_output=True, text=True)
        out["rc"] = cli.returncode
        out["err"] = cli.stderr
        out["sets"] = sets()

        def send(sport, payload):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("198.18.1.2", sport))
            s.sendto(payload, ("198.18.1.50", sport))
            s.close()

        send(500, b"\\x11" * 8 + bytes(20))          # IKE on 500
        send(4500, bytes(4) + b"\\x11" * 8 + bytes(20))  # IKE behind the non-ESP marker
        send(4500, b"\\xc0\\xff\\xee\\x01" + bytes(40))  # ESP
        post = ipt(4, "-L", "POSTROUTING", "-v", "-x", "-n").stdout.splitlines()[2:]
        out["left"] = [int(line.split()[0]) for line in post]
        """,
    )
    assert res["rc"] == 0, res["err"]
    assert res["sets"] == {4: ["198.19.0.7"], 6: []}  # the daemon's peer is still steered
    assert res["left"] == [1]  # only the ESP left; both IKE packets were queued, dropped


def test_commit_replaces_a_set_of_another_type_without_a_gap(ns):
    """A previous run's set of another type (no swap between types): the chain queues by
    the staging set while the live one is made again, then by the live one."""
    res = run_in_ns(
        ns,
        f"""
        subprocess.run(["ipset", "create", "{CHAIN}_4", "hash:net"], check=True)
        subprocess.run(["ipset", "add", "{CHAIN}_4", "198.19.0.0/24"], check=True)
        r = SteeringRules(4500)
        r.add_peer("198.19.0.2")
        r.install()
        out["remembered"] = r.remembered
        r.commit()
        out["rules"] = snap()
        out["sets"] = sets()
        out["type"] = subprocess.run(["ipset", "list", "-t", "{CHAIN}_4"], capture_output=True,
                                     text=True).stdout
        out["all_sets"] = sorted(subprocess.run(["ipset", "list", "-n"], capture_output=True,
                                                text=True).stdout.split())
        r.remove()
        """,
    )
    assert res["remembered"] == ["198.19.0.0"]
    for fam in (4, 6):
        assert ours(res["rules"][fam]) == installed(fam)
    assert res["sets"] == {4: [PEER4], 6: []}
    assert "Type: hash:ip" in res["type"]
    assert res["all_sets"] == [f"{CHAIN}_4", f"{CHAIN}_6"]


def test_endpoint_steering_queues_that_endpoint_only(ns):
    """A gateway steers a TCP peer's UDP endpoint (issue 23 finding 5): charon's UDP to that
    address and port is queued; to another port of the same address (a plain-UDP client
    behind the same NAT) it leaves as UDP. Whole-address steering stays as it was."""
    res = run_in_ns(
        ns,
        f"""
        import socket
        counted_link()
        r = SteeringRules(4500, endpoints=True)
        r.install()
        r.steer("198.18.1.99", 45678, True)
        r.steer("198.18.1.98", 0, True)
        out["rules"] = ipt(4, "-S", "{CHAIN}").stdout.splitlines()

        def send(dst, dport):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("198.18.1.2", 4500))
            try:
                s.sendto(b"x" * 40, (dst, dport))
            finally:
                s.close()

        for dst, dport in (("198.18.1.99", 45678), ("198.18.1.99", 4500),
                           ("198.18.1.99", 45679), ("198.18.1.98", 4500)):
            send(dst, dport)
        counts = ipt(4, "-L", "{CHAIN}", "-v", "-x", "-n").stdout.splitlines()[2:]
        out["packets"] = [int(line.split()[0]) for line in counts]
        post = ipt(4, "-L", "POSTROUTING", "-v", "-x", "-n").stdout.splitlines()[2:]
        out["left"] = [int(line.split()[0]) for line in post]
        r.steer("198.18.1.99", 45678, False)
        send("198.18.1.99", 45678)
        post = ipt(4, "-L", "POSTROUTING", "-v", "-x", "-n").stdout.splitlines()[2:]
        out["left_after"] = [int(line.split()[0]) for line in post]
        r.remove()
        out["sets_after"] = subprocess.run(["ipset", "list", "-n"], capture_output=True,
                                           text=True).stdout.split()
        """,
    )
    assert res["rules"][1:] == [
        queue_rule(4),
        f"-A {CHAIN} -m set --match-set {CHAIN}_EP4 dst,dst -j NFQUEUE --queue-num 4500",
    ]
    assert res["packets"] == [1, 1]  # the whole peer, the one endpoint
    assert res["left"] == [2]  # the other two ports of .99 went out as UDP
    assert res["left_after"] == [3]
    assert res["sets_after"] == []
