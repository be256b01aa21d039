import shutil
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from logitcast.ops import SparseTargets, TargetSpec, sparsify
from logitcast.ops.codec import decode, encode
from logitcast.ops.rowkey import draw_coordinates, row_key
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.server.app import TLSConfig
from logitcast.server.engine import EngineConfig
from tests.server.conftest import ServerThread, distill_request

VOCAB = 1000


def tokens_for(rows=4, seq=32, seed=0):
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def direct_targets(backend, tokens, spec):
    """What the ops give on the same teacher logits, without any server."""
    hidden = backend.hidden_states(tokens).reshape(-1, backend.model.config.hidden_size)
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], 1).reshape(-1)
    _, draw, pos = draw_coordinates(tokens)
    return sparsify(backend.logits(hidden), spec, row_keys=draw, positions=pos, labels=labels)


def payloads(stub, tokens, spec=None, **kw):
    return [c.payload for c in stub.Distill(distill_request(tokens, spec, **kw))]


def test_served_targets_equal_the_ops_applied_to_the_same_logits(stub, tiny_backend):
    tokens = tokens_for(rows=5, seq=24)
    for spec in (TargetSpec(), TargetSpec(method="head_tail", k_head=3, unique=6.0),
                 TargetSpec(method="topk", k=9, temperature=2.0)):
        chunks = list(stub.Distill(distill_request(tokens, spec, rows_per_chunk=2)))
        assert [(c.row_start, c.row_count) for c in chunks] == [(0, 2), (2, 2), (4, 1)]
        assert [k for c in chunks for k in c.row_keys] == [row_key(r) for r in tokens]
        served = SparseTargets.cat([decode(c.payload) for c in chunks])
        direct = direct_targets(tiny_backend, tokens, spec)
        assert encode(served) == encode(direct.pad_to(served.width))


def test_same_row_gives_identical_bytes_alone_in_a_shared_batch_and_on_another_server(
        server, tiny_backend):
    target = tokens_for(rows=1, seq=40, seed=5)
    others = [tokens_for(rows=3, seq=40, seed=s) for s in range(3)]
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.TeacherStub(ch)
        alone = payloads(stub, target)
        results = {}

        def ask(i, rows):
            results[i] = payloads(stub, rows, rows_per_chunk=1)

        threads = [threading.Thread(target=ask, args=(i, torch.cat([o[:i % 3], target, o[i % 3:]])))
                   for i, o in enumerate(others)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i in range(3):
            assert results[i][i % 3] == alone[0]
    second = ServerThread(tiny_backend, engine_config=EngineConfig(max_batch_tokens=64))
    try:
        with grpc.insecure_channel(second.address) as ch:
            assert payloads(pb_grpc.TeacherStub(ch), target) == alone
    finally:
        second.close()


def expect_code(stub, request, code, match=""):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Distill(request))
    assert err.value.code() == code, err.value.details()
    assert match in err.value.details()


def test_bad_requests_get_their_status_codes_and_the_server_keeps_serving(stub):
    good = tokens_for()
    bad_bytes = distill_request(good)
    bad_bytes.rows.seq_len = 31
    cases = [
        (distill_request(good + VOCAB), grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
        (bad_bytes, grpc.StatusCode.INVALID_ARGUMENT, "rows.tokens has"),
        (distill_request(tokens_for(rows=1025, seq=2)), grpc.StatusCode.INVALID_ARGUMENT, "max_rows"),
        (distill_request(tokens_for(rows=1, seq=1025)), grpc.StatusCode.INVALID_ARGUMENT,
         "max_seq_len"),
        (distill_request(good, TargetSpec(method="topk", k=1001)),
         grpc.StatusCode.INVALID_ARGUMENT, "k=1001"),
        (distill_request(good, extras=["nope"]), grpc.StatusCode.INVALID_ARGUMENT, "extras"),
        (distill_request(good, teacher_id="llama-70b"), grpc.StatusCode.NOT_FOUND, "llama-70b"),
        (distill_request(good, codec_version=7), grpc.StatusCode.FAILED_PRECONDITION,
         "codec_version 7"),
    ]
    for request, code, match in cases:
        expect_code(stub, request, code, match)
    bad_spec = distill_request(good)
    bad_spec.spec.CopyFrom(pb.TargetSpec(method="top_p_k", k=5, p=2.0))
    expect_code(stub, bad_spec, grpc.StatusCode.INVALID_ARGUMENT, "p must be in (0, 1]")
    assert len(payloads(stub, good)) == 1


def test_a_client_cannot_choose_the_coordinates_of_its_draws(stub):
    """The retired row_keys field (2) is ignored: the server keys draws by the tokens it
    received, so a client that tries keys until it likes the sample gets one answer."""
    tokens = tokens_for(rows=2, seq=16)
    honest = payloads(stub, tokens)
    request = distill_request(tokens).SerializeToString()
    for key in (1, 2**40 + 7):
        forged = pb.DistillRequest.FromString(  # field 2 (fixed64) kept as an unknown field
            request + bytes([0x11]) + key.to_bytes(8, "little"))
        assert forged.SerializeToString() != request
        assert [c.payload for c in stub.Distill(forged)] == honest


def test_a_request_over_the_whole_queue_is_invalid_not_retryable(tiny_backend):
    s = ServerThread(tiny_backend, engine_config=EngineConfig(max_queue_tokens=100))
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = pb_grpc.TeacherStub(ch)
            expect_code(stub, distill_request(tokens_for(rows=4, seq=32)),
                        grpc.StatusCode.INVALID_ARGUMENT, "max_queue_tokens=100")
            assert s.server.engine.active_jobs == 0  # a refused request holds nothing
            assert len(payloads(stub, tokens_for(rows=2, seq=32))) == 1
            assert s.server.metrics.inflight._value.get() == 0
    finally:
        s.close()


def wait_until(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_cancelling_mid_stream_frees_the_queue_and_the_slot(server):
    engine = server.server.engine
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.TeacherStub(ch)
        call = stub.Distill(distill_request(tokens_for(rows=400, seq=64), rows_per_chunk=1))
        next(call)
        call.cancel()
        assert wait_until(lambda: engine.active_jobs == 0 and engine.queued_tokens == 0)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Distill(distill_request(tokens_for(rows=400, seq=64), rows_per_chunk=1),
                              timeout=0.05))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: engine.active_jobs == 0 and engine.queued_tokens == 0)
        assert len(payloads(stub, tokens_for())) == 1


def test_score_matches_the_teacher_log_likelihood(stub, tiny_backend):
    tokens = tokens_for(rows=3, seq=20)
    reply = stub.Score(pb.ScoreRequest(rows=distill_request(tokens).rows))
    logits = tiny_backend.logits(tiny_backend.hidden_states(tokens)[:, :-1].reshape(-1, 64))
    logp = torch.log_softmax(logits, 1).gather(1, tokens[:, 1:].reshape(-1, 1)).view(3, 19)
    assert list(reply.token_count) == [19] * 3
    assert torch.allclose(torch.tensor(list(reply.logprob_sum), dtype=torch.float64),
                          logp.double().sum(1), atol=1e-3)


def test_health_reflection_metrics_and_drain(server):
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        service = "logitcast.v1.Teacher"
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")])))
        assert service in [s.name for s in reply.list_services_response.service]
        payloads(pb_grpc.TeacherStub(ch), tokens_for())
        text = urllib.request.urlopen(
            f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
        assert "logitcast_teacher_tokens_total 128.0" in text
        assert 'logitcast_teacher_requests_total{code="OK",rpc="Distill"} 1.0' in text
        server.call(server.server.engine.drain(1.0))
        server.call(server.server.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING))
        expect_code(pb_grpc.TeacherStub(ch), distill_request(tokens_for()),
                    grpc.StatusCode.UNAVAILABLE, "draining")


def test_bearer_token_is_required_when_configured(tiny_backend):
    s = ServerThread(tiny_backend, auth_token="s3cret")
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = pb_grpc.TeacherStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Info(pb.InfoRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            expect_code(stub, distill_request(tokens_for()), grpc.StatusCode.UNAUTHENTICATED)
            meta = [("authorization", "Bearer s3cret")]
            assert stub.Info(pb.InfoRequest(), metadata=meta).vocab_size == VOCAB
            assert len(list(stub.Distill(distill_request(tokens_for()), metadata=meta))) == 1
    finally:
        s.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")
def test_tls(tiny_backend, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    s = ServerThread(tiny_backend, tls=TLSConfig(key=key.read_bytes(), cert=cert.read_bytes()))
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(s.address, creds) as ch:
            assert pb_grpc.TeacherStub(ch).Info(pb.InfoRequest()).vocab_size == VOCAB
    finally:
        s.close()


def test_document_mode_targets_depend_only_on_the_document(stub):
    """Two packings (different seq_len and batch size) give byte-identical targets."""
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (17, 40, 9, 23, 31)]

    def pack(order, seq_len):
        rows, ids, row, doc_row, next_id, where = [], [], [], [], 0, {}
        for d in order:
            if len(row) + len(docs[d]) > seq_len:
                pad = seq_len - len(row)
                rows.append(torch.cat([torch.tensor(row, dtype=torch.int64),
                                       torch.zeros(pad, dtype=torch.int64)]))
                ids.append(torch.tensor(doc_row + [next_id] * pad))
                row, doc_row, next_id = [], [], next_id + 1
            where[d] = (len(rows), len(row))
            row += docs[d].tolist()
            doc_row += [next_id] * len(docs[d])
            next_id += 1
        pad = seq_len - len(row)
        rows.append(torch.cat([torch.tensor(row, dtype=torch.int64), torch.zeros(pad, dtype=torch.int64)]))
        ids.append(torch.tensor(doc_row + [next_id] * pad))
        return torch.stack(rows), torch.stack(ids), where

    def targets_by_doc(order, seq_len):
        tokens, doc_ids, where = pack(order, seq_len)
        req = distill_request(tokens, extras=["logprob", "entropy"])
        req.rows.document_ids = doc_ids.to(torch.int32).numpy().astype("<i4").tobytes()
        chunks = list(stub.Distill(req))
        all_targets = SparseTargets.cat([decode(c.payload) for c in chunks])
        out = {}
        for d, (r, c) in where.items():
            start = r * seq_len + c
            part = all_targets[start:start + len(docs[d])]
            out[d] = encode(part.pad_to(int(part.num_entries.max())), extras=("logprob", "entropy"))
        return out

    a = targets_by_doc([0, 1, 2, 3, 4], seq_len=48)
    b = targets_by_doc([3, 2, 4, 0, 1], seq_len=64)
    assert a == b


def test_bytes_that_are_not_a_request_are_invalid_argument(server):
    garbage = [b"\xff\xff\xff", b"\x0a\x05\x0a\x01", b"\x08" + b"\xff" * 11, bytes(range(256))]
    with grpc.insecure_channel(server.address) as ch:
        for method, message, kind in (("Distill", pb.DistillRequest, ch.unary_stream),
                                      ("Score", pb.ScoreRequest, ch.unary_unary),
                                      ("Info", pb.InfoRequest, ch.unary_unary)):
            call = kind(f"/logitcast.v1.Teacher/{method}")
            for data in garbage:
                with pytest.raises(Exception):  # noqa: B017, PT011 - the bytes must not parse
                    message.FromString(data)
                consume = list if method == "Distill" else (lambda reply: reply)
                with pytest.raises(grpc.RpcError) as err:
                    consume(call(data, timeout=10))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
                assert "is not a valid message" in err.value.details()
        assert len(payloads(pb_grpc.TeacherStub(ch), tokens_for())) == 1
