import dataclasses

import pytest
import torch

from logitcast.ops import (
    InvalidSpecError,
    NonFiniteLogitsError,
    TargetSpec,
    row_positions,
    sparsify,
)
from logitcast.ops.blocks import ordered_topk
from logitcast.ops.codec import encode
from logitcast.ops.sparsifiers import draws_for_unique, inverse_cdf
from tests.ops.conftest import zipf_logits, zipf_probs

SPECS = [
    TargetSpec(method="full"),
    TargetSpec(method="topk", k=12),
    TargetSpec(method="top_p_k", k=20, p=0.6),
    TargetSpec(method="sample", unique=12.0),
    TargetSpec(method="sample", draws=40, unique=None, proposal_t=0.8),
    TargetSpec(method="head_tail", k_head=4, unique=8.0),
    TargetSpec(method="head_tail", k_head=3, draws=30, unique=None, proposal_t=1.2, temperature=2.0),
]


def batch(n_rows=3, seq=16, vocab=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_rows * seq, vocab, generator=g) * 2.5
    keys, pos = row_positions(torch.tensor([1001 + 7 * r for r in range(n_rows)]), seq)
    labels = torch.randint(0, vocab, (n_rows * seq,), generator=g)
    return logits, keys, pos, labels


# ---------------------------------------------------------------------------- unbiasedness

@pytest.mark.parametrize(
    "spec",
    [
        TargetSpec(method="sample", unique=12.0),
        TargetSpec(method="sample", draws=24, unique=None),
        TargetSpec(method="head_tail", k_head=4, unique=8.0),
    ],
    ids=["rs-unique12", "rs-24draws", "head_tail"],
)
def test_sampled_estimates_are_unbiased_on_zipf_100k(spec):
    """RS paper appendix K: mean over 2,000 seeds matches the top-50 probabilities.

    (With proposal t != 1 the weights are self-normalised, as in the paper: consistent,
    not unbiased, so only t = 1 is held to this test.)
    """
    vocab, n = 100_000, 2000
    st = sparsify(zipf_logits(vocab, n), spec, row_keys=torch.arange(n) * 7919,
                  positions=torch.zeros(n, dtype=torch.int64), chunk_size=250)
    est = torch.zeros(n, 50, dtype=torch.float64)
    in_top = st.ids < 50
    est.scatter_add_(1, torch.where(in_top, st.ids, 0).long(),
                     torch.where(in_top, st.weights, 0.0).double())
    truth = zipf_probs(vocab)[:50]
    mean, se = est.mean(0), est.std(0) / n**0.5
    assert bool(((mean - truth).abs() <= 3 * se + 1e-6).all()), (mean - truth) / se
    assert float(st.weights.sum(1).sub(1).abs().max()) < 1e-4


def test_renormalised_topk_is_biased_upwards_on_zipf_100k():
    vocab = 100_000
    st = sparsify(zipf_logits(vocab, 4), TargetSpec(method="topk", k=12),
                  row_keys=torch.arange(4), positions=torch.zeros(4, dtype=torch.int64))
    truth = zipf_probs(vocab)
    assert torch.equal(st.ids[0].long(), torch.arange(12))
    assert torch.allclose(st.weights[0].double(), truth[:12], rtol=1e-4)
    renormalised = st.weights[0].double() / st.weights[0].double().sum()
    scale = renormalised / truth[:12]
    assert float(scale.min()) > 2.0  # the top-12 of Zipf-100k carry < half the mass
    assert abs(float(st.tail_mass[0]) - float(truth[12:].sum())) < 1e-4


# ---------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}")
def test_same_row_gives_identical_bytes_alone_in_any_batch_and_chunking(spec):
    logits, keys, pos, labels = batch()
    whole = sparsify(logits, spec, row_keys=keys, positions=pos, labels=labels)
    row = slice(16, 32)
    alone = sparsify(logits[row], spec, row_keys=keys[row], positions=pos[row], labels=labels[row])
    shuffled = torch.cat([logits[32:], logits[row], logits[:16]])
    perm_keys = torch.cat([keys[32:], keys[row], keys[:16]])
    perm_pos = torch.cat([pos[32:], pos[row], pos[:16]])
    perm_labels = torch.cat([labels[32:], labels[row], labels[:16]])
    for chunk in (1, 5, 64):
        other = sparsify(shuffled, spec, row_keys=perm_keys, positions=perm_pos,
                         labels=perm_labels, chunk_size=chunk)
        assert encode(other[16:32].pad_to(alone.width)) == encode(alone)
    assert encode(whole[row].pad_to(alone.width)) == encode(alone)
    again = sparsify(logits, spec, row_keys=keys, positions=pos, labels=labels)
    assert encode(again) == encode(whole)


def test_different_seeds_draw_different_tokens():
    logits, keys, pos, _ = batch()
    a = sparsify(logits, TargetSpec(seed=1), row_keys=keys, positions=pos)
    b = sparsify(logits, TargetSpec(seed=2), row_keys=keys, positions=pos)
    assert encode(a) != encode(b)


def test_ties_go_to_the_lower_token_id_whatever_the_chunking():
    logits = torch.zeros(6, 40)
    logits[:, 10:20] = 1.0  # ten tied tokens, k cuts through them
    st = sparsify(logits, TargetSpec(method="topk", k=4), row_keys=torch.arange(6),
                  positions=torch.zeros(6, dtype=torch.int64), chunk_size=4)
    assert st.ids.tolist() == [[10, 11, 12, 13]] * 6
    g = torch.Generator().manual_seed(3)
    bf16 = (torch.randn(64, 3000, generator=g) * 4).bfloat16().float()  # many exact ties
    ref = ordered_topk(bf16, 50)
    assert torch.equal(torch.cat([ordered_topk(bf16[i:i + 3], 50) for i in range(0, 64, 3)]), ref)
    vals = bf16.gather(1, ref)
    assert bool((vals[:, :-1] >= vals[:, 1:]).all())
    assert torch.equal(vals[:, -1], bf16.topk(50, dim=1).values[:, -1])
    wide = (torch.randn(16, 20000, generator=g) * 4).bfloat16().float()  # 79 blocks of 256
    in_order = wide.sort(dim=1, descending=True, stable=True).indices  # ties: lower id first
    assert torch.equal(ordered_topk(wide, 20), in_order[:, :20])  # searched in 20 blocks


# ---------------------------------------------------------------------------- semantics

def test_weights_sum_to_one_or_to_the_kept_mass():
    logits, keys, pos, labels = batch()
    for spec in SPECS:
        st = sparsify(logits, spec, row_keys=keys, positions=pos, labels=labels)
        total = st.weights.double().sum(1)
        expect = 1.0 - st.tail_mass.double() if spec.method in ("topk", "top_p_k") else 1.0
        assert torch.allclose(total, torch.as_tensor(expect, dtype=torch.float64).expand_as(total),
                              atol=1e-5), spec.method
        cols = torch.arange(st.width)[None, :]
        assert bool((st.weights[cols >= st.num_entries[:, None]] == 0).all())


def test_top_p_k_keeps_the_smallest_prefix_reaching_p_capped_at_k():
    p = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05], [0.2] * 5, [0.9, 0.05, 0.03, 0.01, 0.01]])
    st = sparsify(p.log(), TargetSpec(method="top_p_k", k=3, p=0.75),
                  row_keys=torch.arange(3), positions=torch.zeros(3, dtype=torch.int64))
    assert st.num_entries.tolist() == [2, 3, 1]
    assert st.ids[0, :2].tolist() == [0, 1]


def test_unique_target_picks_draws_that_give_about_that_many_tokens():
    vocab, n = 5000, 400
    logits = zipf_logits(vocab, n, exponent=1.1)
    st = sparsify(logits, TargetSpec(unique=12.0), row_keys=torch.arange(n),
                  positions=torch.zeros(n, dtype=torch.int64))
    assert 11.0 < float(st.num_entries.float().mean()) < 13.5
    assert int(st.draws.max()) <= 128
    assert bool((st.counts.sum(1) == st.draws).all())
    peaked = torch.full((2, vocab), -30.0)
    peaked[:, 0] = 0.0
    q = peaked.softmax(1).double()
    top = q.topk(16, dim=1).values
    assert draws_for_unique(top, (q * q).sum(1), 12.0, 128).tolist() == [128, 128]


def test_thousands_of_draws_go_through_in_slices_and_follow_the_exact_cdf():
    vocab, n, d = 49152, 4, 4096
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(n, vocab, generator=g) * 3.0
    logits[:, ::3] = float("-inf")  # impossible tokens
    q = torch.softmax(logits, dim=1)
    u = torch.rand(n, d, generator=g, dtype=torch.float64)
    drawn = inverse_cdf(q, u)
    assert drawn.shape == (n, d)
    assert bool((drawn % 3 != 0).all())
    assert int(drawn.max()) < vocab
    order = torch.arange(vocab).view(-1, 16, 16).transpose(1, 2).reshape(-1)  # the CDF's order
    flat = q[:, order].double().cumsum(dim=1)
    exact = order[torch.searchsorted(flat, u * flat[:, -1:], right=True)]
    assert float((drawn == exact).double().mean()) > 0.999  # differs only at rounding edges

    st = sparsify(logits, TargetSpec(method="sample", draws=d, unique=None),
                  row_keys=torch.arange(n), positions=torch.zeros(n, dtype=torch.int64))
    assert st.draws.tolist() == [d] * n
    assert bool((st.counts.sum(1) == d).all())
    valid = torch.arange(st.width)[None, :] < st.num_entries[:, None]
    ids = st.ids[valid]
    assert bool((ids % 3 != 0).all())
    assert int(ids.max()) < vocab
    assert bool((st.ids[:, 1:] > st.ids[:, :-1])[valid[:, 1:]].all())  # each token once
    assert torch.allclose(st.weights.double().sum(1), torch.ones(n, dtype=torch.float64))


def test_temperature_and_extras():
    logits, keys, pos, labels = batch()
    st = sparsify(logits, TargetSpec(method="topk", k=5, temperature=2.0), row_keys=keys,
                  positions=pos, labels=labels)
    tempered = torch.softmax(logits / 2.0, dim=1)
    assert torch.allclose(st.weights, tempered.gather(1, st.ids.long()), atol=1e-6)
    logp = torch.log_softmax(logits, dim=1)
    assert torch.allclose(st.logprob, logp.gather(1, labels[:, None])[:, 0], atol=1e-5)
    assert torch.allclose(st.entropy, -(logp.exp() * logp).sum(1), atol=1e-4)
    unknown = sparsify(logits, TargetSpec(), row_keys=keys, positions=pos,
                       labels=torch.full_like(labels, -100))
    assert bool(unknown.logprob.isnan().all())


def test_impossible_tokens_are_never_drawn():
    logits, keys, pos, _ = batch(vocab=300)
    logits[:, ::2] = float("-inf")
    for spec in SPECS[3:]:
        st = sparsify(logits, spec, row_keys=keys, positions=pos)
        valid = torch.arange(st.width)[None, :] < st.num_entries[:, None]
        sampled = valid & (torch.arange(st.width)[None, :] >= st.num_head[:, None])
        assert bool((st.ids[sampled] % 2 == 1).all())


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(("value", "what"), [(float("nan"), "nan"), (float("inf"), "inf")])
def test_non_finite_logits_name_the_position_and_token(value, what):
    logits, keys, pos, _ = batch()
    logits[37, 123] = value
    with pytest.raises(NonFiniteLogitsError, match=f"position 37, token 123 is {what}"):
        sparsify(logits, TargetSpec(), row_keys=keys, positions=pos, chunk_size=8)


def test_a_position_without_finite_logits_is_rejected():
    logits, keys, pos, _ = batch()
    logits[5] = float("-inf")
    with pytest.raises(NonFiniteLogitsError, match="position 5 has no finite logit"):
        sparsify(logits, TargetSpec(method="topk"), row_keys=keys, positions=pos)


def test_spec_that_does_not_fit_the_vocabulary_is_rejected():
    logits, keys, pos, _ = batch(vocab=100)
    with pytest.raises(InvalidSpecError, match="k=101 exceeds the vocabulary size 100"):
        sparsify(logits, TargetSpec(method="topk", k=101), row_keys=keys, positions=pos)
    with pytest.raises(InvalidSpecError, match="k_head=200"):
        sparsify(logits, TargetSpec(method="head_tail", k_head=200), row_keys=keys, positions=pos)


def test_shape_and_label_errors_name_the_argument():
    logits, keys, pos, labels = batch(vocab=100)
    with pytest.raises(ValueError, match="row_keys must have shape"):
        sparsify(logits, TargetSpec(), row_keys=keys[:-1], positions=pos)
    with pytest.raises(ValueError, match="labels must be < vocab size 100"):
        sparsify(logits, TargetSpec(), row_keys=keys, positions=pos, labels=labels + 100)
    with pytest.raises(ValueError, match="float"):
        sparsify(logits.long(), TargetSpec(), row_keys=keys, positions=pos)


def test_same_entries_compares_ids_and_counts_in_any_order_at_any_width():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    spec = TargetSpec(method="sample", draws=12, unique=None)
    keys, pos = torch.arange(6), torch.zeros(6, dtype=torch.long)
    a = sparsify(logits, spec, row_keys=keys, positions=pos)
    assert bool(a.same_entries(a).all())
    ids, counts = a.ids.clone(), a.counts.clone()
    for i, n in enumerate(a.num_entries.tolist()):  # the entries of each row in reverse
        ids[i, :n], counts[i, :n] = a.ids[i, :n].flip(0), a.counts[i, :n].flip(0)
    assert bool(a.same_entries(dataclasses.replace(a, ids=ids, counts=counts)).all())
    assert bool(a.same_entries(a.pad_to(a.width + 3)).all())
    counts = a.counts.clone()
    counts[2, 0] += 1
    assert a.same_entries(dataclasses.replace(a, counts=counts)).tolist() == [
        True, True, False, True, True, True]
    other = sparsify(logits, dataclasses.replace(spec, seed=1), row_keys=keys, positions=pos)
    assert not bool(a.same_entries(other).all())
