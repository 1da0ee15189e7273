"""ICE (RFC 8445 full and lite, RFC 8838 trickle, RFC 7675 consent, RFC 8839 SDP syntax) as
a sans-I/O core.

Modules, each named after the RFC concept it implements: :mod:`~tsunagu.ice.candidate`
(candidates, priorities, foundations, the ``candidate:`` grammar), :mod:`~tsunagu.ice.sdp`
(ufrag/pwd and the other ICE attributes), :mod:`~tsunagu.ice.policy` (which remote addresses
may be used), :mod:`~tsunagu.ice.pair` and :mod:`~tsunagu.ice.checklist` (pairs, states,
scheduling), :mod:`~tsunagu.ice.checks` (the STUN messages), :mod:`~tsunagu.ice.consent`,
:mod:`~tsunagu.ice.gather` (server-reflexive), :mod:`~tsunagu.ice.config`,
:mod:`~tsunagu.ice.events` and :mod:`~tsunagu.ice.agent` (:class:`IceAgent`).
"""

from tsunagu.ice.agent import IceAgent
from tsunagu.ice.candidate import (
    Candidate,
    CandidateType,
    FoundationAllocator,
    TcpType,
    TransportProtocol,
    candidate_priority,
    local_preference,
)
from tsunagu.ice.config import IceConfig, Nomination
from tsunagu.ice.errors import CandidateError, IceNotConnectedError, SdpError
from tsunagu.ice.events import (
    CandidateGathered,
    CandidatePairStateChanged,
    ConnectionStateChanged,
    ConsentLost,
    DataReceived,
    GatheringComplete,
    GatheringFailed,
    IceEvent,
    IceTransportState,
    PeerReflexiveCandidate,
    RemoteCandidateIgnored,
    RoleChanged,
    SelectedPairChanged,
    TcpCloseRequested,
    TcpConnectRequested,
)
from tsunagu.ice.pair import PairInfo, PairState, pair_priority
from tsunagu.ice.policy import AddressPolicy, address_problem
from tsunagu.ice.sdp import IceCredentials, IceDescription
from tsunagu.ice.transmit import Transmit

__all__ = [
    "AddressPolicy",
    "Candidate",
    "CandidateError",
    "CandidateGathered",
    "CandidatePairStateChanged",
    "CandidateType",
    "ConnectionStateChanged",
    "ConsentLost",
    "DataReceived",
    "FoundationAllocator",
    "GatheringComplete",
    "GatheringFailed",
    "IceAgent",
    "IceConfig",
    "IceCredentials",
    "IceDescription",
    "IceEvent",
    "IceNotConnectedError",
    "IceTransportState",
    "Nomination",
    "PairInfo",
    "PairState",
    "PeerReflexiveCandidate",
    "RemoteCandidateIgnored",
    "RoleChanged",
    "SdpError",
    "SelectedPairChanged",
    "TcpCloseRequested",
    "TcpConnectRequested",
    "TcpType",
    "Transmit",
    "TransportProtocol",
    "address_problem",
    "candidate_priority",
    "local_preference",
    "pair_priority",
]
