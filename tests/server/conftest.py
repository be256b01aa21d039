import asyncio
import threading

import grpc
import pytest
import torch

from logitcast.ops import TargetSpec
from logitcast.ops.codec import VERSION
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.protos.convert import rows_to_proto, spec_to_proto
from logitcast.server.app import TeacherServer


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


def distill_request(tokens: torch.Tensor, spec: TargetSpec | None = None, *, keys=None,
                    **fields) -> pb.DistillRequest:
    if keys is None:
        keys = [1000 + 17 * i for i in range(tokens.shape[0])]
    fields.setdefault("codec_version", VERSION)
    return pb.DistillRequest(rows=rows_to_proto(tokens), row_keys=keys, spec=spec_to_proto(spec or TargetSpec()),
                             **fields)
