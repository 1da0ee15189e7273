"""Events of the multicast DNS core (:mod:`tsunagu.mdns.responder`), pulled with
``MdnsResponder.poll_event()``. Every :meth:`~tsunagu.mdns.responder.MdnsResponder.resolve`
call ends in exactly one of them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MdnsEvent", "NameResolved", "NameUnresolved"]


@dataclass(frozen=True, slots=True)
class NameResolved:
    """``name`` (as the caller spelt it in ``resolve``) has the address ``ip``, learnt
    from an answer, an unsolicited announcement, the cache or our own registrations."""

    name: str
    ip: str
    addresses: tuple[str, ...] = ()
    """Every address known for the name at that moment, ``ip`` first."""


@dataclass(frozen=True, slots=True)
class NameUnresolved:
    """No usable answer for ``name`` arrived in time (``reason`` says why)."""

    name: str
    reason: str = "timeout"


MdnsEvent = NameResolved | NameUnresolved
