"""Admission and memory: server-side spec limits, cost-based budgets, bounded per-stream
output with backpressure, and cancellation of a client that stops reading."""

import threading
import time

import grpc
import torch

from logitcast.ops import TargetSpec
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.server.engine import EngineConfig
from logitcast.server.limits import RequestLimits
from tests.server.conftest import ServerThread, distill_request, rpc_error

VOCAB = 1000
BIG = TargetSpec(method="topk", k=200)  # ~200 KB per 256-token row: fills HTTP/2 windows


def tokens_for(rows, seq, seed=0):
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def test_draws_and_dense_targets_are_limited_by_the_server(tiny_backend):
    s = ServerThread(tiny_backend, limits=RequestLimits(max_draws=64))
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = pb_grpc.TeacherStub(ch)
            tokens = tokens_for(2, 16)
            for fields, match in (
                ({"method": "sample", "draws": 65535}, "spec.draws=65535 exceeds this server's max_draws=64"),
                ({"method": "sample", "unique": 4.0, "max_draws": 65535}, "spec.max_draws=65535"),
                ({"method": "head_tail", "draws": 65}, "spec.draws=65"),
                ({"method": "full"}, "--allow-full"),
                ({"method": "topk", "k": 5, "temperature": 1e-39}, "temperature must be in"),
                ({"method": "head_tail", "proposal_t": 2e-174}, "proposal_t must be in"),
            ):
                request = distill_request(tokens)
                request.spec.CopyFrom(pb.TargetSpec(**fields))
                code, details = rpc_error(lambda r=request: list(stub.Distill(r)))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, details
                assert match in details
            request = distill_request(tokens, TargetSpec(method="sample", draws=64, unique=None))
            assert len(list(stub.Distill(request))) == 1
    finally:
        s.close()
    s = ServerThread(tiny_backend, limits=RequestLimits(allow_full=True, max_full_vocab=512))
    try:
        with grpc.insecure_channel(s.address) as ch:
            code, details = rpc_error(lambda: list(pb_grpc.TeacherStub(ch).Distill(
                distill_request(tokens_for(1, 8), TargetSpec(method="full")))))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_full_vocab=512" in details
    finally:
        s.close()
    s = ServerThread(tiny_backend, limits=RequestLimits(allow_full=True))
    try:
        with grpc.insecure_channel(s.address) as ch:
            chunks = list(pb_grpc.TeacherStub(ch).Distill(
                distill_request(tokens_for(1, 8), TargetSpec(method="full"))))
            assert len(chunks) == 1
    finally:
        s.close()


def test_admission_prices_output_bytes_not_just_tokens(tiny_backend):
    cfg = EngineConfig(max_queue_bytes=3 << 20, stream_buffer_bytes=1 << 20)
    s = ServerThread(tiny_backend, engine_config=cfg)
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = pb_grpc.TeacherStub(ch)
            # one request can never fit: refused as a bad request, not as "retry later"
            code, details = rpc_error(lambda: list(stub.Distill(distill_request(
                tokens_for(1, 1024), TargetSpec(method="topk", k=1000)))))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_queue_bytes" in details
            # two streams each holding a stream buffer fill the budget: the third waits
            calls = [stub.Distill(distill_request(tokens_for(40, 256, seed=i), BIG,
                                                  rows_per_chunk=1)) for i in range(2)]
            for call in calls:
                next(call)
            code, details = rpc_error(lambda: list(stub.Distill(distill_request(
                tokens_for(40, 256, seed=9), BIG, rows_per_chunk=1))))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queue_bytes" in details
            for call in calls:
                assert len(list(call)) == 39
            assert s.server.engine.reserved_bytes == 0
            assert len(list(stub.Distill(distill_request(tokens_for(40, 256, seed=9), BIG,
                                                         rows_per_chunk=1)))) == 40
    finally:
        s.close()


def wait_until_quiet(read, timeout_s=60.0):
    """Poll `read()` until it holds still for a second (bounded)."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        now = read()
        if now == last:
            return now
        last = now
        time.sleep(1.0)
    return last


def test_a_slow_reader_pauses_only_its_own_job(tiny_backend):
    """Its paused rows neither run ahead of the reader nor keep others out of the queue
    (the queue holds 300 + 20 rows' tokens only if the paused ones do not count)."""
    cfg = EngineConfig(stream_buffer_bytes=1 << 20, max_batch_tokens=1024,
                       max_queue_tokens=310 * 256)
    s = ServerThread(tiny_backend, engine_config=cfg)
    engine = s.server.engine
    try:
        with grpc.insecure_channel(s.address) as slow_ch, grpc.insecure_channel(s.address) as ch:
            slow = pb_grpc.TeacherStub(slow_ch).Distill(
                distill_request(tokens_for(300, 256), BIG, rows_per_chunk=1))
            first = next(slow)
            wait_until_quiet(lambda: engine.queued_tokens)  # the slow job is paused now
            fast = list(pb_grpc.TeacherStub(ch).Distill(
                distill_request(tokens_for(20, 256, seed=1), BIG, rows_per_chunk=1)))
            assert len(fast) == 20
            # the server stopped computing ahead of the reader: most rows are still queued
            assert engine.queued_tokens > 100 * 256
            rest = list(slow)
            assert [c.row_start for c in [first, *rest]] == list(range(300))
            assert engine.queued_tokens == 0
            assert engine.reserved_bytes == 0
    finally:
        s.close()


def test_a_reader_that_stops_is_cancelled_with_a_clear_status(tiny_backend):
    cfg = EngineConfig(stream_buffer_bytes=1 << 20, stall_timeout_s=1.0)
    s = ServerThread(tiny_backend, engine_config=cfg)
    engine = s.server.engine
    try:
        with grpc.insecure_channel(s.address) as ch:
            stalled = pb_grpc.TeacherStub(ch).Distill(
                distill_request(tokens_for(300, 256), BIG, rows_per_chunk=1))
            next(stalled)
            deadline = time.monotonic() + 60
            while s.server.metrics.stalled_streams._value.get() == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            code, details = rpc_error(lambda: list(stalled))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "read nothing" in details
            assert engine.active_jobs == 0
            assert engine.reserved_bytes == 0
            assert len(list(pb_grpc.TeacherStub(ch).Distill(distill_request(tokens_for(2, 16))))) == 1
    finally:
        s.close()


def test_engine_close_never_blocks_the_event_loop(tiny_backend):
    from tests.server.conftest import FaultyBackend

    gate = threading.Event()
    backend = FaultyBackend(tiny_backend, gate=gate)
    s = ServerThread(backend)
    with grpc.insecure_channel(s.address) as ch:
        call = pb_grpc.TeacherStub(ch).Distill(distill_request(tokens_for(2, 16)))
        threading.Thread(target=lambda: rpc_error(lambda: list(call)), daemon=True).start()
        # wait until the forward pass itself holds the device thread: an admitted job whose
        # batch is not yet on the device is cancelled by close() at once (CI saw that race)
        assert backend.entered.wait(30)

        async def close_and_probe():
            import asyncio

            closing = asyncio.ensure_future(s.server.engine.close())
            await asyncio.sleep(0)
            await asyncio.sleep(0.05)
            ran_while_closing = not closing.done()  # the loop ran us while close waited
            gate.set()
            await closing
            return ran_while_closing

        assert s.call(close_and_probe())
    s.call(s.server.server.stop(0))
    s.loop.call_soon_threadsafe(s.loop.stop)
    s.thread.join(timeout=10)
