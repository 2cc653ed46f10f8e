"""Effective broker permissions of every identity, derived from the policy.

This is the one place that decides who may publish and subscribe to what; the
compiler renders it into nats-server.conf and ``mas policy show`` prints it.
JetStream access is spelled out per stream, never as ``$JS.API.>``. Agents touch
JetStream only inside their own account (``broker/accounts.py``): nats-server does
not check the body or reply subject of an allowed JetStream API request, so in a
shared account any JetStream grant would let an agent make the server publish
content of its choosing on any subject.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from broker import subjects as subj
from broker.policy import Agent, Policy, event_subjects

API = "$JS.API"


@dataclass(frozen=True)
class Permissions:
    identity: str
    role: str
    publish_allow: tuple[str, ...]
    subscribe_allow: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    allow_responses: bool = False
    notes: tuple[str, ...] = field(default=())


def _stream_read(stream: str) -> list[str]:
    """Read a stream through consumers and direct gets; no delete, purge or update."""
    return [
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}.>",
        f"{API}.CONSUMER.INFO.{stream}.*",
        f"{API}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{API}.DIRECT.GET.{stream}",
        f"{API}.DIRECT.GET.{stream}.>",
        f"{API}.STREAM.MSG.GET.{stream}",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _kv_read(bucket: str) -> list[str]:
    return _stream_read(f"KV_{bucket}")


def _kv_write(bucket: str) -> list[str]:
    stream = f"KV_{bucket}"
    return [
        *_kv_read(bucket),
        f"$KV.{bucket}.>",
        f"{API}.STREAM.CREATE.{stream}",
        f"{API}.CONSUMER.DELETE.{stream}.*",
    ]


def _event_feed(agent: str) -> list[str]:
    """The agent's own event stream and its one durable consumer (named after it), in
    its own account: create or update both, pull, acknowledge. Nothing else: no other
    consumer, no delete or purge, no direct gets."""
    stream = subj.event_stream(agent)
    return [
        f"{API}.STREAM.CREATE.{stream}",
        f"{API}.STREAM.UPDATE.{stream}",
        f"{API}.STREAM.INFO.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}.{agent}",
        f"{API}.CONSUMER.INFO.{stream}.{agent}",
        f"{API}.CONSUMER.MSG.NEXT.{stream}.{agent}",
        f"$JS.ACK.{stream}.{agent}.>",
    ]


def _audit_feed(agent: str) -> list[str]:
    """Fetch from and acknowledge the agent's one durable consumer on the audit stream,
    which the orchestrator creates (``broker/accounts.py`` imports exactly these two from
    PLATFORM). No consumer create, update or delete, no stream or direct-get API."""
    return [subj.audit_next(agent, subj.AUDIT_API), subj.audit_acks(agent)]


def _audit_write() -> list[str]:
    s = subj.AUDIT_STREAM
    return [
        subj.AUDIT_SUBJECTS,
        f"{API}.STREAM.CREATE.{s}",
        *_stream_read(s),
    ]


# UPDATE is denied too: shrinking the stream's limits would discard records like a purge.
AUDIT_DENY = (
    f"{API}.STREAM.UPDATE.{subj.AUDIT_STREAM}",
    f"{API}.STREAM.DELETE.{subj.AUDIT_STREAM}",
    f"{API}.STREAM.PURGE.{subj.AUDIT_STREAM}",
    f"{API}.STREAM.MSG.DELETE.{subj.AUDIT_STREAM}",
)


# The operator discovers every service ($SRV.<verb> in its account, $SRV.<verb>.<name>
# of the agents through the imports in broker/accounts.py).
DISCOVER = (*(f"$SRV.{v}" for v in subj.SRV_VERBS), *(f"$SRV.{v}.>" for v in subj.SRV_VERBS))


def agent_permissions(name: str, agent: Agent) -> Permissions:
    publish = [
        subj.events(name),
        subj.heartbeat(name),
        subj.REGISTER,
        subj.TOKEN_REQUEST,
        subj.APPROVAL_REQUEST,
        subj.REVOCATION_SNAPSHOT,
        *agent.publish,
    ]
    subscribe = [subj.commands(name), f"{subj.inbox_prefix(name)}.>", subj.REVOCATIONS,
                 *agent.subscribe, *subj.srv_subjects(name)]
    notes = [f"account {subj.account(name)}", "revocations: signed broadcasts, read-only"]
    publish += _kv_write(subj.kv_bucket(name))
    notes.append(f"KV bucket {subj.kv_bucket(name)} in its own account: read/write"
                 + ("" if agent.state else " (its single-use ledger only)"))
    if event_subjects(agent):
        publish += _event_feed(name)
        notes.append(f"stream {subj.event_stream(name)} of its subscribed events in its own "
                     "account: one durable consumer")
    if "audit" in agent.read_streams:
        publish += _audit_feed(name)
        subscribe.append(subj.AUDIT_FEED)
        notes.append(f"stream {subj.AUDIT_STREAM}: read-only, through its one durable "
                     "consumer (made by the orchestrator); also live")
    return Permissions(
        identity=name,
        role=f"agent ({agent.kind.value}, {agent.tier.value})",
        publish_allow=tuple(dict.fromkeys(publish)),
        subscribe_allow=tuple(dict.fromkeys(subscribe)),
        allow_responses=True,
        notes=tuple(notes),
    )


def service_permissions(name: str) -> Permissions:
    inbox = f"{subj.inbox_prefix(name)}.>"
    if name == "orchestrator":
        buckets = subj.ORCHESTRATOR_BUCKETS
        publish = ["mas.agent.>", "mas.control.>", subj.REVOCATIONS, *_audit_write()]
        for bucket in buckets:
            publish += _kv_write(bucket)
        return Permissions(
            identity=name,
            role="orchestrator",
            publish_allow=tuple(dict.fromkeys(publish)),
            subscribe_allow=("mas.orch.>", "mas.admin.>", *subj.PLATFORM_FEEDS, inbox,
                             *subj.srv_subjects(name)),
            publish_deny=AUDIT_DENY,
            allow_responses=True,
            notes=(f"KV {', '.join(buckets)}: read/write", f"stream {subj.AUDIT_STREAM}: append"),
        )
    if name == "control":
        return Permissions(
            identity=name,
            role="control",
            publish_allow=("mas.event.control.>",),
            subscribe_allow=("mas.control.>", inbox),
            allow_responses=True,
        )
    if name == "operator":
        buckets = subj.ORCHESTRATOR_BUCKETS
        publish = ["mas.admin.>", "mas.control.>", *_stream_read(subj.AUDIT_STREAM),
                   *DISCOVER]
        for bucket in buckets:
            publish += _kv_read(bucket)
        return Permissions(
            identity=name,
            role="operator",
            publish_allow=tuple(dict.fromkeys(publish)),
            subscribe_allow=(*subj.PLATFORM_FEEDS, inbox),
            notes=(f"KV {', '.join(buckets)}: read-only", f"stream {subj.AUDIT_STREAM}: read-only"),
        )
    raise ValueError(f"unknown service {name!r}")


def all_permissions(policy: Policy) -> list[Permissions]:
    services = [service_permissions(n) for n in ("orchestrator", "control", "operator")]
    agents = [agent_permissions(n, policy.agents[n]) for n in sorted(policy.agents)]
    return services + agents
