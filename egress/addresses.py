"""Which resolved addresses the proxy may connect to.

A name that resolves to a private, loopback, link-local, multicast or reserved address is
refused whole (not just that address): otherwise an allowed public name whose DNS an
attacker controls could point the proxy at the Mac's LAN, the Docker networks or a cloud
metadata endpoint. Hosts the policy explicitly opts in as LAN hosts may be private, but
never loopback (the proxy itself), link-local (metadata endpoints), multicast or reserved.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo), else itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip.teredo is not None:
            return ip.teredo[1]
    return ip


def address_problem(ip: IPAddress, *, lan: bool = False) -> str | None:
    """Why the proxy must not connect to ``ip`` (one word), or None if it may."""
    for candidate in dict.fromkeys((_embedded(ip), ip)):  # the carried IPv4 first
        if candidate.is_loopback:
            return "loopback"
        if candidate.is_link_local:
            return "link_local"
        if candidate.is_multicast:
            return "multicast"
        if candidate.is_unspecified:
            return "unspecified"
        if candidate.is_reserved:
            return "reserved"
        if not lan and (candidate.is_private or not candidate.is_global):
            return "private"
    return None


def first_problem(addresses: Iterable[IPAddress], *, lan: bool,
                  allow: frozenset[IPAddress] = frozenset()) -> tuple[IPAddress, str] | None:
    """The first address that disqualifies the whole name, with the reason.
    ``allow``: addresses accepted regardless (only tests pass it, via the proxy's
    constructor; no setting or environment variable reaches it)."""
    for ip in addresses:
        if ip in allow:
            continue
        problem = address_problem(ip, lan=lan)
        if problem is not None:
            return ip, problem
    return None
