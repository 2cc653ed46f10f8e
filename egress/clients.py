"""Which agent a connection comes from: its source address.

Each scoped agent shares exactly one network with the proxy, its own ``internal``
network, and Docker's DNS resolves the agent's service name on it. So the proxy resolves
every scoped agent's name, remembers address -> agent, and attributes a connection by its
peer address. Another agent cannot borrow that address: it sits on a different bridge, has
no route to this one, and holds no capabilities (no raw sockets to forge packets; a forged
source would not complete the TCP handshake anyway). The map is refreshed periodically
and when an unknown address connects (rate-limited), because a restarted container may
come back with a new address. An address claimed by two names is attributed to neither.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable

import structlog

from egress.addresses import IPAddress

log = structlog.get_logger("mas.egress")
NameResolver = Callable[[str], Awaitable[set[IPAddress]]]
UNKNOWN_REFRESH_S = 1.0


async def resolve_service(name: str) -> set[IPAddress]:
    """The addresses a container's service name has on the networks we share with it."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos}


class ClientDirectory:
    def __init__(self, agents: Iterable[str], resolve: NameResolver = resolve_service) -> None:
        self.agents = tuple(agents)
        self._resolve = resolve
        self._by_address: dict[IPAddress, str] = {}
        self._last_refresh = 0.0
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            found = await asyncio.gather(*(self._resolve(a) for a in self.agents))
            owners: dict[IPAddress, set[str]] = {}
            for agent, addresses in zip(self.agents, found, strict=True):
                for ip in addresses:
                    owners.setdefault(ip, set()).add(agent)
            by_address = {ip: next(iter(names)) for ip, names in owners.items()
                          if len(names) == 1}
            for ip, names in owners.items():
                if len(names) > 1:
                    log.warning("egress.ambiguous_address", address=str(ip),
                                agents=sorted(names))
            if by_address != self._by_address:
                log.info("egress.clients", clients={str(ip): a for ip, a in by_address.items()})
            self._by_address = by_address
            self._last_refresh = time.monotonic()

    async def agent_for(self, peer: IPAddress) -> str | None:
        agent = self._by_address.get(peer)
        if agent is None and time.monotonic() - self._last_refresh > UNKNOWN_REFRESH_S:
            await self.refresh()
            agent = self._by_address.get(peer)
        return agent

    async def keep_fresh(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.refresh()
            except Exception as exc:  # keep the last map; the next round may succeed
                log.warning("egress.refresh_failed", error=type(exc).__name__)
