"""The engine's scheduling and pipeline: round-robin fairness across streams, targets that
do not depend on batching, and the CUDA path (side-stream copies into pinned buffers)."""

import threading

import grpc
import pytest
import torch

from logitcast.ops import SparseTargets, TargetSpec, sparsify
from logitcast.ops.codec import decode, encode
from logitcast.ops.rowkey import draw_coordinates
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.server.backends import TransformersBackend
from logitcast.server.engine import EngineConfig
from tests.server.conftest import ServerThread, distill_request

VOCAB = 1000


def tokens_for(rows, seq, seed=0):
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def test_a_small_request_is_not_starved_by_a_huge_one(tiny_backend):
    """Round robin: once the small stream is admitted, every batch carries a chunk of it,
    so it finishes long before the huge stream that arrived first."""
    s = ServerThread(tiny_backend, engine_config=EngineConfig(max_batch_tokens=128))
    finished: list[str] = []
    lock = threading.Lock()
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = pb_grpc.TeacherStub(ch)
            huge = stub.Distill(distill_request(tokens_for(300, 32), rows_per_chunk=1))
            next(huge)

            def drain_huge():
                list(huge)
                with lock:
                    finished.append("huge")

            reader = threading.Thread(target=drain_huge)
            reader.start()
            small = list(stub.Distill(distill_request(tokens_for(4, 32, seed=1), rows_per_chunk=1)))
            with lock:
                finished.append("small")
            reader.join(120)
            assert len(small) == 4
            assert finished == ["small", "huge"]
    finally:
        s.close()


def test_targets_do_not_depend_on_batch_budget_or_pipeline_depth(tiny_backend):
    tokens = tokens_for(6, 48, seed=3)
    spec = TargetSpec(method="head_tail", k_head=2, unique=6.0)
    results = []
    for cfg in (EngineConfig(max_batch_tokens=48, pipeline_depth=1),
                EngineConfig(max_batch_tokens=4096, pipeline_depth=8)):
        s = ServerThread(tiny_backend, engine_config=cfg)
        try:
            with grpc.insecure_channel(s.address) as ch:
                chunks = list(pb_grpc.TeacherStub(ch).Distill(
                    distill_request(tokens, spec, rows_per_chunk=2)))
                results.append(SparseTargets.cat([decode(c.payload) for c in chunks]))
        finally:
            s.close()
    width = max(r.width for r in results)
    assert encode(results[0].pad_to(width)) == encode(results[1].pad_to(width))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pipeline_copies_through_pinned_buffers_and_serves_the_ops_result():
    backend = TransformersBackend.tiny_random(vocab_size=VOCAB, seed=0, device="cuda")
    tokens = tokens_for(4, 64, seed=4)
    spec = TargetSpec(method="sample", unique=8.0)
    s = ServerThread(backend, engine_config=EngineConfig(max_batch_tokens=128))
    try:
        host, ready = s.server.engine._to_host(sparsify(
            backend.logits(backend.hidden_states(tokens.cuda()).reshape(-1, 64)), spec,
            row_keys=draw_coordinates(tokens)[1].cuda(), positions=draw_coordinates(tokens)[2].cuda()))
        assert ready is not None
        assert host.ids.is_pinned()
        assert host.device.type == "cpu"
        ready.synchronize()
        with grpc.insecure_channel(s.address) as ch:
            chunks = list(pb_grpc.TeacherStub(ch).Distill(distill_request(tokens, spec)))
        served = SparseTargets.cat([decode(c.payload) for c in chunks])
        hidden = backend.hidden_states(tokens.cuda()).reshape(-1, 64)
        labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], 1).reshape(-1)
        _, draw, pos = draw_coordinates(tokens)
        direct = sparsify(backend.logits(hidden), spec, row_keys=draw.cuda(), positions=pos.cuda(),
                          labels=labels.cuda(), chunk_size=256, entropy=False).to("cpu")
        assert encode(served) == encode(direct.pad_to(served.width))
    finally:
        s.close()
