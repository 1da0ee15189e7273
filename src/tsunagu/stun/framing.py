"""What shares a socket with STUN: ChannelData (RFC 8656 §12.4), demultiplexing by first
byte (RFC 7983 §7), and cutting a TCP/TLS byte stream into frames (RFC 8489 §6.2.2,
RFC 8656 §12.5).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

from tsunagu.errors import StunDecodeError
from tsunagu.stun.constants import CHANNEL_MAX, CHANNEL_MIN, HEADER_LENGTH

_CHANNEL_HEAD = struct.Struct("!HH")


class PacketKind(Enum):
    STUN = "stun"
    CHANNEL_DATA = "channel-data"
    DTLS = "dtls"
    RTP = "rtp"
    ZRTP = "zrtp"
    OTHER = "other"


def classify(data: bytes) -> PacketKind:
    """RFC 7983 §7 first-byte demultiplexing (extended by RFC 8656 §12 for ChannelData)."""
    if not data:
        return PacketKind.OTHER
    first = data[0]
    if first <= 3:
        return PacketKind.STUN
    if 16 <= first <= 19:
        return PacketKind.ZRTP
    if 20 <= first <= 63:
        return PacketKind.DTLS
    if 64 <= first <= 79:
        return PacketKind.CHANNEL_DATA
    if 128 <= first <= 191:
        return PacketKind.RTP
    return PacketKind.OTHER


@dataclass(frozen=True, slots=True)
class ChannelData:
    """RFC 8656 §12.4: a 4-byte header (channel number, length) and application data."""

    channel: int
    data: bytes

    def encode(self, *, stream: bool = False) -> bytes:
        """Over TCP/TLS the frame is padded to a multiple of 4 (RFC 8656 §12.5); over UDP
        padding is optional and we send none."""
        if not CHANNEL_MIN <= self.channel <= CHANNEL_MAX:
            raise ValueError(f"channel number {self.channel:#x} outside 0x4000-0x4FFF")
        if len(self.data) > 0xFFFF:
            raise ValueError("ChannelData payload longer than 65535 bytes")
        frame = _CHANNEL_HEAD.pack(self.channel, len(self.data)) + self.data
        if stream and len(self.data) & 3:
            frame += b"\x00" * (4 - (len(self.data) & 3))
        return frame

    @classmethod
    def decode(cls, data: bytes) -> ChannelData:
        """Parse one ChannelData message (a datagram, or a frame from :class:`StreamFramer`).

        Trailing padding is allowed; a length larger than what arrived is not.
        """
        if len(data) < 4:
            raise StunDecodeError("ChannelData shorter than its header")
        channel, length = _CHANNEL_HEAD.unpack_from(data)
        if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
            raise StunDecodeError(f"channel number {channel:#x} outside 0x4000-0x4FFF")
        if 4 + length > len(data):
            raise StunDecodeError("ChannelData length runs past the datagram")
        return cls(channel, bytes(data[4 : 4 + length]))


class StreamFramer:
    """Cuts a reliable byte stream into whole STUN messages and ChannelData frames.

    STUN messages carry their own length (RFC 8489 §6.2.2); ChannelData over a stream is
    padded to 4 bytes (RFC 8656 §12.5). Anything else is a framing error: the stream cannot
    be resynchronised, so :meth:`feed` raises :class:`StunDecodeError` and the caller closes
    the connection. The buffer never holds more than one maximal frame.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        offset = 0
        while len(buffer) - offset >= 4:
            first = buffer[offset]
            length = _CHANNEL_HEAD.unpack_from(buffer, offset)[1]
            if first <= 3:
                size = HEADER_LENGTH + length
            elif 64 <= first <= 79:
                size = 4 + length + (-length & 3)
            else:
                raise StunDecodeError(f"unexpected first byte {first:#04x} on stream")
            if len(buffer) - offset < size:
                break
            frames.append(bytes(buffer[offset : offset + size]))
            offset += size
        del buffer[:offset]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buffer)
