"""Errors of the teacher server and the one place they become gRPC status codes.

Everything below the servicer raises plain exceptions; `status_for` maps them,
and nothing else in the server picks a status code:

| exception                                  | status              | client      |
|--------------------------------------------|---------------------|-------------|
| ValueError (InvalidSpecError, ...), raised by admission before any compute | INVALID_ARGUMENT | fails |
| PreconditionError, CodecVersionError       | FAILED_PRECONDITION | fails       |
| UnknownTeacherError                        | NOT_FOUND           | fails       |
| OverloadedError (budgets, OOM), StreamStalledError | RESOURCE_EXHAUSTED | retries elsewhere |
| DrainingError (draining, or unhealthy)     | UNAVAILABLE         | retries elsewhere |
| TeacherFault (NaN/inf logits, a failed forward or encode) and anything else | INTERNAL | retries elsewhere, bounded |

Compute-time failures never surface as a `ValueError`: the engine wraps them in
`TeacherFault` (or `OverloadedError` for out-of-memory), so a bad teacher is
never reported to a client as the client's bad request.
"""

from __future__ import annotations

import grpc
import torch

from logitcast.ops.errors import CodecVersionError


class PreconditionError(Exception):
    """The request needs something this server does not offer (codec, documents)."""


class UnknownTeacherError(Exception):
    """The request names a teacher this server does not serve."""


class OverloadedError(Exception):
    """Admitting or running the request would exceed a budget, or the device ran out of memory."""


class StreamStalledError(OverloadedError):
    """The client stopped reading its stream; the server cancelled the job to free its buffer."""


class DrainingError(Exception):
    """The server is shutting down or unhealthy; retry on another replica."""


class TeacherFault(Exception):
    """The teacher (or the encoder after it) failed on well-formed input: NaN/inf logits,
    a crashed forward pass. The server's fault, not the request's."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, Python's MemoryError, or torch's CPU allocator failing."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception raised while handling a request."""
    if isinstance(exc, (PreconditionError, CodecVersionError)):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, UnknownTeacherError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, OverloadedError) or is_out_of_memory(exc):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, DrainingError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, TeacherFault):
        return grpc.StatusCode.INTERNAL
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL
