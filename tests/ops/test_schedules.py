import math

import pytest

from logitcast.ops.schedules import ALPHA_SCHEDULES, LR_SCHEDULES, alpha_at, lr_at


def test_constant_and_linear_alpha():
    assert alpha_at(0, "constant", value=0.3) == alpha_at(999, "constant", value=0.3) == 0.3
    inc = {"total_steps": 100, "start": 0.0, "end": 1.0}
    assert [alpha_at(s, "linear", **inc) for s in (0, 25, 100, 150)] == [0.0, 0.25, 1.0, 1.0]
    dec = {"total_steps": 10, "start": 1.0, "end": 0.0}
    assert alpha_at(5, "linear", **dec) == 0.5
    assert alpha_at(10, "linear", **dec) == 0.0


def test_periodic_alpha_is_on_every_nth_step():
    got = [alpha_at(s, "periodic", every=4, value=0.9) for s in range(9)]
    assert got == [0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.9, 0.0]
    assert alpha_at(5, "periodic", every=1, value=0.9) == 0.9


def test_wsd_alpha_breakpoints():
    """PD 3.3: warmup 10%, decay 1% of 1,000 steps: 0 -> 1 over 100, stable to 990, cosine to 0."""
    p = {"total_steps": 1000, "peak": 1.0, "warmup_steps": 100, "decay_steps": 10}
    a = [alpha_at(s, "wsd", **p) for s in range(1001)]
    assert a[0] == 0.0
    assert a[50] == pytest.approx(0.5)
    assert a[99] == pytest.approx(0.99)
    assert a[100] == a[500] == a[990] == 1.0  # stable through the first decay step
    assert a[995] == pytest.approx(0.5)  # half-way down the cosine
    assert a[1000] == 0.0
    assert alpha_at(5000, "wsd", **p) == 0.0
    assert all(x >= y for x, y in zip(a[990:], a[991:]))  # monotone decay
    assert all(x <= y for x, y in zip(a[:100], a[1:101]))  # monotone warmup


def test_wsd_lr_with_floor_and_no_decay():
    p = {"total_steps": 100, "peak": 3e-4, "warmup_steps": 10, "decay_steps": 20, "floor": 3e-5}
    assert lr_at(0, "wsd", **p) == 0.0
    assert lr_at(10, "wsd", **p) == lr_at(80, "wsd", **p) == 3e-4
    assert lr_at(90, "wsd", **p) == pytest.approx((3e-4 + 3e-5) / 2)
    assert lr_at(100, "wsd", **p) == pytest.approx(3e-5)
    flat = {"total_steps": 10, "peak": 1.0, "warmup_steps": 0, "decay_steps": 0}
    assert lr_at(0, "wsd", **flat) == lr_at(9, "wsd", **flat) == 1.0


def test_cosine_lr_breakpoints():
    p = {"total_steps": 1100, "peak": 6e-4, "warmup_steps": 100, "floor": 6e-5}
    assert lr_at(0, "cosine", **p) == 0.0
    assert lr_at(50, "cosine", **p) == pytest.approx(3e-4)
    assert lr_at(100, "cosine", **p) == pytest.approx(6e-4)
    assert lr_at(600, "cosine", **p) == pytest.approx(3.3e-4)
    assert lr_at(1100, "cosine", **p) == pytest.approx(6e-5)
    assert lr_at(9999, "cosine", **p) == pytest.approx(6e-5)
    frac = 0.25
    want = 6e-5 + (6e-4 - 6e-5) * 0.5 * (1 + math.cos(math.pi * frac))
    assert lr_at(100 + 250, "cosine", **p) == pytest.approx(want)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: alpha_at(0, "cosine", value=0.5), "unknown alpha schedule 'cosine'"),
        (lambda: lr_at(0, "periodic", every=2, value=1.0), "unknown lr schedule"),
        (lambda: alpha_at(0, "constant", value=1.5), "value"),
        (lambda: alpha_at(0, "wsd", total_steps=10, peak=2.0, warmup_steps=1, decay_steps=1),
         "peak"),
        (lambda: alpha_at(-1, "constant", value=0.5), "step"),
        (lambda: alpha_at(0, "periodic", every=0, value=0.5), "every"),
        (lambda: alpha_at(0, "linear", total_steps=0, start=0.0, end=1.0), "total_steps"),
        (lambda: alpha_at(0, "wsd", total_steps=10, peak=1.0, warmup_steps=8, decay_steps=5),
         "exceeds"),
        (lambda: alpha_at(0, "constant", valu=0.5), "unexpected keyword"),
        (lambda: lr_at(0, "cosine", total_steps=10, peak=0.0, warmup_steps=1), "peak"),
        (lambda: lr_at(0, "cosine", total_steps=10, peak=1e-3, warmup_steps=1, floor=1e-2),
         "floor"),
        (lambda: lr_at(0, "cosine", total_steps=10, peak=float("nan"), warmup_steps=1), "peak"),
        (lambda: lr_at(0, "cosine", total_steps=10, peak=1e-3, warmup_steps=11), "warmup_steps"),
    ],
)
def test_bad_parameters_raise_value_error_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_registries():
    assert sorted(ALPHA_SCHEDULES) == ["constant", "linear", "periodic", "wsd"]
    assert sorted(LR_SCHEDULES) == ["cosine", "wsd"]
