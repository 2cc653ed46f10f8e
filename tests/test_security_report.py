"""The attack-matrix report renders from JUnit XML and markers alone, so the command cannot rot.

Fast and broker-free: a small JUnit file as pytest writes it and the markers JSON the plugin
writes go through the same reading and rendering code `python -m tests.security_report` uses.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import security_report as report

PUBLISH = "publish to another agent's subjects"
SYSCALLS = "call denied syscalls"

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="5">
 <testcase classname="tests.test_broker_acl" name="test_publish[health]" time="0.1"/>
 <testcase classname="tests.test_broker_acl" name="test_publish[home]" time="0.1"/>
 <testcase classname="tests.test_containers" name="test_seccomp[home]" time="0">
  <skipped type="pytest.skip" message="no Docker engine: socket missing">skip</skipped>
 </testcase>
 <testcase classname="tests.test_tokens.TestForge" name="test_forged" time="0.1">
  <failure message="AssertionError: the forged token verified">trace</failure>
 </testcase>
</testsuite></testsuites>
"""

MARKS = {
    "tests/test_broker_acl.py::test_publish[health]": {"row": PUBLISH, "threat": "sends as B"},
    "tests/test_broker_acl.py::test_publish[home]": {"row": PUBLISH, "threat": "sends as B"},
    "tests/test_containers.py::test_seccomp[home]": {"row": SYSCALLS, "threat": "calls ptrace"},
    "tests/test_tokens.py::TestForge::test_forged": {
        "row": "forge, replay or extend tokens", "threat": "forges | a token"},
}


@pytest.fixture
def rendered(tmp_path: Path) -> str:
    junit, markers = tmp_path / "junit.xml", tmp_path / "markers.json"
    junit.write_text(JUNIT)
    markers.write_bytes(report.MARKS.dump_json(report.MARKS.validate_python(MARKS)))
    return report.render(report.MARKS.validate_json(markers.read_bytes()),
                         report.read_junit(junit), commit="abc1234", when="2026-01-01 00:00 UTC")


def line_of(text: str, test: str) -> str:
    [line] = [ln for ln in text.splitlines() if f"`{test}`" in ln]
    return line


def test_passed_cases_of_one_test_are_grouped_under_their_row(rendered: str) -> None:
    line = line_of(rendered, "tests/test_broker_acl.py::test_publish")
    assert line.startswith(f"| {PUBLISH} | 2 broker | sends as B |")
    assert line.endswith("| passed (2 passed) |")


def test_a_skip_shows_its_reason_and_never_counts_as_passed(rendered: str) -> None:
    line = line_of(rendered, "tests/test_containers.py::test_seccomp")
    assert "skipped (1 skipped)<br>no Docker engine: socket missing" in line


def test_a_failure_is_loud_and_pipes_cannot_break_the_table(rendered: str) -> None:
    line = line_of(rendered, "tests/test_tokens.py::TestForge::test_forged")
    assert "**FAILED** (1 failed)<br>AssertionError: the forged token verified" in line
    assert "forges \\| a token" in line


def test_rows_without_tests_are_listed_and_the_summary_counts_every_row(rendered: str) -> None:
    assert "| approve its own request | 4 human | | | **no test** |" in rendered
    assert ("Rows: 1 refused every attack tried, 1 failed, 1 skipped (not run here), "
            f"{len(report.ROWS) - 3} without a test, of {len(report.ROWS)}.") in rendered
    assert "at commit `abc1234` on 2026-01-01 00:00 UTC" in rendered


def test_a_case_missing_from_the_junit_file_is_a_failure(tmp_path: Path) -> None:
    marks = report.MARKS.validate_python(
        {"tests/test_x.py::test_y": {"row": PUBLISH, "threat": "t"}})
    text = report.render(marks, {}, commit="c", when="w")
    assert "**FAILED** (1 not run)" in line_of(text, "tests/test_x.py::test_y")


def test_junit_keys_follow_pytest_names() -> None:
    assert report.junit_key("tests/test_a.py::test_b[x-y]") == "tests.test_a::test_b[x-y]"
    assert report.junit_key("tests/test_a.py::C::test_b") == "tests.test_a.C::test_b"


def test_the_plugin_refuses_a_row_that_is_not_in_the_matrix(tmp_path: Path) -> None:
    (tmp_path / "test_rogue.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.attack('fly to the moon', threat='x')\n"
        "def test_x():\n    pass\n")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path / "test_rogue.py"), "-p", "no:cacheprovider",
         "-p", "tests.security_report", f"--attack-markers={tmp_path / 'm.json'}",
         f"--rootdir={tmp_path}"],
        cwd=report.ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert "attack row 'fly to the moon' is not in the matrix" in run.stderr
    assert not (tmp_path / "m.json").exists()
