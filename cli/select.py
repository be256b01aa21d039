"""`logitcast select`: MiniPLM difference sampling of a token corpus (teacher vs reference).

    logitcast select --teacher HOST:PORT[,HOST:PORT...] --reference HOST:PORT|MODEL_DIR \\
        --corpus tokens/ --ratio 0.5 --out tokens-selected/ [--unit rows|documents] \\
        [--reference-split F] [--seq-len N] [--dry-run]
    logitcast select --corpus tokens/ --reference-split 0.05 --split-out tokens-ref/

Scores go to --scores (default OUT.scores/) as they arrive: a rerun resumes, and once
complete another --ratio or --out is selected without any server. --dry-run writes no
corpus, only report.txt and report.png (score histogram; examples of the kept,
down-sampled and dropped instances) in the scores directory. --split-out writes the
reference split (the instances a reference should be trained on, never selected) as a
corpus and stops. Bad input fails before any output exists; the output appears whole.
"""

from __future__ import annotations

import argparse
import logging
import textwrap
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", type=Path, required=True, help="token shard directory")
    p.add_argument("--teacher", default=None, help="teacher server address(es), comma-separated")
    p.add_argument("--reference", default=None,
                   help="reference: a server address, or a local HF model directory")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction kept, in (0, 1]")
    p.add_argument("--out", type=Path, default=None, help="output token shard directory (new)")
    p.add_argument("--unit", choices=("rows", "documents"), default="rows",
                   help="packed rows of --seq-len tokens (as the paper), or documents")
    p.add_argument("--seq-len", type=int, default=512,
                   help="rows: tokens per row; documents: longest piece scored at once")
    p.add_argument("--seed", type=int, default=0, help="packing seed and reference-split seed")
    p.add_argument("--reference-split", type=float, default=0.0,
                   help="fraction reserved for training the reference (never selected)")
    p.add_argument("--split-out", type=Path, default=None,
                   help="only write the reference split as a corpus here, then stop")
    p.add_argument("--scores", type=Path, default=None,
                   help="scores directory (default: OUT.scores); resumed and reused")
    p.add_argument("--dry-run", action="store_true", help="report only, no output corpus")
    p.add_argument("--tokenizer", default=None,
                   help="the corpus's tokenizer ('default' or a path): decodes dry-run "
                        "examples and the text both sides score when tokenizers differ")
    p.add_argument("--teacher-tokenizer", default=None,
                   help="the teacher's tokenizer, when it differs from the corpus's")
    p.add_argument("--reference-tokenizer", default=None,
                   help="the reference server's tokenizer, when it differs from the corpus's")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per Score request")
    p.add_argument("--in-flight", type=int, default=4, help="Score requests in flight")
    p.add_argument("--device", default="cpu", help="device of a local reference model")


def load_reference(spec: str, corpus_fingerprint: str, device: str, in_flight: int):
    """(scorer, tokenizer or None) for a model directory or a server address."""
    from logitcast.data.select import SelectError

    if (Path(spec) / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from logitcast.data.select import ModelScorer
        from logitcast.server.embedded import tokenizer_fingerprint

        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32,
                                                     attn_implementation="sdpa")
        try:
            tok = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError, TypeError):  # a bare model directory
            tok = None
        if tok is None:
            logger.warning("%s has no tokenizer files: assuming the corpus's tokenizer", spec)
        fp = tokenizer_fingerprint(tok) if tok is not None else corpus_fingerprint
        return ModelScorer(model, name=str(Path(spec).resolve()), tokenizer_fingerprint=fp,
                           device=device), tok
    if ":" not in spec:
        raise SelectError(f"--reference {spec}: neither a model directory (no config.json) "
                          f"nor a server address host:port")
    from logitcast.client.scorer import TeacherScorer

    return TeacherScorer([spec], in_flight=in_flight), None


def load_tokenizer(name: str | None, want: str | None = None):
    """A tokenizer by name ('default' or a path), checked against fingerprint `want`."""
    if name is None:
        return None
    from logitcast.cli.tokenize import load_tokenizer as load
    from logitcast.data.select import SelectError

    tok, fp, _ = load(name)
    if want is not None and fp != want:
        raise SelectError(f"tokenizer {name} has fingerprint {fp}, expected {want}")
    return tok


def corpus_tokenizer(name: str | None, fingerprint: str):
    """--tokenizer, else the embedded teacher's tokenizer when it is the corpus's, else None."""
    if name is not None:
        return load_tokenizer(name, fingerprint)
    try:
        from transformers import AutoTokenizer

        from logitcast.server.embedded import default_cache_dir, tokenizer_fingerprint

        tok = AutoTokenizer.from_pretrained(default_cache_dir())
    except (ImportError, OSError, ValueError, TypeError):
        return None
    return tok if tokenizer_fingerprint(tok) == fingerprint else None


# ---------------------------------------------------------------------------- report


def categories(scores, kept: np.ndarray) -> dict[str, np.ndarray]:
    """The paper's three effects (Fig. 3b): kept (teacher >> reference: hard, valuable),
    down-sampled (not kept, teacher log-prob at or above the candidates' median: easy,
    common) and dropped (not kept, below it: noisy)."""
    cand = scores.candidates
    rest = np.setdiff1d(cand, kept)
    median = np.median(scores.teacher[cand])
    return {"kept": kept, "down-sampled": rest[scores.teacher[rest] >= median],
            "dropped": rest[scores.teacher[rest] < median]}


def report_text(scores, kept: np.ndarray, instances, decode, examples: int = 3) -> str:
    plan, cand = scores.plan, scores.candidates
    s = scores.score[cand]
    threshold = float(scores.score[kept].min())
    unit = plan["normalisation"]
    lines = [f"difference sampling, dry run: teacher {plan['sides']['teacher']['model']}, "
             f"reference {plan['sides']['reference']['model']}",
             f"{plan['instances']} {plan['unit']} instances, {cand.size} candidates, "
             f"{kept.size} kept; score = (log p_teacher - log p_reference) per {unit}; "
             f"kept when >= {threshold:.4f}", "", f"score histogram (per {unit}):"]
    counts, edges = np.histogram(s, bins=20)
    for n, lo, hi in zip(counts, edges[:-1], edges[1:]):
        mark = " kept" if lo >= threshold else (" (partly kept)" if hi > threshold else "")
        lines.append(f"  [{lo:+8.4f}, {hi:+8.4f})  {n:7d} {'#' * int(50 * n / counts.max())}{mark}")
    cats = categories(scores, kept)
    pick = {"kept": lambda ix: ix[np.argsort(-scores.score[ix])],
            "down-sampled": lambda ix: ix[np.argsort(-scores.reference[ix])],
            "dropped": lambda ix: ix[np.argsort(scores.teacher[ix])]}
    why = {"kept": "highest difference: the teacher predicts them far better than the "
                   "reference (hard, valuable: up-sampled)",
           "down-sampled": "not kept, teacher log-prob >= median; the reference's easiest "
                           "shown (easy, common patterns)",
           "dropped": "not kept, teacher log-prob < median; the teacher's worst shown (noise)"}
    for name, ix in cats.items():
        lines += ["", f"{name}: {ix.size} instances ({why[name]})"]
        for i in pick[name](ix)[:examples].tolist():
            tokens = instances.tokens(i)
            snippet = decode(tokens[:96].tolist()) if decode else f"token ids {tokens[:24].tolist()}"
            lines.append(f"  #{i}: score {scores.score[i]:+.4f}, teacher "
                         f"{scores.teacher[i]:+.4f}, reference {scores.reference[i]:+.4f}")
            lines.append(textwrap.indent(textwrap.shorten(repr(snippet), 300), "      "))
    return "\n".join(lines) + "\n"


def report_png(scores, kept: np.ndarray, path: Path) -> bool:
    """The histogram and a teacher-vs-reference scatter by category; False without
    matplotlib (the `trainer` extra)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = scores.plan["normalisation"]
    cats = categories(scores, kept)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.hist([scores.score[ix] for ix in cats.values()], bins=40, stacked=True,
           label=list(cats), color=["tab:green", "tab:orange", "tab:red"])
    a.axvline(float(scores.score[kept].min()), color="k", lw=0.8)
    a.set_xlabel(f"log p_teacher - log p_reference, per {unit}")
    a.set_title("difference scores (line: selection threshold)")
    a.legend()
    for (name, ix), color in zip(cats.items(), ["tab:green", "tab:orange", "tab:red"]):
        b.scatter(scores.reference[ix], scores.teacher[ix], s=4, alpha=0.6, label=name,
                  color=color)
    b.set_xlabel(f"reference log-prob per {unit}")
    b.set_ylabel(f"teacher log-prob per {unit}")
    b.set_title("the three effects")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    import grpc

    from logitcast.client.teacher_client import TeacherMismatchError, TeacherUnavailableError
    from logitcast.data.scores import ScoreFileError
    from logitcast.data.select import (
        COLUMNS,
        Instances,
        Scores,
        SelectConfig,
        SelectError,
        check_out,
        reference_split,
        score_corpus,
        selection_info,
        top_fraction,
        write_corpus,
    )
    from logitcast.data.shards import ShardError, TokenCorpus

    scorers: dict = {}
    try:
        config = SelectConfig(ratio=args.ratio, unit=args.unit, seq_len=args.seq_len,
                              seed=args.seed, reference_split=args.reference_split,
                              batch_tokens=args.batch_tokens)
        corpus = TokenCorpus(args.corpus)
        instances = Instances(corpus, config)
        if args.split_out is not None:
            split = reference_split(instances.count, config.reference_split, config.seed)
            if split.size == 0:
                raise SelectError("--split-out needs --reference-split > 0 (it holds 0 instances)")
            write_corpus(instances, split, args.split_out, {
                "format": "logitcast-reference-split", "version": 1, "unit": config.unit,
                "seq_len": config.seq_len, "seed": config.seed,
                "fraction": config.reference_split, "instances": split.tolist()})
            print(f"{args.split_out}: reference split, {split.size} of {instances.count} "
                  f"{config.unit}")
            return 0
        if args.out is None:
            raise SelectError("--out is required (the output corpus; with --dry-run, names "
                              "the default scores directory)")
        if not args.dry_run:
            check_out(args.out)
        scores_dir = args.scores or args.out.with_name(args.out.name + ".scores")
        if (scores_dir / COLUMNS).is_file():
            scores = Scores.load(scores_dir, corpus, config)
            print(f"reusing finished scores in {scores_dir} (teacher "
                  f"{scores.plan['sides']['teacher']['model']}, reference "
                  f"{scores.plan['sides']['reference']['model']})")
        else:
            if not args.teacher or not args.reference:
                raise SelectError(f"--teacher and --reference are required ({scores_dir} "
                                  f"holds no finished scores)")
            from logitcast.client.scorer import TeacherScorer

            scorers["teacher"] = TeacherScorer(args.teacher.split(","), in_flight=args.in_flight)
            scorers["reference"], ref_tok = load_reference(
                args.reference, corpus.tokenizer_fingerprint, args.device, args.in_flight)
            tokenizers = None
            fps = {s.tokenizer_fingerprint for s in scorers.values()}
            if fps != {corpus.tokenizer_fingerprint}:  # both sides must score the same text
                tokenizers = {
                    "corpus": corpus_tokenizer(args.tokenizer, corpus.tokenizer_fingerprint),
                    "teacher": load_tokenizer(args.teacher_tokenizer or args.tokenizer,
                                              scorers["teacher"].tokenizer_fingerprint),
                    "reference": ref_tok or load_tokenizer(
                        args.reference_tokenizer, scorers["reference"].tokenizer_fingerprint)}
            scores = score_corpus(corpus, config, scorers, scores_dir, tokenizers=tokenizers)
        kept = top_fraction(scores, config.ratio)
        if args.dry_run:
            tok = corpus_tokenizer(args.tokenizer, corpus.tokenizer_fingerprint)
            text = report_text(scores, kept, instances, tok.decode if tok else None)
            (scores_dir / "report.txt").write_text(text)
            png = report_png(scores, kept, scores_dir / "report.png")
            print(text + f"\nreport: {scores_dir / 'report.txt'}" +
                  (f", {scores_dir / 'report.png'}" if png else
                   " (no PNG: matplotlib is missing, pip install 'logitcast[trainer]')"))
            return 0
        info = selection_info(scores, config, kept, instances)
        write_corpus(instances, kept, args.out, info)
    except (SelectError, ScoreFileError, ShardError, TeacherMismatchError,
            TeacherUnavailableError) as exc:
        print(f"logitcast select: {exc}")
        return 2
    except grpc.RpcError as exc:
        print(f"logitcast select: the server refused: {exc.code().name}: {exc.details()}")
        return 2
    finally:
        for s in scorers.values():
            if hasattr(s, "close"):
                s.close()
    c = info["counts"]
    print(f"{args.out}: {c['kept']} of {c['candidates']} {config.unit} kept "
          f"({c['kept_tokens']} tokens), score per {info['normalisation']} >= "
          f"{info['score_threshold']:.4f}; scores in {scores_dir}")
    return 0
