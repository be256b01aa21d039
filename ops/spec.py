"""`TargetSpec`: what a sparse soft target is made of, validated once.

A spec names a sparsifier and its parameters, the static temperature and the
seed of the counter-based draws. It is part of every cache key and travels
on the wire, so it has one canonical, JSON-able form (`to_dict`, `key`).
It deliberately knows nothing about vocabularies (k > V is checked when a
spec meets logits) or about codecs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from logitcast.ops.errors import InvalidSpecError

METHODS = ("full", "topk", "top_p_k", "sample", "head_tail")

#: Temperatures and proposal exponents outside this range are refused: far beyond any
#: use, they only overflow float32 logits (x / 1e-39 is inf) or flatten them to noise.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2

#: Largest number of draws per position: counts are stored as count - 1 in
#: 7 bits next to the token id (Sparse Logit Sampling, appendix D.1).
MAX_DRAWS_7BIT = 128

# Which parameters each method reads; everything else must stay at its default.
_PARAMS = {
    "full": (),
    "topk": ("k",),
    "top_p_k": ("k", "p"),
    "sample": ("draws", "unique", "max_draws", "proposal_t"),
    "head_tail": ("k_head", "draws", "unique", "max_draws", "proposal_t"),
}
_COMMON = ("method", "temperature", "seed")


@dataclass(frozen=True, kw_only=True)
class TargetSpec:
    """How teacher distributions become sparse targets."""

    method: str = "sample"
    """One of `METHODS`: full, topk, top_p_k, sample (RS-KD), head_tail."""
    k: int = 12
    """topk / top_p_k: entries kept per position (top_p_k keeps at most k)."""
    p: float = 0.95
    """top_p_k: keep the smallest prefix of sorted tokens with mass >= p, then cap at k."""
    draws: int | None = None
    """sample / head_tail: draws per position (with replacement). Exclusive with `unique`."""
    unique: float | None = 12.0
    """sample / head_tail: target expected number of distinct sampled tokens per
    position; draws are chosen per position from the teacher distribution."""
    max_draws: int = MAX_DRAWS_7BIT
    """sample / head_tail: cap on draws per position when `unique` picks them."""
    proposal_t: float = 1.0
    """sample / head_tail: proposal q proportional to p**t (1.0 gives counts / draws)."""
    k_head: int = 4
    """head_tail: exact top-k head entries before the sampled tail."""
    temperature: float = 1.0
    """Static temperature applied to teacher logits before sparsifying."""
    seed: int = 0
    """Seed of the counter-based draws (with row key, position and draw index)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidSpecError(f"method must be one of {METHODS}, got {self.method!r}")
        if not (isinstance(self.temperature, (int, float))
                and MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise InvalidSpecError(f"temperature must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                                   f"got {self.temperature!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InvalidSpecError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.method in ("topk", "top_p_k") and (not isinstance(self.k, int) or self.k < 1):
            raise InvalidSpecError(f"k must be an int >= 1, got {self.k!r}")
        if self.method == "top_p_k" and not (0.0 < self.p <= 1.0):
            raise InvalidSpecError(f"p must be in (0, 1], got {self.p!r}")
        if self.method == "head_tail" and (not isinstance(self.k_head, int) or self.k_head < 1):
            raise InvalidSpecError(f"k_head must be an int >= 1, got {self.k_head!r}")
        if self.method in ("sample", "head_tail"):
            self._check_draws()

    def _check_draws(self) -> None:
        if (self.draws is None) == (self.unique is None):
            raise InvalidSpecError(
                f"give exactly one of draws or unique, got draws={self.draws!r} "
                f"unique={self.unique!r}"
            )
        if not isinstance(self.max_draws, int) or not 1 <= self.max_draws <= 65535:
            raise InvalidSpecError(f"max_draws must be an int in [1, 65535], got {self.max_draws!r}")
        if self.draws is not None and (
            not isinstance(self.draws, int) or not 1 <= self.draws <= 65535
        ):
            raise InvalidSpecError(f"draws must be an int in [1, 65535], got {self.draws!r}")
        if self.unique is not None and not (
            isinstance(self.unique, (int, float)) and 0 < self.unique <= self.max_draws
        ):
            raise InvalidSpecError(
                f"unique must be in (0, max_draws={self.max_draws}], got {self.unique!r}"
            )
        if not (isinstance(self.proposal_t, (int, float))
                and MIN_TEMPERATURE <= self.proposal_t <= MAX_TEMPERATURE):
            raise InvalidSpecError(f"proposal_t must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                                   f"got {self.proposal_t!r}")

    @property
    def sampled(self) -> bool:
        """True when the method draws tokens (sample, head_tail)."""
        return self.method in ("sample", "head_tail")

    @property
    def draw_cap(self) -> int:
        """Most draws any position can get under this spec."""
        return self.draws if self.draws is not None else self.max_draws

    def to_dict(self) -> dict[str, Any]:
        """Canonical form: only the fields this method reads, plus the common ones."""
        names = _COMMON + _PARAMS[self.method]
        return {n: getattr(self, n) for n in names}

    def key(self) -> str:
        """Stable string for cache keys and logs, e.g. '{"draws":null,...}'."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TargetSpec:
        """Inverse of `to_dict`; unknown keys or keys the method does not read are errors."""
        if not isinstance(d, dict):
            raise InvalidSpecError(f"spec must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidSpecError(f"unknown spec field(s) {unknown}; known: {sorted(known)}")
        method = d.get("method", cls.method)
        unread = sorted(set(d) - set(_COMMON) - set(_PARAMS.get(method, ())))
        if unread:
            raise InvalidSpecError(f"method {method!r} does not read field(s) {unread}")
        if method in ("sample", "head_tail") and "draws" in d and "unique" not in d:
            d = {**d, "unique": None}
        return cls(**d)
