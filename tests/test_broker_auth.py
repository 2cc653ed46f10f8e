"""Who cannot get in: every login the broker must refuse, seen from the rogue client's side
and confirmed in the server log. A positive control proves the setup itself works."""

from __future__ import annotations

import json
import os
import ssl
import urllib.request
from pathlib import Path

import nats
import nats.errors
import nkeys
import pytest

from broker.secrets import load_identity
from security import pki
from tests.conftest import RunningBroker


def _ctx(broker: RunningBroker, identity: str = "health", *, cert: bool = True,
         max_version: ssl.TLSVersion | None = None,
         cert_files: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(broker.secrets.ca_cert))
    if max_version is not None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = max_version
    if cert:
        crt, key = cert_files or (
            broker.secrets.tls_cert(identity), broker.secrets.tls_key(identity)
        )
        ctx.load_cert_chain(str(crt), str(key))
    return ctx


async def _try_connect(broker: RunningBroker, **kwargs: object) -> list[Exception]:
    """Connect once without retries; return the errors seen. Raises if the login succeeded."""
    errors: list[Exception] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(exc)

    nc = nats.NATS()
    try:
        await nc.connect(servers=[kwargs.pop("url", broker.url)], allow_reconnect=False,
                         connect_timeout=2, error_cb=error_cb, **kwargs)  # type: ignore[arg-type]
    except Exception as exc:
        errors.append(exc)
        return errors
    await nc.close()
    raise AssertionError(f"login was accepted with {sorted(kwargs)}")


def _seed(broker: RunningBroker, identity: str = "health") -> str:
    return load_identity(broker.secrets, identity).nkey_seed


async def test_positive_control_real_credentials_connect(broker: RunningBroker) -> None:
    nc = await nats.connect(servers=[broker.url], tls=_ctx(broker), nkeys_seed_str=_seed(broker),
                            allow_reconnect=False, connect_timeout=2)
    assert nc.is_connected
    assert nc._server_info.get("tls_required") is True
    await nc.close()


async def test_anonymous_client_with_valid_certificate_is_refused(broker: RunningBroker) -> None:
    errors = await _try_connect(broker, tls=_ctx(broker))
    assert any(isinstance(e, nats.errors.AuthorizationError) or "authorization" in str(e).lower()
               for e in errors), errors
    await broker.wait_for_log("authentication error")
    assert any(line.rstrip().endswith("- authentication error")
               for line in broker.log().splitlines()), "no nkey-less login refusal logged"


async def test_unknown_nkey_is_refused(broker: RunningBroker) -> None:
    stranger = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    public = nkeys.from_seed(bytearray(stranger.encode())).public_key.decode()
    errors = await _try_connect(broker, tls=_ctx(broker), nkeys_seed_str=stranger)
    assert errors
    line = await broker.wait_for_log(public)
    assert "authentication error" in line


async def test_client_without_certificate_is_refused(broker: RunningBroker) -> None:
    errors = await _try_connect(broker, tls=_ctx(broker, cert=False), nkeys_seed_str=_seed(broker))
    assert errors
    await broker.wait_for_log("client didn't provide a certificate")


async def test_tls12_client_is_refused(broker: RunningBroker) -> None:
    ctx = _ctx(broker, max_version=ssl.TLSVersion.TLSv1_2)
    errors = await _try_connect(broker, tls=ctx, nkeys_seed_str=_seed(broker))
    assert errors
    line = await broker.wait_for_log("client offered only unsupported versions")
    assert "TLS handshake error" in line


async def test_certificate_from_a_foreign_ca_is_refused(
    broker: RunningBroker, tmp_path: Path
) -> None:
    rogue_ca = pki.create_ca("rogue-ca")
    pair = pki.issue_certificate(rogue_ca, "health", client=True)
    pki.save(pair, tmp_path / "tls.crt", tmp_path / "tls.key")
    ctx = _ctx(broker, cert_files=(tmp_path / "tls.crt", tmp_path / "tls.key"))
    errors = await _try_connect(broker, tls=ctx, nkeys_seed_str=_seed(broker))
    assert errors
    await broker.wait_for_log("certificate signed by unknown authority")


async def test_plaintext_client_is_refused(broker: RunningBroker) -> None:
    errors = await _try_connect(broker, url=broker.url.replace("tls://", "nats://"),
                                nkeys_seed_str=_seed(broker))
    assert errors


async def test_stolen_nkey_alone_is_not_enough_without_a_certificate(
    broker: RunningBroker,
) -> None:
    """Two factors: an nkey seed leaked from one container still needs a CA-issued cert."""
    errors = await _try_connect(broker, tls=_ctx(broker, cert=False),
                                nkeys_seed_str=_seed(broker, "orchestrator"))
    assert errors


def test_monitoring_and_client_port_listen_on_loopback_only(broker: RunningBroker) -> None:
    url = broker.server.monitor_url(broker.project.policy().broker.monitor) + "/varz"
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 (loopback)
        varz = json.loads(resp.read())
    assert varz["http_host"] == "127.0.0.1"
    assert varz["host"] == "127.0.0.1"
    assert varz["tls_required"] is True
    assert varz["tls_verify"] is True
    assert varz["auth_required"] is True


@pytest.mark.parametrize("identity", ["orchestrator", "control", "operator", "health"])
async def test_each_identity_logs_in_with_its_own_material(
    broker: RunningBroker, identity: str
) -> None:
    nc = await nats.connect(servers=[broker.url], tls=_ctx(broker, identity),
                            nkeys_seed_str=_seed(broker, identity), allow_reconnect=False,
                            connect_timeout=2)
    await nc.flush()
    await nc.close()
