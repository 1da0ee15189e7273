"""STUN (RFC 8489): sans-I/O codec, credentials, transactions and framing."""

from tsunagu.errors import IntegrityError, StunDecodeError
from tsunagu.stun.attributes import *  # noqa: F403 - the attribute classes are the API
from tsunagu.stun.attributes import ATTRIBUTE_CLASSES, Address, Attribute, UnknownAttribute
from tsunagu.stun.constants import AttrType, ErrorCode, MessageClass, Method
from tsunagu.stun.framing import ChannelData, PacketKind, StreamFramer, classify
from tsunagu.stun.message import (
    Message,
    error_response,
    new_transaction_id,
    success_response,
)

__all__ = [
    "ATTRIBUTE_CLASSES",
    "Address",
    "AttrType",
    "Attribute",
    "ChannelData",
    "ErrorCode",
    "IntegrityError",
    "Message",
    "MessageClass",
    "Method",
    "PacketKind",
    "StreamFramer",
    "StunDecodeError",
    "UnknownAttribute",
    "classify",
    "error_response",
    "new_transaction_id",
    "success_response",
]
