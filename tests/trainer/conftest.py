import json
import os
import subprocess
import sys

import pytest

from logitcast.server.fleet import free_port
from tests.data.conftest import write_corpus
from tests.server.conftest import ServerThread


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, tiny_backend):
    root = tmp_path_factory.mktemp("corpora")
    fp = tiny_backend.tokenizer_fingerprint
    return (write_corpus(root / "train", fingerprint=fp, docs=80),
            write_corpus(root / "heldout", fingerprint=fp, docs=20, seed=1))


@pytest.fixture
def teacher(tiny_backend, tmp_path):
    """A real tiny-teacher server on loopback, teeing into tmp_path/cache."""
    server = ServerThread(tiny_backend, cache_dir=tmp_path / "cache", replica_id="r0")
    yield server
    server.close()


def run_config(corpora, out, **overrides) -> list[str]:
    """--set overrides of a small, fast run of the micro student."""
    train, heldout = corpora
    base = {"output_dir": str(out), "steps": 4, "progress": False,
            "data.train_tokens": str(train.directory), "data.eval_tokens": str(heldout.directory),
            "data.seq_len": 32, "data.global_batch": 4, "student.preset": "micro",
            "eval.every": 2, "eval.rows": 4, "optim.lr": {"name": "cosine", "peak": 3e-3,
                                                          "warmup_steps": 1, "floor": 3e-4}}
    base.update(overrides)
    return [f"{k}={json.dumps(v)}" for k, v in base.items()]


def torchrun(overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    port = free_port()  # torchrun's static rendezvous needs a real port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "logitcast.cli.main",
           "train", *[a for o in overrides for a in ("--set", o)]]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
