"""`logitcast tokenize`: text -> token shards with the teacher's tokenizer (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", type=Path,
                   help="text files/dirs, .jsonl, .parquet or saved HF datasets "
                        "(default: the Python standard library source)")
    p.add_argument("--out", type=Path, required=True, help="shard directory (resumes if present)")
    p.add_argument("--tokenizer", default="default",
                   help="'default' (embedded SmolLM2) or a local tokenizer/model path")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet/dataset text column")
    p.add_argument("--max-files", type=int, default=None, help="only the first N sources")
    p.add_argument("--shard-tokens", type=int, default=64 << 20)


def load_tokenizer(name: str):
    """(tokenizer, fingerprint, vocab size) for 'default' or a local path."""
    from logitcast.server.embedded import load_embedded_teacher, tokenizer_fingerprint

    if name == "default":
        model, tok = load_embedded_teacher()
        return tok, tokenizer_fingerprint(tok), int(model.config.vocab_size)
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    try:
        vocab = int(AutoConfig.from_pretrained(name).vocab_size)
    except (OSError, ValueError):
        vocab = len(tok)
    return tok, tokenizer_fingerprint(tok), vocab


def run(args: argparse.Namespace) -> int:
    from logitcast.data.corpus import stdlib_source_files
    from logitcast.data.shards import TokenCorpus
    from logitcast.data.tokenize import list_sources, tokenize_sources

    sources = list_sources(args.inputs) if args.inputs else stdlib_source_files()
    if args.max_files is not None:
        sources = sources[: args.max_files]
    tok, fingerprint, vocab = load_tokenizer(args.tokenizer)
    tokenize_sources(sources, args.out, tok, fingerprint, vocab_size=vocab,
                     text_field=args.text_field, shard_tokens=args.shard_tokens)
    corpus = TokenCorpus(args.out)
    print(f"{args.out}: {corpus.num_documents} documents, {corpus.num_tokens} tokens, "
          f"tokenizer {fingerprint}")
    return 0
