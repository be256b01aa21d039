import subprocess
import sys

from logitcast.cli.main import VERBS, main


def test_no_verb_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "prepare-teacher" in capsys.readouterr().out


def test_every_verb_module_exposes_add_arguments_and_run():
    import importlib

    for module, _ in VERBS.values():
        mod = importlib.import_module(f"logitcast.cli.{module}")
        assert callable(mod.add_arguments)
        assert callable(mod.run)


def test_console_script_is_installed_and_answers_help():
    out = subprocess.run([sys.executable, "-m", "logitcast.cli.main", "--help"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert "prepare-teacher" in out.stdout
