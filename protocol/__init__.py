"""The messages identities exchange over the broker, as pydantic models. No I/O here:
the orchestrator, the agent runtime, the CLI and the dashboard all import these so that
both ends of every subject agree on one schema."""
