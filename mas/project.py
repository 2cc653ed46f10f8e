"""Where a project's files live: found from --root, $MAS_ROOT, or the nearest policy.yaml above."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from broker.compiler import CONFIG_NAME
from broker.errors import PolicyError
from broker.policy import Policy, load_policy
from broker.secrets import SecretsLayout

POLICY_NAME = "policy.yaml"


@dataclass(frozen=True)
class Project:
    root: Path

    @property
    def policy_path(self) -> Path:
        return self.root / POLICY_NAME

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def secrets(self) -> SecretsLayout:
        return SecretsLayout.in_project(self.root)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def policy(self) -> Policy:
        return load_policy(self.policy_path)


def find_project(root: Path | None = None) -> Project:
    if root is None and os.environ.get("MAS_ROOT"):
        root = Path(os.environ["MAS_ROOT"])
    if root is not None:
        root = root.resolve()
        if not (root / POLICY_NAME).is_file():
            raise PolicyError(f"no {POLICY_NAME} in {root}; pass the project folder with --root")
        return Project(root)
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / POLICY_NAME).is_file():
            return Project(folder)
    raise PolicyError(f"no {POLICY_NAME} here or above {here}; cd into the project or use --root")
