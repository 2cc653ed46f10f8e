"""The notify agent: notifications to the owner over every configured channel, and, when
approved, messages to a configured contact."""

from __future__ import annotations

import asyncio

from pydantic import ValidationError

from agents.notify.channels import Channel, deliver
from agents.notify.models import Note, NotifyError, NotifyOut, NotifyOwnerIn, SendMessageIn
from agents.notify.settings import NotifySettings
from agents.runtime import Agent, Context

agent = Agent("notify", version="1.0.0", kind="stateless",
              description="Delivers notifications to the owner (ntfy, webhook).")
OWNER = "owner"


def owner_channels(settings: NotifySettings) -> list[Channel]:
    channels = []
    if settings.ntfy_url is not None:
        channels.append(Channel("ntfy", settings.ntfy_url, settings.topic, settings.token_file))
    if settings.webhook_url is not None:
        channels.append(Channel("webhook", settings.webhook_url,
                                token_file=settings.webhook_token_file))
    return channels


def contact_channel(settings: NotifySettings, name: str) -> Channel | None:
    contact = settings.contacts.get(name)
    if contact is None:
        return None
    if contact.kind == "ntfy":
        server, _, topic = contact.url.rpartition("/")
        return Channel("ntfy", server, topic, contact.token_file)
    return Channel("webhook", contact.url, token_file=contact.token_file)


def _settings(ctx: Context) -> NotifySettings | NotifyError:
    try:
        return NotifySettings.load(ctx.settings)
    except (ValidationError, ValueError) as exc:
        problem = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = ("MAS_NOTIFY_" + str(problem["loc"][0]).upper()
                 if problem and problem["loc"] else "MAS_NOTIFY_*")
        text = problem["msg"] if problem else str(exc)
        return NotifyError(code="not_configured", message=f"bad setting {where}: {text}")


async def _send(channels: list[Channel], note: Note, recipient: str, ctx: Context,
                timeout_s: float) -> NotifyOut:
    deliveries = await asyncio.gather(*(deliver(c, note, recipient, timeout_s)
                                        for c in channels))
    delivered = any(d.ok for d in deliveries)
    for d in deliveries:
        (ctx.log.info if d.ok else ctx.log.warning)(
            "notify.delivery", channel=d.channel, ok=d.ok, status=d.status,
            recipient="owner" if recipient == OWNER else "contact")
    error = None if delivered else NotifyError(
        code="not_delivered", message="no channel took the message: "
        + "; ".join(f"{d.channel}: {d.error}" for d in deliveries))
    return NotifyOut(delivered=delivered, recipient=recipient, deliveries=list(deliveries),
                     error=error)


@agent.action(description="Send a notification to the owner.")
async def notify_owner(args: NotifyOwnerIn, ctx: Context) -> NotifyOut:
    """Over every configured channel (ntfy and the webhook); delivered if one took it."""
    settings = _settings(ctx)
    if isinstance(settings, NotifyError):
        return NotifyOut(delivered=False, recipient=OWNER, error=settings)
    channels = owner_channels(settings)
    if not channels:
        return NotifyOut(delivered=False, recipient=OWNER, error=NotifyError(
            code="not_configured", message="no delivery channel configured: set "
            "MAS_NOTIFY_NTFY_URL and MAS_NOTIFY_TOPIC, or MAS_NOTIFY_WEBHOOK_URL"))
    return await _send(channels, args, OWNER, ctx, settings.timeout_s)


@agent.action(description="Send a message to someone other than the owner.", sensitive=True)
async def send_message(args: SendMessageIn, ctx: Context) -> NotifyOut:
    """Sensitive: runs only with an approval bound to these arguments. ``to`` must be a
    contact in MAS_NOTIFY_CONTACTS, so an approved message still cannot go to an address
    the operator did not set up."""
    settings = _settings(ctx)
    if isinstance(settings, NotifyError):
        return NotifyOut(delivered=False, recipient=args.to, error=settings)
    channel = contact_channel(settings, args.to)
    if channel is None:
        known = ", ".join(sorted(settings.contacts)) or "none"
        return NotifyOut(delivered=False, recipient=args.to, error=NotifyError(
            code="unknown_contact",
            message=f"{args.to} is not a contact in MAS_NOTIFY_CONTACTS (known: {known})"))
    note = Note(title=args.title, message=args.message)
    return await _send([channel], note, args.to, ctx, settings.timeout_s)
