import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logitcast.ops import (
    CodecCapacityError,
    CodecError,
    CodecVersionError,
    SparseTargets,
    TargetSpec,
    sparsify,
)
from logitcast.ops.codec import HEADER_BYTES, decode, encode

VOCABS = [1000, 49152, 151936, 262144]
HEAD_REL_ERR = 1.3e-3  # 14+ bit log code over [0, 40] nats


def make_spec(method: str, rnd: np.random.Generator) -> TargetSpec:
    seed = int(rnd.integers(0, 2**40))
    temperature = float(rnd.choice([0.5, 1.0, 2.0]))
    if method == "full":
        return TargetSpec(method="full", temperature=temperature, seed=seed)
    if method == "topk":
        return TargetSpec(method="topk", k=int(rnd.integers(1, 60)), temperature=temperature)
    if method == "top_p_k":
        return TargetSpec(method="top_p_k", k=int(rnd.integers(1, 60)),
                          p=float(rnd.uniform(0.05, 1.0)), temperature=temperature)
    draws = {"draws": int(rnd.integers(1, 300)), "unique": None} if rnd.random() < 0.5 else {
        "unique": float(rnd.uniform(1, 40))}
    t = float(rnd.choice([1.0, 1.0, 0.7, 1.3]))
    if method == "sample":
        return TargetSpec(method="sample", proposal_t=t, seed=seed, temperature=temperature, **draws)
    return TargetSpec(method="head_tail", k_head=int(rnd.integers(1, 20)), proposal_t=t,
                      seed=seed, temperature=temperature, **draws)


def assert_round_trip(st_: SparseTargets, extras=("logprob", "entropy")) -> bytes:
    payload = encode(st_, extras=extras)
    back = decode(payload)
    assert back.vocab_size == st_.vocab_size
    assert back.weights.dtype == torch.float32
    assert back.ids.dtype == back.counts.dtype == torch.int32
    assert len(back) == len(st_)
    assert torch.equal(back.num_entries, st_.num_entries)
    assert torch.equal(back.num_head, st_.num_head)
    assert torch.equal(back.draws, st_.draws)
    width = back.width
    assert width == (int(st_.num_entries.max()) if len(st_) else 0)
    ref = st_.pad_to(max(width, st_.width))
    assert torch.equal(back.ids, ref.ids[:, :width])
    assert torch.equal(back.counts, ref.counts[:, :width])
    w, w_ref = back.weights.double(), ref.weights[:, :width].double()
    # sampled weights are scaled by the tail mass, stored to 1/65535 absolute
    assert bool(((w - w_ref).abs() <= HEAD_REL_ERR * w_ref + 8e-6).all())
    assert torch.allclose(back.tail_mass, st_.tail_mass, atol=1e-5)
    for name in ("logprob", "entropy"):
        got, want = getattr(back, name), getattr(st_, name)
        if name in extras:
            assert torch.allclose(got, want, rtol=1e-3, atol=1e-3, equal_nan=True)
        else:
            assert bool(got.isnan().all())
    assert back.tail_from_counts == st_.tail_from_counts
    return payload


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["topk", "top_p_k", "sample", "head_tail"]),
    vocab=st.sampled_from(VOCABS),
    n=st.integers(0, 5),
    scale=st.floats(0.1, 8.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_every_method_and_vocab(method, vocab, n, scale, seed):
    rnd = np.random.default_rng(seed)
    logits = torch.from_numpy(rnd.standard_normal((n, vocab), dtype=np.float32) * scale)
    if n and rnd.random() < 0.3:
        logits[:, rnd.integers(0, vocab, size=vocab // 3)] = float("-inf")
    labels = torch.from_numpy(rnd.integers(-1, vocab, size=n))
    spec = make_spec(method, rnd)
    targets = sparsify(logits, spec, row_keys=torch.from_numpy(rnd.integers(0, 2**62, size=n)),
                       positions=torch.arange(n), labels=labels)
    assert_round_trip(targets)


@pytest.mark.parametrize("vocab", [1, 2, 1000])
def test_round_trip_full_on_tiny_vocabularies(vocab):
    logits = torch.randn(7, vocab)
    targets = sparsify(logits, TargetSpec(method="full"), row_keys=torch.arange(7),
                       positions=torch.arange(7))
    assert_round_trip(targets)


def rs_targets(vocab: int, n: int = 64, draws: int = 128, entries: int = 12) -> SparseTargets:
    """Synthetic RS targets with exactly `entries` unique tokens per position."""
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:entries] for _ in range(n)]).int()
    counts = torch.ones(n, entries, dtype=torch.int32)
    counts[:, 0] += draws - entries
    return SparseTargets(
        ids=ids, weights=counts.float() / draws, counts=counts,
        num_entries=torch.full((n,), entries, dtype=torch.int32),
        num_head=torch.zeros(n, dtype=torch.int32),
        draws=torch.full((n,), draws, dtype=torch.int32), tail_mass=torch.ones(n),
        entropy=torch.ones(n), logprob=-torch.ones(n), vocab_size=vocab,
    )


def test_rs12_costs_3_bytes_per_entry_and_at_most_40_bytes_per_token():
    targets = rs_targets(49152, n=1024)
    payload = assert_round_trip(targets, extras=("logprob",))
    assert len(payload) / len(targets) <= 40.0
    assert len(payload) == HEADER_BYTES + 1024 * (1 + 2 + 12 * 3)


def test_counts_beyond_a_3_byte_budget_are_refused_when_asked():
    targets = rs_targets(151936, draws=128)  # 18-bit ids + 7-bit counts = 25 bits
    assert len(decode(encode(targets))) == len(targets)
    with pytest.raises(CodecCapacityError, match="entries need 4 bytes"):
        encode(targets, max_entry_bytes=3)
    assert encode(rs_targets(131072, draws=128), max_entry_bytes=3)  # 17 + 7 = 24 bits


def test_draws_beyond_the_codec_capacity_are_refused():
    t = rs_targets(1000, n=2, draws=70000, entries=3)
    with pytest.raises(CodecCapacityError, match="draws per position"):
        encode(t)


def test_every_truncation_of_a_payload_is_a_codec_error():
    payload = encode(rs_targets(1000, n=3, draws=20, entries=4))
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            decode(payload[:cut])
    with pytest.raises(CodecError, match="trailing bytes"):
        decode(payload + b"\0")


def test_wrong_version_and_magic_are_named():
    payload = bytearray(encode(rs_targets(1000, n=2)))
    payload[4] = 9
    with pytest.raises(CodecVersionError, match="codec version 9"):
        decode(bytes(payload))
    with pytest.raises(CodecError, match="bad magic"):
        decode(b"XXXX" + bytes(payload[4:]))


def test_ids_outside_the_vocabulary_are_named_at_decode():
    payload = bytearray(encode(rs_targets(1000, n=4)))
    struct.pack_into("<I", payload, 8, 600)  # same 10-bit ids, smaller vocabulary
    with pytest.raises(CodecError, match=r"token id \d+ >= vocab size 600"):
        decode(bytes(payload))


def test_inconsistent_targets_are_refused_at_encode():
    t = rs_targets(1000, n=2)
    bad_ids = SparseTargets(**{**t.__dict__, "ids": t.ids + 5000})
    with pytest.raises(CodecError, match="token ids must be in"):
        encode(bad_ids)
    bad_draws = SparseTargets(**{**t.__dict__, "draws": t.draws + 1})
    with pytest.raises(CodecError, match="sum to draws"):
        encode(bad_draws)
    with pytest.raises(ValueError, match="unknown extras"):
        encode(t, extras=("nope",))


def test_decode_many_equals_decoding_one_by_one():
    from logitcast.ops.codec import decode_many

    parts = [rs_targets(49152, n=7 + i, draws=40 + i, entries=3 + i % 4) for i in range(5)]
    payloads = [encode(p) for p in parts]
    many = decode_many(payloads)
    one = SparseTargets.cat([decode(p) for p in payloads])
    assert encode(many) == encode(one.pad_to(many.width))
    mixed = [encode(rs_targets(151936, n=3, draws=d)) for d in (40, 128)]  # 3- and 4-byte
    assert len(decode_many(mixed)) == 6
