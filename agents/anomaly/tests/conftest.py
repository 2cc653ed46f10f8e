"""The broker fixtures of the main suite, for this agent's tests."""

from tests.conftest import broker, connect_as, connect_fresh, fresh_broker, project  # noqa: F401
