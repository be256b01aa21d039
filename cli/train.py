"""`logitcast train --config run.yaml`: one rank of a DeepSpeed student run.

Single process: `logitcast train --config run.yaml`. Several ranks:
`torchrun --nproc-per-node 2 $(which logitcast) train --config run.yaml` or the
`deepspeed` launcher (which adds --local_rank). `--set a.b=c` overrides any
config field; `--print-config` shows the resolved config and exits.
"""

from __future__ import annotations

import argparse
import json
import logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML or JSON run config (see docs/trainer.md)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set steps=200 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # the deepspeed launcher passes it; LOCAL_RANK wins


def run(args: argparse.Namespace) -> int:
    import os

    from logitcast.trainer.config import ConfigError, load_config

    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"logitcast train: {exc}")
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    if config.export_tokenizer == "default":
        from logitcast.server.embedded import default_cache_dir, load_embedded_teacher

        load_embedded_teacher()  # builds the converted copy (and its tokenizer) if missing
        config.export_tokenizer = str(default_cache_dir())
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)

    from logitcast.trainer.loop import Trainer

    try:
        with Trainer(config) as trainer:
            if trainer.rank == 0:
                print(f"student {config.student.path or config.student.preset}: "
                      f"{trainer.num_parameters / 1e6:.1f}M parameters, {trainer.world} rank(s), "
                      f"targets from {config.teacher.source}"
                      + (f"; recording {trainer.recorder.namespace.teacher_id} targets into "
                         f"{trainer.recorder.where}" if trainer.recorder else "")
                      + f"; log {config.output_dir}/log.jsonl"
                      + (f"; metrics on :{trainer.metrics_port}" if trainer.metrics_port else ""))
            final = trainer.run()
            if trainer.rank == 0 and final:
                print("final eval: " + json.dumps(final))
    except ConfigError as exc:
        print(f"logitcast train: {exc}")
        return 2
    return 0
