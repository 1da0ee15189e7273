"""``tsunagu turn-server``: a TURN relay (RFC 8656) with long-term credentials, TURN REST
API secrets and a deny-by-default peer policy.

Every flag has a TOML spelling for ``--config FILE`` (``--min-port`` is ``min-port``,
repeatable flags take lists: ``user = ["alice:secret"]``); flags given on the command line
win over the file. Prints one ``listening ...`` line on stdout once every socket is bound;
SIGTERM (or SIGINT) stops new allocations, lets existing ones relay for up to
``--drain-timeout`` seconds, and exits 0. SIGHUP re-reads ``--config`` and
``--users-file`` and applies users, REST secrets and the peer policy without dropping
allocations (permissions the new policy refuses are dropped at once).

Scaling out with the TURN REST API: give every server the same ``--auth-secret`` (and
realm). A web service hands each client a username ``EXPIRY:USER`` and the password
``base64(HMAC-SHA1(secret, username))``; any server accepts it until EXPIRY (Unix time)
without sharing state with the others, so servers can sit behind DNS round robin or a load
balancer. Several ``--auth-secret`` flags rotate secrets: all are accepted.

Operations. Logs go to stderr as ``event key=value ...`` lines, or one JSON object per
line with ``--log-format json``: allocation lifecycle (``allocation-created``,
``-refreshed``, ``-deleted``, ``-expired``), ``auth-failed`` with the source address,
``request-rejected`` with the reason. ``--metrics HOST:PORT`` serves Prometheus
``/metrics`` (allocations, permissions, channels; packets and bytes relayed per direction;
drops by reason; auth failures and error responses by code) and ``/healthz`` (200 while
serving, 503 while draining) over HTTP; the counters are read when Prometheus scrapes.

``--workers N`` runs N processes sharing the listening ports (SO_REUSEPORT), each with
its own allocations and a slice of the relay port range. On Linux a small BPF program
(SO_ATTACH_REUSEPORT_CBPF) picks the worker by the client's IP address, so that
everything one host sends -- its UDP allocations, an RTCP Allocate with the RTP one's
RESERVATION-TOKEN, an RFC 6062 control connection and its data connections -- reaches the
same worker (many clients behind one NAT address share a worker). A supervisor restarts a
worker that dies (its allocations are lost; the kernel may then move other clients
between workers, which see 437 and reallocate), forwards SIGTERM and SIGHUP, and serves
``--metrics`` for all of them. RFC 6062 when a data connection still reaches another
worker (another source address, or after a restart): the worker owning a CONNECTION-ID is
encoded in it (``id % N``), and a worker that receives another's ConnectionBind passes the
connection (socket and bytes read) to the owner over a Unix socket. TLS connections cannot
be passed on, so with several workers an RFC 6062 TCP allocation over TLS is refused with
442 (use TCP, or one worker). A RESERVATION-TOKEN used from another host's address may
land on a worker that does not hold it: 508.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tsunagu.aio.loop import run as run_loop
from tsunagu.aio.turn_server import (
    LogEvent,
    MetricsEndpoint,
    TurnServer,
    configure_logging,
    hold_listening_ports,
    merge_snapshots,
    render_metrics,
)
from tsunagu.aio.workers import Supervisor, WorkerContext
from tsunagu.turn.config import (
    LOG_FORMATS,
    METRICS_PORT,
    TurnServerConfig,
    format_address,
    load_config,
    parse_address,
    parse_external_ip,
)
from tsunagu.turn.server import build_users

EXIT_OK = 0
EXIT_USAGE = 2

log = logging.getLogger("tsunagu.turn")

# flag dest -> config field, for flags that map one to one.
_SCALARS = {
    "cert": "cert",
    "key": "key",
    "min_port": "min_port",
    "max_port": "max_port",
    "realm": "realm",
    "users_file": "users_file",
    "nonce_lifetime": "nonce_lifetime",
    "max_allocations": "max_allocations",
    "max_allocations_per_user": "max_allocations_per_user",
    "max_permissions": "max_permissions_per_allocation",
    "max_channels": "max_channels_per_allocation",
    "drain_timeout": "drain_timeout",
    "software": "software",
    "log_level": "log_level",
    "rfc5766_channels": "rfc5766_channels",
    "relay_to_relay": "relay_to_relay",
    "max_tcp_connections": "max_tcp_connections_per_allocation",
    "bandwidth_limit": "bandwidth_limit",
    "bandwidth_burst": "bandwidth_burst",
    "log_format": "log_format",
    "metrics": "metrics",
    "workers": "workers",
}
_LISTS = {
    "listen": "listen",
    "tls_listen": "tls_listen",
    "relay_ip": "relay_ips",
    "external_ip": "external_ips",
    "user": "users",
    "auth_secret": "auth_secrets",
    "allow_peer": "allow_peers",
    "deny_peer": "deny_peers",
}


def _address(default_port: int) -> Callable[[str], tuple[str, int]]:
    def parse(text: str) -> tuple[str, int]:
        try:
            return parse_address(text, default_port)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _external(text: str) -> tuple[str, str | None]:
    try:
        return parse_external_ip(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "turn-server",
        help="run a TURN relay server (RFC 8656)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TurnServerConfig()
    net = parser.add_argument_group("listening and relaying")
    net.add_argument(
        "--listen",
        action="append",
        type=_address(3478),
        metavar="HOST:PORT",
        help="UDP and TCP address, repeatable (default 0.0.0.0:3478; [::]:3478 for IPv6)",
    )
    net.add_argument(
        "--tls-listen",
        action="append",
        type=_address(5349),
        metavar="HOST:PORT",
        help="TLS-over-TCP address, repeatable (needs --cert and --key; port default 5349)",
    )
    net.add_argument("--cert", metavar="FILE", help="PEM certificate chain for --tls-listen")
    net.add_argument("--key", metavar="FILE", help="PEM private key for --tls-listen")
    net.add_argument(
        "--relay-ip",
        action="append",
        metavar="IP",
        help="relay address, one per family (default: the --listen IPs)",
    )
    net.add_argument("--min-port", type=int, help=f"first relay port (default {d.min_port})")
    net.add_argument("--max-port", type=int, help=f"last relay port (default {d.max_port})")
    net.add_argument(
        "--external-ip",
        action="append",
        type=_external,
        metavar="PUBLIC[/PRIVATE]",
        help="advertise PUBLIC for the relay address PRIVATE (server behind 1:1 NAT)",
    )
    auth = parser.add_argument_group("authentication")
    auth.add_argument("--realm", help=f"long-term credential realm (default {d.realm!r})")
    auth.add_argument(
        "--user", action="append", metavar="NAME:PASSWORD", help="a static user, repeatable"
    )
    auth.add_argument(
        "--users-file", metavar="FILE", help="NAME:PASSWORD or NAME:0xKEY lines (# comments)"
    )
    auth.add_argument(
        "--auth-secret",
        action="append",
        metavar="SECRET",
        help="TURN REST API shared secret, repeatable (all accepted: rotation)",
    )
    auth.add_argument(
        "--nonce-lifetime",
        type=float,
        metavar="SECONDS",
        help=f"nonce validity before 438 (default {d.nonce_lifetime:g})",
    )
    net.add_argument(
        "--rfc5766-channels",
        action="store_const",
        const=True,
        help="also accept channel numbers 0x5000-0x7FFF (RFC 5766 clients)",
    )
    policy = parser.add_argument_group("peer policy and quotas")
    policy.add_argument(
        "--allow-peer",
        action="append",
        metavar="CIDR",
        help="open a block the default policy refuses (e.g. 10.0.0.0/8), repeatable",
    )
    policy.add_argument(
        "--deny-peer", action="append", metavar="CIDR", help="refuse a block, repeatable"
    )
    policy.add_argument(
        "--relay-to-relay",
        action="store_const",
        const=True,
        help="allow this server's own relayed addresses as peers (both ends relaying here)",
    )
    policy.add_argument(
        "--max-allocations",
        type=int,
        metavar="N",
        help=f"allocations in total (default {d.max_allocations})",
    )
    policy.add_argument(
        "--max-allocations-per-user",
        type=int,
        metavar="N",
        help=f"allocations per username (default {d.max_allocations_per_user})",
    )
    policy.add_argument(
        "--max-permissions",
        type=int,
        metavar="N",
        help=f"permissions per allocation (default {d.max_permissions_per_allocation})",
    )
    policy.add_argument(
        "--max-channels",
        type=int,
        metavar="N",
        help=f"channels per allocation (default {d.max_channels_per_allocation})",
    )
    policy.add_argument(
        "--max-tcp-connections",
        type=int,
        metavar="N",
        help=f"RFC 6062 peer connections per TCP allocation (default "
        f"{d.max_tcp_connections_per_allocation})",
    )
    policy.add_argument(
        "--bandwidth-limit",
        type=int,
        metavar="BYTES_PER_S",
        help="relayed payload bytes per second per allocation, both directions together; "
        "the excess is dropped (default 0: no limit)",
    )
    policy.add_argument(
        "--bandwidth-burst",
        type=int,
        metavar="BYTES",
        help="bucket size of --bandwidth-limit (default: one second's worth, >= 64 KiB)",
    )
    ops = parser.add_argument_group("operations")
    ops.add_argument("--config", metavar="FILE", help="TOML file with any of these settings")
    ops.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help=f"after SIGTERM, relay for existing allocations this long (default "
        f"{d.drain_timeout:g})",
    )
    ops.add_argument("--software", help="SOFTWARE attribute in responses (default none)")
    ops.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error", "critical"),
        help=f"log level on stderr (default {d.log_level})",
    )
    ops.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="log lines as 'event key=value ...' text or one JSON object per line "
        f"(default {d.log_format})",
    )
    ops.add_argument(
        "--metrics",
        type=_address(METRICS_PORT),
        metavar="HOST:PORT",
        help=f"serve Prometheus /metrics and /healthz over HTTP here (port default "
        f"{METRICS_PORT}; keep it private)",
    )
    ops.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes sharing the listening ports with SO_REUSEPORT (default 1)",
    )


def build_config(args: argparse.Namespace) -> TurnServerConfig:
    """The configuration from ``--config`` (if any) and the flags; raises ValueError."""
    overrides: dict[str, object] = {}
    for dest, name in _SCALARS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[name] = value
    for dest, name in _LISTS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[name] = tuple(value)
    if args.config is not None:
        try:
            text = Path(args.config).read_text()
        except OSError as exc:
            raise ValueError(f"cannot read {args.config}: {exc.strerror}") from None
        return load_config(text, **overrides)
    return TurnServerConfig(**overrides)  # type: ignore[arg-type]


def listening_line(server: TurnServer) -> str:
    """``listening udp 127.0.0.1:3478, tcp 127.0.0.1:3478, relay 127.0.0.1 49152-65535``
    (and ``, metrics 127.0.0.1:9641`` with ``--metrics``)."""
    parts = [f"udp {format_address(a)}" for a in server.udp_addresses]
    parts += [f"tcp {format_address(a)}" for a in server.tcp_addresses]
    parts += [f"tls {format_address(a)}" for a in server.tls_addresses]
    config = server.config
    for endpoint in server.core.relay_endpoints:
        shown = endpoint.bind_ip
        if endpoint.advertised_ip != endpoint.bind_ip:
            shown += f" as {endpoint.advertised_ip}"
        parts.append(f"relay {shown} {config.min_port}-{config.max_port}")
    if server.metrics_address is not None:
        parts.append(f"metrics {format_address(server.metrics_address)}")
    return "listening " + ", ".join(parts)


_RESTART_ONLY = (
    "listen",
    "tls_listen",
    "cert",
    "key",
    "relay_ips",
    "min_port",
    "max_port",
    "external_ips",
    "realm",
    "workers",
    "metrics",
    "log_format",
    "bandwidth_limit",
    "bandwidth_burst",
)


def _reload(server: TurnServer, reread: Callable[[], TurnServerConfig]) -> None:
    """SIGHUP: re-read the configuration and users file; apply credentials and policy."""
    try:
        config = reread()
        text = Path(config.users_file).read_text() if config.users_file else None
        users = build_users(config, text)
    except (OSError, ValueError, TypeError) as exc:
        log.error(
            LogEvent("reload-failed", error=str(exc), action="keeping-the-running-configuration")
        )
        return
    ignored = [n for n in _RESTART_ONLY if getattr(config, n) != getattr(server.config, n)]
    if ignored:
        log.warning(LogEvent("reload-ignored", settings=",".join(ignored), action="restart-needed"))
    dropped = server.reload(config, users)
    log.info(
        LogEvent("reloaded", users=len(users), secrets=len(config.auth_secrets), dropped=dropped)
    )


async def serve(
    config: TurnServerConfig,
    announce: Callable[[str], None],
    reread: Callable[[], TurnServerConfig] | None = None,
    *,
    reuse_port: bool = False,
    worker: WorkerContext | None = None,
) -> int:
    """Run until SIGTERM/SIGINT, then drain and close; returns the exit status. SIGHUP
    calls ``reread`` for a fresh configuration and applies its users and peer policy.
    ``reuse_port`` and ``worker``: this is one worker of ``--workers``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server = await TurnServer.start(config, reuse_port=reuse_port, worker=worker)
    signals = [signal.SIGTERM, signal.SIGINT]
    try:
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
        if reread is not None:
            loop.add_signal_handler(signal.SIGHUP, _reload, server, reread)
            signals.append(signal.SIGHUP)
        announce(listening_line(server))
        await stop.wait()
        log.info(
            LogEvent(
                "draining",
                allocations=server.core.allocation_count,
                timeout=f"{config.drain_timeout:g}",
            )
        )
        await server.drain(config.drain_timeout)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        await server.close()
    return EXIT_OK


_STOP_MARGIN = 10.0  # seconds the supervisor adds to --drain-timeout before SIGKILL
_SCRAPE_TIMEOUT = 2.0  # seconds the supervisor waits for its workers' metrics


def serve_workers(
    config: TurnServerConfig,
    announce: Callable[[str], None],
    reread: Callable[[], TurnServerConfig] | None = None,
) -> int:
    """``--workers N``: N processes share the listening ports (SO_REUSEPORT), each with its
    own allocations and its slice of the relay port range, under a supervisor
    (:class:`~tsunagu.aio.workers.Supervisor`) that restarts dead workers, forwards
    SIGTERM (each worker drains) and SIGHUP (each worker reloads), and serves
    ``--metrics``: a scrape asks every worker for its counters and adds them up."""
    held, resolved = hold_listening_ports(config)
    worker_config = dataclasses.replace(resolved, metrics=None)
    endpoint: MetricsEndpoint | None = None

    def worker(context: WorkerContext, ready: Callable[[str], None]) -> int:
        if endpoint is not None:
            endpoint.forget()  # the supervisor's listening socket, inherited by fork
        worker_reread: Callable[[], TurnServerConfig] | None = None
        if reread is not None:
            fetch = reread

            def worker_reread() -> TurnServerConfig:
                return dataclasses.replace(
                    fetch(), listen=resolved.listen, tls_listen=resolved.tls_listen, metrics=None
                )

        return run_loop(serve(worker_config, ready, worker_reread, reuse_port=True, worker=context))

    def announce_ready(line: str) -> None:
        if endpoint is not None:
            line += f", metrics {format_address(endpoint.address)}"
        announce(f"{line}, workers {config.workers}")

    supervisor = Supervisor(
        config.workers,
        worker,
        announce_ready,
        held=held,
        stop_timeout=config.drain_timeout + _STOP_MARGIN,
        forward=(signal.SIGHUP,) if reread is not None else (),
    )
    if config.metrics is not None:

        def render() -> bytes:
            answers = supervisor.query(b"stats", _SCRAPE_TIMEOUT)
            snapshots = {index: json.loads(answer) for index, answer in answers}
            total = merge_snapshots(snapshots.values())
            total["workers"] = len(answers)
            total["worker_packets"] = {
                str(index): sum(snapshot.get("packets", {}).values())
                for index, snapshot in snapshots.items()
            }
            return render_metrics(total)

        try:
            endpoint = MetricsEndpoint(config.metrics, render, lambda: not supervisor.stopping)
        except BaseException:
            for sock in held:
                sock.close()
            raise
    try:
        return supervisor.run()
    finally:
        if endpoint is not None:
            endpoint.close()


def run(args: argparse.Namespace) -> int:
    try:
        config = build_config(args)
    except (ValueError, TypeError) as exc:
        print(f"tsunagu turn-server: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not config.has_credentials:
        print(
            "tsunagu turn-server: no credentials: give --user, --users-file or --auth-secret",
            file=sys.stderr,
        )
        return EXIT_USAGE
    configure_logging(config.log_level, config.log_format)

    def announce(line: str) -> None:
        print(line, flush=True)

    try:
        if config.workers > 1:
            return serve_workers(config, announce, lambda: build_config(args))
        return run_loop(serve(config, announce, lambda: build_config(args)))
    except (OSError, ValueError) as exc:
        print(f"tsunagu turn-server: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run this sub-command alone: ``python -m tsunagu.cli.turn_server ...``."""
    parser = argparse.ArgumentParser(prog="tsunagu turn-server", description=__doc__)
    add_arguments(parser)
    with contextlib.suppress(KeyboardInterrupt):
        return run(parser.parse_args(argv))
    return 130


if __name__ == "__main__":
    sys.exit(main())
