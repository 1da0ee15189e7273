"""Which pairs of NATs let two ICE agents connect directly with STUN only (issue 6 §2).

The theory table of docs/nat.md ("Which combinations connect"), as a function the
simulation's 9 x 9 ICE matrix is checked against. 53 of the 81 ordered pairs connect.

Assumptions (the default scenario of ``tsunagu lab``):

- Each peer is one host with one interface behind its own NAT; the NATs have distinct
  public IPs, different from the STUN server's. No port preservation: a new mapping gets
  an external port that no earlier mapping had. Hairpinning plays no part (the peers are
  behind different NATs), and host candidates do not reach the other peer.
- Each agent gathers one server-reflexive candidate from the STUN server through its host
  socket, and checks are sent from that socket. Mapping and filtering are per mapping, as
  in :mod:`tsunagu.sim.nat` (RFC 4787 §4.1, §5): an address-dependent filter admits the
  IPs *that mapping* has sent to.
- Like Linux conntrack (and the simulated NAT), once an inbound packet from ``R`` is
  admitted, the inside host's packets to ``R`` leave through the mapping it came in on --
  unless the host already sends to ``R`` through a mapping of its own.
- ICE as RFC 8445: peer-reflexive candidates are learnt from incoming checks and answered
  with triggered checks, and a response counts only when it comes from the address the
  request went to (§7.2.5.2.1). "Connects" means both agents get a successful check.
- Checks are simultaneous: each agent sends its first check before the other's arrives,
  and retransmits long enough to outlast the other's start (``first`` relaxes this).

Derivation. Write ``s_A`` for A's server-reflexive address (its mapping towards the
server) and ``p_A`` for the source of A's checks to ``s_B``: ``p_A = s_A`` when A's mapping
is endpoint-independent (EIM); otherwise the destination's IP differs from the server's, so
the NAT makes a new mapping and ``p_A != s_A``. Nothing reaches a NAT except at ``s_A``,
``s_B`` or the ``p``s, and a packet to ``p_A`` from ``s_B`` always passes A's filter
(that mapping sent to exactly ``s_B``). So everything hinges on the first check to get
through a filter at the other side's ``s``; by symmetry take A's check, from ``p_A``,
arriving at ``s_B``, after B has sent its own checks to ``s_A`` (through ``s_B`` itself if
B is EIM, else through a new mapping ``p_B``):

- B endpoint-independent filtering: admitted.
- B address-dependent: admitted iff ``s_B`` has sent to A's public IP, i.e. B is EIM.
- B address-and-port-dependent: admitted iff ``s_B`` has sent to ``p_A`` itself: B is EIM
  and ``p_A = s_A``, so A is EIM too.

Once admitted, B answers ``p_A`` (and sends a triggered check to it) through ``s_B``,
which succeeds, unless B already sends to ``p_A`` through another mapping: that is the case
exactly when A is EIM (``p_A = s_A``, B's target) and B is not (B's checks leave from
``p_B``). Then B's answers come from ``p_B``, a source A never wrote to: the response is
not symmetric, and only B's own checks reaching A can still help. Putting it together, B
takes A's check and answers it properly iff::

    B is EIM:      B's filtering is not address-and-port-dependent, or A is EIM
    B is not EIM:  B's filtering is endpoint-independent, and A is not EIM

and the agents connect iff this holds for B taking A's check or for A taking B's. One
consequence looks odd at first: EIM/address-and-port-dependent ("port-restricted cone")
fails against ADM or APDM with endpoint-independent filtering, which an APDM/APDF
("symmetric") NAT connects to -- B's reply to the EIM peer is pulled onto B's other mapping.

When one agent starts first (``first``), its check reaches the other NAT before that side
has sent anything: an endpoint-independent filter admits it, and as the other host has no
flow to it yet, the answer leaves through ``s`` and the pair connects; any other filter
drops it without trace (in the simulation; a Linux NAT that does not drop unsolicited
packets leaves a conntrack entry, see docs/nat.md), and the simultaneous analysis applies.
"""

from __future__ import annotations

from typing import Literal

from tsunagu.nat.behavior import FilteringBehavior, MappingBehavior

__all__ = ["NAT_TYPES", "direct_possible"]

NAT_TYPES: tuple[tuple[MappingBehavior, FilteringBehavior], ...] = tuple(
    (mapping, filtering) for mapping in MappingBehavior for filtering in FilteringBehavior
)
"""The nine (mapping, filtering) combinations, mapping-major, in the enums' order."""

_EIM = MappingBehavior.ENDPOINT_INDEPENDENT
_EIF = FilteringBehavior.ENDPOINT_INDEPENDENT
_APDF = FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT


def _takes_check(
    mapping: MappingBehavior, filtering: FilteringBehavior, sender_mapping: MappingBehavior
) -> bool:
    """Whether a NAT with ``mapping``/``filtering`` admits the other peer's check at its
    server-reflexive address, once its own host has sent to the other's, and its host's
    answer leaves through that address (module doc)."""
    if mapping is _EIM:
        return filtering is not _APDF or sender_mapping is _EIM
    return filtering is _EIF and sender_mapping is not _EIM


def direct_possible(
    a_mapping: MappingBehavior | str,
    a_filtering: FilteringBehavior | str,
    b_mapping: MappingBehavior | str,
    b_filtering: FilteringBehavior | str,
    *,
    first: Literal["a", "b"] | None = None,
) -> bool:
    """Whether peers A and B, each behind a NAT with the given RFC 4787 behaviours, connect
    directly with STUN-only ICE under the assumptions of the module doc.

    Behaviours may be given by their string values (as ``nat-check --json`` prints them).
    ``first=None`` is the default scenario: simultaneous checks. ``first="a"``: A's first
    check reaches B's NAT before B has sent anything (and then both go on checking).
    """
    am, af = MappingBehavior(a_mapping), FilteringBehavior(a_filtering)
    bm, bf = MappingBehavior(b_mapping), FilteringBehavior(b_filtering)
    if first == "a" and bf is _EIF:
        return True
    if first == "b" and af is _EIF:
        return True
    return _takes_check(bm, bf, am) or _takes_check(am, af, bm)
