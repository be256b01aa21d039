import math
import threading
import time

import pytest
from prometheus_client import generate_latest, start_http_server

from logitcast.cli.main import main
from logitcast.cli.top import (
    FleetView,
    ReplicaRow,
    Scrape,
    TrainerRow,
    format_view,
    parse_metrics,
    view_from_queries,
    view_from_scrapes,
)
from logitcast.client.teacher_client import TeacherClient
from logitcast.data.packing import Packer, PackingConfig
from logitcast.ops import TargetSpec
from logitcast.server.fleet import free_port
from logitcast.server.metrics import TeacherMetrics
from logitcast.trainer.metrics import TrainerMetrics
from tests.server.conftest import ServerThread


def teacher(t: float, tokens: float, queue: float = 0, inflight: float = 0) -> Scrape:
    return Scrape(t, {"logitcast_teacher_tokens_total": tokens,
                      "logitcast_teacher_queue_tokens": queue,
                      "logitcast_teacher_inflight_requests": inflight})


def trainer(t: float, tokens: float, step_s: float, wait_s: float, hits: float,
            misses: float) -> Scrape:
    return Scrape(t, {"logitcast_trainer_tokens_total": tokens,
                      "logitcast_trainer_step_seconds_total": step_s,
                      "logitcast_client_wait_seconds_total": wait_s,
                      "logitcast_client_cache_hits_total": hits,
                      "logitcast_client_cache_misses_total": misses})


# ---------------------------------------------------------------- pure parts

def test_rates_are_counter_deltas_over_the_seconds_between_two_scrapes():
    prev = {"a:1": teacher(10.0, 100), "b:1": teacher(10.0, 0),
            "n:1": trainer(10.0, 1000, 2.0, 0.5, 10, 0)}
    cur = {"a:1": teacher(12.0, 500, queue=64, inflight=3), "b:1": teacher(12.0, 100),
           "n:1": trainer(12.0, 1400, 4.0, 1.0, 16, 2)}
    view = view_from_scrapes(prev, cur)
    assert view.replicas == [ReplicaRow("a:1", 200.0, 64, 3), ReplicaRow("b:1", 50.0, 0, 0)]
    assert view.fleet_tokens_per_second == 250.0
    assert view.trainers == [TrainerRow("n:1", 200.0, 0.25)]
    assert view.cache_hit_ratio == 0.75
    assert view.down == []


def test_a_counter_that_drops_counts_as_restarted_from_zero():
    view = view_from_scrapes({"a:1": teacher(0.0, 900)}, {"a:1": teacher(2.0, 40)})
    assert view.replicas[0].tokens_per_second == 20.0


def test_targets_without_a_previous_scrape_have_unknown_rates_and_unreachable_ones_are_down():
    view = view_from_scrapes({}, {"a:1": teacher(1.0, 5), "n:1": trainer(1.0, 5, 1, 0, 0, 0),
                                  "gone:1": None})
    assert view.replicas == [ReplicaRow("a:1", None, 0, 0)]
    assert view.trainers == [TrainerRow("n:1", None, None)]
    assert view.fleet_tokens_per_second is None
    assert view.cache_hit_ratio is None
    assert view.down == ["gone:1"]


def test_parse_metrics_sums_each_sample_name_over_its_labels():
    m = TeacherMetrics()
    m.tokens.inc(7)
    m.requests.labels("Distill", "OK").inc(2)
    m.requests.labels("Distill", "UNAVAILABLE").inc()
    values = parse_metrics(generate_latest(m.registry).decode())
    assert values["logitcast_teacher_tokens_total"] == 7
    assert values["logitcast_teacher_requests_total"] == 3
    tm = TrainerMetrics()
    tm.client.wait_seconds.inc(1.5)
    assert parse_metrics(generate_latest(tm.registry).decode())[
        "logitcast_client_wait_seconds_total"] == 1.5


def test_prometheus_results_join_by_replica_and_rank_and_nan_is_unknown():
    results = {
        "replica_tps": [({"replica": "r1"}, 10.0), ({"replica": "r0"}, 30.0)],
        "fleet_tps": [({}, 40.0)],
        "queue": [({"replica": "r0"}, 128.0)],
        "inflight": [({"replica": "r0"}, 2.0), ({"replica": "r1"}, 0.0)],
        "trainer_tps": [({"rank": "10"}, 5.0), ({"rank": "2"}, 6.0)],
        "stall": [({"rank": "2"}, 0.5), ({"rank": "10"}, math.nan)],
        "cache_hit": [({}, math.nan)],
        "down": [({"job": "logitcast-teacher", "instance": "h:9400", "replica": "r2"}, 0.0)],
    }
    view = view_from_queries(results)
    assert view.replicas == [ReplicaRow("r0", 30.0, 128.0, 2.0), ReplicaRow("r1", 10.0, None, 0.0)]
    assert view.trainers == [TrainerRow("2", 6.0, 0.5), TrainerRow("10", 5.0, None)]
    assert view.fleet_tokens_per_second == 40.0
    assert view.cache_hit_ratio is None
    assert view.down == ["logitcast-teacher h:9400"]


def test_the_table_lists_replicas_and_ranks_with_their_figures():
    text = format_view(FleetView(1234.5, [ReplicaRow("r0", 1234.5, 4096, 2)],
                                 [TrainerRow("0", 600.0, 0.125)], 0.5, ["logitcast-trainer h:1"]))
    lines = text.splitlines()
    assert lines[0].split() == ["fleet", "1,234.5", "tok/s", "cache", "hit", "ratio", "50.0%"]
    assert ["r0", "1,234.5", "4,096", "2"] in [line.split() for line in lines]
    assert ["0", "600.0", "12.5%"] in [line.split() for line in lines]
    assert lines[-1] == "down: logitcast-trainer h:1"
    assert "-" in format_view(FleetView(None, [ReplicaRow("r0", None, None, None)], [], None, []))


# ---------------------------------------------------------------- the command

@pytest.fixture
def busy_server(tiny_backend, corpus):
    """A teacher with /metrics, answering Distill requests in a bounded background loop."""
    server = ServerThread(tiny_backend, metrics_port=0)
    stop = threading.Event()
    errors = []
    client = TeacherClient([server.address], TargetSpec(method="sample", unique=12.0),
                           tokenizer_fingerprint=tiny_backend.tokenizer_fingerprint,
                           vocab_size=tiny_backend.vocab_size, backoff_s=0.01)
    packer = Packer(corpus, PackingConfig(seq_len=32, global_batch=2))

    def traffic():
        try:
            for step in range(5000):
                if stop.is_set():
                    return
                client.fetch(packer.batch(step))
        except Exception as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while server.server.metrics.tokens._value.get() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield server
    finally:
        stop.set()
        thread.join(timeout=60)
        client.close()
        server.close()
    assert not errors


def test_top_over_metrics_urls_prints_the_replica_and_its_tokens_per_second(busy_server, capsys):
    target = f"127.0.0.1:{busy_server.server.metrics_port}"
    assert main(["top", "--targets", f"http://{target}/metrics", "--iterations", "2",
                 "--interval", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out  # not a terminal: one plain block per poll
    assert out.count("logitcast top") == 2
    rows = [line.split() for line in out.splitlines() if line.startswith(target)]
    assert len(rows) == 2
    assert max(float(r[1].replace(",", "")) for r in rows) > 0


def test_an_unreachable_target_is_a_one_line_error_not_a_traceback():
    url = f"http://127.0.0.1:{free_port()}/metrics"
    with pytest.raises(SystemExit) as exit_info:
        main(["top", "--targets", url, "--iterations", "1", "--interval", "0"])
    message = str(exit_info.value.code)
    assert message.startswith(f"logitcast top: cannot reach {url}")
    assert "\n" not in message


def test_an_unreachable_prometheus_or_a_bad_address_is_a_one_line_error():
    with pytest.raises(SystemExit, match="logitcast top: cannot reach http://127.0.0.1:"):
        main(["top", "--prometheus", f"127.0.0.1:{free_port()}", "--iterations", "1"])
    with pytest.raises(SystemExit, match="not an http"):
        main(["top", "--targets", "ftp://host/metrics", "--iterations", "1"])


def test_an_endpoint_that_is_not_prometheus_is_a_one_line_error():
    http, _ = start_http_server(0, addr="127.0.0.1", registry=TrainerMetrics().registry)
    try:
        with pytest.raises(SystemExit, match="did not answer like Prometheus") as exit_info:
            main(["top", "--prometheus", f"http://127.0.0.1:{http.server_port}",
                  "--iterations", "1"])
        assert "\n" not in str(exit_info.value.code)
    finally:
        http.shutdown()
        http.server_close()
