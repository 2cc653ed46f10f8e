"""The egress proxy, tested with a real proxy on 127.0.0.1 and real clients.

Clients connect from distinct loopback addresses (127.0.0.2 is the agent `home`,
127.0.0.3 is `other`), which is how the proxy tells agents apart in compose. "Public"
hosts are loopback servers: the test's resolver maps their names to 127.0.0.1 and the
proxy's constructor is told to accept that one address. Every other private answer
(10.x, 127.0.0.9, 169.254.x, IPv6 loopback and mapped forms) must still be refused; the
proxy never connects to any of them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest
from structlog.testing import capture_logs

from agents.home.client import HomeAssistant
from agents.home.settings import HomeSettings
from broker.policy import load_policy
from egress.clients import ClientDirectory
from egress.proxy import EgressProxy
from egress.rules import Destination, EgressRules, Refused, lan_destination
from egress.service import EgressSettings, run_egress
from security import pki
from tests.conftest import REPO, eventually, free_port
from tests.loopback import serve_http

HOME, OTHER, STRANGER = "127.0.0.2", "127.0.0.3", "127.0.0.4"
ALLOWED = "api.allowed.test"
LAN = "ha.lan.test"
PRIVATE_ANSWERS = {
    "ten.allowed.test": ["10.1.2.3"],
    "loop.allowed.test": ["127.0.0.9"],
    "meta.allowed.test": ["169.254.169.254"],
    "mixed.allowed.test": ["93.184.216.34", "10.0.0.1"],  # one bad address spoils the name
    "v6loop.allowed.test": ["::1"],
    "mapped.allowed.test": ["::ffff:10.0.0.1"],
    "cgnat.allowed.test": ["100.64.0.1"],
}


@dataclass
class Upstreams:
    tls_port: int
    ca: Path
    http_port: int = 0
    lookups: list[str] = field(default_factory=list)


@pytest.fixture
async def tls_echo(tmp_path: Path) -> AsyncIterator[Upstreams]:
    """A TLS server for ALLOWED on 127.0.0.1 that echoes what it receives."""
    ca = pki.create_ca("egress-test-ca")
    leaf = pki.issue_certificate(ca, ALLOWED, server_names=(ALLOWED,), client=False)
    pki.save(leaf, tmp_path / "leaf.crt", tmp_path / "leaf.key")
    pki.save(ca, tmp_path / "ca.crt", tmp_path / "ca.key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "leaf.crt", tmp_path / "leaf.key")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield Upstreams(port, tmp_path / "ca.crt")


class HomeAssistantish(BaseHTTPRequestHandler):
    """Answers like a Home Assistant REST endpoint and remembers what it was sent."""

    seen: ClassVar[list[dict[str, Any]]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.append({"method": self.command, "path": self.path,
                          "headers": dict(self.headers.items()), "body": body})
        out = json.dumps([{"entity_id": "light.desk", "state": "on", "attributes": {},
                           "last_changed": "2026-11-25T20:00:00+00:00",
                           "last_updated": "2026-11-25T20:00:00+00:00"}]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def lan_server() -> Iterator[int]:
    HomeAssistantish.seen.clear()
    with serve_http(HomeAssistantish) as url:
        yield int(url.rsplit(":", 1)[1])


async def start_proxy(up: Upstreams, lan_port: int, home: str = HOME) -> EgressProxy:
    """A proxy on 127.0.0.1 for `home` (at ``home``) and `other` (at OTHER)."""
    up.http_port = lan_port
    answers: dict[str, list[tuple[str, int]]] = {
        ALLOWED: [("127.0.0.1", up.tls_port)],
        "other.allowed.test": [("127.0.0.1", up.tls_port)],
        LAN: [("127.0.0.1", lan_port)],
        "meta.lan.test": [("169.254.169.254", 8123)],
        **{name: [(a, 443) for a in addrs] for name, addrs in PRIVATE_ANSWERS.items()},
    }

    async def resolve(host: str, port: int) -> list[tuple[str, int]]:
        up.lookups.append(host)
        if host not in answers:
            raise OSError("no such name")
        return answers[host]

    async def resolve_agent(name: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return {ipaddress.ip_address({"home": home, "other": OTHER}[name])}

    rules = EgressRules({
        "home": [Destination(ALLOWED, 443), Destination(LAN, 8123, lan=True),
                 Destination("meta.lan.test", 8123, lan=True),
                 *(Destination(n, 443) for n in PRIVATE_ANSWERS)],
        "other": [Destination("other.allowed.test", 443)],
    })
    clients = ClientDirectory(rules.agents, resolve_agent)
    await clients.refresh()
    egress = EgressProxy(rules, clients, resolve=resolve,
                         allow_addresses=frozenset({ipaddress.ip_address("127.0.0.1")}),
                         connect_timeout_s=5)
    await egress.start("127.0.0.1", 0)
    return egress


def port_of(egress: EgressProxy) -> int:
    assert egress.server is not None
    return int(egress.server.sockets[0].getsockname()[1])


@pytest.fixture
async def proxy(tls_echo: Upstreams, lan_server: int) -> AsyncIterator[tuple[int, Upstreams]]:
    egress = await start_proxy(tls_echo, lan_server)
    try:
        yield port_of(egress), tls_echo
    finally:
        await egress.close()


async def send(port: int, source: str, head: bytes
               ) -> tuple[int, bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection from ``source``, send ``head``, read the proxy's answer head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(head)
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(answer.split(b" ", 2)[1])
    return status, answer, reader, writer


def connect_head(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


def decisions(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "egress.decision"]


async def refused(port: int, source: str, head: bytes, status: int = 403) -> bytes:
    got, answer, reader, writer = await send(port, source, head)
    body = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert got == status, answer
    return body


async def test_allowed_host_is_tunnelled_with_tls_end_to_end(
        proxy: tuple[int, Upstreams]) -> None:
    port, up = proxy
    with capture_logs() as logs:
        status, _, reader, writer = await send(port, HOME, connect_head(f"{ALLOWED}:443"))
        assert status == 200
        ctx = ssl.create_default_context(cafile=str(up.ca))
        await writer.start_tls(ctx, server_hostname=ALLOWED)
        writer.write(b"ping through the tunnel")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(23), 10) == b"ping through the tunnel"
        writer.close()
    [line] = decisions(logs)
    assert line["agent"] == "home"
    assert line["host"] == ALLOWED
    assert line["port"] == 443
    assert line["allowed"] is True
    assert line["reason"] == "allowed"
    assert line["address"] == "127.0.0.1"
    assert line["method"] == "CONNECT"


@pytest.mark.attack("escape the scoped tier's allowlist",
                    threat="DNS rebinding redirects an allowed name after the check")
async def test_the_name_is_resolved_once_so_rebinding_cannot_redirect(
        proxy: tuple[int, Upstreams]) -> None:
    port, up = proxy
    status, _, _reader, writer = await send(port, HOME, connect_head(f"{ALLOWED}:443"))
    writer.close()
    assert status == 200
    assert up.lookups == [ALLOWED]


@pytest.mark.attack("escape the scoped tier's allowlist",
                    threat="a scoped agent asks the proxy for a host outside its list")
async def test_a_host_not_in_the_agents_list_gets_403_and_a_log_line(
        proxy: tuple[int, Upstreams]) -> None:
    port, up = proxy
    with capture_logs() as logs:
        body = await refused(port, HOME, connect_head("evil.example:443"))
    assert b"host_not_allowed" in body
    [line] = decisions(logs)
    assert (line["agent"], line["host"], line["allowed"], line["reason"]) == (
        "home", "evil.example", False, "host_not_allowed")
    assert up.lookups == []  # refused before any DNS lookup


@pytest.mark.parametrize(("name", "reason"), [
    ("ten.allowed.test", "private_address"),
    ("loop.allowed.test", "loopback_address"),
    ("meta.allowed.test", "link_local_address"),
    ("mixed.allowed.test", "private_address"),
    ("v6loop.allowed.test", "loopback_address"),
    ("mapped.allowed.test", "private_address"),
    ("cgnat.allowed.test", "private_address"),
])
@pytest.mark.attack("escape the scoped tier's allowlist",
                    threat="an allowed name that resolves to a private, loopback or link-local "
                           "address")
async def test_an_allowed_name_that_resolves_to_a_private_address_is_refused(
        proxy: tuple[int, Upstreams], name: str, reason: str) -> None:
    port, _ = proxy
    with capture_logs() as logs:
        body = await refused(port, HOME, connect_head(f"{name}:443"))
    assert reason.encode() in body
    [line] = decisions(logs)
    assert line["allowed"] is False
    assert line["reason"] == reason
    assert line["address"]


async def test_a_port_other_than_443_is_refused(proxy: tuple[int, Upstreams]) -> None:
    port, up = proxy
    with capture_logs() as logs:
        for target in (f"{ALLOWED}:80", f"{ALLOWED}:8443", f"{ALLOWED}:22"):
            assert b"port_not_allowed" in await refused(port, HOME, connect_head(target))
    assert [d["reason"] for d in decisions(logs)] == ["port_not_allowed"] * 3
    assert up.lookups == []


@pytest.mark.attack("escape the scoped tier's allowlist",
                    threat="a scoped agent uses another agent's allowlist")
async def test_an_agent_cannot_reach_another_agents_host(proxy: tuple[int, Upstreams]) -> None:
    port, _ = proxy
    with capture_logs() as logs:
        await refused(port, OTHER, connect_head(f"{ALLOWED}:443"))
        await refused(port, HOME, connect_head("other.allowed.test:443"))
        status, _, _r, writer = await send(port, OTHER, connect_head("other.allowed.test:443"))
        writer.close()
    assert status == 200
    assert [(d["agent"], d["allowed"], d["reason"]) for d in decisions(logs)] == [
        ("other", False, "host_not_allowed"), ("home", False, "host_not_allowed"),
        ("other", True, "allowed")]


async def test_a_client_that_is_no_scoped_agent_is_refused(proxy: tuple[int, Upstreams]) -> None:
    port, _ = proxy
    with capture_logs() as logs:
        body = await refused(port, STRANGER, connect_head(f"{ALLOWED}:443"))
    assert b"unknown_client" in body
    [line] = decisions(logs)
    assert line["agent"] is None
    assert line["client"] == STRANGER


@pytest.mark.attack("escape the scoped tier's allowlist",
                    threat="an address literal instead of an allowed name")
async def test_address_literals_are_refused(proxy: tuple[int, Upstreams]) -> None:
    port, up = proxy
    for target in ("93.184.216.34:443", "127.0.0.1:443", "[::1]:443"):
        assert b"address_literal" in await refused(port, HOME, connect_head(target))
    assert up.lookups == []


@pytest.mark.parametrize("head", [
    b"GARBAGE\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    b"GET /api/states HTTP/1.1\r\nHost: x\r\n\r\n",           # not a proxy request
    b"CONNECT api.allowed.test HTTP/1.1\r\nHost: x\r\n\r\n",   # no port
    b"CONNECT api.allowed.test:99999 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT u:p@api.allowed.test:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT api.allowed.test:443 HTTP/1.1\r\n\r\n",          # HTTP/1.1 without Host
    b"GET ftp://api.allowed.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",  # head over 16 KiB
])
async def test_garbage_gets_400_and_the_proxy_keeps_serving(
        proxy: tuple[int, Upstreams], head: bytes) -> None:
    port, _ = proxy
    with capture_logs() as logs:
        await refused(port, HOME, head, status=400)
    assert [d["reason"] for d in decisions(logs)] == ["bad_request"]
    status, _, _r, writer = await send(port, HOME, connect_head(f"{ALLOWED}:443"))
    writer.close()
    assert status == 200


async def test_a_client_that_sends_half_a_head_and_leaves_does_no_harm(
        proxy: tuple[int, Upstreams]) -> None:
    port, _ = proxy
    _reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(HOME, 0))
    writer.write(b"CONNECT api.allowed.te")
    await writer.drain()
    writer.close()
    status, _, _r, writer = await send(port, HOME, connect_head(f"{ALLOWED}:443"))
    writer.close()
    assert status == 200


async def test_the_home_agents_client_reaches_its_lan_host_in_plain_http(
        tls_echo: Upstreams, lan_server: int, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The home agent's own client (httpx, HTTP_PROXY as compose sets it). httpx cannot
    choose its source address, so here `home` is the agent at 127.0.0.1."""
    egress = await start_proxy(tls_echo, lan_server, home="127.0.0.1")
    port = port_of(egress)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    (tmp_path / "token").write_text("t0ken\n")
    ha = HomeAssistant(HomeSettings(url=f"http://{LAN}:8123", token_file=tmp_path / "token"))
    try:
        with capture_logs() as logs:
            states = await ha.states()
            changed = await ha.call_service("light", "turn_on", {"entity_id": ["light.desk"]})
            plain = await refused(port, "127.0.0.1", f"GET http://{ALLOWED}/ HTTP/1.1\r\n"
                                  f"Host: {ALLOWED}\r\n\r\n".encode())
            wrong_port = await refused(port, "127.0.0.1", f"GET http://{LAN}:8124/ HTTP/1.1\r\n"
                                       f"Host: {LAN}:8124\r\n\r\n".encode())
    finally:
        await egress.close()
    assert [s.entity_id for s in states] == ["light.desk"]
    assert [s.entity_id for s in changed] == ["light.desk"]
    first, second = HomeAssistantish.seen
    assert first["path"] == "/api/states"  # origin form: the upstream sees no proxy URL
    assert first["headers"]["Host"] == f"{LAN}:8123"
    assert first["headers"]["Authorization"] == "Bearer t0ken"
    assert first["headers"]["Connection"] == "close"
    assert second["method"] == "POST"
    assert second["path"] == "/api/services/light/turn_on"
    assert json.loads(second["body"]) == {"entity_id": ["light.desk"]}
    assert b"plain_http_not_allowed" in plain
    assert b"port_not_allowed" in wrong_port
    assert [(d["agent"], d["method"], d["reason"]) for d in decisions(logs)] == [
        ("home", "GET", "allowed_lan"), ("home", "POST", "allowed_lan"),
        ("home", "GET", "plain_http_not_allowed"), ("home", "GET", "port_not_allowed")]
    assert "t0ken" not in json.dumps(logs, default=str)  # headers and bodies are never logged


async def test_a_lan_host_still_may_not_be_link_local(proxy: tuple[int, Upstreams]) -> None:
    port, _ = proxy
    head = (b"GET http://meta.lan.test:8123/latest/meta-data HTTP/1.1\r\n"
            b"Host: meta.lan.test:8123\r\n\r\n")
    assert b"link_local_address" in await refused(port, HOME, head)


def test_rules_from_the_repository_policy() -> None:
    rules = EgressRules.from_policy(load_policy(REPO / "policy.yaml"))
    assert rules.agents == ["home"]  # the only scoped agent
    assert rules.decide("home", "HomeAssistant.local.", 443, tunnel=True) == Destination(
        "homeassistant.local", 443)
    # plain HTTP only to the LAN entry the policy opts into (egress_lan), on its port
    assert rules.decide("home", "homeassistant.local", 443, tunnel=False) == Refused(
        "port_not_allowed")
    assert rules.decide("home", "homeassistant.local", 8123, tunnel=False) == Destination(
        "homeassistant.local", 8123, lan=True)
    assert rules.decide("home", "homeassistant.local", 8080, tunnel=False) == Refused(
        "port_not_allowed")
    assert rules.decide("health", "homeassistant.local", 443, tunnel=True) == Refused(
        "host_not_allowed")
    assert rules.decide("home", "sub.homeassistant.local", 443, tunnel=True) == Refused(
        "host_not_allowed")


@pytest.mark.parametrize("spec", ["homeassistant.local", "homeassistant.local:0",
                                  "homeassistant.local:70000", "*.local:80", "http://x:80"])
def test_a_bad_lan_entry_names_the_problem(spec: str) -> None:
    with pytest.raises(ValueError, match="NAME:PORT"):
        lan_destination(spec)


async def test_the_service_listens_and_keeps_its_ready_file_fresh(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    port = free_port()
    settings = EgressSettings(listen=f"127.0.0.1:{port}", ready_file=ready)
    stop = asyncio.Event()
    task = asyncio.create_task(run_egress(load_policy(REPO / "policy.yaml"), settings,
                                          stop=stop))
    await eventually(ready.exists, timeout=10, what="ready file")
    # Listening: a client that is no scoped agent (this test) gets a refusal, not a reset.
    body = await refused(port, STRANGER, connect_head("homeassistant.local:443"))
    assert b"unknown_client" in body
    stop.set()
    await asyncio.wait_for(task, 10)
    assert not ready.exists()


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAS_EGRESS_LISTEN", "0.0.0.0:3128")
    monkeypatch.setenv("MAS_READY_FILE", "/tmp/mas-ready")
    settings = EgressSettings()
    assert settings.host_port == ("0.0.0.0", 3128)  # noqa: S104 (compose's value)
    assert settings.ready_path == Path("/tmp/mas-ready")



async def test_mas_egress_run_serves_until_sigterm(tmp_path: Path) -> None:
    """The command compose runs, with compose's settings (on loopback here)."""
    ready, port = tmp_path / "ready", free_port()
    code = ("from mas import cli; from mas.control_cli import register\n"
            "if not any(g.name == 'egress' for g in cli.app.registered_groups):\n"
            "    register(cli.app, cli.agent_app)\n"
            "cli.main()")
    env = {**os.environ, "MAS_ROOT": str(REPO), "MAS_EGRESS_LISTEN": f"127.0.0.1:{port}",
           "MAS_READY_FILE": str(ready)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "egress", "run", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await eventually(ready.exists, timeout=60, what="the proxy's ready file")
        body = await refused(port, STRANGER, connect_head("homeassistant.local:443"))
        assert b"unknown_client" in body
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert not ready.exists()
    lines = [json.loads(line) for line in err.decode().splitlines()]
    assert [e["event"] for e in lines if e["event"] == "egress.decision"] == ["egress.decision"]
