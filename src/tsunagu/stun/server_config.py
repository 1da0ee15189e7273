"""Every knob of ``tsunagu stun-server``, in one frozen dataclass (as aioquic's
QuicConfiguration): each default is documented where it is defined.

The same names serve Python (``StunServerConfig(rate_limit=...)``), the TOML file
(``rate-limit`` or ``rate_limit``) and the command line (``--rate-limit``); command-line
flags override the file. Listening, TLS, worker and connection settings are read by the
asyncio driver (:mod:`tsunagu.aio.stun_server`); the rest shapes the sans-I/O core
(:class:`tsunagu.stun.server.StunServerCore`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tsunagu import SOFTWARE
from tsunagu.address import parse_address
from tsunagu.stun.attributes import Address
from tsunagu.stun.constants import DEFAULT_PORT, DEFAULT_TLS_PORT

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
MAX_WORKERS = 256  # a sanity bound: more processes than this is a typo, not a deployment
MAX_PADDING_LENGTH = 65000  # RFC 5780 §7.6: PADDING must keep the IP datagram under 64 KiB


def _is_wildcard(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_unspecified


def _is_v6(ip: str) -> bool:
    return ":" in ip


@dataclass(frozen=True, slots=True)
class StunServerConfig:
    """Settings of ``tsunagu stun-server``, :class:`~tsunagu.aio.stun_server.StunServer`
    and :class:`~tsunagu.stun.server.StunServerCore`."""

    # -- listening (RFC 8489 §6.2: a server MUST support UDP and TCP) ----------------------
    listen: tuple[Address, ...] = (("0.0.0.0", DEFAULT_PORT),)
    """UDP *and* TCP listening addresses. Default ``0.0.0.0:3478`` (RFC 8489 §18.6); add
    ``[::]:3478`` for IPv6 (IPv6 sockets are IPv6-only, so both can be bound). Port 0 lets
    the OS pick one, shared by the UDP and TCP socket of that address (tests)."""
    tls_listen: tuple[Address, ...] = ()
    """TLS-over-TCP listening addresses (RFC 8489 §6.2.3; conventionally port 5349).
    Empty by default; needs ``cert`` and ``key``."""
    cert: str | None = None
    """PEM certificate chain file for ``tls_listen``. No default."""
    key: str | None = None
    """PEM private key file for ``tls_listen``. No default."""

    # -- RFC 5780 NAT behaviour discovery ---------------------------------------------------
    other: Address | None = None
    """RFC 5780 §6 alternate address ``A2:P2``. None (the default) disables RFC 5780: no
    OTHER-ADDRESS is sent and CHANGE-REQUEST is answered 420. When set it pairs with the
    first ``listen`` address of its family (``A1:P1``, which must then be a specific IP,
    not a wildcard); the server binds UDP and TCP on all four of A1/A2 x P1/P2."""
    padding_length: int = 1500
    """RFC 5780 §6.1: length of the PADDING sent back when a request carries PADDING
    ("the MTU on the outgoing interface, rounded up to an even multiple of four bytes";
    default 1500, Ethernet). Whatever this says, a padded response is never longer than
    the request that asked for it, so PADDING cannot turn the server into an amplifier."""

    # -- responses -------------------------------------------------------------------------
    software: str | None = SOFTWARE
    """SOFTWARE attribute (RFC 8489 §14.14) in every response; default ``tsunagu <version>``.
    None leaves it out (no version disclosure, smaller responses)."""

    # -- abuse control ----------------------------------------------------------------------
    rate_limit: float = 100.0
    """Responses per second per source (token bucket refill rate; 0 disables limiting).
    Requests beyond it are dropped unanswered, so a spoofed source address cannot be
    flooded through this server (RFC 8489 §16.1.3 reflection). Keyed by IPv4 address or
    IPv6 /64 (one host's usual allocation). Default 100/s: a NAT or CGNAT address may
    carry many clients, each of which sends a handful of requests per ICE gathering."""
    rate_burst: int = 200
    """Token bucket size: requests a quiet source may send back to back. Default 200."""
    max_tracked_sources: int = 65536
    """Sources the rate limiter remembers; beyond it the least recently seen is forgotten
    (it comes back with a full bucket). Bounds the limiter's memory (~150 bytes a source)."""

    # -- process and connections (read by the asyncio driver) -------------------------------
    workers: int = 1
    """Processes serving the same ports with SO_REUSEPORT, supervised by a parent that
    forwards SIGTERM. Default 1 (no supervisor)."""
    max_connections: int = 1024
    """Open TCP plus TLS connections per worker; further connections are closed at once."""
    idle_timeout: float = 60.0
    """Seconds a TCP/TLS connection may stay silent (and a TLS handshake may take) before
    the server closes it (RFC 8489 §6.2.2 lets the server time connections out)."""
    log_level: str = "info"
    """Python logging level of the command-line server: debug, info, warning, error."""

    def __post_init__(self) -> None:
        if not self.listen and not self.tls_listen:
            raise ValueError("nothing to listen on")
        for address in (*self.listen, *self.tls_listen):
            _check_address(address)
        if self.other is not None:
            _check_address(self.other)
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        if self.tls_listen and self.cert is None:
            raise ValueError("tls_listen needs cert and key")
        if self.other is not None:
            primary = self.rfc5780_primary
            if primary is None:
                raise ValueError(
                    "other (RFC 5780) needs a listen address of the same family with a "
                    "specific IP, not a wildcard"
                )
            if _is_wildcard(self.other[0]):
                raise ValueError("other (RFC 5780) must be a specific IP, not a wildcard")
            if ipaddress.ip_address(primary[0]) == ipaddress.ip_address(self.other[0]):
                raise ValueError("other (RFC 5780) must be a second IP address")
            if primary[1] != 0 and primary[1] == self.other[1]:
                raise ValueError("other (RFC 5780) must use a second port")
        if not (isinstance(self.padding_length, int) and self.padding_length >= 0):
            raise ValueError("padding_length must be a non-negative integer")
        if self.padding_length > MAX_PADDING_LENGTH:
            raise ValueError(f"padding_length must be at most {MAX_PADDING_LENGTH}")
        # RFC 8489 §14.14: fewer than 128 characters, at most 763 bytes.
        if self.software is not None and (
            len(self.software) >= 128 or len(self.software.encode()) > 763
        ):
            raise ValueError("software must be fewer than 128 characters")
        if not (math.isfinite(self.rate_limit) and self.rate_limit >= 0):
            raise ValueError("rate_limit must be a finite number >= 0 (0 disables it)")
        if self.rate_limit > 0 and self.rate_burst < 1:
            raise ValueError("rate_burst must be at least 1")
        if self.max_tracked_sources < 1:
            raise ValueError("max_tracked_sources must be at least 1")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be within 1..{MAX_WORKERS}")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if not (math.isfinite(self.idle_timeout) and self.idle_timeout > 0):
            raise ValueError("idle_timeout must be a positive number of seconds")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")

    @property
    def rfc5780_primary(self) -> Address | None:
        """A1:P1 of RFC 5780 §6: the first ``listen`` address of ``other``'s family, if it
        is a specific IP. None without ``other``."""
        if self.other is None:
            return None
        v6 = _is_v6(self.other[0])
        for address in self.listen:
            if _is_v6(address[0]) == v6:
                return None if _is_wildcard(address[0]) else address
        return None


def _check_address(address: Address) -> None:
    if not (isinstance(address, tuple) and len(address) == 2):
        raise ValueError(f"an address is (ip, port), got {address!r}")
    ip, port = address
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"not an IP address: {ip!r}") from None
    if not (isinstance(port, int) and 0 <= port <= 65535):
        raise ValueError(f"bad port {port!r}")


# -- TOML ---------------------------------------------------------------------------------

# Keys may be written with - or _; address settings take "HOST:PORT" strings.
_ADDRESS_LISTS = {"listen": DEFAULT_PORT, "tls_listen": DEFAULT_TLS_PORT}
_FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in dataclasses.fields(StunServerConfig)}


def _as_list(name: str, value: object) -> list[object]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    raise ValueError(f"{name}: expected a string or a list of strings")


def _check_scalar(name: str, declared: str, value: object) -> object:
    """TOML values are typed; refuse a wrong type naming the setting."""
    if declared == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
    elif declared == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        return float(value)
    elif declared.startswith("str") and not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {value!r}")
    return value


def config_values(data: Mapping[str, object], source: str = "configuration") -> dict[str, object]:
    """Field values from a parsed TOML table (or any mapping of that shape).

    Unknown keys are an error naming every one of them: a misspelt setting that is
    silently ignored is how servers end up running with defaults nobody chose.
    """
    values: dict[str, object] = {}
    unknown: list[str] = []
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in _FIELD_TYPES:
            unknown.append(raw_key)
            continue
        if key in _ADDRESS_LISTS:
            items = _as_list(raw_key, value)
            if not all(isinstance(item, str) for item in items):
                raise ValueError(f"{raw_key}: expected HOST:PORT strings")
            values[key] = tuple(parse_address(str(item), _ADDRESS_LISTS[key]) for item in items)
        elif key == "other":
            if not isinstance(value, str):
                raise ValueError(f"{raw_key}: expected a HOST:PORT string")
            values[key] = parse_address(value)
        elif key == "software" and value in (False, ""):
            values[key] = None  # software = false (or ""): leave SOFTWARE out
        else:
            values[key] = _check_scalar(raw_key, _FIELD_TYPES[key], value)
    if unknown:
        known = ", ".join(name.replace("_", "-") for name in _FIELD_TYPES)
        raise ValueError(
            f"{source}: unknown setting(s) {', '.join(sorted(unknown))} (known: {known})"
        )
    return values


def load_toml(path: str | Path, **overrides: object) -> StunServerConfig:
    """Read a TOML configuration file; ``overrides`` (field name -> value, e.g. from the
    command line) win over the file. Raises ValueError (or OSError) with a clear message.

    Example::

        listen = ["0.0.0.0:3478", "[::]:3478"]
        other = "192.0.2.2:3479"
        software = false
        rate-limit = 50
    """
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    values = config_values(data, str(path))
    values.update(overrides)
    try:
        return StunServerConfig(**values)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
