"""What comes before the RFC 9329 stream on one TCP connection: a PROXY v2 header from a
trusted load balancer, then, optionally, TLS (RFC 9329 Appendix A). Sans-I/O: bytes in,
events and bytes out; the time is an argument.

TLS is OpenSSL through :class:`ssl.SSLObject` on memory BIOs, so no socket is involved and
the asyncio protocol stays a thin adapter. TLS adds no authentication of its own that IKE
relies on: charon still authenticates the peer. It exists for networks that pass TLS on
port 443 and nothing else.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass

from tcpencap.wire import proxy_v2

TLS_HANDSHAKE_RECORD = 0x16
READ_CHUNK = 65536


class FrontError(Exception):
    """The connection must be closed; ``reason`` is the counter's key. A ``quiet`` one is
    closed without a count or a log line (a load balancer's health check)."""

    def __init__(self, reason: str, detail: str, quiet: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.quiet = quiet


@dataclass(frozen=True, slots=True)
class Addressed:
    """The PROXY header arrived: the client's address as the load balancer saw it."""

    header: proxy_v2.ProxyHeader


@dataclass(frozen=True, slots=True)
class Secured:
    """The TLS handshake completed."""

    version: str
    cipher: str


@dataclass(frozen=True, slots=True)
class Ended:
    """The peer closed TLS (close_notify): the stream's end, like a TCP FIN."""


Event = Addressed | Secured | Ended | bytes  # bytes: the RFC 9329 stream, in order


class StreamFront:
    """One connection's front. ``proxy``: a PROXY v2 header must come first (the peer is a
    configured proxy); otherwise one is refused. ``tls`` with ``server_side``: a gateway's
    TLS listener, which also takes plain RFC 9329 (the first octet tells); on a client,
    ``tls`` means TLS from the first octet, checked against ``pin`` (the SHA-256 of the
    server certificate) when one is given."""

    def __init__(
        self,
        now: float,
        timeout: float,
        *,
        server_side: bool,
        proxy: bool = False,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        pin: bytes | None = None,
    ) -> None:
        self.server_side = server_side
        self.deadline: float | None = now + timeout
        self._proxy = proxy
        self._ctx = tls
        self._pin = pin
        self._buf = b""  # before the stage is decided: PROXY header or first octet
        self._detected = not server_side  # a client knows what it speaks
        self._paused = False  # after Addressed, until the shell has admitted the client
        self._held: list[bytes] = []  # the engine's bytes while the handshake runs
        self.held_octets = 0
        self.header: proxy_v2.ProxyHeader | None = None
        self.secured: Secured | None = None
        self._tls: ssl.SSLObject | None = None
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        if not server_side and tls is not None:
            self._start_tls(server_hostname)
            self._handshake()  # the ClientHello waits in data_to_send()
        elif not server_side or (not proxy and tls is None):
            self.deadline = None  # nothing before the stream: the engine's deadlines apply

    # --- state --------------------------------------------------------------------------

    @property
    def tls(self) -> bool:
        return self._tls is not None

    @property
    def health_check(self) -> bool:
        """A LOCAL header: the proxy's own connection, closed quietly at the deadline."""
        return self.header is not None and self.header.local

    @property
    def done(self) -> bool:
        """Past every stage: bytes go straight through (or through TLS records)."""
        return self.deadline is None and self._detected

    def expired(self, now: float) -> FrontError | None:
        """At ``deadline`` (the shell's timer for the front): why the connection is closed,
        or None when it is not due (early, or there is no deadline any more)."""
        if self.deadline is None or now < self.deadline:
            return None
        if self._proxy and self.header is None:
            return FrontError("proxy-timeout", "no PROXY header within the deadline")
        if self.health_check:
            return FrontError(
                "proxy-local", "a health check's connection that stayed open", quiet=True
            )
        return FrontError("tls-handshake-timeout", "TLS handshake not done within the deadline")

    # --- bytes from the peer ------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Events for ``data``; raises FrontError when the connection must go."""
        events: list[Event] = []
        if self._paused:
            self._buf += data
            return events
        if self._proxy and self.header is None:
            self._buf += data
            header = self._parse_proxy()
            if header is None:
                return events
            self.header = header
            events.append(Addressed(header))
            data, self._buf = self._buf[header.length :], b""
            if not header.local:
                if self._ctx is None:
                    self.deadline = None  # accepted now: the engine's deadlines apply
                # Nothing more (no TLS handshake) until the shell has admitted the client.
                self._paused, self._buf = True, data
                return events
        if self.health_check:
            # the proxy's own connection (a health check): it carries nothing of ours
            if data:
                raise FrontError("proxy-local", "data after a LOCAL PROXY header (a health check)")
            return events
        if not self._detected:
            data = self._buf + data
            self._buf = b""
            if not data:
                return events
            self._detect(data[0])
        if self._tls is None:
            if data:
                events.append(data)
            return events
        self._in.write(data)
        if self.secured is None:
            if not self._handshake():
                return events
            events.append(self.secured)  # type: ignore[arg-type]
        self._read_into(events)
        return events

    def resume(self) -> list[Event]:
        """After Addressed, once the client the header names has been admitted: the events
        of what followed the header."""
        self._paused = False
        data, self._buf = self._buf, b""
        return self.receive_data(data) if data else []

    def _parse_proxy(self) -> proxy_v2.ProxyHeader | None:
        try:
            return proxy_v2.parse(self._buf)
        except proxy_v2.ProxyHeaderError as exc:
            raise FrontError(exc.reason, str(exc)) from None

    def _detect(self, first: int) -> None:
        """A gateway's first stream octet: TLS, plain RFC 9329, or a refused header."""
        self._detected = True
        if first in (proxy_v2.SIGNATURE[0], proxy_v2.V1_PREFIX[0]):
            if self.header is not None:
                raise FrontError("proxy-unexpected", "a second PROXY header behind the proxy's")
            raise FrontError(
                "proxy-unexpected", "a PROXY header from an address not in proxy_protocol_from"
            )
        if first == TLS_HANDSHAKE_RECORD:
            if self._ctx is None:
                raise FrontError("tls-not-configured", "TLS on a listener without TLS")
            self._start_tls(None)
        else:
            self.deadline = None  # plain RFC 9329: the engine's own deadlines apply

    def _start_tls(self, server_hostname: str | None) -> None:
        assert self._ctx is not None
        self._tls = self._ctx.wrap_bio(
            self._in, self._out, server_side=self.server_side, server_hostname=server_hostname
        )

    def _handshake(self) -> bool:
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLCertVerificationError as exc:
            raise FrontError(
                "tls-verify", f"TLS certificate refused: {exc.verify_message}"
            ) from None
        except ssl.SSLError as exc:
            raise FrontError(
                "tls-handshake", f"TLS handshake failed: {exc.reason or exc}"
            ) from None
        if self._pin is not None:
            if pin_of(self._tls.getpeercert(binary_form=True) or b"") != self._pin:
                raise FrontError("tls-pin", "TLS certificate does not match tls_pin")
        cipher = self._tls.cipher()
        self.secured = Secured(self._tls.version() or "", cipher[0] if cipher else "")
        self.deadline = None
        held, self._held, self.held_octets = self._held, [], 0
        for chunk in held:
            self._tls.write(chunk)
        return True

    def _read_into(self, events: list[Event]) -> None:
        assert self._tls is not None
        while True:
            try:
                chunk = self._tls.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLError as exc:
                raise FrontError("tls-error", f"TLS record refused: {exc.reason or exc}") from None
            if not chunk:  # close_notify (SSLObject.read returns b"" for it)
                events.append(Ended())
                return
            events.append(chunk)

    # --- bytes to the peer --------------------------------------------------------------

    def send(self, data: bytes) -> bytes:
        """What to write for the engine's ``data``: itself, TLS records, or nothing yet
        (held until the handshake completes; ``held_octets`` counts it)."""
        if self._tls is None:
            return data
        if self.secured is None:
            self._held.append(data)
            self.held_octets += len(data)
            return b""
        try:
            self._tls.write(data)
        except ssl.SSLError:  # after close_notify: nothing more goes out
            return b""
        return self._out.read()

    def data_to_send(self) -> bytes:
        """Handshake records and anything else TLS produced on its own (session tickets)."""
        return self._out.read() if self._out.pending else b""

    def close_notify(self) -> bytes:
        """The TLS alert that ends the stream cleanly, if TLS is up."""
        if self._tls is None or self.secured is None:
            return b""
        try:
            self._tls.unwrap()
        except ssl.SSLError:
            pass
        return self._out.read()


def pin_of(der: bytes) -> bytes:
    """The value ``tls_pin`` is compared with: SHA-256 of the DER certificate."""
    return hashlib.sha256(der).digest()
