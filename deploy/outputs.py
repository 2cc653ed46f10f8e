"""Everything `mas policy compile` writes, and the drift check `--check` runs over it.

The files, relative to the project root, in the order they are written and checked:
``nats-server.conf``, ``compose.yaml``, ``nats-compose.conf`` (what nats runs in compose:
the first plus one monitoring address), then ``seccomp/<profile>.json`` for each profile.
``seccomp/`` holds only generated profiles: a ``*.json`` there that the policy no longer
produces is reported as stale and removed by compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker.compiler import CONFIG_NAME, compile_config, text_drift
from broker.policy import Policy
from deploy import seccomp
from deploy.compose import (
    COMPOSE_NAME,
    MONITOR_CONFIG,
    compose_document,
    monitor_config,
    render_compose,
    service_profiles,
)

SECCOMP_DIR = "seccomp"


@dataclass(frozen=True)
class Output:
    path: str  # relative to the project root, POSIX separators
    text: str
    summary: str


def compile_outputs(policy: Policy) -> list[Output]:
    document = compose_document(policy)
    profiles = sorted(set(service_profiles(document).values()))
    services = len(document["services"])
    outputs = [
        Output(CONFIG_NAME, compile_config(policy), f"{len(policy.identities())} identities"),
        Output(COMPOSE_NAME, render_compose(policy), f"{services} services"),
        Output(MONITOR_CONFIG, monitor_config(policy), "nats in compose"),
    ]
    outputs += [Output(seccomp.profile_path(name), seccomp.render_profile(name),
                       f"seccomp profile {name!r}") for name in profiles]
    return outputs


def obsolete(root: Path, outputs: list[Output]) -> list[str]:
    """Profiles in seccomp/ that the policy no longer produces."""
    folder = root / SECCOMP_DIR
    if not folder.is_dir():
        return []
    produced = {o.path for o in outputs}
    return sorted(f"{SECCOMP_DIR}/{p.name}" for p in folder.glob("*.json")
                  if f"{SECCOMP_DIR}/{p.name}" not in produced)


@dataclass(frozen=True)
class Drift:
    missing: list[str]
    stale: list[tuple[str, str]]  # (path, diff)
    obsolete: list[str]

    @property
    def current(self) -> bool:
        return not (self.missing or self.stale or self.obsolete)


def check(policy: Policy, root: Path) -> Drift:
    outputs = compile_outputs(policy)
    missing: list[str] = []
    stale: list[tuple[str, str]] = []
    for out in outputs:
        path = root / out.path
        if not path.exists():
            missing.append(out.path)
            continue
        difference = text_drift(out.text, path, out.path)
        if difference is not None:
            stale.append((out.path, difference))
    return Drift(missing, stale, obsolete(root, outputs))


def write(policy: Policy, root: Path) -> list[tuple[Path, str]]:
    """Write every output that differs; remove obsolete profiles. Returns (path, state)."""
    outputs = compile_outputs(policy)
    report: list[tuple[Path, str]] = []
    for out in outputs:
        path = root / out.path
        previous = path.read_text(encoding="utf-8") if path.exists() else None
        if previous == out.text:
            report.append((path, f"unchanged ({out.summary})"))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(out.text, encoding="utf-8")
        report.append((path, f"written ({out.summary})"))
    for name in obsolete(root, outputs):
        (root / name).unlink()
        report.append((root / name, "removed (no service uses it)"))
    return report
