"""Credentials: OpaqueString, HMAC keys, USERHASH, nonce cookies, TURN REST API passwords."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsunagu.errors import TsunaguError
from tsunagu.stun.credentials import (
    NONCE_COOKIE,
    CredentialError,
    NonceFactory,
    NonceStatus,
    PasswordAlgorithm,
    SecurityFeatures,
    _enforce_opaque_string,
    constant_time_equal,
    long_term_key,
    opaque_string,
    parse_security_features,
    rest_api_expired,
    rest_api_password,
    rest_api_username,
    short_term_key,
    userhash,
)

SECRET = bytes(range(32))
CLIENT = ("192.0.2.10", 50000)

# --- OpaqueString (RFC 8265 §4.2) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("pass", "pass"),
        ("correct horse battery staple", "correct horse battery staple"),
        ("PassWord", "PassWord"),  # no case mapping
        ("e\u0301t\u00e9", "\u00e9t\u00e9"),  # NFC composes
        ("\u2126", "\u03a9"),  # OHM SIGN's canonical singleton decomposition
        ("a\u00a0b", "a b"),  # NO-BREAK SPACE -> U+0020
        ("\u3000x\u2009y", " x y"),  # IDEOGRAPHIC SPACE, THIN SPACE
        ("\uff21\uff22", "\uff21\uff22"),  # no width mapping: fullwidth stays fullwidth
        ("\u2168", "\u2168"),  # ROMAN NUMERAL NINE: no NFKC, unlike SASLprep's "IX"
        ("\ufb01", "\ufb01"),  # the "fi" ligature is allowed (HasCompat) and kept
        ("\u00df", "\u00df"),  # ß is PVALID by exception
        ("\U0001f600", "\U0001f600"),  # symbols are FREE_PVAL
        ("\u30de\u30c8\u30ea\u30c3\u30af\u30b9", "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"),
    ],
)
def test_opaque_string_maps_and_normalises(given: str, expected: str) -> None:
    assert opaque_string(given) == expected


@pytest.mark.parametrize(
    "given",
    [
        "\u0915\u094d\u200d",  # ZWJ after a virama (RFC 5892 A.2)
        "\u0915\u094d\u200c",  # ZWNJ after a virama (RFC 5892 A.1)
        "l\u00b7l",  # Catalan middle dot (A.3)
        "\u0375\u03b1",  # Greek keraia before Greek (A.4)
        "\u05d0\u05f3",  # Hebrew geresh after Hebrew (A.5)
        "\u05d0\u05f4",  # Hebrew gershayim after Hebrew (A.6)
        "\u30a2\u30fb\u30a2",  # katakana middle dot with Katakana (A.7)
        "\u6f22\u30fb",  # ... or with Han
        "\u0661\u0662",  # Arabic-Indic digits alone (A.8)
        "\u06f1\u06f2",  # Extended Arabic-Indic digits alone (A.9)
    ],
)
def test_opaque_string_accepts_satisfied_context_rules(given: str) -> None:
    assert opaque_string(given) == given


@pytest.mark.parametrize(
    "given",
    [
        "",
        "pa\tss",  # controls (Cc)
        "\x00",
        "\x7f",
        "line\nbreak",
        "The\u00adM\u00aatr\u2168",  # RFC 5769 §2.4's password: SOFT HYPHEN is default-ignorable
        "zero\u200bwidth",  # ZERO WIDTH SPACE is default-ignorable
        "\ufeffbom",
        "a\ufe0f",  # variation selector
        "a\u200db",  # ZWJ without a virama
        "a\u00b7b",  # middle dot outside l·l
        "\u0375a",  # keraia before Latin
        "a\u05f3",  # geresh after Latin
        "a\u30fbb",  # katakana middle dot without Hiragana/Katakana/Han
        "\u0661\u06f1",  # both kinds of Arabic-Indic digits
        "\u1100\u1161",  # conjoining jamo (OldHangulJamo), even though NFC would compose them
        "\u0640",  # ARABIC TATWEEL, disallowed by exception
        "\u0378",  # unassigned
        "\ufdd0",  # noncharacter
        "\uffff",
        "\ue000",  # private use
        "\ud800",  # lone surrogate
        "\u2028",  # LINE SEPARATOR (Zl)
        "\u0600",  # ARABIC NUMBER SIGN (Cf)
    ],
)
def test_opaque_string_rejects_disallowed(given: str) -> None:
    with pytest.raises(CredentialError):
        opaque_string(given)


def test_credential_error_is_typed() -> None:
    with pytest.raises(TsunaguError):
        opaque_string("")
    with pytest.raises(ValueError):
        opaque_string("")


def test_printable_ascii_is_left_as_it_is_by_the_whole_profile() -> None:
    # opaque_string returns printable ASCII unchanged without running the profile; the
    # profile, run in full, must agree for every such code point, alone and among others.
    every = "".join(chr(cp) for cp in range(0x20, 0x7F))
    for s in [*every, every, " x ", "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./"]:
        assert _enforce_opaque_string(s) == s
        assert opaque_string(s) == s


@given(st.text(alphabet=st.characters(min_codepoint=0x00, max_codepoint=0x7F), min_size=1))
def test_the_ascii_shortcut_agrees_with_the_profile(s: str) -> None:
    try:
        expected: str | type[CredentialError] = _enforce_opaque_string(s)
    except CredentialError:
        expected = CredentialError
    if expected is CredentialError:
        with pytest.raises(CredentialError):
            opaque_string(s)
    else:
        assert opaque_string(s) == expected


def test_opaque_string_is_idempotent() -> None:
    for s in ["e\u0301", "a\u00a0b", "\u2126", "\u2168x"]:
        once = opaque_string(s)
        assert opaque_string(once) == once


# --- keys (RFC 8489 §9.1.1, §9.2.2, §18.5.1) -----------------------------------------------


def test_short_term_key_is_the_prepared_password() -> None:
    assert short_term_key("VOkJxbRl1RmTxUk/WvJxBt") == b"VOkJxbRl1RmTxUk/WvJxBt"
    assert short_term_key("caf\u0065\u0301") == "caf\u00e9".encode()
    with pytest.raises(CredentialError):
        short_term_key("")


def test_long_term_md5_key_matches_rfc_8489_example() -> None:
    # RFC 8489 §9.2.2: 'user', 'realm', 'pass' -> 0x8493fbc53ba582fb4c044c456bdc40eb.
    key = long_term_key("user", "realm", "pass", PasswordAlgorithm.MD5)
    assert key == hashlib.md5(b"user:realm:pass").digest()
    assert key.hex() == "8493fbc53ba582fb4c044c456bdc40eb"
    assert long_term_key("user", "realm", "pass") == key  # MD5 is the default


def test_long_term_sha256_key() -> None:
    key = long_term_key("user", "realm", "pass", PasswordAlgorithm.SHA256)
    assert key == hashlib.sha256(b"user:realm:pass").digest()
    assert len(key) == 32


def test_long_term_key_prepares_realm_and_password_but_not_username() -> None:
    # §9.2.2: the username is taken from USERNAME, where OpaqueString was already applied.
    key = long_term_key("u\u00a0x", "exa\u00a0mple", "e\u0301")
    expected = hashlib.md5("u\u00a0x:exa mple:\u00e9".encode()).digest()
    assert key == expected


def test_long_term_key_removes_trailing_nulls() -> None:
    assert long_term_key("user\x00", "realm\x00\x00", "pass\x00") == long_term_key(
        "user", "realm", "pass"
    )


def test_long_term_key_rejects_bad_password() -> None:
    with pytest.raises(CredentialError):
        long_term_key("user", "realm", "")
    with pytest.raises(CredentialError):
        long_term_key("user", "realm", "pa\x01ss")


def test_password_algorithm_numbers() -> None:
    # RFC 8489 §18.5.1: the values carried in PASSWORD-ALGORITHM(S).
    assert PasswordAlgorithm(0x0001) is PasswordAlgorithm.MD5
    assert PasswordAlgorithm(0x0002) is PasswordAlgorithm.SHA256


def test_userhash_matches_rfc_8489_appendix_b1() -> None:
    # RFC 8489 Appendix B.1: the USERHASH of this username in realm "example.org".
    value = userhash("\u30de\u30c8\u30ea\u30c3\u30af\u30b9", "example.org")
    assert value.hex() == "4a3cf38fef6992bda952c6780417da0f24819415569e60b205c46e41407f1704"


def test_userhash_prepares_both_parts() -> None:
    assert userhash("a\u00a0b", "e\u0301") == hashlib.sha256("a b:\u00e9".encode()).digest()


def test_constant_time_equal() -> None:
    assert constant_time_equal(b"abc", b"abc")
    assert not constant_time_equal(b"abc", b"abd")
    assert not constant_time_equal(b"abc", b"abcd")


# --- nonce cookie and nonces (RFC 8489 §9.2, §18.1) ----------------------------------------


def test_security_feature_bits_follow_erratum_6290() -> None:
    # Bit 0 (password algorithms) is the least significant bit of the 24, bit 1 the next.
    assert SecurityFeatures(password_algorithms=True).to_bits() == 0x000001
    assert SecurityFeatures(username_anonymity=True).to_bits() == 0x000002
    assert SecurityFeatures().cookie() == "obMatJos2AAAA"
    assert SecurityFeatures(True, True).cookie() == "obMatJos2AAAD"
    assert SecurityFeatures.from_bits(0xFFFFFC) == SecurityFeatures()  # unassigned bits


def test_parse_security_features_of_rfc_8489_example_nonce() -> None:
    # Appendix B.1's nonce; its request uses USERHASH, i.e. username anonymity (bit 1).
    features = parse_security_features("obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA")
    assert features == SecurityFeatures(password_algorithms=False, username_anonymity=True)


@pytest.mark.parametrize(
    "nonce",
    [
        "",
        "f//499k954d6OL34oL9FSTvy64sA",  # an RFC 5389 style nonce without the cookie
        "obMatJos2",  # cookie, no feature bits
        "obMatJos2AA",
        "obMatJos2A!AA",  # not base64
        "obMatJos2AA==rest",  # base64, but of one byte
        "obMatJos2\u00e9AAA",
    ],
)
def test_parse_security_features_without_a_valid_cookie(nonce: str) -> None:
    assert parse_security_features(nonce) is None


def test_nonce_roundtrip() -> None:
    features = SecurityFeatures(password_algorithms=True)
    factory = NonceFactory(SECRET, lifetime=600.0, features=features)
    nonce = factory.issue(CLIENT, 1000.0)
    assert nonce.startswith(NONCE_COOKIE)
    assert parse_security_features(nonce) == features
    assert factory.check(nonce, CLIENT, 1000.0) is NonceStatus.VALID
    assert factory.check(nonce, CLIENT, 1599.9) is NonceStatus.VALID


def test_nonce_is_short_printable_qdtext() -> None:
    nonce = NonceFactory(SECRET).issue(("2001:db8::1234:5678:9abc:def0", 65535), 1e9)
    # RFC 8489 §14.10: fewer than 128 characters; qdtext excludes '"' and '\'.
    assert len(nonce) < 128
    assert nonce.isascii()
    assert nonce.isprintable()
    assert '"' not in nonce
    assert "\\" not in nonce
    assert " " not in nonce


def test_nonce_goes_stale_after_lifetime() -> None:
    factory = NonceFactory(SECRET, lifetime=30.0)
    nonce = factory.issue(CLIENT, 100.0)
    assert factory.check(nonce, CLIENT, 129.999) is NonceStatus.VALID
    assert factory.check(nonce, CLIENT, 130.0) is NonceStatus.STALE
    assert factory.check(nonce, CLIENT, 10_000.0) is NonceStatus.STALE


def test_nonce_from_the_future_is_stale() -> None:
    factory = NonceFactory(SECRET)
    nonce = factory.issue(CLIENT, 100.0)
    assert factory.check(nonce, CLIENT, 99.0) is NonceStatus.STALE


def test_nonce_for_another_client_is_invalid() -> None:
    factory = NonceFactory(SECRET)
    nonce = factory.issue(CLIENT, 0.0)
    assert factory.check(nonce, ("192.0.2.10", 50001), 1.0) is NonceStatus.INVALID
    assert factory.check(nonce, ("192.0.2.11", 50000), 1.0) is NonceStatus.INVALID
    assert factory.check(nonce, "192.0.2.10:50000", 1.0) is NonceStatus.INVALID


def test_string_client_identities() -> None:
    factory = NonceFactory(SECRET)
    nonce = factory.issue("tcp-connection-17", 5.0)
    assert factory.check(nonce, "tcp-connection-17", 6.0) is NonceStatus.VALID
    assert factory.check(nonce, "tcp-connection-18", 6.0) is NonceStatus.INVALID


def test_different_clients_get_different_nonces() -> None:
    # RFC 8489 §9.2.4: no same NONCE for requests from different source addresses.
    factory = NonceFactory(SECRET)
    assert factory.issue(CLIENT, 0.0) != factory.issue(("192.0.2.10", 50001), 0.0)


def test_tampered_nonce_is_invalid() -> None:
    factory = NonceFactory(SECRET, features=SecurityFeatures(password_algorithms=True))
    nonce = factory.issue(CLIENT, 0.0)
    for i in range(len(nonce)):
        replacement = "B" if nonce[i] != "B" else "C"
        tampered = nonce[:i] + replacement + nonce[i + 1 :]
        assert factory.check(tampered, CLIENT, 1.0) is NonceStatus.INVALID, i


def test_bid_down_of_feature_bits_is_invalid() -> None:
    # §9.2.1: a man in the middle clearing the password-algorithms bit is detected.
    factory = NonceFactory(SECRET, features=SecurityFeatures(password_algorithms=True))
    nonce = factory.issue(CLIENT, 0.0)
    downgraded = SecurityFeatures().cookie() + nonce[len(SecurityFeatures().cookie()) :]
    assert factory.check(downgraded, CLIENT, 1.0) is NonceStatus.INVALID


def test_nonce_from_another_secret_is_invalid() -> None:
    nonce = NonceFactory(SECRET).issue(CLIENT, 0.0)
    other = NonceFactory(bytes(32))
    assert other.check(nonce, CLIENT, 1.0) is NonceStatus.INVALID


@pytest.mark.parametrize(
    "nonce",
    [
        "",
        "x",
        "obMatJos2AAAA",
        "obMatJos2AAAA" + "!" * 32,
        "\u00e9" * 45,
        "obMatJos2AAAA" + "=" * 32,
    ],
)
def test_garbage_nonce_is_invalid_and_never_raises(nonce: str) -> None:
    assert NonceFactory(SECRET).check(nonce, CLIENT, 0.0) is NonceStatus.INVALID


def test_nonce_factory_rejects_weak_configuration() -> None:
    with pytest.raises(CredentialError):
        NonceFactory(b"short")
    with pytest.raises(CredentialError):
        NonceFactory(SECRET, lifetime=0.0)


def test_nonce_factory_exposes_its_settings() -> None:
    features = SecurityFeatures(username_anonymity=True)
    factory = NonceFactory(SECRET, lifetime=42.0, features=features)
    assert factory.features == features
    assert factory.lifetime == 42.0
    assert NonceFactory(SECRET).features == SecurityFeatures()


# --- TURN REST API -------------------------------------------------------------------------


def test_rest_api_username() -> None:
    assert rest_api_username(1_700_000_000, "alice") == "1700000000:alice"
    assert rest_api_username(1_700_000_000) == "1700000000"
    with pytest.raises(CredentialError):
        rest_api_username(-1)


def test_rest_api_password_is_base64_hmac_sha1() -> None:
    username = "1700000000:alice"
    expected = base64.b64encode(
        hmac.new(b"north", username.encode(), hashlib.sha1).digest()
    ).decode()
    assert rest_api_password("north", username) == expected
    assert rest_api_password(b"north", username) == expected
    assert len(base64.b64decode(expected)) == 20


def test_rest_api_expired() -> None:
    assert not rest_api_expired("1000:alice", 999.0)
    assert not rest_api_expired("1000:alice", 1000.0)
    assert rest_api_expired("1000:alice", 1000.5)
    assert not rest_api_expired("1000", 10.0)
    # Without a readable expiry the server cannot accept the credential.
    assert rest_api_expired("alice", 0.0)
    assert rest_api_expired(":alice", 0.0)
    assert rest_api_expired("-5:alice", 0.0)
    assert rest_api_expired("\u0661\u0662:alice", 0.0)
