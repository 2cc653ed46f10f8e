"""The control service: starts, stops and inspects agents for the operator.

It is the only part of the platform that touches the Docker API (or, in local mode, the
agents' processes). It answers only requests whose envelope the operator signed, acts only
on this compose project's containers labelled as agents named in the policy, and has no
LLM in it.
"""
