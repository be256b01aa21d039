import pytest
import torch

from logitcast.ops import TargetSpec, sparsify
from logitcast.ops.codec import decode, encode
from logitcast.ops.thinning import thin
from tests.ops.conftest import zipf_logits, zipf_probs


def zipf_targets(spec: TargetSpec, n: int = 3000, vocab: int = 2000):
    keys, pos = torch.arange(n) * 31 + 5, torch.zeros(n, dtype=torch.int64)
    return sparsify(zipf_logits(vocab, n), spec, row_keys=keys, positions=pos), keys, pos


@pytest.mark.parametrize(
    "spec",
    [TargetSpec(draws=100, unique=None), TargetSpec(method="head_tail", k_head=3, draws=100,
                                                     unique=None)],
    ids=["sample", "head_tail"],
)
def test_thinning_keeps_the_estimate_unbiased(spec):
    targets, keys, pos = zipf_targets(spec)
    thinned = thin(targets, 10, seed=9, row_keys=keys, positions=pos)
    assert bool((thinned.draws == 10).all())
    assert bool((thinned.counts.sum(1) == 10).all())
    est = thinned.to_dense().double()[:, :30]
    truth = zipf_probs(2000)[:30]
    se = est.std(0) / len(est) ** 0.5
    assert bool(((est.mean(0) - truth).abs() <= 3.5 * se + 1e-6).all())  # 30 comparisons
    assert float(thinned.num_entries.float().mean()) < float(targets.num_entries.float().mean())
    assert torch.allclose(thinned.weights.double().sum(1), torch.ones(len(est), dtype=torch.float64),
                          atol=1e-5)
    if spec.method == "head_tail":
        assert torch.equal(thinned.ids[:, :3], targets.ids[:, :3])
        assert torch.equal(thinned.weights[:, :3], targets.weights[:, :3])


def test_thinning_is_deterministic_survives_the_codec_and_leaves_small_draws_alone():
    targets, keys, pos = zipf_targets(TargetSpec(draws=50, unique=None, proposal_t=0.8), n=50)
    a = thin(targets, 7, seed=1, row_keys=keys, positions=pos)
    b = thin(targets, 7, seed=1, row_keys=keys, positions=pos)
    assert encode(a) == encode(b)
    assert encode(a) != encode(thin(targets, 7, seed=2, row_keys=keys, positions=pos))
    assert encode(decode(encode(a))) == encode(a)
    assert thin(targets, 50, seed=1, row_keys=keys, positions=pos) is targets
    with pytest.raises(ValueError, match="draws must be an int >= 1"):
        thin(targets, 0, seed=1, row_keys=keys, positions=pos)
