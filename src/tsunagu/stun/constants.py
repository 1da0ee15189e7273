"""STUN numbers defined once: methods, classes, attribute types, error codes.

Sources: RFC 8489 §18 (IANA), RFC 5780 §7, RFC 8656 §17-18, RFC 6062 §6, RFC 8445 §16.1.
"""

from __future__ import annotations

from enum import IntEnum

MAGIC_COOKIE = 0x2112A442  # RFC 8489 §5
MAGIC_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
HEADER_LENGTH = 20
TRANSACTION_ID_LENGTH = 12  # 96 bits, RFC 8489 §5
LEGACY_TRANSACTION_ID_LENGTH = 16  # RFC 3489 §11.1: 128 bits, no magic cookie
FINGERPRINT_XOR = 0x5354554E  # RFC 8489 §14.7: "STUN"
# RFC 8489 §6: a STUN message over UDP should fit the path MTU; bound what a decoder accepts
# (a TCP framer may see at most a 16-bit length plus the header).
MAX_MESSAGE_LENGTH = 0xFFFF + HEADER_LENGTH

DEFAULT_PORT = 3478  # RFC 8489 §18.6
DEFAULT_TLS_PORT = 5349


class Method(IntEnum):
    BINDING = 0x001  # RFC 8489
    ALLOCATE = 0x003  # RFC 8656
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009
    CONNECT = 0x00A  # RFC 6062
    CONNECTION_BIND = 0x00B
    CONNECTION_ATTEMPT = 0x00C


class MessageClass(IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class AttrType(IntEnum):
    # RFC 8489 comprehension-required (0x0000-0x7FFF)
    MAPPED_ADDRESS = 0x0001
    RESPONSE_ADDRESS = 0x0002  # RFC 3489, kept to recognise old clients
    CHANGE_REQUEST = 0x0003  # RFC 5780
    SOURCE_ADDRESS = 0x0004  # RFC 3489
    CHANGED_ADDRESS = 0x0005  # RFC 3489
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C  # RFC 8656
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    RESERVATION_TOKEN = 0x0022
    PRIORITY = 0x0024  # RFC 8445
    USE_CANDIDATE = 0x0025
    PADDING = 0x0026  # RFC 5780
    RESPONSE_PORT = 0x0027
    CONNECTION_ID = 0x002A  # RFC 6062
    # comprehension-optional (0x8000-0xFFFF)
    ADDITIONAL_ADDRESS_FAMILY = 0x8000  # RFC 8656
    ADDRESS_ERROR_CODE = 0x8001
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    ICMP = 0x8004
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A
    RESPONSE_ORIGIN = 0x802B  # RFC 5780
    OTHER_ADDRESS = 0x802C


def is_comprehension_required(attr_type: int) -> bool:
    """RFC 8489 §14: types 0x0000-0x7FFF must be understood or the request refused (420)."""
    return attr_type < 0x8000


class ErrorCode(IntEnum):
    TRY_ALTERNATE = 300
    BAD_REQUEST = 400
    UNAUTHENTICATED = 401
    FORBIDDEN = 403
    UNKNOWN_ATTRIBUTE = 420
    ALLOCATION_MISMATCH = 437
    STALE_NONCE = 438
    ADDRESS_FAMILY_NOT_SUPPORTED = 440
    WRONG_CREDENTIALS = 441
    UNSUPPORTED_TRANSPORT_PROTOCOL = 442
    PEER_ADDRESS_FAMILY_MISMATCH = 443
    CONNECTION_ALREADY_EXISTS = 446
    CONNECTION_TIMEOUT_OR_FAILURE = 447
    ALLOCATION_QUOTA_REACHED = 486
    ROLE_CONFLICT = 487
    SERVER_ERROR = 500
    INSUFFICIENT_CAPACITY = 508


# Recommended reason phrases (RFC 8489 §14.8, RFC 8656 §18.x, RFC 6062 §6.3, RFC 8445 §16.1).
REASON_PHRASES: dict[int, str] = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthenticated",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    446: "Connection Already Exists",
    447: "Connection Timeout or Failure",
    486: "Allocation Quota Reached",
    487: "Role Conflict",
    500: "Server Error",
    508: "Insufficient Capacity",
}


class AddressFamily(IntEnum):
    """Family octet of the address attributes (RFC 8489 §14.1)."""

    IPV4 = 0x01
    IPV6 = 0x02


# RFC 5780 §7.2 CHANGE-REQUEST flags
CHANGE_IP = 0x04
CHANGE_PORT = 0x02

# RFC 8656 §18.4 REQUESTED-TRANSPORT protocol numbers
TRANSPORT_UDP = 17
TRANSPORT_TCP = 6

# RFC 8656 §12: channel numbers 0x4000-0x4FFF (0x5000-0x7FFF reserved)
CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF
