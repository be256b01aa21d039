import pytest
import torch

from logitcast.ops.rng import STREAM_SAMPLE, STREAM_THIN, mix64, uniforms

M64 = 2**64 - 1


def splitmix_finaliser_reference(x: int) -> int:
    x &= M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def to_unsigned(t: torch.Tensor) -> list[int]:
    return [v & M64 for v in t.tolist()]


def test_mix64_matches_the_unsigned_reference_including_wraparound():
    values = [0, 1, 2**62 + 12345, -1, -(2**63), 0x7FFFFFFFFFFFFFFF, -987654321]
    got = to_unsigned(mix64(torch.tensor(values, dtype=torch.int64)))
    assert got == [splitmix_finaliser_reference(v) for v in values]


def test_uniforms_are_in_unit_interval_and_roughly_uniform():
    keys = torch.arange(4000, dtype=torch.int64)
    u = uniforms(7, keys, torch.zeros_like(keys), 16)
    assert u.dtype == torch.float64
    assert u.shape == (4000, 16)
    assert float(u.min()) >= 0.0
    assert float(u.max()) < 1.0
    hist = torch.histc(u.float(), bins=20, min=0.0, max=1.0)
    expected = u.numel() / 20
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < 60.0  # 19 dof: p < 1e-5 above this


def test_uniforms_depend_only_on_their_coordinates():
    keys = torch.tensor([11, 22, 33, 44], dtype=torch.int64)
    pos = torch.tensor([0, 5, 9, 2], dtype=torch.int64)
    full = uniforms(3, keys, pos, 8)
    assert torch.equal(uniforms(3, keys, pos, 8), full)
    assert torch.equal(uniforms(3, keys[2:3], pos[2:3], 8), full[2:3])
    assert torch.equal(uniforms(3, keys.flip(0), pos.flip(0), 8), full.flip(0))
    assert torch.equal(uniforms(3, keys, pos, 3), full[:, :3])


def test_seed_stream_key_and_position_each_change_the_draws():
    keys = torch.tensor([11], dtype=torch.int64)
    pos = torch.tensor([4], dtype=torch.int64)
    base = uniforms(3, keys, pos, 8)
    assert not torch.equal(base, uniforms(4, keys, pos, 8))
    assert not torch.equal(base, uniforms(3, keys + 1, pos, 8))
    assert not torch.equal(base, uniforms(3, keys, pos + 1, 8))
    assert not torch.equal(
        uniforms(3, keys, pos, 8, stream=STREAM_SAMPLE), uniforms(3, keys, pos, 8, stream=STREAM_THIN)
    )


def test_mismatched_coordinate_shapes_are_rejected():
    with pytest.raises(ValueError, match="row_keys and positions"):
        uniforms(0, torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 2)
