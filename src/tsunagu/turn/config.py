"""Every knob of the TURN server, in one frozen dataclass (as aioquic's QuicConfiguration).

The same names serve the command line (``--min-port``), the TOML file (``min-port`` or
``min_port``) and Python (``TurnServerConfig(min_port=...)``). Listening and TLS settings
are read by the asyncio driver; everything else shapes the sans-I/O core.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass

from tsunagu.address import format_address, parse_address
from tsunagu.stun.constants import DEFAULT_PORT, DEFAULT_TLS_PORT
from tsunagu.turn.constants import (
    DEFAULT_ALLOCATION_LIFETIME,
    DYNAMIC_PORT_MAX,
    DYNAMIC_PORT_MIN,
    MAX_ALLOCATION_LIFETIME,
)
from tsunagu.turn.transport import Address

METRICS_PORT = 9641
"""Default port of ``--metrics`` (coturn's Prometheus port)."""
LOG_FORMATS = ("text", "json")
MAX_WORKERS = 64
MIN_BANDWIDTH_BURST = 65536

__all__ = [
    "TurnServerConfig",
    "config_values",
    "format_address",
    "load_config",
    "parse_address",
    "parse_external_ip",
]


def parse_external_ip(text: str) -> tuple[str, str | None]:
    """``PUBLIC`` or ``PUBLIC/PRIVATE`` (``--external-ip``, as coturn spells it)."""
    public, sep, private = text.partition("/")
    try:
        public_ip = str(ipaddress.ip_address(public.strip()))
        private_ip = str(ipaddress.ip_address(private.strip())) if sep else None
    except ValueError:
        raise ValueError(f"--external-ip must be PUBLIC[/PRIVATE], got {text!r}") from None
    if private_ip is not None and (":" in public_ip) != (":" in private_ip):
        raise ValueError(f"--external-ip {text!r} mixes address families")
    return public_ip, private_ip


@dataclass(frozen=True, slots=True)
class TurnServerConfig:
    """Settings of ``tsunagu turn-server`` and :class:`~tsunagu.turn.server.TurnServerCore`."""

    # -- listening (RFC 8656 §4.1 default ports) ------------------------------------------
    listen: tuple[Address, ...] = (("0.0.0.0", DEFAULT_PORT),)
    """UDP and TCP listening addresses. Port 0 lets the OS pick one (tests)."""
    tls_listen: tuple[Address, ...] = ()
    """TLS-over-TCP listening addresses (conventionally port 5349); needs ``cert``/``key``."""
    cert: str | None = None
    """PEM certificate chain file for ``tls_listen``."""
    key: str | None = None
    """PEM private key file for ``tls_listen``."""

    # -- relaying (RFC 8656 §7.2) ---------------------------------------------------------
    relay_ips: tuple[str, ...] = ()
    """Relay addresses, at most one per family; empty means the listening addresses
    (which must then not be wildcards)."""
    min_port: int = DYNAMIC_PORT_MIN
    max_port: int = DYNAMIC_PORT_MAX
    """Relay port range, inclusive (§7.2: SHOULD be 49152-65535)."""
    external_ips: tuple[tuple[str, str | None], ...] = ()
    """(public, private or None) pairs for a server behind 1:1 NAT: relay sockets bind to
    the private address, XOR-RELAYED-ADDRESS names the public one. Without a private part
    the public address replaces the relay address of its family."""

    # -- authentication (RFC 8489 §9.2) ---------------------------------------------------
    realm: str = "tsunagu"
    """REALM of the long-term credentials; part of every user's key."""
    users: tuple[str, ...] = ()
    """``NAME:PASSWORD`` (or ``NAME:0xKEY``) static users."""
    users_file: str | None = None
    """File of further users, one ``NAME:PASSWORD`` or ``NAME:0xKEY`` per line."""
    auth_secrets: tuple[str, ...] = ()
    """TURN REST API shared secrets; the first signs nothing, all verify (rotation)."""
    nonce_lifetime: float = 600.0
    """Seconds a nonce is accepted before 438 Stale Nonce (RFC 8656 §5: at most an hour)."""

    # -- peer policy (see tsunagu.turn.policy) --------------------------------------------
    allow_peers: tuple[str, ...] = ()
    """CIDR blocks opened despite the built-in denials (longest prefix wins)."""
    deny_peers: tuple[str, ...] = ()
    """CIDR blocks refused in addition to the built-in denials."""

    relay_to_relay: bool = False
    """Let clients use this server's own relayed transport addresses as peers (two
    parties of a call both relaying through this server). Off by default: the issue's
    secure default refuses every own address; the listening ports stay refused always."""
    rfc5766_channels: bool = False
    """Accept the RFC 5766 channel numbers 0x5000-0x7FFF as well (ChannelBind and
    ChannelData), for clients written against RFC 5766; RFC 8656 §12 reserves them."""

    # -- lifetimes (RFC 8656 §7.2) --------------------------------------------------------
    default_lifetime: int = DEFAULT_ALLOCATION_LIFETIME
    max_lifetime: int = MAX_ALLOCATION_LIFETIME

    # -- quotas ---------------------------------------------------------------------------
    max_allocations: int = 10_000
    """Allocations in total; beyond it Allocate answers 486."""
    max_allocations_per_user: int = 100
    """Allocations per username (RFC 8656 §7.2 step 10: quotas by username); 486."""
    max_permissions_per_allocation: int = 64
    """Permissions per allocation; beyond it CreatePermission answers 508 (§10.2)."""
    max_channels_per_allocation: int = 64
    """Channel bindings per allocation; beyond it ChannelBind answers 508 (§12.2)."""
    max_tcp_connections_per_allocation: int = 64
    """RFC 6062 peer connections per TCP allocation; beyond it Connect answers 508 and
    incoming connections are refused."""
    unauthenticated_rate: float = 20.0
    """Requests per second per source (IPv4 address or IPv6 /64) answered without
    credentials (401, 438, 400 before authentication, Binding); the excess is dropped
    unanswered, so the server cannot be used to reflect floods at a spoofed address."""
    unauthenticated_burst: int = 200
    """Bucket size of that rate limit (a NAT with many clients shares one source IP)."""
    bandwidth_limit: int = 0
    """Relayed bytes per second per allocation, both directions together (payload bytes,
    token bucket); packets beyond it are dropped and counted. 0: no limit."""
    bandwidth_burst: int = 0
    """Bucket size of that limit in bytes; 0 means one second's worth (at least 64 KiB,
    so that one large datagram always fits)."""

    # -- operations -----------------------------------------------------------------------
    software: str | None = None
    """SOFTWARE attribute in responses (RFC 8656 §5 SHOULD); None keeps the server's
    version private."""
    drain_timeout: float = 30.0
    """After SIGTERM: seconds existing allocations keep relaying before the server exits
    (it exits sooner when the last one is gone)."""
    max_connections: int = 4096
    """Open TCP plus TLS client connections; further ones are closed at once."""
    idle_timeout: float = 60.0
    """Seconds a TCP/TLS connection may stay open without an allocation (and a TLS
    handshake may take) before the server closes it."""
    log_level: str = "info"
    """Python logging level of the command-line server: debug, info, warning, error."""
    log_format: str = "text"
    """Log lines as ``event key=value ...`` text, or one JSON object per line ("json")."""
    metrics: Address | None = None
    """Where to serve Prometheus metrics (``/metrics``) and the health check
    (``/healthz``) over HTTP; None: nowhere. Keep it on a private address."""
    workers: int = 1
    """Processes sharing the listening ports (SO_REUSEPORT), each relaying its own
    clients; the relay port range is split between them."""

    def __post_init__(self) -> None:
        if not self.listen and not self.tls_listen:
            raise ValueError("nothing to listen on")
        if (self.cert is None) != (self.key is None):
            raise ValueError("--cert and --key go together")
        if self.tls_listen and self.cert is None:
            raise ValueError("--tls-listen needs --cert and --key")
        if not 1 <= self.min_port <= self.max_port <= 65535:
            raise ValueError(f"bad relay port range {self.min_port}-{self.max_port}")
        families = [":" in ip for ip in self.relay_ips]
        if len(set(families)) != len(families):
            raise ValueError("at most one --relay-ip per address family")
        for ip in self.relay_ips:
            ipaddress.ip_address(ip)
        if not self.realm:
            raise ValueError("the realm must not be empty")
        if not 0 < self.default_lifetime <= self.max_lifetime:
            raise ValueError("need 0 < default lifetime <= max lifetime")
        if not (math.isfinite(self.nonce_lifetime) and 0 < self.nonce_lifetime <= 3600):
            raise ValueError("nonce lifetime must be within (0, 3600] s (RFC 8656 §5)")
        for name in (
            "max_allocations",
            "max_allocations_per_user",
            "max_permissions_per_allocation",
            "max_channels_per_allocation",
            "max_tcp_connections_per_allocation",
            "max_connections",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not (self.drain_timeout >= 0 and self.idle_timeout > 0):
            raise ValueError("need drain_timeout >= 0 and idle_timeout > 0")
        if self.log_level not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError(f"unknown log level {self.log_level!r}")
        if not self.unauthenticated_rate > 0 or self.unauthenticated_burst < 1:
            raise ValueError("need unauthenticated_rate > 0 and unauthenticated_burst >= 1")
        if self.bandwidth_limit < 0 or self.bandwidth_burst < 0:
            raise ValueError("bandwidth_limit and bandwidth_burst must not be negative")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"unknown log format {self.log_format!r} (text or json)")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be within 1..{MAX_WORKERS}")
        if self.max_port - self.min_port + 1 < 2 * self.workers:
            raise ValueError("the relay port range needs at least 2 ports per worker")

    @property
    def effective_bandwidth_burst(self) -> int:
        """The bandwidth bucket size in bytes (see ``bandwidth_burst``)."""
        if self.bandwidth_burst:
            return self.bandwidth_burst
        return max(self.bandwidth_limit, MIN_BANDWIDTH_BURST)

    def worker_ports(self, index: int) -> tuple[int, int]:
        """The relay ports of worker ``index`` of ``workers``: a slice of the range, so
        that workers never compete for (or share, RFC 6062 listeners being
        SO_REUSEPORT) a relay port."""
        span = (self.max_port - self.min_port + 1) // self.workers
        first = self.min_port + index * span
        last = self.max_port if index == self.workers - 1 else first + span - 1
        return first, last

    @property
    def has_credentials(self) -> bool:
        return bool(self.users or self.users_file or self.auth_secrets)


# TOML keys and how to turn their values into field values. Keys may use - or _.
_ADDRESS_LISTS = {"listen": DEFAULT_PORT, "tls_listen": DEFAULT_TLS_PORT}
_STRING_LISTS = ("relay_ips", "users", "auth_secrets", "allow_peers", "deny_peers")
_ALIASES = {
    # singular spellings, as the command-line flags are named
    "relay_ip": "relay_ips",
    "user": "users",
    "auth_secret": "auth_secrets",
    "allow_peer": "allow_peers",
    "deny_peer": "deny_peers",
    "external_ip": "external_ips",
}


def _as_list(name: str, value: object) -> list[object]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise ValueError(f"{name}: expected a string or a list of strings")


def _check_scalar(name: str, declared: str, value: object) -> object:
    """TOML gives typed values; refuse the wrong type with the setting's name."""
    if declared == "bool" and not isinstance(value, bool):
        raise ValueError(f"{name}: expected true or false")
    if declared == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{name}: expected an integer")
    if declared == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{name}: expected a number")
        return float(value)
    if declared.startswith("str") and not isinstance(value, str):
        raise ValueError(f"{name}: expected a string")
    return value


def config_values(data: Mapping[str, object]) -> dict[str, object]:
    """Field values from a parsed TOML table (or any mapping of the same shape)."""
    declared = {f.name: str(f.type) for f in dataclasses.fields(TurnServerConfig)}
    values: dict[str, object] = {}
    unknown: list[str] = []
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        key = _ALIASES.get(key, key)
        if key not in declared:
            unknown.append(raw_key)
            continue
        if key in _ADDRESS_LISTS:
            items = _as_list(raw_key, value)
            values[key] = tuple(parse_address(str(v), _ADDRESS_LISTS[key]) for v in items)
        elif key in _STRING_LISTS:
            values[key] = tuple(str(v) for v in _as_list(raw_key, value))
        elif key == "metrics":
            values[key] = parse_address(str(value), METRICS_PORT)
        elif key == "external_ips":
            values[key] = tuple(parse_external_ip(str(v)) for v in _as_list(raw_key, value))
        else:
            values[key] = _check_scalar(raw_key, declared[key], value)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    return values


def load_config(text: str, **overrides: object) -> TurnServerConfig:
    """Parse a TOML configuration; ``overrides`` (e.g. from the command line) win."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"configuration is not valid TOML: {exc}") from None
    values = config_values(data)
    values.update(overrides)
    return TurnServerConfig(**values)  # type: ignore[arg-type]
