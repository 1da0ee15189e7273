"""The real STUN server core (:class:`tsunagu.stun.server.StunServerCore`) on a simulated
host: UDP on every address it serves -- with RFC 5780, the four combinations of its two IPs
and two ports -- and, as RFC 8489 §6.2 requires of a server, TCP on the same addresses."""

from __future__ import annotations

from tsunagu.errors import StunDecodeError
from tsunagu.sim.driver import SimDriver
from tsunagu.sim.node import Host
from tsunagu.sim.packet import Address
from tsunagu.sim.tcp import SimTcpConnection, SimTcpListener
from tsunagu.stun.framing import StreamFramer
from tsunagu.stun.server import StunServerCore
from tsunagu.stun.server_config import StunServerConfig

__all__ = ["SimStunServer"]


class SimStunServer:
    """Serve STUN Binding on ``host`` with ``config`` (ports must be given, not 0, for the
    RFC 5780 addresses). ``tcp=False`` serves UDP only."""

    def __init__(self, host: Host, config: StunServerConfig, *, tcp: bool = True) -> None:
        self.host = host
        self.config = config
        self.core = StunServerCore(config)
        addresses: list[Address] = list(config.listen)
        addresses += [a for a in self.core.rfc5780_addresses if a not in addresses]
        self.addresses = addresses
        self.sockets = [host.bind_udp(port, ip) for ip, port in addresses]
        self.driver = SimDriver(host.net.clock, self.core, self.sockets)
        self.listeners: list[SimTcpListener] = []
        if tcp:
            for ip, port in addresses:
                listener = host.listen_tcp(port, ip)
                listener.on_connection = self._on_connection
                self.listeners.append(listener)

    def _on_connection(self, connection: SimTcpConnection) -> None:
        framer = StreamFramer()

        def on_data(data: bytes) -> None:
            try:
                frames = framer.feed(data)
            except StunDecodeError:
                connection.abort()  # a broken stream cannot be resynchronised
                return
            for frame in frames:
                replies = self.core.handle_datagram(
                    frame, connection.local, connection.remote, self.host.net.clock.now, stream=True
                )
                for reply in replies:
                    if connection.is_open:
                        connection.send(reply.data)

        def on_closed(error: object) -> None:
            connection.close()

        connection.on_data = on_data
        connection.on_closed = on_closed

    def close(self) -> None:
        self.driver.close()
        for socket in self.sockets:
            socket.close()
        for listener in self.listeners:
            listener.close()
