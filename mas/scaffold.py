"""`mas agent new`: a working agent directory and a deny-by-default policy stanza.

The templates are real, runnable code: a new agent starts, answers its one action and
passes its own test before its author changes a line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from broker.errors import PolicyError

KINDS = ("stateless", "stateful", "polling", "reactive")
TIERS = ("isolated", "scoped", "full")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

AGENT = '''"""The {name} agent: {description}

Only domain logic lives here; the runtime (agents.runtime) checks every command's
envelope and capability token before a handler runs.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from agents.runtime import Agent, Context

agent = Agent("{name}", version="0.1.0", kind="{kind}", description="{description}"{state})


class EchoIn(BaseModel):
    text: str = Field(max_length=1000)


class EchoOut(BaseModel):
    text: str
    length: int


@agent.action(description="Answer with the text it was given.")
async def echo(args: EchoIn, ctx: Context) -> EchoOut:
    return EchoOut(text=args.text, length=len(args.text))
{extra}'''

POLL = '''

@agent.every(seconds=300)
async def check(ctx: Context) -> None:
    """Runs every five minutes (with jitter; failures back off)."""
    ctx.log.info("{name}.check")
'''

TEST = '''"""The {name} agent's own tests: its domain logic, without a broker."""

from __future__ import annotations

from agents.runtime import Context
from agents.{name}.agent import EchoOut, agent


async def test_echo_answers_with_its_input() -> None:
    ctx = Context.offline("{name}")
    result = await agent.invoke("echo", {{"text": "hello"}}, ctx)
    assert result == EchoOut(text="hello", length=5)
'''

README = '''# {name}

{description}

- kind: {kind}; network tier: {tier}
- actions: `echo` (not sensitive): answers with the text it was given.

Its permissions are the `{name}` stanza of `policy.yaml` (deny by default). After
changing that stanza run `mas policy compile`. Run it locally with
`mas agent run {name}`; test it with `pytest agents/{name}`.
'''

DOCKERFILE = '''# The {name} agent: the shared runtime image (compose.yaml passes it as the build
# context `runtime`) running this agent. Its code comes with the installed package.
# hadolint ignore=DL3006
FROM runtime
ENV MAS_IDENTITY={name}
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \\
    CMD ["mas", "agent", "probe"]
CMD ["mas", "agent", "run", "{name}"]
'''

STANZA = '''
  {name}:
    description: {description}
    kind: {kind}
    tier: {tier}{extra}
    actions:
      echo: {{description: "Answer with the text it was given."}}
'''


@dataclass(frozen=True)
class Scaffold:
    name: str
    kind: str
    tier: str
    description: str
    egress: tuple[str, ...] = ()

    def check(self, policy_text: str, agents_dir: Path) -> None:
        if not NAME.match(self.name):
            raise PolicyError(f"agent name {self.name!r} must be lower-case letters, digits "
                              "and _ (starting with a letter, at most 32)")
        if self.kind not in KINDS:
            raise PolicyError(f"--kind must be one of {', '.join(KINDS)}")
        if self.tier not in TIERS:
            raise PolicyError(f"--tier must be one of {', '.join(TIERS)}")
        if self.tier == "scoped" and not self.egress:
            raise PolicyError("a scoped agent needs at least one --egress HOST")
        if self.egress and self.tier != "scoped":
            raise PolicyError("--egress is only for --tier scoped")
        if (agents_dir / self.name).exists():
            raise PolicyError(f"{agents_dir / self.name} already exists; pick another name")
        if re.search(rf"^  {re.escape(self.name)}:", policy_text, re.MULTILINE):
            raise PolicyError(f"policy.yaml already has an agent {self.name!r}")
        if not re.search(r"^agents:\s*$", policy_text, re.MULTILINE):
            raise PolicyError("policy.yaml has no `agents:` section to add to")

    def files(self) -> dict[str, str]:
        values = {"name": self.name, "kind": self.kind, "tier": self.tier,
                  "description": self.description,
                  "state": ", state=True" if self.kind == "stateful" else "",
                  "extra": POLL.format(name=self.name) if self.kind == "polling" else ""}
        return {
            "__init__.py": f'"""The {self.name} agent."""\n',
            "agent.py": AGENT.format(**values),
            "README.md": README.format(**values),
            "Dockerfile": DOCKERFILE.format(**values),
            "tests/__init__.py": "",
            f"tests/test_{self.name}.py": TEST.format(**values),
        }

    def stanza(self) -> str:
        extra = ""
        if self.kind == "stateful":
            extra += "\n    state: true"
        if self.egress:
            extra += f"\n    egress: [{', '.join(self.egress)}]"
        return STANZA.format(name=self.name, description=self.description, kind=self.kind,
                             tier=self.tier, extra=extra)

    def write(self, root: Path) -> list[Path]:
        """Create the directory and append the stanza; the caller recompiles."""
        policy_path = root / "policy.yaml"
        policy_text = policy_path.read_text()
        self.check(policy_text, root / "agents")
        written = []
        for relative, text in self.files().items():
            path = root / "agents" / self.name / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
        policy_path.write_text(policy_text.rstrip("\n") + "\n" + self.stanza())
        return written
