import asyncio
import logging
import time

import pytest

from logitcast.cache import CacheNamespace, CacheReader, CacheWriter, WriterIdInUseError
from logitcast.ops import TargetSpec
from logitcast.server.app import TeacherServer
from logitcast.server.metrics import TeacherMetrics
from logitcast.server.tee import CacheTee
from tests.server.conftest import ServerThread

NS = CacheNamespace(teacher_id="t", tokenizer_fingerprint="fp", spec=TargetSpec())


def test_a_second_tee_with_the_same_writer_id_fails_at_once_until_the_first_closes(tmp_path):
    first = CacheTee(tmp_path, writer_id="r0", metrics=TeacherMetrics())
    with pytest.raises(WriterIdInUseError, match="writer id 'r0'"):
        CacheTee(tmp_path, writer_id="r0", metrics=TeacherMetrics())
    CacheTee(tmp_path, writer_id="r1", metrics=TeacherMetrics()).close()
    first.close()
    CacheTee(tmp_path, writer_id="r0", metrics=TeacherMetrics()).close()


def test_a_writer_id_that_is_not_a_cache_writer_id_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'r-0'"):
        CacheTee(tmp_path, writer_id="r-0", metrics=TeacherMetrics())


def test_a_second_server_with_the_same_replica_id_and_cache_fails_before_serving(
        tiny_backend, tmp_path):
    first = ServerThread(tiny_backend, cache_dir=tmp_path / "cache", replica_id="r0")
    try:
        with pytest.raises(WriterIdInUseError, match="'r0'"):
            asyncio.run(TeacherServer.start(tiny_backend, port=0, cache_dir=tmp_path / "cache",
                                            replica_id="r0"))
    finally:
        first.close()
    again = ServerThread(tiny_backend, cache_dir=str(tmp_path / "cache"), replica_id="r0")
    again.close()


def test_servers_without_a_replica_id_get_unique_ones(tiny_backend, tmp_path):
    a = ServerThread(tiny_backend, cache_dir=tmp_path / "cache")
    b = ServerThread(tiny_backend, cache_dir=tmp_path / "cache")
    try:
        assert a.server.replica_id != b.server.replica_id
        assert a.server.replica_id.startswith("r_")
    finally:
        a.close()
        b.close()


def test_a_namespace_whose_writer_id_another_writer_holds_counts_errors_then_resumes(
        tmp_path, caplog):
    metrics = TeacherMetrics()
    tee = CacheTee(tmp_path, writer_id="r0", metrics=metrics)
    try:
        with CacheWriter(tmp_path, NS, writer_id="r0"):  # e.g. a client given the same id
            tee.submit(NS, b"a" * 16, b"first")
            for _ in range(500):  # the tee's thread tries to open its writer
                if metrics.cache_write_errors._value.get():
                    break
                time.sleep(0.01)
        tee.submit(NS, b"b" * 16, b"second")
    finally:
        tee.close()
    assert metrics.cache_write_errors._value.get() == 1
    assert metrics.cache_records._value.get() == 1
    errors = [r for r in caplog.records
              if r.name == "logitcast.server.tee" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "writer id r0" in errors[0].getMessage()
    reader = CacheReader(tmp_path, NS)
    try:
        assert reader.get(b"b" * 16) == b"second"
        assert reader.get(b"a" * 16) is None
    finally:
        reader.close()


def test_a_server_that_fails_to_start_gives_its_writer_id_back(tiny_backend, tmp_path):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(RuntimeError):  # the port is taken: no server
            asyncio.run(TeacherServer.start(tiny_backend, port=taken.getsockname()[1],
                                            cache_dir=tmp_path / "cache", replica_id="r0"))
    finally:
        taken.close()
    again = ServerThread(tiny_backend, cache_dir=tmp_path / "cache", replica_id="r0")
    again.close()
