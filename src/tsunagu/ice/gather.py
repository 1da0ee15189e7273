"""Server-reflexive gathering (RFC 8445 §5.1.1.2) as a sans-I/O helper of the agent.

A Binding request goes from a base (a host candidate's address) to a STUN server; the
XOR-MAPPED-ADDRESS of the response is the server-reflexive candidate's address. The
requests are RFC 8489 §6.2 transactions of their own (:class:`TransactionManager`), and
the responses arrive on the base like every other packet of the agent, so the agent hands
them here by transaction ID.
"""

from __future__ import annotations

from dataclasses import dataclass

from tsunagu.ice.candidate import Address
from tsunagu.ice.checks import binding_request
from tsunagu.ice.transmit import Transmit
from tsunagu.stun.attributes import MappedAddress, XorMappedAddress
from tsunagu.stun.constants import MessageClass
from tsunagu.stun.message import Message
from tsunagu.stun.transaction import TransactionConfig, TransactionManager

__all__ = ["GatherResult", "ServerReflexiveGatherer"]


@dataclass(frozen=True, slots=True)
class GatherResult:
    """The outcome of one request: ``mapped`` on success, else ``error``."""

    base: Address
    server: Address
    mapped: Address | None
    error: str | None = None


class ServerReflexiveGatherer:
    """Outstanding Binding requests from bases to STUN servers."""

    def __init__(self, config: TransactionConfig) -> None:
        self._transactions = TransactionManager(config)
        self._pending: dict[bytes, tuple[Address, Address]] = {}

    @property
    def active(self) -> bool:
        """Whether a request is still outstanding."""
        return bool(self._pending)

    def owns(self, transaction_id: bytes) -> bool:
        return transaction_id in self._pending

    def start(self, base: Address, server: Address, now: float) -> None:
        data, transaction_id = binding_request()
        self._pending[transaction_id] = (base, server)
        self._transactions.start(transaction_id, data, server, now)

    def handle_response(
        self, message: Message, local: Address, remote: Address, now: float
    ) -> GatherResult | None:
        """A response that arrived on ``local`` from ``remote``; None if it is not ours
        (unknown transaction, or not from the server we asked, on the base we asked from:
        RFC 8489 §6.3 has the client discard it)."""
        entry = self._pending.get(message.transaction_id)
        if entry is None:
            return None
        base, server = entry
        if local != base or remote != server:
            return None
        if not self._transactions.handle_response(message.transaction_id, now):
            return None
        del self._pending[message.transaction_id]
        if message.message_class is MessageClass.ERROR:
            error = message.error
            reason = f"{error.code} {error.reason}" if error is not None else "error response"
            return GatherResult(base, server, None, reason)
        mapped_attr = message.get(XorMappedAddress) or message.get(MappedAddress)
        if mapped_attr is None:
            return GatherResult(base, server, None, "no XOR-MAPPED-ADDRESS in the response")
        return GatherResult(base, server, mapped_attr.address)

    def handle_timeout(self, now: float) -> list[GatherResult]:
        self._transactions.handle_timeout(now)
        failures: list[GatherResult] = []
        while (event := self._transactions.poll_event()) is not None:
            entry = self._pending.pop(event.transaction_id, None)
            if entry is not None:
                failures.append(GatherResult(entry[0], entry[1], None, "no response"))
        return failures

    def cancel_all(self) -> None:
        for transaction_id in self._pending:
            self._transactions.cancel(transaction_id)
        self._pending.clear()

    def poll_transmit(self) -> Transmit | None:
        while (item := self._transactions.poll_transmit()) is not None:
            data, remote = item
            entry = self._pending.get(data[8:20])
            if entry is not None:
                return Transmit(data, entry[0], remote)
        return None

    def poll_timeout(self) -> float | None:
        return self._transactions.poll_timeout()
