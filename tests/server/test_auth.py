import json
import socket
import sys
import threading
import urllib.request
from functools import partial

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from logitcast.client.teacher_client import TeacherClient, is_local_target
from logitcast.ops import TargetSpec
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.server.app import SERVICE_NAME
from tests.server.conftest import ServerThread, distill_request

TOKEN = "s3cret"
META = [("authorization", f"Bearer {TOKEN}")]


@pytest.fixture
def guarded(tiny_backend):
    s = ServerThread(tiny_backend, auth_token=TOKEN, host="0.0.0.0")
    yield s
    s.close()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def list_services(channel, metadata=()):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10))
    return [s.name for s in reply.list_services_response.service]


def test_info_and_distill_need_the_exact_token(guarded):
    with grpc.insecure_channel(f"127.0.0.1:{guarded.server.port}") as ch:
        stub = pb_grpc.TeacherStub(ch)
        assert code_of(partial(stub.Info, pb.InfoRequest(), timeout=10)) == \
            grpc.StatusCode.UNAUTHENTICATED
        for bad in ("Bearer wrong", "Bearer s3cre", "s3cret", "", "Bearer s3cret ", "Bearer",
                    "Basic czNjcmV0"):
            call = partial(stub.Info, pb.InfoRequest(), timeout=10,
                           metadata=[("authorization", bad)])
            assert code_of(call) == grpc.StatusCode.UNAUTHENTICATED, bad
        assert stub.Info(pb.InfoRequest(), timeout=10, metadata=META).vocab_size == 1000
        request = distill_request(torch.randint(0, 1000, (2, 16)))
        assert code_of(lambda: list(stub.Distill(request, timeout=10))) == \
            grpc.StatusCode.UNAUTHENTICATED


def test_health_checks_need_no_token(guarded):
    with grpc.insecure_channel(f"127.0.0.1:{guarded.server.port}") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_teacher_with_the_token_and_refuses_without(guarded):
    with grpc.insecure_channel(f"127.0.0.1:{guarded.server.port}") as ch:
        assert "logitcast.v1.Teacher" in list_services(ch, META)
        assert code_of(lambda: list_services(ch)) == grpc.StatusCode.UNAUTHENTICATED


def test_a_refused_stream_ends_before_the_client_sends_anything(guarded):
    """A unary deny handler would wait for a first request (here: until the deadline)."""
    hold = threading.Event()

    def nothing_yet():
        hold.wait(30)
        yield from ()

    with grpc.insecure_channel(f"127.0.0.1:{guarded.server.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        try:
            assert code_of(lambda: next(stub.ServerReflectionInfo(nothing_yet(), timeout=10))) == \
                grpc.StatusCode.UNAUTHENTICATED
        finally:
            hold.set()


def test_unknown_methods_are_refused_without_the_token(guarded):
    with grpc.insecure_channel(f"127.0.0.1:{guarded.server.port}") as ch:
        call = ch.unary_unary("/logitcast.v1.Teacher/Nope")
        assert code_of(lambda: call(b"", timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: call(b"", timeout=10, metadata=META)) == \
            grpc.StatusCode.UNIMPLEMENTED


def client(address, backend, **kwargs):
    return TeacherClient([address], TargetSpec(method="sample", unique=12.0),
                         tokenizer_fingerprint=backend.tokenizer_fingerprint,
                         vocab_size=backend.vocab_size, auth_token=TOKEN, **kwargs)


def test_client_refuses_a_token_in_the_clear_to_another_machine(tiny_backend):
    with pytest.raises(ValueError, match=r"10\.1\.2\.3:50051.*tls_root_certs.*allow_insecure_auth"):
        client("10.1.2.3:50051", tiny_backend)


def test_client_sends_the_token_in_the_clear_when_allowed_or_local(guarded, tiny_backend):
    # 0.0.0.0 is no loopback address, yet on Linux it reaches this machine's server
    wide = f"0.0.0.0:{guarded.server.port}"
    with pytest.raises(ValueError, match="allow_insecure_auth"):
        client(wide, tiny_backend)
    for address, kwargs in ((wide, {"allow_insecure_auth": True}),
                            (f"127.0.0.1:{guarded.server.port}", {}),
                            (f"localhost:{guarded.server.port}", {})):
        with client(address, tiny_backend, **kwargs) as c:
            assert c.teacher_id == tiny_backend.teacher_id


@pytest.mark.parametrize("address", [
    "127.0.0.1:1", "127.9.0.1:1", "localhost:50051", "LocalHost", "[::1]:50051", "::1",
    "unix:/tmp/teacher.sock", "unix-abstract:teacher", "ipv4:127.0.0.1:1,127.0.0.2:2",
    "ipv6:[::1]:1", "dns:///localhost:50051", "dns:localhost:1"])
def test_loopback_and_unix_targets_are_local(address):
    assert is_local_target(address)


@pytest.mark.parametrize("address", [
    "10.1.2.3:50051", "0.0.0.0:1", "teacher.example.com:443", "[2001:db8::1]:1",
    "ipv4:127.0.0.1:1,10.0.0.1:2", "dns:///teacher:1", "localhost.example.com:1"])
def test_other_targets_are_not_local(address):
    assert not is_local_target(address)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs all of 127/8 on lo")
def test_metrics_bind_to_the_metrics_host_and_register_it(tiny_backend, tmp_path):
    s = ServerThread(tiny_backend, host="0.0.0.0", metrics_port=0, metrics_host="127.0.0.1",
                     metrics_sd_dir=tmp_path)
    try:
        port = s.server.metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b"logitcast_teacher_" in text
        # 127.0.0.2 reaches whatever listens on 0.0.0.0 (the gRPC port), not /metrics
        socket.create_connection(("127.0.0.2", s.server.port), timeout=5).close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=5)
        [entry] = json.loads((tmp_path / f"teacher-{s.server.replica_id}.json").read_text())
        assert entry["targets"] == [f"127.0.0.1:{port}"]
    finally:
        s.close()


@pytest.mark.slow
def test_serve_binds_metrics_to_metrics_host(tmp_path):
    from logitcast.cli.serve import start_server_process
    from logitcast.server.fleet import free_port

    port = free_port()
    proc, _, _ = start_server_process(
        ["--model", "tiny", "--host", "0.0.0.0", "--metrics-port", str(port),
         "--metrics-host", "127.0.0.1", "--metrics-sd-dir", str(tmp_path)],
        tmp_path / "serve.log", timeout_s=120)
    try:
        [registered] = tmp_path.glob("teacher-*.json")  # named after the unique replica id
        [entry] = json.loads(registered.read_text())
        assert entry["targets"] == [f"127.0.0.1:{port}"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b"logitcast_teacher_" in text
    finally:
        proc.kill()
        proc.wait(timeout=30)
