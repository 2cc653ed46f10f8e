"""The egress proxy for agents of the scoped tier.

An agent of the scoped tier has no route out of its own network; the only way out is this
HTTP CONNECT proxy, which lets an agent reach only the hosts its policy lists, on port 443,
and only when every address those names resolve to is a public one. Every decision is one
structured log line.
"""
