import json
import os
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_trains_online_offline_and_baseline_students_with_the_real_teacher(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "logitcast.cli.main", "demo", "--workdir", str(tmp_path),
         "--files", "6", "--heldout-files", "2", "--steps", "4", "--seq-len", "128",
         "--batch", "2", "--eval-every", "2", "--eval-rows", "2"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"teacher smollm2-135m-instruct-q4_1(@fp32)? serving", out.stdout)
    for row in ("teacher (floor)", "A online RS-12", "B offline RS-12", "CE only"):
        assert any(line.startswith(row) for line in out.stdout.splitlines()), row
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["pruned"]
    a, b, ce = summary["students"]
    assert a["student"] == ce["student"] == "a"  # the baseline starts from A's pruned init
    assert b["student"] == "b"
    assert b["params"] < a["params"]
    for name, blocks in (("a", 4), ("b", 2)):  # `logitcast prune` wrote them
        manifest = json.loads((tmp_path / "students" / name / "prune.json").read_text())
        assert len(manifest["kept_layers"]) == blocks
    floor = summary["teacher_lm_loss"]
    assert floor is not None
    assert floor > 0
    for s in (a, b, ce):  # every student measured against the same teacher targets
        assert s["final"]["kl_to_teacher"] is not None
        assert s["final"]["kl_to_teacher"] > 0
        assert s["final"]["lm_loss"] > floor  # 4 steps: nobody reaches the teacher
    assert 20 < summary["wire_bytes_per_token"] < 45
    assert (tmp_path / "eval_curves.png").stat().st_size > 1000
    for run in ("online", "offline", "ce"):
        assert (tmp_path / "runs" / run / "student" / "model.safetensors").is_file()
        assert (tmp_path / "runs" / run / "student" / "tokenizer.json").is_file()
