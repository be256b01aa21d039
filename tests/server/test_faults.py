"""Failures after admission: teacher NaN/inf, out-of-memory, an unhealthy replica, and a
client that loses a stream mid-way and re-requests only the rows it did not get."""

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from logitcast.client.teacher_client import TeacherClient
from logitcast.data.packing import PackedBatch
from logitcast.ops import TargetSpec
from logitcast.ops.codec import encode
from logitcast.ops.rowkey import row_key
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.server.engine import EngineConfig
from tests.server.conftest import FaultyBackend, ServerThread, distill_request, rpc_error

POISON = 999


def tokens_for(rows, seq, seed=0):
    return torch.randint(0, POISON, (rows, seq), generator=torch.Generator().manual_seed(seed))


def test_nan_logits_are_internal_naming_the_position_and_three_make_the_replica_unhealthy(
        tiny_backend):
    s = ServerThread(FaultyBackend(tiny_backend, poison=POISON),
                     engine_config=EngineConfig(max_teacher_faults=3))
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = pb_grpc.TeacherStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            bad = tokens_for(2, 16)
            bad[1, 5] = POISON
            code, details = rpc_error(lambda: list(stub.Distill(distill_request(bad))))
            assert code == grpc.StatusCode.INTERNAL
            assert "row 1, position 5" in details
            assert len(list(stub.Distill(distill_request(tokens_for(2, 16))))) == 1  # still serving
            for _ in range(3):
                assert rpc_error(lambda: list(stub.Distill(distill_request(bad))))[0] == \
                    grpc.StatusCode.INTERNAL
            code, details = rpc_error(lambda: list(stub.Distill(distill_request(tokens_for(2, 16)))))
            assert code == grpc.StatusCode.UNAVAILABLE
            assert "unhealthy" in details
            assert health.Check(health_pb2.HealthCheckRequest(service="")).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            metrics = s.server.metrics
            assert metrics.faults.labels("nonfinite")._value.get() == 4
            assert metrics.serving._value.get() == 0
    finally:
        s.close()


def test_out_of_memory_is_resource_exhausted_and_halves_the_batch_budget(tiny_backend):
    backend = FaultyBackend(tiny_backend, oom_above=64)
    s = ServerThread(backend, engine_config=EngineConfig(max_batch_tokens=256, max_wait_s=0.05))
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = pb_grpc.TeacherStub(ch)
            tokens = tokens_for(8, 32)
            code, details = rpc_error(lambda: list(stub.Distill(
                distill_request(tokens, rows_per_chunk=1))))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "out of memory" in details
            assert s.server.engine.batch_tokens == 128
            rpc_error(lambda: list(stub.Distill(distill_request(tokens, rows_per_chunk=1))))
            assert s.server.engine.batch_tokens == 64
            chunks = list(stub.Distill(distill_request(tokens, rows_per_chunk=1)))
            assert len(chunks) == 8  # fits now; the replica stayed healthy
            assert max(backend.forward_tokens[-4:]) <= 64
            assert s.server.metrics.faults.labels("oom")._value.get() == 2
            assert s.server.engine.unhealthy_reason is None
    finally:
        s.close()


def test_score_is_admitted_against_the_same_budgets(tiny_backend):
    s = ServerThread(tiny_backend, engine_config=EngineConfig(max_queue_tokens=100))
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = pb_grpc.TeacherStub(ch)
            rows = distill_request(tokens_for(4, 32)).rows
            code, details = rpc_error(lambda: stub.Score(pb.ScoreRequest(rows=rows)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT  # 128 tokens never fit 100
            assert "max_queue_tokens" in details
            small = distill_request(tokens_for(2, 32)).rows
            assert len(stub.Score(pb.ScoreRequest(rows=small)).logprob_sum) == 2
            assert s.server.engine.active_jobs == 0
            assert s.server.engine.reserved_bytes == 0
    finally:
        s.close()


def test_client_re_requests_only_the_rows_it_did_not_receive_elsewhere(tiny_backend):
    """Server A fails at row 3 (a poisoned position); B serves only rows 3..5; the
    step's targets equal an undisturbed run byte for byte."""
    spec = TargetSpec(method="sample", unique=8.0)
    tokens = tokens_for(6, 16, seed=2)
    tokens[3, 7] = POISON
    poisoned = FaultyBackend(tiny_backend, poison=POISON)
    a = ServerThread(poisoned, engine_config=EngineConfig(max_batch_tokens=16))
    b = ServerThread(tiny_backend)
    batch = PackedBatch(step=0, input_ids=tokens, labels=tokens, document_ids=None,
                        row_keys=tuple(row_key(r) for r in tokens))
    try:
        kw = {"tokenizer_fingerprint": tiny_backend.tokenizer_fingerprint,
                  "vocab_size": tiny_backend.vocab_size, "backoff_s": 0.01}
        with TeacherClient([a.address, b.address], spec, **kw) as client:
            got = client.fetch(batch)
        assert a.server.metrics.tokens._value.get() == 3 * 16
        assert b.server.metrics.tokens._value.get() == 3 * 16
        assert client.metrics.retries.labels("INTERNAL")._value.get() == 1
        with TeacherClient([b.address], spec, **kw) as clean:
            assert encode(clean.fetch(batch).targets) == encode(got.targets)
    finally:
        a.close()
        b.close()
