"""IP packets as the simulated network carries them: a 5-tuple, a payload, a TTL, and for
TCP a small header. Sizes count real header bytes, so a link's MTU bites where it would.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, replace
from enum import Enum, IntFlag

from tsunagu.address import format_address

__all__ = [
    "IPV4_HEADER",
    "IPV6_HEADER",
    "TCP_HEADER",
    "UDP_HEADER",
    "Address",
    "Packet",
    "Proto",
    "TcpFlags",
    "TcpHeader",
    "format_address",
    "is_ipv6",
    "normalize_ip",
]

Address = tuple[str, int]
"""A transport address: (IP literal, port), IPv6 without brackets -- as in tsunagu.stun."""

IPV4_HEADER = 20
IPV6_HEADER = 40
UDP_HEADER = 8
TCP_HEADER = 20
DEFAULT_TTL = 64


class Proto(Enum):
    """The transport protocol of a packet (and of a NAT mapping: RFC 4787 maps UDP,
    RFC 5382 TCP, each in its own port space)."""

    UDP = "udp"
    TCP = "tcp"


class TcpFlags(IntFlag):
    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    ACK = 0x10


@dataclass(frozen=True, slots=True)
class TcpHeader:
    """The TCP fields the model uses. Sequence numbers are unbounded Python ints (no
    32-bit wraparound: nothing in a simulation sends 4 GiB)."""

    flags: TcpFlags
    seq: int
    ack: int = 0
    mss: int | None = None
    """The MSS option, on SYN segments only."""

    def describe(self) -> str:
        names = [flag.name for flag in TcpFlags if flag in self.flags and flag.name]
        text = f"[{','.join(names)}] seq={self.seq}"
        if TcpFlags.ACK in self.flags:
            text += f" ack={self.ack}"
        return text


@functools.lru_cache(maxsize=4096)
def normalize_ip(ip: str) -> str:
    """The canonical text of an IP literal (compressed IPv6, no scope); ValueError if it
    is not one."""
    return ipaddress.ip_address(ip.partition("%")[0]).compressed


def is_ipv6(ip: str) -> bool:
    return ":" in ip


@dataclass(frozen=True, slots=True)
class Packet:
    """One IP packet. ``src`` and ``dst`` are (IP, port); NATs rewrite them."""

    proto: Proto
    src: Address
    dst: Address
    payload: bytes = b""
    tcp: TcpHeader | None = None
    ttl: int = DEFAULT_TTL

    @property
    def size(self) -> int:
        """Bytes on the wire at the IP layer: what a link's MTU is compared with."""
        ip = IPV6_HEADER if is_ipv6(self.dst[0]) else IPV4_HEADER
        transport = UDP_HEADER if self.proto is Proto.UDP else TCP_HEADER
        return ip + transport + len(self.payload)

    def with_src(self, src: Address) -> Packet:
        return replace(self, src=src)

    def with_dst(self, dst: Address) -> Packet:
        return replace(self, dst=dst)

    def summary(self) -> str:
        """One line for traces: ``udp 10.0.0.2:5000 > 198.51.100.1:3478 len=20``."""
        src, dst = format_address(self.src), format_address(self.dst)
        text = f"{self.proto.value} {src} > {dst} len={len(self.payload)}"
        if self.tcp is not None:
            text += " " + self.tcp.describe()
        return text
