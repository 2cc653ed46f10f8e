"""The central policy: every identity, what it may do on the broker, and where it lives.

``load_policy`` parses ``policy.yaml`` into these models. Schema errors and
contradictions (an agent reading another agent's commands, a scoped agent without
hosts, a name used twice) raise ``PolicyError`` naming the line.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker import subjects as subj
from broker.errors import PolicyError
from broker.yaml_errors import first_problem
from broker.yaml_lines import LineMap, load_yaml_with_lines

IdentityName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
ActionName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")]
SERVICE_NAMES = ("orchestrator", "control", "operator")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_SIZE = re.compile(r"^[1-9][0-9]*(k|m|g)?b?$", re.IGNORECASE)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Kind(StrEnum):
    stateless = "stateless"
    stateful = "stateful"
    polling = "polling"
    reactive = "reactive"


class Tier(StrEnum):
    isolated = "isolated"
    scoped = "scoped"
    full = "full"


class SensitiveCategory(StrEnum):
    money = "money"
    physical = "physical"
    messaging = "messaging"
    deletion = "deletion"
    other = "other"


def _size(value: str) -> str:
    if not _SIZE.match(value):
        raise ValueError("use a size such as 64m, 512mb or 1g")
    return value.lower()


def size_bytes(value: str) -> int:
    """``64m`` -> 67108864 (sizes are validated by ``_size`` on load)."""
    text = value.lower().rstrip("b")
    mult = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(text[-1:], 1)
    return int(text.rstrip("kmg")) * mult


PLATFORM_MIN_STORE = 256 * 1024**2


class Resources(_Strict):
    memory: Annotated[str, Field(description="container memory limit")] = "128m"
    cpus: Annotated[float, Field(gt=0, le=16)] = 0.5
    pids: Annotated[int, Field(ge=8, le=4096)] = 64

    _check_memory = field_validator("memory")(_size)


class Action(_Strict):
    description: Annotated[str, Field(min_length=1, max_length=300)]
    sensitive: bool = False
    category: SensitiveCategory | None = None


class Agent(_Strict):
    description: Annotated[str, Field(min_length=1, max_length=300)]
    kind: Kind
    tier: Tier
    state: bool = False
    state_limit: str = "64m"
    egress: list[str] = Field(default_factory=list)
    # LAN services the egress proxy may reach for this agent, as NAME:PORT, over plain
    # HTTP or CONNECT: the one exception to "public addresses on port 443 only"
    egress_lan: list[str] = Field(default_factory=list)
    actions: dict[ActionName, Action] = Field(min_length=1)
    publish: list[str] = Field(default_factory=list)
    subscribe: list[str] = Field(default_factory=list)
    read_streams: list[Literal["audit"]] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)

    _check_state_limit = field_validator("state_limit")(_size)


class Service(_Strict):
    description: Annotated[str, Field(min_length=1, max_length=300)]
    resources: Resources = Field(default_factory=Resources)


class Services(_Strict):
    orchestrator: Service
    control: Service
    operator: Service


class JetStream(_Strict):
    store_dir: str = "data/jetstream"
    max_memory: str = "64m"
    max_file: str = "2g"

    _check_sizes = field_validator("max_memory", "max_file")(_size)


class BrokerSettings(_Strict):
    listen: Annotated[str, Field(pattern=r"^[0-9a-zA-Z.\-:\[\]]+:[0-9]{1,5}$")] = "127.0.0.1:4222"
    monitor: Annotated[str, Field(pattern=r"^[0-9a-zA-Z.\-:\[\]]+:[0-9]{1,5}$")] = (
        "127.0.0.1:8222"
    )
    server_names: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1", "nats"])
    max_payload: str = "1m"
    jetstream: JetStream = Field(default_factory=JetStream)

    _check_payload = field_validator("max_payload")(_size)

    @field_validator("monitor")
    @classmethod
    def _monitor_on_loopback(cls, value: str) -> str:
        host = value.rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            raise ValueError("monitoring must bind to loopback (127.0.0.1)")
        return value


class Policy(_Strict):
    version: Literal[1]
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    services: Services
    agents: dict[IdentityName, Agent]

    def identities(self) -> list[str]:
        return [*SERVICE_NAMES, *self.agents]

    def sensitive_actions(self, agent: str) -> list[str]:
        return [n for n, a in self.agents[agent].actions.items() if a.sensitive]


def event_subjects(agent: Agent) -> list[str]:
    """The subscriptions kept for the agent in its own event stream (``EVENTS_<name>``)."""
    return [s for s in agent.subscribe if subj.durable(s)]


def jetstream_reservation(agent: Agent) -> int:
    """Bytes of file storage the agent's account reserves: its KV bucket and its events."""
    reserved = size_bytes(agent.state_limit) if agent.state else subj.LEDGER_MAX_BYTES
    if event_subjects(agent):
        reserved += subj.EVENT_STREAM_MAX_BYTES
    return reserved


PUBLISH_FAMILIES = ("mas.alert.>",)
SUBSCRIBE_FAMILIES = ("mas.event.>", "mas.alert.>", "mas.heartbeat.>")


def _subject_problem(name: str, agent: Agent, direction: str, subject: str,
                     agents: dict[str, Agent]) -> str | None:
    why = subj.validate_pattern(subject)
    if why:
        return f"{subject!r} is not a valid subject: {why}"
    for other in agents:
        if other != name and subj.overlaps(subject, subj.commands(other)):
            verb = "read" if direction == "subscribe" else "send"
            return (f"{subject!r} would let {name} {verb} {other}'s commands "
                    f"(mas.agent.{other}.>); only the orchestrator sends and only {other} reads "
                    "them: remove it")
    allowed: tuple[str, ...]
    if direction == "publish":
        allowed = (subj.events(name), *PUBLISH_FAMILIES)
        for other in agents:
            if other != name and subj.overlaps(subject, subj.events(other)):
                return (f"{subject!r} would let {name} publish as {other} "
                        f"(mas.event.{other}.>): publish under mas.event.{name}. instead")
    else:
        allowed = SUBSCRIBE_FAMILIES
    if not any(subj.within(subject, family) for family in allowed):
        return (f"{subject!r} is outside what an agent may {direction} "
                f"({', '.join(allowed)}); the platform grants commands, inboxes and KV itself")
    return None


Problem = tuple[tuple[str | int, ...], str]


def _check_agent(name: str, agent: Agent, agents: dict[str, Agent]) -> list[Problem]:
    problems: list[Problem] = []
    here: tuple[str | int, ...] = ("agents", name)
    if agent.tier is Tier.scoped and not agent.egress and not agent.egress_lan:
        problems.append(((*here, "tier"), f"agent {name} is in the scoped tier but lists no "
                         "egress hosts: add `egress: [host.example]` or choose tier isolated"))
    for key in ("egress", "egress_lan"):
        if agent.tier is not Tier.scoped and getattr(agent, key):
            problems.append(((*here, key), f"agent {name} lists {key} hosts but its tier is "
                             f"{agent.tier.value}: only the scoped tier uses an allowlist"))
    for i, spec in enumerate(agent.egress_lan):
        host, sep, port = spec.rpartition(":")
        if not sep or not _HOSTNAME.match(host) or not port.isdigit() \
                or not 0 < int(port) < 65536:
            problems.append(((*here, "egress_lan", i), f"LAN host {spec!r} must be NAME:PORT, "
                             "e.g. homeassistant.local:8123"))
    for i, host in enumerate(agent.egress):
        if not _HOSTNAME.match(host):
            problems.append(((*here, "egress", i), f"egress host {host!r} is not a DNS name "
                             "(no addresses, ports or wildcards)"))
    if agent.kind is Kind.stateful and not agent.state:
        problems.append(((*here, "state"), f"agent {name} is stateful but has `state: false`; "
                         "set `state: true` to give it its KV bucket"))
    for action_name, action in agent.actions.items():
        if action.category is not None and not action.sensitive:
            problems.append(((*here, "actions", action_name, "category"),
                             f"action {name}.{action_name} has a sensitive category but "
                             "`sensitive: false`; set `sensitive: true` or drop the category"))
    for direction in ("publish", "subscribe"):
        seen: set[str] = set()
        for i, subject in enumerate(getattr(agent, direction)):
            if subject in seen:
                problems.append(((*here, direction, i), f"{subject!r} is listed twice"))
            seen.add(subject)
            why = _subject_problem(name, agent, direction, subject, agents)
            if why:
                problems.append(((*here, direction, i), why))
    return problems


def _format_validation(exc: ValidationError, lines: LineMap, path: Path) -> PolicyError:
    msg, loc = first_problem(exc, Policy,
                             no_match_hint="see policy.yaml's header for the keys")
    return PolicyError(msg, path=path, line=lines.line_for(loc))


def load_policy(path: Path) -> Policy:
    data, lines = load_yaml_with_lines(path)
    if not isinstance(data, dict):
        raise PolicyError("the policy must be a mapping with version, services and agents",
                          path=path, line=1)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise _format_validation(exc, lines, path) from None
    for name in policy.agents:
        if name in SERVICE_NAMES:
            raise PolicyError(
                f"duplicate identity {name!r}: it is a platform service; rename the agent",
                path=path, line=lines.line_for(("agents", name)))
    reserved = sum(jetstream_reservation(a) for a in policy.agents.values())
    if size_bytes(policy.broker.jetstream.max_file) - reserved < PLATFORM_MIN_STORE:
        raise PolicyError(
            f"agents reserve {reserved // 1024**2} MiB of JetStream storage, leaving the "
            "platform (audit log, approvals, revocations) less than 256 MiB: raise "
            "broker.jetstream.max_file or lower the agents' state_limit",
            path=path, line=lines.line_for(("broker", "jetstream", "max_file")))
    for name, agent in policy.agents.items():
        problems = _check_agent(name, agent, policy.agents)
        if problems:
            loc, msg = problems[0]
            return_more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise PolicyError(msg + return_more, path=path, line=lines.line_for(loc))
    return policy
