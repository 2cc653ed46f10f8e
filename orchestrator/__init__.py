"""The orchestrator: token authority, planner, workflow engine, approvals, audit writer.

Depends on ``broker`` and ``security``; nothing depends on it but the ``mas`` command.
"""
