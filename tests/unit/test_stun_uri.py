"""stun:/stuns: (RFC 7064) and turn:/turns: (RFC 7065) URI parsing."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsunagu.errors import TsunaguError
from tsunagu.stun.uri import StunUri, StunUriError


@pytest.mark.parametrize(
    ("text", "scheme", "host", "port", "transport"),
    [
        # RFC 7064 §3.2 / RFC 7065 §3.2 defaults.
        ("stun:example.org", "stun", "example.org", 3478, "udp"),
        ("stuns:example.org", "stuns", "example.org", 5349, "tcp"),
        ("turn:example.org", "turn", "example.org", 3478, "udp"),
        ("turns:example.org", "turns", "example.org", 5349, "tcp"),
        # Explicit ports and transports.
        ("stun:stun.l.google.com:19302", "stun", "stun.l.google.com", 19302, "udp"),
        ("turn:192.0.2.1:3479?transport=tcp", "turn", "192.0.2.1", 3479, "tcp"),
        ("turn:192.0.2.1?transport=udp", "turn", "192.0.2.1", 3478, "udp"),
        ("turns:turn.example.org:443?transport=tcp", "turns", "turn.example.org", 443, "tcp"),
        ("turns:turn.example.org?transport=udp", "turns", "turn.example.org", 5349, "udp"),
        # IPv6 literals (RFC 3986 §3.2.2), kept without brackets, canonical.
        ("stun:[::1]", "stun", "::1", 3478, "udp"),
        ("stun:[2001:DB8:0:0::1]:3479", "stun", "2001:db8::1", 3479, "udp"),
        ("turn:[::ffff:192.0.2.1]?transport=tcp", "turn", "::ffff:c000:201", 3478, "tcp"),
        ("stun:[fe80::1%25eth0]:3478", "stun", "fe80::1%eth0", 3478, "udp"),  # RFC 6874
        # Case-insensitive scheme, host and transport; an empty port means the default.
        ("STUN:Example.ORG", "stun", "example.org", 3478, "udp"),
        ("TURN:h.example?TRANSPORT=TCP", "turn", "h.example", 3478, "tcp"),
        ("stun:example.org:", "stun", "example.org", 3478, "udp"),
        ("  stun:example.org  ", "stun", "example.org", 3478, "udp"),
        ("stun:localhost", "stun", "localhost", 3478, "udp"),
        ("stun:example.org.", "stun", "example.org.", 3478, "udp"),
        ("stun:127.0.0.2:65535", "stun", "127.0.0.2", 65535, "udp"),
        ("stun:x-1.example", "stun", "x-1.example", 3478, "udp"),
    ],
)
def test_parse(text: str, scheme: str, host: str, port: int, transport: str) -> None:
    uri = StunUri.parse(text)
    assert (uri.scheme, uri.host, uri.port, uri.transport) == (scheme, host, port, transport)
    assert uri.secure == scheme.endswith("s")
    assert uri.is_turn == scheme.startswith("turn")
    assert uri.address == (host, port)
    assert StunUri.parse(str(uri)) == uri


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stun:example.org", "stun:example.org:3478"),
        ("turn:[::1]?transport=tcp", "turn:[::1]:3478?transport=tcp"),
        ("turn:h?transport=udp", "turn:h:3478"),
        ("turns:h", "turns:h:5349"),
        ("turns:h?transport=udp", "turns:h:5349?transport=udp"),
        ("stun:[fe80::1%25eth0]", "stun:[fe80::1%25eth0]:3478"),
    ],
)
def test_str(text: str, expected: str) -> None:
    assert str(StunUri.parse(text)) == expected


def test_ip_literal_and_netloc() -> None:
    assert StunUri.parse("stun:[::1]:9").netloc == "[::1]:9"
    assert StunUri.parse("stun:[::1]").is_ip_literal
    assert StunUri.parse("stun:10.0.0.1").is_ip_literal
    assert not StunUri.parse("stun:example.org").is_ip_literal


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "expected stun:"),
        ("example.org", "expected stun:"),
        ("http://example.org", "expected stun:"),
        ("stun", "expected stun:"),
        ("stun:", "missing host"),
        ("stun://example.org", "without '//'"),
        ("turn://example.org:3478", "without '//'"),
        ("stun:user@example.org", "user information"),
        ("stun:example.org/path", "no path"),
        ("stun:example.org#frag", "no path or fragment"),
        ("stun:example.org:0", "1-65535"),
        ("stun:example.org:65536", "1-65535"),
        ("stun:example.org:-1", "1-65535"),
        ("stun:example.org:port", "1-65535"),
        ("stun:example.org:3478:1", "brackets"),
        ("stun:::1", "brackets"),
        ("stun:2001:db8::1", "brackets"),
        ("stun:[::1", "unterminated"),
        ("stun:[::1]x", "after the IPv6 literal"),
        ("stun:[not-v6]", "not an IPv6 address"),
        ("stun:[1.2.3.4]", "not an IPv6 address"),
        ("stun:[v1.fe]", "IPvFuture"),
        ("stun:[fe80::1%eth0]", "%25"),
        ("stun:1.2.3.999", "not an IPv4 address"),
        ("stun:1.2.3", "not an IPv4 address"),
        ("stun:-bad.example", "not a valid host name"),
        ("stun:bad-.example", "not a valid host name"),
        ("stun:exa mple.org", "not a valid host name"),
        ("stun:ex%41mple.org", "not a valid host name"),
        ("stun:a..b", "not a valid host name"),
        ("stun:" + "a" * 64 + ".example", "not a valid host name"),
        ("stun:" + ".".join(["abcdefgh"] * 30), "longer than 253"),
        ("stun:example.org?transport=udp", "take no query"),
        ("stuns:example.org?transport=tcp", "take no query"),
        ("turn:example.org?transport=sctp", "unsupported transport 'sctp'"),
        ("turn:example.org?transport=", "empty transport"),
        ("turn:example.org?transport=u/p", "malformed transport"),
        ("turn:example.org?foo=bar", "only query"),
        ("turn:example.org?transport", "only query"),
    ],
)
def test_reject(text: str, problem: str) -> None:
    with pytest.raises(StunUriError) as info:
        StunUri.parse(text)
    assert problem in str(info.value)
    assert info.value.text == text
    # Typed: a ValueError for generic callers and a TsunaguError for ours.
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TsunaguError)


def test_direct_construction_is_checked() -> None:
    uri = StunUri("turn", "example.org", 3478, "tcp")
    assert str(uri) == "turn:example.org:3478?transport=tcp"
    with pytest.raises(StunUriError):
        StunUri("stun", "example.org", 0, "udp")
    with pytest.raises(StunUriError):
        StunUri("stun", "example.org", 3478, "tcp")  # RFC 7064 has no transport choice
    with pytest.raises(StunUriError):
        StunUri("http", "example.org", 80, "tcp")  # type: ignore[arg-type]
    with pytest.raises(StunUriError):
        StunUri("stun", "bad host", 3478, "udp")
    with pytest.raises(dataclasses.FrozenInstanceError):
        uri.port = 1  # type: ignore[misc]


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@given(
    scheme=st.sampled_from(["stun", "stuns", "turn", "turns"]),
    host=st.one_of(
        st.lists(_LABEL, min_size=1, max_size=4)
        .map(".".join)
        .filter(lambda h: not h.replace(".", "").isdigit()),
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(str),
    ),
    port=st.integers(1, 65535),
    transport=st.sampled_from(["udp", "tcp"]),
)
def test_round_trip(scheme: str, host: str, port: int, transport: str) -> None:
    if scheme in ("stun", "stuns"):
        transport = "tcp" if scheme == "stuns" else "udp"
    uri = StunUri(scheme, host, port, transport)  # type: ignore[arg-type]
    assert StunUri.parse(str(uri)) == uri


@given(st.text(max_size=60))
def test_anything_parses_or_raises_the_typed_error(text: str) -> None:
    try:
        uri = StunUri.parse(text)
    except StunUriError:
        return
    assert StunUri.parse(str(uri)) == uri
