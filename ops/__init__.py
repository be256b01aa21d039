"""logitcast.ops: pure tensor operators shared by the server and the trainer.

Sparse teacher targets (`sparsify`), their byte codec (`encode`/`decode`),
counter-based randomness, unbiased thinning and derivation, KD losses at the
cost of cross-entropy (plain and fused chunked), and alpha/LR schedules. No I/O,
no global state, no imports from the rest of logitcast.
"""

from logitcast.ops.errors import (
    CodecCapacityError,
    CodecError,
    CodecVersionError,
    InvalidSpecError,
    NonFiniteLogitsError,
)
from logitcast.ops.fused import fused_distill_loss, fused_full_kd_loss
from logitcast.ops.kd_terms import KD_LOSSES, LossTargets
from logitcast.ops.losses import (
    IGNORE_INDEX,
    KDConfig,
    adakd_temperature,
    distill_loss,
    full_kd_loss,
    lm_loss,
    retemper,
)
from logitcast.ops.schedules import ALPHA_SCHEDULES, LR_SCHEDULES, alpha_at, lr_at
from logitcast.ops.sparsifiers import row_positions, sparsify
from logitcast.ops.spec import METHODS, TargetSpec
from logitcast.ops.targets import SparseTargets

__all__ = [
    "ALPHA_SCHEDULES",
    "IGNORE_INDEX",
    "KD_LOSSES",
    "LR_SCHEDULES",
    "METHODS",
    "KDConfig",
    "LossTargets",
    "adakd_temperature",
    "alpha_at",
    "distill_loss",
    "full_kd_loss",
    "fused_distill_loss",
    "fused_full_kd_loss",
    "lm_loss",
    "lr_at",
    "retemper",
    "CodecCapacityError",
    "CodecError",
    "CodecVersionError",
    "InvalidSpecError",
    "NonFiniteLogitsError",
    "SparseTargets",
    "TargetSpec",
    "row_positions",
    "sparsify",
]
