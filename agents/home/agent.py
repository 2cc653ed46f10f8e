"""The home agent: Home Assistant states on request, service calls once approved, and a
suggestion (never an action) when the health agent says a break is due."""

from __future__ import annotations

from pydantic import ValidationError

from agents.home.classify import explain_call
from agents.home.client import HomeAssistant, HomeAssistantError
from agents.home.models import (
    CallServiceIn,
    CallServiceOut,
    GetStateIn,
    GetStateOut,
    ListStatesIn,
    ListStatesOut,
    fit,
)
from agents.home.reactions import Cooldown, break_suggestion, is_break_due
from agents.home.settings import HomeSettings
from agents.runtime import Agent, Context, Event

agent = Agent("home", version="1.0.0", kind="reactive",
              description="Reads and controls Home Assistant through its REST API.")
cooldown = Cooldown()


def _settings(ctx: Context) -> HomeSettings:
    try:
        return HomeSettings.load(ctx.settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "MAS_HOME_" + str(first["loc"][0] if first["loc"] else "").upper()
        raise HomeAssistantError("not_configured", f"bad setting {name}: {first['msg']}") \
            from None


@agent.action(description="All entity states (optionally of one domain).")
async def list_states(args: ListStatesIn, ctx: Context) -> ListStatesOut:
    try:
        settings = _settings(ctx)
        states = await HomeAssistant(settings).states()
    except HomeAssistantError as exc:
        ctx.log.warning("home.request_failed", action="list_states", code=exc.code)
        return ListStatesOut(error=exc.as_model())
    if args.domain is not None:
        states = [s for s in states if s.entity_id.split(".", 1)[0] == args.domain]
    kept = fit(states, settings.max_reply_bytes)
    return ListStatesOut(states=kept, total=len(states), truncated=len(kept) < len(states))


@agent.action(description="One entity's state.")
async def get_state(args: GetStateIn, ctx: Context) -> GetStateOut:
    try:
        state = await HomeAssistant(_settings(ctx)).state(args.entity_id)
    except HomeAssistantError as exc:
        ctx.log.warning("home.request_failed", action="get_state", code=exc.code)
        return GetStateOut(error=exc.as_model())
    return GetStateOut(state=state)


@agent.action(description="Call a Home Assistant service (lights, locks, alarms, covers).",
              sensitive=True)
async def call_service(args: CallServiceIn, ctx: Context) -> CallServiceOut:
    """Sensitive: the runtime runs this only with an approved single-use token bound to
    exactly these arguments, so the handler just performs the call."""
    explanation = explain_call(args.domain, args.service, args.entity_id, args.data)
    body = dict(args.data)
    if args.entity_id:
        body["entity_id"] = list(args.entity_id)
    try:
        changed = await HomeAssistant(_settings(ctx)).call_service(
            args.domain, args.service, body)
    except HomeAssistantError as exc:
        ctx.log.warning("home.request_failed", action="call_service", code=exc.code,
                        domain=args.domain, service=args.service)
        return CallServiceOut(explanation=explanation, error=exc.as_model())
    ctx.log.info("home.service_called", domain=args.domain, service=args.service,
                 risk=explanation.data["risk"], changed=len(changed))
    return CallServiceOut(explanation=explanation, changed=changed)


@agent.on_event("mas.event.health.>")
async def on_health(event: Event, ctx: Context) -> None:
    if not is_break_due(event.subject, event.data):
        return
    try:
        settings = _settings(ctx)
    except HomeAssistantError as exc:
        ctx.log.warning("home.break_ignored", reason=exc.message)
        return
    if settings.break_light is None:
        ctx.log.debug("home.break_ignored", reason="no MAS_HOME_BREAK_LIGHT")
        return
    if not cooldown.ready(settings.break_light, settings.break_cooldown_s):
        ctx.log.debug("home.break_ignored", reason="cooldown")
        return
    await ctx.emit("suggestion", break_suggestion(event.subject, settings.break_light))
