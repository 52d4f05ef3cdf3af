"""Tests for remote_addrs_from_conns: which addresses of charon's get-conns answer are steered.

The input is shaped like the vici package's list_conns(): one dict per connection, the name
as key, values as bytes. Name resolution is replaced by a table (no DNS traffic), except
for "localhost", which /etc/hosts answers.
"""

from __future__ import annotations

import socket

import pytest

from vici_bridge import resolve
from vici_bridge.resolve import remote_addrs_from_conns


def conn(name: str, *remote: str, **extra: object) -> dict[str, dict[str, object]]:
    body: dict[str, object] = {
        "local_addrs": [b"%any"],
        "version": b"2",
        "children": {"net": {"mode": b"TUNNEL"}},
        **extra,
    }
    if remote:
        body["remote_addrs"] = [r.encode() for r in remote]
    return {name: body}


FAKE_DNS = {
    "gw.example": ["198.19.0.7", "fd00:19::7", "198.19.0.7"],
    "vpn-gw.example": ["198.19.0.8"],
}


def fake_getaddrinfo(host, port, *args, **kwargs):
    """getaddrinfo over FAKE_DNS, one entry per address like the real one."""
    if host not in FAKE_DNS:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    out = []
    for addr in FAKE_DNS[host]:
        if ":" in addr:
            out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (addr, 0, 0, 0)))
        else:
            out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, 0)))
    return out


@pytest.fixture
def fake_dns(monkeypatch):
    monkeypatch.setattr(resolve.socket, "getaddrinfo", fake_getaddrinfo)


def test_literal_addresses_of_the_named_connections(fake_dns):
    conns = [
        conn("home", "198.19.0.2", "fd00:19::2"),
        conn("office", "198.19.0.3"),
        conn("other", "198.19.0.4"),
    ]
    assert remote_addrs_from_conns(conns, ["home", "office"]) == {
        "home": ["198.19.0.2", "fd00:19::2"],
        "office": ["198.19.0.3"],
    }


def test_addresses_are_normalised(fake_dns):
    conns = [conn("home", "FD00:0019:0000::0002", "fd00:19:0:0:0:0:0:3")]
    assert remote_addrs_from_conns(conns, ["home"]) == {"home": ["fd00:19::2", "fd00:19::3"]}


def test_str_values_work_as_well_as_bytes(fake_dns):
    conns = [{"home": {"remote_addrs": ["198.19.0.2"]}}]
    assert remote_addrs_from_conns(conns, ["home"]) == {"home": ["198.19.0.2"]}


def test_unnamed_and_unloaded_connections(fake_dns):
    conns = [conn("home", "198.19.0.2")]
    found = remote_addrs_from_conns(conns, ["away"])
    assert found == {}  # not loaded in charon: absent, so the caller can warn
    assert remote_addrs_from_conns(conns, []) == {}
    assert remote_addrs_from_conns([], ["home"]) == {}


def test_connection_without_remote_addrs_gives_an_empty_list(fake_dns):
    assert remote_addrs_from_conns([conn("home")], ["home"]) == {"home": []}


@pytest.mark.parametrize(
    "raw",
    [
        "%any",
        "%any6",
        "198.19.0.0/24",
        "fd00:19::/64",
        "198.19.0.1-198.19.0.9",
        "fd00:19::1-fd00:19::9",
    ],
)
def test_wildcards_subnets_and_ranges_are_not_steered(fake_dns, raw):
    conns = [conn("home", raw, "198.19.0.2")]
    assert remote_addrs_from_conns(conns, ["home"]) == {"home": ["198.19.0.2"]}


def test_host_names_are_resolved_sorted_and_deduplicated(fake_dns):
    found = remote_addrs_from_conns([conn("home", "gw.example")], ["home"])
    assert found == {"home": ["198.19.0.7", "fd00:19::7"]}


def test_unresolvable_name_is_skipped(fake_dns):
    conns = [conn("home", "nowhere.example", "198.19.0.2")]
    assert remote_addrs_from_conns(conns, ["home"]) == {"home": ["198.19.0.2"]}


def test_hostname_with_hyphen_is_resolved_not_taken_for_a_range(fake_dns):
    """DNS names may contain '-' (and the config accepts them): only ADDR-ADDR is a range."""
    conns = [conn("home", "vpn-gw.example")]
    assert remote_addrs_from_conns(conns, ["home"]) == {"home": ["198.19.0.8"]}


def test_localhost_resolves_through_the_system_resolver():
    found = remote_addrs_from_conns([conn("lo", "localhost")], ["lo"])
    assert "127.0.0.1" in found["lo"]
    assert found["lo"] == sorted(set(found["lo"]))
