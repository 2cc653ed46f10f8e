"""Which actions each agent offers, as far as the policy allows.

Agents announce themselves on start; an announcement is accepted only from the agent
it names (the envelope's authenticated sender), and only for actions policy.yaml
grants that agent. Whether an action is sensitive is the policy's word, not the
agent's: an agent that calls a sensitive action harmless is flagged and overruled.
"""

from __future__ import annotations

import structlog

from broker.policy import Policy
from orchestrator.plan import ActionInfo, Catalog
from protocol.registry import Registration, RegistrationAck

log = structlog.get_logger("mas.orchestrator")


class Registry:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.registrations: dict[str, Registration] = {}
        self._actions: dict[tuple[str, str], ActionInfo] = {}

    def register(self, sender: str, announcement: Registration) -> RegistrationAck:
        agent = announcement.agent
        if sender != agent:
            return RegistrationAck(rejected={a.name: f"announced by {sender}, not {agent}"
                                             for a in announcement.actions})
        granted = self.policy.agents.get(agent)
        if granted is None:
            return RegistrationAck(rejected={a.name: f"{agent} is not an agent in policy.yaml"
                                             for a in announcement.actions})
        accepted: list[str] = []
        rejected: dict[str, str] = {}
        for spec in announcement.actions:
            rule = granted.actions.get(spec.name)
            if rule is None:
                rejected[spec.name] = "policy.yaml grants no such action to this agent"
                continue
            if spec.sensitive != rule.sensitive:
                log.warning("registry.sensitivity_overruled", agent=agent, action=spec.name,
                            announced=spec.sensitive, policy=rule.sensitive)
            self._actions[(agent, spec.name)] = ActionInfo(
                agent=agent, action=spec.name,
                description=rule.description or spec.description,
                sensitive=rule.sensitive, input_schema=spec.input_schema)
            accepted.append(spec.name)
        for stale in [k for k in self._actions if k[0] == agent and k[1] not in accepted]:
            del self._actions[stale]
        self.registrations[agent] = announcement
        return RegistrationAck(accepted=accepted, rejected=rejected)

    def catalog(self) -> Catalog:
        return Catalog(list(self._actions.values()))
