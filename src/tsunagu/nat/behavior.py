"""NAT behaviour as RFC 4787 names it: the one definition the whole project shares (the
RFC 5780 discovery client, the simulated NAT boxes, reports and the command line).

RFC 4787 §4.1 (mapping): which outgoing packets share one external address and port.
RFC 4787 §5 (filtering): which incoming packets that external address and port accepts.
The string values are RFC 4787's own terms, hyphenated, so they read well in JSON.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["FilteringBehavior", "MappingBehavior"]


class MappingBehavior(StrEnum):
    """RFC 4787 §4.1: how a NAT reuses an external mapping for an internal address."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    """The same mapping for every destination (REQ-1 of RFC 4787; "cone")."""
    ADDRESS_DEPENDENT = "address-dependent"
    """The same mapping for every port of one destination IP address."""
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    """A new mapping for every destination IP address and port ("symmetric")."""


class FilteringBehavior(StrEnum):
    """RFC 4787 §5: which external endpoints may send in through a mapping."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    """Anyone may ("full cone")."""
    ADDRESS_DEPENDENT = "address-dependent"
    """Only IP addresses the internal endpoint has sent to ("restricted cone")."""
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"
    """Only IP address and port pairs it has sent to ("port-restricted cone")."""
