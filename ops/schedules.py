"""Schedules: the KD weight alpha and the learning rate as pure functions of the step.

    alpha_at(step, name, **params)     names: constant, linear, periodic, wsd
    lr_at(step, name, **params)        names: cosine, wsd

Steps count from 0. A schedule over `total_steps` reaches its end value at
step == total_steps and stays there; warmups start at 0 at step 0. Shapes
(PD section 3.3):

- constant   value
- linear     start -> end linearly (PD's "Linear Inc" 0 -> 1 and "Linear Dec" 1 -> 0)
- periodic   value on every `every`-th step (steps every-1, 2*every-1, ...), else 0
             (PD's "Period": 0.9 on every fourth batch)
- wsd        warmup-stable-decay: linear 0 -> peak over `warmup_steps`, peak until
             the last `decay_steps`, then a cosine from peak down to `floor`
             (WSD-alpha and WSD-LR; PD uses 10% warmup, 1% decay)
- cosine     linear 0 -> peak over `warmup_steps`, then a cosine to `floor` at total_steps

Every parameter is checked; a bad one raises ValueError naming it. Nothing
here knows about optimisers or trainers: call it with the step, use the float.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def _number(name: str, value: float, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a finite number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _count(name: str, value: int, lo: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def _cosine(frac: float, hi: float, lo: float) -> float:
    """hi at frac = 0, lo at frac = 1, half a cosine in between."""
    return lo + (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


# ---------------------------------------------------------------------------- shapes

def constant(step: int, *, value: float) -> float:
    """`value` at every step."""
    _count("step", step)
    return _number("value", value)


def linear(step: int, *, total_steps: int, start: float, end: float) -> float:
    """start at step 0, end from step total_steps on, linear in between."""
    _count("step", step)
    total = _count("total_steps", total_steps, 1)
    start, end = _number("start", start), _number("end", end)
    return start + (end - start) * min(step, total) / total


def periodic(step: int, *, every: int, value: float) -> float:
    """`value` on steps every-1, 2*every-1, ... (every `every`-th step), 0 otherwise."""
    _count("step", step)
    every = _count("every", every, 1)
    value = _number("value", value)
    return value if step % every == every - 1 else 0.0


def wsd(step: int, *, total_steps: int, peak: float, warmup_steps: int, decay_steps: int,
        floor: float = 0.0) -> float:
    """Warmup (0 -> peak, linear), stable (peak), decay (cosine peak -> floor) ending at
    total_steps; floor afterwards."""
    _count("step", step)
    total = _count("total_steps", total_steps, 1)
    warmup = _count("warmup_steps", warmup_steps)
    decay = _count("decay_steps", decay_steps)
    if warmup + decay > total:
        raise ValueError(f"warmup_steps + decay_steps = {warmup + decay} exceeds "
                         f"total_steps={total}")
    peak = _number("peak", peak)
    floor = _number("floor", floor)
    if step < warmup:
        return peak * step / warmup
    decay_start = total - decay
    if step < decay_start:
        return peak
    return _cosine((step - decay_start) / decay if decay else 1.0, peak, floor)


def cosine(step: int, *, total_steps: int, peak: float, warmup_steps: int,
           floor: float = 0.0) -> float:
    """Warmup (0 -> peak, linear), then a cosine from peak to floor at total_steps."""
    _count("step", step)
    total = _count("total_steps", total_steps, 1)
    warmup = _count("warmup_steps", warmup_steps)
    if warmup > total:
        raise ValueError(f"warmup_steps={warmup} exceeds total_steps={total}")
    peak = _number("peak", peak)
    floor = _number("floor", floor)
    if step < warmup:
        return peak * step / warmup
    if warmup == total:
        return floor
    return _cosine((step - warmup) / (total - warmup), peak, floor)


# ---------------------------------------------------------------------------- registries

Schedule = Callable[..., float]

#: alpha schedules by name; every value they return is in [0, 1].
ALPHA_SCHEDULES: dict[str, Schedule] = {
    "constant": constant,
    "linear": linear,
    "periodic": periodic,
    "wsd": wsd,
}
#: learning-rate schedules by name.
LR_SCHEDULES: dict[str, Schedule] = {"cosine": cosine, "wsd": wsd}

_ALPHA_FIELDS = ("value", "start", "end", "peak", "floor")


def _call(kind: str, registry: dict[str, Schedule], step: int, name: str,
          params: dict[str, float]) -> float:
    if name not in registry:
        raise ValueError(f"unknown {kind} schedule {name!r}; known: {sorted(registry)}")
    try:
        return registry[name](step, **params)
    except TypeError as exc:  # missing or unknown keyword: a bad config, not a bug
        raise ValueError(f"{kind} schedule {name!r}: {exc}") from exc


def alpha_at(step: int, name: str, **params: float) -> float:
    """KD weight alpha at `step` for the schedule `name` (values checked to lie in [0, 1])."""
    for field in _ALPHA_FIELDS:
        if field in params:
            _number(field, params[field], 0.0, 1.0)
    return _call("alpha", ALPHA_SCHEDULES, step, name, params)


def lr_at(step: int, name: str, **params: float) -> float:
    """Learning rate at `step` for the schedule `name` (peak > 0, 0 <= floor <= peak)."""
    if "peak" in params:
        peak = _number("peak", params["peak"], 0.0)
        if peak == 0.0:
            raise ValueError("peak must be > 0, got 0")
        if "floor" in params:
            _number("floor", params["floor"], 0.0, peak)
    return _call("lr", LR_SCHEDULES, step, name, params)
