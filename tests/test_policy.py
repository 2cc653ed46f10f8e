"""policy.yaml loading: the committed policy is valid, and every broken policy is refused
with a PolicyError that names the problem and points at the line to fix.

The bad policies are one-line edits of ``BASE`` (a minimal valid policy), so each test
states the exact line the error must point at.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import subjects as subj
from broker.errors import PolicyError
from broker.policy import Kind, Policy, Tier, load_policy
from tests.conftest import REPO

# Line numbers are referred to by the tests below; keep them in sync if you edit this.
BASE_LINES = [
    "version: 1",                                      # 1
    "services:",                                       # 2
    "  orchestrator: {description: Orchestrator.}",    # 3
    "  control: {description: Control.}",              # 4
    "  operator: {description: Operator.}",            # 5
    "agents:",                                         # 6
    "  health:",                                       # 7
    "    description: Health.",                        # 8
    "    kind: polling",                               # 9
    "    tier: isolated",                              # 10
    "    state: true",                                 # 11
    "    actions:",                                    # 12
    "      daily_summary: {description: Summary.}",    # 13
    "  notify:",                                       # 14
    "    description: Notify.",                        # 15
    "    kind: stateless",                             # 16
    "    tier: full",                                  # 17
    "    actions:",                                    # 18
    "      notify_owner: {description: Notify.}",      # 19
    "  aggregator:",                                   # 20
    "    description: Aggregator.",                    # 21
    "    kind: stateful",                              # 22
    "    tier: isolated",                              # 23
    "    state: true",                                 # 24
    "    subscribe: [mas.event.health.>]",             # 25
    "    actions:",                                    # 26
    "      daily_digest: {description: Digest.}",      # 27
]
BASE = "\n".join(BASE_LINES) + "\n"


def variant(replace: dict[int, str] | None = None, append: str = "") -> str:
    """BASE with line N (1-based) replaced by text (which may span several lines)."""
    lines = list(BASE_LINES)
    for number, text in (replace or {}).items():
        lines[number - 1] = text
    return "\n".join(lines) + "\n" + append


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def refused(tmp_path: Path, text: str) -> PolicyError:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    err = info.value
    assert err.path == path
    return err


def assert_refused(tmp_path: Path, text: str, line: int, *needles: str) -> PolicyError:
    err = refused(tmp_path, text)
    assert err.line == line, f"expected line {line}, got {err.line}: {err}"
    for needle in needles:
        assert needle in err.detail, f"{needle!r} not in {err.detail!r}"
    # The full message leads with path:line: so editors can jump to it.
    assert str(err).startswith(f"{err.path}:{line}: ")
    return err


# --- valid policies -----------------------------------------------------------------------


def test_committed_policy_loads_with_six_agents_and_three_services() -> None:
    policy = load_policy(REPO / "policy.yaml")
    assert isinstance(policy, Policy)
    assert sorted(policy.agents) == ["aggregator", "anomaly", "backup", "health", "home", "notify"]
    assert policy.identities()[:3] == ["orchestrator", "control", "operator"]
    assert len(policy.identities()) == 9
    assert policy.agents["home"].tier is Tier.scoped
    assert policy.agents["home"].egress == ["homeassistant.local"]
    assert policy.agents["aggregator"].kind is Kind.stateful
    assert policy.agents["aggregator"].state
    assert policy.sensitive_actions("home") == ["call_service"]
    assert policy.sensitive_actions("notify") == ["send_message"]
    assert policy.broker.monitor.startswith("127.0.0.1:")


def test_base_policy_is_valid(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, BASE))
    assert list(policy.agents) == ["health", "notify", "aggregator"]
    assert policy.agents["aggregator"].subscribe == ["mas.event.health.>"]
    # Defaults fill in what the minimal policy leaves out.
    assert policy.broker.listen == "127.0.0.1:4222"
    assert policy.agents["health"].resources.pids == 64


# --- schema errors --------------------------------------------------------------------------


def test_typo_in_required_key_names_the_unknown_key_and_its_line(tmp_path: Path) -> None:
    # `tier` misspelt `teir`: the useful report is the unknown key on line 10, not
    # "tier is missing" on the agent's line.
    assert_refused(tmp_path, variant({10: "    teir: isolated"}), 10, "teir", "unknown key")


def test_typo_in_optional_key_is_an_unknown_key(tmp_path: Path) -> None:
    assert_refused(tmp_path, variant({11: "    stat: true"}), 11,
                   "agents.health.stat", "unknown key")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    assert_refused(tmp_path, variant(append="extras: {a: 1}\n"), 28, "extras", "unknown key")


def test_bad_enum_value_points_at_its_line(tmp_path: Path) -> None:
    assert_refused(tmp_path, variant({9: "    kind: sometimes"}), 9, "agents.health.kind")


def test_missing_version(tmp_path: Path) -> None:
    text = "\n".join(BASE_LINES[1:]) + "\n"
    assert_refused(tmp_path, text, 1, "version", "missing")


def test_wrong_version(tmp_path: Path) -> None:
    assert_refused(tmp_path, variant({1: "version: 2"}), 1, "version")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"],
                         ids=["empty", "blank", "comment"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    err = refused(tmp_path, text)
    assert err.line == 1, f"an empty policy should point at line 1, got {err.line}: {err}"
    assert "empty" in err.detail or "mapping" in err.detail, err.detail


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert_refused(tmp_path, "- version\n- agents\n", 1, "must be a mapping")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="policy file not found"):
        load_policy(tmp_path / "nope.yaml")


def test_invalid_yaml_syntax(tmp_path: Path) -> None:
    assert_refused(tmp_path, variant({9: "    kind: polling: now"}), 9,
                   "not valid YAML", "mapping values are not allowed")


def test_tab_indentation_is_invalid_yaml(tmp_path: Path) -> None:
    assert_refused(tmp_path, variant({16: "\tkind: stateless"}), 16, "not valid YAML")


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    again = ("  health:\n    description: Again.\n    kind: polling\n    tier: isolated\n"
             "    actions:\n      x: {description: y}\n")
    assert_refused(tmp_path, variant(append=again), 28,
                   "duplicate key 'health'", "first at line 7")


def test_duplicate_nested_key(tmp_path: Path) -> None:
    assert_refused(tmp_path, variant({17: "    tier: full\n    tier: isolated"}), 18,
                   "duplicate key 'tier'", "first at line 17")


@pytest.mark.parametrize(
    ("line_text", "needle"),
    [
        ("version: !!python/name:os.system 1", "unsupported YAML tag 'python/name:os.system'"),
        ("version: !!python/object/apply:os.system [id]", "unsupported YAML tag"),
        ("version: !!binary aGk=", "unsupported YAML tag 'binary'"),
        ("version: !custom 1", "unsupported YAML tag '!custom'"),
        ("version: 2001-13-45", "reads as a date"),  # an impossible date: ValueError before
        ("version: 2024-01-01", "reads as a date"),
        ("version: !!int ''", "not a valid int"),  # IndexError inside PyYAML before
        ("version: !!bool maybe", "not a valid bool"),  # KeyError inside PyYAML before
        ("version: !!float abc", "not a valid float"),
        ("version: 1" + "0" * 5000, "not a valid int"),  # over Python's int-digit limit
    ],
    ids=["python-name", "python-apply", "binary", "custom", "bad-date", "date", "empty-int",
         "bad-bool", "bad-float", "huge-int"],
)
def test_unsupported_scalar_is_refused_on_its_line(tmp_path: Path, line_text: str,
                                                   needle: str) -> None:
    err = assert_refused(tmp_path, variant({1: line_text}), 1, needle)
    assert len(str(err)) < 300, str(err)  # a huge value is not echoed in full


@pytest.mark.parametrize(
    ("replace", "line", "needle"),
    [
        ({11: "    state: !!set {a, b}"}, 11, "unsupported YAML tag 'set' on a mapping"),
        ({25: "    subscribe: !!omap [a: 1]"}, 25, "unsupported YAML tag 'omap' on a list"),
    ],
    ids=["set", "omap"],
)
def test_tagged_collection_is_refused(tmp_path: Path, replace: dict[int, str], line: int,
                                      needle: str) -> None:
    assert_refused(tmp_path, variant(replace), line, needle)


@pytest.mark.parametrize(
    ("replace", "line"),
    [
        ({25: "    subscribe: &subs [mas.event.health.>]"}, 25),  # an anchor alone
        ({1: "version: &v 1", 8: "    description: *v"}, 1),
        ({27: "      daily_digest: &x [*x]"}, 27),  # self-referential: RecursionError before
        ({13: "      daily_summary: {description: *nowhere}"}, 13),  # undefined alias
    ],
    ids=["anchor", "alias", "recursive", "undefined"],
)
def test_anchors_and_aliases_are_refused(tmp_path: Path, replace: dict[int, str],
                                         line: int) -> None:
    assert_refused(tmp_path, variant(replace), line, "anchors and aliases are not allowed")


def test_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    # Each level nine aliases of the one before: a5 alone would expand to 9**6 (~530,000)
    # strings. Small enough that a regression costs seconds, not the machine's memory; the
    # real bombs (9**9 and beyond) are refused by the same check, before anything expands.
    bomb = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    bomb += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 6)]
    assert_refused(tmp_path, variant(append="\n".join(bomb) + "\n"), 28,
                   "anchors and aliases are not allowed")


@pytest.mark.parametrize(
    ("key", "kind"),
    [("null", "null"), ("~", "null"), ("true", "bool"), ("no", "bool"), ("1", "int"),
     ("1.5", "float")],
)
def test_mapping_keys_must_be_names(tmp_path: Path, key: str, kind: str) -> None:
    # Such keys used to become "None", "True", "1" ... silently.
    err = assert_refused(tmp_path, variant({14: f"  {key}:"}), 14, "keys must be names")
    assert f"reads as {kind}" in err.detail


def test_quoted_key_is_a_name(tmp_path: Path) -> None:
    # Quoting is the way out the message suggests; the key is then checked like any name.
    policy = load_policy(write(tmp_path, variant({14: '  "true":'})))
    assert "true" in policy.agents
    assert_refused(tmp_path, variant({14: '  "1":'}), 14, "agents.1")


def test_deeply_nested_yaml_is_one_error(tmp_path: Path) -> None:
    err = refused(tmp_path, variant(append="extras: " + "[" * 5000 + "]" * 5000 + "\n"))
    assert "nested too deeply" in err.detail


def test_agent_named_like_a_service_is_a_duplicate_identity(tmp_path: Path) -> None:
    agent = ("  orchestrator:\n    description: Impostor.\n    kind: reactive\n"
             "    tier: isolated\n    actions:\n      plan: {description: Plan.}\n")
    assert_refused(tmp_path, variant(append=agent), 28,
                   "duplicate identity 'orchestrator'", "rename")


def test_invalid_agent_name(tmp_path: Path) -> None:
    assert_refused(tmp_path, variant({14: "  Notify:"}), 14, "agents.Notify")


# --- contradictions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject",
    ["mas.agent.health.>", "mas.agent.health.daily_summary", "mas.agent.*.daily_summary",
     "mas.agent.>", "mas.*.health.>", ">"],
)
def test_subscribing_to_another_agents_commands(tmp_path: Path, subject: str) -> None:
    text = variant({25: f'    subscribe: ["{subject}"]'})
    assert_refused(tmp_path, text, 25, repr(subject), "would let aggregator read",
                   "commands")


def test_subscribing_to_own_commands_is_refused_too(tmp_path: Path) -> None:
    # The platform grants mas.agent.aggregator.> itself; listing it is not allowed.
    text = variant({25: "    subscribe: [mas.agent.aggregator.x]"})
    assert_refused(tmp_path, text, 25, "'mas.agent.aggregator.x'", "outside what an agent")


def test_publishing_another_agents_commands(tmp_path: Path) -> None:
    text = variant({17: "    tier: full\n    publish: [mas.agent.health.daily_summary]"})
    assert_refused(tmp_path, text, 18, "would let notify send health's commands")


@pytest.mark.parametrize("subject", ["mas.event.health.x", "mas.event.health.>",
                                     "mas.event.*.x"])
def test_publishing_as_another_agent(tmp_path: Path, subject: str) -> None:
    text = variant({17: f"    tier: full\n    publish: [{subject}]"})
    assert_refused(tmp_path, text, 18, repr(subject), "would let notify publish as health")


def test_publishing_own_events_and_alerts_is_allowed(tmp_path: Path) -> None:
    text = variant({17: "    tier: full\n    publish: [mas.event.notify.sent, mas.alert.>]"})
    assert load_policy(write(tmp_path, text)).agents["notify"].publish == [
        "mas.event.notify.sent", "mas.alert.>"]


@pytest.mark.parametrize(
    "subject",
    ["_INBOX.>", "$JS.API.>", "$KV.agent_health.>", "mas.orch.>", "mas.admin.x",
     "_INBOX_health.>"],
)
def test_subscribe_outside_allowed_families(tmp_path: Path, subject: str) -> None:
    # Block list: the bad entry is the second item, on line 27.
    text = variant({25: f'    subscribe:\n      - mas.event.health.>\n      - "{subject}"'})
    assert_refused(tmp_path, text, 27, repr(subject), "outside what an agent may subscribe")


def test_subscribe_within_allowed_families(tmp_path: Path) -> None:
    subjects = ["mas.event.>", "mas.alert.*", "mas.heartbeat.health"]
    text = variant({25: f"    subscribe: [{', '.join(subjects)}]"})
    assert load_policy(write(tmp_path, text)).agents["aggregator"].subscribe == subjects


def test_invalid_subject_pattern(tmp_path: Path) -> None:
    text = variant({25: "    subscribe: [mas.>.event]"})
    assert_refused(tmp_path, text, 25, "not a valid subject", "last token")


def test_subject_listed_twice(tmp_path: Path) -> None:
    text = variant({25: "    subscribe:\n      - mas.alert.>\n      - mas.alert.>"})
    assert_refused(tmp_path, text, 27, "listed twice")


def test_scoped_agent_without_egress(tmp_path: Path) -> None:
    assert_refused(tmp_path, variant({23: "    tier: scoped"}), 23,
                   "scoped tier but lists no egress hosts")


def test_scoped_agent_with_egress_is_valid(tmp_path: Path) -> None:
    text = variant({23: "    tier: scoped\n    egress: [api.example.com]"})
    assert load_policy(write(tmp_path, text)).agents["aggregator"].egress == ["api.example.com"]


def test_egress_on_a_non_scoped_agent(tmp_path: Path) -> None:
    text = variant({17: "    tier: full\n    egress: [ntfy.sh]"})
    assert_refused(tmp_path, text, 18, "lists egress hosts but its tier is full")


@pytest.mark.parametrize(
    "host",
    ["10.0.0.1", "homeassistant.local:8123", "*.example.com", "https://example.com",
     "localhost"],
)
def test_egress_entry_must_be_a_dns_name(tmp_path: Path, host: str) -> None:
    text = variant({10: f'    tier: scoped\n    egress:\n      - example.com\n      - "{host}"'})
    assert_refused(tmp_path, text, 13, repr(host), "not a DNS name")


def test_stateful_agent_without_state(tmp_path: Path) -> None:
    assert_refused(tmp_path, variant({24: "    state: false"}), 24,
                   "aggregator is stateful but has `state: false`")


def test_sensitive_category_on_a_non_sensitive_action(tmp_path: Path) -> None:
    action = ("      notify_owner:\n        description: Notify.\n"
              "        category: messaging")
    assert_refused(tmp_path, variant({19: action}), 21,
                   "notify.notify_owner has a sensitive category", "sensitive: false")


def test_sensitive_action_with_category_is_valid(tmp_path: Path) -> None:
    action = ("      notify_owner:\n        description: Notify.\n"
              "        sensitive: true\n        category: messaging")
    policy = load_policy(write(tmp_path, variant({19: action})))
    assert policy.sensitive_actions("notify") == ["notify_owner"]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com"])  # noqa: S104
def test_monitor_must_bind_to_loopback(tmp_path: Path, host: str) -> None:
    broker = f"version: 1\nbroker:\n  listen: 127.0.0.1:4222\n  monitor: {host}:8222"
    assert_refused(tmp_path, variant({1: broker}), 4, "broker.monitor", "loopback")


def test_bad_size_value(tmp_path: Path) -> None:
    broker = "version: 1\nbroker:\n  max_payload: lots"
    assert_refused(tmp_path, variant({1: broker}), 3, "broker.max_payload", "size")


# --- subject helpers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "a.b", True),
        ("*.b", "a.*", True),
        ("a.*", "a.b.c", False),
        ("a.*", "a", False),
        ("a.>", "a", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "b.>", False),
        (">", "a", True),
        (">", "a.b.c", True),
        (">", ">", True),
        ("*", ">", True),
        ("*", "a.b", False),
        ("a.*.c", "a.b.>", True),
        ("a.*.c", "a.b.d", False),
        ("mas.agent.*.daily_summary", "mas.agent.health.>", True),
        ("mas.event.>", "mas.agent.health.>", False),
        ("a.b.c", "a.b", False),
    ],
)
def test_overlaps(a: str, b: str, expected: bool) -> None:
    assert subj.overlaps(a, b) is expected
    assert subj.overlaps(b, a) is expected  # symmetric


@pytest.mark.parametrize(
    ("inner", "outer", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.b", "a.*", True),
        ("a.*", "a.*", True),
        ("a.*", "a.b", False),
        ("a.>", "a.*", False),
        ("a.*", "a.>", True),
        ("a.b.c", "a.>", True),
        ("a.>", "a.>", True),
        ("a.*.>", "a.>", True),
        ("a", "a.>", False),
        (">", "a.>", False),
        ("a.>", ">", True),
        (">", ">", True),
        ("*", ">", True),
        ("*", "a", False),
        ("a.b.c", "a.b", False),
        ("a.b", "a.b.c", False),
        ("a.b", "*.*", True),
        ("a.b.c", "*.*", False),
        ("mas.event.health.>", "mas.event.>", True),
        ("mas.events.x", "mas.event.>", False),
        ("_INBOX.>", "mas.event.>", False),
    ],
)
def test_within(inner: str, outer: str, expected: bool) -> None:
    assert subj.within(inner, outer) is expected


@pytest.mark.parametrize(
    "subject",
    ["a", "a.b", "*", ">", "a.*", "a.>", "a.*.>", "$JS.API.STREAM.INFO.X", "_INBOX_x.>",
     "mas.event.home-assistant.state_changed", "a" * 256],
)
def test_validate_pattern_accepts(subject: str) -> None:
    assert subj.validate_pattern(subject) is None


@pytest.mark.parametrize(
    ("subject", "why"),
    [
        ("a.>.b", "'>' may only be the last token"),
        (">.a", "'>' may only be the last token"),
        ("", "1 to 256"),
        ("a" * 257, "1 to 256"),
        ("a b", "not allow"),
        ("a. b", "not allow"),
        ("a..b", "not allow"),
        ("a.", "not allow"),
        (".a", "not allow"),
        ("a.b*", "not allow"),
        ("a.b>", "not allow"),
        ("a\tb", "not allow"),
    ],
)
def test_validate_pattern_rejects(subject: str, why: str) -> None:
    problem = subj.validate_pattern(subject)
    assert problem is not None
    assert why in problem


def test_subject_conventions() -> None:
    assert subj.commands("health") == "mas.agent.health.>"
    assert subj.command("health", "daily_summary") == "mas.agent.health.daily_summary"
    assert subj.events("health") == "mas.event.health.>"
    assert subj.heartbeat("health") == "mas.heartbeat.health"
    assert subj.inbox_prefix("health") == "_INBOX_health"
    assert subj.kv_bucket("health") == "agent_health"
    assert subj.within(subj.command("health", "x"), subj.commands("health"))


def test_scoped_agent_with_only_a_lan_host_is_valid(tmp_path: Path) -> None:
    text = variant({23: "    tier: scoped\n    egress_lan: [homeassistant.local:8123]"})
    assert load_policy(write(tmp_path, text)).agents["aggregator"].egress_lan == [
        "homeassistant.local:8123"]


def test_lan_hosts_on_a_non_scoped_agent(tmp_path: Path) -> None:
    text = variant({17: "    tier: full\n    egress_lan: [nas.local:5000]"})
    assert_refused(tmp_path, text, 18, "lists egress_lan hosts but its tier is full")


@pytest.mark.parametrize("spec", ["homeassistant.local", "nas.local:0", "nas.local:99999",
                                  "10.0.0.1:80", "http://nas.local:80"])
def test_lan_host_must_be_name_and_port(tmp_path: Path, spec: str) -> None:
    text = variant({10: f'    tier: scoped\n    egress: [example.com]\n    egress_lan:\n'
                        f'      - "{spec}"'})
    assert_refused(tmp_path, text, 13, repr(spec), "must be NAME:PORT")
