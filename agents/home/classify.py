"""What a service call does to the physical world, by domain, for its explanation.

The policy already makes every ``call_service`` sensitive; the class tells the person
approving (and the audit trail) whether it opens a door or dims a lamp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import JsonValue

from protocol.explain import Explanation

Risk = Literal["security", "access", "automation", "climate", "power", "appliance",
               "lighting", "media", "other"]


@dataclass(frozen=True)
class DomainClass:
    risk: Risk
    effect: str  # what the domain's services act on, for a sentence


DOMAINS: dict[str, DomainClass] = {
    "lock": DomainClass("security", "a lock"),
    "alarm_control_panel": DomainClass("security", "the alarm system"),
    "siren": DomainClass("security", "a siren"),
    "camera": DomainClass("security", "a camera"),
    "cover": DomainClass("access", "a cover (garage door, gate, shutter or blind)"),
    "valve": DomainClass("access", "a valve (water or gas)"),
    "script": DomainClass("automation", "a script, which may do anything listed here"),
    "automation": DomainClass("automation", "an automation, which may do anything listed here"),
    "scene": DomainClass("automation", "a scene, which may change several devices at once"),
    "climate": DomainClass("climate", "heating or cooling"),
    "water_heater": DomainClass("climate", "a water heater"),
    "humidifier": DomainClass("climate", "a humidifier"),
    "fan": DomainClass("climate", "a fan"),
    "switch": DomainClass("power", "a switched power outlet or device"),
    "vacuum": DomainClass("appliance", "a robot vacuum"),
    "lawn_mower": DomainClass("appliance", "a robot lawn mower"),
    "light": DomainClass("lighting", "a light"),
    "media_player": DomainClass("media", "a media player"),
}
HIGH_RISK: dict[Risk, str] = {
    "security": "It affects the security of the home (locks, alarm, sirens, cameras).",
    "access": "It opens or closes a way into the home or a supply line.",
    "automation": "It runs other actions, which may include locks and alarms.",
}
UNKNOWN = DomainClass("other", "a device")


def classify(domain: str) -> DomainClass:
    return DOMAINS.get(domain, UNKNOWN)


def explain_call(domain: str, service: str, entity_ids: list[str],
                 data: dict[str, JsonValue]) -> Explanation:
    """Describe ``domain.service`` on ``entity_ids``; service data keys are named, their
    values are not repeated into the reason."""
    cls = classify(domain)
    targets = ", ".join(entity_ids) if entity_ids else "no entity named (the service decides)"
    reason = f"{domain}.{service} acts on {cls.effect}. Targets: {targets}."
    if cls.risk in HIGH_RISK:
        reason += " " + HIGH_RISK[cls.risk]
    return Explanation(
        summary=f"{domain}.{service} on {targets}"[:200],
        reason=reason,
        data={"domain": domain, "service": service, "risk": cls.risk,
              "high_risk": cls.risk in HIGH_RISK, "entity_id": list(entity_ids),
              "data_keys": sorted(data)},
        confidence=1.0 if cls is not UNKNOWN else 0.5,
    )
