"""Transport addresses as text: one place for how tsunagu reads and writes ``IP:PORT``."""

from __future__ import annotations

import ipaddress

from tsunagu.stun.attributes import Address
from tsunagu.stun.constants import DEFAULT_PORT

__all__ = ["Address", "format_address", "parse_address"]


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """``HOST:PORT``, ``[V6]:PORT``, a bare IPv4/IPv6 literal or ``[V6]``.

    Host names are not resolved (a server binds to addresses). Port 0 asks the OS for an
    ephemeral port. Raises ValueError with the offending text.
    """
    text = text.strip()
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r} (IPv6 is written [::1]:3478)")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text  # an IPv4 literal, or an IPv6 literal without a port
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IP address: {host!r} in {text!r}") from None
    port = default_port
    if port_text is not None:
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ValueError(f"bad port in {text!r}")
        port = int(port_text)
    return str(ip), port


def format_address(address: Address) -> str:
    """The inverse of :func:`parse_address`: ``192.0.2.1:3478`` or ``[2001:db8::1]:3478``."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
