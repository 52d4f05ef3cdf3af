"""tcpencap.aio.tls: the SSL contexts read from an operator's files (certificates made for
the test, in a temporary directory) and the fronts built from them; a reload that cannot
read the files keeps the contexts in use."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from tcpencap.aio.tls import Fronts, client_context, server_context
from tcpencap.config import Config, ConnectionConfig, GatewayConfig
from tcpencap.core.reload import ConnIntent
from tcpencap.wire.packet import addr_bytes
from tests.tls_helpers import ServerCert, make_server_cert

PEER = addr_bytes("198.19.0.2")
OTHER = addr_bytes("198.19.0.3")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return make_server_cert(tmp_path_factory.mktemp("tls"))


def gateway(certs: ServerCert, **kw: object) -> GatewayConfig:
    return GatewayConfig(
        tls_listen=(("0.0.0.0", 443),), tls_cert=str(certs.cert), tls_key=str(certs.key), **kw
    )


def config(
    gw: GatewayConfig | None = None, *conns: ConnectionConfig, timeout: float = 5.0
) -> Config:
    return Config(
        gateway=gw or GatewayConfig(),
        connections={c.name: c for c in conns},
        tls_handshake_timeout=timeout,
    )


def intents(*conns: ConnectionConfig, peers: tuple[bytes, ...] = (PEER,)) -> dict[str, ConnIntent]:
    return {c.name: ConnIntent(c.name, "rfc9329", "tcp", peers, 443) for c in conns}


# --- the contexts ----------------------------------------------------------------------------


def test_the_server_context_speaks_tls_13_only_and_gives_no_tickets(certs: ServerCert) -> None:
    ctx = server_context(gateway(certs))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3 and ctx.num_tickets == 0


def test_a_missing_key_is_an_oserror(certs: ServerCert, tmp_path: Path) -> None:
    gw = GatewayConfig(tls_cert=str(certs.cert), tls_key=str(tmp_path / "absent.key"))
    with pytest.raises(OSError):
        server_context(gw)


def test_the_client_checks_a_ca_file_a_pin_alone_or_the_systems_cas(certs: ServerCert) -> None:
    with_ca = client_context(ConnectionConfig("a", tls=True, tls_ca=str(certs.ca)))
    assert with_ca.verify_mode == ssl.CERT_REQUIRED and with_ca.check_hostname
    assert with_ca.cert_store_stats()["x509_ca"] == 1  # that CA, nothing else
    pin_only = client_context(ConnectionConfig("a", tls=True, tls_pin=b"\1" * 32))
    assert pin_only.verify_mode == ssl.CERT_NONE and not pin_only.check_hostname
    for ctx in (with_ca, pin_only):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3


def test_without_ca_or_pin_the_client_trusts_the_systems_cas(
    certs: ServerCert, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The system's CAs, as OpenSSL finds them: here pointed at the test's CA alone."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    system = client_context(ConnectionConfig("a", tls=True))
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname
    assert system.cert_store_stats()["x509_ca"] == 1
    assert system.minimum_version == ssl.TLSVersion.TLSv1_3


# --- Fronts: configure and reload ----------------------------------------------------------------


def test_a_gateway_without_tls_listeners_has_no_server_context(certs: ServerCert) -> None:
    fronts = Fronts()
    assert fronts.configure(config(gateway(certs))) == []
    assert fronts.server is not None
    assert fronts.configure(config(GatewayConfig(listen=(("0.0.0.0", 4500),)))) == []
    assert fronts.server is None


def test_a_reload_that_cannot_read_the_certificate_keeps_the_one_in_use(
    certs: ServerCert, tmp_path: Path
) -> None:
    fronts = Fronts()
    fronts.configure(config(gateway(certs)))
    in_use = fronts.server
    broken = GatewayConfig(tls_listen=(("0.0.0.0", 443),), tls_cert=str(tmp_path / "gone.pem"),
                           tls_key=str(certs.key))  # fmt: skip
    (error,) = fronts.configure(config(broken))
    assert error.startswith(f"cannot load tls_cert {tmp_path / 'gone.pem'} / tls_key")
    assert error.endswith("(keeping the certificate in use)")
    assert fronts.server is in_use


def test_a_first_start_without_a_readable_certificate_has_no_context(tmp_path: Path) -> None:
    fronts = Fronts()
    broken = GatewayConfig(tls_listen=(("0.0.0.0", 443),), tls_cert=str(tmp_path / "c"),
                           tls_key=str(tmp_path / "k"))  # fmt: skip
    (error,) = fronts.configure(config(broken))
    assert "keeping" not in error and fronts.server is None


def test_a_client_whose_ca_becomes_unreadable_keeps_its_context(
    certs: ServerCert, tmp_path: Path
) -> None:
    good = ConnectionConfig("vpn", tls=True, tls_ca=str(certs.ca))
    bad = ConnectionConfig("vpn", tls=True, tls_ca=str(tmp_path / "gone.pem"))
    fronts = Fronts()
    assert fronts.configure(config(None, good)) == []
    (error,) = fronts.configure(config(None, bad))
    assert error.startswith(f"connection vpn: cannot load tls_ca {tmp_path / 'gone.pem'}")
    assert fronts.client_front(0.0, PEER, intents(bad)) is not None  # the old context
    fresh = Fronts()
    assert len(fresh.configure(config(None, bad))) == 1
    with pytest.raises(OSError, match="connection vpn: no TLS context"):
        fresh.client_front(0.0, PEER, intents(bad))  # never carried without TLS


# --- Fronts: the front of a connection ------------------------------------------------------------


def test_a_client_front_speaks_tls_to_its_connections_peers_only(certs: ServerCert) -> None:
    tls = ConnectionConfig("vpn", tls=True, tls_ca=str(certs.ca), tls_sni="vpn.lab.test")
    plain = ConnectionConfig("plain")
    fronts = Fronts()
    assert fronts.client_front(0.0, PEER, intents(tls)) is None  # not configured yet
    fronts.configure(config(None, tls, plain, timeout=7.0))
    front = fronts.client_front(10.0, PEER, intents(tls, plain))
    assert front is not None and front.tls and not front.server_side
    assert front.deadline == 17.0  # tls_handshake_timeout from now
    assert front._tls is not None and front._tls.server_hostname == "vpn.lab.test"
    assert front.data_to_send()[:1] == b"\x16"  # a TLS handshake record: the ClientHello
    assert fronts.client_front(0.0, OTHER, intents(tls, plain)) is None
    assert fronts.client_front(0.0, PEER, intents(plain)) is None


def test_without_sni_the_client_names_the_peer_address_and_keeps_the_pin(certs: ServerCert) -> None:
    conn = ConnectionConfig("vpn", tls=True, tls_pin=b"\2" * 32)
    fronts = Fronts()
    fronts.configure(config(None, conn))
    front = fronts.client_front(0.0, PEER, intents(conn))
    assert front is not None and front._tls is not None
    assert front._tls.server_hostname == "198.19.0.2" and front._pin == b"\2" * 32


def test_a_plain_listener_without_proxies_needs_no_front(certs: ServerCert) -> None:
    fronts = Fronts()
    fronts.configure(config(gateway(certs)))
    assert fronts.server_front(0.0, "198.18.1.2", False) == (None, False)
    front, proxied = fronts.server_front(0.0, "198.18.1.2", True)
    assert front is not None and front.server_side and not proxied


def test_proxies_are_trusted_by_network_and_every_other_connection_gets_a_front(
    certs: ServerCert,
) -> None:
    fronts = Fronts()
    nets = ("10.0.0.0/8", "fd00:1::/64")
    fronts.configure(config(GatewayConfig(proxy_protocol_from=nets), timeout=6.5))
    assert fronts.proxied("10.200.0.1") and fronts.proxied("fd00:1::5")
    assert not fronts.proxied("11.0.0.1") and not fronts.proxied("fd00:2::5")
    front, proxied = fronts.server_front(3.0, "10.0.0.9", False)
    assert front is not None and proxied
    assert front.deadline == 3.0 + 6.5  # the proxy gets tls_handshake_timeout for its header
    # from anyone else, a front too: it refuses a PROXY header by name
    stranger, proxied = fronts.server_front(0.0, "198.18.1.2", False)
    assert stranger is not None and not proxied and not stranger.tls


def test_without_proxies_nobody_is_proxied() -> None:
    fronts = Fronts()
    fronts.configure(config())
    assert not fronts.proxied("10.0.0.1")
