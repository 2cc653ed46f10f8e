"""The secrets folder `mas init` creates: layout, permissions, idempotency, and load errors
that name the file and the fix."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
from pathlib import Path

import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from broker.errors import SecretsError
from broker.policy import Policy, load_policy
from broker.secrets import SecretsLayout, init_secrets, load_identity, load_trust
from security.keys import load_signing_key
from tests.conftest import REPO

POLICY = load_policy(REPO / "policy.yaml")
PER_IDENTITY = ("nkey.seed", "tls.crt", "tls.key", "signing.key")
SHARED = ("ca.crt", "ca.key", "nats/server.crt", "nats/server.key", "nats/identities.conf",
          "trust.json")


def expected_files(policy: Policy) -> set[str]:
    files = set(SHARED)
    for identity in policy.identities():
        files |= {f"{identity}/{name}" for name in PER_IDENTITY}
    return files


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def other_install(tmp_path_factory: pytest.TempPathFactory) -> SecretsLayout:
    """A second, independent install (its own CA) to borrow foreign files from."""
    layout = SecretsLayout(tmp_path_factory.mktemp("other") / "secrets")
    init_secrets(POLICY, layout)
    return layout


@pytest.fixture
def layout(tmp_path: Path) -> SecretsLayout:
    layout = SecretsLayout(tmp_path / "secrets")
    init_secrets(POLICY, layout)
    return layout


# --- layout -------------------------------------------------------------------------------


def test_init_creates_the_documented_layout(tmp_path: Path) -> None:
    layout = SecretsLayout(tmp_path / "secrets")
    report = init_secrets(POLICY, layout)
    files = snapshot(layout.root)
    assert set(files) == expected_files(POLICY)
    # Every per-identity file and the CA/server pairs are reported as created.
    assert {str(p.relative_to(layout.root)) for p in report.created} == (
        expected_files(POLICY) - {"nats/identities.conf", "trust.json"})
    assert report.kept == []
    assert len(POLICY.identities()) == 9


def test_every_file_is_0600_and_every_directory_0700(tmp_path: Path) -> None:
    layout = SecretsLayout(tmp_path / "secrets")
    init_secrets(POLICY, layout)
    assert stat.S_IMODE(layout.root.stat().st_mode) == 0o700
    paths = list(layout.root.rglob("*"))
    assert len([p for p in paths if p.is_dir()]) == len(POLICY.identities()) + 1  # + nats/
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        assert mode == want, f"{path}: {mode:04o}"


def test_modes_hold_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        layout = SecretsLayout(tmp_path / "secrets")
        init_secrets(POLICY, layout)
    finally:
        os.umask(old)
    for path in [layout.root, *layout.root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path}: {mode:04o}"


def test_files_hold_what_they_claim(layout: SecretsLayout) -> None:
    include = layout.nats_include.read_text()
    trust = load_trust(layout)
    for identity in POLICY.identities():
        material = load_identity(layout, identity)
        assert material.nkey_seed.startswith("SU")
        public = nkeys.from_seed(bytearray(material.nkey_seed.encode())).public_key.decode()
        assert public == material.nkey_public
        assert f'NKEY_{identity.upper()}: "{public}"' in include
        assert trust.envelope_keys[identity] == [material.signing_key.public.to_text()]
        assert material.tls_cert == layout.tls_cert(identity)
        assert material.ca_cert == layout.ca_cert
    assert trust.token_issuers == trust.envelope_keys["orchestrator"]
    assert trust.approvers == trust.envelope_keys["operator"]
    # Keys are distinct per identity.
    publics = [load_identity(layout, i).nkey_public for i in POLICY.identities()]
    assert len(set(publics)) == len(publics)
    # The trust file is plain JSON with only public material.
    text = layout.trust.read_text()
    assert json.loads(text)["version"] == 1
    assert "seed" not in text
    assert "PRIVATE" not in text


# --- idempotency ----------------------------------------------------------------------------


def test_second_init_creates_nothing_and_changes_no_byte(layout: SecretsLayout) -> None:
    before = snapshot(layout.root)
    report = init_secrets(POLICY, layout)
    assert report.created == []
    assert len(report.kept) == len(before) - 2  # include and trust are derived, not "kept"
    assert snapshot(layout.root) == before


def test_deleted_seed_is_recreated_alone(layout: SecretsLayout) -> None:
    before = snapshot(layout.root)
    seed = layout.nkey_seed("health")
    seed.unlink()
    report = init_secrets(POLICY, layout)
    assert report.created == [seed]
    after = snapshot(layout.root)
    assert set(after) == set(before)
    changed = {name for name in before if before[name] != after[name]}
    # The new seed, and the include that publishes its public key; nothing else.
    assert changed == {"health/nkey.seed", "nats/identities.conf"}
    assert stat.S_IMODE(seed.stat().st_mode) == 0o600
    assert load_identity(layout, "health").nkey_public in layout.nats_include.read_text()


def test_deleted_identity_dir_is_recreated(layout: SecretsLayout) -> None:
    before = snapshot(layout.root)
    shutil.rmtree(layout.identity_dir("notify"))
    report = init_secrets(POLICY, layout)
    assert {p.relative_to(layout.root).as_posix() for p in report.created} == {
        f"notify/{n}" for n in PER_IDENTITY}
    after = snapshot(layout.root)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {f"notify/{n}" for n in PER_IDENTITY} | {"nats/identities.conf",
                                                                "trust.json"}
    assert stat.S_IMODE(layout.identity_dir("notify").stat().st_mode) == 0o700


def test_force_replaces_everything(layout: SecretsLayout) -> None:
    before = snapshot(layout.root)
    report = init_secrets(POLICY, layout, force=True)
    assert report.kept == []
    after = snapshot(layout.root)
    assert set(after) == set(before)
    same = sorted(name for name in before if before[name] == after[name])
    assert same == []
    for identity in POLICY.identities():
        load_identity(layout, identity)  # the new set is consistent


def test_init_refuses_a_foreign_existing_certificate(
        layout: SecretsLayout, other_install: SecretsLayout) -> None:
    shutil.copy(other_install.tls_cert("home"), layout.tls_cert("home"))
    shutil.copy(other_install.tls_key("home"), layout.tls_key("home"))
    with pytest.raises(SecretsError) as info:
        init_secrets(POLICY, layout)
    message = str(info.value)
    assert str(layout.tls_cert("home")) in message
    assert "not issued by this install's CA" in message
    assert "mas init --force" in message


# --- load_identity errors -----------------------------------------------------------------


def assert_names_file_and_fix(exc: SecretsError, path: Path, *needles: str) -> None:
    message = str(exc)
    assert str(path) in message, message
    assert "mas init" in message, message
    for needle in needles:
        assert needle in message, message
    assert "\n" not in message


def test_missing_identity_dir(layout: SecretsLayout) -> None:
    shutil.rmtree(layout.identity_dir("backup"))
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "backup")
    assert_names_file_and_fix(info.value, layout.identity_dir("backup"), "no secrets for")


def test_unknown_identity(layout: SecretsLayout) -> None:
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "nobody")
    assert_names_file_and_fix(info.value, layout.identity_dir("nobody"))


def test_missing_seed(layout: SecretsLayout) -> None:
    layout.nkey_seed("health").unlink()
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "health")
    assert_names_file_and_fix(info.value, layout.nkey_seed("health"), "missing")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"not a seed\n", "must start with SU"),
        (b"SUAAAAAAAAAAAAAAAAAAAAAAAA\n", "not a valid nkey user seed"),
        (b"", "must start with SU"),
    ],
    ids=["garbage", "truncated", "empty"],
)
def test_corrupt_seed(layout: SecretsLayout, content: bytes, needle: str) -> None:
    seed = layout.nkey_seed("health")
    seed.write_bytes(content)
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "health")
    assert_names_file_and_fix(info.value, seed, needle)
    assert "SUAAAA" not in str(info.value)  # never echo seed material


def test_seed_readable_by_others(layout: SecretsLayout) -> None:
    seed = layout.nkey_seed("health")
    seed.chmod(0o644)
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "health")
    assert_names_file_and_fix(info.value, seed, "0644", f"chmod 600 {seed}")


def test_signing_key_readable_by_group(layout: SecretsLayout) -> None:
    key = layout.signing_key("notify")
    key.chmod(0o640)
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "notify")
    assert_names_file_and_fix(info.value, key, "chmod 600")


def test_corrupt_signing_key(layout: SecretsLayout) -> None:
    key = layout.signing_key("notify")
    key.write_text("mas-ed25519-seed:short\n")
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "notify")
    assert_names_file_and_fix(info.value, key, "not an Ed25519 seed file")


def test_certificate_from_another_ca(layout: SecretsLayout,
                                     other_install: SecretsLayout) -> None:
    shutil.copy(other_install.tls_cert("home"), layout.tls_cert("home"))
    shutil.copy(other_install.tls_key("home"), layout.tls_key("home"))
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "home")
    assert_names_file_and_fix(info.value, layout.tls_cert("home"),
                              "not issued by this install's CA")


def test_key_not_matching_certificate(layout: SecretsLayout) -> None:
    shutil.copy(layout.tls_key("control"), layout.tls_key("home"))
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "home")
    assert_names_file_and_fix(info.value, layout.tls_key("home"),
                              f"does not belong to {layout.tls_cert('home')}")


def test_corrupt_certificate(layout: SecretsLayout) -> None:
    layout.tls_cert("home").write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "home")
    assert_names_file_and_fix(info.value, layout.tls_cert("home"), "not a PEM certificate")


def test_corrupt_trust_file(layout: SecretsLayout) -> None:
    layout.trust.write_text("{not json")
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "health")
    assert_names_file_and_fix(info.value, layout.trust, "not a valid trust file")


def test_non_ascii_seed(layout: SecretsLayout) -> None:
    seed = layout.nkey_seed("health")
    seed.write_bytes(b"SU\xc3\xa9\xff" + b"A" * 50 + b"\n")
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "health")
    assert_names_file_and_fix(info.value, seed, "not a valid nkey user seed", "not ASCII")
    assert info.value.__cause__ is None  # the damaged seed bytes are not chained along


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("token_issuers", "rsa:AAAA"),
        ("approvers", "ed25519:not*base64"),
        ("envelope_keys", "ed25519:AAAA"),  # valid base64url, but not 32 bytes
        ("envelope_keys", "ed25519:é"),
    ],
    ids=["prefix", "base64", "short", "non-ascii"],
)
def test_bad_key_in_trust_file(layout: SecretsLayout, field: str, bad: str) -> None:
    data = json.loads(layout.trust.read_text())
    if field == "envelope_keys":
        data[field]["health"] = [bad]
    else:
        data[field] = [*data[field], bad]
    layout.trust.write_text(json.dumps(data))
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "health")
    assert_names_file_and_fix(info.value, layout.trust, "not a valid trust file")
    with pytest.raises(SecretsError) as info:
        load_trust(layout)
    assert_names_file_and_fix(info.value, layout.trust, "not a valid trust file")


def _ed25519_pair() -> tuple[bytes, bytes]:
    """A self-signed Ed25519 certificate and its key: well-formed, but not what TLS here uses."""
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "home")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, None))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.mark.parametrize("with_key", [False, True], ids=["cert-only", "cert-and-key"])
def test_certificate_with_a_non_ec_key(layout: SecretsLayout, with_key: bool) -> None:
    cert_pem, key_pem = _ed25519_pair()
    layout.tls_cert("home").write_bytes(cert_pem)
    if with_key:
        layout.tls_key("home").write_bytes(key_pem)
    with pytest.raises(SecretsError) as info:
        load_identity(layout, "home")
    assert_names_file_and_fix(info.value, layout.tls_cert("home"),
                              "expected a certificate for an EC (P-256) key")


def test_loaded_identity_is_usable(layout: SecretsLayout) -> None:
    material = load_identity(layout, "orchestrator")
    signature = material.signing_key.sign(b"hello")
    assert material.trust.issuer_ring().get(material.signing_key.kid) is not None
    assert material.signing_key.public.verify(b"hello", signature)
    assert load_signing_key(layout.signing_key("orchestrator")).kid == material.signing_key.kid
    assert "SU" not in repr(material.signing_key)


# --- never committed ------------------------------------------------------------------------


def test_gitignore_ignores_the_secrets_folder() -> None:
    lines = [ln.strip() for ln in (REPO / ".gitignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert any(p in ("/secrets/", "/secrets", "secrets/", "secrets") for p in patterns), patterns
    # ... and nothing re-includes it afterwards.
    assert not any(p.startswith("!") and "secrets" in p for p in patterns), patterns
