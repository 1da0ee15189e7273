"""A deterministic simulated network on which tsunagu's sans-I/O cores run unchanged.

Virtual time (:class:`Scheduler`), hosts with IPv4/IPv6 interfaces, LANs and links with
latency, jitter, loss and MTU, routers, UDP-blocking networks, UDP sockets and a TCP model,
and NAT boxes with every RFC 4787 behaviour. No wall clock is read anywhere and all
randomness comes from one injected :class:`random.Random`: the same seed replays the same
run. Example::

    net = Network(seed=1)
    internet = net.add_lan("internet", latency=0.02)
    home = net.add_lan("home", "192.168.1.0/24", latency=0.001)
    server = net.add_host("server", internet, "203.0.113.1")
    net.add_nat("nat", inside=home, inside_ip="192.168.1.1", outside=internet,
                public_ips="198.51.100.1",
                config=NatConfig.from_spec("endpoint-independent/address-dependent"))
    alice = net.add_host("alice", home, "192.168.1.10")
    sock = alice.bind_udp()
    sock.sendto(b"hi", ("203.0.113.1", 9))
    net.run_for(1.0)
"""

from tsunagu.sim.clock import Scheduler, SimulationError, Timer
from tsunagu.sim.driver import DatagramCore, SimDriver, unpack_transmit
from tsunagu.sim.nat import Mapping, Nat, NatConfig
from tsunagu.sim.network import ANYWHERE, Lan, Network, TraceEntry
from tsunagu.sim.node import Host, Interface, Node, Route, Router
from tsunagu.sim.packet import Address, Packet, Proto, TcpFlags, TcpHeader
from tsunagu.sim.stun_server import SimStunServer
from tsunagu.sim.tcp import SimTcpConnection, SimTcpListener, TcpConfig, TcpError, TcpState
from tsunagu.sim.udp import Datagram, SimUdpSocket

__all__ = [
    "ANYWHERE",
    "Address",
    "Datagram",
    "DatagramCore",
    "Host",
    "Interface",
    "Lan",
    "Mapping",
    "Nat",
    "NatConfig",
    "Network",
    "Node",
    "Packet",
    "Proto",
    "Route",
    "Router",
    "Scheduler",
    "SimDriver",
    "SimStunServer",
    "SimTcpConnection",
    "SimTcpListener",
    "SimUdpSocket",
    "SimulationError",
    "TcpConfig",
    "TcpError",
    "TcpFlags",
    "TcpHeader",
    "TcpState",
    "Timer",
    "TraceEntry",
    "unpack_transmit",
]
