"""The simulated network below the NATs: virtual clock, routing, UDP sockets, the TCP
model, the generic sans-I/O driver and the STUN server running on it."""

from __future__ import annotations

import functools
import random
from collections import deque
from dataclasses import dataclass

import pytest

from tsunagu.errors import LocalProtocolError
from tsunagu.sim import (
    Address,
    Host,
    Network,
    Scheduler,
    SimDriver,
    SimStunServer,
    SimTcpConnection,
    SimulationError,
    TcpConfig,
    TcpError,
    TcpState,
    unpack_transmit,
)
from tsunagu.stun import Message, MessageClass, Method, StreamFramer, XorMappedAddress
from tsunagu.stun.server_config import StunServerConfig

# -- the clock ------------------------------------------------------------------------------


def test_scheduler_orders_by_time_then_insertion() -> None:
    clock = Scheduler()
    order: list[str] = []
    clock.call_at(2.0, lambda: order.append("b"))
    clock.call_at(1.0, lambda: order.append("a"))
    clock.call_at(2.0, lambda: order.append("c"))
    cancelled = clock.call_at(1.5, lambda: order.append("never"))
    cancelled.cancel()
    clock.call_at(1.0, lambda: clock.call_later(0.0, lambda: order.append("a2")))
    assert clock.next_time() == 1.0
    assert clock.run() == 5
    assert order == ["a", "a2", "b", "c"]
    assert clock.now == 2.0
    clock.run(10.0)
    assert clock.now == 10.0
    clock.call_at(3.0, lambda: order.append("late"))  # in the past: runs "now"
    assert clock.step() and clock.now == 10.0 and order[-1] == "late"
    assert not clock.step()


def test_scheduler_guards() -> None:
    clock = Scheduler()

    def spin() -> None:
        clock.call_later(0.0, spin)

    clock.call_later(0.0, spin)
    with pytest.raises(SimulationError):
        clock.run(1.0, max_events=1000)
    with pytest.raises(SimulationError):
        clock.run(-1.0)
    with pytest.raises(SimulationError):
        clock.call_at(float("nan"), spin)
    assert isinstance(SimulationError("x"), LocalProtocolError)


def test_run_until() -> None:
    clock = Scheduler()
    hits: list[float] = []
    for t in (1.0, 2.0, 3.0):
        clock.call_at(t, functools.partial(hits.append, t))
    assert clock.run_until(lambda: len(hits) == 2, timeout=10.0)
    assert clock.now == 2.0
    assert not clock.run_until(lambda: len(hits) == 5, timeout=4.0)
    assert clock.now == 6.0


# -- topology and UDP -----------------------------------------------------------------------


def two_hosts(**lan: float) -> tuple[Network, Host, Host]:
    net = Network(seed=3)
    internet = net.add_lan("internet", latency=0.01, **lan)  # type: ignore[arg-type]
    a = net.add_host("a", internet, ["203.0.113.10", "2001:db8::10"])
    b = net.add_host("b", internet, ["203.0.113.20", "2001:db8::20"])
    return net, a, b


def test_udp_sockets_and_addresses() -> None:
    net, a, b = two_hosts()
    wildcard = b.bind_udp(4000)
    specific = b.bind_udp(4001, "203.0.113.20")
    v6 = b.bind_udp(4000, "::")
    with pytest.raises(SimulationError):
        b.bind_udp(4000, "203.0.113.20")  # the IPv4 wildcard holds port 4000
    with pytest.raises(SimulationError):
        b.bind_udp(4001)
    with pytest.raises(SimulationError):
        b.bind_udp(5000, "198.51.100.1")  # not b's address
    sender = a.bind_udp()
    assert 49152 <= sender.port <= 65535
    sender.sendto(b"1", ("203.0.113.20", 4000))
    sender.sendto(b"2", ("203.0.113.20", 4001))
    sender.sendto(b"3", ("203.0.113.20", 4002))  # nobody listens
    with pytest.raises(SimulationError):
        sender.sendto(b"4", ("2001:db8::20", 4000))  # an IPv4 socket
    a.bind_udp(0, "::").sendto(b"6", ("2001:db8::20", 4000))
    net.run_for(1.0)
    assert [(d.data, d.local) for d in wildcard.received] == [(b"1", ("203.0.113.20", 4000))]
    assert [d.data for d in specific.received] == [b"2"]
    assert [(d.data, d.remote[0]) for d in v6.received] == [(b"6", "2001:db8::10")]
    assert net.drops["port-unreachable"] == 1
    wildcard.close()
    with pytest.raises(SimulationError):
        wildcard.sendto(b"x", ("203.0.113.10", 1))
    assert b.bind_udp(4000).port == 4000  # the port is free again


def test_loopback() -> None:
    net, a, _ = two_hosts()
    first, second = a.bind_udp(1000), a.bind_udp(1001)
    first.sendto(b"self", ("203.0.113.10", 1001))
    net.run_for(0.0)
    assert [(d.data, d.remote, d.time) for d in second.received] == [
        (b"self", ("203.0.113.10", 1000), 0.0)
    ]


def test_private_addresses_are_unreachable_on_the_internet() -> None:
    net, a, _ = two_hosts()
    a.bind_udp().sendto(b"x", ("192.168.1.10", 9))
    net.run_for(1.0)
    assert net.drops["unreachable"] == 1


def test_routers_and_multihoming() -> None:
    net = Network(seed=4)
    internet = net.add_lan("internet", latency=0.02)
    campus = net.add_lan("campus", "10.0.0.0/24", latency=0.002)
    lab = net.add_lan("lab", "10.0.1.0/24", latency=0.001)
    server = net.add_host("server", internet, "203.0.113.1")
    # campus router: no NAT; the lab sits behind a second router on the campus LAN.
    edge = net.add_router("edge", [(internet, "203.0.113.254"), (campus, "10.0.0.1")])
    inner = net.add_router("inner", [(campus, "10.0.0.2"), (lab, "10.0.1.1")], upstream=campus)
    internet.add_route("10.0.0.0/16", "203.0.113.254")  # the edge announces the campus
    edge.add_route("10.0.1.0/24", edge.interfaces[1], "10.0.0.2")
    workstation = net.add_host("ws", lab, "10.0.1.50")
    # A multihomed host: on the lab and on the campus LAN.
    dual = net.add_host("dual", lab, "10.0.1.60")
    dual.add_interface(campus, "10.0.0.60")
    ws_socket, dual_socket, srv = workstation.bind_udp(7), dual.bind_udp(7), server.bind_udp(7)
    ws_socket.sendto(b"from the lab", ("203.0.113.1", 7))
    dual_socket.sendto(b"on-link", ("10.0.0.2", 7))  # routers have no sockets: dropped there
    dual_socket.sendto(b"via lab", ("10.0.1.50", 7))
    net.run_for(1.0)
    (datagram,) = srv.received
    assert datagram.remote == ("10.0.1.50", 7)  # routed, not translated
    assert datagram.time == pytest.approx(0.001 + 0.002 + 0.02)
    srv.sendto(b"back", datagram.remote)
    net.run_for(1.0)
    assert [d.data for d in ws_socket.received] == [b"via lab", b"back"]
    assert net.drops["to-router"] == 1
    assert inner.route("203.0.113.1") is not None


def test_ttl_stops_routing_loops() -> None:
    net = Network(seed=5)
    internet = net.add_lan("internet", latency=0.001)
    a = net.add_host("a", internet, "203.0.113.10")
    r1 = net.add_router("r1", [(internet, "203.0.113.251")])
    r2 = net.add_router("r2", [(internet, "203.0.113.252")])
    internet.add_route("198.18.0.0/15", "203.0.113.251")
    r1.add_route("198.18.0.0/15", r1.interfaces[0], "203.0.113.252")
    r2.add_route("198.18.0.0/15", r2.interfaces[0], "203.0.113.251")
    a.bind_udp().sendto(b"loop", ("198.18.0.1", 9))
    net.run_for(5.0)
    assert net.drops["ttl"] == 1


def test_lan_and_network_validation() -> None:
    net = Network()
    with pytest.raises(SimulationError):
        net.add_lan("bad", loss=1.5)
    with pytest.raises(SimulationError):
        net.add_lan("bad", mtu=40)
    home = net.add_lan("home", "192.168.1.0/24")
    net.add_host("h", home, "192.168.1.2")
    with pytest.raises(SimulationError):
        net.add_host("h", home, "192.168.1.3")  # name taken
    with pytest.raises(SimulationError):
        net.add_host("h2", home, "192.168.1.2")  # address taken
    with pytest.raises(SimulationError):
        net.add_host("h3", home, "10.0.0.1")  # not on this LAN


# -- TCP ------------------------------------------------------------------------------------


def test_tcp_connect_send_and_orderly_close() -> None:
    net, a, b = two_hosts()
    listener = b.listen_tcp(443)
    accepted: list[SimTcpConnection] = []
    server_closed: list[TcpError | None] = []
    listener.on_connection = accepted.append
    client = a.connect_tcp(("203.0.113.20", 443))
    client.send(b"queued before the handshake")
    events: list[str] = []
    client.on_connected = lambda: events.append("connected")
    client.on_closed = lambda error: events.append(f"closed {error}")
    assert client.state.value == "syn-sent"
    net.run_for(1.0)
    assert client.state is TcpState.ESTABLISHED and events == ["connected"]
    (server,) = accepted
    server.on_closed = server_closed.append
    assert bytes(server.received) == b"queued before the handshake"
    assert server.remote == client.local and server.local == ("203.0.113.20", 443)
    server.send(b"x" * 100_000)  # more than the window: paced by ACKs
    net.run_for(5.0)
    assert bytes(client.received) == b"x" * 100_000
    client.close()
    net.run_for(1.0)
    assert server_closed == [None] and events == ["connected", "closed None"]
    assert not client.is_open and not server.is_open
    with pytest.raises(LocalProtocolError):
        client.send(b"late")


def test_tcp_refused_and_reset() -> None:
    net, a, b = two_hosts()
    refused = a.connect_tcp(("203.0.113.20", 9))
    errors: list[TcpError | None] = []
    refused.on_closed = errors.append
    net.run_for(1.0)
    assert errors == ["refused"] and refused.error == "refused"
    assert net.drops["tcp-reset"] == 1

    listener = b.listen_tcp(443)
    client = a.connect_tcp(("203.0.113.20", 443))
    client.on_closed = errors.append
    net.run_for(1.0)
    (server,) = listener.accepted
    server.abort()
    net.run_for(1.0)
    assert errors == ["refused", "reset"] and client.error == "reset"

    # A segment for a connection the peer has forgotten gets a RST too.
    again = a.connect_tcp(("203.0.113.20", 443))
    net.run_for(1.0)
    listener.accepted.pop().abort()
    listener.close()
    net.run_for(1.0)
    assert not again.is_open
    assert a.connect_tcp(("203.0.113.20", 443)).state is TcpState.SYN_SENT
    net.run_for(1.0)
    assert net.drops["tcp-reset"] == 2  # the listener is closed: refused


def test_tcp_timeout_when_nobody_answers() -> None:
    net, a, _ = two_hosts()
    a.tcp_config = TcpConfig(syn_retries=3)
    connection = a.connect_tcp(("203.0.113.99", 443))
    errors: list[TcpError | None] = []
    connection.on_closed = errors.append
    net.run_for(14.0)
    assert errors == []
    net.run_for(1.1)  # 1 + 2 + 4 + 8 s of backoff
    assert errors == ["timeout"]


def test_tcp_stream_intact_over_a_bad_link() -> None:
    """Loss, reordering and a small MTU: the byte stream still arrives whole, in order."""
    net = Network(seed=18)
    internet = net.add_lan("internet", latency=0.03, jitter=0.03, loss=0.2, mtu=576)
    a = net.add_host("a", internet, "203.0.113.10")
    b = net.add_host("b", internet, "203.0.113.20")
    listener = b.listen_tcp(443)
    received = bytearray()
    closed: list[TcpError | None] = []

    def accept(connection: SimTcpConnection) -> None:
        connection.on_data = received.extend
        connection.on_closed = closed.append

    listener.on_connection = accept
    client = a.connect_tcp(("203.0.113.20", 443))
    payload = random.Random(2).randbytes(50_000)
    client.send(payload)
    client.close()
    net.run_for(600.0)
    assert bytes(received) == payload
    assert closed == [None] and not client.is_open
    assert client.mss == 576 - 40  # the MSS option follows the MTU: nothing is too big
    assert net.drops["loss"] > 0 and net.drops["mtu"] == 0


# -- the generic driver ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ping:
    data: bytes
    remote: Address


class PingCore:
    """A toy sans-I/O core: pings ``peer`` every second until it has three answers, and
    answers every ping it gets by returning the reply from ``handle_datagram``."""

    def __init__(self, peer: Address | None) -> None:
        self.peer = peer
        self.next_ping: float | None = 0.0 if peer is not None else None
        self.answers = 0
        self.out: deque[Ping] = deque()
        self.events: deque[str] = deque()

    def handle_datagram(
        self, data: bytes, local: Address, remote: Address, now: float
    ) -> list[tuple[bytes, Address]]:
        if data == b"ping":
            return [(b"pong", remote)]
        self.answers += 1
        self.events.append(f"pong from {remote[0]} at {now:.2f} on {local[0]}")
        if self.answers == 3:
            self.next_ping = None
        return []

    def poll_transmit(self) -> Ping | None:
        return self.out.popleft() if self.out else None

    def poll_event(self) -> str | None:
        return self.events.popleft() if self.events else None

    def poll_timeout(self) -> float | None:
        return self.next_ping

    def handle_timeout(self, now: float) -> None:
        if self.peer is not None and self.next_ping is not None and now >= self.next_ping:
            self.out.append(Ping(b"ping", self.peer))
            self.next_ping = now + 1.0


def test_driver_runs_a_core_with_timers_and_events() -> None:
    net, a, b = two_hosts()
    server = SimDriver(net.clock, PingCore(None), [b.bind_udp(7)])
    core = PingCore(("203.0.113.20", 7))
    seen: list[object] = []
    client = SimDriver(net.clock, core, [a.bind_udp(9)], on_event=seen.append)
    client.flush()  # arms the first timer
    net.run_for(10.0)
    assert seen == [
        "pong from 203.0.113.20 at 0.02 on 203.0.113.10",
        "pong from 203.0.113.20 at 1.02 on 203.0.113.10",
        "pong from 203.0.113.20 at 2.02 on 203.0.113.10",
    ]
    assert net.clock.pending == 0  # the core has no timeout left: nothing armed
    client.close()
    server.close()


def test_driver_picks_the_socket_a_transmit_names() -> None:
    net, a, _ = two_hosts()
    wildcard = a.bind_udp(3478, "0.0.0.0")
    specific = a.bind_udp(3479, "203.0.113.10")
    driver = SimDriver(net.clock, PingCore(None), [wildcard, specific])
    assert driver.socket_for(None) == (wildcard, None)
    assert driver.socket_for(("203.0.113.10", 3479)) == (specific, None)
    assert driver.socket_for(("203.0.113.10", 3478)) == (wildcard, "203.0.113.10")
    with pytest.raises(SimulationError):
        driver.socket_for(("203.0.113.10", 1))
    assert unpack_transmit((b"x", ("1.2.3.4", 5))) == (b"x", None, ("1.2.3.4", 5))
    with pytest.raises(SimulationError):
        unpack_transmit(("not", "a transmit"))


# -- the STUN server on the simulated network -------------------------------------------------


def test_stun_server_over_udp_and_tcp() -> None:
    net, a, b = two_hosts()
    SimStunServer(b, StunServerConfig(listen=(("203.0.113.20", 3478),), software=None))
    ids = random.Random(3)
    request = Message(Method.BINDING, MessageClass.REQUEST, ids.randbytes(12))
    udp = a.bind_udp(5000)
    udp.sendto(request.encode(fingerprint=True), ("203.0.113.20", 3478))
    tcp = a.connect_tcp(("203.0.113.20", 3478), local_port=6000)
    tcp.send(request.encode(fingerprint=True) * 2)  # two requests in one write
    net.run_for(1.0)
    response = Message.decode(udp.received[0].data)
    mapped = response.get(XorMappedAddress)
    assert mapped is not None and mapped.address == ("203.0.113.10", 5000)
    frames = StreamFramer().feed(bytes(tcp.received))
    assert len(frames) == 2
    for frame in frames:
        stream_mapped = Message.decode(frame).get(XorMappedAddress)
        assert stream_mapped is not None and stream_mapped.address == ("203.0.113.10", 6000)
    tcp.send(b"\xff garbage")  # not STUN: the server drops the connection
    net.run_for(1.0)
    assert tcp.error == "reset"
