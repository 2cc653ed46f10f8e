"""The real `mas` console script, run as a subprocess in a throwaway project folder."""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

_SCRIPT = Path(sys.executable).parent / "mas"
MAS = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "mas"]
AGGREGATOR_SUBSCRIBE = (
    "subscribe: [mas.event.health.>, mas.event.home.>, mas.event.backup.>, mas.alert.>]")
# Services first, then agents by name (the order of `mas policy show`).
IDENTITIES = ["orchestrator", "control", "operator", "aggregator", "anomaly", "backup", "health",
              "home", "notify"]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("MAS_ROOT", "COLUMNS", "LINES")}
    out["PYTHONUNBUFFERED"] = "1"
    return out


def mas(cwd: Path, *args: str, timeout: float = 30,
        extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MAS, *args], cwd=cwd, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout, check=False)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """Assert the error contract (exit 1, one `mas: ` line, no traceback); return the line."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mas: "), lines[0]
    return lines[0]


def table_rows(text: str) -> dict[str, list[str]]:
    """Rows of a rich table by identity, each cell's folded lines joined without spaces."""
    rows: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("│"):
            current = None
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        if current is None:
            current = [""] * len(cells)
            rows[cells[0]] = current
        for i, cell in enumerate(cells):
            current[i] += cell.replace(" ", "")
    return rows


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A project folder holding only a copy of the repository's policy.yaml."""
    shutil.copy(REPO / "policy.yaml", tmp_path / "policy.yaml")
    return tmp_path


@pytest.fixture(scope="module")
def ready_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ready")
    shutil.copy(REPO / "policy.yaml", root / "policy.yaml")
    assert mas(root, "init").returncode == 0
    assert mas(root, "policy", "compile").returncode == 0
    return root


@pytest.fixture
def ready(ready_template: Path, tmp_path: Path) -> Path:
    """A folder after `mas init` and `mas policy compile` (a private copy of one made once)."""
    root = tmp_path / "ready"
    shutil.copytree(ready_template, root)
    assert stat.S_IMODE((root / "secrets" / "health" / "nkey.seed").stat().st_mode) == 0o600
    return root


# --- help and usage errors ------------------------------------------------------------------


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = mas(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    commands = re.findall(r"^\W*(\w+)\s{2,}\S", result.stdout, flags=re.MULTILINE)
    assert {"init", "policy", "up"} <= set(commands), result.stdout


def test_policy_help_lists_subcommands(tmp_path: Path) -> None:
    result = mas(tmp_path, "policy", "--help")
    assert result.returncode == 0
    assert "compile" in result.stdout
    assert "show" in result.stdout


@pytest.mark.parametrize(
    "args",
    [("nosuch",), ("init", "--bogus"), ("policy", "frobnicate"), ("up", "--timeout", "soon")],
)
def test_usage_errors_exit_2_with_usage(folder: Path, args: tuple[str, ...]) -> None:
    result = mas(folder, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Usage: mas" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (folder / "secrets").exists()


# --- compile and drift ----------------------------------------------------------------------


def test_check_before_compile_is_one_line(folder: Path) -> None:
    assert mas(folder, "init").returncode == 0
    line = one_line_error(mas(folder, "policy", "compile", "--check"))
    assert "nats-server.conf" in line
    assert "does not exist" in line


def test_compile_check_cycle(folder: Path) -> None:
    missing = mas(folder, "policy", "compile", "--check")
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr

    compiled = mas(folder, "policy", "compile")
    assert compiled.returncode == 0, compiled.stderr
    assert "written" in compiled.stdout
    assert "9 identities" in compiled.stdout
    config = (folder / "nats-server.conf").read_text()
    assert config == (REPO / "nats-server.conf").read_text()

    current = mas(folder, "policy", "compile", "--check")
    assert current.returncode == 0, current.stderr
    assert "current" in current.stdout

    again = mas(folder, "policy", "compile")
    assert again.returncode == 0
    assert "unchanged" in again.stdout

    policy = folder / "policy.yaml"
    text = policy.read_text()
    assert text.count(AGGREGATOR_SUBSCRIBE) == 1
    policy.write_text(text.replace(AGGREGATOR_SUBSCRIBE,
                                   AGGREGATOR_SUBSCRIBE[:-1] + ", mas.heartbeat.notify]"))
    stale = mas(folder, "policy", "compile", "--check")
    assert stale.returncode == 1
    assert "Traceback" not in stale.stderr
    assert stale.stderr.startswith("mas: nats-server.conf is stale")
    added = [ln[1:].strip() for ln in stale.stderr.splitlines() if ln.startswith("+")]
    assert '"mas.heartbeat.notify"' in added
    assert (folder / "nats-server.conf").read_text() == config  # --check writes nothing

    fixed = mas(folder, "policy", "compile")
    assert fixed.returncode == 0
    assert "written" in fixed.stdout
    assert mas(folder, "policy", "compile", "--check").returncode == 0
    assert '"mas.heartbeat.notify"' in (folder / "nats-server.conf").read_text()


def test_root_option_and_env_find_the_project(folder: Path, tmp_path_factory:
                                              pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    result = mas(elsewhere, "policy", "compile", "--root", str(folder))
    assert result.returncode == 0, result.stderr
    assert (folder / "nats-server.conf").is_file()
    assert not (elsewhere / "nats-server.conf").exists()
    via_env = mas(elsewhere, "policy", "compile", "--check", extra_env={"MAS_ROOT": str(folder)})
    assert via_env.returncode == 0, via_env.stderr
    sub = folder / "sub" / "dir"
    sub.mkdir(parents=True)
    assert mas(sub, "policy", "compile", "--check").returncode == 0


# --- bad input: one line, no traceback ------------------------------------------------------


def test_broken_policy_is_one_line_with_its_line_number(folder: Path) -> None:
    policy = folder / "policy.yaml"
    lines = policy.read_text().splitlines()
    number = next(i for i, ln in enumerate(lines, 1) if ln.strip() == "tier: full")
    lines[number - 1] = lines[number - 1].replace("tier: full", "tier: full\n    colour: blue")
    policy.write_text("\n".join(lines) + "\n")
    for args in (("policy", "compile"), ("init",), ("up",)):
        line = one_line_error(mas(folder, *args))
        assert f"policy.yaml:{number + 1}:" in line, line
        assert "colour" in line
        assert "unknown key" in line
    assert not (folder / "secrets").exists()
    assert not (folder / "nats-server.conf").exists()


def test_invalid_yaml_is_one_line(folder: Path) -> None:
    (folder / "policy.yaml").write_text("version: 1\nagents: [\n")
    line = one_line_error(mas(folder, "policy", "compile"))
    assert "policy.yaml:3:" in line
    assert "not valid YAML" in line


@pytest.mark.parametrize("command", [("init",), ("up",)])
def test_nonexistent_root_is_one_line(tmp_path: Path, command: tuple[str, ...]) -> None:
    line = one_line_error(mas(tmp_path, *command, "--root", "/nonexistent"))
    assert "no policy.yaml in /nonexistent" in line


def test_no_policy_here_or_above(tmp_path: Path) -> None:
    line = one_line_error(mas(tmp_path, "policy", "show"))
    assert "no policy.yaml here or above" in line


def test_show_unknown_identity_is_one_line(folder: Path) -> None:
    line = one_line_error(mas(folder, "policy", "show", "nosuch"))
    assert "no identity 'nosuch'" in line
    assert "orchestrator" in line  # lists the known ones


@pytest.mark.parametrize("args", [("policy", "compile"), ("policy", "compile", "--check")],
                         ids=["compile", "check"])
def test_config_path_that_is_a_directory_is_one_line(folder: Path, args: tuple[str, ...]) -> None:
    (folder / "nats-server.conf").mkdir()
    line = one_line_error(mas(folder, *args))
    assert line == f"mas: Is a directory: {folder / 'nats-server.conf'}", line
    assert (folder / "nats-server.conf").is_dir()


def test_secrets_path_that_is_a_file_is_one_line(folder: Path) -> None:
    (folder / "secrets").write_text("not a folder\n")
    line = one_line_error(mas(folder, "init"))
    assert line == f"mas: File exists: {folder / 'secrets'}", line
    assert (folder / "secrets").read_text() == "not a folder\n"


def test_up_with_corrupt_secret_names_the_file(ready: Path) -> None:
    seed = ready / "secrets" / "notify" / "nkey.seed"
    seed.write_text("garbage\n")
    line = one_line_error(mas(ready, "up", "--timeout", "5"))
    assert str(seed) in line
    assert "mas init" in line
    assert not (ready / "data" / "mas-up.pid").exists()


def test_up_with_readable_seed_names_the_file(ready: Path) -> None:
    seed = ready / "secrets" / "home" / "nkey.seed"
    seed.chmod(0o644)
    line = one_line_error(mas(ready, "up", "--timeout", "5"))
    assert str(seed) in line
    assert "chmod 600" in line


def test_up_with_stale_config_refuses(ready: Path) -> None:
    config = ready / "nats-server.conf"
    config.write_text(config.read_text().replace('"mas.alert.>"', '">"', 1))
    line = one_line_error(mas(ready, "up", "--timeout", "5"))
    assert "stale" in line
    assert "mas policy compile" in line


def test_up_without_init_refuses(folder: Path) -> None:
    assert mas(folder, "policy", "compile").returncode == 0
    line = one_line_error(mas(folder, "up", "--timeout", "5"))
    assert "secrets" in line
    assert "mas init" in line


# --- show -----------------------------------------------------------------------------------


def test_show_prints_every_identity(folder: Path) -> None:
    result = mas(folder, "policy", "show")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert list(rows) == IDENTITIES, result.stdout
    assert "everything else is denied" in result.stdout
    _identity, role, publish, subscribe, also = rows["home"]
    assert role == "agent(reactive,scoped)"
    assert "mas.agent.home.>" in subscribe
    assert "_INBOX_home.>" in subscribe
    assert "mas.event.home.>" in publish
    assert "actioncall_service(SENSITIVE)" in also
    assert "egress:homeassistant.local" in also
    assert "mas.agent.>" in rows["orchestrator"][2]
    assert "denied:$JS.API.STREAM.DELETE.MAS_AUDIT" in rows["orchestrator"][4]
    assert "$JS" not in "".join(r[2] for r in rows.values())  # JetStream grants summarised


def test_show_one_identity(folder: Path) -> None:
    result = mas(folder, "policy", "show", "home")
    assert result.returncode == 0
    rows = table_rows(result.stdout)
    assert list(rows) == ["home"]
    assert "egress:homeassistant.local" in rows["home"][4]


def test_show_json(folder: Path) -> None:
    result = mas(folder, "policy", "show", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [d["identity"] for d in data] == IDENTITIES
    health = next(d for d in data if d["identity"] == "health")
    assert "mas.agent.health.>" in health["subscribe"]
    assert "_INBOX_health.>" in health["subscribe"]
    assert "mas.event.health.>" in health["publish"]
    assert set(health["actions"]) == {"daily_summary", "check_activity"}
    orchestrator = next(d for d in data if d["identity"] == "orchestrator")
    assert "$JS.API.STREAM.DELETE.MAS_AUDIT" in orchestrator["publish_deny"]
    assert orchestrator["actions"] == {}


def test_show_json_single(folder: Path) -> None:
    data = json.loads(mas(folder, "policy", "show", "health", "--json").stdout)
    assert [d["identity"] for d in data] == ["health"]


# --- init -----------------------------------------------------------------------------------


def test_init_twice_changes_nothing(folder: Path) -> None:
    first = mas(folder, "init")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("created 40 secret files")
    before = snapshot(folder / "secrets")
    assert len(before) == 40 + 2 + 1  # and the dashboard's login secret
    second = mas(folder, "init")
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("all 40 secret files present and valid")
    assert snapshot(folder / "secrets") == before


def test_init_force_replaces(folder: Path) -> None:
    assert mas(folder, "init").returncode == 0
    before = snapshot(folder / "secrets")
    forced = mas(folder, "init", "--force")
    assert forced.returncode == 0
    assert "created 40" in forced.stdout
    after = snapshot(folder / "secrets")
    assert all(before[name] != after[name] for name in before)


# --- up for real ----------------------------------------------------------------------------


def assign_free_ports(folder: Path) -> None:
    """Point the policy's listen and monitor addresses at free ports and recompile."""
    policy = folder / "policy.yaml"
    text = re.sub(r"listen: 127\.0\.0\.1:\d+", f"listen: 127.0.0.1:{free_port()}",
                  policy.read_text())
    text = re.sub(r"monitor: 127\.0\.0\.1:\d+", f"monitor: 127.0.0.1:{free_port()}", text)
    policy.write_text(text)
    assert mas(folder, "policy", "compile").returncode == 0


@pytest.fixture
def up_folder(ready: Path) -> Path:
    """An initialised project whose policy uses free ports, compiled after the edit."""
    text = (ready / "policy.yaml").read_text()
    assert "listen: 127.0.0.1:4222" in text
    assert "monitor: 127.0.0.1:8222" in text
    assign_free_ports(ready)
    return ready


@pytest.fixture
def running(up_folder: Path) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    # Its own session, so cleanup can reach the nats-server child even if `mas up` is stuck.
    # A port free when picked can be taken before nats-server binds it (another process's
    # ephemeral port): on exactly that error, pick new ports, at most three times.
    for _attempt in range(3):
        proc = subprocess.Popen([*MAS, "up", "--no-services"], cwd=up_folder, env=env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        lines: list[str] = []
        if read_until(proc, lines, "broker ready", 20) or proc.poll() is None:
            break
        _, err = proc.communicate(timeout=10)
        if "address already in use" not in err:
            proc.stderr = None
            lines.append(err)
            break
        assign_free_ports(up_folder)
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


_partial: dict[int, str] = {}  # per process: the start of a line not yet complete


def read_until(proc: subprocess.Popen[str], lines: list[str], needle: str,
               timeout: float) -> bool:
    """Append ``proc``'s output lines to ``lines`` until one contains ``needle``.

    Reads the pipe's file descriptor directly: waiting with select() on the buffered text
    stream missed a second line that arrived in the same chunk as the first (it sat in
    Python's buffer while select() waited on an empty pipe)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if any(needle in ln for ln in lines):
                return True
            if sel.select(timeout=0.2):
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                text = _partial.pop(id(proc), "") + chunk.decode(errors="replace")
                *complete, rest = text.split("\n")
                lines.extend(line + "\n" for line in complete)
                if rest:
                    _partial[id(proc)] = rest
        return any(needle in ln for ln in lines)
    finally:
        sel.close()


def test_up_runs_refuses_a_second_and_stops_cleanly(
        up_folder: Path, running: tuple[subprocess.Popen[str], list[str]]) -> None:
    proc, lines = running
    ready = read_until(proc, lines, "broker ready", 20)
    if not ready:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"no 'broker ready' within 20 s; stdout {lines!r}; stderr {err!r}")
    assert (up_folder / "data" / "mas-up.pid").read_text().strip() == str(proc.pid)
    assert proc.poll() is None
    monitor = re.search(r"monitor: (127\.0\.0\.1:\d+)", (up_folder / "policy.yaml").read_text())
    assert monitor is not None
    assert f"monitoring on http://{monitor.group(1)}" in "".join(lines)
    with urllib.request.urlopen(f"http://{monitor.group(1)}/healthz", timeout=5) as resp:
        assert json.loads(resp.read())["status"] == "ok"

    second = mas(up_folder, "up", "--no-services", "--timeout", "5")
    line = one_line_error(second)
    assert "already running" in line
    assert str(proc.pid) in line
    assert proc.poll() is None  # the first one is unaffected

    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("mas up did not stop within 10 s of SIGINT")
    rest, err = proc.communicate(timeout=5)
    output = "".join(lines) + rest
    assert code == 0, (output, err)
    assert "broker stopped" in output
    assert "Traceback" not in err
    assert not (up_folder / "data" / "mas-up.pid").exists()
    # nats-server went down with it: nothing answers on the monitoring port any more.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://{monitor.group(1)}/healthz", timeout=2)
