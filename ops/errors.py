"""Exceptions raised by `logitcast.ops` for bad input.

Every exception is a `ValueError` subclass so callers that only care about
"bad input" can catch one type; the gRPC layer maps the subclasses to status
codes (a codec-version mismatch is a precondition failure, the rest are
invalid arguments). This module knows nothing about gRPC.
"""

from __future__ import annotations


class InvalidSpecError(ValueError):
    """A target spec (method, k, p, draws, temperature, ...) is out of range."""


class NonFiniteLogitsError(ValueError):
    """Teacher logits contain NaN or +inf, or a position has no finite logit."""


class CodecError(ValueError):
    """A byte string is not a valid encoded chunk of sparse targets."""


class CodecVersionError(CodecError):
    """A payload was written by a codec version this build cannot read."""


class CodecCapacityError(CodecError):
    """Targets do not fit the codec's fields (too many draws, vocab too large)."""
