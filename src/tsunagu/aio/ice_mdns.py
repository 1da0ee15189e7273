"""mDNS for the host candidates of an :class:`~tsunagu.aio.ice.IceConnection`
(draft-ietf-mmusic-mdns-ice-candidates, as browsers deploy it).

The ICE core only ever sees IP addresses: it refuses a local candidate carrying a name and
drops a remote one that still carries one. This module is the driver's half:

- hiding: each host address gets a fresh random ``<UUID>.local`` name, registered with an
  :class:`~tsunagu.aio.mdns.MdnsService` on the interface holding the address (announced
  and answered there); :meth:`MdnsCandidates.signalled` rewrites a candidate for
  signalling -- the host candidate's address becomes its name, and the related address of
  a reflexive or relayed candidate whose base is a hidden host address becomes the
  unspecified address and port 0, so the address does not leak through ``raddr`` either
  (what Chromium signals);
- resolving: :meth:`MdnsCandidates.resolve` asks every interface's service at once for a
  remote candidate's name and returns the candidate with the first address that comes
  back, or None after the bounded resolve timeout (a few seconds, ``MdnsConfig``).
  Services started before the remote gathers also cache names announced unprompted, which
  is how Chromium's names resolve: it announces when it gathers and answers no query.

Services start on demand, one per interface address (loopback excluded: it carries no
multicast); an interface where multicast cannot be set up is logged and skipped, so mDNS
failing never stops the connection -- an unresolved candidate is dropped and the peer's
checks still reveal it as peer-reflexive (RFC 8445 §7.3.1.3).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
from collections.abc import Sequence

from tsunagu.aio.mdns import MdnsService
from tsunagu.ice.candidate import Candidate, CandidateType
from tsunagu.mdns.responder import MdnsConfig

__all__ = ["MdnsCandidates"]

logger = logging.getLogger(__name__)


class MdnsCandidates:
    """The mDNS names of one connection's host addresses, and resolution of the remote's.

    ``interface_ips``: the host addresses (one service each, started on first use);
    ``config``: the mDNS core's settings (``address_filter`` is where the ICE agent's
    address policy goes)."""

    def __init__(self, interface_ips: Sequence[str], *, config: MdnsConfig | None = None) -> None:
        self._interface_ips = [
            ip for ip in dict.fromkeys(interface_ips) if not ipaddress.ip_address(ip).is_loopback
        ]
        self._config = config if config is not None else MdnsConfig()
        self._services: dict[str, MdnsService] = {}
        self._names: dict[str, str] = {}  # host IP -> its name
        self._starting: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def names(self) -> dict[str, str]:
        """Our registered names, by the host address each one hides."""
        return dict(self._names)

    @property
    def services(self) -> list[MdnsService]:
        """The services running (one per interface address where multicast works)."""
        return list(self._services.values())

    async def start(self) -> None:
        """Open a service on every interface address (idempotent; concurrent callers wait
        for the same start)."""
        if self._closed:
            return
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start_all())
        await asyncio.shield(self._starting)

    async def _start_all(self) -> None:
        for ip in self._interface_ips:
            # One service per address family of an interface: an IPv4 address's service
            # stays IPv4-only, so an interface listed with both families is not joined to
            # ff02::fb twice.
            service = MdnsService(ip, config=self._config, ipv6=":" in ip)
            try:
                await service.start()
            except OSError as exc:
                logger.warning("mdns: no multicast on the interface of %s (%s)", ip, exc)
                continue
            if self._closed:
                await service.close()
                return
            self._services[ip] = service

    async def register(self, ip: str) -> str | None:
        """The ``.local`` name hiding host address ``ip``, announced on its interface; None
        when that interface has no mDNS (the address is then signalled as it is)."""
        if ip in self._names:
            return self._names[ip]
        await self.start()
        service = self._services.get(ip)
        if service is None:
            return None
        name = await service.register(ip)
        self._names[ip] = name
        return name

    def signalled(self, candidate: Candidate) -> Candidate:
        """``candidate`` as it should be signalled: hidden behind our names."""
        if candidate.type is CandidateType.HOST:
            name = self._names.get(candidate.address)
            return candidate if name is None else dataclasses.replace(candidate, address=name)
        if candidate.related_address is not None and candidate.related_address in self._names:
            unspecified = "::" if ":" in candidate.related_address else "0.0.0.0"
            return dataclasses.replace(candidate, related_address=unspecified, related_port=0)
        return candidate

    async def resolve(self, candidate: Candidate) -> Candidate | None:
        """``candidate`` with its ``.local`` name replaced by an address the name resolved
        to, or None when no interface resolved it within the resolve timeout."""
        await self.start()
        services = list(self._services.values())
        if not services:
            return None
        for service in services:  # ours, or announced by the peer already: no query
            ip = service.lookup(candidate.address)
            if ip is not None:
                return dataclasses.replace(candidate, address=ip)
        lookups = [asyncio.ensure_future(s.resolve(candidate.address)) for s in services]
        try:
            for finished in asyncio.as_completed(lookups):
                ip = await finished
                if ip is not None:
                    return dataclasses.replace(candidate, address=ip)
        finally:
            for lookup in lookups:
                lookup.cancel()
        return None

    async def close(self) -> None:
        """Say goodbye for our names and close every service (idempotent)."""
        self._closed = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        services, self._services = list(self._services.values()), {}
        for service in services:
            await service.close()
