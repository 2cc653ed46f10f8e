"""A real Home Assistant for the optional test: found through ``MAS_TEST_HASS`` (the path
of a ``hass`` executable, e.g. from a separate ``pip install homeassistant==2024.3.3``
venv) or ``hass`` on PATH.

It runs on loopback with every core setting given (so it detects nothing over the
network) and ``--skip-pip`` (so it installs nothing); a long-lived access token is
written into its auth storage the way Home Assistant stores one, and signed the way it
signs them (HS256 JWT with the refresh token's key, issuer = the refresh token's id).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx2

from tests.conftest import stop_process

CONFIG = """\
homeassistant:
  name: MAS test
  latitude: 52.37
  longitude: 4.89
  elevation: 0
  unit_system: metric
  time_zone: UTC
  currency: EUR
  country: NL
  internal_url: "http://127.0.0.1:{port}"
  external_url: "http://127.0.0.1:{port}"
http:
  server_host: 127.0.0.1
  server_port: {port}
api:
input_boolean:
  desk_lamp:
    name: Desk lamp
"""


def hass_executable() -> str | None:
    return os.environ.get("MAS_TEST_HASS") or shutil.which("hass")


@dataclass(frozen=True)
class RealHomeAssistant:
    url: str
    token: str
    config_dir: Path


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def long_lived_token(refresh_id: str, jwt_key: str) -> str:
    now = int(time.time())
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = _b64(json.dumps({"iss": refresh_id, "iat": now, "exp": now + 3600}).encode())
    signature = hmac.new(jwt_key.encode(), f"{header}.{claims}".encode(), hashlib.sha256)
    return f"{header}.{claims}.{_b64(signature.digest())}"


def write_config(config_dir: Path, port: int) -> str:
    """Configuration and auth storage; returns the long-lived access token."""
    (config_dir / ".storage").mkdir(parents=True)
    (config_dir / "configuration.yaml").write_text(CONFIG.format(port=port))
    user_id, refresh_id = secrets.token_hex(16), secrets.token_hex(16)
    jwt_key = secrets.token_hex(64)
    auth = {"version": 1, "minor_version": 1, "key": "auth", "data": {
        "users": [{"id": user_id, "group_ids": ["system-admin"], "is_owner": True,
                   "is_active": True, "name": "mas", "system_generated": False,
                   "local_only": False}],
        "groups": [{"id": "system-admin", "name": "Administrators"},
                   {"id": "system-users", "name": "Users"},
                   {"id": "system-read-only", "name": "Read Only"}],
        "credentials": [],
        "refresh_tokens": [{
            "id": refresh_id, "user_id": user_id, "client_id": None,
            "client_name": "mas-home-test", "client_icon": None,
            "token_type": "long_lived_access_token",
            "created_at": datetime.now(UTC).isoformat(), "access_token_expiration": 3600.0,
            "token": secrets.token_hex(64), "jwt_key": jwt_key, "last_used_at": None,
            "last_used_ip": None, "expire_at": None, "credential_id": None,
            "version": "2024.3.3"}],
    }}
    (config_dir / ".storage" / "auth").write_text(json.dumps(auth))
    return long_lived_token(refresh_id, jwt_key)


@contextmanager
def running(hass: str, config_dir: Path, port: int,
            timeout_s: float = 180.0) -> Iterator[RealHomeAssistant]:
    token = write_config(config_dir, port)
    url = f"http://127.0.0.1:{port}"
    log = (config_dir / "hass.out").open("wb")
    proc = subprocess.Popen([hass, "-c", str(config_dir), "--skip-pip"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"hass exited with {proc.returncode}; see {config_dir}")
            try:
                ready = httpx2.get(f"{url}/api/states/input_boolean.desk_lamp", timeout=2,
                                   headers={"Authorization": f"Bearer {token}"})
                if ready.status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"hass did not serve the API within {timeout_s:g}s")
            time.sleep(0.5)
        yield RealHomeAssistant(url, token, config_dir)
    finally:
        stop_process(proc)
        log.close()
