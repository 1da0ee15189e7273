"""What the ICE agent unit tests share: draining a sans-I/O agent's outputs."""

from __future__ import annotations

from tsunagu.ice import IceAgent, IceEvent, IceTransportState, Transmit
from tsunagu.ice.sdp import IceCredentials

__all__ = ["PEER_CREDENTIALS", "drain", "events", "state"]

PEER_CREDENTIALS = IceCredentials("peer", "peerpasswordpeerpassword")
"""The credentials of the hand-made peer the tests play."""


def drain(agent: IceAgent) -> list[Transmit]:
    """Every transmit the agent has ready, in order."""
    out: list[Transmit] = []
    while (item := agent.poll_transmit()) is not None:
        out.append(item)
    return out


def events(agent: IceAgent) -> list[IceEvent]:
    """Every event the agent has ready, in order."""
    out: list[IceEvent] = []
    while (event := agent.poll_event()) is not None:
        out.append(event)
    return out


def state(agent: IceAgent) -> IceTransportState:
    """The agent's state, read through a call so that type narrowing does not stick."""
    return agent.state
