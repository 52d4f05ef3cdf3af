"""nfq.ctcp_rules.CtcpRules with real iptables/ip6tables, each test in a private network
namespace (fresh netfilter tables and ipsets; deleted afterwards): the raw-table chains of
the cTCP data path, what they do to a segment, and their removal. The peer UDP steering set
(``steer_endpoint``, nfq.rules.SteeringRules) has its own tests in test_rules.py.

The code under test runs in a child ``ip netns exec NS python3 -c ...`` that prints
``iptables -S`` snapshots (taken with its own calls); the assertions are made here. Needs
root and iptables: fails loudly without."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.labkit.e2e import private_netns, python_in_netns

REPO = Path(__file__).resolve().parents[2]
MARK = "0x63746370"
QUEUE = "-j NFQUEUE --queue-num 4601"
LOCAL = "-m addrtype --dst-type LOCAL"

PRELUDE = textwrap.dedent(
    """
    import json, socket, subprocess, sys
    from nfq.ctcp_rules import CtcpRules, raw_chain_exists

    def ipt(fam, table, *args):
        tool = "iptables" if fam == 4 else "ip6tables"
        p = subprocess.run([tool, "-w", "5", "-t", table, *args], capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{tool} {args}: {p.stderr}")
        return p

    def snap(table="raw"):
        return {fam: [ln for ln in ipt(fam, table, "-S").stdout.splitlines()
                      if not ln.startswith("-P ")] for fam in (4, 6)}

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    rules = CtcpRules(4600, inbound_queue=4601)
    out = {}
    """
)


def run_in_ns(ns: str, body: str) -> dict:
    res = python_in_netns(ns, PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n")
    return {
        k: {int(f): v for f, v in s.items()} if isinstance(s, dict) else s for k, s in res.items()
    }


@pytest.fixture
def ns() -> Iterator[str]:
    with private_netns("te-ctcprules", ("ip", "iptables", "ip6tables", "ipset")) as name:
        yield name


# What install() makes in both families before any endpoint.
FRAME = [
    "-N TCPENCAP_CTCP_IN",
    "-N TCPENCAP_CTCP_LO",
    "-A PREROUTING -j TCPENCAP_CTCP_IN",
    "-A OUTPUT -j TCPENCAP_CTCP_LO",
]


LO_HEAD = [
    "-A TCPENCAP_CTCP_LO -m conntrack --ctstate INVALID",
    f"-A TCPENCAP_CTCP_LO -m mark --mark {MARK} -j CT --notrack",
    f"-A TCPENCAP_CTCP_LO -m mark --mark {MARK} -j ACCEPT",
]


def test_install_queues_the_listen_ports_and_the_peers_and_drops_the_host_stacks_segments(ns):
    res = run_in_ns(
        ns,
        """
        rules.install([("0.0.0.0", 10000), ("198.19.0.2", 10443), ("fd00::2", 10000)],
                      [("198.19.0.9", 443)])
        out["raw"] = snap()
        out["mangle"] = snap("mangle")
        out["exists"] = [raw_chain_exists("TCPENCAP_CTCP_IN", f) for f in (4, 6)]
        out["installed"] = rules.installed
        """,
    )
    assert res["raw"][4] == [
        *FRAME,
        # a wildcard listener: no address match, but local destinations only
        f"-A TCPENCAP_CTCP_IN -p tcp -m tcp --dport 10000 {LOCAL} {QUEUE}",
        f"-A TCPENCAP_CTCP_IN -d 198.19.0.2/32 -p tcp -m tcp --dport 10443 {LOCAL} {QUEUE}",
        f"-A TCPENCAP_CTCP_IN -s 198.19.0.9/32 -p tcp -m tcp --sport 443 {LOCAL} {QUEUE}",
        *LO_HEAD,
        "-A TCPENCAP_CTCP_LO -p tcp -m tcp --sport 10000 -j DROP",
        "-A TCPENCAP_CTCP_LO -s 198.19.0.2/32 -p tcp -m tcp --sport 10443 -j DROP",
        "-A TCPENCAP_CTCP_LO -d 198.19.0.9/32 -p tcp -m tcp --dport 443 -j DROP",
    ]
    assert res["raw"][6] == [
        *FRAME,
        f"-A TCPENCAP_CTCP_IN -d fd00::2/128 -p tcp -m tcp --dport 10000 {LOCAL} {QUEUE}",
        *LO_HEAD,
        "-A TCPENCAP_CTCP_LO -s fd00::2/128 -p tcp -m tcp --sport 10000 -j DROP",
    ]
    # charon's UDP to cTCP peers: the steering set's chain, into the outbound queue
    for fam in (4, 6):
        assert "-N TCPENCAP_CTCP_OUT" in res["mangle"][fam]
        assert any("--queue-num 4600" in r for r in res["mangle"][fam])
    assert res["exists"] == [True, True] and res["installed"] is True


def test_a_second_install_makes_the_raw_chains_again_without_doubling_them(ns):
    res = run_in_ns(
        ns,
        """
        rules.install([("198.19.0.2", 10000)])
        rules.install([("198.19.0.3", 10001)])
        out["raw"] = snap()
        """,
    )
    assert res["raw"][4] == [
        *FRAME,
        f"-A TCPENCAP_CTCP_IN -d 198.19.0.3/32 -p tcp -m tcp --dport 10001 {LOCAL} {QUEUE}",
        *LO_HEAD,
        "-A TCPENCAP_CTCP_LO -s 198.19.0.3/32 -p tcp -m tcp --sport 10001 -j DROP",
    ]


def test_a_peer_endpoint_comes_and_goes_alone(ns):
    res = run_in_ns(
        ns,
        """
        rules.install([("0.0.0.0", 10000)])
        before = snap()
        rules.add_peer_endpoint("fd00::9", 10443)
        out["added"] = snap()
        rules.remove_peer_endpoint("fd00::9", 10443)
        rules.remove_peer_endpoint("fd00::9", 10443)  # again: nothing left to delete, no error
        out["same"] = snap() == before
        """,
    )
    assert (
        f"-A TCPENCAP_CTCP_IN -s fd00::9/128 -p tcp -m tcp --sport 10443 {LOCAL} {QUEUE}"
        in (res["added"][6])
    )
    assert (
        "-A TCPENCAP_CTCP_LO -d fd00::9/128 -p tcp -m tcp --dport 10443 -j DROP"
        in (res["added"][6])
    )
    assert len(res["added"][6]) == len(FRAME) + len(LO_HEAD) + 2
    assert not any("fd00::9" in r for r in res["added"][4])
    assert res["same"] is True


def test_a_failing_install_leaves_no_raw_chain(ns):
    res = run_in_ns(
        ns,
        """
        try:
            rules.install([("198.19.0.2", 10000), ("not an address", 1)])
        except ValueError as exc:
            out["error"] = str(exc)
        out["raw"] = snap()
        """,
    )
    assert "not an address" in res["error"]
    assert res["raw"] == {4: [], 6: []}


def test_release_keeps_every_chain_and_remove_takes_only_ours(ns):
    res = run_in_ns(
        ns,
        """
        ipt(4, "raw", "-A", "PREROUTING", "-p", "udp", "--dport", "9", "-j", "NOTRACK")
        ipt(6, "raw", "-N", "OTHER")
        before = snap()
        rules.install([("0.0.0.0", 10000)], [("198.19.0.9", 443)])
        installed = (snap(), snap("mangle"))
        rules.release()
        out["kept"] = (snap(), snap("mangle")) == installed
        out["released_flag"] = rules.installed
        ipt(4, "raw", "-I", "OUTPUT", "1", "-j", "TCPENCAP_CTCP_LO")  # a doubled jump
        rules.remove()
        out["after"] = snap()
        out["same"] = snap() == before
        rules.remove()  # again: nothing left, no error
        out["mangle"] = snap("mangle")
        out["exists"] = [raw_chain_exists("TCPENCAP_CTCP_IN", f) for f in (4, 6)]
        """,
    )
    assert res["kept"] is True and res["released_flag"] is False
    assert res["same"] is True, res["after"]
    assert res["mangle"] == {4: [], 6: []}
    assert res["exists"] == [False, False]


def test_the_host_stack_never_completes_a_handshake_on_a_ctcp_port(ns):
    """The segments go to the queue (nobody reads it here: the kernel drops them), so a
    connect to the listened port times out while the port next to it answers."""
    res = run_in_ns(
        ns,
        """
        rules.install([("127.0.0.1", 10000)])
        def tries(port):
            srv = socket.create_server(("127.0.0.1", port))
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                return "connected"
            except OSError as exc:
                return type(exc).__name__
            finally:
                srv.close()
        out["ctcp"] = tries(10000)
        out["other"] = tries(10001)
        rules.remove()
        out["after_remove"] = tries(10000)
        """,
    )
    assert res == {"ctcp": "TimeoutError", "other": "connected", "after_remove": "connected"}
