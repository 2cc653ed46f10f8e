"""`mas approvals watch`: tell the operator the moment a sensitive action waits for them.

The watcher asks the orchestrator for pending approvals every second or so and announces
each new one once: a macOS dialog with Deny/Approve buttons (through ``osascript``), or
a block on the terminal with the command that answers it, and optionally an ntfy push.
It knows nothing of NATS: ``ops_cli`` hands it an ``Orchestrator`` that lists approvals
and sends decisions signed with the operator's key, the same code path as
``mas approvals approve``.

Everything shown comes from an agent and may be hostile. The AppleScript is a constant;
the text reaches it only as ``argv`` items of ``osascript -e ... -- ARGS`` (``on run
argv``), never spliced into the script, so quotes, backslashes or ``" & do shell script
"...`` are just characters in a dialog. Control and format characters (terminal escape
sequences, bidirectional overrides, NUL) are shown as ``\\uXXXX`` escapes everywhere.
The ntfy push carries only the agent.action, the summary, the approval id and its
expiry: no arguments, no data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import sys
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

import httpx2
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol.approvals import Approval

DialogMode = Literal["auto", "osascript", "none"]
Decision = Literal["approve", "deny"]
DIALOG_TITLE = "mas: approval needed"
DIALOG_REASON = "decided in the macOS dialog"
MAX_DIALOG_CHARS = 1800
NTFY_TIMEOUT_S = 5.0
# The whole AppleScript: constant, so nothing an agent writes can become code. argv is
# (title, message, seconds until it gives up); a leading "--" is dropped in case an
# osascript passes the end-of-options marker through. It answers the button's name and,
# on the next lines, whatever the operator typed as the reason.
APPLESCRIPT = (
    "on run argv",
    'if item 1 of argv is "--" then set argv to rest of argv',
    "set chosen to display dialog (item 2 of argv) with title (item 1 of argv) "
    'default answer "" buttons {"Deny", "Approve"} default button "Deny" '
    "giving up after ((item 3 of argv) as integer) with icon caution",
    'if gave up of chosen then return "gave up"',
    "return (button returned of chosen) & linefeed & (text returned of chosen)",
    "end run",
)


class WatchError(ValueError):
    """The watcher cannot start as asked; the message says what to change."""


class Orchestrator(Protocol):
    """What the watcher needs from the orchestrator, as the operator."""

    async def pending(self) -> list[Approval]: ...

    async def decide(self, approval: Approval, decision: Decision, reason: str) -> Approval: ...


def shown(text: str) -> str:
    """``text`` safe to put on a terminal or in a dialog: control and format characters
    (escape sequences, NUL, bidi overrides) become visible ``\\uXXXX`` escapes; newlines
    and tabs stay."""
    return "".join(
        c if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co")
        else f"\\u{ord(c):04x}"
        for c in text)


def one_line(text: str) -> str:
    """``shown`` with line breaks as ``\\n``: a one-line field cannot forge the lines
    after it (a fake "answer with" block, say)."""
    return shown(text).replace("\n", "\\n")


def remaining_s(approval: Approval, now: float | None = None) -> int:
    return max(0, approval.expires_at - int(time.time() if now is None else now))


def arguments_text(approval: Approval) -> str:
    return shown(json.dumps(approval.args, indent=2, sort_keys=True, ensure_ascii=False))


def describe(approval: Approval, now: float | None = None) -> str:
    """The approval as the operator reads it: who asks for what, why, and the exact
    arguments."""
    e = approval.explanation
    return "\n".join([
        f"{approval.agent}.{approval.action} (approval {approval.id}, "
        f"expires in {remaining_s(approval, now)} s)",
        f"summary:    {one_line(e.summary)}",
        "reason:     " + (shown(e.reason).replace("\n", "\n" + " " * 12) or "-"),
        f"confidence: {e.confidence:.2f}",
        f"requested by {one_line(approval.requested_by)}",
        f"arguments (sha256 {approval.args_sha256[:16]}...):",
        arguments_text(approval),
    ])


def terminal_block(approval: Approval, now: float | None = None) -> str:
    return "\n".join([
        "=== approval needed " + "=" * 40,
        describe(approval, now),
        "answer with one of:",
        f"  mas approvals approve {approval.id} --reason \"...\"",
        f"  mas approvals deny {approval.id} --reason \"...\"",
        "",
    ])


# --------------------------------------------------------------------------- dialog


def osascript_available() -> str | None:
    return shutil.which("osascript")


def pick_dialog(mode: DialogMode) -> str | None:
    """The osascript to use, or None for the terminal."""
    found = osascript_available()
    if mode == "none":
        return None
    if mode == "osascript":
        if found is None:
            raise WatchError("osascript is not on PATH (it comes with macOS); "
                             "use --dialog none to answer on the terminal")
        return found
    return found if sys.platform == "darwin" else None


def dialog_argv(osascript: str, approval: Approval, now: float | None = None) -> list[str]:
    """The full command line: the constant script, then the approval's text as data."""
    message = describe(approval, now)
    if len(message) > MAX_DIALOG_CHARS:
        message = (message[:MAX_DIALOG_CHARS] + f"\n... ({len(message) - MAX_DIALOG_CHARS} "
                   f"more characters: see `mas approvals show {approval.id}` before approving)")
    message += "\n\nOptional reason for your decision:"
    script = [arg for line in APPLESCRIPT for arg in ("-e", line)]
    return [osascript, *script, "--", DIALOG_TITLE, message, str(max(1, remaining_s(approval,
                                                                                        now)))]


@dataclass(frozen=True)
class DialogAnswer:
    decision: Decision | None  # None: the dialog gave up or was dismissed
    reason: str = ""


def parse_dialog_output(output: str) -> DialogAnswer:
    button, _, typed = output.rstrip("\n").partition("\n")
    reason = typed.strip()[:500]
    if button == "Approve":
        return DialogAnswer("approve", reason or DIALOG_REASON)
    if button == "Deny":
        return DialogAnswer("deny", reason or DIALOG_REASON)
    return DialogAnswer(None)


async def ask_in_dialog(argv: list[str]) -> DialogAnswer:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:  # cancelled (Ctrl-C): do not leave the dialog open
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        return DialogAnswer(None)
    return parse_dialog_output(out.decode("utf-8", errors="replace"))


# --------------------------------------------------------------------------- ntfy


def ntfy_topic_url(value: str) -> str:
    """An ntfy topic URL, ``http(s)://server/topic``."""
    url = value.strip().rstrip("/")
    match = re.fullmatch(r"https?://[^/\s?#]+(?:/[^/\s?#]+)*/([-_A-Za-z0-9]{1,64})", url)
    if match is None:
        raise ValueError("must be an ntfy topic URL like https://ntfy.sh/mytopic "
                         "(http(s)://server/topic; topic letters, digits, - and _)")
    return url


class NtfySettings(BaseSettings):
    """``MAS_NTFY_URL`` (the topic URL; unset: no push) and ``MAS_NTFY_TOKEN`` (an access
    token sent as ``Authorization: Bearer``, for servers that require one)."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True)

    url: str | None = Field(default=None, validation_alias="MAS_NTFY_URL")
    token: SecretStr | None = Field(default=None, validation_alias="MAS_NTFY_TOKEN")

    @field_validator("url")
    @classmethod
    def _topic_url(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else ntfy_topic_url(value)


def load_ntfy(url_flag: str | None) -> NtfySettings:
    """The environment's settings, ``--ntfy URL`` taking precedence over ``MAS_NTFY_URL``."""
    try:
        settings = NtfySettings()
        if url_flag is not None:
            settings = settings.model_copy(update={"url": ntfy_topic_url(url_flag)})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise WatchError(f"MAS_NTFY_URL {first['msg'].removeprefix('Value error, ')}") \
            from None
    except ValueError as exc:
        raise WatchError(f"--ntfy {exc}") from None
    return settings


@dataclass(frozen=True)
class NtfyMessage:
    title: str
    body: str
    headers: dict[str, str]


def ntfy_message(approval: Approval, token: str | None = None) -> NtfyMessage:
    """ntfy's header form of publishing: the body is the message, ``Title``,
    ``Priority`` and ``Tags`` are headers. The title holds only the agent and action
    names (ASCII by the protocol), so no agent text ever lands in a header."""
    expires = datetime.fromtimestamp(approval.expires_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = f"Approval needed: {approval.agent}.{approval.action}"
    body = (f"{one_line(approval.explanation.summary)}\n"
            f"approval {approval.id}, expires {expires}\n"
            f"mas approvals show {approval.id}")
    headers = {"Title": title, "Priority": "high", "Tags": "lock",
               "Content-Type": "text/plain; charset=utf-8"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return NtfyMessage(title, body, headers)


async def push_ntfy(settings: NtfySettings, approval: Approval) -> str | None:
    """Publish one approval; None on success, else why not (without URL or token)."""
    if settings.url is None:
        return None
    token = settings.token.get_secret_value().strip() if settings.token else None
    message = ntfy_message(approval, token)
    try:
        async with httpx2.AsyncClient(timeout=NTFY_TIMEOUT_S, follow_redirects=False) as client:
            response = await client.post(settings.url, content=message.body.encode(),
                                         headers=message.headers)
    except httpx2.TimeoutException:
        return f"the ntfy server did not answer within {NTFY_TIMEOUT_S:g} s"
    except httpx2.HTTPError as exc:
        return f"cannot reach the ntfy server ({type(exc).__name__})"
    if not 200 <= response.status_code < 300:
        hint = " (check MAS_NTFY_TOKEN)" if response.status_code in (401, 403) else ""
        return f"the ntfy server answered HTTP {response.status_code}{hint}"
    return None


# --------------------------------------------------------------------------- watcher


def _print(text: str) -> None:
    print(text, flush=True)


def _warn(text: str) -> None:
    print(f"mas: {text}", file=sys.stderr, flush=True)


@dataclass
class Watcher:
    """Announces each new pending approval once; answers from the dialog if there is one.
    Dialogs are shown one at a time by a worker, so a slow human does not delay the
    terminal lines and pushes of approvals that arrive meanwhile."""

    orchestrator: Orchestrator
    osascript: str | None = None
    ntfy: NtfySettings | None = None
    say: Callable[[str], None] = _print
    warn: Callable[[str], None] = _warn
    seen: set[str] = field(default_factory=set, init=False)
    _dialogs: asyncio.Queue[Approval] = field(default_factory=asyncio.Queue, init=False)
    _unreachable: bool = field(default=False, init=False)

    async def poll(self, *, strict: bool = False) -> list[Approval]:
        """Announce the approvals that are new since the last poll; return them. When
        the orchestrator cannot be asked, warn once and try again next time (``strict``:
        raise instead)."""
        try:
            pending = await self.orchestrator.pending()
        except Exception as exc:  # the orchestrator or broker is away: keep watching
            if strict:
                raise
            if not self._unreachable:
                self.warn(f"cannot list approvals ({exc}); still watching")
            self._unreachable = True
            return []
        if self._unreachable:
            self.say("orchestrator reachable again")
            self._unreachable = False
        now = time.time()
        new = [a for a in pending if a.id not in self.seen and remaining_s(a, now) > 0]
        self.seen &= {a.id for a in pending}  # decided ones never come back: forget them
        for approval in new:
            self.seen.add(approval.id)
            if self.osascript is None:
                self.say(terminal_block(approval, now))
            else:
                self.say(f"approval needed: {approval.id} {approval.agent}.{approval.action}: "
                         f"{one_line(approval.explanation.summary)} (asking in a dialog)")
                self._dialogs.put_nowait(approval)
            problem = None if self.ntfy is None else await push_ntfy(self.ntfy, approval)
            if problem is not None:
                self.warn(f"ntfy push for {approval.id} failed: {problem}; still watching")
        return new

    async def _answer(self, approval: Approval) -> None:
        assert self.osascript is not None
        answer = await ask_in_dialog(dialog_argv(self.osascript, approval))
        if answer.decision is None:
            self.say(f"{approval.id}: no answer in the dialog; it stays pending "
                     f"(mas approvals approve|deny {approval.id})")
            return
        try:
            result = await self.orchestrator.decide(approval, answer.decision, answer.reason)
        except Exception as exc:
            self.warn(f"{approval.id}: {answer.decision} not accepted: {exc}")
            return
        self.say(f"{result.id}: {result.status} ({result.agent}.{result.action})")

    async def dialogs(self) -> None:
        while True:
            approval = await self._dialogs.get()
            try:
                await self._answer(approval)
            finally:
                self._dialogs.task_done()

    async def run(self, *, interval_s: float = 1.0, once: bool = False) -> None:
        """Poll until cancelled; with ``once``, handle what is pending now (dialogs
        included) and return."""
        worker = asyncio.create_task(self.dialogs())
        try:
            while True:
                await self.poll(strict=once)
                if once:
                    await self._dialogs.join()
                    return
                await asyncio.sleep(interval_s)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
