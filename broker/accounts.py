"""NATS accounts: one per agent, one (PLATFORM) for the orchestrator, control and operator.

An account is a separate subject space with its own JetStream. Agents keep their KV
bucket in their own account under account-level JetStream limits, so no JetStream
request of theirs can reach another identity's streams or subjects, and no agent can
exhaust the storage the platform's revocations and audit log need. Subjects cross
account boundaries only where this module exports and imports them:

- commands ``mas.agent.<a>.>``: service export of the agent, imported by PLATFORM
- events, heartbeats, alerts: stream exports of the agent, imported by PLATFORM and by
  the agents whose policy subscribes to them
- ``mas.orch.*`` requests: service exports of PLATFORM, imported by every agent
- ``mas.revocation.>``: stream export of PLATFORM to every agent; ``mas.audit.>`` only to
  agents with ``read_streams: [audit]``
- the audit stream itself, to those agents: the fetch and ack subjects of their one
  durable consumer on ``MAS_AUDIT`` (service exports of PLATFORM; the fetch subject is
  imported under ``subjects.AUDIT_API``, so it cannot clash with the agent's own
  ``$JS.API``). Deliveries come back through the import's reply mapping, never to a
  PLATFORM subject the agent names; no other JetStream API of PLATFORM is reachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from broker import subjects as subj
from broker.policy import Agent, Policy, event_subjects, jetstream_reservation, size_bytes

PLATFORM = subj.PLATFORM_ACCOUNT
SERVICES = ("orchestrator", "control", "operator")
AGENT_MAX_CONSUMERS = 16
AGENT_MAX_MEMORY = 1024 * 1024
# Per-account caps, so one agent cannot take the connections or memory the platform needs.
AGENT_MAX_CONNECTIONS = 8  # room for replicas (queue groups) and restarts
AGENT_MAX_SUBSCRIPTIONS = 1000
# How long the server keeps the reply mapping of a request an agent sent to the platform
# (default 2 minutes): unanswered requests would otherwise pile up as server memory.
PLATFORM_RESPONSE_THRESHOLD = "10s"
# Discovery ($SRV.<verb>.<agent>): every replica of the agent answers one request.
DISCOVERY_RESPONSE_THRESHOLD = "5s"


@dataclass(frozen=True)
class Export:
    kind: Literal["service", "stream"]
    subject: str
    accounts: tuple[str, ...]
    response_threshold: str | None = None
    response_type: Literal["stream"] | None = None  # several replies per request


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_subscriptions: int


@dataclass(frozen=True)
class Import:
    kind: Literal["service", "stream"]
    account: str
    subject: str
    to: str | None = None  # the local subject, when not the exported one


@dataclass(frozen=True)
class JetStreamLimits:
    max_mem: int
    max_file: int
    max_streams: int | None = None
    max_consumers: int | None = None


@dataclass
class Account:
    name: str
    identities: tuple[str, ...]
    jetstream: JetStreamLimits | None
    limits: ConnectionLimits | None = None
    exports: list[Export] = field(default_factory=list)
    imports: list[Import] = field(default_factory=list)


def agent_publishes(name: str, agent: Agent) -> list[str]:
    """What an agent may publish that others may read (its stream exports)."""
    return [subj.events(name), subj.heartbeat(name), *agent.publish]


def build_accounts(policy: Policy) -> list[Account]:
    agents = sorted(policy.agents)
    js = policy.broker.jetstream
    storing = [a for a in agents if jetstream_reservation(policy.agents[a])]
    # Account limits are reservations: the platform gets what the agents do not reserve.
    platform = Account(PLATFORM, SERVICES, JetStreamLimits(
        max_mem=size_bytes(js.max_memory) - AGENT_MAX_MEMORY * len(storing),
        max_file=size_bytes(js.max_file)
        - sum(jetstream_reservation(policy.agents[a]) for a in storing),
    ))
    accounts = {PLATFORM: platform}
    for name in agents:
        agent = policy.agents[name]
        streams = 1 + int(bool(event_subjects(agent)))  # KV bucket (state, ledger), events
        limits = JetStreamLimits(AGENT_MAX_MEMORY, jetstream_reservation(agent), streams,
                                 AGENT_MAX_CONSUMERS)
        accounts[subj.account(name)] = Account(
            subj.account(name), (name,), limits,
            ConnectionLimits(AGENT_MAX_CONNECTIONS, AGENT_MAX_SUBSCRIPTIONS))

    all_agents = tuple(subj.account(a) for a in agents)
    for service in subj.ORCH_SERVICES:
        platform.exports.append(Export("service", service, all_agents,
                                       response_threshold=PLATFORM_RESPONSE_THRESHOLD))
    platform.exports.append(Export("stream", subj.REVOCATIONS, all_agents))
    readers = tuple(subj.account(a) for a in agents if "audit" in policy.agents[a].read_streams)
    if readers:
        platform.exports.append(Export("stream", subj.AUDIT_FEED, readers))
    for reader in (a for a in agents if "audit" in policy.agents[a].read_streams):
        platform.exports += [
            Export("service", subj.audit_next(reader), (subj.account(reader),),
                   response_threshold=PLATFORM_RESPONSE_THRESHOLD, response_type="stream"),
            Export("service", subj.audit_acks(reader), (subj.account(reader),),
                   response_threshold=PLATFORM_RESPONSE_THRESHOLD),
        ]

    for name in agents:
        agent, acct = policy.agents[name], accounts[subj.account(name)]
        acct.exports.append(Export("service", subj.commands(name), (PLATFORM,)))
        platform.imports.append(Import("service", acct.name, subj.commands(name)))
        for srv in subj.srv_exports(name):
            acct.exports.append(Export("service", srv, (PLATFORM,),
                                       response_threshold=DISCOVERY_RESPONSE_THRESHOLD,
                                       response_type="stream"))
            platform.imports.append(Import("service", acct.name, srv))
        for service in subj.ORCH_SERVICES:
            acct.imports.append(Import("service", PLATFORM, service))
        acct.imports.append(Import("stream", PLATFORM, subj.REVOCATIONS))
        if "audit" in agent.read_streams:
            acct.imports += [
                Import("stream", PLATFORM, subj.AUDIT_FEED),
                Import("service", PLATFORM, subj.audit_next(name),
                       to=subj.audit_next(name, subj.AUDIT_API)),
                Import("service", PLATFORM, subj.audit_acks(name)),
            ]
        for grant in agent_publishes(name, agent):
            readers_of = [PLATFORM] if any(subj.overlaps(grant, s) for s in subj.PLATFORM_FEEDS) \
                else []
            for other in agents:
                if other == name:
                    continue
                for pattern in policy.agents[other].subscribe:
                    shared = subj.intersect(pattern, grant)
                    if shared is not None:
                        accounts[subj.account(other)].imports.append(
                            Import("stream", acct.name, shared))
                        readers_of.append(subj.account(other))
            if readers_of:
                acct.exports.append(Export("stream", grant, tuple(dict.fromkeys(readers_of))))
                if PLATFORM in readers_of:
                    platform.imports.append(Import("stream", acct.name, grant))
    return list(accounts.values())


def account_of(identity: str) -> str:
    return PLATFORM if identity in SERVICES else subj.account(identity)
