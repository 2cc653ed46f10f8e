"""Cost of the security layer: tokens, envelopes, and secured vs raw request/reply.

Run from the project root::

    python -m bench.bench_security [--quick] [--out FILE.md]

Everything runs in one process against one real nats-server (mutual TLS, nkeys, the
compiled deny-by-default config) started from a throwaway copy of ``policy.yaml`` on
free loopback ports. The server is stopped and the temp folder removed at the end,
also on error or Ctrl-C. See ``bench/README.md`` for what each row means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench import common
from bench.common import Result, Target, log, machine_info, ops_per_second, percentile
from bench.throwaway import Broker
from broker import connection
from broker.connection import BrokerClient, SignedMessage
from broker.secrets import SecretsLayout, load_identity
from security.envelope import EnvelopeSigner, EnvelopeVerifier
from security.errors import TokenError
from security.tokens import TokenIssuer, TokenVerifier

REQUESTER = "orchestrator"
AUDIENCE = "health"
ACTION = "daily_summary"
SUBJECT = f"mas.agent.{AUDIENCE}.{ACTION}"
PAYLOAD = bytes(range(256))  # 256 bytes
TARGET_P50_RATIO = 1.3  # secured p50 / raw p50 must be at most this
TARGET_TPUT_RATIO = 0.7  # secured req/s / raw req/s must be at least this
REQUEST_TIMEOUT_S = 10.0
STEP = "secured, token per step"
MODES = ("raw", "secured", STEP)


@dataclass(frozen=True)
class Settings:
    micro_seconds: float  # duration of one micro-benchmark round
    micro_rounds: int
    warmup: int  # requests per mode and concurrency before measuring
    rounds: int
    n_seq: int  # requests per round at 1 in flight
    n_conc: int  # requests per round at 64 in flight
    inflight: int = 64


FULL = Settings(micro_seconds=1.0, micro_rounds=3, warmup=500, rounds=5, n_seq=2500,
                n_conc=6000)
QUICK = Settings(micro_seconds=0.2, micro_rounds=3, warmup=100, rounds=3, n_seq=500,
                 n_conc=1000)


async def settle(*clients: BrokerClient) -> None:
    """Make sure the server has processed every (un)subscription."""
    for client in clients:
        await client.sync()


# --------------------------------------------------------------------------- micro


@dataclass(frozen=True)
class MicroResult:
    name: str
    ops: float


def micro_benchmarks(layout: SecretsLayout, s: Settings) -> list[MicroResult]:
    orch = load_identity(layout, REQUESTER)
    issuer = TokenIssuer(REQUESTER, orch.signing_key)
    ring = orch.trust.issuer_ring()
    subjects = (SUBJECT,)

    def issue() -> object:
        return issuer.issue(audience=AUDIENCE, actions=(ACTION,), subjects=subjects)

    token, _ = issuer.issue(audience=AUDIENCE, actions=(ACTION,), subjects=subjects,
                            lifetime_s=900)
    uncached = TokenVerifier(ring, issuer=REQUESTER)
    cached = TokenVerifier(ring, issuer=REQUESTER, cache_size=1024)

    def verify_with(v: TokenVerifier) -> Callable[[], object]:
        return lambda: v.verify(token, audience=AUDIENCE, action=ACTION, subject=SUBJECT)

    signer = EnvelopeSigner(REQUESTER, orch.signing_key)
    senders = orch.trust.sender_rings()
    env_verifier = EnvelopeVerifier(senders)

    def seal_open() -> object:
        headers = signer.seal(SUBJECT, PAYLOAD, token=token)
        return env_verifier.open(SUBJECT, PAYLOAD, headers)

    results = []
    for name, fn in (
        ("token issue", issue),
        ("token verify, no cache", verify_with(uncached)),
        ("token verify, cache_size=1024, same token", verify_with(cached)),
        ("envelope seal+open (256 B, with token)", seal_open),
    ):
        fn()  # fail fast, and warm up
        results.append(MicroResult(name, ops_per_second(fn, s.micro_seconds, s.micro_rounds)))
        log(f"{name}: {results[-1].ops:,.0f}/s")
    return results


# --------------------------------------------------------------------------- request/reply


@dataclass(frozen=True)
class Run:
    p50_ms: float
    p99_ms: float
    rps: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # sorted


class Pair:
    """The requester (orchestrator) and responder (health) connections, shared by the raw
    and secured runs; each run installs its own responder and removes it afterwards."""

    def __init__(self, requester: BrokerClient, responder: BrokerClient) -> None:
        self.req = requester
        self.resp = responder
        self.issuer = TokenIssuer(REQUESTER, requester.material.signing_key)
        self.token_verifier = TokenVerifier(responder.material.trust.issuer_ring(),
                                            issuer=REQUESTER)
        self.refused = 0
        self.step_token = ""

    # raw: plain nats-py on the same TLS + nkey connections, no envelope, no token
    async def _raw_responder(self) -> object:
        nc = self.resp.nc

        async def echo(msg: object) -> None:
            await nc.publish(msg.reply, msg.data)  # type: ignore[attr-defined]

        return await nc.subscribe(SUBJECT, cb=echo)

    async def _raw_request(self) -> None:
        reply = await self.req.nc.request(SUBJECT, PAYLOAD, timeout=REQUEST_TIMEOUT_S)
        if reply.data != PAYLOAD:
            raise RuntimeError("raw reply differs from the request")

    # secured: fresh token per request, envelopes both ways, token checked by the responder
    async def _secured_responder(self) -> object:
        client = self.resp

        async def handle(msg: SignedMessage) -> None:
            try:
                if msg.token is None:
                    raise TokenError("no token")
                self.token_verifier.verify(msg.token, audience=AUDIENCE, action=ACTION,
                                           subject=msg.subject)
            except TokenError as exc:
                self.refused += 1
                await client.respond(msg, f"refused: {exc}".encode())
                return
            await client.respond(msg, msg.data)

        return await client.subscribe(SUBJECT, handle)

    async def _secured_request(self) -> None:
        token, _ = self.issuer.issue(audience=AUDIENCE, actions=(ACTION,), subjects=(SUBJECT,))
        await self._send_secured(token)

    async def _step_request(self) -> None:
        """A token minted once per workflow step (outside the timed request), still
        verified by the responder on every request, without a verification cache."""
        await self._send_secured(self.step_token)

    async def _send_secured(self, token: str) -> None:
        reply = await self.req.request(SUBJECT, PAYLOAD, token=token, timeout=REQUEST_TIMEOUT_S)
        if reply.sender != AUDIENCE or reply.data != PAYLOAD:
            raise RuntimeError(f"secured reply from {reply.sender!r}: {reply.data[:80]!r}")

    async def run(self, mode: str, n: int, inflight: int) -> Run:
        secured = mode != "raw"
        sub = await (self._secured_responder() if secured else self._raw_responder())
        await settle(self.resp, self.req)
        self.step_token, _ = self.issuer.issue(audience=AUDIENCE, actions=(ACTION,),
                                               subjects=(SUBJECT,), lifetime_s=900)
        op = {"raw": self._raw_request, "secured": self._secured_request,
              STEP: self._step_request}[mode]
        try:
            gc.collect()
            return await measure(op, n, inflight)
        finally:
            await sub.unsubscribe()  # type: ignore[attr-defined]
            await settle(self.resp, self.req)


async def measure(op: Callable[[], Awaitable[None]], n: int, inflight: int) -> Run:
    latencies: list[float] = []
    clock = time.perf_counter
    if inflight == 1:
        start = clock()
        for _ in range(n):
            t0 = clock()
            await op()
            latencies.append(clock() - t0)
        wall = clock() - start
    else:
        sem = asyncio.Semaphore(inflight)

        async def one() -> None:
            async with sem:
                t0 = clock()
                await op()
                latencies.append(clock() - t0)

        start = clock()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = clock() - start
    latencies_ms = sorted(x * 1000 for x in latencies)
    return Run(p50_ms=percentile(latencies_ms, 0.50), p99_ms=percentile(latencies_ms, 0.99),
               rps=n / wall, latencies_ms=latencies_ms)


@dataclass(frozen=True)
class Summary:
    """Medians over rounds of the per-round p50, p99 and throughput; every request's
    latency of every round (for the plot)."""

    p50_ms: float
    p99_ms: float
    rps: float
    rps_min: float
    rps_max: float
    latencies_ms: list[float] = field(repr=False)

    @classmethod
    def of(cls, runs: list[Run]) -> Summary:
        rps = [r.rps for r in runs]
        return cls(statistics.median(r.p50_ms for r in runs),
                   statistics.median(r.p99_ms for r in runs),
                   statistics.median(rps), min(rps), max(rps),
                   [x for r in runs for x in r.latencies_ms])


async def request_reply(broker: Broker, s: Settings) -> dict[tuple[int, str], Summary]:
    requester = await connection.connect(load_identity(broker.secrets, REQUESTER), broker.url,
                                         max_reconnect_attempts=0)
    responder = await connection.connect(load_identity(broker.secrets, AUDIENCE), broker.url,
                                         max_reconnect_attempts=0)
    pair = Pair(requester, responder)
    try:
        levels = (1, s.inflight)
        log(f"warm-up: {s.warmup} requests per mode and concurrency")
        for inflight in levels:
            for mode in MODES:
                await pair.run(mode, s.warmup, inflight)
        runs: dict[tuple[int, str], list[Run]] = {(c, m): [] for c in levels for m in MODES}
        for rnd in range(s.rounds):
            # rotate which mode goes first, so drift does not favour one of them
            order = MODES[rnd % len(MODES):] + MODES[:rnd % len(MODES)]
            for inflight in levels:
                n = s.n_seq if inflight == 1 else s.n_conc
                for mode in order:
                    run = await pair.run(mode, n, inflight)
                    runs[(inflight, mode)].append(run)
                    log(f"round {rnd + 1}/{s.rounds} {mode:23} x{inflight:<2} n={n}: "
                        f"p50 {run.p50_ms:.3f} ms, p99 {run.p99_ms:.3f} ms, "
                        f"{run.rps:,.0f} req/s")
        if pair.refused:
            raise RuntimeError(f"the responder refused {pair.refused} tokens")
        violations = list(requester.violations) + list(responder.violations)
        if violations:
            raise RuntimeError(f"permission violations during the benchmark: {violations}")
        return {key: Summary.of(value) for key, value in runs.items()}
    finally:
        for client in (requester, responder):
            client.closing = True
            if not client.nc.is_closed:
                await client.nc.close()


# --------------------------------------------------------------------------- report


def report(info: list[str], s: Settings, quick: bool, micro: list[MicroResult],
           rr: dict[tuple[int, str], Summary], elapsed: float) -> Result:
    lines = ["# Security layer benchmark", "", *info,
             f"- Mode: {'quick' if quick else 'full'}; request/reply: {s.rounds} rounds "
             f"(raw and secured alternating), n={s.n_seq} at 1 in flight, n={s.n_conc} at "
             f"{s.inflight} in flight, {len(PAYLOAD)} B payload, subject {SUBJECT}",
             "- Requester (orchestrator) and responder (health) share one Python process and "
             "event loop, so both sides' CPU cost adds up per request",
             "", "## Crypto primitives (single thread, median of "
             f"{s.micro_rounds} x {s.micro_seconds:g} s)", "",
             "| Operation | ops/s | µs/op |", "|---|---:|---:|"]
    for m in micro:
        lines.append(f"| {m.name} | {m.ops:,.0f} | {1e6 / m.ops:.1f} |")
    lines += ["", "## Request/reply over nats-server (mutual TLS, loopback); medians over "
              "rounds", "",
              "| In flight | Mode | p50 ms | p99 ms | req/s | req/s range |",
              "|---:|---|---:|---:|---:|---:|"]
    targets = []
    for inflight in sorted({k[0] for k in rr}):
        raw = rr[(inflight, "raw")]
        for mode in MODES:
            sm = rr[(inflight, mode)]
            lines.append(f"| {inflight} | {mode} | {sm.p50_ms:.3f} | {sm.p99_ms:.3f} | "
                         f"{sm.rps:,.0f} | {sm.rps_min:,.0f}–{sm.rps_max:,.0f} |")
        for mode in MODES[1:]:
            sec = rr[(inflight, mode)]
            p50_ratio = sec.p50_ms / raw.p50_ms
            rps_ratio = sec.rps / raw.rps
            lines.append(f"| {inflight} | **{mode} / raw** | **{p50_ratio:.2f}x** | "
                         f"{sec.p99_ms / raw.p99_ms:.2f}x | **{rps_ratio:.2f}x** | |")
            where = f"{inflight} in flight, {mode}"
            targets += [Target(f"{where}: p50 latency / raw", p50_ratio, TARGET_P50_RATIO,
                               at_most=True, source="issues 2 and 8"),
                        Target(f"{where}: throughput / raw", rps_ratio, TARGET_TPUT_RATIO,
                               at_most=False, source="issue 8")]
    lines += ["", "## Targets", "", *(t.line() for t in targets), "",
              f"Total run time: {elapsed:.1f} s", ""]
    samples = {f"{inflight}|{mode}": summary.latencies_ms
               for (inflight, mode), summary in rr.items()}
    return Result("\n".join(lines), targets, samples)


# --------------------------------------------------------------------------- main


async def amain(args: argparse.Namespace) -> Result:
    s = QUICK if args.quick else FULL
    started = time.perf_counter()
    info = machine_info()
    broker = Broker()
    try:
        log(f"starting nats-server in {broker.tmp}")
        broker.start()
        log(f"nats-server ready at {broker.url}")
        micro = micro_benchmarks(broker.secrets, s)
        rr = await request_reply(broker, s)
    finally:
        broker.close()
    return report(info, s, args.quick, micro, rr, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = common.parser("bench.bench_security", __doc__, quick="short run (about 15 s)"
                         ).parse_args(argv)
    return common.run(args, lambda: amain(args))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
