"""The dashboard's login secret: one random string in ``secrets/dashboard/login.secret``.

Created the first time it is needed (by ``mas init`` once it calls ``ensure_secret``, or
by ``mas dashboard``), mode 0600 from the first byte, and never overwritten: a second
caller that races the first reads the winner's file. Whoever can read the secrets folder
can log in, which is the same person who can already sign approvals with the operator key.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from broker.errors import SecretsError
from broker.layout import SecretsLayout
from security.errors import SecurityError
from security.keys import read_private_file

SECRET_BYTES = 32


def secret_path(layout: SecretsLayout) -> Path:
    return layout.root / "dashboard" / "login.secret"


@dataclass(frozen=True)
class LoginSecret:
    path: Path
    value: str
    created: bool

    def matches(self, attempt: str) -> bool:
        """Constant-time: the time taken does not depend on how much of it was right."""
        return hmac.compare_digest(attempt.encode("utf-8"), self.value.encode("utf-8"))


def ensure_secret(layout: SecretsLayout) -> LoginSecret:
    """The login secret, created if missing (0600, O_EXCL: never replaces a file)."""
    path = secret_path(layout)
    created = False
    if not layout.root.is_dir():
        raise SecretsError(f"no secrets folder at {layout.root}; run `mas init` first")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, (secrets.token_urlsafe(SECRET_BYTES) + "\n").encode("ascii"))
            finally:
                os.close(fd)
            created = True
    return LoginSecret(path, read_secret(path), created)


def read_secret(path: Path) -> str:
    try:
        value = read_private_file(path).decode("utf-8", "replace").strip()
    except SecurityError as exc:
        raise SecretsError(f"dashboard login secret: {exc}") from None
    if len(value) < 16:
        raise SecretsError(f"{path} holds no usable login secret (under 16 characters); "
                           "delete it and run `mas dashboard --url` to make a new one")
    return value
