"""Gateway peers that stay steered after their connection: the RFC 9329 engine's rule for
what charon may still send to a TCP peer that has no connection now.

charon names a gateway connection's peer by its UDP endpoint (address, port). While a
connection is open that endpoint is steered into the queue; when it closes, charon may
still talk to it (DPD, a rekey, a client about to reconnect) and that must not leave as
plain UDP, so the endpoint *lingers*: steered until list-sas shows no IKE SA of charon's
with it. An endpoint whose connection never carried an SA lingers *briefly*: asked about
sooner, and bounded apart from the steering limit (oldest out first), so strangers cannot
fill the steering set. A previous run's steered endpoints and whole addresses (a
fallback's) linger the same way after a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tcpencap.core.outputs import Output, Query, Steer
from tcpencap.core.peers import SteeringRefs
from tcpencap.core.timers import TimerQueue
from tcpencap.core.vici_facts import address
from tcpencap.core.vici_facts import port as vici_port

PEER_RELEASE_DELAY = 30.0  # a gateway endpoint without connection stays steered at least this long
# An endpoint whose connection never carried an SA: charon, the IKE responder there, sends
# nothing on its own, so charon is asked about it after this (not PEER_RELEASE_DELAY), and
# such endpoints are bounded apart from the steering limit (max_pending, oldest out first).
BRIEF_LINGER = 2.0
LINGER = "linger"  # steering reason of a gateway endpoint whose connection is gone
BRIEF = "brief"  # ... of one whose connection never carried an SA

Endpoint = tuple[bytes, int]  # (peer address, port): the UDP endpoint charon sees


def _conn_reason(conn_id: int) -> str:
    return f"conn:{conn_id}"


class Lingering:
    """``steering``: the engine's whole-address refs (a previous run's lingering addresses
    share them with the client's reasons); ``emit`` queues an output of the engine."""

    def __init__(
        self, steering: SteeringRefs[bytes], emit: Callable[[Output], None], timers: TimerQueue
    ) -> None:
        self.steering = steering
        self.endpoints: SteeringRefs[Endpoint] = SteeringRefs()  # gateway peers' endpoints
        self.release_at: dict[Endpoint, float] = {}  # lingering endpoint -> next check
        self.release_peer_at: dict[bytes, float] = {}  # a previous run's whole addresses
        self.brief: dict[Endpoint, None] = {}  # lingering endpoints of SA-less connections
        self._emit = emit
        self._timers = timers
        self._asked_for = 0.0  # when the next brief-linger question is due

    def steer(self, ep: Endpoint, conn_id: int, limit: int | None = None) -> bool:
        """Steer ``ep`` for an open connection; False (and nothing steered) when that
        would put more than ``limit`` endpoints of real peers in the steering set."""
        if self.endpoints.add(ep, _conn_reason(conn_id)):
            if limit is not None and len(self.endpoints) - len(self.brief) > limit:
                self.endpoints.remove(ep, _conn_reason(conn_id))
                return False
            self._emit(Steer(ep[0], True, ep[1]))
        self.release_at.pop(ep, None)
        if ep in self.brief:
            del self.brief[ep]
            self.endpoints.remove(ep, BRIEF)
        return True

    def linger(self, now: float, ep: Endpoint, conn_id: int, carried: bool, max_brief: int) -> None:
        """The connection of ``ep`` closed (``carried``: it had an SA): keep it steered
        until charon has no established IKE SA with it (brief, when it never had one)."""
        if ep not in self.endpoints:
            return  # never steered (refused at the steering limit)
        real = carried or self.endpoints.has(ep, LINGER)
        self.endpoints.add(ep, LINGER if real else BRIEF)
        self.endpoints.remove(ep, _conn_reason(conn_id))
        if real and ep in self.brief:
            del self.brief[ep]
            self.endpoints.remove(ep, BRIEF)
        if any(r.startswith("conn:") for r in self.endpoints.reasons(ep)):
            return
        if real:
            self.release_at[ep] = now + PEER_RELEASE_DELAY
            return
        self.brief.pop(ep, None)
        self.brief[ep] = None
        self.release_at[ep] = now + BRIEF_LINGER
        if self._asked_for <= now:  # one question at a time, not one per connection
            self._asked_for = now + BRIEF_LINGER
            self._timers.call_at(now + BRIEF_LINGER, self.check)
        while len(self.brief) > max_brief:
            self._unsteer(next(iter(self.brief)))

    def previous_run(self, now: float, peers: list[bytes], endpoints: list[Endpoint]) -> None:
        """What a previous run steered that charon still holds SAs with lingers."""
        for ep in endpoints:
            if self.endpoints.add(ep, LINGER):
                self._emit(Steer(ep[0], True, ep[1]))
            self.release_at[ep] = now + PEER_RELEASE_DELAY
        for peer in peers:
            if self.steering.add(peer, LINGER):
                self._emit(Steer(peer, True))
            self.release_peer_at[peer] = now + PEER_RELEASE_DELAY

    def check(self, now: float) -> None:
        """Ask charon (list-sas) when a lingering endpoint or address is due."""
        due = (*self.release_at.values(), *self.release_peer_at.values())
        if any(t <= now for t in due):
            self._emit(Query("peer-release"))

    def release(self, now: float, sas: list[dict[str, Any]]) -> None:
        """Stop steering due endpoints that have no connection and no IKE SA in charon
        with that remote host and port, other than one still being set up (CONNECTING:
        as its responder charon sends nothing unasked; a stranger's IKE_SA_INIT leaves one
        behind for charon's half-open timeout)."""
        busy: set[Endpoint] = set()
        for item in sas:
            for sa in item.values():
                if not isinstance(sa, dict) or sa.get("state") == "CONNECTING":
                    continue
                host = address(sa.get("remote-host"))
                if host is not None:
                    busy.add((host, vici_port(sa.get("remote-port"), 0)))
        hosts = {host for host, _port in busy}
        for peer in [p for p, t in self.release_peer_at.items() if t <= now]:
            if peer in hosts:
                self.release_peer_at[peer] = now + PEER_RELEASE_DELAY
            else:
                del self.release_peer_at[peer]
                if self.steering.remove(peer, LINGER):
                    self._emit(Steer(peer, False))
        for ep in [p for p, t in self.release_at.items() if t <= now]:
            if any(r.startswith("conn:") for r in self.endpoints.reasons(ep)):
                del self.release_at[ep]
            elif ep in busy:
                self.release_at[ep] = now + PEER_RELEASE_DELAY
                if ep in self.brief:  # charon has an SA there after all: a real peer
                    del self.brief[ep]
                    self.endpoints.add(ep, LINGER)
                    self.endpoints.remove(ep, BRIEF)
            else:
                self._unsteer(ep)

    def _unsteer(self, ep: Endpoint) -> None:
        self.brief.pop(ep, None)
        self.release_at.pop(ep, None)
        if self.endpoints.remove(ep, BRIEF) | self.endpoints.remove(ep, LINGER):
            self._emit(Steer(ep[0], False, ep[1]))
