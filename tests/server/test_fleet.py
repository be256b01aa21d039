"""The fleet for real: `logitcast fleet up` (Ray Serve, its gRPC proxy, 2 replicas)."""

import json
import signal
import urllib.request

import grpc
import pytest
import torch

from logitcast.cache import CacheNamespace
from logitcast.client.offline import CacheSource
from logitcast.client.teacher_client import TeacherClient
from logitcast.data.packing import Packer, PackingConfig
from logitcast.ops import TargetSpec
from logitcast.ops.codec import encode
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.server.fleet import free_port
from tests.data.conftest import write_corpus
from tests.server.conftest import ServerThread, distill_request, start_fleet, stop_process

pytestmark = pytest.mark.slow

SPEC = TargetSpec(method="sample", unique=12.0)


@pytest.fixture
def fleet(tmp_path):
    """`logitcast fleet up` in a child process; yields (address, log path)."""
    port = free_port()
    log = tmp_path / "fleet.log"
    proc = start_fleet(["--model", "tiny", "--replicas", "2", "--threads", "1", "--num-cpus", "2",
                        "--grpc-port", str(port), "--http-port", str(free_port()),
                        "--cache-dir", str(tmp_path / "cache"),
                        "--metrics-sd-dir", str(tmp_path / "sd")], log)
    try:
        yield proc, f"127.0.0.1:{port}", log
    finally:
        stop_process(proc)


def test_fleet_serves_the_same_bytes_as_one_server_keeps_status_codes_and_tees(
        fleet, tmp_path):
    from logitcast.server.backends import TransformersBackend

    proc, address, log = fleet
    assert "2 replica(s) of tiny-random-v1024" in log.read_text()
    direct_backend = TransformersBackend.tiny_random()  # what `--model tiny` loads
    corpus = write_corpus(tmp_path / "tokens", vocab=1024,
                          fingerprint=direct_backend.tokenizer_fingerprint)
    packer = Packer(corpus, PackingConfig(seq_len=64, global_batch=4))
    batches = [packer.batch(s) for s in range(6)]
    kwargs = {"tokenizer_fingerprint": direct_backend.tokenizer_fingerprint, "vocab_size": 1024,
              "prefetch": 3}

    # The same client, its address swapped for the proxy's: byte-identical targets.
    direct = ServerThread(direct_backend)
    try:
        with TeacherClient([direct.address], SPEC, **kwargs) as c:
            want = [encode(t.targets) for t in c.stream(batches)]
    finally:
        direct.close()
    with TeacherClient([address], SPEC, application="logitcast", **kwargs) as c:
        got = [encode(t.targets) for t in c.stream(batches)]
        assert c.teacher_id == direct_backend.teacher_id
    assert got == want

    # Errors cross the proxy with their status codes.
    meta = [("application", "logitcast")]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TeacherStub(channel)
        bad = [(distill_request(torch.tensor([[5, 5000]])), grpc.StatusCode.INVALID_ARGUMENT),
               (distill_request(torch.tensor([[5, 6]]), codec_version=99),
                grpc.StatusCode.FAILED_PRECONDITION),
               (distill_request(torch.tensor([[5, 6]]), teacher_id="llama"),
                grpc.StatusCode.NOT_FOUND)]
        for request, code in bad:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Distill(request, metadata=meta, timeout=60))
            assert err.value.code() == code

    # Every replica registered its /metrics for Prometheus, and counts what it served.
    targets = [json.loads(p.read_text())[0] for p in sorted((tmp_path / "sd").glob("*.json"))]
    assert len(targets) == 2
    assert {t["labels"]["replica"] for t in targets} != {""}
    served = 0.0
    for t in targets:
        body = urllib.request.urlopen(f"http://{t['targets'][0]}/metrics", timeout=10).read()
        for line in body.decode().splitlines():
            if line.startswith("logitcast_teacher_tokens_total "):
                served += float(line.split()[1])
    assert served == 6 * 4 * 64

    # Stopping drains the replicas: their tee shards are sealed and deregistered,
    # and a student reads every row back from the cache with no teacher.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert not list((tmp_path / "sd").glob("*.json"))
    ns = CacheNamespace(teacher_id=direct_backend.teacher_id,
                        tokenizer_fingerprint=direct_backend.tokenizer_fingerprint, spec=SPEC)
    shards = {p.name.split("-")[0] for p in (tmp_path / "cache" / ns.name).glob("*.shard")}
    assert shards
    assert all(s.startswith("ray_") for s in shards)
    with CacheSource(tmp_path / "cache", ns) as source:
        assert [encode(t.targets) for t in source.stream(batches)] == want
