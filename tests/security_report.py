"""Runs the attack matrix (issue 8) and writes docs/SECURITY.md from what it observed.

`python -m tests.security_report` runs every test marked ``@pytest.mark.attack(row,
threat=...)``. Outcomes come from pytest's own JUnit XML, and which row and threat each test
answers comes from the markers themselves (this module is also the tiny pytest plugin that
dumps them), so the published table can only say what the tests say. Container rows need a
Docker engine; without one they appear as skipped with pytest's reason, never as passed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, TypeAdapter

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "SECURITY.md"
COMMAND = "python -m tests.security_report"

# The rows of issue 8's attack matrix, in order, with the layer of defence that holds each.
ROWS: dict[str, str] = {
    "publish to another agent's subjects": "2 broker",
    "read another agent's replies or KV": "2 broker",
    "forge, replay or extend tokens": "3 capability",
    "approve its own request": "4 human",
    "delete or rewrite the audit stream": "5 audit",
    "reach another container": "1 network",
    "reach the internet from the isolated tier": "1 network",
    "escape the scoped tier's allowlist": "1 network",
    "write its root filesystem": "container",
    "call denied syscalls": "container",
}

INTRO = """\
Every row below is an attack by a rogue identity that holds a real agent's credentials (its
nkey, client certificate and signing key), run as a test against the real parts: a real
nats-server with the compiled configuration and TLS, the real agent runtime and orchestrator,
the real egress proxy, and for the container rows the real images under Docker. **passed**
means the attack was tried and refused, and the test checked the refusal it received and that
nothing changed. Each row is held by one of five independent layers of defence, each of which
must hold even if the ones above it fail:

1. **Network**: each agent on its own internal Docker network with only NATS (and, for the
   scoped tier, the egress proxy); tiers isolated / scoped / full.
2. **Broker**: one nkey and client certificate per identity; subject allow lists generated
   from the policy; own inbox prefix and own KV bucket only; no `$JS.API.>`.
3. **Capability**: Ed25519-signed, short-lived, audience- and action-scoped tokens, checked
   by the agent runtime before any handler; revocation by KV on the next message.
4. **Human**: sensitive actions need an operator-signed, argument-bound, single-use approval.
5. **Audit**: hash-chained, signed records in a stream that denies delete and purge, with
   signed checkpoints checked by `mas audit verify`.

Under all five, each container runs unprivileged, read-only, without capabilities and with a
seccomp profile (layer *container* below).
"""


class AttackMark(BaseModel):
    """One ``@pytest.mark.attack`` as read from a collected test."""

    row: str
    threat: str


class CaseResult(BaseModel):
    """The JUnit outcome of one test case (one parameter set)."""

    outcome: Literal["passed", "failed", "skipped"]
    message: str = ""


MARKS = TypeAdapter(dict[str, AttackMark])


# --- the pytest plugin (loaded with -p tests.security_report) -----------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--attack-markers", default=None,
                     help="write each attack-marked test's row and threat to this JSON file")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = config.getoption("--attack-markers")
    if path is None:
        return
    found: dict[str, AttackMark] = {}
    for item in items:
        marker = item.get_closest_marker("attack")
        if marker is None:
            continue
        row = marker.args[0] if marker.args else marker.kwargs.get("row", "")
        threat = marker.kwargs.get("threat", marker.args[1] if len(marker.args) > 1 else "")
        if row not in ROWS:
            raise pytest.UsageError(
                f"{item.nodeid}: attack row {row!r} is not in the matrix; use one of "
                f"tests/security_report.py ROWS")
        if not threat:
            raise pytest.UsageError(f"{item.nodeid}: attack marker needs threat=\"...\"")
        found[item.nodeid] = AttackMark(row=row, threat=threat)
    Path(path).write_bytes(MARKS.dump_json(found, indent=1))


# --- reading the results ----------------------------------------------------------------------


def junit_key(nodeid: str) -> str:
    """The ``classname::name`` JUnit gives the test with this pytest node id."""
    path, *rest = nodeid.split("::")
    module = path.removesuffix(".py").replace("/", ".")
    return "::".join([".".join([module, *rest[:-1]]), rest[-1]])


def read_junit(path: Path) -> dict[str, CaseResult]:
    """Each test case in a pytest JUnit file, keyed by ``classname::name``."""
    results: dict[str, CaseResult] = {}
    tree = ET.parse(path)  # noqa: S314 - our own pytest's output, not outside input
    for case in tree.iter("testcase"):
        key = f"{case.get('classname', '')}::{case.get('name', '')}"
        result = CaseResult(outcome="passed")
        for child in case:
            if child.tag in {"failure", "error"}:
                result = CaseResult(outcome="failed", message=child.get("message", ""))
                break
            if child.tag == "skipped":
                result = CaseResult(outcome="skipped", message=child.get("message", ""))
        results[key] = result
    return results


def _function(nodeid: str) -> str:
    return nodeid.split("[", 1)[0]


def _outcome(cases: Iterable[CaseResult | None]) -> str:
    cases = list(cases)
    counts = {o: sum(1 for c in cases if c is not None and c.outcome == o)
              for o in ("passed", "failed", "skipped")}
    missing = sum(1 for c in cases if c is None)
    parts = [f"{n} {o}" for o, n in counts.items() if n]
    if missing:
        parts.append(f"{missing} not run")
    text = ", ".join(parts)
    messages = sorted({c.message.replace("\n", " ").replace("|", "\\|")[:160]
                       for c in cases if c is not None and c.outcome != "passed" and c.message})
    if counts["failed"] or missing:
        verdict = "**FAILED**"
    elif counts["skipped"] and not counts["passed"]:
        verdict = "skipped"
    else:
        verdict = "passed"
    return f"{verdict} ({text})" + "".join(f"<br>{m}" for m in messages)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(marks: Mapping[str, AttackMark], results: Mapping[str, CaseResult], *,
           commit: str, when: str, command: str = COMMAND) -> str:
    """The Markdown of docs/SECURITY.md for these markers and outcomes."""
    by_test: dict[str, list[str]] = {}
    for nodeid in marks:
        by_test.setdefault(_function(nodeid), []).append(nodeid)
    lines = ["# Security: the attack matrix", "",
             f"Produced by `{command}` at commit `{commit}` on {when}; do not edit by hand.", "",
             INTRO, "| Attack (row) | Layer | Threat | Test | Outcome |",
             "|---|---|---|---|---|"]
    tally = {"passed": 0, "skipped": 0, "failed": 0, "untested": 0}
    for row, layer in ROWS.items():
        tests = [t for t in by_test if marks[by_test[t][0]].row == row]
        if not tests:
            tally["untested"] += 1
            lines.append(f"| {_cell(row)} | {layer} | | | **no test** |")
            continue
        row_failed = row_passed = False
        for n, test in enumerate(tests):
            outcome = _outcome(results.get(junit_key(nid)) for nid in by_test[test])
            row_failed |= outcome.startswith("**FAILED")
            row_passed |= outcome.startswith("passed")
            label = f"{_cell(row)}" if n == 0 else ""
            lines.append(f"| {label} | {layer if n == 0 else ''} | "
                         f"{_cell(marks[by_test[test][0]].threat)} | `{test}` | {outcome} |")
        tally["failed" if row_failed else "passed" if row_passed else "skipped"] += 1
    lines += ["", f"Rows: {tally['passed']} refused every attack tried, "
                  f"{tally['failed']} failed, {tally['skipped']} skipped (not run here), "
                  f"{tally['untested']} without a test, of {len(ROWS)}.", ""]
    return "\n".join(lines)


# --- the command ------------------------------------------------------------------------------


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def _commit() -> str:
    """The commit tested, flagged when the tests themselves differ from it."""
    try:
        sha, changed = _git("rev-parse", "--short", "HEAD"), _git("status", "--porcelain", "tests")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha} with uncommitted changes to tests/" if changed else sha


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description="Run the attack matrix and write docs/SECURITY.md.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="where to write the report (default: docs/SECURITY.md)")
    parser.add_argument("pytest_args", nargs="*",
                        help="extra pytest arguments after --, e.g. -- -m 'attack and not docker'")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mas-attack-") as tmp:
        junit, markers = Path(tmp) / "junit.xml", Path(tmp) / "markers.json"
        code = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "attack", "-p", "no:cacheprovider",
             "-p", "tests.security_report", f"--attack-markers={markers}",
             f"--junitxml={junit}", "-q", *args.pytest_args],
            cwd=ROOT, check=False, env=os.environ.copy()).returncode
        if not markers.exists() or not junit.exists():
            print(f"error: pytest stopped before running the attack tests (exit {code}); "
                  "see its output above", file=sys.stderr)
            return 2
        marks = MARKS.validate_json(markers.read_bytes())
        results = read_junit(junit)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    args.output.write_text(render(marks, results, commit=_commit(), when=when))
    print(f"wrote {args.output} ({len(marks)} attack cases; pytest exit {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
