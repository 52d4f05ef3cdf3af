"""End to end: gateway admission holds hundreds of hostile connections at once, each for no
longer than its deadline, while honest clients keep (and set up) their tunnels.

An attacker in fw keeps ATTACK_SECONDS of connections in flight from N_SOURCES addresses on
fw's gw link, TASKS_PER_SOURCE per address, each re-opened as soon as the gateway closes it.
Every connection sends the prefix and then one of:

  garbage  one frame of garbage after the non-ESP marker (before admission checked the
           first message, this passed the deadline and was held open for ever);
  ike      a well-formed IKE_SA_INIT with a random SPI: admitted, answered or ignored by
           charon, never authenticated, so it must be closed at no_sa_timeout;
  esp      ESP for a random SPI (charon has no inbound SA for it with that peer);
  idle     nothing more.

Sizing. One address can hold at most max_per_source connections, so the attacker can hold at
most N_SOURCES * max_per_source (512) at once. The global limits are set above that
(max_pending 544, max_connections 576): the per-source limit is the one that binds, and the
headroom is what lets c2 connect in the middle of the attack. (With global limits below what
the attacker's addresses can hold, a distributed attacker fills them and newcomers are
refused: that is the sizing rule an operator must follow, and the reason this test expects
no limit-connections or limit-pending refusal at all.) Each address runs a few more tasks than
it may hold, so limit-per-source refuses all the time; a task pauses REFUSED_PAUSE after a
refusal, which bounds the refusal rate (a few hundred per second) without changing what is
held.

Meanwhile c1 (established before the attack) pings through its tunnel every 20 ms for the
whole attack, and c2 initiates its tunnel during the attack and then pings the same way: no
ping may be lost. Afterwards: every hostile connection was closed by the gateway within its
deadline plus SLACK, for the reason its kind calls for (gw log, attacker's own timing, status
events, metrics), RSS and descriptors are back near where they were, and only the two honest
connections remain.

Needs root, iproute2, iptables and strongSwan; fails (never skips) without them.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.lab.test_e2e_hostile import _fds, _proc_rss, _wait_only_honest
from tests.lab.test_e2e_ops import metric_sum, scrape
from tests.labkit import Host, Lab, default_name, ping, tcpencap_conf
from tests.labkit.e2e import assert_established, assert_pings, ike_sa, load_tunnel

pytestmark = pytest.mark.lab

FIRST = 2.0  # gateway.first_message_timeout
NO_SA = 4.0  # gateway.no_sa_timeout
N_SOURCES = 16  # attacker addresses 198.19.0.101.. on fw's gw link
PER_SOURCE = 32
TASKS_PER_SOURCE = 36  # 576 connections in flight, 512 of them can be held
LIMITS = {
    "max_connections": N_SOURCES * PER_SOURCE + 64,
    "max_per_source": PER_SOURCE,
    # every held connection starts pending: the per-source limit is the one this test binds
    "max_pending_per_source": PER_SOURCE,
    "max_pending": N_SOURCES * PER_SOURCE + 32,
    "max_frame_rate": 2000,
    "first_message_timeout": f"{FIRST:g}s",
    "no_sa_timeout": f"{NO_SA:g}s",
}
METRICS = "127.0.0.1:9555"
ATTACK_SECONDS = 20.0  # connections are re-opened for this long, then drain
REFUSED_PAUSE = 0.2
SLACK = 1.5  # timer and event-loop latency under load, seconds
KINDS = ("garbage", "ike", "esp", "idle")
DEADLINE = {"garbage": FIRST, "ike": FIRST + NO_SA, "esp": FIRST, "idle": FIRST}
REASON = {
    "garbage": "first-message deadline",
    "ike": "no IKE SA",
    "esp": "first-message deadline",
    "idle": "first-message deadline",
}
PING_INTERVAL = 0.02
C1_PINGS = int((ATTACK_SECONDS + 3) / PING_INTERVAL)  # the whole attack and its drain
C2_AT = 5.0  # c2 initiates this long after the attack started
C2_PINGS = int((ATTACK_SECONDS - C2_AT - 3) / PING_INTERVAL)  # ends before the attack does
RSS_PEAK_MAX = 64 << 20
RSS_AFTER_MAX = 48 << 20
FD_SLACK = 8

# The attacker: asyncio, TASKS_PER_SOURCE tasks per source address, each a loop of
# connections of one kind until the attack time is over. argv: gw address, port, JSON spec.
# Prints a JSON list of records, one per connection: kind, src, port (each used once),
# how it ended (eof, reset, still-open, connect-failed, error:N), held (s, from the end of
# the handshake to the end), rx (octets received), t (start, s since the attack began).
ATTACK_SCRIPT = r"""
import asyncio, json, os, random, resource, socket, struct, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (16384, 16384))
addr, port = sys.argv[1], int(sys.argv[2])
spec = json.loads(sys.argv[3])
PREFIX = b"IKETCP"
records = []
T0 = time.monotonic()
next_port = {src: 20000 for src in spec["sources"]}  # every (src, port) used once

def frame(payload):
    return struct.pack("!H", 2 + len(payload)) + payload

def transform(last, kind, ident, attrs=b""):
    return struct.pack("!BBHBBH", 0 if last else 3, 0, 8 + len(attrs), kind, 0, ident) + attrs

def ike_sa_init():
    # IKEv2 IKE_SA_INIT request, random initiator SPI: SA (AES-CBC-128, HMAC-SHA2-256 PRF
    # and integrity, curve25519), KE, Nonce.
    transforms = (transform(False, 1, 12, struct.pack("!HH", 0x800E, 128))
                  + transform(False, 2, 5) + transform(False, 3, 12) + transform(True, 4, 31))
    proposal = struct.pack("!BBHBBBB", 0, 0, 8 + len(transforms), 1, 1, 0, 4) + transforms
    sa = struct.pack("!BBH", 34, 0, 4 + len(proposal)) + proposal
    ke = struct.pack("!BBHHH", 40, 0, 8 + 32, 31, 0) + os.urandom(32)
    nonce = struct.pack("!BBH", 0, 0, 4 + 32) + os.urandom(32)
    body = sa + ke + nonce
    header = os.urandom(8) + bytes(8) + struct.pack("!BBBBII", 33, 0x20, 34, 0x08, 0,
                                                    28 + len(body))
    return header + body

def payload(kind):
    if kind == "garbage":  # non-ESP marker, then no IKE header worth the name
        return PREFIX + frame(bytes(4) + os.urandom(60))
    if kind == "ike":
        return PREFIX + frame(bytes(4) + ike_sa_init())
    if kind == "esp":  # SPI >= 256, sequence number, random "ciphertext"
        spi = random.randrange(1 << 16, 1 << 32)
        return PREFIX + frame(struct.pack("!II", spi, 1) + os.urandom(64))
    return PREFIX

async def one(kind, src):
    loop = asyncio.get_running_loop()
    rec = {"kind": kind, "src": src, "port": 0, "how": "connect-failed", "held": 0.0,
           "rx": 0, "t": round(time.monotonic() - T0, 3)}
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    rec["port"] = next_port[src]
    next_port[src] += 1
    try:
        sock.bind((src, rec["port"]))
        await asyncio.wait_for(loop.sock_connect(sock, (addr, port)), 5)
    except (OSError, asyncio.TimeoutError):
        sock.close()
        records.append(rec)
        return rec
    t0 = time.monotonic()
    how = "still-open"
    try:
        await loop.sock_sendall(sock, payload(kind))
        end = t0 + spec["cap"][kind]
        while True:
            left = end - time.monotonic()
            if left <= 0:
                break
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), left)
            if not chunk:
                how = "eof"
                break
            rec["rx"] += len(chunk)
    except asyncio.TimeoutError:
        pass
    except (ConnectionResetError, BrokenPipeError):
        how = "reset"
    except OSError as exc:
        how = f"error:{exc.errno}"
    rec["held"] = round(time.monotonic() - t0, 3)
    rec["how"] = how
    sock.close()
    records.append(rec)
    return rec

async def task(kind, src):
    await asyncio.sleep(random.random())  # spread the first wave over a second
    while time.monotonic() - T0 < spec["seconds"]:
        rec = await one(kind, src)
        if rec["held"] < 0.3:  # refused (or failed): do not spin
            await asyncio.sleep(spec["refused_pause"])

async def main():
    kinds = spec["kinds"]
    await asyncio.gather(*(task(kinds[j % len(kinds)], src)
                           for src in spec["sources"] for j in range(spec["tasks"])))

asyncio.run(main())
print(json.dumps(records))
"""

CLOSED_RE = re.compile(
    r"conn (\d+) gateway \S+ <-> ([\d.]+):(\d+): closed \((.*)\) after ([\d.]+)s"
)


def _gw_closes(log: str) -> dict[tuple[str, int], tuple[str, float]]:
    """(peer address, port) -> (close reason, seconds held) from the gateway's log."""
    out: dict[tuple[str, int], tuple[str, float]] = {}
    for m in CLOSED_RE.finditer(log):
        key = (m.group(2), int(m.group(3)))
        assert key not in out, f"{key} closed twice"
        out[key] = (m.group(4), float(m.group(5)))
    return out


class _Poller(threading.Thread):
    """Samples the gateway during the attack: hostile connections held (all, and still
    waiting for a first message) from ``tcpencap status``, the daemon's RSS and fds."""

    def __init__(self, gw: Host, sources: set[str], pid: int) -> None:
        super().__init__(daemon=True)
        self.gw, self.sources, self.pid = gw, sources, pid
        self.stop = threading.Event()
        self.peak_held = self.peak_pending = self.peak_rss = self.peak_fds = 0
        self.samples = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.peak_rss = max(self.peak_rss, _proc_rss(self.pid))
                self.peak_fds = max(self.peak_fds, _fds(self.pid))
                conns = self.gw.tcpencap_status()["connections"]
                hostile = [c for c in conns if c["peer"].rsplit(":", 1)[0] in self.sources]
                pending = [c for c in hostile if c["state"] in ("accepted", "prefix-received")]
                self.peak_held = max(self.peak_held, len(hostile))
                self.peak_pending = max(self.peak_pending, len(pending))
                self.samples += 1
                self.stop.wait(0.3)
        except BaseException as exc:  # reported by the test
            self.error = exc


def _gw_conn(gw: Host, client: Host) -> dict[str, Any]:
    """The gateway's one connection from ``client``."""
    conns = gw.tcpencap_status()["connections"]
    rows = [r for r in conns if r["peer"].startswith(client.outer4 + ":")]
    assert len(rows) == 1, (client.role, rows)
    return rows[0]


def test_admission_holds_hundreds_of_hostile_connections_without_hurting_honest_clients() -> None:
    t_start = time.monotonic()
    with Lab(clients=2) as lab:
        c1, c2, gw, fw = lab.clients[0], lab.clients[1], lab.gw, lab.fw
        for c in (c1, c2):
            lab.block_udp(c)
        for h in (gw, c1, c2):
            h.start_charon()
        for c in (c1, c2):
            load_tunnel(lab, c, "psk", 4)
        limits = "".join(f"    {k} = {v}\n" for k, v in LIMITS.items())
        gw.start_tcpencap(
            tcpencap_conf(
                gw, listen=[f"{gw.outer4}:4500"], extra=f"  metrics_listen = {METRICS}",
                gateway_extra=limits,
            )
        )  # fmt: skip
        for c in (c1, c2):
            c.start_tcpencap(tcpencap_conf(c, connections={default_name(c, gw): 4500}))
        c1.charon.initiate(default_name(c1, gw), timeout=10)
        assert_pings(c1, gw, count=2)
        c1_conn = _gw_conn(gw, c1)
        c1_spi = assert_established(gw, default_name(c1, gw))["initiator-spi"]

        sources = [f"198.19.0.{101 + i}" for i in range(N_SOURCES)]
        for a in sources:
            fw.run("ip", "addr", "add", f"{a}/24", "dev", gw.fw_veth)
        pid = gw.tcpencap.pid
        time.sleep(0.5)
        rss0, fds0 = _proc_rss(pid), _fds(pid)
        spec = json.dumps({
            "sources": sources, "tasks": TASKS_PER_SOURCE, "kinds": KINDS,
            "seconds": ATTACK_SECONDS, "refused_pause": REFUSED_PAUSE,
            "cap": {k: DEADLINE[k] + SLACK + 3 for k in KINDS},
        })  # fmt: skip

        poller = _Poller(gw, set(sources), pid)
        try:
            with ThreadPoolExecutor(3) as pool:
                c1_ping = pool.submit(
                    ping, c1, gw.inner4, c1.inner4, C1_PINGS, PING_INTERVAL, C1_PINGS * 0.02 + 15
                )
                time.sleep(0.5)
                t_attack = time.monotonic()
                attack = pool.submit(
                    fw.run, sys.executable, "-c", ATTACK_SCRIPT, gw.outer4, "4500", spec, timeout=60
                )
                poller.start()
                # c2 sets up its tunnel in the middle of the attack, then pings through it.
                time.sleep(max(0.0, t_attack + C2_AT - time.monotonic()))
                t0 = time.monotonic()
                c2.charon.initiate(default_name(c2, gw), timeout=10)
                c2_setup = time.monotonic() - t0
                c2_ping = pool.submit(
                    ping, c2, gw.inner4, c2.inner4, C2_PINGS, PING_INTERVAL, C2_PINGS * 0.02 + 15
                )
                c2_ping_done = c2_ping.result()
                c2_during = time.monotonic() - t_attack < ATTACK_SECONDS  # pinged while attacked
                records = json.loads(attack.result().stdout)
                attack_elapsed = time.monotonic() - t_attack
                c1_ping_done = c1_ping.result()
        finally:  # also on failure: no status calls into a lab being torn down
            poller.stop.set()
            if poller.is_alive():
                poller.join(10)
        assert poller.error is None, repr(poller.error)

        # Only the honest connections remain; the descriptors come back.
        c2_conn = _gw_conn(gw, c2)
        c2_since = time.monotonic() - t_attack - C2_AT  # how long ago c2 initiated
        ids = {c1_conn["id"], c2_conn["id"]}
        conns = _wait_only_honest(gw, ids, deadline=10.0)
        assert {c["id"] for c in conns} == ids, conns
        end = time.monotonic() + 10
        while _fds(pid) > fds0 + FD_SLACK and time.monotonic() < end:
            time.sleep(0.2)
        fds1 = _fds(pid)
        rss1 = _proc_rss(pid)
        status = gw.tcpencap_status()
        events = status["events"]
        samples = scrape(gw, METRICS)
        log = (gw.dir / "tcpencap.log").read_text()

        # --- the figures ---------------------------------------------------------------
        closes = _gw_closes(log)
        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        max_held: dict[str, float] = defaultdict(float)
        min_held: dict[str, float] = {}
        max_gw_held: dict[str, float] = defaultdict(float)
        rx: Counter[str] = Counter()
        wrong: list[Any] = []
        refused_long: list[Any] = []
        assert len({(r["src"], r["port"]) for r in records}) == len(records)
        for rec in records:
            kind = rec["kind"]
            by_kind[kind][rec["how"]] += 1
            gw_side = closes.pop((rec["src"], rec["port"]), None)
            if gw_side is None:  # no "accepted"/"closed" for it: refused by a limit
                by_kind[kind]["refused"] += 1
                if rec["held"] > 1.0:
                    refused_long.append(rec)
                continue
            reason, gw_held = gw_side
            by_kind[kind]["accepted"] += 1
            by_kind[kind][f"reason={reason}"] += 1
            if reason != REASON[kind] or rec["how"] not in ("eof", "reset"):
                wrong.append((rec, reason, gw_held))
            max_held[kind] = max(max_held[kind], rec["held"])
            min_held[kind] = min(min_held.get(kind, 1e9), rec["held"])
            max_gw_held[kind] = max(max_gw_held[kind], gw_held)
            rx[kind] += rec["rx"]
        c1_lost = c1_ping_done[0] - c1_ping_done[1]
        c2_lost = c2_ping_done[0] - c2_ping_done[1]
        limit_hits = {k: v for k, v in sorted(events.items()) if k.startswith("limit-")}
        refused = sum(by_kind[k]["refused"] - by_kind[k]["connect-failed"] for k in KINDS)
        print(
            f"\nattack: {len(records)} connections opened from {N_SOURCES} addresses "
            f"({N_SOURCES * TASKS_PER_SOURCE} in flight), {attack_elapsed:.1f}s\n"
            f"peak held by the gateway (status, {poller.samples} samples): "
            f"{poller.peak_held} connections, {poller.peak_pending} of them pending "
            f"(limit {N_SOURCES} x {PER_SOURCE} = {N_SOURCES * PER_SOURCE})"
        )
        for kind in KINDS:
            print(
                f"  {kind:8s} {dict(sorted(by_kind[kind].items()))}\n"
                f"           held {min_held.get(kind, 0):.2f}..{max_held[kind]:.2f}s "
                f"(gw log max {max_gw_held[kind]:.1f}s, deadline {DEADLINE[kind]:g}s), "
                f"received {rx[kind]} octets"
            )
        print(
            f"honest: c1 {c1_ping_done[1]}/{c1_ping_done[0]} pings ({c1_lost} lost), "
            f"c2 set up in {c2_setup:.2f}s during the attack, "
            f"{c2_ping_done[1]}/{c2_ping_done[0]} pings ({c2_lost} lost)\n"
            f"refused (attacker's view) {refused}; limit hits {limit_hits}\nevents {events}\n"
            f"rss {rss0 >> 20} MiB -> peak {poller.peak_rss >> 20} MiB -> after {rss1 >> 20} MiB;"
            f" fds {fds0} -> peak {poller.peak_fds} -> {fds1};"
            f" test {time.monotonic() - t_start:.1f}s so far"
        )

        # --- honest clients ------------------------------------------------------------
        assert c2_during, "c2 finished pinging only after the attack"
        assert c2_conn["age"] <= c2_since + 1.0, (c2_conn, c2_since)  # set up while attacked
        assert c1_ping_done[0] >= C1_PINGS and c1_lost == 0, c1_ping_done
        assert c2_ping_done[0] >= C2_PINGS and c2_lost == 0, c2_ping_done
        assert _gw_conn(gw, c1)["id"] == c1_conn["id"]
        assert assert_established(gw, default_name(c1, gw))["initiator-spi"] == c1_spi
        assert _gw_conn(gw, c2)["ike_spis"] == [ike_sa(c2, default_name(c2, gw))["initiator-spi"]]
        assert_established(gw, default_name(c2, gw))
        assert_pings(c1, gw, count=2)
        assert_pings(c2, gw, count=2)

        # --- hostile connections -------------------------------------------------------
        # Several hundred held at once, never more than the addresses may hold.
        assert 0.75 * N_SOURCES * PER_SOURCE <= poller.peak_held <= N_SOURCES * PER_SOURCE
        assert len(records) > 3000, len(records)
        # Every connection of every kind ended because the gateway closed it, for its
        # kind's reason, within its deadline plus slack; refusals were immediate.
        assert not wrong, wrong[:10]
        assert not refused_long, refused_long[:10]
        for kind in KINDS:
            assert by_kind[kind]["accepted"] > 200, (kind, by_kind[kind])
            assert by_kind[kind]["still-open"] == 0, (kind, by_kind[kind])
            assert max_held[kind] <= DEADLINE[kind] + SLACK, (kind, max_held[kind])
            assert max_gw_held[kind] <= DEADLINE[kind] + SLACK, (kind, max_gw_held[kind])
        # ... and held as long as the deadline, not closed for something else first.
        assert min_held["ike"] >= NO_SA - 0.5, min_held
        for kind in ("garbage", "esp", "idle"):
            assert min_held[kind] >= FIRST - 0.5, (kind, min_held)
        assert rx["ike"] > 0, rx  # charon answered (NO_PROPOSAL_CHOSEN): admitted IKE
        assert rx["garbage"] == rx["esp"] == rx["idle"] == 0, rx
        # Every hostile connection the gateway closed is one the attacker recorded.
        assert not [k for k in closes if k[0] in sources], closes

        # Counted in status events and metrics, one per connection; logged (rate-limited).
        accepted = {k: by_kind[k]["accepted"] for k in KINDS}
        assert events.get("deadline") == accepted["garbage"] + accepted["esp"] + accepted["idle"]
        assert events.get("limit-no-sa") == accepted["ike"], (events, accepted)
        assert events.get("malformed-first") == accepted["garbage"], (events, accepted)
        assert events.get("unknown-esp-first") == accepted["esp"], (events, accepted)
        # Each refused connection is one limit-per-source hit, and nothing else refused.
        assert events.get("limit-per-source") == refused > 100, (events, refused)
        # The global limits had room for the honest newcomer: never hit.
        assert "limit-connections" not in events and "limit-pending" not in events, events
        assert "limit-frame-rate" not in events and "limit-steered" not in events, events
        lim = {dict(labels)["limit"]: v for (n, labels), v in samples.items()
               if n == "tcpencap_limit_hits_total"}  # fmt: skip
        assert lim.get("limit-no-sa") == events["limit-no-sa"], lim
        closed = {dict(labels)["reason"]: v for (n, labels), v in samples.items()
                  if n == "tcpencap_closed_total"}  # fmt: skip
        assert closed.get("no-IKE-SA") == accepted["ike"], closed
        assert closed.get("first-message-deadline") == events["deadline"], closed
        assert metric_sum(samples, "tcpencap_deadline_failures_total") == events["deadline"]
        warnings = [x for x in log.splitlines() if "WARNING" in x]
        no_sa = [x for x in warnings if "no IKE SA" in x and "after its first message" in x]
        assert 1 <= len(no_sa) <= attack_elapsed + 3, no_sa
        assert len(warnings) < 20 * (attack_elapsed + 3), len(warnings)

        # --- resources -----------------------------------------------------------------
        assert poller.peak_rss < rss0 + RSS_PEAK_MAX, (rss0, poller.peak_rss)
        assert rss1 < rss0 + RSS_AFTER_MAX, (rss0, rss1)
        assert fds1 <= fds0 + FD_SLACK, (fds0, fds1)  # c2's connection is one of them
