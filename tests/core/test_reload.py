"""tcpencap.core.reload: a reload as a plan, from one configuration's intent to the next
(pure: the tests build intents and compare the operations)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpencap.config import parse_config
from tcpencap.core import reload as plans
from tcpencap.wire.packet import addr_bytes
from tests.core.test_rfc9329_engine import client_config


def test_reload_changed_ctcp_connection_replans_the_ctcp_peers() -> None:
    def ctcp(addr: str, port: int) -> Any:
        return parse_config(
            "tcpencap {\n connections {\n  cisco {\n   encapsulation = ctcp\n"
            f"   remote_addrs = {addr}\n   remote_port = {port}\n  }}\n }}\n}}\n"
        )

    old = plans.intent_of(ctcp("198.18.0.3", 10000))
    new = plans.intent_of(ctcp("198.18.0.4", 10443))
    ops = plans.plan(old, new)
    assert plans.CtcpPeers({addr_bytes("198.18.0.4"): 10443}) in ops
    assert plans.plan(new, new) == []


def test_reload_steers_before_it_unsteers() -> None:
    """tcp -> fallback for the same peer: the plan watches first and unsteers last, so
    no packet of an existing SA is sent as UDP while the plan runs."""
    old = plans.intent_of(client_config("tcp"))
    new = plans.intent_of(client_config("fallback"))
    ops = plans.plan(old, new)
    assert [type(o) for o in ops] == [plans.WatchFallback, plans.UnsteerTcp]


def test_unresolved_names_what_charon_must_be_asked_for() -> None:
    def conf(addrs: str, port: int = 4500) -> Any:
        line = f"   remote_addrs = {addrs}\n" if addrs else ""
        return parse_config(
            "tcpencap {\n connections {\n"
            f"  a {{\n{line}   remote_port = {port}\n  }}\n"
            "  b {\n   remote_addrs = 198.19.0.9\n  }\n"
            "  u {\n   transport = udp\n  }\n }\n}\n"
        )

    assert plans.unresolved(conf("")) == ["a"]  # b has addresses, u is not carried
    assert plans.unresolved(conf(""), conf(""), {"a": ["198.19.0.2"]}) == []
    assert plans.unresolved(conf("", 443), conf(""), {"a": ["198.19.0.2"]}) == ["a"]


# --- the plan's order, for any pair of intents ---------------------------------------------

PEERS = st.sampled_from([addr_bytes("198.19.0.2"), addr_bytes("198.19.0.3"), addr_bytes("fd00::2")])
CONN = st.builds(
    plans.ConnIntent,
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from(["rfc9329", "ctcp"]),
    st.sampled_from(["tcp", "fallback"]),
    st.lists(PEERS, max_size=2, unique=True).map(tuple),
    st.sampled_from([443, 4500, 10000]),
    st.sampled_from([2.0, 5.0]),
)
ENDPOINT = st.tuples(st.sampled_from(["0.0.0.0", "198.19.0.2", "::", "fd00::2"]),
                     st.sampled_from([443, 4500]))  # fmt: skip
INTENT = st.builds(
    plans.Intent,
    st.lists(CONN, max_size=3).map(lambda cs: {c.name: c for c in cs}),
    st.lists(ENDPOINT, max_size=2, unique=True).map(tuple),
    st.just(()),
    st.lists(ENDPOINT, max_size=2, unique=True).map(tuple),
    st.sampled_from([(("queue_num", 4500),), (("queue_num", 4501),)]),
).filter(lambda i: not set(i.listen) & set(i.tls_listen))  # one listener per endpoint
STARTS = (plans.Listen, plans.SteerTcp, plans.WatchFallback, plans.CtcpPeers)
STOPS = (plans.UnsteerTcp, plans.UnwatchFallback)


@given(INTENT)
def test_the_same_intent_plans_nothing(intent: plans.Intent) -> None:
    assert plans.plan(intent, intent) == []


@given(INTENT, INTENT)
def test_everything_starts_before_anything_stops(old: plans.Intent, new: plans.Intent) -> None:
    """Steering is added before it is removed; a listener stops early only when a new one
    would take its port (the kernel refuses the second bind)."""
    ops = plans.plan(old, new)
    kinds = [type(o) for o in ops]
    last_start = max((i for i, k in enumerate(kinds) if k in STARTS), default=-1)
    first_stop = min((i for i, k in enumerate(kinds) if k in STOPS), default=len(ops))
    assert last_start < first_stop, ops
    for i, op in enumerate(ops):
        if isinstance(op, plans.StopListening) and i < last_start:
            new_eps = (*new.listen, *new.tls_listen)
            assert any(plans.endpoints_overlap((op.host, op.port), n) for n in new_eps), ops


@given(INTENT, INTENT)
def test_the_plan_reaches_the_new_intent(old: plans.Intent, new: plans.Intent) -> None:
    """Running the plan on what ``old`` set up gives what ``new`` wants."""
    listening = {(h, p, False) for h, p in old.listen} | {(h, p, True) for h, p in old.tls_listen}
    steered = {n for n, c in old.connections.items() if plans._rfc9329(c, "tcp")}
    watched = {n for n, c in old.connections.items() if plans._rfc9329(c, "fallback")}
    ctcp = old.ctcp_peers()
    for op in plans.plan(old, new):
        if isinstance(op, plans.Listen):
            listening.add((op.host, op.port, op.tls))
        elif isinstance(op, plans.StopListening):
            listening -= {(op.host, op.port, False), (op.host, op.port, True)}
        elif isinstance(op, plans.SteerTcp):
            steered.add(op.name)
        elif isinstance(op, plans.UnsteerTcp):
            steered.discard(op.name)
        elif isinstance(op, plans.WatchFallback):
            watched.add(op.name)
        elif isinstance(op, plans.UnwatchFallback):
            watched.discard(op.name)
        elif isinstance(op, plans.CtcpPeers):
            ctcp = op.peers
    want = {(h, p, False) for h, p in new.listen} | {(h, p, True) for h, p in new.tls_listen}
    # an endpoint both old and new (in either kind) may stay listening as it was
    assert listening >= want and all(
        (h, p) in {(x, y) for x, y, _ in want} for h, p, _ in listening
    )
    assert steered == {n for n, c in new.connections.items() if plans._rfc9329(c, "tcp")}
    assert watched == {n for n, c in new.connections.items() if plans._rfc9329(c, "fallback")}
    assert ctcp == new.ctcp_peers()


def test_a_listener_changing_kind_stops_before_it_starts_again() -> None:
    old = plans.Intent(listen=(("0.0.0.0", 443),))
    new = plans.Intent(tls_listen=(("0.0.0.0", 443),))
    assert plans.plan(old, new) == [
        plans.StopListening("0.0.0.0", 443),
        plans.Listen("0.0.0.0", 443, True),
    ]


def test_a_restart_only_setting_is_a_notice() -> None:
    old = plans.Intent(restart_only=(("queue_num", 4500),))
    new = plans.Intent(restart_only=(("queue_num", 4501),))
    assert plans.plan(old, new) == [plans.Notice("queue_num changes only on restart")]


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        (("0.0.0.0", 443), ("198.19.0.2", 443), True),
        (("198.19.0.2", 443), ("0.0.0.0", 443), True),
        (("198.19.0.2", 443), ("198.19.0.2", 443), True),
        (("198.19.0.2", 443), ("198.19.0.3", 443), False),
        (("0.0.0.0", 443), ("0.0.0.0", 4500), False),
        (("::", 443), ("198.19.0.2", 443), False),  # another family
        (("::", 443), ("fd00::2", 443), True),
    ],
)
def test_endpoints_overlap(a: tuple[str, int], b: tuple[str, int], overlap: bool) -> None:
    assert plans.endpoints_overlap(a, b) is overlap


# --- the intent of a configuration ---------------------------------------------------------


def test_intent_skips_udp_connections_and_names_that_are_not_addresses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = parse_config(
        "tcpencap {\n connections {\n"
        "  a {\n   remote_addrs = 198.19.0.2, vpn.example.org, 198.19.0.2\n  }\n"
        "  u {\n   remote_addrs = 198.19.0.5\n   transport = udp\n  }\n"
        "  r {\n   remote_port = 443\n  }\n }\n}\n"
    )
    with caplog.at_level(logging.WARNING, "tcpencap"):
        intent = plans.intent_of(
            cfg, {"r": ["fd00::9", "nonsense", "fd00::9"], "a": ["198.19.0.7"]}
        )
    assert set(intent.connections) == {"a", "r"}
    # the configured addresses win over get-conns'; each once
    assert intent.connections["a"].peers == (addr_bytes("198.19.0.2"),)
    assert intent.connections["r"].peers == (addr_bytes("fd00::9"),)
    assert intent.connections["r"].port == 443
    assert "'vpn.example.org' is not an address" in caplog.text
    assert "'nonsense' is not an address" in caplog.text


def test_a_connection_without_an_address_is_kept_and_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = parse_config("tcpencap {\n connections {\n  r {\n   remote_port = 443\n  }\n }\n}\n")
    with caplog.at_level(logging.WARNING, "tcpencap"):
        intent = plans.intent_of(cfg)
    assert intent.connections["r"].peers == ()
    assert "connection r: no remote address known" in caplog.text


def test_restart_only_names_every_setting_a_reload_cannot_change() -> None:
    keys = [k for k, _ in plans.restart_only(client_config())]
    assert keys == [*plans.RESTART_ONLY, "ctcp_listen"]


def test_describe_says_each_operation_in_one_line() -> None:
    p4, p6 = addr_bytes("198.19.0.2"), addr_bytes("fd00::2")
    assert [
        plans.describe(op)
        for op in (
            plans.Notice("x changes only on restart"),
            plans.Listen("::", 443, True),
            plans.StopListening("198.19.0.2", 4500),
            plans.SteerTcp("a", (p4, p6), 4500),
            plans.WatchFallback("a", (p4,), 443, 2.5),
            plans.UnwatchFallback("a"),
            plans.UnsteerTcp("a"),
            plans.CtcpPeers({}),
            plans.CtcpPeers({p4: 10000}),
        )
    ] == [
        "x changes only on restart",
        "listening on [::]:443 (TLS)",
        "stopped listening on 198.19.0.2:4500",
        "connection a: TCP port 4500 to 198.19.0.2, fd00::2",
        "connection a: UDP first, TCP port 443 after 2.5s",
        "connection a: no longer UDP-first with fallback",
        "connection a: no longer over TCP",
        "cTCP peers: none",
        "cTCP peers: 198.19.0.2",
    ]
