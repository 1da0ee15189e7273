"""The typed errors of the ICE core, under :mod:`tsunagu.errors`' split.

What a peer sent (an SDP attribute, a trickled candidate) raises a
:class:`~tsunagu.errors.RemoteProtocolError` subclass; misuse of the agent's API raises a
:class:`~tsunagu.errors.LocalProtocolError` subclass.
"""

from __future__ import annotations

from tsunagu.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["CandidateError", "IceNotConnectedError", "SdpError"]


class SdpError(RemoteProtocolError, ValueError):
    """An ICE SDP attribute (RFC 8839 §5) that does not follow its grammar."""


class CandidateError(SdpError):
    """A ``candidate:`` attribute (RFC 8839 §5.1) that is malformed or unsupported."""


class IceNotConnectedError(LocalProtocolError):
    """Data was sent on a component that has no selected pair (or lost consent)."""
