import math

import grpc
import pytest
import torch

from logitcast.data.corpus import stdlib_documents
from logitcast.ops import SparseTargets, TargetSpec
from logitcast.ops.codec import decode
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.server.backends import TransformersBackend
from logitcast.server.embedded import EMBEDDED_TEACHER_ID
from tests.server.conftest import ServerThread, distill_request


@pytest.mark.slow
def test_real_smollm2_teacher_predicts_python_source_far_better_than_uniform():
    backend = TransformersBackend.from_pretrained("default", dtype="bf16")
    assert backend.vocab_size == 49152
    server = ServerThread(backend)
    try:
        from logitcast.server.embedded import load_embedded_teacher

        _, tok = load_embedded_teacher()
        ids = tok(next(stdlib_documents()))["input_ids"][:256]
        tokens = torch.tensor(ids).view(2, 128)
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.TeacherStub(ch)
            info = stub.Info(pb.InfoRequest())
            assert info.teacher_id == EMBEDDED_TEACHER_ID
            chunks = list(stub.Distill(distill_request(tokens, TargetSpec(unique=12.0),
                                                       teacher_id=EMBEDDED_TEACHER_ID)))
        targets = SparseTargets.cat([decode(c.payload) for c in chunks])
        nll = -targets.logprob.view(2, 128)[:, :-1]
        assert float(nll.mean()) < 0.5 * math.log(49152)  # uniform would be log V = 10.8 nats
        assert 4.0 < float(targets.num_entries.float().mean()) <= 14.0
        assert torch.allclose(targets.weights.sum(1), torch.ones(256), atol=1e-5)
    finally:
        server.close()


@pytest.mark.slow
def test_a_teacher_in_another_dtype_gets_its_own_teacher_id():
    fp32 = TransformersBackend.from_pretrained("default", dtype="fp32")
    assert fp32.teacher_id == EMBEDDED_TEACHER_ID + "@fp32"
