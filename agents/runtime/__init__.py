"""The agent runtime: everything an agent needs from the broker and the security layers,
so that an agent's own module holds only its domain logic."""

from agents.runtime.context import (
    Context,
    Event,
    MemoryState,
    State,
    StateConflict,
    load_model,
    save_model,
    update_model,
)
from agents.runtime.declare import ActionError, Agent, DeclarationError
from protocol.actions import Proposal
from protocol.explain import Explanation

__all__ = [
    "ActionError", "Agent", "Context", "DeclarationError", "Event", "Explanation",
    "MemoryState", "Proposal", "State", "StateConflict", "load_model", "save_model",
    "update_model",
]
