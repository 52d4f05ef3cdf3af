"""The lab's reading of ping's output (tests.labkit.topology.unanswered_in): which of the first
N echo requests got a reply. Pure text, no namespace."""

from __future__ import annotations

from tests.labkit.topology import unanswered_in

HEAD = "PING 198.19.200.6 (198.19.200.6) from 198.18.201.6 : 56(84) bytes of data.\n"


def reply(seq: int, dup: bool = False) -> str:
    tail = " (DUP!)" if dup else ""
    return f"64 bytes from 198.19.200.6: icmp_seq={seq} ttl=64 time=31.2 ms{tail}\n"


def stats(sent: int, received: int) -> str:
    return (
        "\n--- 198.19.200.6 ping statistics ---\n"
        f"{sent} packets transmitted, {received} received, time 45ms\n"
    )


def test_all_answered() -> None:
    assert unanswered_in(HEAD + reply(1) + reply(2) + stats(2, 2), 2) == []


def test_a_late_reply_is_not_a_loss() -> None:
    """ping -c 2 -w 3 sent a third request before the second reply came, then exited on the
    second reply: (3, 2), the count CI failed on, with nothing lost."""
    assert unanswered_in(HEAD + reply(1) + reply(2) + stats(3, 2), 2) == []


def test_a_lost_request_is_named() -> None:
    """The same counts, (3, 2), when request 2 was lost and request 3 answered."""
    assert unanswered_in(HEAD + reply(1) + reply(3) + stats(3, 2), 2) == [2]


def test_an_icmp_error_answers_nothing() -> None:
    out = HEAD + reply(1) + "From 198.18.1.1 icmp_seq=2 Destination Host Unreachable\n"
    assert unanswered_in(out + stats(2, 1), 2) == [2]


def test_nothing_answered() -> None:
    assert unanswered_in(HEAD + stats(3, 0), 3) == [1, 2, 3]


def test_duplicates_and_ipv6() -> None:
    v6 = "64 bytes from fd00:200::1: icmp_seq=1 ttl=64 time=0.9 ms\n"
    assert unanswered_in(v6 + reply(1, dup=True) + stats(1, 1), 1) == []
    assert unanswered_in(reply(1, dup=True) + stats(2, 1), 2) == [2]
