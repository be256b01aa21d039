"""The shipped monitoring config names only series that exist, and promtool accepts it.

Every `logitcast:` name in the Grafana dashboard must be a recording rule of
deploy/rules/logitcast.rules.yml; every other `logitcast_` name in the dashboard
or the rules must be a sample the metrics classes actually export.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from logitcast.client.metrics import ClientMetrics
from logitcast.server.metrics import TeacherMetrics
from logitcast.trainer.metrics import TrainerMetrics

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "prometheus.yml"
RULES = REPO / "deploy" / "rules" / "logitcast.rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "logitcast.json"
SERIES = re.compile(r"logitcast[_:a-zA-Z0-9]+")
#: sample-name suffixes prometheus_client adds per family type, samples or not
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_count", "_sum", "_created")}
PROMTOOL = shutil.which("promtool")


def exported_series() -> set[str]:
    names: set[str] = set()
    for registry in (TeacherMetrics().registry, TrainerMetrics().registry,
                     ClientMetrics().registry):
        for family in registry.collect():
            names |= {s.name for s in family.samples}
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def recorded_series() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def panel_exprs(panels: list[dict]) -> list[str]:
    exprs = []
    for panel in panels:
        exprs += [t["expr"] for t in panel.get("targets", []) if "expr" in t]
        exprs += panel_exprs(panel.get("panels", []))
    return exprs


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_code_exports_the_series_this_check_relies_on():
    names = exported_series()
    assert {"logitcast_teacher_tokens_total", "logitcast_teacher_request_seconds_bucket",
            "logitcast_client_wait_seconds_total", "logitcast_trainer_loss"} <= names


def test_every_dashboard_series_is_a_recording_rule_or_an_exported_metric():
    exprs = panel_exprs(dashboard()["panels"])
    assert exprs, "the dashboard has no queries"
    used = {name for e in exprs for name in SERIES.findall(e)}
    assert {n for n in used if ":" in n} - recorded_series() == set()
    assert {n for n in used if ":" not in n} - exported_series() == set()


def test_every_raw_series_in_the_rules_is_exported_and_every_rule_name_is_defined():
    used = {name for r in rules() for name in SERIES.findall(r["expr"])}
    assert {n for n in used if ":" not in n} - exported_series() == set()
    assert {n for n in used if ":" in n} - recorded_series() == set()


def test_every_panel_queries_the_templated_prometheus_datasource():
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    queried = [p for p in dash["panels"] if p.get("targets")]
    assert queried
    for panel in queried:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]


def test_rules_define_the_documented_recording_rules_and_alerts():
    assert {"logitcast:fleet_tokens_per_second:rate1m", "logitcast:replica_tokens_per_second:rate1m",
            "logitcast:trainer_tokens_per_second:rate1m", "logitcast:trainer_stall_ratio:rate1m",
            "logitcast:client_cache_hit_ratio:rate1m",
            "logitcast:teacher_request_seconds:p99_rate1m"} <= recorded_series()
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert {"TeacherReplicaDown", "FleetIdle", "TrainerStalled", "CacheWriteErrors", "TeacherFaults",
            "TeacherNotServing", "TeacherOutOfMemory",
            "TeacherQueueBacklog"} <= set(alerts)
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert {"summary", "description"} <= set(alert["annotations"]), name


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package "
                                             "`prometheus`; `make system-deps`)")
@pytest.mark.parametrize("args", [["check", "config", str(CONFIG)],
                                  ["check", "rules", str(RULES)]], ids=["config", "rules"])
def test_promtool_accepts_the_shipped_config_and_rules(args):
    done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
