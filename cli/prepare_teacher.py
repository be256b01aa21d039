"""`logitcast prepare-teacher`: convert the embedded GGUF teacher once, so later loads are fast."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the converted copy lives (default: $LOGITCAST_HOME/teachers/...)")


def run(args: argparse.Namespace) -> int:
    from logitcast.server.embedded import (
        EMBEDDED_TEACHER_ID,
        default_cache_dir,
        load_embedded_teacher,
        tokenizer_fingerprint,
    )

    model, tokenizer = load_embedded_teacher(cache_dir=args.cache_dir)
    print(f"teacher {EMBEDDED_TEACHER_ID}: vocab {model.config.vocab_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"tokenizer {tokenizer_fingerprint(tokenizer)}, cache {args.cache_dir or default_cache_dir()}")
    return 0
