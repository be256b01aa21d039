"""`logitcast <verb>`: one console script, each subcommand a small module loaded lazily.

A verb's module is imported only when that verb runs, so `logitcast --help` stays
fast and a verb's heavy dependencies (transformers, deepspeed, ray) are only
needed by the verbs that use them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: verb -> (module under logitcast.cli, one-line help)
VERBS = {
    "prepare-teacher": ("prepare_teacher", "convert the embedded SmolLM2 teacher to a fast cache"),
    "serve": ("serve", "run a teacher server (gRPC) until SIGTERM, then drain"),
    "fleet": ("fleet", "up: a local teacher fleet on Ray Serve behind its gRPC proxy"),
    "tokenize": ("tokenize", "text files, JSONL, Parquet or HF datasets -> token shards"),
    "cache": ("cache", "stats | verify | compact | export a target cache"),
    "select": ("select", "MiniPLM difference sampling: keep the top ratio by teacher - reference"),
    "prune": ("prune", "a student pruned from the teacher: depth and width, an HF model directory"),
    "train": ("train", "train a student with DeepSpeed on online, cached or no targets"),
    "demo": ("demo", "the pipeline end to end with the embedded teacher"),
    "top": ("top", "live view of fleet and trainer tokens/s, queues, stalls and cache hits"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="logitcast", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(f"logitcast.cli.{VERBS[args.verb][0]}")
    verb_parser = argparse.ArgumentParser(prog=f"logitcast {args.verb}",
                                          description=VERBS[args.verb][1])
    module.add_arguments(verb_parser)
    return int(module.run(verb_parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
