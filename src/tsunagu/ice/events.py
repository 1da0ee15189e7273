"""What the ICE agent core tells its driver: small frozen dataclasses pulled with
:meth:`~tsunagu.ice.agent.IceAgent.poll_event` (as h11 and aioquic events)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tsunagu.ice.candidate import Address, Candidate
from tsunagu.ice.pair import PairInfo, PairState

__all__ = [
    "CandidateGathered",
    "CandidatePairStateChanged",
    "ConnectionStateChanged",
    "ConsentLost",
    "DataReceived",
    "GatheringComplete",
    "GatheringFailed",
    "IceEvent",
    "IceTransportState",
    "PeerReflexiveCandidate",
    "RemoteCandidateIgnored",
    "RoleChanged",
    "SelectedPairChanged",
    "TcpCloseRequested",
    "TcpConnectRequested",
]


class IceTransportState(StrEnum):
    """The agent's overall state, with the values and meaning of W3C WebRTC's
    RTCIceTransportState."""

    NEW = "new"
    """Gathering and/or waiting for remote candidates; no check sent yet."""
    CHECKING = "checking"
    """Checks are under way and not every component has a selected pair."""
    CONNECTED = "connected"
    """Every component has a selected pair; more checks or candidates may still come."""
    COMPLETED = "completed"
    """Every component has a selected pair, gathering is done and the peer signalled
    end-of-candidates: nothing more will be checked."""
    FAILED = "failed"
    """Every pair failed after all candidates were known, or consent was lost."""
    DISCONNECTED = "disconnected"
    """A selected pair has not answered consent requests for a while (it may recover)."""
    CLOSED = "closed"
    """:meth:`~tsunagu.ice.agent.IceAgent.close` was called."""


@dataclass(frozen=True, slots=True)
class CandidateGathered:
    """A local candidate is ready to be signalled to the peer (trickled, RFC 8838 §6)."""

    candidate: Candidate


@dataclass(frozen=True, slots=True)
class GatheringFailed:
    """A STUN server did not give a server-reflexive candidate for ``base``."""

    base: Address
    server: Address
    reason: str


@dataclass(frozen=True, slots=True)
class GatheringComplete:
    """No more local candidates: signal end-of-candidates (RFC 8838 §8.2)."""


@dataclass(frozen=True, slots=True)
class RemoteCandidateIgnored:
    """A remote candidate the agent will not use, and why (policy, family, bounds...)."""

    candidate: Candidate
    reason: str


@dataclass(frozen=True, slots=True)
class PeerReflexiveCandidate:
    """A peer-reflexive candidate learnt from a check: ``local`` from the mapped address
    of a response (RFC 8445 §7.2.5.3.1), else a remote one from the source of a request
    (§7.3.1.3)."""

    candidate: Candidate
    local: bool


@dataclass(frozen=True, slots=True)
class CandidatePairStateChanged:
    pair: PairInfo
    previous: PairState


@dataclass(frozen=True, slots=True)
class SelectedPairChanged:
    """The pair data of ``component`` goes over changed (None: no pair any more)."""

    component: int
    pair: PairInfo | None


@dataclass(frozen=True, slots=True)
class ConnectionStateChanged:
    state: IceTransportState
    previous: IceTransportState


@dataclass(frozen=True, slots=True)
class RoleChanged:
    """A role conflict (RFC 8445 §7.2.5.1, §7.3.1.1) switched the agent's role."""

    controlling: bool


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Application data that arrived on a pair whose check has succeeded."""

    data: bytes
    component: int


@dataclass(frozen=True, slots=True)
class ConsentLost:
    """RFC 7675 §5.1: no consent response on the selected pair of ``component`` for the
    consent timeout; the agent no longer sends on it."""

    component: int
    pair: PairInfo


@dataclass(frozen=True, slots=True)
class TcpConnectRequested:
    """RFC 6544 §7.1: open a TCP connection from ``local`` (port 0: any port of that IP,
    for an active candidate) to ``remote``, then report it with
    :meth:`~tsunagu.ice.agent.IceAgent.handle_tcp_connected`, or its failure with
    :meth:`~tsunagu.ice.agent.IceAgent.handle_tcp_closed`. ``connection`` names it in
    TCP transmits and in those calls (see :mod:`tsunagu.ice.tcp`)."""

    connection: int
    local: Address
    remote: Address


@dataclass(frozen=True, slots=True)
class TcpCloseRequested:
    """Close the TCP connection ``connection``: the agent no longer uses it."""

    connection: int


IceEvent = (
    CandidateGathered
    | GatheringFailed
    | GatheringComplete
    | RemoteCandidateIgnored
    | PeerReflexiveCandidate
    | CandidatePairStateChanged
    | SelectedPairChanged
    | ConnectionStateChanged
    | RoleChanged
    | DataReceived
    | ConsentLost
    | TcpConnectRequested
    | TcpCloseRequested
)
