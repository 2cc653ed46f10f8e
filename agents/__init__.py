"""The agent runtime and one directory per agent; an agent's own file is only domain logic.

Depends on ``broker`` and ``security``; never on ``orchestrator``.
"""
