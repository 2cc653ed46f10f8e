"""NATS subject patterns and the platform's subject conventions.

Patterns follow NATS: tokens split on ``.``, ``*`` matches one token, ``>`` one or
more trailing tokens.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"^[A-Za-z0-9_\-$]+$")

AUDIT_STREAM = "MAS_AUDIT"
AUDIT_SUBJECTS = "mas.audit.>"
APPROVALS_BUCKET = "mas_approvals"
WORKFLOWS_BUCKET = "mas_workflows"
REVOCATIONS_BUCKET = "mas_revocations"
ORCHESTRATOR_BUCKETS = (APPROVALS_BUCKET, WORKFLOWS_BUCKET, REVOCATIONS_BUCKET)
TOKEN_REQUEST = "mas.orch.token.request"  # noqa: S105 (a subject)
APPROVAL_REQUEST = "mas.orch.approval.request"
REGISTER = "mas.orch.register"
REVOCATION_SNAPSHOT = "mas.orch.revocations"
REVOCATIONS = "mas.revocation.>"
AUDIT_FEED = "mas.audit.>"
ORCH_SERVICES = (TOKEN_REQUEST, APPROVAL_REQUEST, REGISTER, REVOCATION_SNAPSHOT)
PLATFORM_ACCOUNT = "PLATFORM"
# What the platform identities read from agents; accounts.py imports exactly this.
PLATFORM_FEEDS = ("mas.event.>", "mas.alert.>", "mas.heartbeat.>")


def account(agent: str) -> str:
    """Every agent lives in a NATS account of its own (see broker/accounts.py)."""
    return f"AGENT_{agent.upper()}"


def revocation(kind: str, target: str) -> str:
    return f"mas.revocation.{kind}.{target}"


def command(agent: str, action: str) -> str:
    return f"mas.agent.{agent}.{action}"


def commands(agent: str) -> str:
    return f"mas.agent.{agent}.>"


def events(agent: str) -> str:
    return f"mas.event.{agent}.>"


def heartbeat(agent: str) -> str:
    return f"mas.heartbeat.{agent}"


def inbox_prefix(identity: str) -> str:
    return f"_INBOX_{identity}"


def kv_bucket(agent: str) -> str:
    return f"agent_{agent}"


# Every agent has its KV bucket: with `state: true` it is also the agent's ctx.state (up to
# its state_limit); in any case it keeps the single-use ledger (used token ids), so a
# restarted agent still refuses a step it already ran.
LEDGER_MAX_BYTES = 16 * 1024**2


# Events an agent subscribes to are kept for it in a stream of its own account, read
# through one durable consumer named after it that its replicas share (see
# agents/runtime/feed.py). Heartbeats stay live only; the audit feed is a stream already.
DURABLE_FEEDS = ("mas.event.>", "mas.alert.>")
EVENT_STREAM_MAX_BYTES = 16 * 1024**2
EVENT_STREAM_MAX_AGE_S = 24 * 3600
EVENT_STREAM_MAX_MSGS = 100_000
EVENT_MAX_DELIVER = 5


# The audit stream reaches each agent granted ``read_streams: [audit]`` through one durable
# pull consumer on MAS_AUDIT named after it, created by the orchestrator (the stream's
# owner) and shared by the agent's replicas (agents/runtime/audit_feed.py). The agent
# gets exactly two service imports from PLATFORM: the fetch subject of that consumer,
# mapped under AUDIT_API so it never meets its own account's $JS.API, and the acks.
AUDIT_API = "$MAS.PLATFORM.JS"
AUDIT_MAX_DELIVER = 5
AUDIT_MAX_ACK_PENDING = 64
AUDIT_MAX_WAITING = 16  # pull requests waiting at once, all replicas together
AUDIT_MAX_BATCH = 64
AUDIT_MAX_EXPIRES_S = 8.0  # under the 10 s life of the import's reply mapping
AUDIT_ACK_WAIT_S = 60.0


def audit_next(agent: str, prefix: str = "$JS.API") -> str:
    """The fetch subject of ``agent``'s audit consumer: in PLATFORM, or as imported."""
    return f"{prefix}.CONSUMER.MSG.NEXT.{AUDIT_STREAM}.{agent}"


def audit_acks(agent: str) -> str:
    return f"$JS.ACK.{AUDIT_STREAM}.{agent}.>"


SRV_VERBS = ("PING", "INFO", "STATS")


def srv_subjects(name: str) -> tuple[str, ...]:
    """Every NATS services API subject the service ``name`` answers on (``nats.micro``):
    the bare verbs, the verbs for its name, and the id-qualified forms; nothing else."""
    return (*(f"$SRV.{v}" for v in SRV_VERBS), *(f"$SRV.{v}.{name}" for v in SRV_VERBS),
            *(f"$SRV.{v}.{name}.*" for v in SRV_VERBS))


def srv_exports(name: str) -> tuple[str, ...]:
    """What the platform imports from an agent's account to discover it: the bare verbs
    too, since nats-server (2.11+, nats-io/nats-server#6704) lets one account import the
    same service subject from several accounts and fans a request out to all of them."""
    return (*(f"$SRV.{v}" for v in SRV_VERBS), f"$SRV.*.{name}", f"$SRV.*.{name}.*")


def event_stream(agent: str) -> str:
    return f"EVENTS_{agent}"


def durable(subject: str) -> bool:
    """True when events on ``subject`` reach a subscriber through its event stream."""
    return any(within(subject, family) for family in DURABLE_FEEDS)


def audited(subject: str) -> bool:
    """True when records on ``subject`` reach a reader through its audit consumer."""
    return within(subject, AUDIT_FEED)


def validate_pattern(subject: str) -> str | None:
    """Return why ``subject`` is not a valid NATS subject pattern, or None if it is."""
    if not subject or len(subject) > 256:
        return "must be 1 to 256 characters"
    tokens = subject.split(".")
    for i, tok in enumerate(tokens):
        if tok == ">":
            if i != len(tokens) - 1:
                return "'>' may only be the last token"
        elif tok != "*" and not _TOKEN.match(tok):
            return f"token {tok!r} has characters NATS subjects do not allow"
    return None


def overlaps(a: str, b: str) -> bool:
    """True if some concrete subject matches both patterns."""
    ta, tb = a.split("."), b.split(".")
    for i in range(max(len(ta), len(tb))):
        x = ta[i] if i < len(ta) else None
        y = tb[i] if i < len(tb) else None
        if x == ">" or y == ">":
            return x is not None and y is not None
        if x is None or y is None:
            return False
        if x != "*" and y != "*" and x != y:
            return False
    return True


def intersect(a: str, b: str) -> str | None:
    """The pattern matching exactly the subjects both ``a`` and ``b`` match, if any."""
    if not overlaps(a, b):
        return None
    ta, tb = a.split("."), b.split(".")
    out: list[str] = []
    for i in range(max(len(ta), len(tb))):
        x = ta[i] if i < len(ta) else None
        y = tb[i] if i < len(tb) else None
        if x == ">":
            return ".".join(out + tb[i:])
        if y == ">":
            return ".".join(out + ta[i:])
        if x is None or y is None:  # unreachable: overlaps() ruled out unequal lengths
            return None
        out.append(y if x == "*" else x)
    return ".".join(out)


def within(inner: str, outer: str) -> bool:
    """True if every subject matched by ``inner`` is also matched by ``outer``."""
    ti, to = inner.split("."), outer.split(".")
    for i, o in enumerate(to):
        if o == ">":
            return len(ti) > i
        if i >= len(ti):
            return False
        if o == "*":
            if ti[i] == ">":
                return False
        elif ti[i] != o:
            return False
    return len(ti) == len(to)
