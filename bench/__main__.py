"""Every benchmark in one command, collected into docs/BENCHMARKS.md with plots.

Run from the project root::

    python -m bench            # full run (about half an hour), writes docs/BENCHMARKS.md
    python -m bench --quick    # smoke run (a few minutes), writes build/bench/quick/BENCHMARKS.md
    python -m bench --only security --only health

Each benchmark runs as its own process (``python -m bench.bench_NAME``), one after the
other so they do not compete for the cores, with a progress display showing its latest
line. Its markdown report becomes a section; its targets go into one table at the top;
its raw samples become the PNG plots next to the markdown (docs/bench-*.png). A benchmark
that fails is reported as failed in its section (with the end of its log) and the others
still run; the exit code is then 1. Logs and raw results: build/bench/{full,quick}/; with
``--only NAME --reuse`` one benchmark runs again and the others' last results are reused.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from bench.common import REPO, Result, Target, load_average, machine_info, verdict

BUILD = REPO / "build" / "bench"  # per mode: raw results (NAME.json, NAME.run.json), logs/


@dataclass(frozen=True)
class Bench:
    name: str  # bench/bench_<name>.py
    title: str  # the section heading
    full: tuple[str, ...]  # arguments in full mode
    quick: tuple[str, ...]  # arguments in --quick mode


BENCHES = (
    Bench("security", "Secured vs raw request/reply, tokens and envelopes", (), ("--quick",)),
    Bench("orchestrator", "Workflows through the offline planner, token issuance, approvals",
          (), ("--quick",)),
    Bench("audit", "Audit append and verify", (), ("--quick",)),
    Bench("revocation", "Revocation propagation", ("--n", "50"), ("--quick",)),
    Bench("health", "Health export parsing", ("--size-mb", "1024", "--rounds", "3"),
          ("--size-mb", "64", "--rounds", "1")),
    Bench("coldstart", "Cold start", ("--rounds", "3"), ("--quick",)),
    Bench("agents", "Idle memory per agent", ("--seconds", "10"),
          ("--seconds", "3", "--settle", "2")),
)
NAMES = [b.name for b in BENCHES]


@dataclass
class Outcome:
    bench: Bench
    command: list[str]
    seconds: float
    result: Result | None  # None: it failed
    code: int
    log: Path
    finished: str = ""  # UTC time it ended
    reused: bool = False  # taken from an earlier run (--reuse)

    @property
    def shown_command(self) -> str:
        return shlex.join(["python", *self.command[1:-2]])  # no interpreter path, no --json

    def save(self, work: Path) -> None:
        (work / f"{self.bench.name}.run.json").write_text(json.dumps(
            {"command": self.command, "seconds": self.seconds, "finished": self.finished}))

    @classmethod
    def load(cls, bench: Bench, work: Path) -> Outcome | None:
        """The last successful run of ``bench``, if its files are there."""
        try:
            meta = json.loads((work / f"{bench.name}.run.json").read_text())
            result = Result.from_json((work / f"{bench.name}.json").read_text())
        except (OSError, ValueError, KeyError):
            return None
        return cls(bench, meta["command"], meta["seconds"], result, 0,
                   work / "logs" / f"{bench.name}.log", meta["finished"], reused=True)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_one(bench: Bench, quick: bool, work: Path, progress: Progress) -> Outcome:
    """Run one benchmark in its own process; its latest stderr line drives the display."""
    data = work / f"{bench.name}.json"
    data.unlink(missing_ok=True)
    command = [sys.executable, "-m", f"bench.bench_{bench.name}",
               *(bench.quick if quick else bench.full), "--json", str(data)]
    (work / "logs").mkdir(parents=True, exist_ok=True)
    log_path = work / "logs" / f"{bench.name}.log"
    task = progress.add_task("starting", total=None, name=bench.name)
    started = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log_file:
        log_file.write(f"$ {shlex.join(command)}\n")
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, errors="replace")
        assert proc.stderr is not None
        try:
            for line in proc.stderr:
                log_file.write(line)
                log_file.flush()
                text = line.strip().removeprefix("[bench] ")
                if text:
                    progress.update(task, description=text[:90])
            code = proc.wait()
        except BaseException:  # Ctrl-C: let the benchmark clean up after itself
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
            if proc.poll() is None:
                proc.kill()
            raise
    seconds = time.perf_counter() - started
    result = Result.from_json(data.read_text()) if code == 0 and data.is_file() else None
    state = f"done in {seconds:.0f} s" if result else f"FAILED (exit {code}), see {log_path}"
    progress.update(task, description=state, total=1, completed=1)
    outcome = Outcome(bench, command, seconds, result, code, log_path, _now())
    if result is not None:
        outcome.save(work)
    return outcome


def _now() -> str:
    return f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"


def demote(markdown: str, known: list[str]) -> list[str]:
    """A benchmark's report one heading level down, without its own title line and the
    machine lines the header already gives (``known``)."""
    lines = markdown.strip("\n").splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    lines = [line for line in lines if line not in known]
    while lines and not lines[0].strip():
        lines = lines[1:]
    kept: list[str] = []
    for i, line in enumerate(lines):  # a heading left with nothing under it goes too
        rest = next((x for x in lines[i + 1:] if x.strip()), "#")
        doubled = not line.strip() and bool(kept) and not kept[-1].strip()
        if not (line.startswith("#") and rest.startswith("#")) and not doubled:
            kept.append(f"#{line}" if line.startswith("#") else line)
    while kept and not kept[-1].strip():
        kept.pop()
    return kept


def plots(outcomes: list[Outcome], folder: Path) -> dict[str, str]:
    """Draw what the samples allow; bench name -> markdown image line."""
    try:
        from bench import plots as draw
    except ImportError:
        return {"security": "_Plots need matplotlib: `pip install -e '.[bench]'`._"}
    images = {}
    for o in outcomes:
        if o.result is None or not o.result.samples:
            continue
        if o.bench.name == "security":
            draw.latency(o.result.samples, folder / "bench-latency.png")
            images["security"] = ("![Latency distributions of raw and secured request/reply]"
                                  "(bench-latency.png)")
        elif o.bench.name == "agents":
            draw.memory(o.result.samples, folder / "bench-memory.png")
            images["agents"] = "![Idle RSS per process](bench-memory.png)"
    return images


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{rev}{' (with uncommitted changes)' if dirty.strip() else ''}"


def _memory_gib() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    return "unknown"


def render(outcomes: list[Outcome], quick: bool, command: str, started: datetime.datetime,
           load_start: str, seconds: float, images: dict[str, str]) -> str:
    targets: list[tuple[Bench, Target]] = [(o.bench, t) for o in outcomes if o.result
                                           for t in o.result.targets]
    met = sum(t.met for _, t in targets)
    machine = machine_info()
    mode = "quick smoke run: small sizes, not figures to quote" if quick else "full run"
    lines = [
        "# Benchmarks", "",
        f"Written by `{command}` ({mode}); "
        + ("every figure below comes from that one run" if not any(o.reused for o in outcomes)
           else "the benchmarks marked *earlier run* were taken over from a previous run "
           "(`--reuse`), the others ran in this one")
        + ". These machines are shared and noisy: "
        "each benchmark compares its rows side by side in the same run, so read the ratios "
        "and medians rather than the absolute numbers.", "",
        "## Machine and run", "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; whole run {seconds / 60:.1f} min; "
        f"benchmarks one after the other, each in its own process",
        f"- Host: {platform.platform()}, {_memory_gib()} memory",
        *machine,
        f"- Code: git {_git_revision()}",
        f"- Load average (1, 5, 15 min) at the start: {load_start}; at the end: "
        f"{load_average()} (other work was running on this machine)",
        "- Per benchmark: " + "; ".join(
            f"`{o.shown_command}` {o.seconds:.0f} s, ended {o.finished}" for o in outcomes),
        "",
        "## Targets", "",
        f"{met} of {len(targets)} met.", "",
        "| Benchmark | Target | Measured | Rule | Verdict | From |",
        "|---|---|---:|---|---|---|",
    ]
    for bench, t in targets:
        lines.append(f"| {bench.name} | {t.what} | {t.shown} | {t.rule} | "
                     f"**{verdict(t.met)}** | {t.source} |")
    failed = [o for o in outcomes if o.result is None]
    if failed:
        lines += ["", "**Failed:** " + ", ".join(o.bench.name for o in failed)]
    for o in outcomes:
        earlier = " (*earlier run*)" if o.reused else ""
        lines += ["", f"## {o.bench.title}", "",
                  f"`{o.shown_command}`, {o.seconds:.0f} s, ended {o.finished}{earlier}", ""]
        if o.result is None:
            tail = o.log.read_text(errors="replace").splitlines()[-15:]
            lines += [f"Failed with exit code {o.code}. End of its log:", "", "```",
                      *tail, "```"]
            continue
        section = demote(o.result.markdown, machine)
        image = images.get(o.bench.name)
        if image:
            at = next((i for i, line in enumerate(section) if line.startswith("### Targets")),
                      len(section))
            section[at:at] = [image, ""]
        lines += section
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0]
                                     if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run, a few minutes (default output build/bench/quick/)")
    parser.add_argument("--only", action="append", choices=NAMES, metavar="NAME",
                        help=f"run only these ({', '.join(NAMES)}); repeatable")
    parser.add_argument("--reuse", action="store_true",
                        help="with --only: take the other benchmarks' last successful results "
                        "from build/bench/MODE/ (marked as from an earlier run)")
    parser.add_argument("--out", type=Path, help="markdown file; the PNGs go next to it (default "
                        "docs/BENCHMARKS.md, with --quick build/bench/quick/BENCHMARKS.md)")
    args = parser.parse_args(argv)
    out: Path = args.out or (BUILD / "quick" / "BENCHMARKS.md" if args.quick
                             else REPO / "docs" / "BENCHMARKS.md")
    chosen = [b for b in BENCHES if not args.only or b.name in args.only]
    command = shlex.join(["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])])
    signal.signal(signal.SIGTERM, _terminate)
    started = datetime.datetime.now(datetime.UTC)
    load_start, clock = load_average(), time.perf_counter()
    work = BUILD / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    outcomes: list[Outcome] = []
    columns = (SpinnerColumn(), TextColumn("[bold]{task.fields[name]:<13}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"))
    try:
        with Progress(*columns, console=console) as progress:
            overall = progress.add_task("", total=len(chosen), name="all benchmarks")
            for bench in BENCHES:
                if bench not in chosen:
                    earlier = Outcome.load(bench, work) if args.reuse else None
                    if earlier is not None:
                        outcomes.append(earlier)
                    continue
                outcomes.append(run_one(bench, args.quick, work, progress))
                progress.advance(overall)
                if not console.is_terminal:  # no live display: one line per benchmark
                    o = outcomes[-1]
                    console.print(f"{bench.name}: {'done' if o.result else 'FAILED'} in "
                                  f"{o.seconds:.0f} s (log {o.log})")
    except KeyboardInterrupt:
        console.print("interrupted; nothing written")
        return 130
    out.parent.mkdir(parents=True, exist_ok=True)
    images = plots(outcomes, out.parent)
    out.write_text(render(outcomes, args.quick, command, started, load_start,
                          time.perf_counter() - clock, images), encoding="utf-8")
    console.print(f"wrote {out}" + (f" and {len(images)} plot(s) next to it" if images else ""))
    return 0 if all(o.result for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
