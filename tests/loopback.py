"""Stand-ins for outside services, served on 127.0.0.1 only (the network rule)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: under the load test's 64 requests in
    # flight the kernel refused connections and a delivery failed with ReadError
    request_queue_size = 128


@contextmanager
def serve_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free loopback port in a thread; yields the base URL and
    shuts the server down afterwards."""
    server = _Server(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class Webhook:
    """A plain JSON webhook receiver (what notify's webhook channel posts to): every POST's
    path and JSON body, in the order they arrived."""

    url: str
    posts: list[tuple[str, dict[str, object]]] = field(default_factory=list)


@contextmanager
def serve_webhook() -> Iterator[Webhook]:
    """A :class:`Webhook` on a free loopback port that answers every POST with 200."""
    posts: list[tuple[str, dict[str, object]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            posts.append((self.path, json.loads(self.rfile.read(length) or b"{}")))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    with serve_http(Handler) as url:
        yield Webhook(url, posts)
