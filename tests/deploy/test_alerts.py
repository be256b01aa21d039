"""The alerts of deploy/rules/logitcast.rules.yml fire when they should and only then,
checked with `promtool test rules` on synthetic series (the rules evaluated as shipped)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parents[2] / "deploy" / "rules" / "logitcast.rules.yml"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian "
                                                         "package `prometheus`; `make system-deps`)")

TEACHER = 'job="logitcast-teacher",instance="t{r}:9400",replica="r{r}"'
TRAINER = 'job="logitcast-trainer",instance="n0:940{r}",rank="{r}"'


def series(name: str, labels: str, values: str, r: int = 0) -> dict:
    return {"series": f"{name}{{{labels.format(r=r)}}}", "values": values}


def firing(alert: str, at: str, *label_sets: dict) -> dict:
    """promtool expectation: exactly these firing instances of `alert` at time `at`."""
    return {"expr": f'ALERTS{{alertname="{alert}", alertstate="firing"}}', "eval_time": at,
            "exp_samples": [{"labels": "ALERTS" + "{" + ",".join(
                f'{k}="{v}"' for k, v in {"alertname": alert, "alertstate": "firing",
                                          **labels}.items()) + "}", "value": 1}
                for labels in label_sets]}


def promtool_test(tmp_path: Path, inputs: list[dict], expectations: list[dict]) -> None:
    spec = {"rule_files": [str(RULES)], "evaluation_interval": "5s",
            "tests": [{"interval": "15s", "input_series": inputs,
                       "promql_expr_test": expectations}]}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_replica_down_for_a_minute_fires_teacher_replica_down_for_that_replica_only(tmp_path):
    down = {"job": "logitcast-teacher", "instance": "t1:9400", "replica": "r1",
            "severity": "critical"}
    promtool_test(tmp_path, [series("up", TEACHER, "1x20", 0), series("up", TEACHER, "1 0x20", 1)],
                  [firing("TeacherReplicaDown", "30s"), firing("TeacherReplicaDown", "2m", down)])


def test_a_rank_waiting_over_a_fifth_of_its_step_time_for_5m_fires_trainer_stalled(tmp_path):
    step = [series("logitcast_trainer_step_seconds_total", TRAINER, "0+15x60", r) for r in (0, 1)]
    waits = [series("logitcast_client_wait_seconds_total", TRAINER, "0+4.5x60", 0),   # 30%
             series("logitcast_client_wait_seconds_total", TRAINER, "0+1.5x60", 1)]   # 10%
    promtool_test(tmp_path, step + waits,
                  [firing("TrainerStalled", "3m"),
                   firing("TrainerStalled", "8m", {"rank": "0", "severity": "warning"})])


def test_any_failed_cache_write_fires_cache_write_errors(tmp_path):
    promtool_test(tmp_path, [series("logitcast_cache_write_errors_total", TEACHER, "0 0 0 2x10")],
                  [firing("CacheWriteErrors", "30s"),
                   firing("CacheWriteErrors", "1m", {"job": "logitcast-teacher",
                                                     "instance": "t0:9400", "replica": "r0",
                                                     "severity": "warning"})])


def test_trainers_missing_the_cache_while_the_fleet_produces_nothing_fire_fleet_idle(tmp_path):
    inputs = [series("up", TRAINER, "1x40"),
              series("logitcast_client_cache_misses_total", TRAINER, "0+8x40"),
              series("logitcast_teacher_tokens_total", TEACHER, "0+4096x8 32768x32")]
    promtool_test(tmp_path, inputs, [firing("FleetIdle", "2m"),
                                     firing("FleetIdle", "7m", {"severity": "critical"})])


def test_trainers_served_by_the_cache_alone_do_not_fire_fleet_idle(tmp_path):
    inputs = [series("up", TRAINER, "1x40"),
              series("logitcast_client_cache_hits_total", TRAINER, "0+8x40"),
              series("logitcast_client_cache_misses_total", TRAINER, "0x40")]
    promtool_test(tmp_path, inputs, [firing("FleetIdle", "7m")])


def test_over_a_minute_of_queued_work_for_5m_fires_teacher_queue_backlog(tmp_path):
    inputs = [series("logitcast_teacher_tokens_total", TEACHER, "0+1500x60", 0),     # 100 tok/s
              series("logitcast_teacher_queue_tokens", TEACHER, "30000x60", 0),      # 300 s
              series("logitcast_teacher_tokens_total", TEACHER, "0+1500x60", 1),
              series("logitcast_teacher_queue_tokens", TEACHER, "3000x60", 1)]       # 30 s
    promtool_test(tmp_path, inputs,
                  [firing("TeacherQueueBacklog", "3m"),
                   firing("TeacherQueueBacklog", "9m", {"replica": "r0", "severity": "warning"})])


def test_teacher_faults_and_out_of_memory_fire_for_the_replica_and_kind(tmp_path):
    faults = "logitcast_teacher_faults_total"
    inputs = [series(faults, TEACHER + ',kind="nonfinite"', "0 0 0 1x10", 0),
              series(faults, TEACHER + ',kind="oom"', "0 0 0 2x10", 1)]
    promtool_test(tmp_path, inputs, [
        firing("TeacherFaults", "30s"),
        firing("TeacherFaults", "1m", {"replica": "r0", "kind": "nonfinite", "severity": "warning"}),
        firing("TeacherOutOfMemory", "1m", {"replica": "r1", "severity": "warning"})])


def test_a_replica_up_but_not_serving_for_2m_fires_teacher_not_serving(tmp_path):
    inputs = [series("logitcast_teacher_serving", TEACHER, "1 0x20", 0),
              series("up", TEACHER, "1x20", 0),
              series("logitcast_teacher_serving", TEACHER, "1x20", 1),
              series("up", TEACHER, "1x20", 1)]
    promtool_test(tmp_path, inputs, [
        firing("TeacherNotServing", "1m"),
        firing("TeacherNotServing", "4m", {"job": "logitcast-teacher", "instance": "t0:9400",
                                           "replica": "r0", "severity": "critical"})])
