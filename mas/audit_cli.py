"""`mas audit`: verify, follow, export and report on the audit log.

Reads the ``MAS_AUDIT`` stream as the operator, whose grants on it are read-only
(consumers and message gets; never update, delete or purge). ``verify`` and ``export``
work on the records' stored bytes, so an exported file verifies exactly like the stream
(``mas audit verify --input FILE``). Checkpoints outside the stream are read from
``--checkpoints``, ``$MAS_AUDIT_CHECKPOINTS`` or ``data/audit/checkpoints.jsonl``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import json
import os
import re
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Literal

import nats.errors
import nats.js.errors
import typer
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from broker import connection
from broker import subjects as subj
from broker.errors import BrokerError
from broker.secrets import load_identity, load_trust
from mas.project import Project, find_project
from orchestrator import checkpoint as cp
from orchestrator.audit_verify import CHUNK, Report, Verifier
from protocol.audit import AuditRecord
from security.keys import KeyRing

out = Console(highlight=False, soft_wrap=True)
audit_app = typer.Typer(help="Verify, follow, export and report on the audit log.",
                        no_args_is_help=True)
RootOption = Annotated[
    Path | None, typer.Option("--root", help="Project folder (default: nearest policy.yaml).")
]
SinceOption = Annotated[
    str | None, typer.Option("--since", help="Start time: ISO date/time (UTC unless it says "
                             "otherwise) or an age like 30m, 24h, 7d.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
_AGE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
IDLE_S = 2.0
PARALLEL_FROM = 20_000  # records
FETCH = 1000


def parse_since(text: str | None) -> float | None:
    """Seconds since the epoch for ``--since``; BrokerError with the fix if unreadable."""
    if text is None:
        return None
    text = text.strip()
    age = _AGE.match(text)
    if age:
        return dt.datetime.now(dt.UTC).timestamp() - int(age[1]) * _UNITS[age[2]]
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise BrokerError(f"--since {text!r} is not a date or an age; use e.g. 2026-11-01, "
                          "2026-11-01T08:00 or 24h") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _url(project: Project) -> str:
    return os.environ.get("MAS_BROKER_URL") or f"tls://{project.policy().broker.listen}"


def orchestrator_ring(project: Project) -> KeyRing:
    return load_trust(project.secrets).sender_rings().get("orchestrator", KeyRing())


def checkpoint_notes(project: Project, path: Path | None) -> tuple[Path | None, list[str]]:
    """The checkpoint file to check against and its notes; an explicit path must exist."""
    if path is None:
        path = cp.default_file() or project.data_dir / "audit" / "checkpoints.jsonl"
        if not path.is_file():
            return None, []
    elif not path.is_file():
        raise BrokerError(f"checkpoint file {path} does not exist; pass the file the "
                          f"orchestrator writes (${cp.CHECKPOINTS_ENV})")
    try:
        return path, cp.read_notes(path)
    except cp.CheckpointError as exc:
        raise BrokerError(str(exc)) from None


class StreamReader:
    """Records from the stream in order, with the operator's read-only grants: a pull
    consumer to read up to the current end, an ordered push consumer to follow it."""

    def __init__(self, client: connection.BrokerClient) -> None:
        self.client = client
        self.js = client.nc.jetstream(timeout=5)

    async def last_seq(self) -> int:
        try:
            info = await self.js.stream_info(subj.AUDIT_STREAM)
        except nats.js.errors.NotFoundError:
            raise BrokerError("there is no audit stream yet; has the orchestrator run "
                              "(`mas orchestrator run`)?") from None
        return int(info.state.last_seq or 0)

    async def records(self, *, since: float | None = None, start_seq: int = 1,
                      follow: bool = False) -> AsyncIterator[tuple[int, bytes]]:
        last = await self.last_seq()
        if not follow and (last == 0 or start_seq > last):
            return
        if since is not None:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                    opt_start_time=dt.datetime.fromtimestamp(since, dt.UTC))
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                    opt_start_seq=start_seq)
        if not follow:
            async for item in self._fetch(config, last):
                yield item
            return
        sub = await self.js.subscribe(subj.AUDIT_SUBJECTS, stream=subj.AUDIT_STREAM,
                                      ordered_consumer=True, config=config,
                                      inactive_threshold=30.0)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=IDLE_S)
                except nats.errors.TimeoutError:
                    continue  # following: wait for the next record
                yield msg.metadata.sequence.stream, msg.data
        finally:
            await sub.unsubscribe()

    async def _fetch(self, config: ConsumerConfig, last: int
                     ) -> AsyncIterator[tuple[int, bytes]]:
        """Up to ``last`` in batches through a pull consumer (many times faster than a
        push consumer for reading a long log once). No acks; the server drops the
        consumer when idle, as the operator may not delete consumers on this stream."""
        config.ack_policy = AckPolicy.NONE
        config.inactive_threshold = 30.0
        config.mem_storage = True
        sub = await self.js.pull_subscribe(subj.AUDIT_SUBJECTS, stream=subj.AUDIT_STREAM,
                                           config=config)
        try:
            while True:
                try:
                    batch = await sub.fetch(FETCH, timeout=IDLE_S)
                except nats.errors.TimeoutError:
                    return  # nothing more after the requested point
                for msg in batch:
                    seq = msg.metadata.sequence.stream
                    yield seq, msg.data
                    if seq >= last:
                        return
        finally:
            await sub.unsubscribe()


async def _operator(project: Project) -> connection.BrokerClient:
    return await connection.connect(load_identity(project.secrets, "operator"), _url(project),
                                    max_reconnect_attempts=0)


def _read_export(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        for line in f:
            line = line.rstrip(b"\n")
            if line:
                yield line


def _progress(total: int | None, enabled: bool) -> Progress:
    return Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True),
                    disable=not enabled or total is None or total < 10_000, transient=True)


async def _verify_stream(project: Project, verifier: Verifier, show_progress: bool,
                         keep: Callable[[bytes], None] | None = None) -> None:
    """Feed the whole stream to ``verifier`` a chunk at a time (and each record to ``keep``)."""
    client = await _operator(project)
    try:
        reader = StreamReader(client)
        total = await reader.last_seq()
        with _progress(total, show_progress) as bar:
            task = bar.add_task("verify", total=total)
            if total < PARALLEL_FROM:
                verifier.jobs = min(verifier.jobs, 1)
            verifier.progress = lambda n: bar.advance(task, n)
            chunk: list[bytes] = []
            async for _, raw in reader.records():
                chunk.append(raw)
                if keep is not None:
                    keep(raw)
                if len(chunk) >= CHUNK:
                    verifier.feed(chunk)
                    chunk = []
            verifier.feed(chunk)
            verifier.finish()
    finally:
        await client.close()


def run_verify(project: Project, source: Path | None, checkpoints: Path | None, jobs: int,
               show_progress: bool, keep: Callable[[bytes], None] | None = None, *,
               trust_checkpoints: bool = False) -> tuple[Report, Path | None]:
    ring = orchestrator_ring(project)
    file_path, notes = checkpoint_notes(project, checkpoints)
    if source is not None and not source.is_file():
        raise BrokerError(f"{source} does not exist; export one with `mas audit export`")
    if jobs <= 0:  # signature workers pay off only on long logs (each costs a process start)
        long_log = source is not None and source.stat().st_size > PARALLEL_FROM * 600
        jobs = (os.cpu_count() or 1) if long_log or source is None else 1
    verifier = Verifier(ring, notes, jobs=jobs, trust_checkpoints=trust_checkpoints)
    if source is None:
        asyncio.run(_verify_stream(project, verifier, show_progress, keep))
        return verifier.report, file_path
    with _progress(None, show_progress):
        return verifier.run(_read_export(source)), file_path


@audit_app.command("verify")
def verify_cmd(
    root: RootOption = None,
    input_file: Annotated[Path | None, typer.Option(
        "--input", help="Verify an exported JSON-lines file instead of the stream.")] = None,
    checkpoints: Annotated[Path | None, typer.Option(
        "--checkpoints", help="The orchestrator's checkpoint file.")] = None,
    jobs: Annotated[int, typer.Option(help="Processes checking signatures (0: one per CPU "
                                      "on long logs).")] = 0,
    trust_checkpoints: Annotated[bool, typer.Option(
        "--trust-checkpoints", help="Fast mode: check the signatures of the records after "
        "the last signed checkpoint only; earlier records are covered by its signature "
        "through the hash links. Links, gaps and checkpoints are still all checked.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Check every signature and link, that no record is missing, and the checkpoints;
    on failure say which record is the first bad one and why (exit 1)."""
    project = find_project(root)
    report, file_path = run_verify(project, input_file, checkpoints, jobs,
                                   sys.stderr.isatty() and not as_json,
                                   trust_checkpoints=trust_checkpoints)
    first = report.first
    if as_json:
        typer.echo(json.dumps({
            "ok": report.ok, "records": report.records, "last_seq": report.last_seq,
            "head": report.head, "checkpoints": report.checkpoints,
            "file_checkpoints": report.file_checkpoints,
            "checkpoint_file": str(file_path) if file_path else None,
            "first_bad_seq": first.seq if first else None,
            "reason": first.reason if first else None,
            "problems": [{"seq": p.seq, "reason": p.reason} for p in report.problems]}))
    elif first is None:
        where = (f", {report.file_checkpoints} in {file_path}" if file_path
                 else "; no checkpoint file to compare with")
        out.print(f"audit log verified: {report.records} records, {report.checkpoints} "
                  f"checkpoints{where}; head {report.head[:16]}")
    else:
        typer.echo(f"mas: audit log FAILED verification at record {first.seq}: "
                   f"{first.reason}", err=True)
        for problem in sorted(report.problems, key=lambda p: p.seq)[1:6]:
            typer.echo(f"  also record {problem.seq}: {problem.reason}", err=True)
    if first is not None:
        raise typer.Exit(1)


def _parse(raw: bytes) -> AuditRecord | None:
    try:
        return AuditRecord.model_validate_json(raw)
    except ValidationError:
        return None


def _line(record: AuditRecord) -> str:
    when = dt.datetime.fromtimestamp(record.ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    code = f" [{record.code}]" if record.code else ""
    trace = f" trace={record.trace_id[:8]}" if record.trace_id else ""
    wf = f" wf={record.workflow_id}" if record.workflow_id else ""
    return (f"{when} #{record.seq} {record.kind} {record.identity} {record.action} "
            f"{record.outcome}{code}{wf}{trace}")


@audit_app.command("tail")
def tail_cmd(
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new records.")]
    = False,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this identity.")] = None,
    action: Annotated[str | None, typer.Option("--action", help="Only this action.")] = None,
    lines: Annotated[int, typer.Option("-n", "--lines", help="How many past records.")] = 20,
    root: RootOption = None,
    as_json: JsonOption = False,
) -> None:
    """The latest records (and with -f, every new one), readable or as JSON lines."""
    project = find_project(root)

    async def main() -> None:
        client = await _operator(project)
        try:
            reader = StreamReader(client)
            start = max(1, await reader.last_seq() - max(0, lines) + 1)
            if not lines and follow:
                start = await reader.last_seq() + 1
            async for _, raw in reader.records(start_seq=start, follow=follow):
                record = _parse(raw)
                if record is None or (agent and record.identity != agent) or (
                        action and record.action != action):
                    continue
                typer.echo(raw.decode() if as_json else _line(record))
        finally:
            await client.close()

    asyncio.run(main())


@audit_app.command("export")
def export_cmd(
    since: SinceOption = None,
    output: Annotated[Path | None, typer.Option("--output", "-o",
                                                help="File to write (default: stdout).")] = None,
    root: RootOption = None,
) -> None:
    """Records as JSON lines, byte for byte as stored (so the file verifies)."""
    project = find_project(root)
    start = parse_since(since)

    async def main() -> int:
        client = await _operator(project)
        count = 0
        target = output.open("wb") if output else sys.stdout.buffer
        try:
            async for _, raw in StreamReader(client).records(since=start):
                target.write(raw + b"\n")
                count += 1
        finally:
            if output:
                target.close()
            else:
                target.flush()
            await client.close()
        return count

    count = asyncio.run(main())
    if output:
        out.print(f"exported {count} records to {output}")


def build_report(records: list[AuditRecord], verified: Report, since: float | None,
                 fmt: Literal["md", "html"]) -> str:
    """A compliance report: actions by agent, approvals, tokens, violations and alerts,
    and whether the whole log verified."""
    actions = Counter((r.identity, r.action, r.outcome) for r in records if r.kind == "command"
                      and r.outcome != "pending")
    approvals = [r for r in records if r.kind == "approval_decided"]
    tokens = Counter((r.kind, r.outcome) for r in records
                     if r.kind in ("token_issued", "token_request", "revocation"))
    incidents = [r for r in records if r.kind in ("violation", "auth_failure", "alert")]
    period = (dt.datetime.fromtimestamp(since, dt.UTC).isoformat(timespec="seconds")
              if since is not None else "the beginning")
    first = verified.first
    status = (f"verified: {verified.records} records, {verified.checkpoints} checkpoints, "
              f"{verified.file_checkpoints} in the checkpoint file" if first is None else
              f"FAILED at record {first.seq}: {first.reason}")
    sections: list[tuple[str, list[str], list[list[str]]]] = [
        ("Actions by agent", ["agent", "action", "outcome", "count"],
         [[a, b, c, str(n)] for (a, b, c), n in sorted(actions.items())]),
        ("Approvals", ["time", "approval", "by", "outcome", "reason"],
         [[_when(r.ts), r.action, r.identity, r.outcome, str(r.detail.get("reason") or r.code)]
          for r in approvals]),
        ("Tokens and revocations", ["kind", "outcome", "count"],
         [[k, o, str(n)] for (k, o), n in sorted(tokens.items())]),
        ("Violations and alerts", ["time", "kind", "identity", "action", "subject"],
         [[_when(r.ts), r.kind, r.identity, r.action, str(r.detail.get("subject", ""))]
          for r in incidents]),
    ]
    title = "Audit report"
    intro = [f"Period: from {period} to now ({len(records)} records).",
             f"Log integrity: {status}."]
    if fmt == "md":
        text = [f"# {title}", "", *(f"{line}  " for line in intro), ""]
        for name, head, rows in sections:
            text += [f"## {name}", ""]
            if not rows:
                text += ["None.", ""]
                continue
            text += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            text += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
                     for row in rows]
            text.append("")
        return "\n".join(text)
    body = [f"<h1>{title}</h1>", *(f"<p>{html.escape(line)}</p>" for line in intro)]
    for name, head, rows in sections:
        body.append(f"<h2>{html.escape(name)}</h2>")
        if not rows:
            body.append("<p>None.</p>")
            continue
        body.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
                    + "</tr>")
        body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                 for row in rows]
        body.append("</table>")
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>Audit report</title>"
            "</head><body>" + "\n".join(body) + "</body></html>\n")


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@audit_app.command("report")
def report_cmd(
    since: SinceOption = None,
    fmt: Annotated[str, typer.Option("--format", help="md or html.")] = "md",
    output: Annotated[Path | None, typer.Option("--output", "-o",
                                                help="File to write (default: stdout).")] = None,
    checkpoints: Annotated[Path | None, typer.Option(
        "--checkpoints", help="The orchestrator's checkpoint file.")] = None,
    root: RootOption = None,
) -> None:
    """A compliance report for a period, including whether the whole log verified."""
    if fmt not in ("md", "html"):
        raise BrokerError(f"--format {fmt!r} is not supported; use md or html")
    project = find_project(root)
    start = parse_since(since)
    records: list[AuditRecord] = []

    def keep(raw: bytes) -> None:
        record = _parse(raw)
        if record is not None and (start is None or record.ts >= start):
            records.append(record)

    verified, _ = run_verify(project, None, checkpoints, 1, False, keep)
    text = build_report(records, verified, start, "md" if fmt == "md" else "html")
    if output:
        output.write_text(text, encoding="utf-8")
        out.print(f"wrote {output}")
    else:
        typer.echo(text)
