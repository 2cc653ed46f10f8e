"""Who may have sent a message on a platform subject, checked again by the receiver.

The broker already stops an agent from publishing outside its grants; this second check
means a broker misconfiguration alone does not let one agent speak as another.
"""

from __future__ import annotations

PLATFORM_SENDERS = {"mas.audit": "orchestrator", "mas.revocation": "orchestrator"}


def sender_allowed(subject: str, sender: str) -> bool:
    parts = subject.split(".")
    if len(parts) >= 3 and parts[0] == "mas" and parts[1] in ("event", "heartbeat"):
        return parts[2] == sender
    owner = PLATFORM_SENDERS.get(".".join(parts[:2]))
    if owner is not None:
        return sender == owner
    return True
