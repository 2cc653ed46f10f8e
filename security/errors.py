"""Every error the security core raises. Callers match on the class, never on text."""


class SecurityError(Exception):
    """Base class: something failed a security check or a key could not be used."""


class KeyFileError(SecurityError):
    """A key file is missing, unreadable, malformed or too widely readable."""


class TokenError(SecurityError):
    """A capability token was refused. ``code`` is stable and safe to send back."""

    code = "token_invalid"


class TokenMalformed(TokenError):
    code = "token_malformed"


class TokenBadSignature(TokenError):
    code = "token_bad_signature"


class TokenUnknownKey(TokenError):
    code = "token_unknown_key"


class TokenExpired(TokenError):
    code = "token_expired"


class TokenNotYetValid(TokenError):
    code = "token_not_yet_valid"


class TokenLifetimeTooLong(TokenError):
    code = "token_lifetime_too_long"


class TokenWrongAudience(TokenError):
    code = "token_wrong_audience"


class TokenOutOfScope(TokenError):
    code = "token_out_of_scope"


class TokenRevoked(TokenError):
    code = "token_revoked"


class TokenArgsMismatch(TokenError):
    code = "token_args_mismatch"


class EnvelopeError(SecurityError):
    """A signed message envelope was refused."""

    code = "envelope_invalid"


class EnvelopeMalformed(EnvelopeError):
    code = "envelope_malformed"


class EnvelopeUnknownSender(EnvelopeError):
    code = "envelope_unknown_sender"


class EnvelopeBadSignature(EnvelopeError):
    code = "envelope_bad_signature"


class EnvelopeStale(EnvelopeError):
    code = "envelope_stale"


class EnvelopeReplayed(EnvelopeError):
    code = "envelope_replayed"


class CertificateError(SecurityError):
    """A certificate or its key is missing, malformed, expired or not from our CA."""


class DecisionError(SecurityError):
    """An approval decision was refused: unsigned, forged, or for other arguments."""

    code = "decision_invalid"
