"""Streaming benchmark: does a student wait on the teacher fleet?

A student loop with a fixed compute time per step (a sleep of 1.5x the teacher's
own time per step, so teacher capacity is above demand; the CPU stays free for
the teacher, as a GPU student would leave it) is fed
(a) online: a TeacherClient with prefetch, from a TeacherServer on loopback;
(b) offline: the same steps' targets, precomputed and held in memory.
Reports the fraction of wall time the online loop waited on targets (the first
step, which no prefetch can hide, reported separately) and steps/s online ÷
offline, with teacher capacity above demand.

    python bench/stream.py [--quick]

Last line: RESULT stall_fraction=.. online_vs_offline=..
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_corpus, write_results

from logitcast.client.teacher_client import TeacherClient
from logitcast.data.packing import Packer, PackingConfig
from logitcast.data.shards import ShardWriter, TokenCorpus
from logitcast.ops import TargetSpec
from logitcast.server.app import TeacherServer
from logitcast.server.backends import TransformersBackend

#: Teacher capacity over demand: the simulated student step lasts this many times the
#: time the teacher needs for one step alone.
CAPACITY = 1.5


def build_corpus(directory: Path, backend, quick: bool) -> TokenCorpus:
    from logitcast.data.corpus import stdlib_documents

    if quick:
        random_corpus(directory, backend.tokenizer_fingerprint, backend.vocab_size, docs=200)
    else:
        from logitcast.server.embedded import load_embedded_teacher

        _, tok = load_embedded_teacher()
        w = ShardWriter(directory, backend.tokenizer_fingerprint, backend.vocab_size,
                        tok.eos_token_id)
        for i, doc in enumerate(stdlib_documents(max_chars=400_000)):
            w.add(tok(doc, add_special_tokens=False)["input_ids"])
            w.commit_source(str(i))
        w.flush()
    return TokenCorpus(directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny teacher, <= 60 s on 2 cores")
    args = ap.parse_args()
    if args.quick:
        backend = TransformersBackend.tiny_random(vocab_size=4096, hidden=128, layers=4)
        steps, seq, batch = 40, 256, 4
    else:
        backend = TransformersBackend.from_pretrained("default", dtype="bf16")
        steps, seq, batch = 30, 256, 4
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="logitcast-bench-stream-"))
    packer = Packer(build_corpus(tmp / "tokens", backend, args.quick),
                    PackingConfig(seq_len=seq, global_batch=batch, seed=0))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = asyncio.run_coroutine_threadsafe(TeacherServer.start(backend, port=0), loop).result(120)
    spec = TargetSpec(method="sample", unique=12.0)
    client = TeacherClient([server.address], spec, prefetch=4,
                           tokenizer_fingerprint=backend.tokenizer_fingerprint,
                           vocab_size=backend.vocab_size)

    # teacher capacity: time to serve one step, measured alone
    t0 = time.perf_counter()
    for s in range(3):
        client.fetch(packer.batch(10_000 + s))
    teacher_step_s = (time.perf_counter() - t0) / 3
    step_s = CAPACITY * teacher_step_s  # the student's compute per step: demand < capacity

    # (b) offline: targets precomputed in memory, then the same loop
    offline_targets = [client.fetch(packer.batch(s)).targets for s in range(steps)]
    t0 = time.perf_counter()
    for _targets in offline_targets:
        time.sleep(step_s)
    offline_s = time.perf_counter() - t0

    # (a) online with prefetch (steps the server has not seen: a fresh seed)
    online_packer = Packer(packer.corpus, PackingConfig(seq_len=seq, global_batch=batch, seed=1))
    waits = []
    t0 = time.perf_counter()
    gen = client.stream(online_packer.batch(s) for s in range(steps))
    while True:
        w0 = time.perf_counter()
        item = next(gen, None)
        waits.append(time.perf_counter() - w0)
        if item is None:
            break
        time.sleep(step_s)
    online_s = time.perf_counter() - t0
    client.close()
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)

    first_wait, steady_wait = waits[0], sum(waits[1:])
    stall = steady_wait / (online_s - first_wait)
    ratio = (steps / online_s) / (steps / offline_s)
    print(f"teacher: {teacher_step_s * 1000:.0f} ms per step alone; student step {step_s * 1000:.0f} ms "
          f"(capacity x{step_s / teacher_step_s:.1f} demand)")
    print(f"online: {steps / online_s:.2f} steps/s, waited {first_wait:.2f}s for the first step "
          f"and {steady_wait:.2f}s over the rest (stall {stall:.3%}); offline "
          f"{steps / offline_s:.2f} steps/s; online/offline x{ratio:.3f}")
    result = {"stall_fraction": round(stall, 4), "online_vs_offline": round(ratio, 3)}
    path = write_results("stream", {
        "quick": args.quick, "teacher": backend.teacher_id, "steps": steps,
        "student_step_s": step_s, "rows_per_step": batch, "seq_len": seq,
        "teacher_step_s": teacher_step_s, "online_s": online_s, "offline_s": offline_s,
        "first_step_wait_s": first_wait, "steady_wait_s": steady_wait,
        "stall_fraction_including_first_step": sum(waits) / online_s,
        "note": "stall_fraction excludes the first step's wait (no prefetch can hide it); "
                "the value including it is stall_fraction_including_first_step",
        "result": result}, suffix="-quick" if args.quick else "")
    print(f"wrote {path}")
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
