"""The ICE attributes of SDP (RFC 8839 §5) other than the candidate grammar itself.

Helpers that read and write ``a=ice-ufrag``, ``a=ice-pwd``, ``a=ice-options``,
``a=ice-lite``, ``a=candidate`` and ``a=end-of-candidates`` (RFC 8840 §9.1), plus
:class:`IceDescription`, the ICE part of one media description, parsed from or written to
SDP lines. Parsing is strict and raises :class:`SdpError` (or :class:`CandidateError`), never
anything else; lines that are not ICE attributes are ignored.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from tsunagu.ice.candidate import Candidate, is_ice_chars
from tsunagu.ice.errors import SdpError

__all__ = [
    "ICE_CHARS",
    "IceCredentials",
    "IceDescription",
    "format_ice_options",
    "parse_ice_options",
    "validate_pwd",
    "validate_ufrag",
]

ICE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
"""RFC 8839 §5.4: ice-char = ALPHA / DIGIT / "+" / "/" (64 characters, 6 bits each)."""

UFRAG_LENGTH = (4, 256)  # RFC 8839 §5.4: ice-ufrag-att = "ice-ufrag:" 4*256ice-char
PWD_LENGTH = (22, 256)  # RFC 8839 §5.4: ice-pwd-att = "ice-pwd:" 22*256ice-char
# RFC 8445 §5.3: at least 24 bits of randomness in the ufrag and 128 in the password.
_UFRAG_CHARS = 8  # 48 bits
_PWD_CHARS = 24  # 144 bits


def validate_ufrag(ufrag: str) -> str:
    """Return ``ufrag`` if it is 4-256 ice-chars (RFC 8839 §5.4), else raise SdpError."""
    low, high = UFRAG_LENGTH
    if not is_ice_chars(ufrag) or not low <= len(ufrag) <= high:
        raise SdpError(f"ice-ufrag must be {low}-{high} ice-chars, got {ufrag[:40]!r}")
    return ufrag


def validate_pwd(pwd: str) -> str:
    """Return ``pwd`` if it is 22-256 ice-chars (RFC 8839 §5.4), else raise SdpError.
    The message never repeats the password."""
    low, high = PWD_LENGTH
    if not is_ice_chars(pwd) or not low <= len(pwd) <= high:
        raise SdpError(f"ice-pwd must be {low}-{high} ice-chars (got {len(pwd)} characters)")
    return pwd


@dataclass(frozen=True, slots=True)
class IceCredentials:
    """A username fragment and password (RFC 8445 §5.3), validated on construction."""

    ufrag: str
    pwd: str = field(repr=False)

    def __post_init__(self) -> None:
        validate_ufrag(self.ufrag)
        validate_pwd(self.pwd)

    @classmethod
    def generate(cls) -> IceCredentials:
        """Fresh credentials from :mod:`secrets` (48-bit ufrag, 144-bit password)."""
        return cls(_random_ice_chars(_UFRAG_CHARS), _random_ice_chars(_PWD_CHARS))


def _random_ice_chars(count: int) -> str:
    """``count`` (a multiple of 4) uniformly random ice-chars in one draw: ice-char is
    exactly the base64 alphabet, so base64 of 6 random bits per character is uniform over
    it -- and costs one ``urandom`` read instead of one per character."""
    assert count % 4 == 0
    return base64.b64encode(secrets.token_bytes(count * 6 // 8)).decode("ascii")


def parse_ice_options(value: str) -> tuple[str, ...]:
    """RFC 8839 §5.6: ``ice-options:`` 1*(ice-option-tag separated by SP), each 1*ice-char
    (e.g. ``trickle``, ``ice2``)."""
    tags = value.split(" ")
    if not value or any(not is_ice_chars(tag) for tag in tags):
        raise SdpError(f"ice-options must be ice-char tags separated by spaces: {value!r}")
    return tuple(tags)


def format_ice_options(options: Iterable[str]) -> str:
    tags = tuple(options)
    if not tags or any(not is_ice_chars(tag) for tag in tags):
        raise ValueError("ice-options are one or more ice-char tags")
    return "a=ice-options:" + " ".join(tags)


@dataclass(frozen=True, slots=True)
class IceDescription:
    """The ICE attributes of one SDP media section (or the session-level ones)."""

    ufrag: str | None = None
    pwd: str | None = field(default=None, repr=False)
    lite: bool = False
    options: tuple[str, ...] = ()
    candidates: tuple[Candidate, ...] = ()
    end_of_candidates: bool = False

    @property
    def trickle(self) -> bool:
        """The peer supports trickle ICE (RFC 8840 §4.1.1 ``a=ice-options:trickle``)."""
        return "trickle" in self.options

    @property
    def credentials(self) -> IceCredentials | None:
        if self.ufrag is None or self.pwd is None:
            return None
        return IceCredentials(self.ufrag, self.pwd)

    def to_lines(self) -> list[str]:
        """SDP lines (without line ends), in the order RFC 8839 §5 examples use."""
        lines: list[str] = []
        if self.lite:
            lines.append("a=ice-lite")
        if self.ufrag is not None:
            lines.append(f"a=ice-ufrag:{validate_ufrag(self.ufrag)}")
        if self.pwd is not None:
            lines.append(f"a=ice-pwd:{validate_pwd(self.pwd)}")
        if self.options:
            lines.append(format_ice_options(self.options))
        lines.extend(f"a={candidate.to_sdp()}" for candidate in self.candidates)
        if self.end_of_candidates:
            lines.append("a=end-of-candidates")
        return lines

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> IceDescription:
        """Collect the ICE attributes from SDP lines (other lines are skipped).

        A repeated ``ice-ufrag``/``ice-pwd``/``ice-options`` is an error (RFC 8839 §5.4
        allows one of each per level); every ``a=candidate`` must parse.
        """
        ufrag: str | None = None
        pwd: str | None = None
        lite = False
        options: tuple[str, ...] | None = None
        candidates: list[Candidate] = []
        end = False
        for raw in lines:
            line = raw.rstrip("\r\n")
            if not line.startswith("a="):
                continue
            name, sep, value = line[2:].partition(":")
            if name == "ice-ufrag":
                if ufrag is not None:
                    raise SdpError("a=ice-ufrag appears twice")
                ufrag = validate_ufrag(value)
            elif name == "ice-pwd":
                if pwd is not None:
                    raise SdpError("a=ice-pwd appears twice")
                pwd = validate_pwd(value)
            elif name == "ice-options":
                if options is not None:
                    raise SdpError("a=ice-options appears twice")
                options = parse_ice_options(value)
            elif name == "ice-lite":
                if sep:
                    raise SdpError("a=ice-lite takes no value")
                lite = True
            elif name == "end-of-candidates":
                if sep:
                    raise SdpError("a=end-of-candidates takes no value")
                end = True
            elif name == "candidate":
                candidates.append(Candidate.from_sdp(line))
        return cls(
            ufrag=ufrag,
            pwd=pwd,
            lite=lite,
            options=options or (),
            candidates=tuple(candidates),
            end_of_candidates=end,
        )
