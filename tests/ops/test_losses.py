import dataclasses

import pytest
import torch
import torch.nn.functional as F

from logitcast.ops import TargetSpec, row_positions, sparsify
from logitcast.ops.kd_terms import GHOST_EPS, KD_LOSSES
from logitcast.ops.losses import (
    KDConfig,
    adakd_temperature,
    distill_loss,
    full_kd_loss,
    lm_loss,
    loss_targets,
    retemper,
)

SPECS = {
    "full": TargetSpec(method="full"),
    "topk": TargetSpec(method="topk", k=6),
    "top_p_k": TargetSpec(method="top_p_k", k=8, p=0.7),
    "sample": TargetSpec(method="sample", unique=6.0),
    "head_tail": TargetSpec(method="head_tail", k_head=3, unique=5.0),
}
# (loss, target methods it accepts)
CASES = [
    ("nll", ["full", "topk", "top_p_k", "sample", "head_tail"]),
    ("kl", ["full", "topk", "top_p_k", "sample", "head_tail"]),
    ("mse", ["full", "topk", "sample", "head_tail"]),
    ("ghost", ["full", "topk", "top_p_k", "head_tail"]),
    ("naive_fix", ["topk", "top_p_k", "sample", "head_tail"]),
    ("tad", ["full", "head_tail"]),
]
PAIRS = [(loss, m) for loss, methods in CASES for m in methods]


def make_batch(method, n_rows=2, seq=5, vocab=40, seed=0):
    """Teacher targets, student logits (float64) and labels with one ignored position."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n_rows * seq, vocab, generator=g) * 2.0
    keys, pos = row_positions(torch.tensor([11 + r for r in range(n_rows)]), seq)
    labels = torch.randint(0, vocab, (n_rows * seq,), generator=g)
    targets = sparsify(teacher, SPECS[method], row_keys=keys, positions=pos, labels=labels)
    labels[2] = -100
    student = (torch.randn(n_rows * seq, vocab, generator=g, dtype=torch.float64) * 1.5)
    return targets, student.requires_grad_(), labels, teacher


# ---------------------------------------------------------------------------- references

def dense_kd(loss, z, targets, labels, *, beta=2.0, seq_len=None):
    """Per-position KD loss written densely over [N, V] (float64), independent of kd_terms."""
    n, vocab = z.shape
    log_s = torch.log_softmax(z, dim=1)
    s = log_s.exp()
    col = torch.arange(targets.width)
    valid = col[None] < targets.num_entries[:, None]
    head = valid & (col[None] < targets.num_head[:, None])

    def dense(mask):
        out = torch.zeros(n, vocab, dtype=torch.float64)
        return out.scatter_add_(1, targets.ids.long(), torch.where(mask, targets.weights, 0.0)
                                .double())

    def on(mask):
        hits = torch.zeros(n, vocab, dtype=torch.int64)
        return hits.scatter_add_(1, targets.ids.long(), mask.long()) > 0

    w = dense(valid)
    g = targets.tail_mass.double()

    def kl_dense(p):
        return (torch.xlogy(p, p) - p * log_s).sum(1)

    def ghost_part():
        h = on(head)
        log_ghost = torch.log((s * ~h).sum(1) + GHOST_EPS)
        return kl_dense(dense(head)) + torch.xlogy(g, g) - g * log_ghost, log_ghost

    if loss == "nll":
        return -(w * log_s).sum(1)
    if loss == "kl":
        return kl_dense(w)
    if loss == "mse":
        return (((s - w) ** 2) * on(valid)).sum(1)
    if loss == "ghost":
        return ghost_part()[0]
    if loss == "naive_fix":
        r = (1 - w.sum(1)).clamp_min(0)
        w_fix = w + r[:, None] * F.one_hot(labels.clamp_min(0), vocab)
        return kl_dense(w_fix)
    if loss == "tad":
        head_kl, log_ghost = ghost_part()
        wt = dense(valid & ~head)
        tail_kl = (torch.xlogy(wt, wt / g.clamp_min(1e-300)[:, None])
                   - wt * (log_s - log_ghost[:, None])).sum(1)
        counted = labels != -100
        length = seq_len or n
        mean = (g * counted).view(-1, length).sum(1) / counted.view(-1, length).sum(1)
        scale = torch.where(mean > 0, beta / mean, 0.0).repeat_interleave(length)
        return head_kl + scale * tail_kl
    raise AssertionError(loss)


def masked_mean(per_pos, labels):
    counted = labels != -100
    return (per_pos * counted).sum() / counted.sum()


# ---------------------------------------------------------------------------- values and grads

@pytest.mark.parametrize(("loss", "method"), PAIRS)
def test_kd_loss_and_gradient_match_a_dense_autograd_reference(loss, method):
    targets, z, labels, _ = make_batch(method)
    cfg = KDConfig(loss=loss, seq_len=5)
    total, parts = distill_loss(z, targets, labels, alpha=0.7, config=cfg)
    (grad,) = torch.autograd.grad(total, z)
    zr = z.detach().clone().requires_grad_()
    lm = masked_mean(torch.logsumexp(zr, 1) - zr.gather(1, labels.clamp_min(0)[:, None])[:, 0],
                     labels)
    kd = masked_mean(dense_kd(loss, zr, targets, labels, seq_len=5), labels)
    ref = 0.3 * lm + 0.7 * kd
    (ref_grad,) = torch.autograd.grad(ref, zr)
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["kd"], kd.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert bool((grad[2] == 0).all())  # the ignored position gets no gradient


@pytest.mark.parametrize(("loss", "method"), [(lo, m) for lo, m in PAIRS if m in ("topk", "head_tail")])
def test_kd_losses_pass_gradcheck_in_float64(loss, method):
    targets, z, labels, _ = make_batch(method, n_rows=1, seq=4, vocab=12)
    cfg = KDConfig(loss=loss, temperature=1.3)
    assert torch.autograd.gradcheck(
        lambda x: distill_loss(x, targets, labels, alpha=0.6, config=cfg)[0], (z,))


@pytest.mark.parametrize("loss", sorted(KD_LOSSES))
def test_term_functions_pass_gradcheck_in_their_own_inputs(loss):
    """The fused path reads d term / d(z_ids, lse, z_label) directly: check those too."""
    targets, z, labels, _ = make_batch("head_tail", n_rows=1, seq=4, vocab=12)
    labels[2] = int(targets.ids[2, 0])  # one label inside the support
    counted = labels != -100
    t = loss_targets(targets, labels, counted, KDConfig(loss=loss), 12)
    z_ids = z.detach().gather(1, t.ids).requires_grad_()
    lse = (torch.logsumexp(z.detach(), 1) + 0.5).requires_grad_()  # keeps the ghost mass > 0
    z_label = z.detach()[:, 0].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c: KD_LOSSES[loss](a, b, c, t).sum(), (z_ids, lse, z_label))


def test_student_temperature_divides_student_logits_in_the_kd_term_only():
    targets, z, labels, _ = make_batch("sample")
    total, parts = distill_loss(z, targets, labels, alpha=0.5,
                                config=KDConfig(loss="kl", temperature=2.0))
    _, plain = distill_loss(z / 2.0, targets, labels, alpha=0.5, config=KDConfig(loss="kl"))
    torch.testing.assert_close(parts["kd"], plain["kd"])
    torch.testing.assert_close(parts["lm"], lm_loss(z, labels))


def test_kl_and_nll_have_the_same_gradient():
    targets, z, labels, _ = make_batch("topk")
    g = [torch.autograd.grad(distill_loss(z, targets, labels, alpha=1.0,
                                          config=KDConfig(loss=name))[0], z)[0]
         for name in ("kl", "nll")]
    torch.testing.assert_close(g[0], g[1])


def test_ghost_gives_head_tokens_the_fullkd_gradient():
    """RS appendix A.5: with a ghost class, top-k logits get s - p exactly."""
    targets, z, labels, teacher = make_batch("topk")
    labels = torch.randint(0, 40, labels.shape)
    (grad,) = torch.autograd.grad(
        distill_loss(z, targets, labels, alpha=1.0, config=KDConfig(loss="ghost"))[0], z)
    full = (torch.softmax(z.detach(), 1) - torch.softmax(teacher.double(), 1)) / len(z)
    ids = targets.ids.long()
    torch.testing.assert_close(grad.gather(1, ids), full.gather(1, ids), rtol=1e-3, atol=1e-7)


def test_tad_with_exact_tail_and_unit_beta_scale_is_forward_kl():
    """TAD eq. 2: beta(X) = 1 recovers the KL exactly when the tail is known exactly."""
    _, z, labels, teacher = make_batch("full")
    labels = torch.randint(0, 40, labels.shape)
    n, vocab, k = *teacher.shape, 4
    p = torch.softmax(teacher.double(), 1)
    order = p.argsort(1, descending=True)
    weights = p.gather(1, order).float()
    exact = make_batch("topk")[0]  # any targets of the right N, for the bookkeeping fields
    ones = torch.ones(n, dtype=torch.int32)
    targets = dataclasses.replace(
        exact, ids=order.int(), weights=weights, counts=torch.zeros_like(order, dtype=torch.int32),
        num_entries=ones * vocab, num_head=ones * k,
        tail_mass=(1 - weights[:, :k].double().sum(1)).float())
    beta = float(targets.tail_mass.mean())
    tad, _ = distill_loss(z, targets, labels, alpha=1.0, config=KDConfig(loss="tad", beta=beta))
    fkd, _ = full_kd_loss(z, teacher.double(), labels, alpha=1.0)
    torch.testing.assert_close(tad, fkd, rtol=1e-4, atol=1e-6)
    g1, g2 = (torch.autograd.grad(x, z)[0] for x in (tad, fkd))
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-6)


def test_naive_fix_moves_residual_mass_onto_the_label():
    targets, z, labels, _ = make_batch("topk")
    nf = distill_loss(z, targets, labels, alpha=1.0, config=KDConfig(loss="naive_fix"))[0]
    (grad,) = torch.autograd.grad(nf, z)
    # gradient = s - w_fix per counted position: sums to 0 over the vocabulary
    torch.testing.assert_close(grad.sum(1), torch.zeros(len(z), dtype=torch.float64),
                               atol=1e-9, rtol=0)


def test_lm_loss_is_torch_cross_entropy_with_ignore_index():
    _, z, labels, _ = make_batch("topk")
    torch.testing.assert_close(lm_loss(z, labels), F.cross_entropy(z, labels, ignore_index=-100))
    total, parts = distill_loss(z, None, labels, alpha=0.0)
    torch.testing.assert_close(total, parts["lm"])


def test_full_targets_kl_equals_dense_full_kd():
    targets, z, labels, teacher = make_batch("full")
    sparse, _ = distill_loss(z, targets, labels, alpha=0.4, config=KDConfig(loss="kl"))
    dense, _ = full_kd_loss(z, teacher, labels, alpha=0.4)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def test_normalize_renormalises_top_k_weights():
    targets, z, labels, _ = make_batch("topk")
    w = targets.weights / targets.weights.sum(1, keepdim=True)
    renorm = dataclasses.replace(targets, weights=w)
    a = distill_loss(z, targets, labels, alpha=1.0, config=KDConfig(loss="nll", normalize=True))
    b = distill_loss(z, renorm, labels, alpha=1.0, config=KDConfig(loss="nll"))
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- unbiased gradient

def kl_grad_per_position(targets, z, normalize=False):
    """d KL / d z per position (float64 [N, V]) through distill_loss."""
    labels = torch.zeros(len(z), dtype=torch.int64)
    zz = z.detach().clone().requires_grad_()
    total, _ = distill_loss(zz, targets, labels, alpha=1.0,
                            config=KDConfig(loss="kl", normalize=normalize))
    return torch.autograd.grad(total, zz)[0] * len(z)


def test_sampled_kl_gradient_is_unbiased_and_top_k_is_not():
    """RS appendix A.6: E[grad of KL against sampled targets] = FullKD gradient."""
    rows, vocab, reps = 6, 80, 1500
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(rows, vocab, generator=g) * 1.5
    student = torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    full = torch.softmax(student, 1) - torch.softmax(teacher.double(), 1)
    big_t, big_s = teacher.repeat(reps, 1), student.repeat(reps, 1)
    keys = torch.arange(rows * reps, dtype=torch.int64) * 7919 + 1
    pos = torch.zeros(rows * reps, dtype=torch.int64)
    expected = {}
    for name in ("sample", "head_tail"):
        grads = kl_grad_per_position(
            sparsify(big_t, SPECS[name], row_keys=keys, positions=pos), big_s)
        grads = grads.view(reps, rows, vocab)
        err2 = float(((grads.mean(0) - full) ** 2).sum())
        expected[name] = float((grads.var(0) / reps).sum())  # E[err2] if unbiased
        assert err2 < 1.5 * expected[name], (name, err2, expected[name])
    topk = kl_grad_per_position(sparsify(teacher, SPECS["topk"], row_keys=keys[:rows],
                                         positions=pos[:rows]), student)
    assert float(((topk - full) ** 2).sum()) > 30 * expected["sample"]


# ---------------------------------------------------------------------------- temperature

def test_adakd_temperature_follows_pd_eq5():
    tau = adakd_temperature(torch.tensor([0.0, 2.4, 4.8, 9.0]))
    torch.testing.assert_close(tau, torch.tensor([2.0, 1.05, 0.1, 0.1]))


def test_retemper_is_softmax_of_truncated_teacher_logits():
    targets, _, _, teacher = make_batch("topk")
    tau = adakd_temperature(targets.entropy)
    out = retemper(targets, tau)
    want = torch.softmax(teacher.gather(1, targets.ids.long()) / tau[:, None], 1)
    torch.testing.assert_close(out.weights, want, rtol=1e-5, atol=1e-6)
    assert bool((out.tail_mass == 0).all())
    with pytest.raises(ValueError, match="TargetSpec.temperature"):
        retemper(make_batch("sample")[0], 2.0)


# ---------------------------------------------------------------------------- bad input

def test_bad_input_raises_value_error_naming_the_problem():
    targets, z, labels, teacher = make_batch("topk")
    cfg = KDConfig(loss="kl")
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(z, targets, labels, alpha=1.5, config=cfg)
    with pytest.raises(ValueError, match="loss must be one of"):
        KDConfig(loss="reverse_kl")
    with pytest.raises(ValueError, match="full_kd_loss"):
        KDConfig(loss="full_kd")
    with pytest.raises(ValueError, match="labels must have shape"):
        distill_loss(z, targets, labels[:-1], alpha=0.5, config=cfg)
    with pytest.raises(ValueError, match="label 40"):
        distill_loss(z, targets, torch.full_like(labels, 40), alpha=0.5, config=cfg)
    with pytest.raises(ValueError, match="positions"):
        distill_loss(z[:-1], targets, labels[:-1], alpha=0.5, config=cfg)
    with pytest.raises(ValueError, match="vocab_size"):
        distill_loss(z[:, :20], targets, labels.clamp_max(19), alpha=0.5, config=cfg)
    with pytest.raises(ValueError, match="weight < 0"):
        distill_loss(z, dataclasses.replace(targets, weights=-targets.weights), labels,
                     alpha=0.5, config=cfg)
    with pytest.raises(ValueError, match="more than 1"):
        distill_loss(z, dataclasses.replace(targets, weights=targets.weights * 3), labels,
                     alpha=0.5, config=cfg)
    bad_ids = targets.ids.clone()
    bad_ids[1, 0] = 40
    with pytest.raises(ValueError, match=r"position 1 has an id outside"):
        distill_loss(z, dataclasses.replace(targets, ids=bad_ids), labels, alpha=0.5, config=cfg)
    with pytest.raises(ValueError, match="integer"):
        distill_loss(z, dataclasses.replace(targets, ids=targets.ids.float()), labels,
                     alpha=0.5, config=cfg)
    with pytest.raises(ValueError, match="on meta"):
        distill_loss(z, targets.to("meta"), labels, alpha=0.5, config=cfg)
    with pytest.raises(ValueError, match="no exact head"):
        distill_loss(z, make_batch("sample")[0], labels, alpha=0.5,
                     config=KDConfig(loss="ghost"))
    with pytest.raises(ValueError, match="no tail entries"):
        distill_loss(z, targets, labels, alpha=0.5, config=KDConfig(loss="tad"))
    with pytest.raises(ValueError, match="targets are required"):
        distill_loss(z, None, labels, alpha=0.5)
    with pytest.raises(ValueError, match="teacher_logits"):
        full_kd_loss(z, teacher[:, :-1], labels, alpha=0.5)
    for field, value in [("temperature", 0.0), ("beta", -1.0), ("seq_len", 0),
                         ("ignore_index", 3)]:
        with pytest.raises(ValueError, match=field):
            KDConfig(**{field: value})
    with pytest.raises(ValueError, match="normalize"):
        KDConfig(loss="ghost", normalize=True)
    with pytest.raises(ValueError, match="seq_len=3"):
        distill_loss(z, make_batch("head_tail")[0], labels, alpha=0.5,
                     config=KDConfig(loss="tad", seq_len=3))


def test_registry_names():
    assert sorted(KD_LOSSES) == ["ghost", "kl", "mse", "naive_fix", "nll", "tad"]
