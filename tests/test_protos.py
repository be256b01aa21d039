import subprocess
import sys
from pathlib import Path

import pytest
import torch

from logitcast.ops import InvalidSpecError, TargetSpec
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos.convert import rows_from_proto, rows_to_proto, spec_from_proto, spec_to_proto

ROOT = Path(__file__).resolve().parents[1]


def test_checked_in_generated_code_matches_the_proto():
    out = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("spec", [
    TargetSpec(), TargetSpec(method="topk", k=7, temperature=2.0, seed=2**62),
    TargetSpec(method="top_p_k", k=50, p=0.95), TargetSpec(draws=40, unique=None, proposal_t=0.8),
    TargetSpec(method="head_tail", k_head=3, unique=9.5), TargetSpec(method="full"),
])
def test_spec_survives_the_wire_exactly(spec):
    msg = pb.TargetSpec.FromString(spec_to_proto(spec).SerializeToString())
    assert spec_from_proto(msg) == spec
    assert spec_from_proto(msg).key() == spec.key()


def test_a_wire_spec_with_fields_the_method_does_not_read_is_rejected():
    with pytest.raises(InvalidSpecError, match="does not read"):
        spec_from_proto(pb.TargetSpec(method="topk", k=3, draws=5))


def test_rows_round_trip_and_size_mismatch_is_named():
    tokens = torch.randint(0, 2**31 - 1, (3, 5))
    back, docs = rows_from_proto(rows_to_proto(tokens))
    assert torch.equal(back, tokens)
    assert docs is None
    msg = rows_to_proto(tokens)
    msg.seq_len = 6
    with pytest.raises(ValueError, match="rows.tokens has 60 bytes, expected rows\\*seq_len\\*4 = 72"):
        rows_from_proto(msg)
