"""The reliability suite of bench/reliability.py with smaller counts, against real
`logitcast serve` child processes on 127.0.0.1. Behaviour only: clean statuses,
complete streams, bounded memory, identical bytes; no timing assertions."""

import threading

import pytest

from bench.reliability import (
    QUEUE_BYTES,
    QUEUE_TOKENS,
    REAL_ARGS,
    SLOW_LOAD,
    SLOW_QUEUE_BYTES,
    TOKEN,
    fast_clients,
    fuzz,
    kill_server_args,
    kills,
    overload,
    serve,
    shared_args,
    slow_args,
)
from logitcast.server.fleet import free_port


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The shared (auth, small budgets), slow-reader and kill-target tiny servers, booted
    at once; killed at the end whatever happens."""
    work = tmp_path_factory.mktemp("reliability")
    (work / "token").write_text(TOKEN + "\n")
    ports = {"slow": free_port(), "a": free_port()}
    wanted = {"shared": shared_args(work / "token"), "slow": slow_args(ports["slow"]),
              "a": kill_server_args(ports["a"])}
    booted, errors = {}, []

    def boot(name):
        try:
            booted[name] = serve(wanted[name], work / f"{name}.log")
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=boot, args=(n,)) for n in wanted]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield {**booted, "ports": ports, "work": work}
    finally:
        for child in booted.values():
            child.kill()


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    child = serve(REAL_ARGS, tmp_path_factory.mktemp("real") / "real.log")
    try:
        yield child
    finally:
        child.kill()


def assert_fuzz_clean(out, requests):
    assert out["requests"] == requests
    assert out["generator_errors"] == []
    assert not out["crashed"]
    assert out["unclean"] == []
    assert out["rss_growth"] <= 0.10
    assert out["identical_after"]


def test_fuzzed_server_answers_cleanly_stays_up_small_and_gives_the_same_bytes(servers):
    out = fuzz(servers["shared"], requests=1500, seed=0, threads=6, deadline_s=60, token=TOKEN,
               warmup=200, full_allowed=True)
    assert_fuzz_clean(out, 1500)
    assert out["codes"]["OK"] > 50
    assert out["codes"]["UNAUTHENTICATED"] > 50  # bad tokens were refused, and only those


def test_overload_refuses_the_excess_and_completes_every_admitted_stream_in_budget(servers):
    out = overload(servers["shared"], queue_tokens=QUEUE_TOKENS, queue_bytes=QUEUE_BYTES,
                   rows=8, seq_len=256, clients=64, token=TOKEN)
    assert out["problems"] == []
    assert out["outcomes"]["completed"] > 0
    assert out["outcomes"]["refused"] > 0
    assert "broken" not in out["outcomes"]
    assert out["rss_peak_bytes"] <= out["rss_bound_bytes"]
    assert out["ok"]


def test_a_slow_reader_keeps_server_memory_bounded_and_the_other_streams_whole(servers):
    slow = servers["slow"]
    out = fast_clients(slow, requests=4, metrics_port=servers["ports"]["slow"], **SLOW_LOAD)
    assert out["problems"] == []
    assert out["slow"]["problem"] is None
    assert out["slow"]["chunks"] >= 1
    assert out["slow"]["status"] == "cancelled by the client"  # the server did not end it
    assert out["rss_peak_bytes"] <= (out["rss_before_bytes"] + SLOW_QUEUE_BYTES) * 1.2
    assert slow.alive()


@pytest.mark.slow
def test_a_server_killed_mid_stream_and_restarted_loses_and_repeats_no_step(servers):
    out = kills(servers["a"], servers["shared"], servers["ports"]["a"], servers["work"],
                steps=30, kills=3, seq_len=32, batch=2, token=TOKEN, wait_s=5.0)
    assert out["killer_error"] is None
    assert out["errors"] == []
    assert out["kills"] == 3
    assert (out["lost"], out["duplicated"]) == (0, 0)
    assert out["identical"]


@pytest.mark.slow
def test_real_teacher_answers_a_fuzz_burst_cleanly_with_the_same_bytes_after(real_server):
    out = fuzz(real_server, requests=120, seed=10, threads=4, deadline_s=120, warmup=20)
    assert_fuzz_clean(out, 120)
