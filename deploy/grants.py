"""Which secret files each container may read, and the init container that hands them over.

Every service that holds a broker identity runs as a uid of its own (``service_uid``) and
finds its files under ``/mas/secrets`` in a named volume of its own, mounted read-only.
The one-shot ``init`` service (root, no network) runs ``python -m deploy.grants``: it
creates what is missing in ``./secrets`` exactly like ``mas init``, then copies each
service's files into that service's volume, owned by the service's uid with mode 0400, and
removes anything else from it. So a service can read its own files and no other container
user can; no volume holds another identity's seed.

Why volumes and not compose ``secrets:``: without Swarm a file secret is a bind mount of
the host file. It must exist when compose creates the containers, which is before init has
run on a fresh checkout, and it keeps the host file's owner and mode (0600, whoever ran
``mas init``), which a container user cannot read on Linux; compose ignores ``uid``,
``gid`` and ``mode`` for them. Volumes exist from the start and take the owner init gives.

Besides its identity's four files, the CA and the trust file, a service receives every
other regular file in ``secrets/<identity>/`` (an agent's API token, say), except
``settings.env``, which compose reads on the host as that agent's environment. The
orchestrator also gets the public ``nats/identities.conf`` (nkey -> identity, for naming
whoever the broker's log reports); the dashboard gets the operator's files and its login
secret, and nothing from ``secrets/operator/`` beyond them.

init also creates the dashboard's login secret (like ``mas init``) and gives the state
volumes their owners: nats writes its log to one the orchestrator reads, and the
orchestrator keeps its audit checkpoints in one of its own (``STATE``).
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from broker.errors import BrokerError
from broker.layout import RELATIVE, SecretsLayout
from broker.policy import Policy, load_policy
from broker.secrets import init_secrets
from dashboard.login import ensure_secret, secret_path
from security.errors import SecurityError

# nats owns the JetStream volume, which starts as the image's /mas/data (owned by 10001 in
# docker/runtime/Dockerfile); the egress proxy and the trace viewer hold no identity.
PLATFORM_UIDS = {"nats": 10001, "orchestrator": 10002, "control": 10003, "egress": 10004,
                 "dashboard": 10005, "tracing": 10006}
AGENT_UID_BASE = 10100  # agents in name order; init re-applies owners on every start
SETTINGS_FILE = "settings.env"  # an agent's environment, read by compose on the host
IDENTITY_FILES = ("nkey_seed", "tls_cert", "tls_key", "signing_key")  # SecretsLayout methods
SHARED_FILES = ("ca_cert", "trust")
NATS_FILES = ("ca_cert", "server_cert", "server_key", "nats_include")
GRANTS_DIR = "/mas/grants"  # where init mounts the services' volumes, one folder each
STATE_DIR = "/mas/state"  # where init mounts the state volumes, one folder each
NATS_LOG_DIR = "/mas/log"
CHECKPOINTS_DIR = "/mas/audit"


@dataclass(frozen=True)
class State:
    """A volume a service writes (and others may read): init makes it the writer's."""

    volume: str
    owner: str  # the service that writes it
    mode: int


# nats's log: the orchestrator reads it through nats's group (compose group_add). The
# checkpoints: the orchestrator's alone.
STATE = (State("nats_log", "nats", 0o750), State("audit_checkpoints", "orchestrator", 0o700))


def service_uid(policy: Policy, service: str) -> int:
    if service in PLATFORM_UIDS:
        return PLATFORM_UIDS[service]
    return AGENT_UID_BASE + sorted(policy.agents).index(service)


@dataclass(frozen=True)
class Grant:
    """The files one service receives, relative to ``secrets/`` (and to its /mas/secrets)."""

    service: str
    uid: int
    files: tuple[PurePosixPath, ...]
    identity: str | None  # whose other files in secrets/<identity>/ also go along


def _rel(path: Path) -> PurePosixPath:
    return PurePosixPath(path.relative_to(RELATIVE.root).as_posix())


def identity_files(identity: str) -> tuple[PurePosixPath, ...]:
    return tuple(_rel(getattr(RELATIVE, w)(identity)) for w in IDENTITY_FILES) + tuple(
        _rel(getattr(RELATIVE, w)) for w in SHARED_FILES)


def grants(policy: Policy) -> dict[str, Grant]:
    """Service -> what it may read: nats, the orchestrator, control and every agent."""
    out = {"nats": Grant("nats", service_uid(policy, "nats"),
                         tuple(_rel(getattr(RELATIVE, w)) for w in NATS_FILES), None)}
    for identity in ("orchestrator", "control", *sorted(policy.agents)):
        out[identity] = Grant(identity, service_uid(policy, identity),
                              identity_files(identity), identity)
    orchestrator = out["orchestrator"]
    out["orchestrator"] = Grant(orchestrator.service, orchestrator.uid, (
        *orchestrator.files, _rel(RELATIVE.nats_include)), orchestrator.identity)
    out["dashboard"] = Grant("dashboard", service_uid(policy, "dashboard"), (
        *identity_files("operator"), _rel(secret_path(RELATIVE))), None)
    return out


def _extras(secrets: Path, identity: str) -> list[PurePosixPath]:
    """Regular files the operator put in secrets/<identity>/ besides the identity's own."""
    folder = secrets / identity
    if not folder.is_dir():
        return []
    own = {p.name for p in identity_files(identity)} | {SETTINGS_FILE}
    return sorted(PurePosixPath(identity, p.name) for p in folder.iterdir()
                  if p.name not in own and stat.S_ISREG(p.lstat().st_mode))


def _write(path: Path, data: bytes, uid: int) -> None:
    """Replace ``path`` atomically with a 0400 file owned by ``uid`` (no window where a
    running service sees half a key)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    try:
        os.write(fd, data)
        os.fchown(fd, uid, uid)
        os.fchmod(fd, 0o400)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    else:
        path.unlink()


def sync(grant: Grant, secrets: Path, volume: Path) -> list[PurePosixPath]:
    """Make ``volume`` hold exactly the grant's files (plus extras), owned by its uid."""
    files = list(grant.files)
    if grant.identity is not None:
        files += _extras(secrets, grant.identity)
    wanted = set(files) | {parent for f in files for parent in f.parents if parent.parts}
    for path in sorted(volume.rglob("*"), reverse=True):
        if PurePosixPath(path.relative_to(volume).as_posix()) not in wanted:
            _remove(path)
    for rel in files:
        target = volume / rel
        for folder in reversed([volume / p for p in rel.parents if p.parts]):
            folder.mkdir(exist_ok=True)
            os.chown(folder, grant.uid, grant.uid)
            os.chmod(folder, 0o500)
        _write(target, (secrets / rel).read_bytes(), grant.uid)
    os.chown(volume, grant.uid, grant.uid)
    os.chmod(volume, 0o500)
    return sorted(files)


def prepare_state(state: State, policy: Policy, folder: Path) -> None:
    """The volume's top folder belongs to its writer; what is in it stays as written."""
    uid = service_uid(policy, state.owner)
    os.chown(folder, uid, uid)
    os.chmod(folder, state.mode)


def give_back(secrets: Path, uid: int, gid: int) -> None:
    """Files init (root) created in the host's ./secrets go to the project's owner, so the
    operator's own `mas` commands can still read them on Linux."""
    if uid == 0:
        return
    for path in [secrets, *secrets.rglob("*")]:
        st = path.lstat()
        if st.st_uid == 0:
            os.lchown(path, uid, gid)


def main() -> None:
    """The init container: `mas init`, then one volume per service."""
    root = Path(os.environ.get("MAS_ROOT", "/mas"))
    grants_dir = Path(os.environ.get("MAS_GRANTS_DIR", GRANTS_DIR))
    state_dir = Path(os.environ.get("MAS_STATE_DIR", STATE_DIR))
    policy_path = root / "policy.yaml"
    secrets = root / RELATIVE.root
    try:
        policy = load_policy(policy_path)
        report = init_secrets(policy, SecretsLayout(secrets))
        ensure_secret(SecretsLayout(secrets))  # the dashboard's login secret
        owner = policy_path.stat()
        give_back(secrets, owner.st_uid, owner.st_gid)
        print(f"init: created {len(report.created)} secret files, kept {len(report.kept)}",
              flush=True)
        for name, grant in grants(policy).items():
            volume = grants_dir / name
            if not volume.is_dir():
                raise BrokerError(f"{volume} is not mounted: recompile compose.yaml with "
                                  "`mas policy compile`")
            given = sync(grant, secrets, volume)
            print(f"init: {name} (uid {grant.uid}) gets {', '.join(map(str, given))}",
                  flush=True)
        for state in STATE:
            folder = state_dir / state.volume
            if not folder.is_dir():
                raise BrokerError(f"{folder} is not mounted: recompile compose.yaml with "
                                  "`mas policy compile`")
            prepare_state(state, policy, folder)
    except (BrokerError, SecurityError, OSError) as exc:
        print(f"init: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
