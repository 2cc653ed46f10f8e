"""Finding new exports in the folder, parsing them off the event loop, and merging what
they hold into the agent's KV state.

Each file is identified by a fingerprint (name, size, modification time and a hash of
its first and last 64 KiB); once processed, an ``export.<fingerprint>`` mark makes every
later poll skip it without reading it again. A file that fails is marked too, with the
reason, so a broken 2 GB export is not re-parsed every five minutes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from agents.health.autoexport import read_autoexport
from agents.health.harvest import Harvest
from agents.health.parser import ExportError, read_export
from agents.health.settings import MIB, HealthSettings
from agents.health.stored import (
    DAY_PREFIX,
    EXPORT_PREFIX,
    META,
    DayData,
    ExportMark,
    Meta,
    day_key,
)
from agents.runtime import State, load_model, save_model

EDGE_BYTES = 64 * 1024
MAX_DEPTH = 2
Kind = Literal["xml", "zip", "json"]
_locks: weakref.WeakKeyDictionary[State, asyncio.Lock] = weakref.WeakKeyDictionary()


@dataclass
class IngestReport:
    parsed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)  # too big to parse inside a request
    skipped: int = 0  # already processed
    busy: bool = False  # another ingest was running; nothing was done


def kind_of(path: Path) -> Kind | None:
    suffix = path.suffix.lower()
    if path.name == "export.xml":
        return "xml"
    return "zip" if suffix == ".zip" else "json" if suffix == ".json" else None


def candidates(root: Path, depth: int = MAX_DEPTH) -> list[Path]:
    """Export files under ``root`` (symbolic links are not followed), oldest first."""
    return [path for _, path in sorted(_walk(root, depth))]


def _walk(root: Path, depth: int) -> list[tuple[int, Path]]:
    found: list[tuple[int, Path]] = []
    try:
        for entry in root.iterdir():
            if entry.name.startswith(".") or entry.is_symlink():
                continue
            if entry.is_dir() and depth > 1:
                found += _walk(entry, depth - 1)
            elif entry.is_file() and kind_of(entry) is not None:
                found.append((entry.stat().st_mtime_ns, entry))
    except OSError:
        pass  # unreadable, or changed while listing: the next poll sees it
    return found


def fingerprint(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    with path.open("rb") as stream:
        digest.update(stream.read(EDGE_BYTES))
        if stat.st_size > EDGE_BYTES:
            stream.seek(max(EDGE_BYTES, stat.st_size - EDGE_BYTES))
            digest.update(stream.read(EDGE_BYTES))
    return digest.hexdigest()


def read_file(path: Path, settings: HealthSettings) -> Harvest:
    """Parse one file (blocking: run it in a thread)."""
    if kind_of(path) == "json":
        return read_autoexport(path, max_bytes=settings.max_json_mb * MIB)
    return read_export(path, retention_days=settings.retention_days,
                       max_bytes=settings.max_export_mb * MIB)


async def ingest(state: State, settings: HealthSettings, log: Any, *,
                 inline: bool = False) -> IngestReport:
    """Process the files not seen before. ``inline`` (inside a request): never wait for
    another ingest, and leave files above ``inline_parse_mb`` to the poll."""
    lock = _locks.setdefault(state, asyncio.Lock())
    if inline and lock.locked():
        return IngestReport(busy=True)
    async with lock:
        return await _ingest(state, settings, log, inline)


async def _ingest(state: State, settings: HealthSettings, log: Any,
                  inline: bool) -> IngestReport:
    report = IngestReport()
    files = await asyncio.to_thread(_fingerprints, settings.export_dir)
    for path, (fp, size) in files.items():
        if await state.get(EXPORT_PREFIX + fp) is not None:
            report.skipped += 1
            continue
        if inline and size > settings.inline_parse_mb * MIB:
            report.deferred.append(path.name)
            continue
        await _process(state, settings, log, path, fp, size, report)
    present = {EXPORT_PREFIX + fp for fp, _ in files.values()}
    for key in await state.keys(EXPORT_PREFIX):
        if key not in present:
            await state.delete(key)  # the file is gone; forget it
    if report.parsed:
        await _prune(state, settings)
    return report


def _fingerprints(root: Path) -> dict[Path, tuple[str, int]]:
    prints = {}
    for path in candidates(root):
        try:
            prints[path] = fingerprint(path), path.stat().st_size
        except OSError:
            continue  # vanished or unreadable between listing and reading; next poll
    return prints


async def _process(state: State, settings: HealthSettings, log: Any, path: Path, fp: str,
                   size: int, report: IngestReport) -> None:
    kind = kind_of(path) or "xml"
    began = time.perf_counter()
    try:
        harvest = await asyncio.to_thread(read_file, path, settings)
    except (ExportError, OSError) as exc:
        reason = str(exc)[:300] if isinstance(exc, ExportError) else type(exc).__name__
        log.warning("health.export_refused", file=path.name, kind=kind, reason=reason)
        report.failed.append(path.name)
        await save_model(state, EXPORT_PREFIX + fp, ExportMark(
            name=path.name, kind=kind, size=size, parsed_at=datetime.now(UTC),
            seconds=round(time.perf_counter() - began, 3), error=reason))
        return
    days = await _merge(state, settings, harvest)
    seconds = round(time.perf_counter() - began, 3)
    records = harvest.counts["steps"] + harvest.counts["hrv"] + harvest.counts["workouts"]
    await save_model(state, EXPORT_PREFIX + fp, ExportMark(
        name=path.name, kind=kind, size=size, parsed_at=datetime.now(UTC), seconds=seconds,
        days=days, records=records))
    report.parsed.append(path.name)
    log.info("health.export_read", file=path.name, kind=kind, mib=round(size / MIB, 1),
             seconds=seconds, days=days, records=records,
             invalid=harvest.counts["invalid"])


async def _merge(state: State, settings: HealthSettings, harvest: Harvest) -> int:
    """Write the harvest's days into KV; returns how many days were written."""
    coverage = harvest.coverage
    meta = await load_model(state, META, Meta)
    if coverage is not None and (meta is None or coverage.minute > meta.coverage_minute):
        meta = Meta(coverage_minute=coverage.minute, offset=coverage.offset)
        await save_model(state, META, meta)
    cutoff = _cutoff(meta, settings)
    written = 0
    for n, acc in sorted(harvest.days.items()):
        new = DayData.from_acc(n, acc, coverage)
        if new.day.isoformat() < cutoff:
            continue
        old = await load_model(state, day_key(new.day), DayData)
        await save_model(state, day_key(new.day), old.merged(new) if old else new)
        written += 1
    return written


def _cutoff(meta: Meta | None, settings: HealthSettings) -> str:
    if meta is None:
        return ""
    newest = datetime(1970, 1, 1) + timedelta(minutes=meta.coverage_minute)
    return (newest.date() - timedelta(days=settings.retention_days)).isoformat()


async def _prune(state: State, settings: HealthSettings) -> None:
    cutoff = _cutoff(await load_model(state, META, Meta), settings)
    for key in await state.keys(DAY_PREFIX):
        if key.removeprefix(DAY_PREFIX) < cutoff:
            await state.delete(key)
