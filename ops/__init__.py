"""logitcast.ops: pure tensor operators shared by the server and the trainer.

Sparse teacher targets (`sparsify`), their byte codec (`encode`/`decode`),
counter-based randomness and unbiased thinning. No I/O, no global state, no
imports from the rest of logitcast.
"""

from logitcast.ops.errors import (
    CodecCapacityError,
    CodecError,
    CodecVersionError,
    InvalidSpecError,
    NonFiniteLogitsError,
)
from logitcast.ops.sparsifiers import row_positions, sparsify
from logitcast.ops.spec import METHODS, TargetSpec
from logitcast.ops.targets import SparseTargets

__all__ = [
    "METHODS",
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
