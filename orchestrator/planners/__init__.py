"""Planners: a request in plain language becomes a Plan (see ``orchestrator.plan``).

Three kinds, one ``Planner`` protocol: ``AnthropicPlanner`` (tool use),
``OpenAIPlanner`` (function calling) and ``OfflinePlanner`` (the repository's YAML
workflows; no key, no network). ``make_planner`` picks one from the environment:

=====================  ==============================================================
``MAS_PLANNER``        ``auto`` (default): Anthropic if its key is set, else OpenAI if
                       its key is set, else offline; or ``offline``, ``anthropic``,
                       ``openai`` to insist on one
``ANTHROPIC_API_KEY``  ``ANTHROPIC_BASE_URL``  ``MAS_ANTHROPIC_MODEL``
``OPENAI_API_KEY``     ``OPENAI_BASE_URL``     ``MAS_OPENAI_MODEL``
``MAS_WORKFLOWS_DIR``  default ``<project>/workflows``
=====================  ==============================================================

Without a base URL the SDKs talk to the real providers, which is what a user wants;
tests always pass a loopback one. The LLM modules are imported only when chosen, so
the offline planner does not load either SDK.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.plan import Planner, PlannerUnavailable
from orchestrator.planners.offline import OfflinePlanner
from orchestrator.planners.workflow_files import Workflow, WorkflowError

__all__ = ["OfflinePlanner", "PlannerConfigError", "PlannerSettings", "PlannerUnavailable",
           "Workflow", "WorkflowError", "load_settings", "make_library", "make_planner"]

DEFAULT_ANTHROPIC_MODEL = "claude-sonnet-4-5"
DEFAULT_OPENAI_MODEL = "gpt-4.1"
# The variable that holds each provider's key, named when it is missing.
_KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}


class PlannerConfigError(ValueError):
    """The settings ask for a planner that cannot be built; one line says what to set."""


class PlannerSettings(BaseSettings):
    """From the environment; in code, by the same names: ``PlannerSettings(MAS_PLANNER="offline")``.
    Unknown names are an error rather than silently ignored."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True)

    planner: Literal["auto", "offline", "anthropic", "openai"] = Field(
        default="auto", validation_alias="MAS_PLANNER")
    anthropic_api_key: SecretStr | None = Field(
        default=None, validation_alias="ANTHROPIC_API_KEY")
    anthropic_base_url: str | None = Field(
        default=None, validation_alias="ANTHROPIC_BASE_URL")
    anthropic_model: str = Field(
        default=DEFAULT_ANTHROPIC_MODEL, min_length=1,
        validation_alias="MAS_ANTHROPIC_MODEL")
    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(default=None, validation_alias="OPENAI_BASE_URL")
    openai_model: str = Field(
        default=DEFAULT_OPENAI_MODEL, min_length=1, validation_alias="MAS_OPENAI_MODEL")
    workflows_dir: Path | None = Field(default=None, validation_alias="MAS_WORKFLOWS_DIR")

    @staticmethod
    def _set(key: SecretStr | None) -> str | None:
        value = key.get_secret_value().strip() if key is not None else ""
        return value or None

    @property
    def anthropic_key(self) -> str | None:
        return self._set(self.anthropic_api_key)

    @property
    def openai_key(self) -> str | None:
        return self._set(self.openai_api_key)

    def chosen(self) -> Literal["offline", "anthropic", "openai"]:
        """The planner ``make_planner`` builds (``auto`` resolved)."""
        if self.planner != "auto":
            return self.planner
        if self.anthropic_key:
            return "anthropic"
        if self.openai_key:
            return "openai"
        return "offline"


def load_settings() -> PlannerSettings:
    """``PlannerSettings()`` from the environment, or one ``PlannerConfigError`` line."""
    try:
        return PlannerSettings()
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(map(str, err["loc"])) or "settings"
        raise PlannerConfigError(f"{name}: {err['msg']}") from None


def make_planner(settings: PlannerSettings, project_root: Path) -> Planner:
    """The planner the settings ask for; ``PlannerConfigError`` or ``WorkflowError`` if it
    cannot be built."""
    kind = settings.chosen()
    if kind == "offline":
        return make_library(settings, project_root)
    key = settings.anthropic_key if kind == "anthropic" else settings.openai_key
    if key is None:
        raise PlannerConfigError(f"MAS_PLANNER={kind} needs {_KEY_ENV[kind]}")
    if kind == "anthropic":
        from orchestrator.planners.anthropic_planner import AnthropicPlanner
        return AnthropicPlanner.connect(key, settings.anthropic_base_url,
                                        settings.anthropic_model)
    from orchestrator.planners.openai_planner import OpenAIPlanner
    return OpenAIPlanner.connect(key, settings.openai_base_url, settings.openai_model)


def make_library(settings: PlannerSettings, project_root: Path) -> OfflinePlanner:
    """The repository's workflow files: the offline planner, and the event and schedule
    triggers whichever planner is chosen. ``WorkflowError`` if a file is bad."""
    directory = settings.workflows_dir or Path("workflows")
    return OfflinePlanner(directory if directory.is_absolute() else project_root / directory)
