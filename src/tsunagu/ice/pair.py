"""Candidate pairs (RFC 8445 §6.1.2): local candidates with their base, pair priority,
pair states, and the frozen snapshot the agent hands out."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tsunagu.ice.candidate import Address, Candidate
from tsunagu.ice.consent import ConsentFreshness

__all__ = ["CandidatePair", "LocalCandidate", "PairInfo", "PairState", "pair_priority"]


class PairState(StrEnum):
    """RFC 8445 §6.1.2.6 candidate pair states."""

    FROZEN = "frozen"
    WAITING = "waiting"
    IN_PROGRESS = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def pair_priority(controlling: int, controlled: int) -> int:
    """RFC 8445 §6.1.2.3: ``2^32·MIN(G,D) + 2·MAX(G,D) + (G>D ? 1 : 0)`` where G is the
    priority of the controlling agent's candidate and D the controlled agent's."""
    return (
        (min(controlling, controlled) << 32)
        + 2 * max(controlling, controlled)
        + (1 if controlling > controlled else 0)
    )


@dataclass(frozen=True, slots=True)
class LocalCandidate:
    """A local candidate and its base (RFC 8445 §5.1.1): the transport address the agent
    sends from and receives on. A host or relayed candidate is its own base; a reflexive
    one has the base it was learnt through."""

    candidate: Candidate
    base: Address

    @property
    def component(self) -> int:
        return self.candidate.component


@dataclass(frozen=True, slots=True)
class PairInfo:
    """A snapshot of one pair, for events and tables (like chrome://webrtc-internals)."""

    local: Candidate
    remote: Candidate
    component: int
    state: PairState
    priority: int
    nominated: bool
    valid: bool
    rtt: float | None
    requests_sent: int
    responses_received: int
    requests_received: int
    bytes_sent: int
    bytes_received: int


class CandidatePair:
    """One pair of the check list (or valid list), mutated by the agent only."""

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "consent",
        "last_sent",
        "local",
        "nominate_on_success",
        "nominated",
        "nominating",
        "priority",
        "remote",
        "requests_received",
        "requests_sent",
        "responses_received",
        "rtt",
        "state",
        "transaction_id",
        "valid",
    )

    def __init__(self, local: LocalCandidate, remote: Candidate, controlling: bool) -> None:
        self.local = local
        self.remote = remote
        self.state = PairState.FROZEN
        self.priority = 0
        self.update_priority(controlling)
        self.valid = False
        """In the valid list (RFC 8445 §7.2.5.3.2): a check produced a success response."""
        self.nominated = False
        self.nominating = False
        """Controlling agent: the next check on this pair carries USE-CANDIDATE."""
        self.nominate_on_success = False
        """Controlled agent: USE-CANDIDATE arrived while our own check was pending
        (RFC 8445 §7.3.1.5): nominate when it succeeds."""
        self.rtt: float | None = None
        self.requests_sent = 0
        self.responses_received = 0
        self.requests_received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_sent = -1.0
        self.transaction_id: bytes | None = None
        """The check transaction whose outcome decides the pair's state."""
        self.consent: ConsentFreshness | None = None
        """RFC 7675 timers, once the pair is selected by a full agent."""

    def __repr__(self) -> str:
        return (
            f"<CandidatePair {self.component} {self.local.candidate} -> {self.remote} "
            f"{self.state}{' nominated' if self.nominated else ''}>"
        )

    @property
    def component(self) -> int:
        return self.local.candidate.component

    @property
    def foundation(self) -> tuple[str, str]:
        """RFC 8445 §6.1.2.6: the pair foundation is the local and remote foundations."""
        return (self.local.candidate.foundation, self.remote.foundation)

    @property
    def key(self) -> tuple[Address, Address]:
        """The 5-tuple (with the transport implied by the candidates) data flows on."""
        return (self.local.base, self.remote.transport_address)

    def update_priority(self, controlling: bool) -> None:
        local, remote = self.local.candidate.priority, self.remote.priority
        self.priority = (
            pair_priority(local, remote) if controlling else pair_priority(remote, local)
        )

    def info(self) -> PairInfo:
        return PairInfo(
            local=self.local.candidate,
            remote=self.remote,
            component=self.component,
            state=self.state,
            priority=self.priority,
            nominated=self.nominated,
            valid=self.valid,
            rtt=self.rtt,
            requests_sent=self.requests_sent,
            responses_received=self.responses_received,
            requests_received=self.requests_received,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
        )
