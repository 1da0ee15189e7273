"""The default scenario of issue 6 (``tsunagu lab``): two ICE agents behind two NATs.

Each peer is one host with one interface on its own home LAN, behind its own NAT (distinct
public IPs, no port preservation, no hairpinning); a STUN server and, with ``turn``, a TURN
server (the real :class:`~tsunagu.turn.server.TurnServerCore`, relay ports bound through
:class:`SimRelayBinder`) sit on the public side. The real :class:`~tsunagu.ice.IceAgent`
cores run unchanged on the simulated network with :class:`~tsunagu.sim.SimDriver`. Each
agent gathers its host and server-reflexive candidates and, with ``turn``, a relayed one
from a sans-I/O :class:`~tsunagu.turn.client.TurnClientConnection` sharing the host socket
(:class:`LabPeer`); once both have finished, credentials and candidates (with end-of-candidates)
are handed to the other agent in-process at the same virtual instant, so the checks of
both sides start simultaneously (the assumption of :func:`tsunagu.nat.theory.direct_possible`).

Everything runs on virtual time: a failing pair costs well under a second of wall time.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from tsunagu.ice import IceAgent, IceConfig, IceTransportState
from tsunagu.ice.candidate import Address, CandidateType
from tsunagu.ice.events import IceEvent
from tsunagu.ice.transmit import Transmit as IceTransmit
from tsunagu.nat.theory import NAT_TYPES
from tsunagu.sim.clock import SimulationError
from tsunagu.sim.driver import SimDriver
from tsunagu.sim.nat import NatConfig
from tsunagu.sim.network import Network
from tsunagu.sim.node import Host
from tsunagu.sim.stun_server import SimStunServer
from tsunagu.sim.udp import Datagram, SimUdpSocket
from tsunagu.stun.server_config import StunServerConfig
from tsunagu.turn import client_events as turn_events
from tsunagu.turn.client import TurnClientConnection
from tsunagu.turn.config import TurnServerConfig
from tsunagu.turn.entropy import SeededEntropy
from tsunagu.turn.server import TurnServerCore

__all__ = [
    "ICE_TIMEOUT",
    "NAT_SPECS",
    "LabPeer",
    "Outcome",
    "ScenarioResult",
    "SimRelayBinder",
    "run_matrix",
    "run_scenario",
]

Outcome = Literal["direct", "relay", "failed"]

STUN_IP = "203.0.113.1"
STUN = (STUN_IP, 3478)
TURN_IP = "203.0.113.2"
TURN = (TURN_IP, 3478)
TURN_USER, TURN_PASSWORD = "lab", "lab-secret"
GATHER_TIMEOUT = 10.0
ICE_TIMEOUT = 80.0
"""Virtual seconds after the candidate exchange within which both agents are connected or
both have failed. A check transaction gives up 39.5 s after its first send (minimal RTO),
so most failing pairs fail at 39.55 s. The bound is longer because a check that arrives on
a pair which already failed makes it Waiting again and triggers a new check (RFC 8445
§7.3.1.4): when one side receives the other's checks but its own answers and checks never
get through (e.g. EIM/APDF against ADM/EIF), the peer's last retransmission, 31.5 s after
its first, restarts a full 39.5 s transaction there -- 71.07 s in the simulation."""

NAT_SPECS: tuple[str, ...] = tuple(f"{m.value}/{f.value}" for m, f in NAT_TYPES)
"""The nine ``"MAPPING/FILTERING"`` specs, mapping-major (the order of the matrix)."""


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    """How peer A (controlling) behind NAT ``a`` and peer B behind NAT ``b`` connected."""

    a: str
    b: str
    turn: bool
    outcome: Outcome
    time_to_connect: float | None
    """Virtual seconds from the candidate exchange until both agents were connected."""
    selected: tuple[str, str] | None
    """A's selected pair (local, remote candidate), or None when the agents failed."""
    settled_after: float | None = None
    """Virtual seconds from the candidate exchange until both agents were connected or
    both had failed; None if that did not happen within :data:`ICE_TIMEOUT`."""


_GOOD = (IceTransportState.CONNECTED, IceTransportState.COMPLETED)


class SimRelayBinder:
    """:class:`~tsunagu.turn.relay.RelayBinder` on a simulated host: a relay port is a
    simulated UDP socket whose datagrams go to the core's ``handle_peer_datagram``."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.driver: SimDriver | None = None
        self.sockets: dict[Address, SimUdpSocket] = {}

    @property
    def supports_dont_fragment(self) -> bool:
        return False

    def bind(self, address: Address) -> bool:
        driver = self.driver
        if driver is None:
            return False
        try:
            socket = self.host.bind_udp(address[1], address[0])
        except SimulationError:
            return False
        core = driver.core
        assert isinstance(core, TurnServerCore)

        def on_datagram(datagram: Datagram) -> None:
            core.handle_peer_datagram(
                datagram.data, datagram.local, datagram.remote, driver.clock.now
            )
            driver.flush()

        socket.on_datagram = on_datagram
        self.sockets[address] = socket
        driver.sockets.append(socket)
        return True

    def unbind(self, address: Address) -> None:
        socket = self.sockets.pop(address, None)
        if socket is not None:
            socket.close()
            if self.driver is not None and socket in self.driver.sockets:
                self.driver.sockets.remove(socket)

    def bind_tcp(self, address: Address) -> bool:
        return False

    def unbind_tcp(self, address: Address) -> None:
        return None


def _start_turn_server(net: Network, host: Host, seed: int) -> None:
    binder = SimRelayBinder(host)
    config = TurnServerConfig(
        listen=(TURN,),
        relay_ips=(TURN_IP,),
        users=(f"{TURN_USER}:{TURN_PASSWORD}",),
        realm="tsunagu.lab",
        # The peers' public addresses are documentation addresses, denied by default.
        allow_peers=("198.51.100.0/24",),
    )
    core = TurnServerCore(
        config, binder, listening=(TURN,), entropy=SeededEntropy(seed.to_bytes(8, "big"))
    )
    binder.driver = SimDriver(net.clock, core, [host.bind_udp(TURN[1], TURN_IP)])


class LabPeer:
    """One peer's sans-I/O stack on its host socket: an ICE agent plus, optionally, a TURN
    client sharing the socket (datagrams from the TURN server go to the client, the rest
    to the agent). Agent transmits from the relayed address go through the client; data
    the client receives is handed to the agent as arriving on the relayed base."""

    def __init__(self, agent: IceAgent, base: Address, turn: TurnClientConnection | None) -> None:
        self.agent = agent
        self.base = base
        self.turn = turn
        self.relayed: Address | None = None
        self.now = 0.0

    def handle_datagram(self, data: bytes, local: Address, remote: Address, now: float) -> None:
        self.now = now
        if self.turn is not None and remote == TURN:
            self.turn.handle_datagram(data, now)
            self._turn_events(now)
        else:
            self.agent.handle_datagram(data, local, remote, now)

    def handle_timeout(self, now: float) -> None:
        self.now = now
        if self.turn is not None:
            due = self.turn.poll_timeout()
            if due is not None and due <= now:
                self.turn.handle_timeout(now)
                self._turn_events(now)
        due = self.agent.poll_timeout()
        if due is not None and due <= now:
            self.agent.handle_timeout(now)

    def _turn_events(self, now: float) -> None:
        assert self.turn is not None
        while (event := self.turn.poll_event()) is not None:
            if isinstance(event, turn_events.Allocated) and self.relayed is None:
                self.relayed = event.relayed[0]
                self.agent.add_relayed_candidate(
                    self.relayed, server_ip=TURN_IP, mapped=event.mapped
                )
                self.agent.finish_gathering()
            elif isinstance(event, turn_events.AllocationFailed):
                self.agent.finish_gathering()
            elif isinstance(event, turn_events.DataReceived) and self.relayed is not None:
                self.agent.handle_datagram(event.data, self.relayed, event.peer, now)

    def poll_transmit(self) -> IceTransmit | None:
        while (transmit := self.agent.poll_transmit()) is not None:
            if self.turn is not None and transmit.local == self.relayed:
                self.turn.send_to(transmit.data, transmit.remote, self.now)
                continue
            return transmit
        if self.turn is not None:
            out = self.turn.poll_transmit()
            if out is not None:
                return IceTransmit(out.data, self.base, out.remote)
        return None

    def poll_event(self) -> IceEvent | None:
        return self.agent.poll_event()

    def poll_timeout(self) -> float | None:
        deadlines = [self.agent.poll_timeout()]
        if self.turn is not None:
            deadlines.append(self.turn.poll_timeout())
        valid = [d for d in deadlines if d is not None and not math.isinf(d)]
        return min(valid) if valid else None


def run_scenario(a: str, b: str, *, turn: bool, seed: int = 0) -> ScenarioResult:
    """Run the default scenario with peer A behind NAT ``a`` and B behind ``b`` (each
    ``"MAPPING/FILTERING"``, as :meth:`NatConfig.from_spec` takes them); ``turn`` adds a
    TURN server and a relayed candidate on each side."""
    configs = [
        NatConfig.from_spec(spec, port_preservation=False, hairpinning=False) for spec in (a, b)
    ]
    net = Network(seed=seed)
    rng = random.Random(seed)
    internet = net.add_lan("internet", latency=0.02, jitter=0.002)
    SimStunServer(
        net.add_host("stun", internet, STUN_IP),
        StunServerConfig(listen=(STUN,), software=None),
        tcp=False,
    )
    if turn:
        _start_turn_server(net, net.add_host("turn", internet, TURN_IP), seed)
    agents: list[IceAgent] = []
    drivers: list[SimDriver] = []
    for index, (name, config) in enumerate(zip(("a", "b"), configs, strict=True), 1):
        lan = net.add_lan(f"{name}-lan", f"192.168.{index}.0/24", latency=0.001)
        net.add_nat(
            f"{name}-nat",
            inside=lan,
            inside_ip=f"192.168.{index}.1",
            outside=internet,
            public_ips=f"198.51.100.{index}",
            config=config,
        )
        host = net.add_host(name, lan, f"192.168.{index}.10")
        socket = host.bind_udp(5000, host.addresses[0])
        agent = IceAgent(IceConfig(), controlling=index == 1)
        client = (
            TurnClientConnection(TURN, TURN_USER, TURN_PASSWORD, token_bytes=rng.randbytes)
            if turn
            else None
        )
        peer = LabPeer(agent, socket.local, client)
        driver = SimDriver(net.clock, peer, [socket], on_event=lambda _event: None)
        agent.add_host_candidate(socket.local)
        agent.gather_server_reflexive(socket.local, STUN, net.now)
        if client is not None:
            client.allocate(net.now)
        else:
            agent.finish_gathering()
        driver.flush()
        agents.append(agent)
        drivers.append(driver)

    net.run_until(lambda: all(agent.gathering_complete for agent in agents), timeout=GATHER_TIMEOUT)
    # The exchange: credentials, every candidate and end-of-candidates, both ways at once.
    for me, other in ((agents[0], agents[1]), (agents[1], agents[0])):
        credentials = other.local_credentials
        me.set_remote_credentials(credentials.ufrag, credentials.pwd)
        for candidate in other.local_candidates:
            me.add_remote_candidate(candidate)
        me.add_remote_candidate(None)
    for driver in drivers:
        driver.flush()
    started = net.now

    def connected() -> bool:
        return all(agent.state in _GOOD for agent in agents)

    def failed() -> bool:
        return all(agent.state is IceTransportState.FAILED for agent in agents)

    settled = net.run_until(lambda: connected() or failed(), timeout=ICE_TIMEOUT)
    elapsed = round(net.now - started, 6)
    settled_after = elapsed if settled else None
    pair = agents[0].selected_pair()
    for driver in drivers:
        driver.close()
    if not connected() or pair is None:
        return ScenarioResult(a, b, turn, "failed", None, None, settled_after)
    relayed = CandidateType.RELAYED in (pair.local.type, pair.remote.type)
    return ScenarioResult(
        a,
        b,
        turn,
        "relay" if relayed else "direct",
        elapsed,
        (str(pair.local), str(pair.remote)),
        settled_after,
    )


def run_matrix(turn: bool, *, seed: int = 0) -> list[ScenarioResult]:
    """All 81 ordered pairs of NAT types, A-major in :data:`NAT_SPECS` order."""
    return [run_scenario(a, b, turn=turn, seed=seed) for a in NAT_SPECS for b in NAT_SPECS]
