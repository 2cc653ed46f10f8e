"""The orchestrator's own settings, from ``MAS_*`` environment variables.

The planner's settings (which model, which key) are ``planners.PlannerSettings``; these
are the ones about how the orchestrator treats people and time.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_APPROVAL_TTL_S = 15 * 60


class OrchestratorSettingsError(ValueError):
    """A setting has a value the orchestrator cannot use; one line names the variable."""


class OrchestratorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAS_", extra="ignore", frozen=True)

    # How long a sensitive action waits for the operator before it expires (1 min..1 day).
    approval_ttl_s: int = Field(default=DEFAULT_APPROVAL_TTL_S, ge=60, le=86_400)
    # touched every few seconds while connected, for `mas agent probe` (container healthchecks)
    ready_file: Path | None = None


def load_orchestrator_settings() -> OrchestratorSettings:
    try:
        return OrchestratorSettings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "MAS_" + ".".join(map(str, err["loc"])).upper()
        raise OrchestratorSettingsError(f"{name}: {err['msg']}") from None
