"""STUN credentials: string preparation, HMAC keys, USERHASH, nonces, TURN REST passwords.

Everything here is a pure function of its arguments (the nonce factory takes ``now`` and a
secret from its caller), so cores and simulations can use it without hidden clocks or
randomness.

* :func:`opaque_string` -- the RFC 8265 §4.2 OpaqueString profile, built on :mod:`unicodedata`.
* :func:`short_term_key`, :func:`long_term_key` -- RFC 8489 §9.1.1, §9.2.2, §18.5.1.
* :func:`userhash` -- RFC 8489 §14.4.
* :class:`NonceFactory` -- stateless nonces carrying the RFC 8489 §9.2 "nonce cookie".
* :func:`rest_api_password` and friends -- ephemeral TURN credentials as coturn and the
  TURN REST API draft (draft-uberti-behave-turn-rest-00) define them.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import math
import struct
import unicodedata
from dataclasses import dataclass
from enum import IntEnum

from tsunagu.errors import TsunaguError
from tsunagu.stun.message import IntegrityKey

__all__ = [
    "NONCE_COOKIE",
    "CredentialError",
    "NonceFactory",
    "NonceStatus",
    "PasswordAlgorithm",
    "SecurityFeatures",
    "constant_time_equal",
    "long_term_key",
    "opaque_string",
    "parse_security_features",
    "rest_api_expired",
    "rest_api_password",
    "rest_api_username",
    "short_term_key",
    "userhash",
]


class CredentialError(TsunaguError, ValueError):
    """A string that OpaqueString rejects, or a credential helper used with bad arguments."""


# --- RFC 8265 §4.2 OpaqueString ------------------------------------------------------------
#
# OpaqueString is the PRECIS FreeformClass (RFC 8264 §4.3) plus these rules (RFC 8265 §4.2.1):
# no width mapping, non-ASCII spaces (Zs) mapped to U+0020, no case mapping, NFC, no
# directionality rule; the result must not be empty.
#
# The FreeformClass derivation (RFC 8264 §8) needs some Unicode properties that unicodedata
# does not expose; they are approximated as follows, and these are the only known gaps:
#
# * Default_Ignorable_Code_Point (RFC 8264 §9.13) is not in unicodedata, so the list below is
#   transcribed from Unicode 14's DerivedCoreProperties.txt. Its Cf and unassigned entries are
#   disallowed anyway; it matters for the Mn and Lo ones (variation selectors, COMBINING
#   GRAPHEME JOINER, Hangul fillers, Khmer inherent vowels), which would otherwise pass.
# * The script tests of the CONTEXTO rules (RFC 5892 A.4, A.5, A.7) use character names
#   ("GREEK ...", "HEBREW ...", "HIRAGANA ..."), since unicodedata has no Script property.
# * ZERO WIDTH NON-JOINER (RFC 5892 A.1) is accepted only after a virama: the second,
#   Joining_Type-based alternative of that rule needs ArabicShaping.txt, which the standard
#   library lacks, so some valid Arabic-script uses of U+200C are rejected (never the reverse).
# * The Unicode version is that of the running Python (unicodedata.unidata_version), so a code
#   point assigned after it counts as unassigned and is rejected.

_DEFAULT_IGNORABLE: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD),  # SOFT HYPHEN
    (0x034F, 0x034F),  # COMBINING GRAPHEME JOINER
    (0x061C, 0x061C),  # ARABIC LETTER MARK
    (0x115F, 0x1160),  # HANGUL CHOSEONG/JUNGSEONG FILLER
    (0x17B4, 0x17B5),  # KHMER VOWEL INHERENT AQ/AA
    (0x180B, 0x180F),  # MONGOLIAN FREE VARIATION SELECTORS, VOWEL SEPARATOR
    (0x200B, 0x200F),  # ZERO WIDTH SPACE .. RIGHT-TO-LEFT MARK
    (0x202A, 0x202E),  # bidi embedding controls
    (0x2060, 0x206F),  # WORD JOINER .. NOMINAL DIGIT SHAPES
    (0x3164, 0x3164),  # HANGUL FILLER
    (0xFE00, 0xFE0F),  # VARIATION SELECTOR-1..16
    (0xFEFF, 0xFEFF),  # ZERO WIDTH NO-BREAK SPACE
    (0xFFA0, 0xFFA0),  # HALFWIDTH HANGUL FILLER
    (0xFFF0, 0xFFF8),  # reserved
    (0x1BCA0, 0x1BCA3),  # SHORTHAND FORMAT CONTROLS
    (0x1D173, 0x1D17A),  # MUSICAL SYMBOL BEGIN BEAM .. END PHRASE
    (0xE0000, 0xE0FFF),  # tags, VARIATION SELECTOR-17..256, reserved
)

# RFC 8264 §9.9 OldHangulJamo: Hangul_Syllable_Type L, V or T (conjoining jamo).
_OLD_HANGUL_JAMO: tuple[tuple[int, int], ...] = (
    (0x1100, 0x11FF),
    (0xA960, 0xA97C),
    (0xD7B0, 0xD7C6),
    (0xD7CB, 0xD7FB),
)

# RFC 5892 §2.6 Exceptions, which RFC 8264 §9.6 takes over unchanged.
_EXCEPTIONS_PVALID = frozenset({0x00DF, 0x03C2, 0x06FD, 0x06FE, 0x0F0B, 0x3007})
_EXCEPTIONS_DISALLOWED = frozenset(
    {0x0640, 0x07FA, 0x302E, 0x302F, 0x3031, 0x3032, 0x3033, 0x3034, 0x3035, 0x303B}
)
_ARABIC_INDIC_DIGITS = range(0x0660, 0x066A)
_EXTENDED_ARABIC_INDIC_DIGITS = range(0x06F0, 0x06FA)
_EXCEPTIONS_CONTEXTO = frozenset(
    {0x00B7, 0x0375, 0x05F3, 0x05F4, 0x30FB, *_ARABIC_INDIC_DIGITS, *_EXTENDED_ARABIC_INDIC_DIGITS}
)
_ZWNJ = 0x200C
_ZWJ = 0x200D
_VIRAMA_CCC = 9  # Canonical_Combining_Class "Virama"

# RFC 8264 §9.1 LetterDigits and the FREE_PVAL groups of FreeformClass (RFC 8264 §4.3.1):
# OtherLetterDigits (§9.18), Spaces (§9.14), Symbols (§9.15), Punctuation (§9.16).
_LETTER_DIGITS = frozenset({"Ll", "Lu", "Lo", "Nd", "Lm", "Mn", "Mc"})
_FREE_PVAL = frozenset(
    {"Lt", "Nl", "No", "Me", "Zs", "Sm", "Sc", "Sk", "So", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po"}
)


class _Prop(enum.Enum):
    VALID = "valid"  # PVALID or FREE_PVAL
    CONTEXTJ = "contextj"
    CONTEXTO = "contexto"
    DISALLOWED = "disallowed"


def _in_ranges(cp: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


def _is_noncharacter(cp: int) -> bool:
    # Noncharacter_Code_Point: U+FDD0..U+FDEF and the last two code points of every plane.
    return 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


def _freeform_property(ch: str) -> _Prop:
    """The FreeformClass derived property of one code point, in RFC 8264 §8 order."""
    cp = ord(ch)
    category = unicodedata.category(ch)
    if cp in _EXCEPTIONS_PVALID:
        return _Prop.VALID
    if cp in _EXCEPTIONS_DISALLOWED:
        return _Prop.DISALLOWED
    if cp in _EXCEPTIONS_CONTEXTO:
        return _Prop.CONTEXTO
    # BackwardCompatible (RFC 8264 §9.7) is empty.
    if category == "Cn":  # Unassigned (§9.10) or a noncharacter (Ignorable, §9.13)
        return _Prop.DISALLOWED
    if 0x21 <= cp <= 0x7E:  # ASCII7 (§9.11)
        return _Prop.VALID
    if cp in (_ZWNJ, _ZWJ):  # JoinControl (§9.8)
        return _Prop.CONTEXTJ
    if _in_ranges(cp, _OLD_HANGUL_JAMO):
        return _Prop.DISALLOWED
    if _in_ranges(cp, _DEFAULT_IGNORABLE) or _is_noncharacter(cp):
        return _Prop.DISALLOWED
    if category == "Cc":  # Controls (§9.12)
        return _Prop.DISALLOWED
    if unicodedata.normalize("NFKC", ch) != ch:  # HasCompat (§9.17): FREE_PVAL
        return _Prop.VALID
    if category in _LETTER_DIGITS or category in _FREE_PVAL:
        return _Prop.VALID
    # Everything else -- Cf, Co (private use), Cs (lone surrogates), Zl, Zp -- is "Other".
    return _Prop.DISALLOWED


def _name_starts(ch: str, *prefixes: str) -> bool:
    return unicodedata.name(ch, "").startswith(prefixes)


def _is_hiragana_katakana_han(ch: str) -> bool:
    # Stand-in for Script in {Hiragana, Katakana, Han} (RFC 5892 A.7). The "KATAKANA-HIRAGANA"
    # marks and the middle dots are script Common, so they do not count.
    name = unicodedata.name(ch, "")
    if name.startswith("KATAKANA-HIRAGANA") or name.endswith("MIDDLE DOT"):
        return False
    return name.startswith(
        (
            "HIRAGANA",
            "KATAKANA",
            "HALFWIDTH KATAKANA",
            "CIRCLED KATAKANA",
            "CJK UNIFIED IDEOGRAPH",
            "CJK COMPATIBILITY IDEOGRAPH",
            "IDEOGRAPHIC ITERATION MARK",
            "IDEOGRAPHIC NUMBER ZERO",
            "CJK RADICAL",
            "KANGXI RADICAL",
        )
    )


def _context_ok(s: str, i: int, prop: _Prop) -> bool:
    """RFC 5892 Appendix A contextual rules, applied as RFC 8264 §8 requires."""
    cp = ord(s[i])
    before = s[i - 1] if i > 0 else ""
    after = s[i + 1] if i + 1 < len(s) else ""
    if prop is _Prop.CONTEXTJ:
        # A.1 (ZWNJ, virama alternative only -- see the module notes) and A.2 (ZWJ).
        return before != "" and unicodedata.combining(before) == _VIRAMA_CCC
    if cp == 0x00B7:  # A.3 MIDDLE DOT: only between two 'l' (Catalan l·l)
        return before == "l" and after == "l"
    if cp == 0x0375:  # A.4 GREEK LOWER NUMERAL SIGN (KERAIA): followed by Greek
        return after != "" and _name_starts(after, "GREEK")
    if cp in (0x05F3, 0x05F4):  # A.5, A.6 HEBREW GERESH / GERSHAYIM: preceded by Hebrew
        return before != "" and _name_starts(before, "HEBREW")
    if cp == 0x30FB:  # A.7 KATAKANA MIDDLE DOT: some Hiragana, Katakana or Han in the string
        return any(_is_hiragana_katakana_han(c) for c in s)
    if cp in _ARABIC_INDIC_DIGITS:  # A.8: not mixed with Extended Arabic-Indic digits
        return not any(ord(c) in _EXTENDED_ARABIC_INDIC_DIGITS for c in s)
    if cp in _EXTENDED_ARABIC_INDIC_DIGITS:  # A.9: not mixed with Arabic-Indic digits
        return not any(ord(c) in _ARABIC_INDIC_DIGITS for c in s)
    return False  # a CONTEXTO code point without a rule is disallowed (RFC 5892 §5.4)


def _check_freeform(s: str) -> None:
    for i, ch in enumerate(s):
        prop = _freeform_property(ch)
        if prop is _Prop.VALID:
            continue
        if prop is not _Prop.DISALLOWED and _context_ok(s, i, prop):
            continue
        raise CredentialError(f"code point U+{ord(ch):04X} is not allowed by OpaqueString")


def _apply_rules(s: str) -> str:
    # RFC 8265 §4.2.1: the additional mapping rule (every Zs except U+0020 becomes U+0020),
    # then NFC. Width, case and directionality rules are "none" for OpaqueString.
    mapped = "".join(" " if ch != " " and unicodedata.category(ch) == "Zs" else ch for ch in s)
    return unicodedata.normalize("NFC", mapped)


def opaque_string(s: str) -> str:
    """Prepare and enforce ``s`` with the RFC 8265 §4.2 OpaqueString profile.

    Returns the enforced string; raises :class:`CredentialError` if ``s`` holds a code point
    that the PRECIS FreeformClass disallows (controls, default-ignorables such as SOFT HYPHEN,
    unassigned or private-use code points, conjoining jamo, ...) or if the result is empty.
    Unlike SASLprep, no NFKC and no mapping-to-nothing happen: "Ⅸ" stays "Ⅸ".
    """
    if not s:
        raise CredentialError("OpaqueString does not allow an empty string")  # RFC 8265 §4.2.3
    if s.isascii() and s.isprintable():
        # U+0020-U+007E only: every one is PVALID in the FreeformClass (RFC 8264 §9.11
        # ASCII7, §9.14 Spaces), none is a non-ASCII space to map, and NFC leaves ASCII as
        # it is, so the profile returns the string unchanged. ICE passwords (ice-chars)
        # and most STUN passwords take this path, which is what an agent pays per session.
        return s
    return _enforce_opaque_string(s)


def _enforce_opaque_string(s: str) -> str:
    """RFC 8265 §4.2.3 enforcement of a non-empty string, every step of it."""
    # RFC 8265 §4.2.3: enforcement first prepares (the input must be FreeformClass) ...
    _check_freeform(s)
    # ... then applies the rules. RFC 8264 §7: repeat until stable, rejecting a string that has
    # not settled after three more passes. Zs mapping then NFC settles in one pass in practice.
    out = _apply_rules(s)
    for _ in range(3):
        again = _apply_rules(out)
        if again == out:
            break
        out = again
    else:
        raise CredentialError("OpaqueString rules did not converge")
    _check_freeform(out)
    return out  # not empty: neither rule removes code points


# --- HMAC keys (RFC 8489 §9.1.1, §9.2.2, §18.5.1) ------------------------------------------


class PasswordAlgorithm(IntEnum):
    """STUN password algorithms (RFC 8489 §18.5.1; 0x0000 is reserved)."""

    MD5 = 0x0001
    SHA256 = 0x0002


def short_term_key(password: str) -> bytes:
    """The short-term credential HMAC key: ``OpaqueString(password)`` in UTF-8 (§9.1.1)."""
    return opaque_string(password).encode("utf-8")


def long_term_key(
    username: str,
    realm: str,
    password: str,
    algorithm: PasswordAlgorithm = PasswordAlgorithm.MD5,
) -> bytes:
    """The long-term credential HMAC key (RFC 8489 §9.2.2, §18.5.1.1, §18.5.1.2).

    ``key = H(username ":" OpaqueString(realm) ":" OpaqueString(password))`` with H = MD5 (16
    bytes) or SHA-256 (32 bytes). ``username`` is the value of the USERNAME attribute, to which
    OpaqueString was already applied when the client formed it (§14.3), so it is used as is.
    REALM is a sequence of qdtext/quoted-pair (§14.9) with no enclosing quotes, so of §9.2.2's
    "quotes and trailing nulls removed" only the trailing NULs can need removing.
    """
    text = ":".join(
        (
            username.rstrip("\x00"),
            opaque_string(realm.rstrip("\x00")),
            opaque_string(password.rstrip("\x00")),
        )
    ).encode("utf-8")
    if algorithm == PasswordAlgorithm.MD5:
        # MD5 is what the protocol mandates here, not a choice of ours.
        return hashlib.md5(text, usedforsecurity=False).digest()
    if algorithm == PasswordAlgorithm.SHA256:
        return hashlib.sha256(text).digest()
    raise CredentialError(f"unknown password algorithm {algorithm!r}")


def userhash(username: str, realm: str) -> bytes:
    """USERHASH: ``SHA-256(OpaqueString(username) ":" OpaqueString(realm))`` (RFC 8489 §14.4)."""
    text = f"{opaque_string(username)}:{opaque_string(realm)}"
    return hashlib.sha256(text.encode("utf-8")).digest()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare secrets (MACs, keys) in time independent of where they first differ."""
    return hmac.compare_digest(a, b)


# --- nonce cookie and stateless nonces (RFC 8489 §9.2, §18.1) ------------------------------

NONCE_COOKIE = "obMatJos2"  # RFC 8489 §9.2
_COOKIE_LENGTH = len(NONCE_COOKIE) + 4  # cookie + 4 base64 characters of 24 feature bits

# RFC 8489 §18.1 numbers the 24 security feature bits 0..23. §9.2 says bit 0 is the most
# significant, but verified erratum 6290 corrects that: bits are assigned from the least
# significant side, so bit 0 is the rightmost bit of the third byte. The example nonce of
# Appendix B.1, "obMatJos2AAAC...", whose request uses USERHASH, agrees: 0x000002 is bit 1.
_BIT_PASSWORD_ALGORITHMS = 1 << 0
_BIT_USERNAME_ANONYMITY = 1 << 1


@dataclass(frozen=True, slots=True)
class SecurityFeatures:
    """The STUN Security Features a server advertises in its nonce cookie (RFC 8489 §18.1)."""

    password_algorithms: bool = False
    """Bit 0: the server sends PASSWORD-ALGORITHMS; clients must echo it (§9.2.4, §9.2.5)."""
    username_anonymity: bool = False
    """Bit 1: the server accepts USERHASH; clients must use it instead of USERNAME (§9.2.5)."""

    def to_bits(self) -> int:
        """The 24-bit feature set (unassigned bits 2-23 are zero)."""
        bits = 0
        if self.password_algorithms:
            bits |= _BIT_PASSWORD_ALGORITHMS
        if self.username_anonymity:
            bits |= _BIT_USERNAME_ANONYMITY
        return bits

    @classmethod
    def from_bits(cls, bits: int) -> SecurityFeatures:
        """Read the two assigned flags from a 24-bit feature set, ignoring unassigned bits."""
        return cls(
            password_algorithms=bool(bits & _BIT_PASSWORD_ALGORITHMS),
            username_anonymity=bool(bits & _BIT_USERNAME_ANONYMITY),
        )

    def cookie(self) -> str:
        """The 13-character nonce cookie: "obMatJos2" + base64 of the 3 feature bytes (§9.2)."""
        encoded = base64.b64encode(self.to_bits().to_bytes(3, "big")).decode("ascii")
        return NONCE_COOKIE + encoded


def parse_security_features(nonce: str) -> SecurityFeatures | None:
    """Client side of RFC 8489 §9.2.5: the features of a nonce, or None without a cookie."""
    if len(nonce) < _COOKIE_LENGTH or not nonce.startswith(NONCE_COOKIE):
        return None
    encoded = nonce[len(NONCE_COOKIE) : _COOKIE_LENGTH]
    if not encoded.isascii():
        return None
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        return None
    if len(raw) != 3:  # "AA==" and the like are base64, but not of 24 bits
        return None
    return SecurityFeatures.from_bits(int.from_bytes(raw, "big"))


class NonceStatus(enum.Enum):
    """Outcome of :meth:`NonceFactory.check`; STALE maps to 438, INVALID to 401 (§9.2.4)."""

    VALID = "valid"
    STALE = "stale"
    INVALID = "invalid"


_NONCE_MAC_LENGTH = 16  # 128 bits of HMAC-SHA256: forging one is as hard as guessing a key
_NONCE_TIME = struct.Struct(">q")  # issue time in whole milliseconds of the caller's clock
_NONCE_TOKEN_LENGTH = 4 * (_NONCE_TIME.size + _NONCE_MAC_LENGTH) // 3  # base64url, no padding
_NONCE_DOMAIN = b"tsunagu nonce v1\x00"  # keeps these MACs apart from any other use of the key
_NONCE_LENGTH = _COOKIE_LENGTH + _NONCE_TOKEN_LENGTH
_MIN_SECRET_LENGTH = 16
# base64url (RFC 4648 §5) to and from the standard alphabet, for binascii's codec.
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


def _milliseconds(now: float) -> int:
    return math.floor(now * 1000)


def _client_identity(client: tuple[str, int] | str) -> bytes:
    # Length-prefixed, and tagged by kind, so that no two distinct clients encode alike.
    if isinstance(client, tuple):
        host, port = client
        raw = host.encode("utf-8")
        return b"A" + _U16.pack(len(raw)) + raw + _U16.pack(port)
    raw = client.encode("utf-8")
    return b"S" + _U32.pack(len(raw)) + raw


class NonceFactory:
    """Issues and checks stateless long-term-credential nonces (RFC 8489 §9.2).

    A nonce is the nonce cookie advertising ``features``, then base64url of the issue time and
    a truncated HMAC-SHA256 over the cookie, that time and the client's identity. The server
    stores nothing per client, so a flood of unauthenticated requests costs it no memory,
    and §9.2.4's "MUST NOT choose the same NONCE for two requests unless they have the same
    source IP address and port" holds because the client's address is under the MAC. Since the
    cookie is under the MAC too, a man in the middle who rewrites the feature bits to bid the
    client down (§9.2.1) turns the nonce INVALID.

    Nonces are 45 ASCII characters, all ``qdtext``, well under the 128 characters (763 bytes)
    §14.10 allows. ``now`` is whatever clock the caller uses for every call; nonces from
    another clock or another ``secret`` simply fail to check, so a server restart (new secret)
    costs each client one 401 round trip.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        lifetime: float = 600.0,
        features: SecurityFeatures | None = None,
    ) -> None:
        """``secret``: at least 16 random bytes (draw them from :mod:`secrets`).

        ``lifetime``: seconds a nonce stays VALID; 600 s matches coturn's ``--stale-nonce``
        default, long enough that clients rarely see a 438 and short enough to bound replay.
        ``features``: the security features this server advertises in every nonce.
        """
        if len(secret) < _MIN_SECRET_LENGTH:
            raise CredentialError(f"nonce secret must be at least {_MIN_SECRET_LENGTH} bytes")
        if not lifetime > 0:
            raise CredentialError("nonce lifetime must be positive")
        self._lifetime = lifetime
        self._features = features if features is not None else SecurityFeatures()
        self._cookie = self._features.cookie()
        self._cookie_bytes = self._cookie.encode("ascii")
        # The secret's HMAC key schedule, done once; every MAC then costs only its hashing.
        self._key = IntegrityKey(secret)
        self._mac_prefix = _NONCE_DOMAIN + self._cookie_bytes

    @property
    def features(self) -> SecurityFeatures:
        """The security features advertised in every nonce this factory issues."""
        return self._features

    @property
    def lifetime(self) -> float:
        """Seconds a nonce stays VALID after it was issued."""
        return self._lifetime

    def _mac(self, time_bytes: bytes, client: tuple[str, int] | str) -> bytes:
        message = self._mac_prefix + time_bytes + _client_identity(client)
        return self._key.mac(message, "sha256")[:_NONCE_MAC_LENGTH]

    def issue(self, client: tuple[str, int] | str, now: float) -> str:
        """A fresh nonce for ``client`` (its (ip, port), or any stable identity string)."""
        time_bytes = _NONCE_TIME.pack(_milliseconds(now))
        token = binascii.b2a_base64(time_bytes + self._mac(time_bytes, client), newline=False)
        return self._cookie + token.translate(_TO_URLSAFE).decode("ascii")

    def check(self, nonce: str, client: tuple[str, int] | str, now: float) -> NonceStatus:
        """Whether ``nonce`` (from a request, so untrusted) is one we issued to ``client``.

        INVALID: not ours, altered, or issued to another client. STALE: ours, but older than
        the lifetime (or from the future, which only a clock reset explains) -- answer 438 with
        a fresh nonce. Never raises on malformed input.
        """
        if len(nonce) != _NONCE_LENGTH or not nonce.isascii():
            return NonceStatus.INVALID
        data = nonce.encode("ascii")
        if not constant_time_equal(data[:_COOKIE_LENGTH], self._cookie_bytes):
            return NonceStatus.INVALID
        try:  # strict base64url: what base64.b64decode(altchars=b"-_", validate=True) does
            raw = binascii.a2b_base64(
                data[_COOKIE_LENGTH:].translate(_FROM_URLSAFE), strict_mode=True
            )
        except binascii.Error:
            return NonceStatus.INVALID
        time_bytes, mac = raw[: _NONCE_TIME.size], raw[_NONCE_TIME.size :]
        if not constant_time_equal(mac, self._mac(time_bytes, client)):
            return NonceStatus.INVALID
        # Whole milliseconds on both sides, so a nonce checked at the instant it was issued
        # is never judged "from the future" by float rounding.
        age_ms = _milliseconds(now) - _NONCE_TIME.unpack(time_bytes)[0]
        if not 0 <= age_ms < self._lifetime * 1000:
            return NonceStatus.STALE
        return NonceStatus.VALID


# --- TURN REST API ephemeral credentials ---------------------------------------------------
#
# draft-uberti-behave-turn-rest-00 §2.2, as coturn implements it (--use-auth-secret): the
# username is "<expiry unix time>:<user>" and the password base64(HMAC-SHA1(secret, username)).
# The web service and the TURN server share only the secret; nothing is stored per user.

_REST_SEPARATOR = ":"


def rest_api_username(expiry_unix: int, user: str | None = None) -> str:
    """``"EXPIRY:USER"``, or just ``"EXPIRY"`` when there is no user id."""
    if expiry_unix < 0:
        raise CredentialError("REST API expiry must not be negative")
    return f"{expiry_unix}" if user is None else f"{expiry_unix}{_REST_SEPARATOR}{user}"


def rest_api_password(secret: str | bytes, username: str) -> str:
    """``base64(HMAC-SHA1(secret, username))``: the password the TURN server derives."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    # HMAC-SHA1 is fixed by the REST API convention that coturn and browsers' servers share.
    digest = hmac.new(key, username.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def rest_api_expired(username: str, now_unix: float) -> bool:
    """Whether a REST API username's expiry time lies before ``now_unix``.

    A username whose first field is not a decimal timestamp counts as expired: the server
    cannot tell when it ends, so it must not accept it.
    """
    expiry = username.split(_REST_SEPARATOR, 1)[0]
    if not (expiry.isascii() and expiry.isdigit()):
        return True
    return int(expiry) < now_unix
