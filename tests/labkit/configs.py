"""The configuration texts the lab writes: swanctl.conf for a tunnel between two lab hosts
(PSK or certificates) and tcpencap.conf for a host's daemon."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pki import Pki
    from .topology import Host

# A cert_conf text names its private key in this comment; Charon.load copies the key.
KEY_MARK = "# lab-key: "


def default_name(local: Host, remote: Host) -> str:
    """Connection and child name used by both peers: roles sorted, e.g. ``c1-gw``."""
    return "-".join(sorted((local.role, remote.role)))


def ike_id(host: Host) -> str:
    """The FQDN identity of a host in the generated configs."""
    return f"{host.role}.lab.test"


def _ts(host: Host) -> str:
    return f"{host.inner4}/32,{host.inner6}/128"


def _conn(
    name: str,
    local: Host,
    remote: Host,
    family: int,
    local_auth: str,
    remote_auth: str,
    mobike: bool,
    remote_port: int | None,
    proposals: str,
    esp_proposals: str,
) -> str:
    port = f"\n    remote_port = {remote_port}" if remote_port is not None else ""
    return f"""connections {{
  {name} {{
    version = 2
    local_addrs = {local.outer(family)}
    remote_addrs = {remote.outer(family)}{port}
    encap = yes
    mobike = {"yes" if mobike else "no"}
    proposals = {proposals}
    local {{
{local_auth}
    }}
    remote {{
{remote_auth}
    }}
    children {{
      {name} {{
        local_ts = {_ts(local)}
        remote_ts = {_ts(remote)}
        esp_proposals = {esp_proposals}
      }}
    }}
  }}
}}
"""


def psk_conf(
    local: Host,
    remote: Host,
    family: int = 4,
    psk: str = "lab-shared-secret-0123456789",
    name: str | None = None,
    mobike: bool = True,
    remote_port: int | None = None,
    proposals: str = "default",
    esp_proposals: str = "default",
) -> str:
    """swanctl.conf for ``local``: IKEv2 PSK tunnel between the inner addresses of both peers,
    over their outer IPv4 or IPv6 addresses, with forced UDP encapsulation."""
    name = name or default_name(local, remote)
    lid, rid = ike_id(local), ike_id(remote)
    conn = _conn(
        name,
        local,
        remote,
        family,
        f"      auth = psk\n      id = {lid}",
        f"      auth = psk\n      id = {rid}",
        mobike,
        remote_port,
        proposals,
        esp_proposals,
    )
    return (
        conn
        + f"""secrets {{
  ike-{name} {{
    id-a = {lid}
    id-b = {rid}
    secret = "{psk}"
  }}
}}
"""
    )


def cert_conf(
    local: Host,
    remote: Host,
    cert: Pki,
    ca: Pki,
    family: int = 4,
    remote_id: str | None = None,
    name: str | None = None,
    mobike: bool = True,
    remote_port: int | None = None,
    proposals: str = "default",
    esp_proposals: str = "default",
) -> str:
    """swanctl.conf for ``local``: like psk_conf, authenticated with ``cert`` (identity =
    its SAN); the peer must present a certificate from ``ca`` for ``remote_id`` (default
    ``ike_id(remote)``). Certificates are referenced by absolute path; swanctl only loads
    private keys from its private/ directory, so the key path goes into a ``# lab-key:``
    comment that Charon.load copies from."""
    name = name or default_name(local, remote)
    rid = remote_id or ike_id(remote)
    conn = _conn(
        name,
        local,
        remote,
        family,
        f"      auth = pubkey\n      id = {cert.identity}\n      certs = {cert.cert_path}",
        f"      auth = pubkey\n      id = {rid}\n      cacerts = {ca.cert_path}",
        mobike,
        remote_port,
        proposals,
        esp_proposals,
    )
    return f"{KEY_MARK}{cert.key_path}\n" + conn


def tcpencap_conf(
    host: Host,
    *,
    listen: Iterable[str] = (),
    connections: dict[str, int | dict[str, str]] | None = None,
    extra: str = "",
    gateway_extra: str = "",
) -> str:
    """tcpencap.conf for ``host``: its charon's VICI socket, a control socket in the host dir,
    gateway listeners (``ADDR:PORT``, IPv6 in brackets) and client connections
    (swanctl name -> remote TCP port, or -> that connection's settings)."""
    assert host.charon is not None, "start charon first"
    conns = ""
    for name, value in (connections or {}).items():
        settings = {"remote_port": str(value)} if isinstance(value, int) else value
        body = "".join(f"      {k} = {v}\n" for k, v in settings.items())
        conns += f"    {name} {{\n{body}    }}\n"
    return f"""tcpencap {{
  vici_socket = {host.charon.uri}
  status_socket = {host.dir}/tcpencap.ctl
{extra}
  gateway {{
    listen = {", ".join(listen)}
{gateway_extra}
  }}
  connections {{
{conns}  }}
}}
"""
