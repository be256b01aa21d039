import math

import pytest
import torch

from logitcast.data.packing import IGNORE
from logitcast.ops import KDConfig, TargetSpec, row_positions, sparsify
from logitcast.trainer.objective import (
    ECE_BINS,
    add_position_sums,
    document_attention,
    empty_sums,
    evaluate_batch,
    logit_stats,
    student_loss,
    summarize,
)
from logitcast.trainer.students import PRESETS, build_student, num_parameters

V, B, T = 1000, 2, 16


@pytest.fixture(scope="module")
def student():
    return build_student(preset="micro", vocab_size=V)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:].clone()


def _targets(logits, spec, labels):
    keys, pos = row_positions(torch.tensor([11, 22]), T)
    return sparsify(logits.reshape(-1, V), spec, row_keys=keys, positions=pos,
                    labels=labels.reshape(-1))


def test_logit_stats_match_log_softmax_and_give_the_same_sums():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(37, V, generator=g) * 8.0
    z[0] += 1e4  # a large offset: the max shift must keep it finite
    z[1, 5] = 60.0  # one token carrying ~all the mass
    labels = torch.randint(0, V, (37,), generator=g)
    logp = torch.log_softmax(z, dim=-1)
    top_logp, top1, label_logp, lse = logit_stats(z.clone(), labels)
    assert torch.equal(top1, logp.argmax(-1))
    torch.testing.assert_close(top_logp, logp.max(-1).values, rtol=0, atol=1e-5)
    torch.testing.assert_close(label_logp, logp.gather(1, labels[:, None])[:, 0], rtol=0,
                               atol=1e-4)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))
    a, b = empty_sums(), empty_sums()
    ref_top, ref_top1 = logp.max(-1)  # the sums from full log-probs, as before logit_stats
    add_position_sums(a, ref_top, ref_top1, logp.gather(1, labels[:, None])[:, 0], labels)
    add_position_sums(b, top_logp, top1, label_logp, labels)
    sa, sb = summarize(a), summarize(b)
    for key in ("lm_loss", "accuracy", "confidence", "ece"):
        assert sa[key] == pytest.approx(sb[key], abs=1e-5), key


def test_presets_include_pd_table7_and_a_16m_cpu_student():
    assert {"330m", "670m", "1.9b", "3.8b", "6.8b"} <= set(PRESETS)
    assert PRESETS["1.9b"].hidden == 2048
    assert PRESETS["1.9b"].layers == 24
    with torch.device("meta"):
        tiny = build_student(preset="tiny-16m", vocab_size=49152)
    assert 14e6 < num_parameters(tiny) < 18e6


def test_fused_and_plain_student_loss_agree_in_value_and_gradient(student):
    ids, labels = _batch()
    labels[0, :3] = IGNORE
    with torch.no_grad():
        teacher = torch.randn(B, T, V) * 3
    targets = _targets(teacher, TargetSpec(method="sample", unique=12.0), labels)
    grads = []
    for fused in (True, False):
        student.zero_grad()
        total, parts = student_loss(student, ids, labels, targets, alpha=0.7,
                                    config=KDConfig(ignore_index=IGNORE), fused=fused,
                                    chunk_size=7)
        total.backward()
        grads.append(student.model.layers[0].mlp.up_proj.weight.grad.clone())
        if fused:
            ref = (total.detach(), parts)
    assert torch.allclose(total.detach(), ref[0], rtol=1e-5)
    assert torch.allclose(parts["kd"], ref[1]["kd"], rtol=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_document_attention_keeps_each_token_inside_its_document():
    docs = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask, pos = document_attention(docs)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0]]
    m = mask[0, 0]
    assert m[3].tolist() == [False, False, True, True, False, False]
    assert m[1].tolist() == [True, True, False, False, False, False]


def test_document_mode_student_ignores_other_documents(student):
    ids, _ = _batch()
    docs = torch.tensor([[0] * 8 + [1] * 8] * B)
    from logitcast.trainer.objective import last_hidden

    with torch.no_grad():
        packed = last_hidden(student, ids, docs).view(B, T, -1)
        alone = last_hidden(student, ids[:, 8:]).view(B, 8, -1)
    assert torch.allclose(packed[:, 8:], alone, atol=1e-5)


def test_eval_kl_estimate_is_the_exact_kl_for_full_targets(student):
    ids, labels = _batch(1)
    teacher = torch.randn(B, T, V) * 2
    targets = _targets(teacher, TargetSpec(method="full"), labels)
    out = summarize(evaluate_batch(student, ids, labels, targets, chunk_size=5))
    with torch.no_grad():
        logq = torch.log_softmax(student(ids).logits.float(), -1)
    logp = torch.log_softmax(teacher, -1)
    exact = (logp.exp() * (logp - logq)).sum(-1).mean()
    assert out["kl_to_teacher"] == pytest.approx(float(exact), rel=1e-3)
    agree = (logq.argmax(-1) == logp.argmax(-1)).float().mean()
    assert out["top1_agreement"] == pytest.approx(float(agree))
    assert out["lm_loss"] == pytest.approx(
        float(-logq.gather(-1, labels[..., None]).mean()), rel=1e-5)
    # the targets carry the label's log-prob: the teacher's own held-out loss, the floor
    assert out["teacher_lm_loss"] == pytest.approx(
        float(-logp.gather(-1, labels[..., None]).mean()), rel=1e-5)
    assert summarize(evaluate_batch(student, ids, labels, None))["teacher_lm_loss"] is None


def test_eval_kl_from_sampled_targets_is_unbiased(student):
    ids, labels = _batch(2)
    teacher = torch.randn(B, T, V) * 2
    exact = summarize(evaluate_batch(student, ids, labels,
                                     _targets(teacher, TargetSpec(method="full"), labels)))
    estimates = [summarize(evaluate_batch(student, ids, labels, _targets(
        teacher, TargetSpec(method="head_tail", k_head=2, unique=12.0, seed=s), labels))
    )["kl_to_teacher"] for s in range(16)]
    mean = sum(estimates) / len(estimates)
    assert mean == pytest.approx(exact["kl_to_teacher"], rel=0.03)


def test_ece_of_a_known_histogram():
    sums = {"n": torch.tensor(10.0, dtype=torch.float64), "nll": torch.tensor(5.0),
            "correct": torch.tensor(6.0), "n_teacher": torch.tensor(0.0),
            "kl": torch.tensor(0.0), "agree": torch.tensor(0.0),
            "bin_n": torch.zeros(ECE_BINS, dtype=torch.float64),
            "bin_conf": torch.zeros(ECE_BINS, dtype=torch.float64),
            "bin_correct": torch.zeros(ECE_BINS, dtype=torch.float64)}
    # 5 positions at confidence 0.9 with 3 right, 5 at 0.5 with 3 right
    sums["bin_n"][13], sums["bin_conf"][13], sums["bin_correct"][13] = 5, 4.5, 3
    sums["bin_n"][7], sums["bin_conf"][7], sums["bin_correct"][7] = 5, 2.5, 3
    out = summarize(sums)
    assert out["ece"] == pytest.approx((1.5 + 0.5) / 10)
    assert out["kl_to_teacher"] is None
    assert out["top1_agreement"] is None


def test_a_plain_pytorch_loop_learns_the_teacher_through_the_api():
    """What a user's own loop does: student_loss + an optimizer, no DeepSpeed."""
    teacher_model = build_student(preset="micro", vocab_size=V, init_seed=1)
    student = build_student(preset="micro", vocab_size=V, init_seed=2)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    ids, labels = _batch(3)
    with torch.no_grad():
        teacher = teacher_model(ids).logits * 4
    kls = []
    for step in range(30):
        targets = _targets(teacher, TargetSpec(method="sample", unique=12.0, seed=step), labels)
        total, _ = student_loss(student, ids, labels, targets, alpha=1.0)
        opt.zero_grad()
        total.backward()
        opt.step()
        if step in (0, 29):
            full = _targets(teacher, TargetSpec(method="full"), labels)
            kls.append(summarize(evaluate_batch(student, ids, labels, full))["kl_to_teacher"])
    assert kls[1] < 0.7 * kls[0]
    assert math.isfinite(kls[1])
