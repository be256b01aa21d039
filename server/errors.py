"""Request errors of the teacher server and the one place they become gRPC status codes.

Everything below the servicer raises plain exceptions; `status_for` maps them:
INVALID_ARGUMENT (bad request whatever the state), FAILED_PRECONDITION
(tokenizer/vocab/codec mismatch), NOT_FOUND (unknown teacher),
RESOURCE_EXHAUSTED (queue or size limits), UNAVAILABLE (draining).
"""

from __future__ import annotations

import grpc

from logitcast.ops.errors import CodecVersionError


class PreconditionError(Exception):
    """The request needs something this server does not offer (codec, documents)."""


class UnknownTeacherError(Exception):
    """The request names a teacher this server does not serve."""


class OverloadedError(Exception):
    """Admitting the request would exceed a queue or size limit."""


class DrainingError(Exception):
    """The server is shutting down; retry on another replica."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception raised while handling a request."""
    if isinstance(exc, (PreconditionError, CodecVersionError)):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, UnknownTeacherError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, DrainingError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL
