"""A TCP model sufficient for STUN and TURN over TCP: three-way handshake, a reliable
in-order byte stream over a lossy, reordering network, orderly close and resets.

What it models (RFC 9293 unless noted): SYN / SYN-ACK / ACK with the MSS option; a SYN to
a port nobody listens on is answered with RST and the connect fails as "refused"; segments
of at most MSS bytes, a fixed window, cumulative ACKs, out-of-order segments buffered by the
receiver, retransmission on a timer that starts at 1 s and doubles (RFC 6298 §2.1, §5.5)
with go-back-N resending, and giving up after a number of retries ("timeout"); FIN in the
sequence space, RST. What it leaves out: congestion control, RTT estimation, fast
retransmit, simultaneous open, half-close (a FIN from the peer closes our side too once our
queued data is out), TIME-WAIT, and 32-bit sequence wraparound.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Literal

from tsunagu.errors import LocalProtocolError
from tsunagu.sim.clock import Timer
from tsunagu.sim.packet import Address, Packet, Proto, TcpFlags, TcpHeader

if TYPE_CHECKING:
    from tsunagu.sim.node import Host

__all__ = ["SimTcpConnection", "SimTcpListener", "TcpConfig", "TcpError", "TcpState"]

TcpError = Literal["refused", "reset", "timeout"]
"""Why a connection ended abnormally: RST in answer to our SYN, RST later, or no answer."""

_DEFAULT_MSS = 536  # RFC 9293 §3.7.1: assumed when the peer sends no MSS option


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """The TCP knobs of a host."""

    initial_rto: float = 1.0
    """Seconds before the first retransmission (RFC 6298 §2.1)."""
    max_rto: float = 60.0
    """Ceiling of the doubling RTO (RFC 6298 §2.5: "at least 60 seconds" may be used)."""
    syn_retries: int = 6
    """Retransmissions of a SYN (or SYN-ACK) before the connect fails with "timeout"; 6 is
    Linux's default: the attempt gives up after 127 s."""
    retries: int = 15
    """Retransmissions of data before the connection fails with "timeout" (Linux's
    tcp_retries2 default)."""
    window: int = 65535
    """Bytes in flight at most (a fixed receive window; no congestion control)."""


class TcpState(Enum):
    SYN_SENT = "syn-sent"
    SYN_RECEIVED = "syn-received"
    ESTABLISHED = "established"
    CLOSED = "closed"


class SimTcpListener:
    """A listening socket. Established connections go to :attr:`on_connection` if set,
    else into :attr:`accepted`."""

    def __init__(self, host: Host, local: Address) -> None:
        self.host = host
        self.local = local
        self.on_connection: Callable[[SimTcpConnection], None] | None = None
        self.accepted: deque[SimTcpConnection] = deque()
        self.closed = False

    def __repr__(self) -> str:
        return f"<SimTcpListener {self.host.name} {self.local[0]}:{self.local[1]}>"

    def established(self, connection: SimTcpConnection) -> None:
        if self.on_connection is not None:
            self.on_connection(connection)
        else:
            self.accepted.append(connection)

    def close(self) -> None:
        """Stop listening; connections already accepted live on."""
        if not self.closed:
            self.closed = True
            self.host._listener_closed(self)


class SimTcpConnection:
    """One end of a TCP connection.

    Callbacks: :attr:`on_connected` (handshake done), :attr:`on_data` (bytes, in order;
    without it they accumulate in :attr:`received`), :attr:`on_closed` (once: None for an
    orderly close by the peer, else a :data:`TcpError`). :meth:`send` may be called before
    the handshake completes; the bytes go out once it has.
    """

    def __init__(
        self,
        host: Host,
        local: Address,
        remote: Address,
        mss: int,
        *,
        listener: SimTcpListener | None = None,
    ) -> None:
        self.host = host
        self.local = local
        self.remote = remote
        self.state = TcpState.CLOSED
        self.error: TcpError | None = None
        self.on_connected: Callable[[], None] | None = None
        self.on_data: Callable[[bytes], None] | None = None
        self.on_closed: Callable[[TcpError | None], None] | None = None
        self.received = bytearray()
        self.mss = mss
        self._config = host.tcp_config
        self._listener = listener
        iss = host.rng.randrange(1 << 31)
        self._iss = iss
        self._snd_una = iss
        self._snd_nxt = iss
        self._buffer = bytearray()  # unacknowledged and unsent data, from _buffer_seq on
        self._buffer_seq = iss + 1
        self._close_requested = False
        self._fin_seq: int | None = None  # our FIN's sequence number once it is sent
        self._fin_acked = False
        self._rcv_nxt = 0
        self._out_of_order: dict[int, bytes] = {}
        self._peer_fin_at: int | None = None
        self._peer_fin = False
        self._rto = self._config.initial_rto
        self._retries = 0
        self._timer: Timer | None = None
        self._notified = False

    def __repr__(self) -> str:
        return (
            f"<SimTcpConnection {self.local[0]}:{self.local[1]} -> "
            f"{self.remote[0]}:{self.remote[1]} {self.state.value}>"
        )

    # -- API ------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self.state is not TcpState.CLOSED

    def send(self, data: bytes) -> None:
        """Queue ``data`` for reliable, in-order delivery."""
        if self.state is TcpState.CLOSED or self._close_requested:
            raise LocalProtocolError("send on a closed TCP connection")
        self._buffer += data
        self._push()

    def close(self) -> None:
        """Orderly close: queued data goes out, then a FIN (after the handshake, if it is
        still under way)."""
        if self.state is TcpState.CLOSED or self._close_requested:
            return
        self._close_requested = True
        self._push()

    def abort(self) -> None:
        """Drop the connection at once, telling the peer with a RST."""
        if self.state is TcpState.CLOSED:
            return
        if self.state is not TcpState.SYN_SENT:
            self._emit(TcpFlags.RST, self._snd_nxt)
        self._finish(None, notify=False)

    # -- opening --------------------------------------------------------------------------

    def open(self) -> None:
        """Active open: send the SYN (called by :meth:`Host.connect_tcp`)."""
        self.state = TcpState.SYN_SENT
        self._snd_nxt = self._iss + 1
        self._emit(TcpFlags.SYN, self._iss, mss=self.mss)
        self._arm()

    def accept(self, syn: TcpHeader) -> None:
        """Passive open on a SYN that reached a listener (called by the host)."""
        self.state = TcpState.SYN_RECEIVED
        self._rcv_nxt = syn.seq + 1
        self.mss = min(self.mss, syn.mss if syn.mss is not None else _DEFAULT_MSS)
        self._snd_nxt = self._iss + 1
        self._emit(TcpFlags.SYN | TcpFlags.ACK, self._iss, mss=self.mss)
        self._arm()

    # -- input ----------------------------------------------------------------------------

    def segment(self, header: TcpHeader, payload: bytes) -> None:
        """A segment of this connection arrived (called by the host)."""
        flags = header.flags
        if TcpFlags.RST in flags:
            self._on_reset(header)
            return
        if self.state is TcpState.SYN_SENT:
            if TcpFlags.SYN in flags and TcpFlags.ACK in flags and header.ack == self._snd_nxt:
                self._rcv_nxt = header.seq + 1
                self._snd_una = header.ack
                self.mss = min(self.mss, header.mss if header.mss is not None else _DEFAULT_MSS)
                self._established()
                self._send_ack()
                if self.on_connected is not None:
                    self.on_connected()
                self._push()
            return
        if TcpFlags.SYN in flags:
            # A retransmitted SYN (our SYN-ACK was lost) or SYN-ACK (our ACK was lost).
            if self.state is TcpState.SYN_RECEIVED and TcpFlags.ACK not in flags:
                self._emit(TcpFlags.SYN | TcpFlags.ACK, self._iss, mss=self.mss)
            elif self.state is TcpState.ESTABLISHED:
                self._send_ack()
            return
        if TcpFlags.ACK not in flags:
            return
        if self.state is TcpState.SYN_RECEIVED:
            if header.ack != self._iss + 1:
                return
            self._snd_una = header.ack
            self._established()
            if self._listener is not None:
                self._listener.established(self)
            if not self.is_open:  # the application closed it at once
                return
        self._on_ack(header.ack)
        self._on_data(header.seq, payload, TcpFlags.FIN in flags)
        if not self.is_open:
            return
        self._push()
        if self._peer_fin and self._fin_acked:
            self._finish(None, notify=True)

    def _on_reset(self, header: TcpHeader) -> None:
        if self.state is TcpState.SYN_SENT:
            # RFC 9293 §3.10.7.3: acceptable only if it acknowledges our SYN.
            if TcpFlags.ACK in header.flags and header.ack == self._snd_nxt:
                self._finish("refused", notify=True)
            return
        if self.state is TcpState.SYN_RECEIVED:
            self._finish(None, notify=False)  # the application never saw it
            return
        # After both FINs, a reset only means our last ACK was lost: the close was orderly.
        self._finish(None if self._peer_fin else "reset", notify=True)

    def _established(self) -> None:
        self.state = TcpState.ESTABLISHED
        self._retries = 0
        self._rto = self._config.initial_rto
        self._cancel_timer()

    def _on_ack(self, ack: int) -> None:
        if ack <= self._snd_una or ack > self._snd_nxt:
            return  # duplicate, old, or acknowledging what we never sent
        fin_seq = self._fin_seq
        data_end = ack if fin_seq is None or ack <= fin_seq else fin_seq
        acked = data_end - self._buffer_seq
        if acked > 0:
            del self._buffer[:acked]
            self._buffer_seq += acked
        if fin_seq is not None and ack > fin_seq:
            self._fin_acked = True
        self._snd_una = ack
        self._retries = 0
        self._rto = self._config.initial_rto
        self._cancel_timer()
        if self._snd_una < self._snd_nxt:
            self._arm()

    def _on_data(self, seq: int, payload: bytes, fin: bool) -> None:
        chunks: list[bytes] = []
        if fin:
            self._peer_fin_at = seq + len(payload)
        if payload:
            end = seq + len(payload)
            if seq > self._rcv_nxt:
                kept = self._out_of_order.get(seq)
                if kept is None or len(kept) < len(payload):
                    self._out_of_order[seq] = payload
            elif end > self._rcv_nxt:
                chunks.append(payload[self._rcv_nxt - seq :])
                self._rcv_nxt = end
                chunks.extend(self._drain())
        peer_closed = False
        if (
            not self._peer_fin
            and self._peer_fin_at is not None
            and self._rcv_nxt == self._peer_fin_at
        ):
            self._rcv_nxt += 1  # the FIN occupies one sequence number
            self._peer_fin = True
            self._close_requested = True  # no half-close: our FIN follows our queued data
            peer_closed = True
        if payload or fin:
            self._send_ack()
        for chunk in chunks:
            if not self.is_open:
                return
            if self.on_data is not None:
                self.on_data(chunk)
            else:
                self.received += chunk
        if peer_closed:
            self._notify(None)

    def _drain(self) -> list[bytes]:
        """Segments that arrived early and now continue the stream."""
        chunks: list[bytes] = []
        pending = self._out_of_order
        while pending:
            seq = min(pending)
            if seq > self._rcv_nxt:
                break
            data = pending.pop(seq)
            end = seq + len(data)
            if end > self._rcv_nxt:
                chunks.append(data[self._rcv_nxt - seq :])
                self._rcv_nxt = end
        return chunks

    # -- output ---------------------------------------------------------------------------

    def _push(self) -> None:
        """Send what the window allows: new data in MSS-sized segments, then our FIN."""
        if self.state is not TcpState.ESTABLISHED:
            return
        window_end = self._snd_una + self._config.window
        while self._fin_seq is None:
            offset = self._snd_nxt - self._buffer_seq
            if offset < len(self._buffer):
                size = min(self.mss, len(self._buffer) - offset, window_end - self._snd_nxt)
                if size <= 0:
                    break
                chunk = bytes(self._buffer[offset : offset + size])
                self._emit(TcpFlags.ACK, self._snd_nxt, chunk)
                self._snd_nxt += size
            elif self._close_requested:
                self._fin_seq = self._snd_nxt
                self._emit(TcpFlags.FIN | TcpFlags.ACK, self._snd_nxt)
                self._snd_nxt += 1
            else:
                break
        if self._snd_una < self._snd_nxt and self._timer is None:
            self._arm()

    def _send_ack(self) -> None:
        self._emit(TcpFlags.ACK, self._snd_nxt)

    def _emit(
        self, flags: TcpFlags, seq: int, payload: bytes = b"", *, mss: int | None = None
    ) -> None:
        ack = self._rcv_nxt if TcpFlags.ACK in flags else 0
        header = TcpHeader(flags, seq, ack, mss)
        self.host.send_packet(Packet(Proto.TCP, self.local, self.remote, payload, header))

    # -- timers ---------------------------------------------------------------------------

    def _arm(self) -> None:
        self._cancel_timer()
        self._timer = self.host.net.clock.call_later(self._rto, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        """Retransmission timeout (RFC 6298 §5.4-5.6): back off and resend."""
        self._timer = None
        self._retries += 1
        opening = self.state in (TcpState.SYN_SENT, TcpState.SYN_RECEIVED)
        limit = self._config.syn_retries if opening else self._config.retries
        if self._retries > limit:
            self._finish("timeout", notify=self.state is not TcpState.SYN_RECEIVED)
            return
        self._rto = min(self._rto * 2, self._config.max_rto)
        if self.state is TcpState.SYN_SENT:
            self._emit(TcpFlags.SYN, self._iss, mss=self.mss)
            self._arm()
        elif self.state is TcpState.SYN_RECEIVED:
            self._emit(TcpFlags.SYN | TcpFlags.ACK, self._iss, mss=self.mss)
            self._arm()
        else:
            # Go back N: resend everything unacknowledged, from the oldest byte on.
            self._snd_nxt = self._snd_una
            if self._fin_seq is not None and not self._fin_acked:
                self._fin_seq = None
            self._push()

    # -- closing --------------------------------------------------------------------------

    def _notify(self, error: TcpError | None) -> None:
        if self._notified:
            return
        self._notified = True
        if self.on_closed is not None:
            self.on_closed(error)

    def _finish(self, error: TcpError | None, *, notify: bool) -> None:
        self.state = TcpState.CLOSED
        if error is not None:
            self.error = error
        self._cancel_timer()
        self.host._tcp_forget(self)
        if notify:
            self._notify(error)
        else:
            self._notified = True
