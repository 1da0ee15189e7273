"""The typed errors of every tsunagu core.

Split as h11 and wsproto do: :class:`RemoteProtocolError` for what a peer sent (malformed or
hostile input: the only thing bad input may raise) and :class:`LocalProtocolError` for
misuse of the API by the caller.
"""

from __future__ import annotations


class TsunaguError(Exception):
    """Base class of every error tsunagu raises on purpose."""


class LocalProtocolError(TsunaguError):
    """The caller asked for something the protocol does not allow."""


class RemoteProtocolError(TsunaguError):
    """A peer sent something malformed or not allowed."""


class StunDecodeError(RemoteProtocolError, ValueError):
    """Bytes that are not a well-formed STUN message (or ChannelData frame)."""


class IntegrityError(RemoteProtocolError):
    """MESSAGE-INTEGRITY(-SHA256) or FINGERPRINT did not verify."""


class StunResponseError(TsunaguError):
    """A STUN transaction answered with an error response (RFC 8489 §14.8 ERROR-CODE)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class TurnError(StunResponseError):
    """A TURN request failed; ``code`` is the STUN error code (or 0 for a local failure)."""


class TransactionTimeoutError(TsunaguError):
    """No response arrived within the RFC 8489 §6.2 transaction timeout."""
