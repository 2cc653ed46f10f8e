"""The secrets folder: what `mas init` creates and how each identity's material is loaded.

Layout (other parts of the platform and operators rely on it)::

    secrets/ca.crt, secrets/ca.key                  the install's private CA
    secrets/nats/server.crt, server.key              the broker's TLS identity
    secrets/nats/identities.conf                     nkey public keys (nats-server include)
    secrets/<identity>/nkey.seed                     broker login (nkey)
    secrets/<identity>/tls.crt, tls.key              client certificate
    secrets/<identity>/signing.key                   Ed25519 envelope key; the orchestrator's
                                                     also signs tokens, the operator's approvals
    secrets/trust.json                               public keys every verifier trusts

Every file is 0600, the folders 0700. Nothing is overwritten without ``force``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import nkeys
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from broker.compiler import nkey_variable
from broker.errors import SecretsError
from broker.layout import SecretsLayout
from broker.policy import Policy
from security import pki
from security.errors import SecurityError
from security.keys import (
    KeyRing,
    SigningKey,
    VerifyKey,
    load_signing_key,
    read_private_file,
    save_signing_key,
    write_private_file,
)

FIX = "run `mas init` to create what is missing, or `mas init --force` to start over"


def _public_key(text: str) -> str:
    try:
        VerifyKey.from_text(text)
    except SecurityError as exc:
        raise ValueError(str(exc)) from None
    return text


# Every key must parse when trust.json is loaded, so a bad one is reported against the
# file (load_trust turns the ValidationError into a SecretsError) and not later, mid-run.
PublicKeyText = Annotated[str, AfterValidator(_public_key)]


class Trust(BaseModel):
    """Public keys of this install: who signs envelopes, who may issue tokens and approve."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    envelope_keys: dict[str, list[PublicKeyText]]
    token_issuers: list[PublicKeyText]
    approvers: list[PublicKeyText]

    def sender_rings(self) -> dict[str, KeyRing]:
        return {
            name: KeyRing(VerifyKey.from_text(k) for k in keys)
            for name, keys in self.envelope_keys.items()
        }

    def issuer_ring(self) -> KeyRing:
        return KeyRing(VerifyKey.from_text(k) for k in self.token_issuers)

    def approver_ring(self) -> KeyRing:
        return KeyRing(VerifyKey.from_text(k) for k in self.approvers)


@dataclass
class InitReport:
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class IdentityMaterial:
    """Everything one identity needs to talk to the broker, loaded and checked."""

    identity: str
    nkey_seed: str
    nkey_public: str
    tls_cert: Path
    tls_key: Path
    ca_cert: Path
    signing_key: SigningKey
    trust: Trust


def _new_nkey_seed() -> bytes:
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def _nkey_public(seed: bytes, path: Path) -> str:
    try:
        return str(nkeys.from_seed(bytearray(seed.strip())).public_key.decode("ascii"))
    except Exception as exc:
        raise SecretsError(f"{path}: not a valid nkey user seed; {FIX}") from exc


def _load_nkey_seed(path: Path) -> tuple[str, str]:
    try:
        raw = read_private_file(path)
    except SecurityError as exc:
        raise SecretsError(f"{exc}; {FIX}") from None
    if not raw.strip().startswith(b"SU"):
        raise SecretsError(f"{path}: not an nkey user seed (must start with SU); {FIX}")
    try:
        seed = raw.strip().decode("ascii")
    except UnicodeDecodeError:
        # Never chain or echo the bytes: they are (a damaged copy of) seed material.
        raise SecretsError(f"{path}: not a valid nkey user seed (not ASCII text); {FIX}") from None
    return seed, _nkey_public(raw, path)


def _ensure_pair(
    cert: Path, key: Path, ca: pki.CertifiedKey, force: bool, report: InitReport, *,
    common_name: str, client: bool, server_names: tuple[str, ...] = (),
) -> None:
    """Issue a certificate if missing (or forced); otherwise check it is from our CA."""
    if force or not (cert.exists() or key.exists()):
        pair = pki.issue_certificate(ca, common_name, server_names=server_names, client=client)
        pki.save(pair, cert, key)
        report.created += [cert, key]
        return
    try:
        loaded = pki.load(cert, key)
        pki.check_issued_by(loaded.cert, ca.cert, cert)
    except SecurityError as exc:
        raise SecretsError(f"{exc}; run `mas init --force` to reissue") from None
    report.kept += [cert, key]


def init_secrets(policy: Policy, layout: SecretsLayout, *, force: bool = False) -> InitReport:
    """Create what is missing (or everything with ``force``); check what exists."""
    report = InitReport()
    layout.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(layout.root, 0o700)
    ca_exists = layout.ca_cert.exists() or layout.ca_key.exists()
    if force or not ca_exists:
        ca = pki.create_ca()
        pki.save(ca, layout.ca_cert, layout.ca_key)
        report.created += [layout.ca_cert, layout.ca_key]
    else:
        try:
            ca = pki.load(layout.ca_cert, layout.ca_key)
        except SecurityError as exc:
            raise SecretsError(f"{exc}; {FIX}") from None
        report.kept += [layout.ca_cert, layout.ca_key]
    _ensure_pair(layout.server_cert, layout.server_key, ca, force, report, common_name="nats",
                 client=False, server_names=tuple(policy.broker.server_names))

    nkey_publics: dict[str, str] = {}
    envelope_keys: dict[str, list[str]] = {}
    for identity in policy.identities():
        seed_path = layout.nkey_seed(identity)
        if force or not seed_path.exists():
            write_private_file(seed_path, _new_nkey_seed() + b"\n")
            report.created.append(seed_path)
        else:
            report.kept.append(seed_path)
        nkey_publics[identity] = _load_nkey_seed(seed_path)[1]
        _ensure_pair(layout.tls_cert(identity), layout.tls_key(identity), ca, force, report,
                     common_name=identity, client=True)
        key_path = layout.signing_key(identity)
        if force or not key_path.exists():
            save_signing_key(key_path, SigningKey.generate())
            report.created.append(key_path)
        else:
            report.kept.append(key_path)
        try:
            envelope_keys[identity] = [load_signing_key(key_path).public.to_text()]
        except SecurityError as exc:
            raise SecretsError(f"{exc}; {FIX}") from None

    write_private_file(layout.nats_include, identities_include(nkey_publics).encode())
    trust = Trust(
        envelope_keys=envelope_keys,
        token_issuers=envelope_keys["orchestrator"],
        approvers=envelope_keys["operator"],
    )
    write_private_file(layout.trust, (trust.model_dump_json(indent=2) + "\n").encode())
    return report


def load_trust(layout: SecretsLayout) -> Trust:
    try:
        return Trust.model_validate_json(read_private_file(layout.trust))
    except SecurityError as exc:
        raise SecretsError(f"{exc}; {FIX}") from None
    except (ValidationError, json.JSONDecodeError) as exc:
        raise SecretsError(f"{layout.trust}: not a valid trust file; {FIX}") from exc


def load_identity(layout: SecretsLayout, identity: str) -> IdentityMaterial:
    """Load and check one identity's material; every failure names the file and the fix."""
    if not layout.identity_dir(identity).is_dir():
        raise SecretsError(f"{layout.identity_dir(identity)}: no secrets for {identity!r}; {FIX}")
    seed, public = _load_nkey_seed(layout.nkey_seed(identity))
    try:
        ca = pki.load_certificate(layout.ca_cert)
        pair = pki.load(layout.tls_cert(identity), layout.tls_key(identity))
        pki.check_issued_by(pair.cert, ca, layout.tls_cert(identity))
        signing = load_signing_key(layout.signing_key(identity))
    except SecurityError as exc:
        raise SecretsError(f"{exc}; {FIX}") from None
    return IdentityMaterial(
        identity=identity,
        nkey_seed=seed,
        nkey_public=public,
        tls_cert=layout.tls_cert(identity),
        tls_key=layout.tls_key(identity),
        ca_cert=layout.ca_cert,
        signing_key=signing,
        trust=load_trust(layout),
    )


def identities_include(nkeys: dict[str, str]) -> str:
    """The per-install include: one variable per identity holding its nkey public key."""
    lines = ["# Written by `mas init`: this install's nkey public keys. Not secret, not shared."]
    lines += [f"{nkey_variable(name)}: {json.dumps(key)}" for name, key in sorted(nkeys.items())]
    return "\n".join(lines) + "\n"


__all__ = ["IdentityMaterial", "SecretsLayout", "Trust", "init_secrets", "load_identity",
           "load_trust"]
