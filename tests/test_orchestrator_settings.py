"""The orchestrator's settings: approvals expire after MAS_APPROVAL_TTL_S, and a value it
cannot use stops it with one line naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.secrets import load_identity
from orchestrator.service import Orchestrator
from orchestrator.settings import DEFAULT_APPROVAL_TTL_S, OrchestratorSettings
from tests.conftest import REPO, RunningBroker, eventually
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


@pytest.mark.broker
async def test_the_ready_file_is_kept_fresh_while_connected_and_removed_on_stop(
        fresh_broker: RunningBroker, tmp_path: Path) -> None:
    ready = tmp_path / "orchestrator.ready"
    orch = Orchestrator(fresh_broker.project.policy(),
                        load_identity(fresh_broker.secrets, "orchestrator"), fresh_broker.url,
                        ready_file=ready)
    await orch.start()
    try:
        await eventually(ready.exists, timeout=5, what="the ready file")
        probe = mas(REPO, "agent", "probe", extra_env={"MAS_READY_FILE": str(ready)})
        assert probe.returncode == 0, probe.stderr
    finally:
        await orch.stop()
    assert not ready.exists()
    probe = mas(REPO, "agent", "probe", extra_env={"MAS_READY_FILE": str(ready)})
    assert probe.returncode == 1
    assert "not ready" in probe.stderr
