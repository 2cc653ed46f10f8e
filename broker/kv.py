"""Listing a KV bucket's keys without nats-py's ``kv.keys()``.

``kv.keys()`` can report a bucket empty while it holds entries (its watcher signals "no
more" before buffered entries are processed; nats-io/nats.py#842, seen here as an
operator's pending approval missing from the list), and it leaves its consumer on the
server for five minutes. This lists through a pull consumer that delivers the last
entry per key, headers only, and deletes that consumer at once. A prefix ending in "."
is filtered by the server, so a listing costs what it finds.
"""

from __future__ import annotations

import contextlib

import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

IDLE_S = 30.0  # the listing consumer's life on the server, should deleting it fail
BATCH = 256


async def list_keys(js: JetStreamContext, bucket: str, prefix: str = "") -> list[str]:
    """The live keys of ``bucket`` that start with ``prefix``, sorted."""
    stream, name = f"KV_{bucket}", None
    within = prefix if prefix.endswith(".") else ""
    keys: list[str] = []
    sub = await js.pull_subscribe(
        f"$KV.{bucket}.{within}>", stream=stream, config=ConsumerConfig(
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, ack_policy=AckPolicy.NONE,
            headers_only=True, mem_storage=True, inactive_threshold=IDLE_S))
    try:
        info = await sub.consumer_info()
        name, pending = info.name, info.num_pending or 0
        while pending > 0:
            try:
                batch = await sub.fetch(min(pending, BATCH), timeout=5)
            except nats.errors.TimeoutError:
                break  # the rest expired meanwhile (entries with a TTL)
            for msg in batch:
                pending = msg.metadata.num_pending or 0
                if (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
                    keys.append(msg.subject.removeprefix(f"$KV.{bucket}."))
    finally:
        await sub.unsubscribe()
        if name is not None:
            with contextlib.suppress(nats.errors.Error):
                await js.delete_consumer(stream, name)
    return sorted(k for k in keys if k.startswith(prefix))


async def bucket_keys(kv: KeyValue, prefix: str = "") -> list[str]:
    """``list_keys`` for an open bucket handle (nats-py keeps its context and name)."""
    return await list_keys(kv._js, kv._name, prefix)
