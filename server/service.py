"""The gRPC servicer: validation, then hand-off to the engine.

Methods are named after the RPCs. Every check on the request happens here,
before any compute, and names the offending field; the engine then prices the
job against its budgets. Exceptions become status codes only through
`errors.status_for`. The servicer stays thin: batching and teaching live in
`engine`, wire conversions in `logitcast.protos.convert`, row identity in
`logitcast.ops.rowkey` (computed by the engine from the tokens received).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib

import grpc
import torch

from logitcast.ops import METHODS, InvalidSpecError
from logitcast.ops.codec import EXTRAS, VERSION
from logitcast.ops.sparsifiers import check_spec_vocab
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.protos.convert import rows_from_proto, spec_from_proto
from logitcast.server.backends import TeacherBackend
from logitcast.server.engine import DONE, Engine
from logitcast.server.errors import (
    PreconditionError,
    StreamStalledError,
    UnknownTeacherError,
    status_for,
)
from logitcast.server.jobs import DISTILL, SCORE, Job
from logitcast.server.limits import RequestLimits, bytes_per_position

logger = logging.getLogger(__name__)


class TeacherServicer(pb_grpc.TeacherServicer):
    """Teacher service over one engine."""

    def __init__(self, engine: Engine, limits: RequestLimits, *,
                 methods: tuple[str, ...] = METHODS, version: str = "") -> None:
        self.engine, self.limits, self.methods, self.version = engine, limits, methods, version
        self.backend: TeacherBackend = engine.backend
        self.metrics = engine.metrics

    async def Distill(self, request: pb.DistillRequest, context: grpc.aio.ServicerContext) -> None:
        """Native gRPC: each chunk is written as soon as it is ready; a client that takes
        none for `stall_timeout_s` (HTTP/2 flow control holds the write) is cancelled."""
        stall = self.engine.config.stall_timeout_s

        async def write(chunk: pb.DistillChunk) -> None:
            try:
                await asyncio.wait_for(context.write(chunk), stall)
            except asyncio.TimeoutError:
                self.metrics.stalled_streams.inc()
                raise StreamStalledError(
                    f"the client read nothing for {stall:.0f}s with output waiting; the server "
                    f"cancelled this stream after row {chunk.row_start}") from None
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                if context.cancelled() or context.done():
                    raise asyncio.CancelledError from exc  # the client went away mid-write
                raise

        await self._distill(request, context, write)

    async def distill_chunks(self, request: pb.DistillRequest, context):
        """The same stream as an async generator, for hosts that pull chunks (Ray Serve)."""
        out: asyncio.Queue = asyncio.Queue(maxsize=1)
        end = object()

        async def run() -> None:
            try:
                await self._distill(request, context, out.put)
            finally:
                await out.put(end)

        task = asyncio.ensure_future(run())
        try:
            while (chunk := await out.get()) is not end:
                yield chunk
            await task  # re-raises the abort, with its status code set on the context
        finally:
            task.cancel()

    async def _distill(self, request: pb.DistillRequest, context, write) -> None:
        t0, job, code = time.perf_counter(), None, grpc.StatusCode.OK
        try:
            admitted = self._admit(request)
            self.engine.submit(admitted)
            job = admitted  # from here on the engine holds it and `finish` must release it
            self.metrics.inflight.inc()
            async for row_start, row_count, payload, keys in self._results(job):
                await write(pb.DistillChunk(row_start=row_start, row_count=row_count,
                                            payload=payload, crc32=zlib.crc32(payload),
                                            row_keys=keys))
                self.engine.consumed(job, row_count)
                self.metrics.sent_bytes.inc(len(payload))
            self.metrics.request_seconds.observe(time.perf_counter() - t0)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                logger.warning("Distill failed: %s", exc)
            if job is not None:  # free its budget before the client can see the status
                self.engine.finish(job)
            await context.abort(code, str(exc))
        finally:
            if job is not None:
                self.metrics.inflight.dec()
                self.engine.finish(job)
            self.metrics.requests.labels("Distill", code.name).inc()

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        b = self.backend
        self.metrics.requests.labels("Info", "OK").inc()
        return pb.InfoResponse(
            teacher_id=b.teacher_id, tokenizer_fingerprint=b.tokenizer_fingerprint,
            vocab_size=b.vocab_size, max_rows=self.limits.max_rows,
            max_tokens=self.limits.max_tokens, max_seq_len=self._max_seq_len(),
            methods=list(self.methods), codec_versions=[VERSION], server_version=self.version,
            supports_documents=b.supports_documents,
            batch_invariant=b.batch_invariant, backend=b.name,
        )

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        """Admitted, batched and budgeted like Distill (a job of kind SCORE)."""
        code, job = grpc.StatusCode.OK, None
        try:
            tokens, docs = self._rows(request.rows)
            if docs is not None:
                raise ValueError("rows.document_ids is not supported by Score")
            if tokens.shape[1] < 2:
                raise ValueError("rows.seq_len must be >= 2 to score next tokens")
            admitted = Job(kind=SCORE, tokens=tokens, row_bytes=16,
                           rows_per_chunk=tokens.shape[0])
            self.engine.submit(admitted)
            job = admitted
            sums: list[float] = []
            async for _, row_count, row_sums in self._results(job):
                sums.extend(row_sums)
                self.engine.consumed(job, row_count)
            return pb.ScoreResponse(logprob_sum=sums, token_count=[tokens.shape[1] - 1] * len(sums))
        except Exception as exc:
            code = status_for(exc)
            if job is not None:  # free its budget before the client can see the status
                self.engine.finish(job)
            await context.abort(code, str(exc))
        finally:
            if job is not None:
                self.engine.finish(job)
            self.metrics.requests.labels("Score", code.name).inc()

    @staticmethod
    async def _results(job: Job):
        """The job's results in order until DONE; an exception from the engine is raised."""
        while True:
            item = await job.queue.get()
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # ------------------------------------------------------------------ admission

    def _admit(self, req: pb.DistillRequest) -> Job:
        b = self.backend
        if req.teacher_id and req.teacher_id != b.teacher_id:
            raise UnknownTeacherError(
                f"teacher_id {req.teacher_id!r} is not served here (this server: {b.teacher_id!r})")
        if req.codec_version != VERSION:
            raise PreconditionError(
                f"codec_version {req.codec_version} not supported; server speaks [{VERSION}]")
        tokens, docs = self._rows(req.rows)
        rows, seq = tokens.shape
        if not req.HasField("spec"):
            raise InvalidSpecError("spec is required")
        spec = spec_from_proto(req.spec)
        if spec.method not in self.methods:
            raise InvalidSpecError(f"spec.method {spec.method!r} is not enabled here: {self.methods}")
        check_spec_vocab(spec, b.vocab_size)
        self.limits.check_spec(spec, b.vocab_size)
        extras = tuple(req.extras) or ("logprob",)
        unknown = sorted(set(extras) - set(EXTRAS))
        if unknown:
            raise ValueError(f"extras {unknown} unknown; choose from {sorted(EXTRAS)}")
        if len(set(extras)) != len(extras):
            raise ValueError(f"extras {list(extras)} repeat an entry")
        per_row = bytes_per_position(spec, b.vocab_size) * seq
        if per_row > self.limits.max_chunk_bytes:
            raise ValueError(
                f"one row of {seq} positions with method {spec.method!r} may need {per_row} bytes, "
                f"over the {self.limits.max_chunk_bytes}-byte message limit; use shorter rows "
                f"or a sparser method")
        fit = self.limits.max_chunk_bytes // per_row
        rpc = req.rows_per_chunk or max(1, self.limits.chunk_positions // seq)
        return Job(kind=DISTILL, tokens=tokens, document_ids=docs, spec=spec, extras=extras,
                   rows_per_chunk=max(1, min(rpc, fit, rows)), row_bytes=per_row)

    def _rows(self, msg: pb.Rows) -> tuple[torch.Tensor, torch.Tensor | None]:
        lim, b = self.limits, self.backend
        if msg.rows > lim.max_rows:
            raise ValueError(f"rows.rows={msg.rows} exceeds max_rows={lim.max_rows}")
        if msg.seq_len > self._max_seq_len():
            raise ValueError(f"rows.seq_len={msg.seq_len} exceeds max_seq_len={self._max_seq_len()}")
        if msg.rows * msg.seq_len > lim.max_tokens:
            raise ValueError(f"rows x seq_len = {msg.rows * msg.seq_len} tokens exceeds "
                             f"max_tokens={lim.max_tokens}")
        tokens, docs = rows_from_proto(msg)
        bad = (tokens < 0) | (tokens >= b.vocab_size)
        if bool(bad.any()):
            r, c = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"rows.tokens[{r}, {c}] = {int(tokens[r, c])} is outside the "
                             f"vocabulary [0, {b.vocab_size})")
        if docs is not None:
            if not b.supports_documents:
                raise PreconditionError("this teacher backend does not support document_ids")
            if bool((docs[:, 1:] < docs[:, :-1]).any()):
                raise ValueError("rows.document_ids must be non-decreasing within each row")
        return tokens, docs

    def _max_seq_len(self) -> int:
        return min(self.limits.max_seq_len, self.backend.max_seq_len)
