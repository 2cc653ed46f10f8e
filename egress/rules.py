"""Which agent may reach which host and port, read from the policy.

A scoped agent's ``egress`` hosts are reachable only by CONNECT on port 443 (TLS end to
end: the proxy never sees the content) and only at public addresses. A LAN host (Home
Assistant on ``homeassistant.local:8123``) must be opted in per agent and per port in the
policy's ``egress_lan`` list; only such a host may be private and only it may be spoken to
in plain HTTP, which the proxy forwards without reading the body.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from broker.policy import Policy, Tier

HTTPS_PORT = 443
_LAN = re.compile(r"^(?P<host>[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?):(?P<port>[0-9]{1,5})$")


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    lan: bool = False


@dataclass(frozen=True)
class Refused:
    reason: str


def normalise_host(host: str) -> str:
    return host.lower().rstrip(".")


def lan_destination(spec: str) -> Destination:
    """``homeassistant.local:8123`` -> a LAN destination; ValueError names the problem."""
    match = _LAN.match(spec.lower())
    port = int(match["port"]) if match else 0
    if match is None or not 0 < port < 65536:
        raise ValueError(f"LAN host {spec!r} must be NAME:PORT, e.g. homeassistant.local:8123")
    return Destination(normalise_host(match["host"]), port, lan=True)


class EgressRules:
    """Per-agent destinations. Lookups are exact names: no wildcards, no suffix matches."""

    def __init__(self, allowed: Mapping[str, Iterable[Destination]]) -> None:
        self._allowed = {agent: frozenset(dests) for agent, dests in allowed.items()}

    @classmethod
    def from_policy(cls, policy: Policy) -> EgressRules:
        allowed: dict[str, list[Destination]] = {}
        for name, agent in policy.agents.items():
            if agent.tier is not Tier.scoped:
                continue
            dests = [Destination(normalise_host(h), HTTPS_PORT) for h in agent.egress]
            # `egress_lan` is the policy's per-agent opt-in for LAN hosts (NAME:PORT).
            dests += [lan_destination(s) for s in getattr(agent, "egress_lan", ())]
            allowed[name] = dests
        return cls(allowed)

    @property
    def agents(self) -> list[str]:
        return sorted(self._allowed)

    def decide(self, agent: str, host: str, port: int, *, tunnel: bool) -> Destination | Refused:
        """The destination ``agent`` may reach, or why not. ``tunnel``: CONNECT (else a
        plain HTTP request the proxy forwards)."""
        host = normalise_host(host)
        mine = [d for d in self._allowed.get(agent, ()) if d.host == host]
        if not mine:
            return Refused("host_not_allowed")
        if not tunnel:
            mine = [d for d in mine if d.lan]
            if not mine:
                return Refused("plain_http_not_allowed")
        for dest in mine:
            if dest.port == port:
                return dest
        return Refused("port_not_allowed")
