"""The bias the papers describe, in seconds: a student trained to convergence on a fixed
set of rows against a fixed micro teacher.

With top-k targets (renormalised over the k kept tokens, vanilla top-k KD) the student
learns a truncated teacher: it ends over-confident and its KL to the teacher stalls at the
truncation error however long it trains. With RS targets (importance-sampled, unbiased)
the student's KL keeps falling toward 0 as the draws grow: fresh draws every step (the
draws a student sees add up over training), and, for targets drawn once, more draws.
"""

import pytest
import torch

from logitcast.ops import KDConfig, TargetSpec, distill_loss, sparsify
from logitcast.ops.rowkey import draw_coordinates

VOCAB, ROWS, SEQ, STEPS = 96, 8, 32, 300


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors of a few KB: one thread is fastest and cannot spin against other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class MicroLM(torch.nn.Module):
    """A micro language model: next-token logits from the current token (embedding, one
    hidden layer). Teacher and students share it; only the random init differs."""

    def __init__(self, seed: int, hidden: int = 64) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = torch.nn.Embedding(VOCAB, hidden)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                                           torch.nn.Linear(hidden, VOCAB))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(tokens)).reshape(-1, VOCAB)


def teacher_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed rows and the micro teacher's logits on them, scaled so its tail matters."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    with torch.no_grad():
        logits = MicroLM(seed=1)(tokens)
    logits = 2.5 * logits / logits.std()  # top-12 holds most of the mass, not all: a tail
    return tokens, logits


def train(targets, labels, steps=STEPS, *, normalize=False, seed=0):
    """A student of the same architecture, trained full-batch to convergence (its own
    random init) on `targets` (SparseTargets, or a function of the step giving them);
    returns (KL(teacher || student) at 4 checkpoints, final student probs)."""
    student = MicroLM(seed=100 + seed)
    tokens, t_logits = FIXED
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    p = t_logits.softmax(-1)
    kls = []
    cfg = KDConfig(loss="kl", normalize=normalize)
    for step in range(steps):
        logits = student(tokens)
        t = targets(step) if callable(targets) else targets
        loss, _ = distill_loss(logits, t, labels, alpha=1.0, config=cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % (steps // 4) == 0:
            with torch.no_grad():
                log_q = logits.detach().log_softmax(-1)
                kls.append(float((p * (p.log() - log_q)).sum(-1).mean()))
    return kls, logits.detach().softmax(-1)


FIXED = teacher_logits()


def sparse_targets(spec):
    tokens, logits = FIXED
    _, draw, pos = draw_coordinates(tokens, None)
    return sparsify(logits, spec, row_keys=draw, positions=pos, labels=None)


def test_top_k_students_stall_over_confident_while_rs_students_approach_the_teacher():
    tokens, t_logits = FIXED
    p = t_logits.softmax(-1)
    labels = torch.zeros(ROWS * SEQ, dtype=torch.long)  # counted; alpha = 1: KD term only
    tail = 1.0 - float(p.topk(12, dim=-1).values.sum(-1).mean())
    assert 0.02 < tail < 0.5  # a teacher whose truncation actually loses something

    topk_kl, topk_q = train(sparse_targets(TargetSpec(method="topk", k=12)), labels,
                            normalize=True)
    rs_spec = {"method": "sample", "draws": 12, "unique": None}
    fresh_kl, fresh_q = train(lambda step: sparse_targets(TargetSpec(**rs_spec, seed=step)),
                              labels)
    once = {d: train(sparse_targets(TargetSpec(**{**rs_spec, "draws": d})), labels)[0][-1]
            for d in (12, 128)}
    print(f"tail {tail:.3f} top-k KL {topk_kl} RS-12 fresh {fresh_kl} RS once {once}")
    conf = lambda q: float(q.max(-1).values.mean())  # noqa: E731

    # top-k: the KL stalls at the order of the truncation error (training longer never
    # brings it below where it was at the first checkpoint), and the student is
    # over-confident (more top-1 mass than the teacher)
    assert min(topk_kl) == topk_kl[0]
    assert topk_kl[-1] > 0.5 * tail
    assert conf(topk_q) > conf(p) + 0.02
    # RS, fresh draws each step: the KL keeps falling, far below top-k's; not over-confident
    assert all(b < a for a, b in zip(fresh_kl, fresh_kl[1:]))
    assert fresh_kl[-1] < 0.7 * fresh_kl[0]
    assert fresh_kl[-1] < 0.25 * topk_kl[-1]
    assert abs(conf(fresh_q) - conf(p)) < 0.5 * (conf(topk_q) - conf(p))
    # RS drawn once: more draws, a student closer to the teacher
    assert once[128] < 0.5 * once[12]
