"""The orchestrator's settings: approvals expire after MAS_APPROVAL_TTL_S, and a value it
cannot use stops it with one line naming the variable."""

from __future__ import annotations

import pytest

from orchestrator.settings import DEFAULT_APPROVAL_TTL_S, OrchestratorSettings
from tests.conftest import REPO
from tests.test_cli import mas, one_line_error


def test_the_approval_lifetime_comes_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert OrchestratorSettings().approval_ttl_s == DEFAULT_APPROVAL_TTL_S
    monkeypatch.setenv("MAS_APPROVAL_TTL_S", "120")
    assert OrchestratorSettings().approval_ttl_s == 120


@pytest.mark.parametrize("value", ["5", "forever", "999999"])
def test_an_unusable_approval_lifetime_is_one_line_naming_the_variable(
        value: str) -> None:
    line = one_line_error(mas(REPO, "orchestrator", "run",
                              extra_env={"MAS_APPROVAL_TTL_S": value}))
    assert "MAS_APPROVAL_TTL_S" in line
