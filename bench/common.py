"""What every benchmark shares: the command line, the run-and-report loop, targets.

Each ``bench_*`` module builds its parser with :func:`parser`, then hands a body to
:func:`run`, which quiets the services' logs, turns SIGTERM into the same clean unwind as
Ctrl-C (servers stopped, temp folders removed), prints the markdown report on stdout and
writes ``--out``. ``python -m bench`` passes ``--json FILE`` to collect the targets and
raw samples (for plots) without parsing markdown.

This module stays light on purpose: ``bench_health``'s parent process must keep its peak
RSS below its children's, so nothing heavier than the standard library is imported here.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WARNING = 30  # logging.WARNING, without importing logging (see the module docstring)


def log(msg: str) -> None:
    """Progress on stderr, prefixed so ``python -m bench`` can show the latest line."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def ops_per_second(fn: Callable[[], object], seconds: float, rounds: int) -> float:
    """Median over ``rounds`` of calls per second, each round running ``seconds``."""
    batch = 50
    rates = []
    for _ in range(rounds):
        gc.collect()
        done = 0
        start = time.perf_counter()
        while True:
            for _ in range(batch):
                fn()
            done += batch
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        rates.append(done / elapsed)
    return statistics.median(rates)


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def python_line() -> str:
    return (f"{platform.python_implementation()} {platform.python_version()} "
            f"({platform.system()} {platform.release()}, {platform.machine()})")


def machine_info() -> list[str]:
    """Markdown bullet lines: Python, nats-server, CPUs and the libraries that matter."""
    from importlib.metadata import version

    from broker.server import server_version  # imported here: see the module docstring

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count() or 0
    return [
        f"- Python: {python_line()}",
        f"- nats-server: {server_version()}",
        f"- CPUs: {os.cpu_count()} (usable by this process: {affinity})",
        f"- nats-py {version('nats-py')}, PyNaCl {version('pynacl')}, "
        f"pydantic {version('pydantic')}",
    ]


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


@dataclass(frozen=True)
class Target:
    """One target from the issues, with the figure measured against it."""

    what: str
    value: float
    limit: float
    at_most: bool  # the value must be <= limit (else >= limit)
    source: str = ""  # where the target comes from, e.g. "issue 2"

    @property
    def met(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    @property
    def rule(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.limit:,g}"

    @property
    def shown(self) -> str:
        """The measured value: two decimals for ratios, whole numbers for rates."""
        return f"{self.value:,.0f}" if abs(self.value) >= 100 else f"{self.value:,.2f}"

    def line(self) -> str:
        return f"- {self.what} = {self.shown} (target {self.rule}): **{verdict(self.met)}**"


@dataclass
class Result:
    """What one benchmark hands back: its markdown report, the targets it checked and
    raw samples for plots (name -> values)."""

    markdown: str
    targets: list[Target] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"markdown": self.markdown,
                           "targets": [asdict(t) for t in self.targets],
                           "samples": self.samples})

    @classmethod
    def from_json(cls, text: str) -> Result:
        data = json.loads(text)
        return cls(data["markdown"], [Target(**t) for t in data["targets"]], data["samples"])


def parser(prog: str, doc: str | None, *, quick: str | None = None) -> argparse.ArgumentParser:
    """The common options: ``--out``, the suite's hidden ``--json`` and, when the bench has
    a smoke mode, ``--quick`` (``quick`` is its help text)."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}",
                                description=doc.splitlines()[0] if doc else None)
    if quick is not None:
        p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--out", type=Path, help="also write the report to this .md file")
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # for python -m bench
    return p


def quiet_logs(level: int = WARNING) -> None:
    """The services log every request at info; only the report belongs on stdout."""
    import logging

    import structlog

    # asyncio's SSL transport warns when nats-py closes a TLS connection; not our concern
    logging.getLogger("asyncio").addFilter(lambda r: "eof_received" not in r.getMessage())
    logging.getLogger("asyncio").setLevel(logging.ERROR)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level),
                        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the benches' cleanup


def run(args: argparse.Namespace, body: Callable[[], Result | Coroutine[Any, Any, Result]], *,
        log_level: int | None = WARNING) -> int:
    """Run one benchmark: the body returns a :class:`Result` (or a coroutine for one).
    Exit 130 after Ctrl-C or SIGTERM, once the body's own cleanup has run."""
    if log_level is not None:
        quiet_logs(log_level)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        outcome = body()
        if isinstance(outcome, Coroutine):
            import asyncio  # imported here: it loads ssl, 10 MiB (see the module docstring)

            outcome = asyncio.run(outcome)
        result = outcome
    except KeyboardInterrupt:
        log("interrupted; servers stopped and temp files removed")
        return 130
    print(result.markdown, end="" if result.markdown.endswith("\n") else "\n")
    for path, text in ((args.out, result.markdown), (args.json, result.to_json())):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            log(f"wrote {path}")
    return 0
