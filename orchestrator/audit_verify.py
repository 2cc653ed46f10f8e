"""Verify an audit log: every signature, every link, no gaps, checkpoints consistent.

Works on the records' stored bytes (the canonical JSON the writer published), so the
stream, an exported JSON-lines copy and a benchmark's generated log go through the same
code. A record's hash is SHA-256 of those bytes; its signed bytes are the same text
without the ``"sig"`` member (canonical JSON sorts keys, so removing that one member
gives exactly what was signed, and any other difference fails the signature).

Signatures dominate the cost (Ed25519 verification), so they can be checked in worker
processes while the main process follows the chain; ``jobs`` sets how many.

``trust_checkpoints`` is the fast mode for a long log on a small machine: a record
before a signed checkpoint whose head matches the chain is already authenticated by
that signature through the hash links (its hash, signature included, is in every
later ``prev_hash`` up to the checkpoint), as in a transparency log; only the records
after the last such checkpoint have their own signatures checked. Every link, gap and
checkpoint is still checked. The default checks every record's signature.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

from orchestrator import checkpoint as cp
from orchestrator.audit import DOMAIN, GENESIS
from security.encoding import b64url_decode
from security.keys import KeyRing, VerifyKey

CHUNK = 2048
MAX_UNCOVERED = 10_000  # fast mode: records held for a checkpoint before checking them anyway
MAX_PROBLEMS = 50


@dataclass(frozen=True)
class Problem:
    seq: int
    reason: str


@dataclass
class Report:
    records: int = 0
    last_seq: int = 0
    head: str = GENESIS
    checkpoints: int = 0
    file_checkpoints: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return min(self.problems, key=lambda p: p.seq) if self.problems else None


def _signature_problem(raw: bytes, keys: dict[str, VerifyKey],
                       record: dict[str, object] | None = None) -> str | None:
    try:
        if record is None:
            record = json.loads(raw)
        sig_text, kid = record["sig"], record["kid"]
        if not isinstance(sig_text, str) or not isinstance(kid, str):
            raise TypeError("not text")
        sig = b64url_decode(sig_text)
    except (ValueError, KeyError, TypeError):
        return "record has no readable signature"
    key = keys.get(kid)
    if key is None:
        return f"signed with key {kid!r}, which is not a trusted orchestrator key"
    member = b',"sig":"' + sig_text.encode() + b'"'
    if raw.count(member) != 1:
        return "signature member is not where canonical JSON puts it"
    if not key.verify(DOMAIN + raw.replace(member, b"", 1), sig):
        return "signature does not match the record (changed after signing, or a foreign key)"
    return None


_worker_keys: dict[str, VerifyKey] = {}


def _init_worker(raw_keys: list[bytes]) -> None:
    _worker_keys.clear()
    for raw in raw_keys:
        key = VerifyKey(raw)
        _worker_keys[key.kid] = key


def _check_chunk(raws: list[bytes]) -> tuple[int, str] | None:
    """First signature problem in a chunk as (index, reason); runs in a worker."""
    for index, raw in enumerate(raws):
        reason = _signature_problem(raw, _worker_keys)
        if reason is not None:
            return index, reason
    return None


class Verifier:
    """Feed records in stream order; ``report`` says what is wrong, first problem first."""

    def __init__(self, ring: KeyRing, file_notes: Iterable[str] = (), *, jobs: int = 1,
                 progress: Callable[[int], None] | None = None,
                 trust_checkpoints: bool = False) -> None:
        self.ring = ring
        self.trust_checkpoints = trust_checkpoints
        # fast mode: records whose signatures wait for a checkpoint to cover them
        self._uncovered: list[tuple[int, bytes, dict[str, object]]] = []
        self.keys = {key.kid: key for key in ring}
        self.jobs = jobs
        self.progress = progress
        self.report = Report()
        self.expected = 1
        self._pool: ProcessPoolExecutor | None = None
        self._pending: list[tuple[Future[tuple[int, str] | None], list[int]]] = []
        self.file_heads: dict[int, str] = {}
        for index, note in enumerate(file_notes, 1):
            try:
                checkpoint = cp.open_note(note, ring)
            except cp.CheckpointError as exc:
                self._problem(0, f"checkpoint file entry {index}: {exc}")
                continue
            self.report.file_checkpoints += 1
            if self.file_heads.get(checkpoint.size, checkpoint.head) != checkpoint.head:
                self._problem(checkpoint.size, "checkpoint file holds two different heads "
                              f"for size {checkpoint.size}")
            self.file_heads[checkpoint.size] = checkpoint.head

    def _problem(self, seq: int, reason: str) -> None:
        if len(self.report.problems) < MAX_PROBLEMS:
            self.report.problems.append(Problem(seq, reason))

    def _link(self, raw: bytes) -> tuple[int, dict[str, object]]:
        """Check one record's place in the chain; returns its sequence number (or the
        expected one when unreadable) and the parsed record."""
        report = self.report
        record: dict[str, object]
        try:
            record = json.loads(raw)
            seq = record["seq"]
            prev = record["prev_hash"]
        except (ValueError, KeyError, TypeError):
            seq = self.expected
            self._problem(seq, "record is not valid audit JSON")
            record, prev = {}, None
        if not isinstance(seq, int):
            seq = self.expected
            self._problem(seq, "record has no sequence number")
        elif seq > self.expected:
            self._problem(self.expected, f"expected record {self.expected} here, found {seq}: "
                          "records are missing or out of order")
        elif seq < self.expected:
            self._problem(seq, f"record {seq} is out of order (expected {self.expected})")
        elif prev != report.head:
            self._problem(seq, f"prev_hash does not match the hash of record {seq - 1}")
        if record.get("kind") == "checkpoint" and self._checkpoint_record(seq, record):
            # the signed head covers every record before this one
            self._uncovered = [item for item in self._uncovered if item[0] >= seq]
        expected_head = self.file_heads.get(seq)
        head = hashlib.sha256(raw).hexdigest()
        if expected_head is not None and expected_head != head:
            self._problem(seq, f"record {seq} differs from the checkpoint file's head for "
                          f"size {seq}")
        report.head = head
        report.records += 1
        report.last_seq = seq
        self.expected = max(self.expected, seq) + 1
        return seq, record

    def _checkpoint_record(self, seq: int, record: dict[str, object]) -> bool:
        """True when the checkpoint is validly signed and matches the chain so far."""
        detail = record.get("detail")
        note = detail.get("note") if isinstance(detail, dict) else None
        if not isinstance(note, str):
            self._problem(seq, "checkpoint record holds no note")
            return False
        try:
            checkpoint = cp.open_note(note, self.ring)
        except cp.CheckpointError as exc:
            self._problem(seq, f"checkpoint: {exc}")
            return False
        self.report.checkpoints += 1
        if checkpoint.size != seq - 1 or checkpoint.head != self.report.head:
            self._problem(seq, f"checkpoint for size {checkpoint.size} does not match the "
                          f"records before it")
            return False
        return True

    def run(self, raws: Iterable[bytes]) -> Report:
        try:
            for chunk in _chunks(raws):
                self.feed(chunk)
        finally:
            report = self.finish()
        return report

    def feed(self, chunk: list[bytes]) -> None:
        """Check the next records in stream order (any number; a few thousand at a time
        keeps the worker processes busy)."""
        if self.trust_checkpoints:
            for raw in chunk:
                problems = len(self.report.problems)
                seq, record = self._link(raw)
                self._uncovered.append((seq, raw, record))
                if len(self.report.problems) > problems:
                    # a broken link: the signatures of this record and the one before
                    # tell which of the two was changed
                    self._check_uncovered(last=2)
            if len(self._uncovered) > MAX_UNCOVERED:
                self._check_uncovered()
            if self.progress is not None:
                self.progress(len(chunk))
            return
        if self.jobs <= 1:
            for raw in chunk:
                seq, record = self._link(raw)
                reason = _signature_problem(raw, self.keys, record or None)
                if reason is not None:
                    self._problem(seq, reason)
            if self.progress is not None:
                self.progress(len(chunk))
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.jobs, initializer=_init_worker,
                                             initargs=([k.raw for k in self.ring],))
        future = self._pool.submit(_check_chunk, chunk)
        self._pending.append((future, [self._link(raw)[0] for raw in chunk]))
        while len(self._pending) > self.jobs * 4 or (
                self._pending and self._pending[0][0].done()):
            self._collect(*self._pending.pop(0))

    def _check_uncovered(self, last: int | None = None) -> None:
        """Check the signatures of the uncovered records (only the ``last`` few if given)."""
        keep = self._uncovered[:-last] if last else []
        for seq, raw, record in self._uncovered[len(keep):]:
            reason = _signature_problem(raw, self.keys, record or None)
            if reason is not None:
                self._problem(seq, reason)
        self._uncovered = keep

    def finish(self) -> Report:
        """Wait for the signature checks still running and check the end of the log."""
        self._check_uncovered()
        while self._pending:
            self._collect(*self._pending.pop(0))
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._finish()
        return self.report

    def _collect(self, future: Future[tuple[int, str] | None], seqs: list[int]) -> None:
        found = future.result()
        if found is not None:
            self._problem(seqs[found[0]], found[1])
        if self.progress is not None:
            self.progress(len(seqs))

    def _finish(self) -> None:
        beyond = [size for size in self.file_heads if size > self.report.last_seq]
        if beyond:
            self._problem(self.report.last_seq + 1,
                          f"the log ends at record {self.report.last_seq} but a checkpoint "
                          f"in the file covers {max(beyond)} records: its tail was cut off")


def _chunks(raws: Iterable[bytes]) -> Iterator[list[bytes]]:
    iterator = iter(raws)
    while chunk := list(islice(iterator, CHUNK)):
        yield chunk


def verify(raws: Iterable[bytes], ring: KeyRing, file_notes: Iterable[str] = (), *,
           jobs: int = 1, progress: Callable[[int], None] | None = None,
           trust_checkpoints: bool = False) -> Report:
    return Verifier(ring, file_notes, jobs=jobs, progress=progress,
                    trust_checkpoints=trust_checkpoints).run(raws)
