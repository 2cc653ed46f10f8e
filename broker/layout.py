"""Where an install's secrets live. The one place the layout is spelled: `mas init` writes
it, the loaders read it, and the compiler names the same files (relative to the project
root, where nats-server runs) in nats-server.conf."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SECRETS_DIR = "secrets"


@dataclass(frozen=True)
class SecretsLayout:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "nats" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "nats" / "server.key"

    @property
    def nats_include(self) -> Path:
        return self.root / "nats" / "identities.conf"

    @property
    def trust(self) -> Path:
        return self.root / "trust.json"

    def identity_dir(self, identity: str) -> Path:
        return self.root / identity

    def nkey_seed(self, identity: str) -> Path:
        return self.identity_dir(identity) / "nkey.seed"

    def tls_cert(self, identity: str) -> Path:
        return self.identity_dir(identity) / "tls.crt"

    def tls_key(self, identity: str) -> Path:
        return self.identity_dir(identity) / "tls.key"

    def signing_key(self, identity: str) -> Path:
        return self.identity_dir(identity) / "signing.key"

    @classmethod
    def in_project(cls, project_root: Path) -> SecretsLayout:
        return cls(project_root / SECRETS_DIR)


# The same files as nats-server sees them: relative to the project root it runs in.
RELATIVE = SecretsLayout(Path(SECRETS_DIR))
