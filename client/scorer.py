"""`TeacherScorer`: total teacher log-probability of rows, from the fleet's `Score` RPC.

What `logitcast select` (MiniPLM difference sampling) asks a teacher fleet: for each
row of tokens, sum_t log p(x_t | x_<t) over t = 1..T-1. Batches of equal-length rows
go out as one unary Score call each, `in_flight` at a time, and come back in order.
Failures are handled like `TeacherClient`'s Distill: a RETRYABLE status (or a
response of the wrong size, or non-finite sums) moves the request to the next
address after a jittered backoff, up to `max_tries`; anything else raises.

It knows nothing about corpora, instances or selection: it takes int token arrays
[rows, T] and gives float64 sums [rows].
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np
import torch

from logitcast.client.teacher_client import (
    CorruptStreamError,
    TeacherMismatchError,
    TeacherUnavailableError,
    backoff_delay,
    fleet_infos,
    open_channels,
    retry_reason,
)
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.protos.convert import rows_to_proto

logger = logging.getLogger(__name__)


class TeacherScorer:
    """Score RPCs over a teacher fleet (one or more addresses serving the same teacher)."""

    def __init__(self, addresses: list[str], *, in_flight: int = 4, max_tries: int = 6,
                 timeout_s: float = 300.0, backoff_s: float = 0.1,
                 auth_token: str | None = None, tls_root_certs: bytes | None = None,
                 application: str | None = None, allow_insecure_auth: bool = False) -> None:
        """in_flight: Score calls outstanding at once (spread over the addresses).
        The other arguments are `TeacherClient`'s."""
        if in_flight < 1 or max_tries < 1:
            raise ValueError(f"in_flight and max_tries must be >= 1, got {in_flight}, {max_tries}")
        self.addresses = list(addresses)
        self.in_flight, self.max_tries = in_flight, max_tries
        self.timeout_s, self.backoff_s = timeout_s, backoff_s
        self._channels, self._meta = open_channels(
            self.addresses, auth_token=auth_token, tls_root_certs=tls_root_certs,
            application=application, allow_insecure_auth=allow_insecure_auth)
        self._stubs = [pb_grpc.TeacherStub(c) for c in self._channels]
        self._pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="scorer")
        self._sent = 0
        info = self._check_fleet()
        self.name: str = info.teacher_id
        """The teacher id every reachable server reports."""
        self.tokenizer_fingerprint: str = info.tokenizer_fingerprint
        self.vocab_size: int = int(info.vocab_size)
        self.max_rows, self.max_tokens, self.max_seq_len = info.max_rows, info.max_tokens, \
            info.max_seq_len
        """Per-request limits: the smallest over the reachable servers."""

    def _check_fleet(self) -> pb.InfoResponse:
        """Info() on every address; reachable servers must serve one teacher and tokenizer."""
        seen: pb.InfoResponse | None = None
        for addr, info in fleet_infos(self.addresses, self._stubs, self._meta):
            if seen is None:
                seen = info
                continue
            for field in ("teacher_id", "tokenizer_fingerprint", "vocab_size"):
                if getattr(info, field) != getattr(seen, field):
                    raise TeacherMismatchError(
                        f"{addr}: {field} {getattr(info, field)!r} differs from "
                        f"{getattr(seen, field)!r} elsewhere in the fleet")
            for field in ("max_rows", "max_tokens", "max_seq_len"):
                setattr(seen, field, min(getattr(seen, field), getattr(info, field)))
        return seen

    # ------------------------------------------------------------------ scoring

    def score_batches(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """float64 [rows] log-prob sums for each int array [rows, T] of `batches`, in order,
        `in_flight` requests ahead."""
        pending: collections.deque[Future] = collections.deque()
        it = iter(batches)
        try:
            while True:
                while len(pending) < self.in_flight:
                    nxt = next(it, None)
                    if nxt is None:
                        break
                    pending.append(self._pool.submit(self.score, nxt, self._sent))
                    self._sent += 1
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()

    def score(self, rows: np.ndarray, first: int = 0) -> np.ndarray:
        """float64 [R] sums of log p(x_t | x_<t), t = 1..T-1, of rows: int [R, T] (one
        request; failed tries go to the next address, starting from address `first`)."""
        tokens = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise ValueError(f"rows must be [rows, T >= 2], got shape {tuple(tokens.shape)}")
        request = pb.ScoreRequest(rows=rows_to_proto(tokens))
        last = None
        for attempt in range(self.max_tries):
            i = (first + attempt) % len(self._stubs)
            try:
                response = self._stubs[i].Score(request, timeout=self.timeout_s,
                                                metadata=self._meta)
                return _checked(response, *tokens.shape)
            except (grpc.RpcError, CorruptStreamError) as exc:
                last = retry_reason(exc)
                if last is None:
                    raise
                delay = backoff_delay(self.backoff_s, attempt)
                logger.warning("Score of %d rows: %s from %s; trying the next address in "
                               "%.2fs", tokens.shape[0], last, self.addresses[i], delay)
                time.sleep(delay)
        raise TeacherUnavailableError(
            f"Score of {tokens.shape[0]} rows failed {self.max_tries} times over "
            f"{self.addresses}; last error {last}")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for c in self._channels:
            c.close()

    def __enter__(self) -> TeacherScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _checked(response: pb.ScoreResponse, rows: int, seq: int) -> np.ndarray:
    """The response's sums, after checking it answers exactly these rows."""
    if len(response.logprob_sum) != rows or len(response.token_count) != rows:
        raise CorruptStreamError(f"Score answered {len(response.logprob_sum)} sums and "
                                 f"{len(response.token_count)} counts for {rows} rows")
    if any(c != seq - 1 for c in response.token_count):
        raise CorruptStreamError(f"Score counted {sorted(set(response.token_count))} tokens "
                                 f"per row, expected {seq - 1}")
    sums = np.asarray(response.logprob_sum, dtype=np.float64)
    if not all(math.isfinite(s) and s <= 0 for s in sums):
        raise CorruptStreamError("Score answered non-finite or positive log-prob sums")
    return sums
