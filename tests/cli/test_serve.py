import os
import signal
import socket
import subprocess
import sys

import grpc
import pytest

from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_answers_then_drains_and_exits_cleanly_on_sigterm():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "logitcast.cli.main", "serve", "--model", "tiny",
         "--port", str(port), "--drain-grace-s", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            info = pb_grpc.TeacherStub(ch).Info(pb.InfoRequest(), timeout=10)
            assert info.teacher_id.startswith("tiny-random")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "draining" in out
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logitcast.cli.main", "serve", "--model", "tiny",
                           "--port", str(free_port()), *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))


@pytest.mark.slow
def test_a_second_server_with_the_same_replica_id_and_cache_exits_at_startup(tmp_path):
    from logitcast.cli.serve import start_server_process

    cache = ["--cache-dir", str(tmp_path / "cache"), "--replica-id", "r0", "--drain-grace-s", "5"]
    first, _, _ = start_server_process(["--model", "tiny", *cache], tmp_path / "first.log")
    try:
        second = serve(*cache)
        assert second.returncode == 1
        assert "logitcast serve: cache writer id 'r0' is in use" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0


@pytest.mark.slow
def test_a_replica_id_that_is_not_a_cache_writer_id_is_refused(tmp_path):
    bad = serve("--cache-dir", str(tmp_path / "cache"), "--replica-id", "r-0")
    assert bad.returncode == 1
    assert "logitcast serve: --replica-id: writer_id must be" in bad.stderr
    assert "Traceback" not in bad.stderr
