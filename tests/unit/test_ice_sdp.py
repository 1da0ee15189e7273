"""RFC 8839 §5 ICE attributes other than ``candidate``: ufrag/pwd rules, options, lite,
end-of-candidates, and credentials drawn from ``secrets``."""

from __future__ import annotations

import base64

import pytest

from tsunagu.ice.candidate import Candidate
from tsunagu.ice.errors import CandidateError, SdpError
from tsunagu.ice.sdp import (
    ICE_CHARS,
    IceCredentials,
    IceDescription,
    format_ice_options,
    parse_ice_options,
    validate_pwd,
    validate_ufrag,
)

PWD = "asd88fgpdd777uzjYhagZg"  # 22 ice-chars, the RFC 8839 §5.4 minimum


def test_ufrag_length_and_characters() -> None:
    assert validate_ufrag("abcd") == "abcd"
    assert validate_ufrag("a" * 256) == "a" * 256
    assert validate_ufrag("a+/Z") == "a+/Z"
    for bad in ("abc", "a" * 257, "ab-d", "ab d", "abç1", ""):
        with pytest.raises(SdpError, match="ice-ufrag"):
            validate_ufrag(bad)


def test_pwd_length_and_characters_without_echoing_the_password() -> None:
    assert validate_pwd(PWD) == PWD
    assert validate_pwd("p" * 256)
    for bad in (PWD[:-1], "p" * 257, PWD[:-1] + "!"):
        with pytest.raises(SdpError, match="ice-pwd") as info:
            validate_pwd(bad)
        assert bad not in str(info.value)


def test_generated_credentials_are_random_and_valid() -> None:
    drawn = {IceCredentials.generate() for _ in range(50)}
    assert len({c.ufrag for c in drawn}) == 50
    assert len({c.pwd for c in drawn}) == 50
    for credentials in drawn:
        assert len(credentials.ufrag) >= 4 and len(credentials.pwd) >= 22
        # RFC 8445 §5.3: >= 24 bits in the ufrag, >= 128 in the password (6 bits a char).
        assert len(credentials.ufrag) * 6 >= 24 and len(credentials.pwd) * 6 >= 128
        assert set(credentials.ufrag + credentials.pwd) <= set(ICE_CHARS)
        assert credentials.pwd not in repr(credentials)
    with pytest.raises(SdpError):
        IceCredentials("abc", PWD)


def test_ice_options() -> None:
    assert parse_ice_options("trickle ice2") == ("trickle", "ice2")
    assert format_ice_options(["trickle", "ice2"]) == "a=ice-options:trickle ice2"
    for bad in ("", "trickle  ice2", "tr-ickle"):
        with pytest.raises(SdpError):
            parse_ice_options(bad)


SDP = """v=0
o=- 0 0 IN IP4 127.0.0.1
s=-
a=ice-lite
m=application 9 UDP/DTLS/SCTP webrtc-datachannel
a=ice-ufrag:F7gI
a=ice-pwd:x9cml/YzichV2+XlhiMu8g
a=ice-options:trickle ice2
a=candidate:1 1 udp 2130706431 192.0.2.7 50000 typ host
a=candidate:2 1 udp 1694498815 198.51.100.7 61000 typ srflx raddr 192.0.2.7 rport 50000
a=end-of-candidates
"""


def test_description_round_trip() -> None:
    description = IceDescription.from_lines(SDP.splitlines())
    assert description.ufrag == "F7gI"
    assert description.pwd == "x9cml/YzichV2+XlhiMu8g"
    assert description.lite and description.trickle
    assert description.options == ("trickle", "ice2")
    assert [c.foundation for c in description.candidates] == ["1", "2"]
    assert description.end_of_candidates
    assert description.credentials == IceCredentials("F7gI", "x9cml/YzichV2+XlhiMu8g")
    lines = description.to_lines()
    assert lines == [
        "a=ice-lite",
        "a=ice-ufrag:F7gI",
        "a=ice-pwd:x9cml/YzichV2+XlhiMu8g",
        "a=ice-options:trickle ice2",
        "a=candidate:1 1 udp 2130706431 192.0.2.7 50000 typ host",
        "a=candidate:2 1 udp 1694498815 198.51.100.7 61000 typ srflx raddr 192.0.2.7 rport 50000",
        "a=end-of-candidates",
    ]
    assert IceDescription.from_lines(lines) == description


def test_description_errors() -> None:
    with pytest.raises(SdpError, match="twice"):
        IceDescription.from_lines(["a=ice-ufrag:abcd", "a=ice-ufrag:efgh"])
    with pytest.raises(SdpError, match="twice"):
        IceDescription.from_lines([f"a=ice-pwd:{PWD}", f"a=ice-pwd:{PWD}"])
    with pytest.raises(SdpError, match="no value"):
        IceDescription.from_lines(["a=ice-lite:yes"])
    with pytest.raises(SdpError, match="no value"):
        IceDescription.from_lines(["a=end-of-candidates:1"])
    with pytest.raises(CandidateError):
        IceDescription.from_lines(["a=candidate:1 1 udp 1 nowhere 5 typ host"])
    assert IceDescription.from_lines(["a=ice-ufrag:abcd"]).credentials is None


def test_trickled_candidate_lines_parse_alone() -> None:
    candidate = Candidate.from_sdp("a=candidate:1 1 udp 2130706431 192.0.2.7 50000 typ host")
    assert IceDescription(candidates=(candidate,)).to_lines() == [f"a={candidate.to_sdp()}"]


def test_generated_credentials_are_uniform_over_the_ice_chars() -> None:
    # generate() relies on ice-char being exactly the base64 alphabet, in base64's order.
    packed = sum(value << (6 * (63 - value)) for value in range(64))  # sextets 0..63
    every_sextet = packed.to_bytes(48, "big")
    assert base64.b64encode(every_sextet).decode() == ICE_CHARS
    drawn = [IceCredentials.generate() for _ in range(1000)]
    assert all(len(c.ufrag) == 8 and len(c.pwd) == 24 for c in drawn)
    assert len({c.ufrag for c in drawn}) == 1000 and len({c.pwd for c in drawn}) == 1000
    assert set("".join(c.ufrag + c.pwd for c in drawn)) == set(ICE_CHARS)
