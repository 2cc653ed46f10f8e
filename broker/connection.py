"""Connect to the broker as one identity and exchange signed messages.

Every outgoing message gets an envelope (``security.envelope``) and a ``traceparent``;
every incoming one is verified before a handler sees it. Sends and handled messages are
OpenTelemetry spans (``broker.tracing``). Permission violations, which
nats-server reports asynchronously without closing the connection, become structured
log events and are kept (bounded) on ``BrokerClient.violations``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel

from broker import subjects as subj
from broker import tracecontext, tracing
from broker.errors import BrokerError
from broker.secrets import IdentityMaterial
from security.envelope import H_NONCE, EnvelopeSigner, EnvelopeVerifier, NonceCache
from security.errors import EnvelopeError

log = structlog.get_logger("mas.broker")
RESPONSE_PREFIX = "_R_."  # reply subjects nats-server maps for cross-account requests
PING_INTERVAL_S = 5
MAX_OUTSTANDING_PINGS = 2


def reply_binding(request_nonce: str) -> str:
    """What a reply's envelope is sealed for: the request it answers, not the reply
    subject (nats-server rewrites that across accounts). A reply therefore verifies
    only as the answer to that one request."""
    return f"mas.reply.{request_nonce}"

_VIOLATION = re.compile(
    r'permissions violation for (publish|subscription) to "([^"]*)"', re.IGNORECASE
)


@dataclass(frozen=True)
class PermissionViolation:
    identity: str
    operation: str
    subject: str


@dataclass(frozen=True)
class SignedMessage:
    """A message whose envelope verified: ``sender`` is authenticated."""

    subject: str
    data: bytes
    sender: str
    token: str | None
    trace_id: str | None
    reply: str | None
    nonce: str


Payload = bytes | BaseModel
Handler = Callable[[SignedMessage], Awaitable[None]]
RefusalHandler = Callable[[Msg, EnvelopeError], Awaitable[None]]


class MessageTooLarge(BrokerError):
    """Body and envelope headers together exceed the broker's ``max_payload``. nats-py
    checks only the body, and nats-server answers an oversized message by closing the
    whole connection, so the check is made here, before anything is sent."""


def wire_size(data: bytes, headers: dict[str, str]) -> int:
    """What nats-server counts against ``max_payload``: the header block nats-py writes
    (``NATS/1.0``, one ``key: value`` line per header, a blank line) and the body."""
    size = len(data) + 12
    for k, v in headers.items():
        # an ASCII string's length is its UTF-8 size; encode only the others
        size += (len(k) if k.isascii() else len(k.encode())) + 4 + (
            len(v) if v.isascii() else len(v.encode()))
    return size


def _bytes(payload: Payload) -> bytes:
    if type(payload) is bytes:  # the common case, without an ABC isinstance check
        return payload
    return payload.model_dump_json().encode() if isinstance(payload, BaseModel) else payload


def parse_violation(identity: str, error: Exception) -> PermissionViolation | None:
    match = _VIOLATION.search(str(error))
    if not match:
        return None
    return PermissionViolation(identity, match.group(1).lower(), match.group(2))


def tls_context(material: IdentityMaterial) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(material.ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(material.tls_cert), str(material.tls_key))
    return ctx


class BrokerClient:
    def __init__(self, nc: NATS, material: IdentityMaterial, verifier: EnvelopeVerifier) -> None:
        self.nc = nc
        self.material = material
        self.identity = material.identity
        self.signer = EnvelopeSigner(material.identity, material.signing_key)
        self.verifier = verifier
        self.violations: deque[PermissionViolation] = deque(maxlen=256)
        self.closing = False
        self.reconnects = 0
        self.reconnect_hooks: list[Callable[[], Awaitable[None]]] = []

    def _headers(self, subject: str, data: bytes, token: str | None) -> dict[str, str]:
        headers = tracecontext.inject(self.signer.seal(subject, data, token=token))
        size, limit = wire_size(data, headers), self.nc.max_payload
        if size > limit:
            raise MessageTooLarge(f"message for {subject} is {size} bytes with its envelope; "
                                  f"the broker takes at most {limit} (broker.max_payload)")
        return headers

    def sealed_headers(self, subject: str, data: bytes) -> dict[str, str]:
        """Envelope headers for a message sent another way (a JetStream publish)."""
        return self._headers(subject, data, None)

    def open(self, msg: Msg, *, sealed_for: str | None = None) -> SignedMessage:
        """Verify ``msg``'s envelope; raises an ``EnvelopeError`` subclass on refusal.
        ``sealed_for``: the binding to check instead of the subject (replies)."""
        env = self.verifier.open(sealed_for or msg.subject, msg.data, msg.headers)
        return SignedMessage(
            subject=msg.subject, data=msg.data, sender=env.sender, token=env.token,
            trace_id=tracecontext.trace_id(msg.headers), reply=msg.reply or None,
            nonce=env.nonce,
        )

    async def publish(self, subject: str, payload: Payload, *, token: str | None = None) -> None:
        data = _bytes(payload)
        with tracing.producer(self.identity, subject, data):
            await self.nc.publish(subject, data, headers=self._headers(subject, data, token))

    async def request(
        self, subject: str, payload: Payload, *, token: str | None = None, timeout: float = 2.0
    ) -> SignedMessage:
        data = _bytes(payload)
        with tracing.producer(self.identity, subject, data, operation="request"):
            headers = self._headers(subject, data, token)
            reply = await self.nc.request(subject, data, timeout=timeout, headers=headers)
            with tracing.consumer(self.identity, reply.subject, reply.data, reply.headers,
                                  operation="receive") as span:
                signed = self.open(reply, sealed_for=reply_binding(headers[H_NONCE]))
                tracing.set_sender(span, signed.sender)
        return signed

    async def respond(self, request: SignedMessage, payload: Payload) -> None:
        """Reply to a verified request. Only the requester's own inbox (or a response
        subject the server mapped across accounts) is a valid target: otherwise a sender
        could aim our signed reply, and our ``allow_responses`` grant, at any subject."""
        reply = request.reply
        if reply is None:
            raise BrokerError(f"message on {request.subject} expects no reply")
        if not reply.startswith((f"{subj.inbox_prefix(request.sender)}.", RESPONSE_PREFIX)):
            log.warning("broker.reply_refused", identity=self.identity, sender=request.sender,
                        reply=reply)
            raise BrokerError(f"reply subject {reply!r} is not {request.sender}'s inbox")
        data = _bytes(payload)
        with tracing.producer(self.identity, reply, data, temporary=True):
            headers = self._headers(reply_binding(request.nonce), data, None)
            await self.nc.publish(reply, data, headers=headers)

    async def answer_unverified(self, msg: Msg, payload: Payload,
                                commander: str = "orchestrator") -> None:
        """Answer a request whose envelope did not verify (with a refusal), so the caller
        learns why instead of timing out. Only to ``commander``'s inbox or a response
        subject the server mapped; the answer is sealed for the nonce the request
        claimed, so it verifies only as the reply to that request."""
        reply = msg.reply
        nonce = (msg.headers or {}).get(H_NONCE)
        if not reply or not nonce or not reply.startswith(
                (f"{subj.inbox_prefix(commander)}.", RESPONSE_PREFIX)):
            return
        data = _bytes(payload)
        with contextlib.suppress(nats.errors.Error), \
                tracing.producer(self.identity, reply, data, temporary=True):
            await self.nc.publish(reply, data,
                                  headers=self._headers(reply_binding(nonce), data, None))

    async def subscribe(
        self, subject: str, handler: Handler, *, queue: str = "",
        on_refused: RefusalHandler | None = None,
    ) -> Subscription:
        async def deliver(msg: Msg) -> None:
            with tracing.consumer(self.identity, msg.subject, msg.data, msg.headers) as span:
                if msg.subject != subject and not subj.within(msg.subject, subject):
                    # JetStream push delivery keeps the stored subject: an agent's own stream
                    # could otherwise hand us validly signed messages under any subject name.
                    log.warning("broker.subject_mismatch", identity=self.identity,
                                subscribed=subject, subject=msg.subject)
                    tracing.refused(span, "subject_mismatch")
                    return
                try:
                    signed = self.open(msg)
                except EnvelopeError as exc:
                    log.warning("broker.envelope_refused", identity=self.identity,
                                subject=msg.subject, code=exc.code, reason=str(exc))
                    tracing.refused(span, exc.code)
                    if on_refused is not None:
                        await on_refused(msg, exc)
                    return
                tracing.set_sender(span, signed.sender)
                await handler(signed)

        return await self.nc.subscribe(subject, queue=queue, cb=deliver)

    async def sync(self, timeout: int = 5) -> None:
        """Return once the server has processed everything sent so far, subscriptions
        included. One flush is not enough for that with nats-py (ENVIRONMENT.md)."""
        await self.nc.flush(timeout=timeout)
        await self.nc.flush(timeout=timeout)

    async def close(self) -> None:
        self.closing = True
        if not self.nc.is_closed:
            await self.nc.drain()


async def connect(
    material: IdentityMaterial,
    servers: str | list[str],
    *,
    name: str | None = None,
    connect_timeout: float = 2.0,
    max_reconnect_attempts: int = -1,
    nonces: NonceCache | None = None,
) -> BrokerClient:
    """Connect as ``material.identity`` with its nkey, client certificate and inbox prefix."""
    tracing.setup(material.identity)
    verifier = EnvelopeVerifier(material.trust.sender_rings(), nonces=nonces)
    holder: list[BrokerClient] = []
    server_said: list[str] = []  # the server's own refusal beats the socket errors after it
    io_errors: list[str] = []

    async def error_cb(error: Exception) -> None:
        text = str(error) or type(error).__name__
        # nats-py raises exactly Error (or AuthorizationError) for a server's -ERR line;
        # its subclasses (connection closed, timeouts) are consequences, not reasons.
        if type(error) is nats.errors.Error or isinstance(error, nats.errors.AuthorizationError):
            server_said[:] = [text]
        else:
            io_errors[:] = [text]
        violation = parse_violation(material.identity, error)
        if violation is not None:
            if holder:
                holder[0].violations.append(violation)
            log.warning("broker.permission_violation", identity=violation.identity,
                        operation=violation.operation, subject=violation.subject)
        elif holder:  # before the first connect, the BrokerError below says it once
            log.warning("broker.error", identity=material.identity, error=str(error))

    async def disconnected_cb() -> None:
        if holder and not holder[0].closing:  # not a first connect that failed
            log.warning("broker.disconnected", identity=material.identity)

    async def reconnected_cb() -> None:
        log.info("broker.reconnected", identity=material.identity)
        if holder:
            holder[0].reconnects += 1
            for hook in holder[0].reconnect_hooks:
                await hook()

    nc = NATS()
    try:
        # nats-py retries a refused first login forever; bound it and say why it failed.
        await asyncio.wait_for(nc.connect(
            servers=servers,
            name=name or material.identity,
            tls=tls_context(material),
            nkeys_seed_str=material.nkey_seed,
            inbox_prefix=subj.inbox_prefix(material.identity),
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
            connect_timeout=int(max(1, connect_timeout)),
            # nats-py reads max_reconnect_attempts=0 as "no limit" and retries even a first
            # connect to a closed port until our timeout; 0 here means: one retry, then say so
            allow_reconnect=max_reconnect_attempts != 0,
            max_reconnect_attempts=max_reconnect_attempts or 1,
            reconnect_time_wait=1,
            # a connection whose peer went silent is given up after about 15 s, not
            # nats-py's 6 minutes: an agent cut off the network is back soon after
            ping_interval=PING_INTERVAL_S,
            max_outstanding_pings=MAX_OUTSTANDING_PINGS,
        ), timeout=connect_timeout * 3 + 1)
    except (nats.errors.Error, OSError, TimeoutError, ssl.SSLError) as exc:
        with contextlib.suppress(Exception):
            await nc.close()
        reason = next(iter(server_said or io_errors), str(exc) or type(exc).__name__)
        raise BrokerError(
            f"cannot connect to {servers} as {material.identity}: {reason}; "
            "is the broker running (`mas up`) and were secrets made by `mas init`?"
        ) from exc
    client = BrokerClient(nc, material, verifier)
    holder.append(client)
    return client
