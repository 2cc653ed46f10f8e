"""A throwaway project and its real nats-server, the way `mas init` and `mas up` make them.

Benchmarks measure the real broker: the repository's ``policy.yaml`` copied into a temp
folder, fresh secrets (``init_secrets``), the compiled deny-by-default config, mutual TLS
1.3 and nkeys, on free ports on 127.0.0.1. Everything is removed by ``close``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from bench.common import REPO, free_port
from broker.compiler import compile_config
from broker.secrets import SecretsLayout, init_secrets
from broker.server import NatsServer
from mas.project import Project


def make_project(root: Path, *, own_ports: bool = False, workflows: bool = False) -> Project:
    """Copy the policy into ``root``, create its secrets and compile its config.
    ``own_ports`` points the policy's listen and monitor addresses at free ports (for
    `mas up`, which reads them from the policy); ``workflows`` copies the repository's."""
    project = Project(root)
    root.mkdir(parents=True, exist_ok=True)
    text = (REPO / "policy.yaml").read_text()
    if own_ports:
        for key in ("listen", "monitor"):
            text, n = re.subn(rf"{key}: 127\.0\.0\.1:\d+", f"{key}: 127.0.0.1:{free_port()}",
                              text)
            if n != 1:
                raise RuntimeError(f"policy.yaml has no single broker.{key} on 127.0.0.1")
    project.policy_path.write_text(text)
    if workflows:
        shutil.copytree(REPO / "workflows", root / "workflows")
    policy = project.policy()
    init_secrets(policy, project.secrets)
    project.config_path.write_text(compile_config(policy))
    return project


class Broker:
    """A throwaway project (repo policy, fresh secrets, compiled config) and its server."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="mas-bench-"))
        self.project = Project(self.tmp / "project")
        self.server: NatsServer | None = None

    @property
    def secrets(self) -> SecretsLayout:
        return self.project.secrets

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"tls://127.0.0.1:{self.server.port}"

    def start(self) -> None:
        self.project = make_project(self.project.root)
        policy = self.project.policy()
        self.server = NatsServer(config=self.project.config_path, cwd=self.project.root,
                                 log_file=self.tmp / "nats-server.log", port=free_port(),
                                 http_port=free_port())
        self.server.check_config()
        self.server.start()
        self.server.wait_ready(policy.broker.monitor)

    def close(self) -> None:
        try:
            if self.server is not None:
                self.server.stop()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
