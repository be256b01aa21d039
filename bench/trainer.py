"""Trainer benchmark: what distillation costs the student, online and offline, vs plain CE,
and what recording RS-12 targets costs a model training with CE (PD §3.5).

One run, one student, the same packed rows, four ways (DeepSpeed, fused loss):
(a) online KD: RS-12 targets streamed from a teacher server (a child process,
    `logitcast serve`, teeing into a cache), prefetched ahead of the step;
(b) offline KD: the same targets read back from that cache, no teacher running;
(c) CE only: no targets;
(d) CE while recording: (c) with `record.cache_dir` set, the student as the
    teacher: every step's RS-12 targets sparsified from its own last hidden state
    and written to a cache by a background thread;
(e) full run only: what recording is for, SmolLM2-135M itself training on CE
    (from the embedded teacher's weights), without and with recording, four runs in
    ABBA order (CE, record, record, CE) so a drift of the shared machine cancels.
Reports trained tokens/s of each (steady state: the first steps are warm-up)
and their ratios. record_vs_ce is (e)'s mean recording step time / its mean CE step
time over all steady steps of the four runs (goal <= 1.05; the per-pair ratios and the
ratio of median steps are in the results); record_vs_ce_student is the same for the
small student of (c)/(d), the worst case: a 16M model spends most of its step in the
[V x d] head, and sparsifying 49,152 logits per position costs about as much again. The seconds
`close` then spends writing what was still queued are reported beside it. On this
2-core machine the online teacher shares the CPU with the student, so online_vs_ce
mostly measures that contention; on a GPU cluster the teacher runs on its own
device. The full run uses the real SmolLM2-135M teacher and the 16M student;
--quick a tiny random teacher and a 7M student with its 1,024-token vocabulary
(same pipeline, smoke only, no (e)).

    python bench/trainer.py [--quick]

Last line: RESULT online_vs_ce=.. offline_vs_ce=.. online_vs_offline=..
    record_vs_ce_student=.. [record_vs_ce=..]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_corpus, write_results

WARMUP_STEPS = 2
#: steps of each SmolLM2-135M CE / recording run (full run only), and the order of the
#: runs: ABBA, so a drift of the machine's speed over the runs cancels in the ratio
TEACHER_STEPS = 8
TEACHER_ORDER = ("ce", "record", "record", "ce")


def corpus(directory: Path, quick: bool) -> tuple[str, int]:
    """Token shards for the teacher's tokenizer; (fingerprint, vocab)."""
    if quick:
        from logitcast.server.backends import TransformersBackend

        backend = TransformersBackend.tiny_random()
        random_corpus(directory, backend.tokenizer_fingerprint, backend.vocab_size, docs=120)
        return backend.tokenizer_fingerprint, backend.vocab_size
    from logitcast.cli.tokenize import load_tokenizer
    from logitcast.data.corpus import stdlib_source_files
    from logitcast.data.tokenize import tokenize_sources

    tok, fingerprint, vocab = load_tokenizer("default")
    tokenize_sources(stdlib_source_files()[:40], directory, tok, fingerprint, vocab_size=vocab)
    return fingerprint, vocab


def train(name: str, base: dict, overrides: dict) -> dict:
    from logitcast.trainer import Trainer, load_config, read_log

    config = load_config(None, [f"{k}={json.dumps(v)}" for k, v in {**base, **overrides}.items()])
    with Trainer(config) as trainer:
        trainer.run()
        received = trainer.metrics.client.received_bytes._value.get()
        wait = trainer.metrics.client.wait_seconds._value.get()
        recorded = trainer.metrics.record_records._value.get()
        recorded_bytes = trainer.metrics.record_bytes._value.get()
        t_close = time.perf_counter()
    close_seconds = time.perf_counter() - t_close
    steps = [r for r in read_log(config.output_dir) if r["kind"] == "train"]
    tokens = config.data.global_batch * config.data.seq_len
    steady = steps[WARMUP_STEPS:]
    seconds = sum(tokens / r["tokens_per_s"] for r in steady)
    out = {"tokens_per_s": tokens * len(steady) / seconds, "steps": len(steps),
           "step_seconds": [tokens / r["tokens_per_s"] for r in steady],
           "wait_seconds": wait, "bytes_per_token": received / (tokens * len(steps)),
           "final_loss": steps[-1]["loss"], "losses": [r["loss"] for r in steps],
           "close_seconds": close_seconds}
    if recorded:
        out.update(records=int(recorded),
                   recorded_bytes_per_token=recorded_bytes / (tokens * len(steps)))
    print(f"{name:>8}: {out['tokens_per_s']:.0f} tok/s, waited {wait:.2f}s on targets, "
          f"final loss {out['final_loss']:.3f}", flush=True)
    return out


def recording_cost(runs: list[dict]) -> dict:
    """record_vs_ce from the ABBA runs: all recording steady steps' seconds over all CE
    ones (pooled), the same per adjacent CE/record pair, and the ratio of median steps."""
    import statistics

    steps = {k: [t for r in runs if r["kind"] == k for t in r["step_seconds"]]
             for k in ("ce", "record")}
    pairs = [runs[i:i + 2] for i in range(0, len(runs) - 1, 2)]
    by_kind = [{r["kind"]: sum(r["step_seconds"]) / len(r["step_seconds"]) for r in pair}
               for pair in pairs]
    return {"record_vs_ce": (sum(steps["record"]) / len(steps["record"]))
            / (sum(steps["ce"]) / len(steps["ce"])),
            "pair_ratios": [b["record"] / b["ce"] for b in by_kind],
            "median_step_ratio": statistics.median(steps["record"])
            / statistics.median(steps["ce"]),
            "steady_steps": {k: len(v) for k, v in steps.items()},
            "losses_identical": len({tuple(r["losses"]) for r in runs}) == 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    q = args.quick
    import logging

    import torch

    from logitcast.cli.serve import start_server_process

    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="logitcast-bench-trainer-"))
    try:
        _, vocab = corpus(work / "tokens", q)
        steps, seq_len, batch = (12, 128, 4) if q else (30, 256, 4)
        preset = "tiny-7m" if q else "tiny-16m"
        base = {"steps": steps, "data.train_tokens": str(work / "tokens"),
                "data.seq_len": seq_len, "data.global_batch": batch, "student.preset": preset,
                "eval.every": 0, "export": False, "progress": False,
                "teacher.spec": {"method": "sample", "unique": 12.0},
                "loss.alpha": {"name": "constant", "value": 0.5}}
        cache = work / "cache"
        proc, address, _ = start_server_process(
            ["--model", "tiny" if q else "default", "--cache-dir", str(cache),
             "--replica-id", "bench",
             "--dtype", "bf16" if torch.cuda.is_available() else "fp32"],  # bf16: slow on CPUs
            work / "server.log")
        try:
            online = train("online", base, {"output_dir": str(work / "online"),
                                            "teacher.source": "online",
                                            "teacher.addresses": [address]})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        offline = train("offline", base, {"output_dir": str(work / "offline"),
                                          "teacher.source": "cache",
                                          "teacher.cache_dir": str(cache)})
        ce = train("ce", base, {"output_dir": str(work / "ce"), "teacher.source": "none"})
        record = train("record", base, {"output_dir": str(work / "record"),
                                        "teacher.source": "none",
                                        "record.cache_dir": str(work / "record_cache")})
        big = None
        if not q:  # what recording is for: the teacher itself (SmolLM2-135M) training on CE
            from logitcast.server.embedded import default_cache_dir

            big_base = {**base, "steps": TEACHER_STEPS, "teacher.source": "none",
                        "student.path": str(default_cache_dir())}
            big = {"runs": []}
            for i, kind in enumerate(TEACHER_ORDER):
                extra = {"output_dir": str(work / f"{kind}_big_{i}")}
                if kind == "record":
                    extra["record.cache_dir"] = str(work / f"record_big_cache_{i}")
                big["runs"].append({"kind": kind, **train(f"{kind} 135m", big_base, extra)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    same = online["losses"] == offline["losses"]
    ratios = {"online_vs_ce": online["tokens_per_s"] / ce["tokens_per_s"],
              "offline_vs_ce": offline["tokens_per_s"] / ce["tokens_per_s"],
              "online_vs_offline": online["tokens_per_s"] / offline["tokens_per_s"],
              "record_vs_ce_student": ce["tokens_per_s"] / record["tokens_per_s"]}
    if big is not None:
        big.update(recording_cost(big["runs"]))
        ratios["record_vs_ce"] = big["record_vs_ce"]
    same_ce = ce["losses"] == record["losses"]
    print(f"online and offline losses identical: {same}; CE and recording losses identical: "
          f"{same_ce}")
    print(f"recording: {record['records']} records, {record['recorded_bytes_per_token']:.1f} "
          f"bytes/token, step time x{ratios['record_vs_ce_student']:.3f} of CE for the "
          f"{preset} student, {record['close_seconds']:.2f}s writing the queue's rest at close")
    if big is not None:
        print(f"recording while SmolLM2-135M itself trains: step time "
              f"x{ratios['record_vs_ce']:.3f} of CE (goal <= 1.05; per ABBA pair "
              f"{', '.join(f'{r:.3f}' for r in big['pair_ratios'])}; median step "
              f"x{big['median_step_ratio']:.3f}); CE and recording losses identical: "
              f"{big['losses_identical']}")
    path = write_results("trainer", {
        "config": {"quick": q, "steps": steps, "seq_len": seq_len, "global_batch": batch,
                   "student": preset, "vocab": vocab, "teacher": "tiny" if q else "default",
                   "spec": "sample unique=12", "warmup_steps_excluded": WARMUP_STEPS},
        "online": online, "offline": offline, "ce": ce, "online_offline_losses_identical": same,
        "record": record, "ce_record_losses_identical": same_ce, "teacher_135m": big,
        **ratios}, suffix="-quick" if q else "")
    print(f"results: {path}")
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
