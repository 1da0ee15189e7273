"""The ICE servers of an RTCConfiguration (W3C WebRTC §4.2.1 ``RTCIceServer``,
``iceTransportPolicy``), checked and split into what gathering needs.

    servers = [IceServer("stun:stun.example.org"),
               IceServer(["turn:turn.example.org?transport=udp", "turns:turn.example.org"],
                         username="alice", credential="secret")]
    stun, turn = split_ice_servers(servers)   # [("stun.example.org", 3478)], [TurnServer(...)]

``stun:`` URLs give server-reflexive candidates (RFC 8445 §5.1.1.2); ``turn:``/``turns:``
URLs give relayed ones and need the long-term credentials (RFC 8656 §3.2), as the W3C
algorithm requires (it throws InvalidAccessError without them). ``stuns:`` is refused: a
STUN server reached over TLS sees a TCP mapping, which is no UDP server-reflexive candidate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from tsunagu.errors import LocalProtocolError
from tsunagu.stun.uri import StunUri, StunUriError

__all__ = ["IceServer", "IceTransportPolicy", "TurnServer", "split_ice_servers"]


@dataclass(frozen=True, slots=True)
class TurnServer:
    """A TURN server to gather a relayed candidate from: ``uri`` as ``turn:host[:port]``
    (``?transport=tcp``) or ``turns:host[:port]``, and the long-term credentials."""

    uri: str
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class IceServer:
    """One ``RTCIceServer``: one URL or several (alternatives for the same server), and
    the credentials TURN URLs need."""

    urls: str | Sequence[str]
    username: str | None = None
    credential: str | None = None


class IceTransportPolicy(StrEnum):
    """``iceTransportPolicy``: which local candidates are used."""

    ALL = "all"
    RELAY = "relay"  # relayed candidates only: the peer never learns our addresses


def split_ice_servers(
    servers: Iterable[IceServer],
) -> tuple[list[tuple[str, int]], list[TurnServer]]:
    """The STUN servers (host, port) and TURN servers the list names, in order, without
    repeats. Raises :class:`~tsunagu.errors.LocalProtocolError` naming the bad URL."""
    stun: list[tuple[str, int]] = []
    turn: list[TurnServer] = []
    for server in servers:
        urls = [server.urls] if isinstance(server.urls, str) else list(server.urls)
        if not urls:
            raise LocalProtocolError("an ICE server needs at least one URL")
        for url in urls:
            try:
                uri = StunUri.parse(url)
            except StunUriError as exc:
                raise LocalProtocolError(f"ICE server URL {url!r}: {exc}") from None
            if uri.is_turn:
                if server.username is None or server.credential is None:
                    raise LocalProtocolError(f"{url}: TURN URLs need a username and credential")
                relay = TurnServer(url, server.username, server.credential)
                if relay not in turn:
                    turn.append(relay)
            elif uri.secure:
                raise LocalProtocolError(f"{url}: stuns: gives no UDP server-reflexive candidate")
            elif uri.address not in stun:
                stun.append(uri.address)
    return stun, turn
