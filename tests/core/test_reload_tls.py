"""The reload plan (tcpencap/core/reload.py) of TLS listeners: added, removed, unchanged, and
an endpoint that changes kind or moves onto an overlapping address stopping first."""

from __future__ import annotations

import pytest

from tcpencap.core import reload as plans
from tests.config_text import (
    gateway,
    tls_gateway,
)


def intent(*lines: str) -> plans.Intent:
    return plans.intent_of(tls_gateway(*lines))


def test_intent_carries_the_tls_listeners() -> None:
    i = intent("listen = 0.0.0.0:4500", "tls_listen = 0.0.0.0:443, [::]:443")
    assert i.tls_listen == (("0.0.0.0", 443), ("::", 443))
    assert i.listen == (("0.0.0.0", 4500),)
    assert plans.Listen("h", 1) == plans.Listen("h", 1, False) != plans.Listen("h", 1, True)


def test_adding_a_tls_listener_listens_with_tls() -> None:
    old = intent("listen = 0.0.0.0:4500")
    new = intent("listen = 0.0.0.0:4500", "tls_listen = 0.0.0.0:443, [::]:443")
    ops = plans.plan(old, new)
    assert ops == [plans.Listen("0.0.0.0", 443, True), plans.Listen("::", 443, True)]
    assert [plans.describe(o) for o in ops] == [
        "listening on 0.0.0.0:443 (TLS)",
        "listening on [::]:443 (TLS)",
    ]
    # the first start: everything from nothing
    ops = plans.plan(plans.Intent(restart_only=new.restart_only), new)
    assert ops == [
        plans.Listen("0.0.0.0", 4500, False),
        plans.Listen("0.0.0.0", 443, True),
        plans.Listen("::", 443, True),
    ]
    assert plans.describe(ops[0]) == "listening on 0.0.0.0:4500"


def test_removing_a_tls_listener_stops_it() -> None:
    old = intent("listen = 0.0.0.0:4500", "tls_listen = 0.0.0.0:443, [::]:443")
    new = intent("listen = 0.0.0.0:4500", "tls_listen = [::]:443")
    ops = plans.plan(old, new)
    assert ops == [plans.StopListening("0.0.0.0", 443)]
    assert plans.describe(ops[0]) == "stopped listening on 0.0.0.0:443"
    assert plans.plan(new, intent()) == [
        plans.StopListening("0.0.0.0", 4500),
        plans.StopListening("::", 443),
    ]


def test_unchanged_tls_listeners_give_no_operation() -> None:
    lines = ("listen = 0.0.0.0:4500", "tls_listen = 198.19.0.2:443, [::]:443")
    assert plans.plan(intent(*lines), intent(*lines)) == []
    # the certificate is the front's business (re-read on reload), not a listener change
    other_cert = plans.intent_of(
        gateway(*lines, "tls_cert = /etc/other.crt", "tls_key = /etc/other.key")
    )
    assert plans.plan(intent(*lines), other_cert) == []
    # nor is the order of the list
    reordered = intent(lines[0], "tls_listen = [::]:443, 198.19.0.2:443")
    assert plans.plan(intent(*lines), reordered) == []


@pytest.mark.parametrize(
    "before,after,tls",
    [
        ("listen", "tls_listen", True),
        ("tls_listen", "listen", False),
    ],
)
def test_an_endpoint_that_changes_kind_stops_before_it_listens(
    before: str, after: str, tls: bool
) -> None:
    old = intent(f"{before} = 198.19.0.2:443")
    new = intent(f"{after} = 198.19.0.2:443")
    ops = plans.plan(old, new)
    assert ops == [plans.StopListening("198.19.0.2", 443), plans.Listen("198.19.0.2", 443, tls)]
    assert plans.describe(ops[1]).endswith(" (TLS)") is tls


TF = (True, False)


def test_moves_among_other_changes_keep_one_socket_per_endpoint() -> None:
    old = intent(
        "listen = 0.0.0.0:4500, 198.19.0.2:443, [::]:4500",
        "tls_listen = 198.19.0.2:8443, [::]:443",
    )
    new = intent(
        "listen = 0.0.0.0:4500, 198.19.0.2:8443, 198.19.0.2:9000",
        "tls_listen = 198.19.0.2:443, [::]:443, [::]:8443",
    )
    ops = plans.plan(old, new)
    moved = [("198.19.0.2", 443), ("198.19.0.2", 8443)]
    for h, p in moved:
        stop = ops.index(plans.StopListening(h, p))
        (start,) = [i for i, o in enumerate(ops) if o in (plans.Listen(h, p, t) for t in TF)]
        assert stop < start
    assert plans.Listen("198.19.0.2", 443, True) in ops
    assert plans.Listen("198.19.0.2", 8443, False) in ops
    assert plans.Listen("198.19.0.2", 9000, False) in ops
    assert plans.Listen("::", 8443, True) in ops
    # [::]:4500 is gone, and only after everything new listens
    assert ops[-1] == plans.StopListening("::", 4500)
    # each endpoint is stopped and opened at most once; kept ones are untouched
    stops = [(o.host, o.port) for o in ops if isinstance(o, plans.StopListening)]
    starts = [(o.host, o.port) for o in ops if isinstance(o, plans.Listen)]
    assert sorted(stops) == sorted([*moved, ("::", 4500)])
    assert len(starts) == len(set(starts)) == 4
    assert ("0.0.0.0", 4500) not in stops + starts and ("::", 443) not in stops + starts
    assert len(ops) == 7


def test_a_listener_moving_to_an_overlapping_address_stops_first() -> None:
    """0.0.0.0:4500 (plain) -> 127.0.0.1:4500 (TLS): the kernel refuses the new bind while
    the wildcard socket exists, so the old one must close first."""
    old = plans.Intent(listen=(("0.0.0.0", 4500),))
    new = plans.Intent(tls_listen=(("127.0.0.1", 4500),))
    assert plans.plan(old, new) == [
        plans.StopListening("0.0.0.0", 4500),
        plans.Listen("127.0.0.1", 4500, True),
    ]
    other_port = plans.Intent(tls_listen=(("127.0.0.1", 4443),))
    assert plans.plan(old, other_port) == [
        plans.Listen("127.0.0.1", 4443, True),
        plans.StopListening("0.0.0.0", 4500),
    ]
