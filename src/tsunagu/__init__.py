"""tsunagu (つなぐ, "to connect"): STUN, TURN, ICE and NAT behaviour for Python.

Protocol cores are sans-I/O state machines (see README, "Design"); the asyncio layer in
:mod:`tsunagu.aio` drives them over real sockets.
"""

__version__ = "0.1.0"
SOFTWARE = f"tsunagu {__version__}"
