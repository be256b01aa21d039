import asyncio
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch

from logitcast.ops import TargetSpec
from logitcast.ops.codec import VERSION
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.protos.convert import rows_to_proto, spec_to_proto
from logitcast.server.app import TeacherServer


def stop_process(proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """SIGTERM (a server or fleet drains), then SIGKILL if it has not exited in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_fleet(args: list[str], log, *, timeout_s: float = 240) -> subprocess.Popen:
    """`logitcast fleet up ARGS` in a child process, returned once it prints `fleet up:`
    (bounded by timeout_s); the test fails with the log's tail if it exits or never does."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "logitcast.cli.main", "fleet", "up", *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout_s
    while "fleet up:" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            pytest.fail(f"fleet did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc


class ServerThread:
    """A real TeacherServer on 127.0.0.1, in its own event loop thread."""

    def __init__(self, backend, **kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.call(TeacherServer.start(backend, port=0, **kwargs))
        self.address = self.server.address

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def server(tiny_backend):
    s = ServerThread(tiny_backend, metrics_port=0)
    yield s
    s.close()


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.TeacherStub(channel)


def rpc_error(fn) -> tuple[grpc.StatusCode, str]:
    """(code, details) of the RpcError `fn()` must raise."""
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def distill_request(tokens: torch.Tensor, spec: TargetSpec | None = None,
                    **fields) -> pb.DistillRequest:
    fields.setdefault("codec_version", VERSION)
    return pb.DistillRequest(rows=rows_to_proto(tokens), spec=spec_to_proto(spec or TargetSpec()),
                             **fields)


class FaultyBackend:
    """The real tiny teacher with injected failures, for the kills and faults a device
    produces: NaN hidden states wherever `poison` appears in the input, an out-of-memory
    error on batches over `oom_above` tokens, and a gate that holds the forward pass."""

    def __init__(self, inner, *, poison: int | None = None, oom_above: int | None = None,
                 gate: threading.Event | None = None) -> None:
        self.inner, self.poison, self.oom_above, self.gate = inner, poison, oom_above, gate
        for name in ("tokenizer_fingerprint", "vocab_size", "max_seq_len", "device",
                     "supports_documents", "batch_invariant", "name"):
            setattr(self, name, getattr(inner, name))
        self.teacher_id = inner.teacher_id
        self.forward_tokens: list[int] = []
        self.entered = threading.Event()  # set once a forward pass has begun (before the gate)

    def hidden_states(self, tokens, document_ids=None):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        self.forward_tokens.append(tokens.numel())
        if self.oom_above is not None and tokens.numel() > self.oom_above:
            raise torch.OutOfMemoryError(f"injected: {tokens.numel()} tokens")
        hidden = self.inner.hidden_states(tokens, document_ids)
        if self.poison is not None:
            hidden = hidden.clone()
            hidden[tokens == self.poison] = float("nan")
        return hidden

    def logits(self, hidden):
        return self.inner.logits(hidden)
