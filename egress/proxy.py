"""The proxy: one HTTP request head per connection, one decision, then bytes.

The request head is parsed by h11 (a strict, well-kept HTTP/1.1 parser), so malformed
input gets a 400 rather than a guess. For ``CONNECT host:443`` the proxy resolves the
name itself, refuses it if any address is not public, connects to the vetted address
(never resolving again, so DNS rebinding cannot change the target in between) and then
only copies bytes: TLS runs end to end between the agent and the host. A plain
``GET http://host:port/...`` is forwarded only to a LAN host the policy opts in, as one
request with ``Connection: close``. Nothing of a request or response body is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import structlog

from egress.addresses import IPAddress, first_problem
from egress.clients import ClientDirectory
from egress.rules import Destination, EgressRules, Refused, normalise_host

log = structlog.get_logger("mas.egress")
Resolver = Callable[[str, int], Awaitable[list[tuple[str, int]]]]
HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT_S = 10.0
CHUNK = 64 * 1024
# Hop-by-hop headers (RFC 9110 7.6.1) and the proxy's own: never forwarded upstream.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authorization",
                        b"proxy-authenticate", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
STATUS_TEXT = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway",
               503: "Service Unavailable", 504: "Gateway Timeout"}


async def system_resolve(host: str, port: int) -> list[tuple[str, int]]:
    """Every (address, port) the name resolves to, as getaddrinfo gives them."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(str(info[4][0]), int(info[4][1])) for info in infos]


class BadRequest(Exception):
    pass


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    tunnel: bool


@dataclass
class Decision:
    """The fields of the one log line each request produces."""

    client: str
    agent: str | None = None
    method: str = ""
    host: str = ""
    port: int = 0
    allowed: bool = False
    reason: str = ""
    address: str = ""

    def emit(self) -> None:
        log.info("egress.decision", client=self.client, agent=self.agent, method=self.method,
                 host=self.host, port=self.port, allowed=self.allowed, reason=self.reason,
                 address=self.address or None)


def _target(request: h11.Request) -> Target:
    method = request.method.decode("ascii", "replace")
    raw = request.target.decode("ascii", "replace")
    if method == "CONNECT":
        parts = urlsplit(f"//{raw}")
        tunnel = True
    else:
        parts = urlsplit(raw)
        if parts.scheme != "http":
            raise BadRequest("not a proxy request (use CONNECT host:443 or an http:// URL)")
        tunnel = False
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise BadRequest("bad port") from None
    if not host or (tunnel and port is None) or parts.username or parts.password:
        raise BadRequest("bad target")
    return Target(normalise_host(host), port or 80, tunnel)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class EgressProxy:
    def __init__(self, rules: EgressRules, clients: ClientDirectory, *,
                 resolve: Resolver = system_resolve,
                 allow_addresses: frozenset[IPAddress] = frozenset(),
                 connect_timeout_s: float = 10.0, idle_timeout_s: float = 300.0,
                 max_connections: int = 256) -> None:
        """``resolve`` and ``allow_addresses`` exist for tests only (loopback stand-ins
        for public hosts); the service never sets them."""
        self.rules = rules
        self.clients = clients
        self._resolve = resolve
        self._allow = allow_addresses
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> asyncio.Server:
        self.server = await asyncio.start_server(self._serve, host, port, limit=HEAD_LIMIT)
        return self.server

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        decision = Decision(client=str(peer[0]) if peer else "?")
        try:
            if self._slots.locked():
                decision.reason = "too_many_connections"
                await _answer(writer, 503, decision.reason)
                return
            async with self._slots:
                await self._handle(reader, writer, decision)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception as exc:  # one bad connection must not take the proxy down
            log.warning("egress.connection_failed", client=decision.client,
                        agent=decision.agent, error=type(exc).__name__)
        finally:
            if decision.reason:
                decision.emit()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      decision: Decision) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
        try:
            request = await asyncio.wait_for(_read_head(reader, conn), HEAD_TIMEOUT_S)
            decision.method = request.method.decode("ascii", "replace")[:16]
            target = _target(request)
        except TimeoutError:
            decision.reason = "head_timeout"
            return
        except (BadRequest, h11.RemoteProtocolError, ValueError, asyncio.LimitOverrunError,
                asyncio.IncompleteReadError) as exc:
            decision.reason = "bad_request"
            await _answer(writer, 400, str(exc) if isinstance(exc, BadRequest) else "bad request")
            return
        decision.host, decision.port = target.host, target.port
        dest = await self._decide(target, decision)
        if dest is None:
            await _answer(writer, 403, decision.reason)
            return
        addresses = await self._vet(dest, decision)
        if addresses is None:
            await _answer(writer, 502 if decision.reason == "resolve_failed" else 403,
                          decision.reason)
            return
        upstream = await self._open(addresses, decision)
        if upstream is None:
            await _answer(writer, 504 if decision.reason == "connect_timeout" else 502,
                          decision.reason)
            return
        decision.allowed, decision.reason = True, "allowed" if not dest.lan else "allowed_lan"
        decision.emit()
        decision.reason = ""  # logged; nothing more to say about this request
        up_reader, up_writer = upstream
        try:
            if target.tunnel:
                # Only the head was read: bytes the client sent early are still in `reader`.
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                await asyncio.gather(self._pipe(reader, up_writer),
                                     self._pipe(up_reader, writer))
            else:
                await self._forward(request, target, conn, reader, up_writer)
                await self._pipe(up_reader, writer)
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()

    async def _decide(self, target: Target, decision: Decision) -> Destination | None:
        peer = decision.client
        try:
            agent = await self.clients.agent_for(ipaddress.ip_address(peer.split("%", 1)[0]))
        except ValueError:
            agent = None
        decision.agent = agent
        if agent is None:
            decision.reason = "unknown_client"
            return None
        if _is_address(target.host):
            decision.reason = "address_literal"
            return None
        verdict = self.rules.decide(agent, target.host, target.port, tunnel=target.tunnel)
        if isinstance(verdict, Refused):
            decision.reason = verdict.reason
            return None
        return verdict

    async def _vet(self, dest: Destination, decision: Decision
                   ) -> list[tuple[IPAddress, int]] | None:
        """Resolve once; every address must pass, or the name is refused."""
        try:
            resolved = await asyncio.wait_for(self._resolve(dest.host, dest.port),
                                              self.connect_timeout_s)
            addresses = [(ipaddress.ip_address(a.split("%", 1)[0]), p) for a, p in resolved]
        except (OSError, TimeoutError, ValueError):
            decision.reason = "resolve_failed"
            return None
        if not addresses:
            decision.reason = "resolve_failed"
            return None
        problem = first_problem((ip for ip, _ in addresses), lan=dest.lan, allow=self._allow)
        if problem is not None:
            decision.address, decision.reason = str(problem[0]), f"{problem[1]}_address"
            return None
        return addresses

    async def _open(self, addresses: list[tuple[IPAddress, int]], decision: Decision
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Connect to the vetted addresses in order (never to the name again)."""
        decision.reason = "connect_failed"
        for ip, port in addresses:
            decision.address = str(ip)
            try:
                return await asyncio.wait_for(asyncio.open_connection(str(ip), port),
                                              self.connect_timeout_s)
            except TimeoutError:
                decision.reason = "connect_timeout"
            except OSError:
                decision.reason = "connect_failed"
        return None

    async def _forward(self, request: h11.Request, target: Target, conn: h11.Connection,
                       reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        """Send one plain HTTP request upstream in origin form, body re-framed by h11."""
        parts = urlsplit(request.target.decode("ascii"))
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # Headers the client named in Connection are hop-by-hop too.
        named = {n.strip().lower() for name, value in request.headers if name == b"connection"
                 for n in value.split(b",")}
        framing = [(n, v) for n, v in request.headers if n == b"transfer-encoding"]
        dropped = HOP_BY_HOP | named | {b"host"} | ({b"content-length"} if framing else set())
        # raw_items keeps the client's spelling of names; some servers are picky about it.
        headers = [(n, v) for n, v in request.headers.raw_items() if n.lower() not in dropped]
        authority = target.host if target.port == 80 else f"{target.host}:{target.port}"
        client = h11.Connection(h11.CLIENT)
        up_writer.write(client.send(h11.Request(
            method=request.method, target=path.encode(),
            headers=[(b"Host", authority.encode()), *headers, *framing,
                     (b"Connection", b"close")])) or b"")
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(reader.read(CHUNK), self.idle_timeout_s)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                up_writer.write(client.send(event) or b"")
                await up_writer.drain()
            elif isinstance(event, h11.EndOfMessage):
                up_writer.write(client.send(h11.EndOfMessage()) or b"")
                await up_writer.drain()
                return
            else:
                raise ConnectionError("client ended the request early")

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await asyncio.wait_for(src.read(CHUNK), self.idle_timeout_s)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if dst.can_write_eof():
                    dst.write_eof()


async def _read_head(reader: asyncio.StreamReader, conn: h11.Connection) -> h11.Request:
    head = await reader.readuntil(b"\r\n\r\n")
    conn.receive_data(head)
    event = conn.next_event()
    if not isinstance(event, h11.Request):
        raise BadRequest("incomplete request head")
    return event


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    body = f"mas egress: {reason}\n".encode()
    writer.write(f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Error')}\r\n"
                 f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                 "Connection: close\r\n\r\n".encode() + body)
    with contextlib.suppress(Exception):
        await writer.drain()
