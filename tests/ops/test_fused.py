import pytest
import torch
import torch.nn.functional as F

from logitcast.ops import TargetSpec, row_positions, sparsify
from logitcast.ops.fused import fused_distill_loss, fused_full_kd_loss
from logitcast.ops.losses import KDConfig, distill_loss, full_kd_loss

SPECS = {
    "full": TargetSpec(method="full"),
    "topk": TargetSpec(method="topk", k=6),
    "sample": TargetSpec(method="sample", unique=6.0),
    "head_tail": TargetSpec(method="head_tail", k_head=3, unique=5.0),
}
PAIRS = [
    ("nll", "sample"), ("kl", "sample"), ("kl", "topk"), ("kl", "head_tail"),
    ("mse", "sample"), ("ghost", "topk"), ("ghost", "head_tail"), ("naive_fix", "topk"),
    ("naive_fix", "sample"), ("tad", "head_tail"), ("tad", "full"),
]
N, D, V = 45, 24, 200  # 45 positions: chunks of 8 leave a remainder


def make(method, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(N, V, generator=g) * 2.0
    keys, pos = row_positions(torch.tensor([5, 6, 7]), N // 3)
    labels = torch.randint(0, V, (N,), generator=g)
    targets = sparsify(teacher, SPECS[method], row_keys=keys, positions=pos)
    labels[[3, 17]] = -100
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5
    return (targets.to(device), labels.to(device), hidden.to(device, dtype).requires_grad_(),
            weight.to(device, dtype).requires_grad_())


def unfused(hidden, weight, targets, labels, **kw):
    total, parts = distill_loss(hidden @ weight.T, targets, labels, **kw)
    return total, parts, torch.autograd.grad(total, (hidden, weight))


def fused(hidden, weight, targets, labels, **kw):
    total, parts = fused_distill_loss(hidden, weight, targets, labels, chunk_size=8, **kw)
    return total, parts, torch.autograd.grad(total, (hidden, weight))


def assert_same(a, b, rtol, atol):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    for key in a[1]:
        torch.testing.assert_close(a[1][key], b[1][key], rtol=rtol, atol=atol)
    for ga, gb in zip(a[2], b[2]):
        torch.testing.assert_close(ga.float(), gb.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize(("loss", "method"), PAIRS)
@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_fused_equals_unfused_in_fp32(loss, method, tau):
    targets, labels, h, w = make(method)
    kw = {"alpha": 0.4, "config": KDConfig(loss=loss, temperature=tau, seq_len=15)}
    assert_same(fused(h, w, targets, labels, **kw), unfused(h, w, targets, labels, **kw),
                rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("loss", "method"), PAIRS)
def test_fused_equals_unfused_in_bf16(loss, method):
    targets, labels, h, w = make(method, dtype=torch.bfloat16)
    kw = {"alpha": 0.5, "config": KDConfig(loss=loss)}
    a, b = fused(h, w, targets, labels, **kw), unfused(h, w, targets, labels, **kw)
    assert a[2][0].dtype == a[2][1].dtype == torch.bfloat16
    torch.testing.assert_close(a[0], b[0], rtol=1e-3, atol=1e-3)
    for ga, gb in zip(a[2], b[2]):
        assert float((ga.float() - gb.float()).norm() / gb.float().norm()) < 2e-2


def test_fused_cross_entropy_equals_torch_cross_entropy():
    _, labels, h, w = make("topk")
    total, parts = fused_distill_loss(h, w, None, labels, alpha=0.0, chunk_size=7)
    ref = F.cross_entropy(h @ w.T, labels, ignore_index=-100)
    torch.testing.assert_close(total, ref)
    got = torch.autograd.grad(total, (h, w))
    want = torch.autograd.grad(ref, (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"lm"}


def test_backward_scales_by_the_incoming_gradient_and_works_in_a_graph():
    targets, labels, h, w = make("sample")
    total, _ = fused_distill_loss(h, w, targets, labels, alpha=0.5)
    (3.0 * total + (w**2).sum()).backward()
    ref = distill_loss(h.detach() @ w.detach().T, targets, labels, alpha=0.5)[0]
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (3.0 * distill_loss(h2 @ w2.T, targets, labels, alpha=0.5)[0] + (w2**2).sum()).backward()
    torch.testing.assert_close(total.detach(), ref)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_no_grad_inputs_give_values_only():
    targets, labels, h, w = make("sample")
    with torch.no_grad():
        total, parts = fused_distill_loss(h, w, targets, labels, alpha=0.5)
    ref, ref_parts = distill_loss(h @ w.T, targets, labels, alpha=0.5)
    torch.testing.assert_close(total, ref.detach())
    torch.testing.assert_close(parts["kd"], ref_parts["kd"])
    assert total.grad_fn is None


def test_all_positions_ignored_gives_zero_loss_and_zero_grads():
    targets, labels, h, w = make("sample")
    total, _, (gh, gw) = fused(h, w, targets, torch.full_like(labels, -100), alpha=0.5)
    assert float(total.detach()) == 0.0
    assert not gh.any()
    assert not gw.any()


def test_bad_input_raises_value_error():
    targets, labels, h, w = make("sample")
    with pytest.raises(ValueError, match="share dtype"):
        fused_distill_loss(h, w.double(), targets, labels, alpha=0.5)
    with pytest.raises(ValueError, match="weight must be"):
        fused_distill_loss(h, w[:, :-1], targets, labels, alpha=0.5)
    with pytest.raises(ValueError, match="hidden must be"):
        fused_distill_loss(h[None], w, targets, labels, alpha=0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_distill_loss(h, w, targets, labels, alpha=0.5, chunk_size=0)
    with pytest.raises(ValueError, match="alpha"):
        fused_distill_loss(h, w, targets, labels, alpha=-0.1)
    with pytest.raises(ValueError, match="targets are required"):
        fused_distill_loss(h, w, None, labels, alpha=0.5)
    with pytest.raises(ValueError, match="positions"):
        fused_distill_loss(h[:-1], w, targets, labels[:-1], alpha=0.5)


def full_kd_pair(dtype=torch.float32, seed=1):
    """Student (hidden, weight) and a wider bf16-able teacher (hidden, weight), same vocabulary."""
    g = torch.Generator().manual_seed(seed)
    _, labels, h, w = make("full", seed=seed)
    th = torch.randn(N, 40, generator=g).to(dtype)
    tw = (torch.randn(V, 40, generator=g) * 0.4).to(dtype)
    return labels, h, w, th, tw


@pytest.mark.parametrize("tau", [1.0, 1.7])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_fused_full_kd_equals_dense_full_kd(tau, alpha, teacher_dtype):
    labels, h, w, th, tw = full_kd_pair(teacher_dtype)
    t_logits = torch.nn.functional.linear(th, tw).float()  # what the teacher's lm_head gives
    dense, dense_parts = full_kd_loss(h @ w.T, t_logits, labels, alpha=alpha, temperature=tau)
    a = (dense, dense_parts, torch.autograd.grad(dense, (h, w)))
    got, parts = fused_full_kd_loss(h, w, th, tw, labels, alpha=alpha, temperature=tau,
                                    chunk_size=8)
    assert_same((got, parts, torch.autograd.grad(got, (h, w))), a, rtol=1e-5, atol=1e-6)



def dense_full_kd(h, w, th, tw, labels, **kw):
    """full_kd_loss on the materialised logits: (total, parts, d total / d(those of h, w
    that need a gradient))."""
    t_logits = torch.nn.functional.linear(th, tw).float()
    total, parts = full_kd_loss(h @ w.T, t_logits, labels, **kw)
    return total, parts, torch.autograd.grad(total, [x for x in (h, w) if x.requires_grad])


@pytest.mark.parametrize("tau", [1.0, 1.7])
@pytest.mark.parametrize("chunk_size", [8, 64])  # 64 > N: one chunk, smaller than chunk_size
def test_fused_full_kd_where_teacher_probabilities_are_zero(tau, chunk_size):
    """Every 4th position's teacher puts all its mass on token 7 (every other p underflows to 0);
    the positions after those have a teacher logit of -inf (overflow) at token 7."""
    labels, h, w, th, tw = full_kd_pair()
    spike, peak = torch.zeros(N, 2), torch.zeros(V, 2)
    spike[::4, 0], spike[1::4, 1], peak[7] = 1.0, -1e38, torch.tensor([500.0, 1e10])
    th, tw = torch.cat([th, spike], dim=1), torch.cat([tw, peak], dim=1)
    t_logits = torch.nn.functional.linear(th, tw)
    assert (t_logits[1::4, 7] == -float("inf")).all()
    assert t_logits[2::4].isfinite().all()
    p = torch.softmax(t_logits, dim=1)
    assert ((p[::4] > 0).sum(dim=1) == 1).all()
    assert (p[2::4] > 0).all()
    kw = {"alpha": 0.5, "temperature": tau}
    got, parts = fused_full_kd_loss(h, w, th, tw, labels, chunk_size=chunk_size, **kw)
    assert_same((got, parts, torch.autograd.grad(got, (h, w))),
                dense_full_kd(h, w, th, tw, labels, **kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_fused_full_kd_in_bf16(tau):
    labels, h, w, th, tw = full_kd_pair(torch.bfloat16)
    h, w = (x.detach().bfloat16().requires_grad_() for x in (h, w))
    kw = {"alpha": 0.5, "temperature": tau}
    got, parts = fused_full_kd_loss(h, w, th, tw, labels, chunk_size=8, **kw)
    grads = torch.autograd.grad(got, (h, w))
    want, want_parts, want_grads = dense_full_kd(h, w, th, tw, labels, **kw)
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # same bf16 logits, fp32 maths
    for key in want_parts:
        torch.testing.assert_close(parts[key], want_parts[key], rtol=1e-5, atol=1e-6)
    for ga, gb in zip(grads, want_grads):
        assert float((ga.float() - gb.float()).norm() / gb.float().norm()) < 2e-2


def test_fused_full_kd_without_grad_or_with_one_input_frozen():
    labels, h, w, th, tw = full_kd_pair()
    kw = {"alpha": 0.5, "temperature": 1.7}
    want = dense_full_kd(h, w, th, tw, labels, **kw)
    with torch.no_grad():
        total, parts = fused_full_kd_loss(h, w, th, tw, labels, chunk_size=8, **kw)
    assert total.grad_fn is None
    assert_same((total, parts, ()), want, rtol=1e-5, atol=1e-6)
    for h_, w_, i in [(h, w.detach(), 0), (h.detach(), w, 1)]:  # frozen head; frozen hidden
        got, parts = fused_full_kd_loss(h_, w_, th, tw, labels, chunk_size=8, **kw)
        (grad,) = torch.autograd.grad(got, [h_, w_][i])
        assert_same((got, parts, (grad,)), (*want[:2], want[2][i:i + 1]), rtol=1e-5, atol=1e-6)


def test_fused_full_kd_gives_the_teacher_no_gradient_and_skips_ignored_positions():
    labels, h, w, th, tw = full_kd_pair()
    th.requires_grad_(True)
    total, _ = fused_full_kd_loss(h, w, th, tw, labels, alpha=0.7, chunk_size=8)
    total.backward()
    assert th.grad is None
    assert not h.grad[[3, 17]].any()
    assert h.grad.any()
    total, _ = fused_full_kd_loss(h, w, th, tw, torch.full_like(labels, -100), alpha=0.7)
    assert float(total.detach()) == 0.0


def test_fused_full_kd_bad_input_names_the_argument():
    labels, h, w, th, tw = full_kd_pair()
    with pytest.raises(ValueError, match="teacher_weight must be"):
        fused_full_kd_loss(h, w, th, tw[:, :-1], labels, alpha=0.5)
    with pytest.raises(ValueError, match="does not match the student"):
        fused_full_kd_loss(h, w, th[:-1], tw, labels, alpha=0.5)
    with pytest.raises(ValueError, match="does not match the student"):
        fused_full_kd_loss(h, w, th, tw[:-1], labels, alpha=0.5)
    with pytest.raises(ValueError, match="temperature"):
        fused_full_kd_loss(h, w, th, tw, labels, alpha=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        fused_full_kd_loss(h, w, th, tw, labels, alpha=1.5)
    with pytest.raises(ValueError, match="label 200"):
        fused_full_kd_loss(h, w, th, tw, torch.full_like(labels, V), alpha=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_unfused_on_cuda(dtype):
    targets, labels, h, w = make("head_tail", dtype=dtype, device="cuda")
    kw = {"alpha": 0.5, "config": KDConfig(loss="tad")}
    a, b = fused(h, w, targets, labels, **kw), unfused(h, w, targets, labels, **kw)
    torch.testing.assert_close(a[0], b[0], rtol=1e-3, atol=1e-3)
    for ga, gb in zip(a[2], b[2]):
        assert float((ga.float() - gb.float()).norm() / gb.float().norm()) < 2e-2
