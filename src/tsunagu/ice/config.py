"""Every knob of the ICE agent core, in one frozen dataclass with documented defaults (as
aioquic's QuicConfiguration)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from tsunagu.ice.policy import AddressPolicy
from tsunagu.stun.transaction import TransactionConfig

__all__ = ["IceConfig", "Nomination"]


class Nomination(StrEnum):
    REGULAR = "regular"
    """RFC 8445 §8.1.1: check first, then repeat a check on the chosen valid pair with
    USE-CANDIDATE. The only mode RFC 8445 defines, and the default."""
    AGGRESSIVE = "aggressive"
    """RFC 5245 §8.1.1.2: every check carries USE-CANDIDATE, so the first pair to succeed
    is selected at once (and a better one that succeeds later replaces it). For peers
    that expect it; faster, but the selection can change during checks."""


@dataclass(frozen=True, slots=True)
class IceConfig:
    """Settings of :class:`~tsunagu.ice.agent.IceAgent`."""

    components: int = 1
    """Components of the data stream (RFC 8445 §4): 1 for RTP/RTCP multiplexed (WebRTC),
    2 for separate RTP and RTCP."""

    lite: bool = False
    """ICE lite (RFC 8445 §2.5): host candidates only, no checks sent, always controlled
    against a full agent; for servers with a public address."""

    nomination: Nomination = Nomination.REGULAR
    """How the controlling agent nominates (see :class:`Nomination`)."""

    ta: float = 0.05
    """Ta, seconds between two new checks (ordinary or triggered), RFC 8445 §14.2: 50 ms
    is the default that RFC gives for all checks of an agent."""

    max_pairs: int = 100
    """Check-list size limit (RFC 8445 §6.1.2.5 suggests 100): the lowest-priority pairs
    beyond it are dropped, so a remote description listing hundreds of candidates cannot
    turn the agent into a flooder."""

    max_checks_per_second: float = 100.0
    """Upper bound on STUN requests the agent sends per second, retransmissions, consent
    and gathering included (a token bucket holding ``check_burst`` requests). With
    ``ta`` = 50 ms new checks come at 20/s; the bound caps what retransmissions and
    consent may add whatever the number of pairs."""

    check_burst: int = 10
    """Capacity of the request token bucket."""

    check_rto_min: float = 0.5
    """RFC 8445 §14.3: RTO = MAX(500 ms, Ta · (Num-Waiting + Num-In-Progress))."""

    check_transactions: TransactionConfig = field(
        default_factory=lambda: TransactionConfig(rc=7, rm=16)
    )
    """Retransmissions of a check (RFC 8489 §6.2.1's Rc = 7 and Rm = 16, which §14.3
    points to): with the minimal RTO of 500 ms a check fails 39.5 s after it was sent --
    which bounds how long a hopeless check list runs before the agent reports failure."""

    nomination_delay: float = 0.5
    """Regular nomination: after the first valid pair of a component, wait at most this
    long for checks on higher-priority pairs before nominating the best valid pair. A
    pair with no better pair left unchecked is nominated at once."""

    consent_interval: float = 5.0
    """RFC 7675 §5.1: consent requests on the selected pair every 5 s ..."""
    consent_jitter: float = 0.2
    """... randomised uniformly over [0.8, 1.2] times the interval (RFC 7675 §5.1)."""
    consent_timeout: float = 30.0
    """RFC 7675 §5.1: no response for 30 s and consent is lost: sending stops."""
    disconnected_timeout: float = 10.0
    """No consent response for this long: the state becomes disconnected (as
    RTCIceTransportState does before failing); any response restores connected."""

    keepalive_interval: float = 15.0
    """Tr, RFC 8445 §11: a Binding indication goes out on a selected pair on which nothing
    was sent for this long (consent requests count, so full agents rarely need one)."""

    max_remote_candidates: int = 200
    """Signalled remote candidates kept per session; later ones are ignored."""

    max_peer_reflexive: int = 16
    """Peer-reflexive candidates learnt per session, separately for remote ones (RFC 8445
    §7.3.1.3) and local ones (§7.2.5.3.1). Checks must be authenticated to create one, and
    this bound holds even for a peer that knows the password and floods from many ports."""

    address_policy: AddressPolicy = field(default_factory=AddressPolicy)
    """Loopback and link-local remote addresses are refused unless allowed here;
    unspecified, broadcast, multicast and port 0 always are."""

    prefer_ipv6: bool = True
    """Local preference ordering of families (RFC 8421 §4) for candidates the agent
    builds itself (host helper and server-reflexive)."""

    gathering_transactions: TransactionConfig = field(
        default_factory=lambda: TransactionConfig(rc=3, rm=4)
    )
    """STUN Binding to servers for server-reflexive candidates: requests at 0, 0.5, 1.5 s,
    given up at 3.5 s -- gathering should not hold trickling back for long."""

    tcp: bool = False
    """RFC 6544 TCP candidates: drivers (:class:`~tsunagu.aio.ice.IceConnection`) gather
    a passive (listening) and an active host candidate per host address besides the UDP
    ones. The core handles TCP candidates whenever a driver adds them; this only says
    whether the driver should."""

    tcp_simultaneous_open: bool = False
    """With :attr:`tcp`, also a simultaneous-open host candidate per host address (RFC 6544
    §4.1; Linux drivers only, see :mod:`tsunagu.aio.ice_tcp`). Off by default, as in
    browsers: Chrome gathers passive and active TCP candidates, never S-O ones, so a browser
    peer has nothing to pair ours with (S-O pairs with S-O only, RFC 6544 §6.2); libnice
    gathers all three. Each costs a listening socket (RFC 6544 §7.2)."""

    max_tcp_accepted: int = 32
    """TCP connections peers may hold open to our passive candidates (RFC 6544 §7.2);
    beyond it the oldest one that carries no pair is closed, or the new one refused."""

    def __post_init__(self) -> None:
        if not 1 <= self.components <= 256:
            raise ValueError("components must be 1-256")
        if not self.ta > 0:
            raise ValueError("ta must be positive")
        if self.max_pairs < 1:
            raise ValueError("max_pairs must be at least 1")
        if not self.max_checks_per_second > 0 or self.check_burst < 1:
            raise ValueError("max_checks_per_second must be positive, check_burst >= 1")
        if not self.check_rto_min > 0:
            raise ValueError("check_rto_min must be positive")
        if self.nomination_delay < 0:
            raise ValueError("nomination_delay must be >= 0")
        if not 0 < self.consent_interval < self.consent_timeout:
            raise ValueError("need 0 < consent_interval < consent_timeout")
        if not 0 <= self.consent_jitter < 1:
            raise ValueError("consent_jitter must be in [0, 1)")
        if not 0 < self.disconnected_timeout <= self.consent_timeout:
            raise ValueError("need 0 < disconnected_timeout <= consent_timeout")
        if not self.keepalive_interval > 0:
            raise ValueError("keepalive_interval must be positive")
        if self.max_remote_candidates < 1 or self.max_peer_reflexive < 0:
            raise ValueError("candidate bounds must be positive")
        if self.max_tcp_accepted < 1:
            raise ValueError("max_tcp_accepted must be at least 1")
        object.__setattr__(self, "nomination", Nomination(self.nomination))
