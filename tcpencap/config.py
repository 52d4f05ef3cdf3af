"""The tcpencap configuration model, read from a strongswan.conf-style file.

Settings live in a top-level ``tcpencap { }`` section (by default in
/etc/strongswan.d/tcpencap.conf), keyed by swanctl connection names, because charon rejects
unknown keys inside swanctl.conf connections. Other top-level sections are ignored, except
that ``charon.plugins.vici.socket`` is the default for ``tcpencap.vici_socket``. Checking is
strict: any unknown key or section and any bad value raises ConfigError naming the file,
line and dotted key, so a typo cannot silently turn TCP encapsulation off. An empty value
(``key =``) means the default, as in strongSwan.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

from tcpencap.confparse import ConfError, FileReader, Reader, Section, Setting, parse
from tcpencap.core.outputs import bracket
from tcpencap.core.reload import endpoints_overlap

DEFAULT_PATH = "/etc/strongswan.d/tcpencap.conf"
DEFAULTS_SOURCE = "(defaults)"
DEFAULT_VICI_SOCKET = "unix:///var/run/charon.vici"
DEFAULT_STATUS_SOCKET = "/run/tcpencap/tcpencap.ctl"
DEFAULT_REMOTE_PORT = {"rfc9329": 4500, "ctcp": 10000}  # Cisco's cTCP default is 10000
VICI_FALLBACK_KEY = "charon.plugins.vici.socket"

LOG_LEVELS = ("debug", "info", "warning", "error")
INJECT_MODES = ("raw",)
DATAPATHS = ("auto", "native", "python")
TRANSPORTS = ("tcp", "fallback", "udp")
ENCAPSULATIONS = ("rfc9329", "ctcp")


class ConfigError(ConfError):
    """A setting that is unknown or has a bad value."""


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    """TCP settings for one swanctl connection. An empty ``remote_addrs`` means: ask charon
    (VICI get-conns) for the connection's remote_addrs."""

    name: str
    remote_port: int = DEFAULT_REMOTE_PORT["rfc9329"]
    transport: str = "tcp"  # tcp | fallback | udp
    encapsulation: str = "rfc9329"  # rfc9329 | ctcp
    remote_addrs: tuple[str, ...] = ()
    fallback_timeout: float = 5.0  # transport = fallback: UDP gets this long to answer
    # TLS beneath the prefix (RFC 9329 Appendix A). The server certificate is checked
    # against tls_ca (else the system's CAs) for tls_sni (else the peer address), and, with
    # tls_pin, its SHA-256 must match as well (tls_pin alone: only the pin is checked).
    tls: bool = False
    tls_ca: str = ""
    tls_pin: bytes | None = None
    tls_sni: str = ""


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """TCP originator settings; ``port`` 0 picks a random port in ``port_range``."""

    port: int = 0
    port_range: tuple[int, int] = (32768, 60999)
    connect_timeout: float = 5.0
    ctcp_keepalive: float = 20.0  # a cTCP keepalive after this long without sending


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """TCP responder settings; no ``listen`` addresses means this host is not a gateway."""

    listen: tuple[tuple[str, int], ...] = ()
    max_connections: int = 1000
    max_per_source: int = 32  # connections from one source prefix
    max_pending: int = 256  # connections that have not yet delivered a first message
    max_pending_per_source: int = 8  # ... of them from one source prefix
    # A source is its address's prefix of this length: one IPv6 /64 is one subscriber, so
    # its 2^64 addresses must not each get their own slots; IPv4 /32 by default, because
    # a carrier-grade NAT already puts many subscribers behind one address.
    source_prefix_v4: int = 32
    source_prefix_v6: int = 64
    first_message_timeout: float = 5.0
    no_sa_timeout: float = 30.0  # after the first message, an IKE SA must exist by then
    max_buffer: int = 262144
    max_frame_rate: int = 20000  # frames per second on one connection (not an SA's ESP)
    max_invalid_frames: int = 16  # invalid frames (over a connection's life) before it is cut
    # TLS listeners (RFC 9329 Appendix A) take TLS and plain RFC 9329 alike; the
    # certificate and key are read at start and on every reload.
    tls_listen: tuple[tuple[str, int], ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    # Load balancers whose connections start with a PROXY v2 header (and must: from
    # anywhere else a header is refused). Networks, e.g. 127.0.0.1, 10.0.0.0/8.
    proxy_protocol_from: tuple[str, ...] = ()
    # Cisco cTCP listen endpoints: no socket is bound, the segments are taken from NFQUEUE.
    ctcp_listen: tuple[tuple[str, int], ...] = ()
    # cTCP timers (protocols.md A.6): handshake to finish, IKE to bind an SA after it.
    ctcp_handshake_timeout: float = 3.0
    ctcp_no_sa_timeout: float = 60.0
    # A cTCP connection the peer has sent nothing valid on for this long is reset.
    ctcp_idle_timeout: float = 300.0
    # SYN+ACKs (and, as many again, RSTs) a second to one source (source_prefix_v4/_v6)
    # without a cTCP connection; all sources together get 250 times that.
    ctcp_reply_rate: int = 20


@dataclass(frozen=True, slots=True)
class Config:
    vici_socket: str = DEFAULT_VICI_SOCKET
    status_socket: str = DEFAULT_STATUS_SOCKET
    queue_num: int = 4500
    # NFQUEUEs for RFC 9329 (queue_num .. queue_num + queues - 1, spread by address pair
    # with --queue-balance), each read by its own thread on the native path; then cTCP's two
    # and a TCP client's IKE check (the properties below).
    queues: int = 1
    inject: str = "raw"
    max_frame: int = 65535
    max_spis: int = 16  # ESP SPIs indexed per connection (QuickSec's limit)
    metrics_listen: tuple[str, int] | None = None  # Prometheus endpoint, e.g. 127.0.0.1:9555
    drop_capabilities: bool = True  # keep only NET_ADMIN, NET_RAW, NET_BIND_SERVICE after set-up
    log_level: str = "info"
    # native: the C data path (tcpencap.native); python: the reference path; auto: native
    # where the extension loads. Either way a missing extension means Python and a warning.
    datapath: str = "auto"
    tls_handshake_timeout: float = 5.0  # also the time a proxy gets for its PROXY header
    client: ClientConfig = field(default_factory=ClientConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    connections: dict[str, ConnectionConfig] = field(default_factory=dict)
    source: str = DEFAULTS_SOURCE

    # The NFQUEUEs after the RFC 9329 ones, in this order (one place for all of them).
    @property
    def ctcp_queue(self) -> int:
        """charon's UDP to cTCP peers."""
        return self.queue_num + self.queues

    @property
    def ctcp_segment_queue(self) -> int:
        """cTCP segments from the wire (strangers' bytes: a queue of their own)."""
        return self.queue_num + self.queues + 1

    @property
    def ike_guard_queue(self) -> int:
        """A TCP client's check of charon's IKE to addresses that are not steered."""
        return self.queue_num + self.queues + 2


def default_config() -> Config:
    """Every setting at its default."""
    return Config()


def load_config(path: str | None = None, reader: Reader | None = None) -> Config:
    """Load a configuration file. With no ``path`` the default file is read, and its
    absence means the defaults; a ``path`` given explicitly must exist."""
    reader = reader or FileReader()
    try:
        text = reader.read(path or DEFAULT_PATH)
    except FileNotFoundError:
        if path is None:
            return default_config()
        raise ConfigError(path, 0, "cannot read: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path or DEFAULT_PATH, 0, f"cannot read: not UTF-8 ({e.reason})") from None
    except OSError as e:
        raise ConfigError(path or DEFAULT_PATH, 0, f"cannot read: {e.strerror or e}") from None
    return parse_config(text, path or DEFAULT_PATH, reader)


def parse_config(text: str, path: str = "<string>", reader: Reader | None = None) -> Config:
    """Build a Config from strongswan.conf text (includes are read through ``reader``)."""
    return config_from_tree(parse(text, path, reader), path)


def config_from_tree(root: Section, source: str) -> Config:
    """Build a Config from an already parsed tree."""
    if "tcpencap" in root.keys:
        s = root.keys["tcpencap"]
        raise ConfigError(s.path, s.line, "tcpencap: must be a section, not a key")
    top = root.sections.get("tcpencap") or Section("tcpencap", source, 0)
    v = _Values(top, "tcpencap", Config)
    vici = v.take("vici_socket", _vici_uri, "")  # "": not set, charon's own setting decides
    if not vici:
        fallback = root.get(VICI_FALLBACK_KEY)
        if fallback is not None and fallback.value:
            vici = _convert(fallback, VICI_FALLBACK_KEY, _vici_uri)
    cfg = Config(
        vici_socket=vici or DEFAULT_VICI_SOCKET,
        status_socket=v.take("status_socket", _abs_path),
        queue_num=v.take("queue_num", _int_range(0, 65532)),
        inject=v.take("inject", _choice(INJECT_MODES)),
        max_frame=v.take("max_frame", _int_range(64, 65535)),
        max_spis=v.take("max_spis", _int_range(1, 1024)),
        metrics_listen=v.take("metrics_listen", _one_endpoint),
        drop_capabilities=v.take("drop_capabilities", _yes_no),
        log_level=v.take("log_level", _choice(LOG_LEVELS)),
        datapath=v.take("datapath", _choice(DATAPATHS)),
        queues=v.take("queues", _int_range(1, 64)),
        tls_handshake_timeout=v.take("tls_handshake_timeout", _duration),
        client=_client(v.sub("client", ClientConfig)),
        gateway=_gateway(v.sub("gateway", GatewayConfig)),
        connections=_connections(v.sub("connections")),
        source=source,
    )
    v.finish(("client", "gateway", "connections"))
    if cfg.ike_guard_queue > 65535:
        where = top.get("queues") or top.get("queue_num")
        raise ConfigError(
            where.path if where else source,
            where.line if where else 0,
            f"tcpencap.queues: queues {cfg.queue_num}..{cfg.queue_num + cfg.queues - 1} and "
            "the three queues after them (cTCP's two, the IKE check's) do not fit below 65536",
        )
    buf = top.get("gateway.max_buffer")
    if buf is not None and cfg.gateway.max_buffer < cfg.max_frame + 2:
        raise ConfigError(
            buf.path,
            buf.line,
            f"tcpencap.gateway.max_buffer: {cfg.gateway.max_buffer} is smaller than one "
            f"frame (max_frame {cfg.max_frame} + 2 length octets)",
        )
    return cfg


def _client(v: _Values) -> ClientConfig:
    c = ClientConfig(
        port=v.take("port", _int_range(0, 65535)),
        port_range=v.take("port_range", _port_range),
        connect_timeout=v.take("connect_timeout", _duration),
        ctcp_keepalive=v.take("ctcp_keepalive", _duration),
    )
    v.finish()
    return c


def _gateway(v: _Values) -> GatewayConfig:
    g = GatewayConfig(
        listen=v.take("listen", _listen),
        max_connections=v.take("max_connections", _int_range(1, 1_000_000)),
        max_per_source=v.take("max_per_source", _int_range(1, 1_000_000)),
        max_pending=v.take("max_pending", _int_range(1, 1_000_000)),
        max_pending_per_source=v.take("max_pending_per_source", _int_range(1, 1_000_000)),
        source_prefix_v4=v.take("source_prefix_v4", _int_range(8, 32)),
        source_prefix_v6=v.take("source_prefix_v6", _int_range(32, 128)),
        max_frame_rate=v.take("max_frame_rate", _int_range(1, 10_000_000)),
        max_invalid_frames=v.take("max_invalid_frames", _int_range(1, 1_000_000)),
        first_message_timeout=v.take("first_message_timeout", _duration),
        no_sa_timeout=v.take("no_sa_timeout", _duration),
        max_buffer=v.take("max_buffer", _int_range(1024, 1 << 30)),
        ctcp_listen=v.take("ctcp_listen", _listen),
        tls_listen=v.take("tls_listen", _listen),
        tls_cert=v.take("tls_cert", _abs_path),
        tls_key=v.take("tls_key", _abs_path),
        proxy_protocol_from=v.take("proxy_protocol_from", _network_list),
        ctcp_handshake_timeout=v.take("ctcp_handshake_timeout", _duration),
        ctcp_no_sa_timeout=v.take("ctcp_no_sa_timeout", _duration),
        ctcp_idle_timeout=v.take("ctcp_idle_timeout", _duration),
        ctcp_reply_rate=v.take("ctcp_reply_rate", _int_range(1, 1_000_000)),
    )
    v.finish()
    _check_listen_overlap(v.sec, g)
    _check_tls_listen(v.sec, g)
    return g


def _check_overlap(
    sec: Section, key: str, eps: tuple[tuple[str, int], ...],
    others: tuple[tuple[str, int], ...], what: str,
) -> None:  # fmt: skip
    for ep in eps:
        if any(endpoints_overlap(ep, other) for other in others):
            s = sec.keys[key]
            raise ConfigError(
                s.path, s.line, f"tcpencap.gateway.{key}: '{bracket(ep[0])}:{ep[1]}' is also {what}"
            )


def _check_listen_overlap(sec: Section, g: GatewayConfig) -> None:
    """RFC 9329 listeners are kernel sockets; cTCP ports must have none, or the kernel
    would answer cTCP segments itself."""
    _check_overlap(sec, "ctcp_listen", g.ctcp_listen, g.listen, "in tcpencap.gateway.listen")


def _check_tls_listen(sec: Section, g: GatewayConfig) -> None:
    """A TLS listener needs its certificate and key, and its own endpoint."""
    if not g.tls_listen:
        return
    s = sec.keys["tls_listen"]
    for key in ("tls_cert", "tls_key"):
        if not getattr(g, key):
            raise ConfigError(
                s.path, s.line, f"tcpencap.gateway.tls_listen: needs tcpencap.gateway.{key}"
            )
    _check_overlap(
        sec, "tls_listen", g.tls_listen, (*g.listen, *g.ctcp_listen),
        "a plain or cTCP listener (a TLS listener takes plain RFC 9329 too)",
    )  # fmt: skip


def _connections(v: _Values) -> dict[str, ConnectionConfig]:
    conns = {}
    for name in v.sec.sections:
        c = v.sub(name, ConnectionConfig)
        port = c.take("remote_port", _int_range(1, 65535), 0)  # 0: the encapsulation's
        encap = c.take("encapsulation", _choice(ENCAPSULATIONS))
        conns[name] = ConnectionConfig(
            name=name,
            remote_port=port or DEFAULT_REMOTE_PORT[encap],
            transport=c.take("transport", _choice(TRANSPORTS)),
            encapsulation=encap,
            remote_addrs=c.take("remote_addrs", _addr_list),
            fallback_timeout=c.take("fallback_timeout", _duration),
            tls=c.take("tls", _yes_no),
            tls_ca=c.take("tls_ca", _abs_path),
            tls_pin=c.take("tls_pin", _sha256_pin),
            tls_sni=c.take("tls_sni", _dns_name),
        )
        _check_tls_connection(c.sec, f"tcpencap.connections.{name}", conns[name])
        c.finish()
    v.finish(tuple(v.sec.sections))
    return conns


def _check_tls_connection(sec: Section, dotted: str, c: ConnectionConfig) -> None:
    tls_keys = [k for k in ("tls_ca", "tls_pin", "tls_sni") if getattr(c, k)]
    if c.tls and c.encapsulation != "rfc9329":
        s = sec.keys["tls"]
        raise ConfigError(s.path, s.line, f"{dotted}.tls: TLS is for RFC 9329, not cTCP")
    if tls_keys and not c.tls:
        s = sec.keys[tls_keys[0]]
        raise ConfigError(s.path, s.line, f"{dotted}.{tls_keys[0]}: needs tls = yes")


T = TypeVar("T")


_FROM_MODEL: Any = object()  # take()'s default: the model dataclass's own field default


def field_defaults(model: type) -> dict[str, Any]:
    """A settings dataclass's defaults by field name: the one place a default is written."""
    out: dict[str, Any] = {}
    for f in fields(model):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


class _Values:
    """One section being read: hands out converted values (a key not set, or set empty,
    gets the default of the section's model dataclass) and, at the end, rejects any key or
    subsection nobody asked for."""

    def __init__(self, sec: Section, prefix: str, model: type | None = None) -> None:
        self.sec = sec
        self.prefix = prefix
        self.defaults = field_defaults(model) if model is not None else {}
        self.used: set[str] = set()
        if sec.refs:
            raise ConfigError(sec.path, sec.line, f"{prefix}: section references not supported")

    def take(self, key: str, conv: Callable[[str], T], default: T = _FROM_MODEL) -> T:
        """The key's converted value; unset or empty: ``default``, which only a setting
        whose absence means something other than its field default passes."""
        self.used.add(key)
        s = self.sec.keys.get(key)
        if s is None or not s.value.strip():
            return self.defaults[key] if default is _FROM_MODEL else default
        return _convert(s, f"{self.prefix}.{key}", conv)

    def sub(self, name: str, model: type | None = None) -> _Values:
        sec = self.sec.sections.get(name) or Section(name, self.sec.path, self.sec.line)
        return _Values(sec, f"{self.prefix}.{name}", model)

    def finish(self, sections: tuple[str, ...] = ()) -> None:
        for key, s in self.sec.keys.items():
            if key not in self.used:
                what = " (it is a section)" if key in sections else ""
                raise ConfigError(s.path, s.line, f"{self.prefix}.{key}: unknown key{what}")
        for name, sec in self.sec.sections.items():
            if name not in sections:
                raise ConfigError(sec.path, sec.line, f"{self.prefix}.{name}: unknown section")


class _Bad(ValueError):
    """A bad element of a list value: the message quotes the element, not the whole list."""

    def __init__(self, item: str, reason: str) -> None:
        super().__init__(reason)
        self.item = item


def _convert(s: Setting, dotted: str, conv: Callable[[str], T]) -> T:
    text = s.value.strip()
    try:
        return conv(text)
    except _Bad as e:
        raise ConfigError(s.path, s.line, f"{dotted}: {e.item!r} {e}") from None
    except ValueError as e:
        raise ConfigError(s.path, s.line, f"{dotted}: {text!r} {e}") from None


# Converters: take the trimmed, non-empty text; raise ValueError with the reason, which is
# worded to follow the quoted value ("'x' is not an integer").


def _int(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,10}", text):
        raise ValueError("is not an integer")
    return int(text)


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def conv(text: str) -> int:
        n = _int(text)
        if not lo <= n <= hi:
            raise ValueError(f"is out of range {lo}..{hi}")
        return n

    return conv


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def conv(text: str) -> str:
        if text.lower() not in options:
            raise ValueError(f"is not one of {'|'.join(options)}")
        return text.lower()

    return conv


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _yes_no(text: str) -> bool:
    low = text.strip().lower()
    if low in ("yes", "true", "1", "on"):
        return True
    if low in ("no", "false", "0", "off"):
        return False
    raise _Bad(text, "is not yes or no")


def _one_endpoint(text: str) -> tuple[str, int]:
    return _endpoint(text.strip())


def _duration(text: str) -> float:
    """``5``, ``5s``, ``500ms``, ``2m``, ``1h``: seconds as a float, above 0 and at most a day."""
    m = re.fullmatch(r"([0-9]{1,9}(?:\.[0-9]{1,6})?)\s*(ms|s|m|h)?", text)
    if not m:
        raise ValueError("is not a duration (like 5, 5s, 500ms or 2m)")
    secs = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not 0 < secs <= 86400:
        raise ValueError("is out of range (above 0, at most 1 day)")
    return secs


def _port_range(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"([0-9]{1,5})\s*-\s*([0-9]{1,5})", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)) <= 65535:
        raise ValueError("is not a port range LOW-HIGH with 1 <= LOW <= HIGH <= 65535")
    return int(m.group(1)), int(m.group(2))


def _abs_path(text: str) -> str:
    if not text.startswith("/") or "\0" in text:
        raise ValueError("is not an absolute path")
    return text


def _vici_uri(text: str) -> str:
    """``unix:///absolute/path`` or ``tcp://ADDR:PORT``, the two forms charon's vici serves."""
    scheme, sep, rest = text.partition("://")
    try:
        if sep and scheme == "unix":
            _abs_path(rest)
            return text
        if sep and scheme == "tcp":
            _endpoint(rest)
            return text
    except ValueError:
        pass
    raise ValueError("is not unix:///PATH or tcp://ADDR:PORT")


def _endpoint(text: str) -> tuple[str, int]:
    """``1.2.3.4:4500`` or ``[2001:db8::1]:4500``; the address is normalised."""
    bad = "is not ADDR:PORT with a port 1-65535"
    m = re.fullmatch(r"\[([^\]]*)\]:([0-9]{1,5})|([^:\[\]]*):([0-9]{1,5})", text)
    if not m:
        raise _Bad(text, bad + " (IPv6 in brackets: [::]:4500)" if text.count(":") > 1 else bad)
    bracketed = m.group(1) is not None
    host = m.group(1) if bracketed else m.group(3)
    port = int(m.group(2) if bracketed else m.group(4))
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise _Bad(text, bad) from None
    if (addr.version == 6) != bracketed:
        raise _Bad(text, bad + " (IPv6 in brackets: [::]:4500)")
    if not 1 <= port <= 65535:
        raise _Bad(text, bad)
    return str(addr), port


def _listen(text: str) -> tuple[tuple[str, int], ...]:
    out: list[tuple[str, int]] = []
    for item in text.split(","):
        ep = _endpoint(item.strip())
        if ep in out:
            raise _Bad(item.strip(), "is listed twice")
        out.append(ep)
    return tuple(out)


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _address(text: str) -> str:
    """An IP address (normalised) or a DNS name, as swanctl's remote_addrs accepts."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if (
        len(text) <= 253
        and all(_LABEL.fullmatch(lbl) for lbl in labels)
        and not labels[-1].isdigit()
    ):
        return text
    raise _Bad(text, "is not an IP address or DNS name")


def _dns_name(text: str) -> str:
    """A host name for SNI (RFC 6066 sends names only, never addresses)."""
    name = _address(text)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    raise _Bad(text, "is an address; SNI takes a DNS name")


def _sha256_pin(text: str) -> bytes:
    """``sha256:AB:CD:..`` or 64 hex digits (with or without colons), as ``openssl x509
    -fingerprint -sha256`` prints it."""
    raw = text.strip()
    if raw.lower().startswith("sha256:"):
        raw = raw[7:]
    digits = raw.replace(":", "")
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", digits):
        raise _Bad(text, "is not a SHA-256 fingerprint (64 hex digits)")
    return bytes.fromhex(digits)


def _network_list(text: str) -> tuple[str, ...]:
    """Addresses or networks (``ADDR/LEN``), normalised; a bare address is one host."""
    out: list[str] = []
    for item in text.split(","):
        item = item.strip()
        try:
            net = str(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise _Bad(item, "is not an address or network (ADDR or ADDR/LEN)") from None
        if net not in out:
            out.append(net)
    return tuple(out)


def _addr_list(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for item in text.split(","):
        item = item.strip()
        addr = _address(item)
        if addr not in out:
            out.append(addr)
    return tuple(out)
