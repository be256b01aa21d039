import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_with_the_real_teacher(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "logitcast.cli.main", "demo", "--workdir", str(tmp_path),
         "--files", "5", "--steps", "2", "--seq-len", "128", "--batch", "2"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "targets byte-identical: True" in out.stdout
    assert "teacher smollm2-135m-instruct-q4_1 serving" in out.stdout
