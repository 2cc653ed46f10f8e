"""Cryptography and claims: keys, capability tokens, signed envelopes, revocations, X.509.

This package knows nothing of NATS. The broker layer feeds it bytes and strings and
gets back verified claims or a specific error.
"""
