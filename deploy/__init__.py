"""Container deployment compiled from the policy: compose.yaml and the seccomp profiles.

`mas policy compile` writes them next to nats-server.conf (see ``deploy.outputs``); like it,
they are committed and never edited by hand.
"""
