"""Policy -> nats-server.conf: golden output, determinism, deny-by-default conventions,
acceptance by the real nats-server, and drift detection."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from broker import subjects as subj
from broker.accounts import build_accounts
from broker.compiler import CONFIG_NAME, compile_config, drift
from broker.errors import ServerError
from broker.permissions import Permissions, all_permissions
from broker.policy import SERVICE_NAMES, Policy, load_policy, size_bytes
from broker.secrets import init_secrets
from broker.server import NatsServer
from mas.project import Project
from tests.conftest import REPO

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = Path(__file__).resolve().parent / "golden"
SMALL = DATA / "policy_small.yaml"
REPO_POLICY = load_policy(REPO / "policy.yaml")
POLICIES = {"repo": REPO_POLICY, "small": load_policy(SMALL)}


def perms_of(policy: Policy) -> dict[str, Permissions]:
    return {p.identity: p for p in all_permissions(policy)}


def every_identity() -> list[tuple[str, str]]:
    return [(key, name) for key, policy in POLICIES.items() for name in policy.identities()]


# --- golden and committed output --------------------------------------------------------


def test_small_policy_matches_golden_file() -> None:
    expected = (GOLDEN / "policy_small.conf").read_bytes()
    actual = compile_config(load_policy(SMALL)).encode("utf-8")
    assert actual == expected, (
        "compiled tests/data/policy_small.yaml differs from tests/golden/policy_small.conf; "
        "if the change is intended, regenerate the golden file and review the diff")


def test_committed_config_is_compiled_from_committed_policy() -> None:
    committed = (REPO / CONFIG_NAME).read_text(encoding="utf-8")
    assert committed == compile_config(REPO_POLICY)


def test_compiled_config_lists_every_identity_once() -> None:
    text = compile_config(REPO_POLICY)
    nkeys = re.findall(r"^\s+nkey: \$NKEY_([A-Z_]+)$", text, flags=re.MULTILINE)
    assert sorted(nkeys) == sorted(n.upper() for n in REPO_POLICY.identities())


# --- determinism --------------------------------------------------------------------------


def test_compiling_twice_gives_identical_bytes() -> None:
    first = compile_config(load_policy(SMALL))
    second = compile_config(load_policy(SMALL))
    assert first.encode() == second.encode()


def test_agent_order_in_yaml_does_not_change_output(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "policy.yaml").read_text())
    original = list(data["agents"])
    data["agents"] = dict(reversed(list(data["agents"].items())))
    assert list(data["agents"]) == original[::-1]
    reordered = tmp_path / "policy.yaml"
    reordered.write_text(yaml.safe_dump(data, sort_keys=False))
    policy = load_policy(reordered)
    assert list(policy.agents) == original[::-1]
    assert compile_config(policy).encode() == compile_config(REPO_POLICY).encode()


def test_different_policy_gives_different_output(tmp_path: Path) -> None:
    # Guards the determinism tests against a compiler that ignores its input.
    text = SMALL.read_text().replace("subscribe: [mas.event.weather.>, mas.alert.>]",
                                     "subscribe: [mas.event.weather.>]")
    changed = tmp_path / "policy.yaml"
    changed.write_text(text)
    assert compile_config(load_policy(changed)) != compile_config(load_policy(SMALL))


# --- deny by default and conventions ------------------------------------------------------

FORBIDDEN_GRANTS = (">", "_INBOX.>", "$JS.API.>", "$KV.>", "$JS.>", "$JS.API.STREAM.>")


@pytest.mark.parametrize(("policy_key", "identity"), every_identity())
def test_no_identity_gets_a_blanket_grant(policy_key: str, identity: str) -> None:
    policy = POLICIES[policy_key]
    p = perms_of(policy)[identity]
    for allow in (p.publish_allow, p.subscribe_allow):
        for forbidden in FORBIDDEN_GRANTS:
            assert forbidden not in allow
        for entry in allow:
            assert subj.validate_pattern(entry) is None, entry
            assert not entry.startswith(("*", ">")), entry
            # Nothing may reach the shared inbox prefix.
            assert not subj.overlaps(entry, "_INBOX.>"), entry
            # JetStream API grants always name one stream.
            if entry.startswith("$JS.API."):
                assert "MAS_AUDIT" in entry or ".KV_" in entry or (
                    f".{subj.event_stream(identity)}" in entry), entry
    for other in policy.identities():
        if other != identity:
            other_inbox = f"{subj.inbox_prefix(other)}.>"
            for entry in (*p.publish_allow, *p.subscribe_allow):
                assert not subj.overlaps(entry, other_inbox), (identity, entry, other)
    # Its own inbox is always there.
    assert f"{subj.inbox_prefix(identity)}.>" in p.subscribe_allow


@pytest.mark.parametrize(("policy_key", "identity"),
                         [(k, n) for k, n in every_identity() if n not in SERVICE_NAMES])
def test_agent_conventions(policy_key: str, identity: str) -> None:
    policy = POLICIES[policy_key]
    agent = policy.agents[identity]
    p = perms_of(policy)[identity]
    assert p.subscribe_allow[:2] == (f"mas.agent.{identity}.>", f"_INBOX_{identity}.>")
    expected = {f"mas.agent.{identity}.>", f"_INBOX_{identity}.>", subj.REVOCATIONS,
                *agent.subscribe, *subj.srv_subjects(identity)}
    if "audit" in agent.read_streams:
        expected.add(subj.AUDIT_FEED)
    assert set(p.subscribe_allow) == expected
    assert f"mas.event.{identity}.>" in p.publish_allow
    assert f"mas.heartbeat.{identity}" in p.publish_allow
    assert p.allow_responses
    # Commands of other agents: neither readable nor sendable.
    for other in policy.agents:
        if other != identity:
            for entry in (*p.publish_allow, *p.subscribe_allow):
                assert not subj.overlaps(entry, subj.commands(other)), (entry, other)
                if entry in p.publish_allow:
                    assert not subj.overlaps(entry, subj.events(other)), (entry, other)
                # It answers discovery ($SRV, nats.micro) for its own name only.
                for verb in subj.SRV_VERBS:
                    assert not subj.overlaps(entry, f"$SRV.{verb}.{other}"), (entry, other)
                    assert not subj.overlaps(entry, f"$SRV.{verb}.{other}.x"), (entry, other)
    assert not any(e.startswith("$SRV") for e in p.publish_allow)


@pytest.mark.parametrize(("policy_key", "identity"),
                         [(k, n) for k, n in every_identity() if n not in SERVICE_NAMES])
def test_agent_jetstream_access_is_only_its_own_bucket(
        policy_key: str, identity: str) -> None:
    policy = POLICIES[policy_key]
    agent = policy.agents[identity]
    p = perms_of(policy)[identity]
    own = subj.kv_bucket(identity)
    revocations = subj.REVOCATIONS_BUCKET
    kv_entries = [e for e in (*p.publish_allow, *p.subscribe_allow)
                  if "KV_" in e or e.startswith("$KV.")]
    buckets = {re.search(r"(?:KV_|\$KV\.)([A-Za-z0-9_]+)", e).group(1)  # type: ignore[union-attr]
               for e in kv_entries}
    assert buckets == {own}  # every agent: its own bucket (state and/or single-use ledger)
    # Revocations reach agents as signed broadcasts; the bucket itself is out of reach.
    assert subj.REVOCATIONS in p.subscribe_allow
    for entry in p.publish_allow:
        assert not subj.overlaps(entry, f"$KV.{revocations}.x"), entry
        assert not subj.overlaps(entry, f"$JS.API.STREAM.CREATE.KV_{revocations}"), entry
        assert not subj.overlaps(entry, f"$JS.API.STREAM.DELETE.KV_{revocations}"), entry
        assert not subj.overlaps(entry, f"$JS.API.STREAM.PURGE.KV_{revocations}"), entry
    assert f"$KV.{own}.>" in p.publish_allow
    assert f"$JS.API.STREAM.CREATE.KV_{own}" in p.publish_allow
    assert not any(e.startswith(("$KV.", "$JS.API.STREAM.CREATE.KV_"))
                   and own not in e for e in p.publish_allow)
    js = {a.name: a for a in build_accounts(policy)}[subj.account(identity)].jetstream
    assert js is not None
    assert js.max_file >= (size_bytes(agent.state_limit) if agent.state
                           else subj.LEDGER_MAX_BYTES)


@pytest.mark.parametrize(("policy_key", "identity"),
                         [(k, n) for k, n in every_identity() if n not in SERVICE_NAMES])
def test_event_stream_grants_are_exactly_its_own_stream_and_consumer(
        policy_key: str, identity: str) -> None:
    """An agent that subscribes to events may create, update and read its own event
    stream and pull from and acknowledge its one durable consumer; nothing else of it
    (no other consumer, no delete, purge or direct get), and nothing of another's."""
    policy = POLICIES[policy_key]
    agent = policy.agents[identity]
    p = perms_of(policy)[identity]
    stream = subj.event_stream(identity)
    feed = {e for e in p.publish_allow if "EVENTS_" in e}
    durable = [s for s in agent.subscribe if subj.durable(s)]
    expected = {
        f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}",
        f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.CONSUMER.CREATE.{stream}.{identity}",
        f"$JS.API.CONSUMER.INFO.{stream}.{identity}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{identity}", f"$JS.ACK.{stream}.{identity}.>",
    }
    assert feed == (expected if durable else set())
    for denied in ("STREAM.DELETE", "STREAM.PURGE", "STREAM.MSG.DELETE", "DIRECT.GET"):
        assert not any(subj.overlaps(e, f"$JS.API.{denied}.{stream}") for e in feed)
    assert not any(subj.overlaps(e, f"$JS.API.CONSUMER.CREATE.{stream}.spy") for e in feed)
    accounts = {a.name: a for a in build_accounts(policy)}
    js = accounts[subj.account(identity)].jetstream
    assert js is not None  # every agent has its bucket
    assert js.max_streams == 1 + int(bool(durable))
    if durable:
        assert js.max_file >= subj.EVENT_STREAM_MAX_BYTES


def test_only_the_orchestrator_may_send_commands() -> None:
    for key, policy in POLICIES.items():
        for name, p in perms_of(policy).items():
            sends = any(subj.overlaps(e, "mas.agent.>") for e in p.publish_allow)
            assert sends is (name == "orchestrator"), (key, name)
        assert "mas.agent.>" in perms_of(policy)["orchestrator"].publish_allow


AUDIT_DESTRUCTIVE = (
    f"$JS.API.STREAM.DELETE.{subj.AUDIT_STREAM}",
    f"$JS.API.STREAM.PURGE.{subj.AUDIT_STREAM}",
    f"$JS.API.STREAM.MSG.DELETE.{subj.AUDIT_STREAM}",
)


@pytest.mark.parametrize(("policy_key", "identity"), every_identity())
def test_nobody_may_delete_or_purge_the_audit_stream(policy_key: str, identity: str) -> None:
    p = perms_of(POLICIES[policy_key])[identity]
    for destructive in AUDIT_DESTRUCTIVE:
        assert not any(subj.overlaps(e, destructive) for e in p.publish_allow), destructive
    if identity == "orchestrator":
        # Belt and braces: the orchestrator also carries an explicit deny.
        assert set(AUDIT_DESTRUCTIVE) <= set(p.publish_deny)


def test_audit_stream_readers_are_exactly_those_granted() -> None:
    policy = REPO_POLICY
    stream_readers = {n for n, p in perms_of(policy).items()
                      if f"$JS.API.CONSUMER.CREATE.{subj.AUDIT_STREAM}" in p.publish_allow}
    assert stream_readers == {"orchestrator", "operator"}
    granted = {n for n, a in policy.agents.items() if "audit" in a.read_streams}
    assert granted == {"anomaly"}
    feed_readers = {n for n, p in perms_of(policy).items() if subj.AUDIT_FEED in p.subscribe_allow}
    assert feed_readers == granted
    platform = next(a for a in build_accounts(policy) if a.name == subj.PLATFORM_ACCOUNT)
    feed = [e for e in platform.exports if e.subject == subj.AUDIT_FEED]
    assert [e.accounts for e in feed] == [tuple(subj.account(a) for a in sorted(granted))]
    writers = {n for n, p in perms_of(policy).items()
               if any(subj.overlaps(e, "mas.audit.x") for e in p.publish_allow)}
    assert writers == {"orchestrator"}


@pytest.mark.parametrize("policy_key", sorted(POLICIES))
def test_compiled_text_is_locked_down(policy_key: str) -> None:
    policy = POLICIES[policy_key]
    text = compile_config(policy)
    assert '  min_version: "1.3"\n' in text
    assert "  verify: true\n" in text
    assert re.search(r'^http: "127\.0\.0\.1:\d+"$', text, flags=re.MULTILINE)
    assert "no_auth_user" not in text
    assert "authorization" not in text
    # One account per agent, and the platform's.
    assert "\naccounts {\n" in text
    assert f"  {subj.PLATFORM_ACCOUNT}: {{\n" in text
    for agent in policy.agents:
        assert f"  {subj.account(agent)}: {{\n" in text
    assert '">"' not in text
    assert '"_INBOX.>"' not in text
    assert '"$JS.API.>"' not in text
    # Per-install values stay out of the compiled file.
    assert 'include "secrets/nats/identities.conf"' in text
    assert not re.search(r"\bU[A-Z2-7]{55}\b", text)  # no nkey public key
    assert "BEGIN" not in text


# --- the real nats-server -------------------------------------------------------------------


def test_nats_server_accepts_compiled_config(project: Project, tmp_path: Path) -> None:
    server = NatsServer(config=project.config_path, cwd=project.root,
                        log_file=tmp_path / "nats.log")
    server.check_config()  # raises ServerError on rejection


def test_nats_server_accepts_compiled_small_policy(tmp_path: Path) -> None:
    shutil.copy(SMALL, tmp_path / "policy.yaml")
    small = Project(tmp_path)
    init_secrets(small.policy(), small.secrets)
    small.config_path.write_text(compile_config(small.policy()))
    NatsServer(config=small.config_path, cwd=small.root,
               log_file=tmp_path / "nats.log").check_config()


def test_nats_server_rejects_a_broken_config(project: Project, tmp_path: Path) -> None:
    # Proves check_config can fail, so the acceptance test above means something.
    broken = project.root / "broken.conf"
    broken.write_text(compile_config(REPO_POLICY).replace("$NKEY_HEALTH", "$NKEY_NOBODY"))
    server = NatsServer(config=broken, cwd=project.root, log_file=tmp_path / "nats.log")
    with pytest.raises(ServerError, match=r"rejected broken\.conf"):
        server.check_config()


# --- drift ----------------------------------------------------------------------------------


def test_drift_is_none_when_current(tmp_path: Path) -> None:
    config = tmp_path / CONFIG_NAME
    config.write_text(compile_config(REPO_POLICY))
    assert drift(REPO_POLICY, config) is None


def test_drift_names_the_changed_line(tmp_path: Path) -> None:
    config = tmp_path / CONFIG_NAME
    config.write_text(compile_config(REPO_POLICY))
    text = (REPO / "policy.yaml").read_text()
    old = "subscribe: [mas.event.health.>, mas.event.home.>, mas.event.backup.>, mas.alert.>]"
    assert old in text
    changed = tmp_path / "policy.yaml"
    changed.write_text(text.replace(old, old[:-1] + ", mas.heartbeat.health]"))
    difference = drift(load_policy(changed), config)
    assert difference is not None
    added = [ln[1:].strip() for ln in difference.splitlines() if ln.startswith("+") and
             not ln.startswith("+++")]
    assert '"mas.heartbeat.health"' in added  # the new subscribe grant
    assert '{ stream: { account: "AGENT_HEALTH", subject: "mas.heartbeat.health" } }' in added
    assert "(committed)" in difference
    assert "(from policy)" in difference


def test_drift_shows_a_hand_edit_as_removed(tmp_path: Path) -> None:
    config = tmp_path / CONFIG_NAME
    config.write_text(compile_config(REPO_POLICY).replace('"mas.alert.>"', '">"', 1))
    difference = drift(REPO_POLICY, config)
    assert difference is not None
    lines = [(ln[:1], ln[1:].strip()) for ln in difference.splitlines()]
    assert ("-", '">"') in lines
    assert ("+", '"mas.alert.>"') in lines


def test_drift_is_bounded(tmp_path: Path) -> None:
    config = tmp_path / CONFIG_NAME
    config.write_text("# hand-written\n" + "\n".join(f"x{i}: {i}" for i in range(200)) + "\n")
    difference = drift(REPO_POLICY, config)
    assert difference is not None
    lines = difference.splitlines()
    assert len(lines) == 41
    assert re.fullmatch(r"\.\.\. \(\d+ more diff lines\)", lines[-1])


def test_drift_when_config_missing(tmp_path: Path) -> None:
    missing = tmp_path / CONFIG_NAME
    difference = drift(REPO_POLICY, missing)
    assert difference is not None
    assert "does not exist" in difference
    assert str(missing) in difference


@pytest.mark.parametrize("policy_key", sorted(POLICIES))
def test_accounts_cap_what_one_agent_can_hold(policy_key: str) -> None:
    """Connections and subscriptions per agent account, and a short life for the reply
    mappings of requests agents send to the platform (else they pile up in memory)."""
    accounts = build_accounts(POLICIES[policy_key])
    for account in accounts:
        if account.name == subj.PLATFORM_ACCOUNT:
            services = [e for e in account.exports if e.kind == "service"]
            assert services
            assert all(e.response_threshold == "10s" for e in services)
        else:
            assert account.limits is not None
            assert account.limits.max_connections <= 16
            assert account.limits.max_subscriptions <= 10_000
    text = compile_config(POLICIES[policy_key])
    agents = len(POLICIES[policy_key].agents)
    assert text.count("    limits: { max_connections: ") == agents
    # the orchestrator's services, and each audit reader's fetch and ack subjects
    readers = sum("audit" in a.read_streams for a in POLICIES[policy_key].agents.values())
    assert text.count('response_threshold: "10s"') == len(subj.ORCH_SERVICES) + 2 * readers
