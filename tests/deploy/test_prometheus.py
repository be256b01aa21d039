"""A real Prometheus, configured like deploy/prometheus.yml with the shipped rules, scrapes
a real teacher server under Distill traffic and a trainer rank's metrics endpoint found
through file_sd, and every recording rule yields series."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client import start_http_server

from logitcast.cli.main import main
from logitcast.cli.top import TopError, query
from logitcast.client.teacher_client import MemoryTargetCache, TeacherClient
from logitcast.data.packing import Packer, PackingConfig
from logitcast.ops import TargetSpec
from logitcast.server.fleet import free_port
from logitcast.trainer.metrics import TrainerMetrics
from tests.data.conftest import write_corpus
from tests.server.conftest import ServerThread

PROMETHEUS = shutil.which("prometheus")
RULES = Path(__file__).resolve().parents[2] / "deploy" / "rules" / "logitcast.rules.yml"
SPEC = TargetSpec(method="sample", unique=12.0)
SEQ_LEN, ROWS = 32, 2
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian "
                                                            "package `prometheus`; `make system-deps`)")]


def recording_rules() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["record"] for g in groups for r in g["rules"] if "record" in r]


def write_sd(sd_dir: Path, name: str, port: int, labels: dict[str, str]) -> None:
    """The file_sd convention of docs/monitoring.md."""
    (sd_dir / f"{name}.json").write_text(
        json.dumps([{"targets": [f"127.0.0.1:{port}"], "labels": labels}]))


def prometheus_config(sd_dir: Path) -> dict:
    def job(name: str, pattern: str) -> dict:
        return {"job_name": name, "file_sd_configs": [
            {"files": [str(sd_dir / pattern)], "refresh_interval": "1s"}]}

    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [job("logitcast-teacher", "teacher-*.json"),
                               job("logitcast-trainer", "trainer-*.json")]}


class StudentStandIn(threading.Thread):
    """Streams Distill targets for packed batches (every third step a repeat, served by the
    cache) and updates a trainer rank's metrics as a real trainer would; bounded."""

    def __init__(self, client: TeacherClient, packer: Packer, metrics: TrainerMetrics,
                 max_steps: int = 20_000) -> None:
        super().__init__(daemon=True)
        self.client, self.packer, self.metrics = client, packer, metrics
        self.max_steps, self.stop, self.errors = max_steps, threading.Event(), []

    def batches(self) -> Iterator:
        for i in range(self.max_steps):
            if self.stop.is_set():
                return
            yield self.packer.batch(i - 1 if i % 3 == 2 else i)

    def run(self) -> None:
        m = self.metrics
        try:
            t0 = time.perf_counter()
            for step, _ in enumerate(self.client.stream(self.batches())):
                time.sleep(0.02)  # the student's own compute
                m.tokens.inc(ROWS * SEQ_LEN)
                m.steps.inc()
                m.step.set(step + 1)
                m.loss.labels("total").set(5.0)
                m.alpha.set(0.5)
                m.lr.set(1e-3)
                now = time.perf_counter()
                m.step_seconds.inc(now - t0)
                t0 = now
        except Exception as exc:  # reported by the tests
            self.errors.append(exc)


@dataclass
class Monitored:
    base: str
    student: StudentStandIn
    log: Path


def wait_ready(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
        try:
            query(base, "vector(1)", timeout=2)
            return
        except TopError:
            time.sleep(0.25)
    pytest.fail(f"prometheus not ready in 60 s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def monitored(tiny_backend, tmp_path_factory) -> Iterator[Monitored]:
    tmp = tmp_path_factory.mktemp("prometheus")
    sd_dir = tmp / "sd"
    sd_dir.mkdir()
    server = ServerThread(tiny_backend, metrics_port=0)
    trainer = TrainerMetrics()
    trainer_http, _ = start_http_server(0, addr="127.0.0.1", registry=trainer.registry)
    client = proc = None
    student = None
    try:
        write_sd(sd_dir, "teacher-r0", server.server.metrics_port, {"replica": "r0"})
        write_sd(sd_dir, "trainer-0", trainer_http.server_port, {"rank": "0"})
        corpus = write_corpus(tmp / "tokens", fingerprint=tiny_backend.tokenizer_fingerprint)
        client = TeacherClient([server.address], SPEC,
                               tokenizer_fingerprint=tiny_backend.tokenizer_fingerprint,
                               vocab_size=tiny_backend.vocab_size, cache=MemoryTargetCache(),
                               prefetch=1, backoff_s=0.01, metrics=trainer.client)
        student = StudentStandIn(client, Packer(corpus, PackingConfig(seq_len=SEQ_LEN,
                                                                      global_batch=ROWS)), trainer)
        student.start()
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(sd_dir), sort_keys=False))
        port, log = free_port(), tmp / "prometheus.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, log)
        yield Monitored(base, student, log)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if student is not None:
            student.stop.set()
            student.join(timeout=60)
        if client is not None:
            client.close()
        trainer_http.shutdown()
        trainer_http.server_close()
        server.close()


def poll(base: str, expr: str, done, seconds: float = 90.0) -> list:
    """Query `expr` until done(result) (bounded); returns the last result."""
    deadline, result = time.monotonic() + seconds, []
    while time.monotonic() < deadline:
        result = query(base, expr, timeout=5)
        if done(result):
            break
        time.sleep(0.5)
    return result


def test_prometheus_finds_and_scrapes_the_teacher_replica_and_the_trainer_rank(monitored):
    def both_up(result: list) -> bool:
        up = {(labels["job"], labels.get("replica", labels.get("rank")))
              for labels, value in result if value == 1}
        return up == {("logitcast-teacher", "r0"), ("logitcast-trainer", "0")}

    result = poll(monitored.base, "up", both_up)
    assert both_up(result), result


def test_every_recording_rule_yields_series_and_fleet_tokens_per_second_is_positive(monitored):
    pending, fleet_max = set(recording_rules()), 0.0
    deadline = time.monotonic() + 90
    while (pending or fleet_max <= 0) and time.monotonic() < deadline:
        for record in sorted(pending):
            if query(monitored.base, record, timeout=5):
                pending.discard(record)
        fleet = query(monitored.base, "logitcast:fleet_tokens_per_second:rate1m", timeout=5)
        fleet_max = max([fleet_max] + [v for _, v in fleet if not math.isnan(v)])
        time.sleep(0.5)
    assert not monitored.student.errors
    assert monitored.student.is_alive(), "traffic ended before the rules were checked"
    assert pending == set(), f"rules with no series: {pending}\n{monitored.log.read_text()[-2000:]}"
    assert fleet_max > 0
    replicas = query(monitored.base, "logitcast:replica_tokens_per_second:rate1m", timeout=5)
    stalls = query(monitored.base, "logitcast:trainer_stall_ratio:rate1m", timeout=5)
    assert [labels["replica"] for labels, _ in replicas] == ["r0"]
    assert [labels["rank"] for labels, _ in stalls] == ["0"]


def test_top_shows_the_replica_and_rank_from_the_recording_rules(monitored, capsys):
    poll(monitored.base, "logitcast:trainer_stall_ratio:rate1m", bool)
    poll(monitored.base, "logitcast:fleet_tokens_per_second:rate1m",
         lambda r: bool(r) and r[0][1] > 0)
    assert main(["top", "--prometheus", monitored.base, "--iterations", "1",
                 "--interval", "0"]) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert float(rows["r0"][0].replace(",", "")) > 0
    assert rows["0"][1].endswith("%")
