"""`logitcast demo`: the pipeline end to end on this machine, with the real teacher.

1. tokenize a slice of the Python standard library source (the default corpus);
2. start a teacher server with the embedded SmolLM2-135M on loopback, teeing
   every target into a cache;
3. stream RS-12 targets for packed batches to a client with prefetch;
4. read the same rows back from the cache with no teacher (an offline student,
   with another batch size) and check the targets are byte-identical;
5. print what it cost: tokens/s, bytes per token, cache size.
(The student trainer joins this demo when `logitcast.trainer` lands.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, default=Path(".cache/demo"))
    p.add_argument("--files", type=int, default=40, help="stdlib source files to tokenize")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import shutil
    import threading

    from logitcast.cache import CacheNamespace
    from logitcast.cli.tokenize import load_tokenizer
    from logitcast.client.corpus import stdlib_source_files
    from logitcast.client.offline import CacheSource
    from logitcast.client.packing import Packer, PackingConfig
    from logitcast.client.shards import TokenCorpus
    from logitcast.client.teacher_client import TeacherClient
    from logitcast.client.tokenize import tokenize_sources
    from logitcast.ops import TargetSpec
    from logitcast.ops.codec import encode
    from logitcast.server.app import TeacherServer
    from logitcast.server.backends import TransformersBackend

    work = args.workdir
    shutil.rmtree(work / "cache", ignore_errors=True)
    t0 = time.perf_counter()
    tok, fingerprint, vocab = load_tokenizer("default")
    tokenize_sources(stdlib_source_files()[: args.files], work / "tokens", tok, fingerprint,
                     vocab_size=vocab)
    corpus = TokenCorpus(work / "tokens", tokenizer_fingerprint=fingerprint)
    print(f"[1] corpus: {corpus.num_documents} stdlib files, {corpus.num_tokens} tokens")

    backend = TransformersBackend.from_pretrained("default", dtype="bf16")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server = asyncio.run_coroutine_threadsafe(
        TeacherServer.start(backend, port=0, cache_dir=work / "cache", replica_id="demo"),
        loop).result(300)
    print(f"[2] teacher {backend.teacher_id} serving on {server.address}, teeing to "
          f"{work / 'cache'}")

    spec = TargetSpec(method="sample", unique=12.0)
    packer = Packer(corpus, PackingConfig(seq_len=args.seq_len, global_batch=args.batch))
    online = []
    t1 = time.perf_counter()
    with TeacherClient([server.address], spec, tokenizer_fingerprint=fingerprint,
                       vocab_size=vocab, prefetch=2) as client:
        for item in client.stream(packer.batch(s) for s in range(args.steps)):
            online.append(item.targets)
            t = item.targets
            print(f"    step {item.batch.step}: {len(t)} positions, "
                  f"{float(t.num_entries.float().mean()):.1f} tokens/position, teacher NLL "
                  f"{float(-t.logprob.nanmean()):.2f} nats")
        received = client.metrics.received_bytes._value.get()
    online_s = time.perf_counter() - t1
    tokens = args.steps * args.batch * args.seq_len
    print(f"[3] online: {tokens} tokens in {online_s:.1f}s ({tokens / online_s:.0f} tok/s), "
          f"{received / tokens:.1f} bytes/token on the wire")
    asyncio.run_coroutine_threadsafe(server.drain(5.0), loop).result(120)

    ns = CacheNamespace(teacher_id=backend.teacher_id, tokenizer_fingerprint=fingerprint,
                        spec=spec)
    half = Packer(corpus, PackingConfig(seq_len=args.seq_len, global_batch=args.batch // 2))
    with CacheSource(work / "cache", ns) as source:
        offline = [s.targets for s in source.stream(half.batch(i) for i in range(2 * args.steps))]
    same = all(
        encode(online[s][r * args.seq_len:(r + 1) * args.seq_len])
        == encode(offline[(s * args.batch + r) // (args.batch // 2)][
            ((s * args.batch + r) % (args.batch // 2)) * args.seq_len:][:args.seq_len])
        for s in range(args.steps) for r in range(args.batch))
    size = sum(f.stat().st_size for f in (work / "cache").rglob("*") if f.is_file())
    print(f"[4] offline student (batch {args.batch // 2}) read the same rows from the cache: "
          f"targets byte-identical: {same}; cache {size / tokens:.1f} bytes/token")
    print(f"[5] done in {time.perf_counter() - t0:.0f}s")
    return 0 if same else 1
