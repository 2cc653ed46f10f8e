"""The operator dashboard: live monitoring and controls in a browser on this machine.

A small ASGI app (Starlette) served by uvicorn on 127.0.0.1. Starlette because it gives
routing, request parsing, streaming responses (Server-Sent Events) and middleware without
a template engine or ORM to audit; uvicorn because it runs that app inside the same asyncio
loop as nats-py, so the dashboard holds exactly one broker connection, as the ``operator``
identity, like the CLI. The process has no Docker socket and no agent secrets: every
control goes over the broker to the orchestrator (``mas.admin.*``) or to control
(``mas.control.*``), and approval decisions are signed with the operator key exactly as
``mas approvals approve`` signs them.

Modules: ``login`` (the login secret file), ``web`` (sessions, CSRF, routes),
``feed`` (what the page shows, collected from the broker and the NATS monitoring
endpoint), ``actions`` (the controls), ``server`` (running it).
"""
