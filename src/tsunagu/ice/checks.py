"""The STUN messages of ICE connectivity checks (RFC 8445 §7.1, §7.2, §7.3, §16.1),
consent (RFC 7675 §5) and keepalives (RFC 8445 §11), built and validated with the
:mod:`tsunagu.stun` codec.

A check is a Binding request with USERNAME "remote-ufrag:local-ufrag" (of the sender),
PRIORITY, ICE-CONTROLLING or ICE-CONTROLLED, optionally USE-CANDIDATE, then
MESSAGE-INTEGRITY keyed with the receiver's password and FINGERPRINT (§7.2.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from tsunagu.ice.candidate import Address
from tsunagu.stun.attributes import (
    Attribute,
    Fingerprint,
    IceControlled,
    IceControlling,
    Priority,
    UnknownAttributes,
    UseCandidate,
    Username,
    XorMappedAddress,
)
from tsunagu.stun.constants import ErrorCode, MessageClass, Method
from tsunagu.stun.message import (
    IntegrityKey,
    Message,
    error_response,
    new_transaction_id,
    success_response,
)

__all__ = [
    "CheckRequest",
    "binding_indication",
    "binding_request",
    "check_error",
    "check_request",
    "check_success",
    "parse_check_request",
]


def check_request(
    transaction_id: bytes,
    *,
    local_ufrag: str,
    remote_ufrag: str,
    remote_key: bytes | IntegrityKey,
    priority: int,
    controlling: bool,
    tie_breaker: int,
    use_candidate: bool,
) -> bytes:
    """RFC 8445 §7.1.1-§7.1.3 (and RFC 7675 §5.1 for consent, which is the same request
    without USE-CANDIDATE). ``remote_key``: the short-term key of the remote password
    (:func:`~tsunagu.stun.credentials.short_term_key`), best an :class:`IntegrityKey` kept
    for the session."""
    attributes: list[Attribute] = [
        Username(f"{remote_ufrag}:{local_ufrag}"),  # §7.2.2
        Priority(priority),  # §7.1.1
        IceControlling(tie_breaker) if controlling else IceControlled(tie_breaker),  # §7.1.3
    ]
    if use_candidate:
        attributes.append(UseCandidate())  # §7.1.2
    message = Message(Method.BINDING, MessageClass.REQUEST, transaction_id, attributes)
    return message.encode(remote_key, fingerprint=True)


def check_success(request: Message, source: Address, local_key: bytes | IntegrityKey) -> bytes:
    """RFC 8445 §7.3.1.2: XOR-MAPPED-ADDRESS is the source of the request; integrity
    with the same (local) password's key as the request; FINGERPRINT."""
    response = success_response(request, [XorMappedAddress(source)])
    return response.encode(local_key, fingerprint=True)


def check_error(
    request: Message,
    code: int,
    local_key: bytes | IntegrityKey | None = None,
    *,
    unknown: tuple[int, ...] = (),
) -> bytes:
    """An error response; integrity-protected only when the request authenticated
    (RFC 8489 §9.1.4: not for 400/401, since the key is not known to be shared)."""
    attributes: list[Attribute] = [UnknownAttributes(unknown)] if unknown else []
    response = error_response(request, code, attributes=attributes)
    return response.encode(local_key, fingerprint=True)


def binding_request(transaction_id: bytes | None = None) -> tuple[bytes, bytes]:
    """A plain Binding request to a STUN server (RFC 8445 §5.1.1.2), and its transaction
    ID. FINGERPRINT lets the server tell it from other traffic on a shared port."""
    tid = transaction_id if transaction_id is not None else new_transaction_id()
    message = Message(Method.BINDING, MessageClass.REQUEST, tid)
    return message.encode(fingerprint=True), tid


def binding_indication() -> bytes:
    """RFC 8445 §11: a keepalive is a Binding indication; no authentication, and the
    receiver ignores it (§11). FINGERPRINT as RFC 8445 §7.2.2 asks of ICE STUN."""
    message = Message(Method.BINDING, MessageClass.INDICATION, new_transaction_id())
    return message.encode(fingerprint=True)


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """The ICE content of a Binding request that passed the syntax checks."""

    local_ufrag: str
    """The part of USERNAME before the colon: our ufrag, if it is meant for us."""
    remote_ufrag: str
    priority: int
    controlling: bool | None
    """True for ICE-CONTROLLING, False for ICE-CONTROLLED, None if neither was sent."""
    tie_breaker: int
    use_candidate: bool


def parse_check_request(message: Message) -> CheckRequest | tuple[int, tuple[int, ...]]:
    """Read a Binding request as an ICE check, or return the (error code, unknown
    attributes) to answer it with:

    * 420 for unknown comprehension-required attributes (RFC 8489 §6.3.1);
    * 400 without USERNAME or MESSAGE-INTEGRITY (RFC 8489 §9.1.3), without FINGERPRINT or
      PRIORITY (RFC 8445 §7.2.2, §7.1.1), with both role attributes, or with a USERNAME
      that is not "ufrag:ufrag".

    Integrity is not verified here: the key depends on which session the ufrag names.
    """
    unknown = message.unknown_comprehension_required()
    if unknown:
        return (ErrorCode.UNKNOWN_ATTRIBUTE, unknown)
    bad: tuple[int, tuple[int, ...]] = (ErrorCode.BAD_REQUEST, ())
    username = message.get(Username)
    priority = message.get(Priority)
    if username is None or message.integrity_algorithm is None or priority is None:
        return bad
    if message.raw is None or message.get(Fingerprint) is None:
        return bad
    local_ufrag, sep, remote_ufrag = username.value.partition(":")
    if not sep or not local_ufrag or not remote_ufrag:
        return bad
    controlling_attr = message.get(IceControlling)
    controlled_attr = message.get(IceControlled)
    if controlling_attr is not None and controlled_attr is not None:
        return bad
    if priority.value == 0 or priority.value >= 2**31:
        return bad
    controlling: bool | None = None
    tie_breaker = 0
    if controlling_attr is not None:
        controlling, tie_breaker = True, controlling_attr.value
    elif controlled_attr is not None:
        controlling, tie_breaker = False, controlled_attr.value
    return CheckRequest(
        local_ufrag=local_ufrag,
        remote_ufrag=remote_ufrag,
        priority=priority.value,
        controlling=controlling,
        tie_breaker=tie_breaker,
        use_candidate=message.get(UseCandidate) is not None,
    )
