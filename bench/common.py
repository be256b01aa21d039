"""Shared bits of the benchmarks: machine/version facts and result writing."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    versions = {}
    for pkg in ("torch", "numpy", "transformers", "logitcast"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return info


def random_corpus(directory: Path, fingerprint: str, vocab: int, *, docs: int,
                  seed: int = 0) -> None:
    """Token shards of `docs` random documents (50-400 tokens, ids >= 2, EOS id 1):
    what the quick benchmarks feed a random-init teacher."""
    import numpy as np

    from logitcast.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    w = ShardWriter(directory, fingerprint, vocab, 1)
    for i in range(docs):
        w.add(rng.integers(2, vocab, size=int(rng.integers(50, 400))))
        w.commit_source(str(i))
    w.flush()


def write_results(name: str, payload: dict, *, suffix: str = "") -> Path:
    """bench/results/<name><suffix>.json, with the machine facts added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{suffix}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, sort_keys=False) + "\n")
    return path


def timed(fn, *, repeat: int = 1):
    """(result of the last call, best seconds over `repeat` calls)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best
