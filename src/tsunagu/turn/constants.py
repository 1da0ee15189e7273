"""TURN server numbers defined once (RFC 8656); the STUN ones live in
:mod:`tsunagu.stun.constants`."""

from __future__ import annotations

DEFAULT_ALLOCATION_LIFETIME = 600
"""RFC 8656 §6: an Allocate or Refresh without LIFETIME sets the time-to-expiry to 600 s."""

MAX_ALLOCATION_LIFETIME = 3600
"""RFC 8656 §7.2: a maximum allowed lifetime of no more than 3600 s is RECOMMENDED."""

PERMISSION_LIFETIME = 300
"""RFC 8656 §9: "The Permission Lifetime MUST be 300 seconds (= 5 minutes)"."""

CHANNEL_LIFETIME = 600
"""RFC 8656 §12: a channel binding lasts for 10 minutes unless refreshed."""

RESERVATION_LIFETIME = 30
"""RFC 8656 §7.2: a port reserved by EVEN-PORT's R bit is held for at least 30 s."""

RESERVATION_TOKEN_LENGTH = 8
"""RFC 8656 §18.9: RESERVATION-TOKEN carries an 8-byte token."""

DYNAMIC_PORT_MIN = 49152
DYNAMIC_PORT_MAX = 65535
"""RFC 8656 §7.2: relay ports SHOULD come from the Dynamic and/or Private range."""

RFC5766_CHANNEL_MAX = 0x7FFF
"""RFC 5766 §11 allowed channel numbers 0x4000-0x7FFF; RFC 8656 §12 keeps 0x4000-0x4FFF
(:data:`tsunagu.stun.constants.CHANNEL_MAX`) and reserves the rest. Some deployed clients
(coturn's turnutils_uclient among them) still pick numbers above 0x4FFF."""
