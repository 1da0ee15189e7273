"""RTCConfiguration-style ICE servers (tsunagu.ice.servers): split into STUN and TURN
servers, with the W3C checks."""

from __future__ import annotations

import pytest

from tsunagu.errors import LocalProtocolError
from tsunagu.ice.servers import IceServer, IceTransportPolicy, TurnServer, split_ice_servers


def test_stun_and_turn_urls_are_split_in_order_without_repeats() -> None:
    stun, turn = split_ice_servers(
        [
            IceServer("stun:stun.example.org"),
            IceServer(["stun:192.0.2.1:3479", "stun:stun.example.org:3478"]),
            IceServer(
                ["turn:turn.example.org?transport=udp", "turns:turn.example.org"],
                username="alice",
                credential="secret",
            ),
            IceServer("turn:turn.example.org?transport=udp", username="alice", credential="secret"),
        ]
    )
    assert stun == [("stun.example.org", 3478), ("192.0.2.1", 3479)]
    assert turn == [
        TurnServer("turn:turn.example.org?transport=udp", "alice", "secret"),
        TurnServer("turns:turn.example.org", "alice", "secret"),
    ]


@pytest.mark.parametrize(
    ("server", "problem"),
    [
        (IceServer("turn:turn.example.org"), "need a username and credential"),
        (IceServer("turn:turn.example.org", username="alice"), "need a username and credential"),
        (IceServer("stuns:stun.example.org"), "no UDP server-reflexive"),
        (IceServer("http://stun.example.org"), "ICE server URL"),
        (IceServer("stun:stun.example.org?transport=tcp"), "ICE server URL"),
        (IceServer([]), "at least one URL"),
    ],
)
def test_bad_ice_servers_are_refused_with_the_reason(server: IceServer, problem: str) -> None:
    with pytest.raises(LocalProtocolError, match=problem):
        split_ice_servers([server])


def test_transport_policy_values_are_the_w3c_strings() -> None:
    assert [p.value for p in IceTransportPolicy] == ["all", "relay"]
    assert IceTransportPolicy("relay") is IceTransportPolicy.RELAY
