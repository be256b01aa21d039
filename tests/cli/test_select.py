import json

import numpy as np
import pytest

from logitcast.cli.main import main
from logitcast.data.packing import Packer, PackingConfig
from logitcast.data.shards import TokenCorpus
from logitcast.server.backends import TransformersBackend
from tests.server.conftest import ServerThread


@pytest.fixture
def servers(tiny_backend):
    """A teacher server and a reference server (a smaller model, same tokenizer)."""
    ref = TransformersBackend.tiny_random(vocab_size=1000, seed=1, hidden=32, layers=1)
    t, r = ServerThread(tiny_backend), ServerThread(ref)
    yield t.address, r.address
    t.close()
    r.close()


def select(*args) -> int:
    return main(["select", *map(str, args)])


def test_select_writes_a_corpus_the_trainer_packs_and_reuses_scores_for_another_ratio(
        tmp_path, corpus, servers, capsys):
    teacher, reference = servers
    out = tmp_path / "sel"
    assert select("--teacher", teacher, "--reference", reference, "--corpus", corpus.directory,
                  "--ratio", 0.5, "--out", out, "--seq-len", 32,
                  "--reference-split", 0.1) == 0
    info = json.loads((out / "selection.json").read_text())
    assert info["counts"]["kept"] == round(0.5 * info["counts"]["candidates"])
    assert len(info["reference_split"]["instances"]) == info["counts"]["reference_split"] > 0
    assert info["normalisation"] == "token"
    got = TokenCorpus(out, tokenizer_fingerprint=corpus.tokenizer_fingerprint)
    assert Packer(got, PackingConfig(seq_len=32, global_batch=2)).batch(0).input_ids.shape == \
        (2, 32)
    # another ratio from the same scores: no server needed
    out2 = tmp_path / "sel2"
    assert select("--corpus", corpus.directory, "--ratio", 0.25, "--out", out2, "--seq-len", 32,
                  "--reference-split", 0.1, "--scores", tmp_path / "sel.scores") == 0
    assert "reusing finished scores" in capsys.readouterr().out
    info2 = json.loads((out2 / "selection.json").read_text())
    assert info2["counts"]["kept"] == round(0.25 * info["counts"]["candidates"])
    assert info2["score_threshold"] >= info["score_threshold"]


def test_dry_run_reports_histogram_and_three_effects_without_a_corpus(
        tmp_path, corpus, servers, capsys):
    teacher, reference = servers
    out = tmp_path / "sel"
    assert select("--teacher", teacher, "--reference", reference, "--corpus", corpus.directory,
                  "--out", out, "--unit", "documents", "--seq-len", 64, "--dry-run") == 0
    printed = capsys.readouterr().out
    for word in ("score histogram", "kept:", "down-sampled:", "dropped:", "token ids"):
        assert word in printed
    assert not out.exists()
    report = tmp_path / "sel.scores" / "report.txt"
    assert report.read_text() in printed
    png = tmp_path / "sel.scores" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_out_writes_the_reference_split_excluded_from_selection(tmp_path, corpus, servers):
    teacher, reference = servers
    assert select("--corpus", corpus.directory, "--reference-split", 0.2, "--seq-len", 32,
                  "--split-out", tmp_path / "ref") == 0
    split = json.loads((tmp_path / "ref" / "selection.json").read_text())["instances"]
    assert TokenCorpus(tmp_path / "ref").num_documents > 0
    assert select("--teacher", teacher, "--reference", reference, "--corpus", corpus.directory,
                  "--ratio", 1.0, "--out", tmp_path / "sel", "--seq-len", 32,
                  "--reference-split", 0.2) == 0
    info = json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert info["reference_split"]["instances"] == split
    assert info["counts"]["kept"] == info["counts"]["candidates"] == \
        info["counts"]["instances"] - len(split)


def test_a_local_reference_directory_is_loaded_and_a_wrong_vocab_refused(
        tmp_path, corpus, servers, capsys):
    teacher, _ = servers
    for vocab, name in ((1000, "good"), (500, "small")):
        TransformersBackend.tiny_random(vocab_size=vocab, seed=4, hidden=32, layers=1
                                        ).model.save_pretrained(tmp_path / name)
    assert select("--teacher", teacher, "--reference", tmp_path / "good", "--corpus",
                  corpus.directory, "--out", tmp_path / "sel", "--seq-len", 32) == 0
    assert json.loads((tmp_path / "sel" / "selection.json").read_text())["reference"]["model"] \
        == str((tmp_path / "good").resolve())
    assert select("--teacher", teacher, "--reference", tmp_path / "small", "--corpus",
                  corpus.directory, "--out", tmp_path / "bad", "--seq-len", 32) == 2
    assert "vocabulary of 500" in capsys.readouterr().out
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".bad.tmp-*"))


@pytest.mark.parametrize(("args", "message"), [
    (["--ratio", 0], "ratio must be in (0, 1]"),
    (["--ratio", 1.5], "ratio must be in (0, 1]"),
    (["--reference-split", 1.0], "reference_split must be in [0, 1)"),
    (["--corpus-missing"], "not a token shard directory"),
    (["--out-exists"], "already exists"),
    (["--no-reference"], "--teacher and --reference are required"),
    (["--reference", "nowhere"], "neither a model directory"),
])
def test_bad_input_names_what_is_wrong_and_writes_nothing(tmp_path, corpus, servers, capsys,
                                                          args, message):
    teacher, reference = servers
    out = tmp_path / "sel"
    base = {"--teacher": teacher, "--reference": reference, "--corpus": corpus.directory,
            "--out": out, "--seq-len": 32}
    if args == ["--corpus-missing"]:
        base["--corpus"], args = tmp_path / "missing", []
    elif args == ["--out-exists"]:
        out.mkdir()
        args = []
    elif args == ["--no-reference"]:
        del base["--reference"]
        args = []
    base.update(dict(zip(args[0::2], args[1::2])))
    assert select(*np.ravel(list(base.items()))) == 2
    assert message in capsys.readouterr().out
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "sel.scores" / "columns.npy").exists()
