"""Command line: ``tcpencap run | status | reload | check-config | install-rules |
remove-rules | version``.

Exit codes: 0 success, 1 runtime failure (daemon could not start, status socket
unreachable), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from tcpencap import __version__
from tcpencap.config import Config, load_config
from tcpencap.confparse import ConfError

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def _load(path: str | None) -> Config:
    return load_config(path)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    level = (args.log_level or cfg.log_level).upper()
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from tcpencap.aio.daemon import Daemon

    try:
        asyncio.run(Daemon(cfg, remove_rules=args.remove_rules).run())
    except (OSError, RuntimeError) as exc:
        logging.getLogger("tcpencap").error("cannot run: %s", exc)
        return EXIT_FAIL
    return EXIT_OK


def _fmt_status(st: dict[str, Any]) -> str:
    lines = [
        f"tcpencap pid {st['pid']}, up {st['uptime']}s, config {st['config']}, VICI {st['vici']}",
        f"data path: {st.get('datapath', 'python')}",
        f"listening: {', '.join(st['listening']) or '-'}",
        f"steered peers: {', '.join(st['steered_peers']) or '-'}",
        f"queue: {st['queue']['packets']} packets, drops: {st['drops'] or '-'}",
        f"connections: {len(st['connections'])}",
    ]
    for c in st["connections"]:
        lines.append(
            f"  #{c['id']} {c['side']:<7} {c['state']:<15} {c['local']} <-> {c['peer']}"
            f"  age {c['age']}s"
        )
        lines.append(
            f"      frames in/out {c['frames_in']}/{c['frames_out']}"
            f"  bytes in/out {c['bytes_in']}/{c['bytes_out']}"
        )
        lines.append(
            f"      IKE SPIs {', '.join(c['ike_spis']) or '-'}"
            + (f" (previous {', '.join(c['ike_spis_old'])})" if c["ike_spis_old"] else "")
        )
        lines.append(f"      ESP SPIs {', '.join(c['esp_spis']) or '-'}")
        if c["drops"]:
            drops = ", ".join(f"{k}={v}" for k, v in sorted(c["drops"].items()))
            lines.append(f"      drops {drops}")
    return "\n".join(lines)


def _ask(args: argparse.Namespace, command: str) -> dict[str, Any] | None:
    """One command over the control socket; None (after a message) if it failed."""
    cfg = _load(args.config)  # a broken file is refused before the daemon is bothered
    path = args.socket or cfg.status_socket
    from tcpencap.aio.control import query_status

    try:
        return asyncio.run(query_status(path, command=command))
    except (OSError, TimeoutError) as exc:
        print(f"tcpencap: cannot reach {path}: {exc}", file=sys.stderr)
    except ValueError as exc:
        print(f"tcpencap: bad reply from {path}: {exc}", file=sys.stderr)
    return None


def cmd_status(args: argparse.Namespace) -> int:
    st = _ask(args, "status")
    if st is None:
        return EXIT_FAIL
    print(json.dumps(st, indent=2) if args.json else _fmt_status(st))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    reply = _ask(args, "reload")
    if reply is None:
        return EXIT_FAIL
    if "error" in reply:
        print(f"tcpencap: reload refused: {reply['error']}", file=sys.stderr)
        return EXIT_CONFIG
    for line in reply.get("changes", []) or ["nothing changed"]:
        print(line)
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the file, then (unless --offline) compare it with charon's loaded
    connections and say what each named connection will do."""
    cfg = _load(args.config)
    print(f"{cfg.source}: syntax and values OK")
    if cfg.gateway.listen:
        print("gateway: RFC 9329 on " + ", ".join(_ep(h, p) for h, p in cfg.gateway.listen))
    if cfg.gateway.tls_listen:
        print(
            "gateway: RFC 9329 over TLS on "
            + ", ".join(_ep(h, p) for h, p in cfg.gateway.tls_listen)
        )
    if cfg.gateway.proxy_protocol_from:
        print(
            "gateway: PROXY v2 header required from " + ", ".join(cfg.gateway.proxy_protocol_from)
        )
    if cfg.gateway.ctcp_listen:
        print("gateway: cTCP on " + ", ".join(_ep(h, p) for h, p in cfg.gateway.ctcp_listen))
    conns: dict[str, dict[str, Any]] | None = None
    if not args.offline and cfg.connections:
        from vici_bridge.resolve import get_conns
        from vici_bridge.session import text

        try:
            conns = {k: v for item in get_conns(cfg.vici_socket) for k, v in text(item).items()}
        except OSError as exc:
            print(f"tcpencap: cannot ask charon at {cfg.vici_socket}: {exc}", file=sys.stderr)
            return EXIT_FAIL
    problems = 0
    for name, c in sorted(cfg.connections.items()):
        where = ", ".join(c.remote_addrs)
        loaded = conns.get(name) if conns is not None else None
        if conns is not None and loaded is None:
            print(f"connection {name}: NOT loaded in charon (swanctl --load-conns?)")
            problems += 1
            continue
        if not where:
            where = (
                ", ".join(loaded.get("remote_addrs", [])) if loaded else "(charon's remote_addrs)"
            )
        mode = {
            "tcp": "always over TCP",
            "fallback": f"UDP first, TCP after {c.fallback_timeout:g}s without an answer",
            "udp": "never over TCP (plain UDP)",
        }[c.transport]
        print(f"connection {name}: {mode}, {c.encapsulation} to {where} port {c.remote_port}")
        if (
            loaded is not None
            and loaded.get("version") not in (None, "IKEv2", "2")
            and (c.encapsulation == "rfc9329")
        ):
            print(f"  note: {name} is {loaded.get('version')}; RFC 9329 is specified for IKEv2")
    if conns is not None:
        print(f"charon at {cfg.vici_socket}: {len(conns)} connection(s) loaded")
    return EXIT_CONFIG if problems else EXIT_OK


def _ep(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def cmd_remove_rules(args: argparse.Namespace) -> int:
    """Take tcpencap's netfilter rules and sets away (they outlive the daemon on purpose:
    while they are there, charon's packets to TCP peers are dropped, never sent as UDP).
    Refused while a daemon answers on the control socket, unless --force."""
    cfg = _load(args.config)
    logging.basicConfig(level="INFO", format="%(message)s", stream=sys.stderr)
    if not args.force and cfg.status_socket:
        from tcpencap.aio.control import query_status

        try:
            asyncio.run(query_status(cfg.status_socket, command="status"))
        except (OSError, TimeoutError, ValueError):
            pass  # nobody there: go ahead
        else:
            print(
                f"tcpencap: a daemon answers on {cfg.status_socket}; stop it first (or --force)",
                file=sys.stderr,
            )
            return EXIT_FAIL
    from nfq.ctcp_rules import CtcpRules
    from nfq.rules import RuleError, SteeringRules

    try:
        SteeringRules(cfg.queue_num, queues=cfg.queues).remove()
        CtcpRules(cfg.queue_num + cfg.queues).remove()
    except (OSError, RuleError) as exc:
        print(f"tcpencap: cannot remove the rules: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def cmd_install_rules(args: argparse.Namespace) -> int:
    """Before charon starts (the strongswan.service drop-in's ExecStartPre=): the chains
    and sets, empty, and on a TCP client the rules that queue all of charon's IKE to the
    check nobody reads yet. So IKE that charon sends before tcpencap runs (start_action =
    start) is dropped, never sent as UDP; a daemon that runs already is not touched."""
    cfg = _load(args.config)
    logging.basicConfig(level="INFO", format="%(message)s", stream=sys.stderr)
    from nfq.rules import RuleError, SteeringRules

    rules = SteeringRules(cfg.queue_num, queues=cfg.queues, endpoints=True)
    if any(c.transport != "udp" for c in cfg.connections.values()):
        rules.classify_queue = cfg.ike_guard_queue  # as the daemon's
    try:
        rules.install()
        rules.release()
    except (OSError, RuleError) as exc:
        print(f"tcpencap: cannot install the rules: {exc}", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def cmd_version(_: argparse.Namespace) -> int:
    print(f"tcpencap {__version__}")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tcpencap", description="IKE and IPsec over TCP for strongSwan"
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the daemon in the foreground")
    r.add_argument("--config", help="configuration file (default /etc/strongswan.d/tcpencap.conf)")
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    r.add_argument(
        "--remove-rules-on-stop",
        dest="remove_rules",
        action="store_true",
        help="take the netfilter rules away at stop (by default they stay: TCP peers' "
        "packets are dropped while tcpencap is down, never sent as UDP)",
    )
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("status", help="show the live connections")
    s.add_argument("--config")
    s.add_argument("--socket", help="control socket (default: status_socket of the config)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    c = sub.add_parser("check-config", help="validate the configuration against charon")
    c.add_argument("--config")
    c.add_argument("--offline", action="store_true", help="do not ask charon over VICI")
    c.set_defaults(func=cmd_check_config)
    rl = sub.add_parser("reload", help="re-read the configuration (same as SIGHUP)")
    rl.add_argument("--config")
    rl.add_argument("--socket", help="control socket (default: status_socket of the config)")
    rl.set_defaults(func=cmd_reload)
    ins = sub.add_parser("install-rules", help="install the netfilter rules before charon starts")
    ins.add_argument("--config")
    ins.set_defaults(func=cmd_install_rules)
    rm = sub.add_parser(
        "remove-rules", help="remove tcpencap's netfilter rules and sets (daemon stopped)"
    )
    rm.add_argument("--config")
    rm.add_argument("--force", action="store_true", help="even while a daemon answers")
    rm.set_defaults(func=cmd_remove_rules)
    v = sub.add_parser("version")
    v.set_defaults(func=cmd_version)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfError as exc:
        print(f"tcpencap: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
