"""Events of the RFC 5780 NAT behaviour discovery core (:mod:`tsunagu.nat.discovery`).

Small frozen dataclasses, pulled with ``NatDiscovery.poll_event()``; a driver may show them
as progress. The last event of every run is :class:`DiscoveryCompleted` with the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from tsunagu.nat.behavior import FilteringBehavior, MappingBehavior
from tsunagu.stun.attributes import Address

if TYPE_CHECKING:
    from tsunagu.nat.discovery import NatDiscoveryResult

__all__ = [
    "DiscoveryCompleted",
    "FilteringDetermined",
    "HairpinningDetermined",
    "LifetimeProbed",
    "MappingDetermined",
    "NatEvent",
    "NatTest",
    "TestFinished",
]


class NatTest(StrEnum):
    """The Binding exchanges of RFC 5780 §4, by the names the RFC gives them."""

    BINDING = "test-i"
    """§4.2/§4.3 test I: a plain Binding to the primary address; learns OTHER-ADDRESS."""
    FILTERING_II = "filtering-test-ii"
    """§4.4 test II: CHANGE-REQUEST with both flags (answer from the alternate IP and port)."""
    FILTERING_III = "filtering-test-iii"
    """§4.4 test III: CHANGE-REQUEST "change port" (answer from the primary IP, other port)."""
    MAPPING_II = "mapping-test-ii"
    """§4.3 test II: a Binding to the alternate IP address and the primary port."""
    MAPPING_III = "mapping-test-iii"
    """§4.3 test III: a Binding to the alternate IP address and the alternate port."""
    HAIRPIN = "hairpin"
    """§4.5: a Binding from a second local address to the first one's mapped address."""
    LIFETIME_REFRESH = "lifetime-refresh"
    """§4.6: the Binding from the first socket that starts one idle period."""
    LIFETIME_PROBE = "lifetime-probe"
    """§4.6: the Binding from the second socket with RESPONSE-PORT, after the idle period."""


@dataclass(frozen=True, slots=True)
class TestFinished:
    """One exchange ended: ``responded`` False means it timed out (RFC 8489 §6.2.1), which
    for the filtering, hairpin and lifetime tests is an answer, not a failure."""

    __test__ = False  # not a pytest test class, despite its name

    test: NatTest
    responded: bool
    mapped: Address | None = None
    """XOR-MAPPED-ADDRESS of the response (None for the hairpin test and timeouts)."""
    source: Address | None = None
    """Where the response came from."""
    rtt: float | None = None
    """Seconds from the first transmission to the response."""
    error: str | None = None
    """An error response (``"420 Unknown Attribute"``) or an unusable response."""


@dataclass(frozen=True, slots=True)
class MappingDetermined:
    """RFC 5780 §4.3 concluded."""

    behavior: MappingBehavior


@dataclass(frozen=True, slots=True)
class FilteringDetermined:
    """RFC 5780 §4.4 concluded."""

    behavior: FilteringBehavior


@dataclass(frozen=True, slots=True)
class HairpinningDetermined:
    """RFC 5780 §4.5 concluded."""

    supported: bool


@dataclass(frozen=True, slots=True)
class LifetimeProbed:
    """RFC 5780 §4.6: after ``idle`` seconds without traffic the mapping was (not) alive."""

    idle: float
    alive: bool


@dataclass(frozen=True, slots=True)
class DiscoveryCompleted:
    """Every test has ended; ``result`` is final."""

    result: NatDiscoveryResult


NatEvent = (
    TestFinished
    | MappingDetermined
    | FilteringDetermined
    | HairpinningDetermined
    | LifetimeProbed
    | DiscoveryCompleted
)
