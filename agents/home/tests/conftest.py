"""The broker fixtures of the main suite, for this agent's tests."""

from tests.conftest import broker, connect_as, project  # noqa: F401
