"""`logitcast prune`: a student cut from the teacher (depth and width), an HF model directory.

    logitcast prune --teacher default --layers 6 --calibration tokens/ --out student/

The output loads as `student.path` in a training config. Cheap checks (sizes,
--out, the calibration corpus) run before the teacher loads; nothing is
written unless the whole prune succeeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default="default",
                   help="'default' (embedded SmolLM2-135M) or a local HF model directory")
    p.add_argument("--layers", type=int, required=True, help="decoder blocks to keep")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default: teacher's)")
    p.add_argument("--ffn", type=int, default=None, help="FFN size (default: teacher's)")
    p.add_argument("--heads", type=int, default=None,
                   help="query heads (default: kv heads x the teacher's group size)")
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads (default: teacher's)")
    p.add_argument("--calibration", type=Path, required=True,
                   help="token shard directory tokenized with the teacher's tokenizer")
    p.add_argument("--calibration-rows", type=int, default=8, help="rows measured")
    p.add_argument("--calibration-len", type=int, default=256, help="tokens per row")
    p.add_argument("--seed", type=int, default=0, help="which packed rows calibrate")
    p.add_argument("--out", type=Path, required=True, help="output model directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")


def load_teacher(name: str):
    """(fp32 model, tokenizer or None, the name the manifest records) for 'default' or a path."""
    import torch

    from logitcast.trainer.prune import PruneError

    if name == "default":
        from logitcast.server.embedded import EMBEDDED_TEACHER_ID, load_embedded_teacher

        model, tokenizer = load_embedded_teacher(dtype=torch.float32)
        return model, tokenizer, EMBEDDED_TEACHER_ID
    if not (Path(name) / "config.json").is_file():
        raise PruneError(f"--teacher {name}: not 'default' nor an HF model directory "
                         f"(no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError):  # a bare model directory: no tokenizer files
        tokenizer = None
    return model.eval(), tokenizer, str(Path(name).resolve())


def run(args: argparse.Namespace) -> int:
    from logitcast.data.shards import ShardError, TokenCorpus
    from logitcast.server.embedded import default_cache_dir, tokenizer_fingerprint
    from logitcast.trainer.prune import (
        PruneError,
        PruneSpec,
        calibration_rows,
        check_out,
        prune,
        write_pruned,
    )
    from logitcast.trainer.students import num_parameters

    try:
        spec = PruneSpec(layers=args.layers, hidden=args.hidden, ffn=args.ffn,
                         heads=args.heads, kv_heads=args.kv_heads)
        check_out(args.out, args.force)
        teacher_dir = default_cache_dir() if args.teacher == "default" else Path(args.teacher)
        if args.out.resolve() == teacher_dir.resolve():
            raise PruneError(f"--out {args.out} is the teacher's own directory")
        corpus = TokenCorpus(args.calibration)
        model, tokenizer, teacher = load_teacher(args.teacher)
        if tokenizer is not None:  # the corpus must speak the teacher's tokens
            corpus = TokenCorpus(args.calibration,
                                 tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
        vocab = model.get_input_embeddings().weight.shape[0]
        if corpus.vocab_size > vocab:
            raise PruneError(f"calibration corpus vocabulary {corpus.vocab_size} exceeds the "
                             f"teacher's {vocab}")
        tokens = calibration_rows(corpus, args.calibration_rows, args.calibration_len, args.seed)
        pruned = prune(model, spec, tokens)
        calibration = {"directory": str(args.calibration.resolve()),
                       "tokenizer_fingerprint": corpus.tokenizer_fingerprint,
                       "rows": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
                       "seed": args.seed}
        write_pruned(pruned.model, tokenizer, args.out,
                     pruned.manifest(teacher=teacher, calibration=calibration),
                     force=args.force)
    except (PruneError, ShardError) as exc:
        print(f"logitcast prune: {exc}")
        return 2
    print(f"{args.out}: {num_parameters(pruned.model) / 1e6:.1f}M parameters, blocks {pruned.plan.layers} of "
          f"{model.config.num_hidden_layers}, sizes {pruned.spec}")
    return 0
