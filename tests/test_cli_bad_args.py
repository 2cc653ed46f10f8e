"""Every `mas` command, found by walking the command tree (so a new command is covered
without editing this file), given bad arguments: unknown options, wrong types, missing
and extra arguments, a root that does not exist, a garbage policy.yaml, no broker, ids
and values the orchestrator does not know. Each ends with a non-zero exit (2 for usage
errors), one clear line, and never a Python traceback.

Usage errors are checked in process with typer's CliRunner (they stop before any command
code runs). Everything else runs `main()`, the console script's entry point, in a process
of its own per case (forked from one that imported `mas` once, see ``FORK_DRIVER``), and
the tests against a live orchestrator run the installed `mas` script itself; all in
throwaway project folders, never in the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from mas.cli import app
from tests.conftest import REPO, free_port, make_project, start_broker, stop_process
from tests.test_cli import MAS, env

TRACEBACK = "Traceback (most recent call last)"
Path_ = tuple[str, ...]


def leaf_commands() -> list[tuple[Path_, Any]]:
    """(path, click command) for every runnable `mas` command."""
    found: list[tuple[Path_, Any]] = []

    def walk(command: Any, path: Path_) -> None:
        if hasattr(command, "list_commands"):
            for name in command.list_commands(None):
                walk(command.get_command(None, name), (*path, name))
        else:
            found.append((path, command))

    walk(typer.main.get_command(app), ())
    return found


COMMANDS = leaf_commands()
IDS = [" ".join(path) for path, _ in COMMANDS]
# A plausible value for each required argument, by name, so only the thing under test is bad.
DUMMY = {"approval_id": "ap-0000000000000000", "workflow_id": "wf-000000000000",
         "name": "notify", "identity": "notify", "request": "hello", "target": "some-jti"}
# Commands that never talk to the broker (`up` starts one: never run it for real here).
LOCAL = {("init",), ("up",), ("policy", "compile"), ("policy", "show"), ("agent", "new"),
         ("agent", "probe")}


def required_args(command: Any) -> list[str]:
    return [DUMMY.get(p.name, "x") for p in command.params
            if p.param_type_name == "argument" and p.required]


def options(command: Any) -> dict[str, Any]:
    return {p.opts[0]: p for p in command.params if p.param_type_name == "option"}


def bounded(command: Any) -> list[str]:
    """Flags that make a long-running command do one round and exit."""
    return ["--once"] if "--once" in options(command) else []


# --- usage errors, in process -------------------------------------------------------------

runner = CliRunner()


def usage_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (args, result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert TRACEBACK not in result.output
    return result.output


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_unknown_options_and_extra_arguments_are_usage_errors(path: Path_, command: Any) -> None:
    assert "No such option" in usage_error([*path, *required_args(command),
                                            "--no-such-option"])
    if all(p.nargs != -1 for p in command.params):
        assert "unexpected extra argument" in usage_error(
            [*path, *required_args(command), "extra1", "extra2", "extra3"])


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=IDS)
def test_missing_arguments_and_wrong_types_are_usage_errors(path: Path_, command: Any) -> None:
    if required_args(command):
        assert "Missing argument" in usage_error(list(path))
    for name, option in options(command).items():
        if option.bare_type() in (int, float):
            assert "Invalid value" in usage_error(
                [*path, *required_args(command), name, "not-a-number"])
        elif option.bare_type() is bool and not option.is_flag:
            assert "Invalid value" in usage_error(
                [*path, *required_args(command), name, "perhaps"])
        if not option.is_flag:
            assert "requires an argument" in usage_error(
                [*path, *required_args(command), name])


def test_the_walk_found_the_documented_commands() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"init", "up", "run", "policy compile", "policy show", "agent run", "agent new",
            "orchestrator run", "approvals list", "approvals approve", "workflow run",
            "tokens revoke"} <= names


# --- errors from the commands themselves, as subprocesses ------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    cwd: Path
    extra_env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Outcome:
    args: tuple[str, ...]
    returncode: int | None  # None: a foreground service still running when we stopped it
    stdout: str
    stderr: str


def foreground(command: Any) -> bool:
    """A service that runs until stopped (`mas up`, `mas orchestrator run`, ...)."""
    return "foreground" in (command.help or "")


def run_all(cases: list[Case], service_grace_s: float = 20.0) -> dict[str, Outcome]:
    """Run the installed `mas` script for each case, a few at a time. A case still running
    after ``service_grace_s`` (a foreground service that does not need what is missing) is
    stopped with SIGTERM."""
    def one(case: Case) -> Outcome:
        proc = subprocess.Popen([*MAS, *case.args], cwd=case.cwd,
                                env={**env(), **dict(case.extra_env)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=service_grace_s)
            return Outcome(case.args, proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                err += "\n(did not stop on SIGTERM)"
            return Outcome(case.args, None, out, err)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip([c.id for c in cases], pool.map(one, cases), strict=True))


# Dozens of cases cost a Python start-up and the imports each (seconds on a loaded machine).
# This driver imports `mas` once and forks a child per case that runs the console script's
# own `main()` with the case's argv, folder and environment, its stdout and stderr going to
# files: a fresh process per case, as from the shell, without paying for the imports again.
FORK_DRIVER = r"""
import json, os, signal, sys, tempfile, time, traceback
cases, grace, workers = json.load(sys.stdin), float(sys.argv[1]), int(sys.argv[2])
from mas.entry import main
out_dir = tempfile.mkdtemp()
results, running, queue = {}, {}, list(enumerate(cases))


def child(n, case):
    code = 1
    try:
        os.chdir(case["cwd"])
        os.environ.clear()
        os.environ.update(case["env"])
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(f"{out_dir}/{n}.{name}", os.O_WRONLY | os.O_CREAT), fd)
        sys.argv = ["mas", *case["args"]]
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


while queue or running:
    while queue and len(running) < workers:
        n, case = queue.pop(0)
        pid = os.fork()
        if pid == 0:
            child(n, case)
        running[pid] = (n, time.monotonic(), False)
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid:
        n, _, stopped = running.pop(pid)
        code = None if stopped else os.waitstatus_to_exitcode(status)
        with open(f"{out_dir}/{n}.out", errors="replace") as out, \
                open(f"{out_dir}/{n}.err", errors="replace") as err:
            results[cases[n]["id"]] = {"returncode": code, "stdout": out.read(),
                                       "stderr": err.read()}
        continue
    for pid, (n, began, stopped) in list(running.items()):
        if not stopped and time.monotonic() - began > grace:
            os.kill(pid, signal.SIGTERM)
            running[pid] = (n, began, True)
        elif stopped and time.monotonic() - began > grace + 30:
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.02)
json.dump(results, sys.stdout)
"""


def run_forked(cases: list[Case], service_grace_s: float = 20.0) -> dict[str, Outcome]:
    """Like ``run_all``, through ``FORK_DRIVER``."""
    payload = [{"id": c.id, "args": list(c.args), "cwd": str(c.cwd),
                "env": {**env(), **dict(c.extra_env)}} for c in cases]
    done = subprocess.run([sys.executable, "-c", FORK_DRIVER, str(service_grace_s), "4"],
                          input=json.dumps(payload), capture_output=True, text=True,
                          cwd=REPO, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    return {c.id: Outcome(c.args, results[c.id]["returncode"], results[c.id]["stdout"],
                          results[c.id]["stderr"]) for c in cases}


def one_clear_line(result: Outcome, exit_code: int = 1) -> str:
    """The error contract: the exit code, no traceback, exactly one line on stderr."""
    out = result.stdout + result.stderr
    assert TRACEBACK not in out, out
    assert result.returncode == exit_code, (result.args, result.returncode, out)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, (result.args, result.stderr)
    return lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A project after `mas init` and `mas policy compile`, and one whose policy is junk."""
    ready = tmp_path_factory.mktemp("ready")
    shutil.copy(REPO / "policy.yaml", ready / "policy.yaml")
    for args in (("init",), ("policy", "compile")):
        assert subprocess.run([*MAS, *args], cwd=ready, env=env(), capture_output=True,
                              timeout=120, check=False).returncode == 0
    garbage = tmp_path_factory.mktemp("garbage")
    (garbage / "policy.yaml").write_bytes(b"\x00\xff identities: [unclosed\n\t- {{")
    return {"ready": ready, "garbage": garbage}


def _copy(folders: dict[str, Path], name: str, case_id: str) -> Path:
    """A private copy per case: some commands write into the project."""
    target = folders[name].parent / f"{name}-{case_id.replace(' ', '_').replace('/', '_')}"
    if not target.exists():
        shutil.copytree(folders[name], target)
    return target


NO_BROKER = [(path, command) for path, command in COMMANDS if path not in LOCAL]


@pytest.fixture(scope="module")
def outcomes(folders: dict[str, Path]) -> dict[str, Outcome]:
    closed = f"tls://127.0.0.1:{free_port()}"
    cases: list[Case] = []
    for path, command in COMMANDS:
        name = " ".join(path)
        args = (*path, *required_args(command), *bounded(command))
        cases.append(Case(f"garbage {name}", args, _copy(folders, "garbage", name)))
        if "--root" in options(command):
            cases.append(Case(f"root {name}", (*args, "--root", "/nonexistent/project"),
                              folders["garbage"]))
    for path, command in NO_BROKER:
        name = " ".join(path)
        cases.append(Case(f"nobroker {name}", (*path, *required_args(command),
                                               *bounded(command)),
                          _copy(folders, "ready", name), (("MAS_BROKER_URL", closed),)))
    return run_forked(cases)


@pytest.mark.parametrize("name", IDS)
def test_a_garbage_policy_is_one_line(name: str, outcomes: dict[str, Outcome]) -> None:
    line = one_clear_line(outcomes[f"garbage {name}"])
    assert line.startswith("mas: ") or name == "agent probe", line


@pytest.mark.parametrize("name", [i for i, (_, c) in zip(IDS, COMMANDS, strict=True)
                                  if "--root" in options(c)])
def test_a_root_that_does_not_exist_is_one_line(name: str,
                                                outcomes: dict[str, Outcome]) -> None:
    line = one_clear_line(outcomes[f"root {name}"])
    assert "/nonexistent/project" in line, line


@pytest.mark.parametrize(("name", "command"), [(" ".join(p), c) for p, c in NO_BROKER],
                         ids=[" ".join(p) for p, _ in NO_BROKER])
def test_no_broker_is_one_line(name: str, command: Any, outcomes: dict[str, Outcome]) -> None:
    """Every client command says it cannot reach the broker; a foreground service either
    says the same or keeps waiting for it (and stops cleanly on SIGTERM)."""
    outcome = outcomes[f"nobroker {name}"]
    if outcome.returncode is None:
        assert foreground(command), f"{name} did not finish without a broker"
        assert TRACEBACK not in outcome.stdout + outcome.stderr
        assert "did not stop on SIGTERM" not in outcome.stderr
        return
    line = one_clear_line(outcome)
    assert line.startswith("mas: "), line


# Values refused before anything is sent: each must say which value is wrong.
BAD_VALUES = [
    (("approvals", "list", "--status", "bogus"), "unknown status"),
    (("approvals", "show", "bad id!"), "not an approval id"),
    (("approvals", "approve", ""), "not an approval id"),
    (("approvals", "deny", "x" * 200), "not an approval id"),
    (("workflow", "show", ""), "not a workflow id"),
    (("workflow", "show", "wf.with.dots"), "not a workflow id"),
    (("tokens", "revoke", "bad id!"), "not a token id"),
    (("tokens", "revoke", "some-jti", "--reason", "r" * 600), "--reason may be at most 500"),
    (("approvals", "approve", "ap-0000000000000000", "--reason", "r" * 600), "--reason"),
    (("run", ""), "request must be 1 to 2000 characters"),
    (("run", "x" * 3000), "request must be 1 to 2000 characters"),
    (("run", "hello", "--wait", "-1"), "--wait must be 0 to 120 seconds"),
    (("run", "hello", "--wait", "100000"), "--wait must be"),
    (("workflow", "run", "morning-check", "--wait", "nan"), "--wait must be"),
    (("policy", "show", "nobody"), "no identity 'nobody'"),
    (("agent", "run", "nobody"), "not an agent"),
    (("agent", "new", "Bad Name"), "lower-case"),
]


@pytest.fixture(scope="module")
def bad_value_outcomes(folders: dict[str, Path]) -> dict[str, Outcome]:
    closed = (("MAS_BROKER_URL", f"tls://127.0.0.1:{free_port()}"),)
    return run_forked([Case(" ".join(args), args, _copy(folders, "ready", "values"), closed)
                    for args, _ in BAD_VALUES])


@pytest.mark.parametrize(("args", "needle"), BAD_VALUES, ids=[" ".join(a)[:40] for a, _ in
                                                              BAD_VALUES])
def test_bad_values_are_named_in_one_line(args: tuple[str, ...], needle: str,
                                          bad_value_outcomes: dict[str, Outcome]) -> None:
    line = one_clear_line(bad_value_outcomes[" ".join(args)])
    assert needle in line, line


# --- against a running orchestrator: ids it does not know -------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A real broker and `mas orchestrator run` (offline planner) for the CLI to talk to."""
    root = tmp_path_factory.mktemp("live")
    project = make_project(root / "project")
    server = start_broker(project, root)
    extra = {"MAS_BROKER_URL": f"tls://127.0.0.1:{server.port}", "MAS_PLANNER": "offline",
             "MAS_WORKFLOWS_DIR": str(REPO / "workflows")}
    orch = subprocess.Popen([*MAS, "orchestrator", "run"], cwd=project.root,
                            env={**env(), **extra}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            probe = subprocess.run([*MAS, "workflow", "list", "--json"], cwd=project.root,
                                   env={**env(), **extra}, capture_output=True, text=True,
                                   timeout=60, check=False)
            if probe.returncode == 0:
                break
            assert orch.poll() is None, orch.stderr.read() if orch.stderr else ""
            assert time.monotonic() < deadline, probe.stderr
            time.sleep(0.5)
        yield project.root, extra
    finally:
        stop_process(orch)
        server.stop()


UNKNOWN = [
    (("approvals", "show", "ap-doesnotexist00"), "refused (unknown_approval)"),
    (("approvals", "approve", "ap-doesnotexist00", "--reason", "ok"), "refused (unknown_approval)"),
    (("approvals", "deny", "ap-doesnotexist00"), "refused (unknown_approval)"),
    (("workflow", "show", "wf-doesnotexist"), "refused (unknown_workflow)"),
    (("workflow", "run", "no-such-workflow", "--wait", "0"), "refused (plan_rejected)"),
    (("run", "launch the rockets at dawn", "--wait", "0"), "refused (plan_rejected)"),
]


@pytest.mark.broker
def test_ids_the_orchestrator_does_not_know_are_refused_by_name(
        live: tuple[Path, dict[str, str]]) -> None:
    root, extra = live
    results = run_all([Case(" ".join(args), args, root, tuple(extra.items()))
                       for args, _ in UNKNOWN])
    for args, needle in UNKNOWN:
        line = one_clear_line(results[" ".join(args)])
        assert needle in line, (args, line)
    after = subprocess.run([*MAS, "workflow", "list"], cwd=root, env={**env(), **extra},
                           capture_output=True, text=True, timeout=60, check=False)
    assert after.returncode == 0, after.stderr  # the orchestrator is still serving
    assert os.path.isdir(root / "secrets")


JUNK = "../../😀\u202e\u0301 " + "x" * 5000  # a path, bidi and combining marks, and long


@pytest.mark.broker
def test_junk_in_every_argument_is_refused_in_one_line(
        live: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Each command with arguments (but the foreground services) gets junk in all of them,
    against a live orchestrator: refused in one line, or accepted, never a traceback."""
    root, extra = live
    project = tmp_path / "project"
    shutil.copytree(root, project, ignore=shutil.ignore_patterns("data"))  # `agent new` writes
    cases = [Case(" ".join(path), (*path, *[JUNK for _ in required_args(command)]), project,
                  tuple(extra.items()))
             for path, command in COMMANDS if required_args(command) and not foreground(command)]
    assert len(cases) >= 8
    for case_id, outcome in run_all(cases).items():
        if outcome.returncode != 0:
            line = one_clear_line(outcome)
            assert line.startswith("mas: "), (case_id, line)
        assert TRACEBACK not in outcome.stdout + outcome.stderr, case_id
