import json
import socket

import numpy as np
import pytest

from logitcast.client.scorer import TeacherScorer
from logitcast.data.packing import Packer, PackingConfig
from logitcast.data.scores import LOG, ScoreFileError
from logitcast.data.select import (
    Instances,
    ModelScorer,
    Pieces,
    Scores,
    SelectConfig,
    SelectError,
    score_corpus,
    selection_info,
    top_fraction,
    write_corpus,
)
from logitcast.data.shards import ShardWriter, TokenCorpus
from logitcast.server.backends import TransformersBackend
from tests.data.conftest import write_corpus as write_tokens
from tests.server.conftest import ServerThread


@pytest.fixture(scope="module")
def reference_backend():
    """A smaller random model with the teacher's (fake) tokenizer: the reference."""
    return TransformersBackend.tiny_random(vocab_size=1000, seed=1, hidden=32, layers=1)


@pytest.fixture
def teacher(tiny_backend):
    s = ServerThread(tiny_backend)
    yield s
    s.close()


@pytest.fixture
def reference(reference_backend):
    return local_scorer(reference_backend)


def local_scorer(backend, name="reference", fingerprint=None):
    return ModelScorer(backend.model, name=name,
                       tokenizer_fingerprint=fingerprint or backend.tokenizer_fingerprint)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Counting:
    """A scorer wrapper that counts the rows it scores and can crash after N batches."""

    def __init__(self, inner, crash_after: int | None = None):
        self.inner, self.crash_after, self.rows, self.batches = inner, crash_after, 0, 0
        for name in ("name", "tokenizer_fingerprint", "vocab_size", "max_rows", "max_tokens",
                     "max_seq_len"):
            setattr(self, name, getattr(inner, name))

    def score_batches(self, batches):
        for sums in self.inner.score_batches(batches):
            if self.crash_after is not None and self.batches == self.crash_after:
                raise RuntimeError("simulated crash")
            self.batches += 1
            self.rows += sums.size
            yield sums


def test_rows_keep_exactly_the_top_ratio_by_difference_and_read_back(
        tmp_path, corpus, teacher, reference, tiny_backend):
    config = SelectConfig(ratio=0.3, seq_len=32, batch_tokens=256)
    with TeacherScorer([teacher.address], in_flight=3) as t:
        scores = score_corpus(corpus, config, {"teacher": t, "reference": reference},
                              tmp_path / "scores", progress=False)
    inst = Instances(corpus, config)
    rows = np.stack([inst.tokens(i) for i in range(inst.count)])
    direct_t = local_scorer(tiny_backend).score(rows)
    direct_r = reference.score(rows)
    np.testing.assert_allclose(scores.score, (direct_t - direct_r) / 31, atol=1e-4)
    assert scores.plan["normalisation"] == "token"

    kept = top_fraction(scores, 0.3)
    k = round(0.3 * inst.count)
    assert kept.size == k
    best = np.argsort(-scores.score, kind="stable")[:k]
    assert set(kept.tolist()) == set(best.tolist())
    assert scores.score[kept].min() >= np.delete(scores.score, kept).max()

    out = write_corpus(inst, kept, tmp_path / "selected",
                       selection_info(scores, config, kept, inst))
    got = TokenCorpus(out, tokenizer_fingerprint=corpus.tokenizer_fingerprint)
    expect = np.concatenate([inst.tokens(i) for i in kept])
    np.testing.assert_array_equal(
        np.concatenate([got.document(d) for d in range(got.num_documents)]),
        expect[expect != corpus.eos_id])
    batch = Packer(got, PackingConfig(seq_len=16, global_batch=2)).batch(0)
    assert batch.input_ids.shape == (2, 16)
    info = json.loads((out / "selection.json").read_text())
    assert info["counts"]["kept"] == k
    assert (info["ratio"], info["unit"]) == (0.3, "rows")
    assert info["teacher"]["model"] == tiny_backend.teacher_id
    assert not list(tmp_path.glob(".selected.tmp-*"))

    again = Scores.load(tmp_path / "scores", corpus, config)  # another ratio: no scoring
    np.testing.assert_array_equal(again.score, scores.score)
    assert top_fraction(again, 0.5).size == round(0.5 * inst.count)


def test_a_run_killed_midway_resumes_without_rescoring_what_was_scored(
        tmp_path, corpus, teacher, reference):
    config = SelectConfig(ratio=0.5, seq_len=16, batch_tokens=64, reference_split=0.2)
    with TeacherScorer([teacher.address], in_flight=2) as t:
        crashing = Counting(t, crash_after=3)
        with pytest.raises(RuntimeError, match="simulated crash"):
            score_corpus(corpus, config, {"teacher": crashing, "reference": reference},
                         tmp_path / "scores", progress=False)
        with open(tmp_path / "scores" / LOG, "ab") as f:
            f.write(b"\x40\x00\x00\x00torn")  # a frame the kill cut short
        counted_t, counted_r = Counting(t), Counting(reference)
        scores = score_corpus(corpus, config, {"teacher": counted_t, "reference": counted_r},
                              tmp_path / "scores", progress=False)
        total = scores.plan["sides"]["teacher"]["pieces"]
        assert counted_t.rows == total - crashing.rows > 0
        assert counted_r.rows == total
        fresh = score_corpus(corpus, config, {"teacher": t, "reference": reference},
                             tmp_path / "fresh", progress=False)
    np.testing.assert_allclose(scores.score, fresh.score, atol=1e-6, equal_nan=True)
    split = scores.split
    assert split.size == round(0.2 * Instances(corpus, config).count)
    assert np.isnan(scores.score[split]).all()
    assert not np.isin(top_fraction(scores, 1.0), split).any()


def test_scoring_fails_over_to_the_next_address_when_the_first_is_down(
        tmp_path, corpus, teacher, reference, tiny_backend):
    with TeacherScorer([f"127.0.0.1:{free_port()}", teacher.address], in_flight=2,
                       backoff_s=0.01, max_tries=3) as t:
        rows = np.stack([Instances(corpus, SelectConfig(seq_len=16)).tokens(i)
                         for i in range(4)])
        np.testing.assert_allclose(t.score(rows, first=0), local_scorer(tiny_backend).score(rows),
                                   atol=1e-4)
    with pytest.raises(Exception, match="no teacher reachable"):
        TeacherScorer([f"127.0.0.1:{free_port()}"])


def test_documents_are_scored_whole_in_overlapping_pieces_per_token(
        tmp_path, corpus, teacher, reference, tiny_backend):
    config = SelectConfig(ratio=0.5, unit="documents", seq_len=24, batch_tokens=96)
    with TeacherScorer([teacher.address]) as t:
        scores = score_corpus(corpus, config, {"teacher": t, "reference": reference},
                              tmp_path / "scores", progress=False)
    mine = local_scorer(tiny_backend)
    for d in range(corpus.num_documents):
        doc = corpus.document(d)
        pieces = Pieces.of(np.array([d]), np.array([doc.size]), 24)
        spans = [doc[s:s + n] for s, n in zip(pieces.start, pieces.length)]
        assert np.concatenate([spans[0][:1], *[s[1:] for s in spans]]).tolist() == doc.tolist()
        diff = sum(mine.score(s[None])[0] - reference.score(s[None])[0] for s in spans)
        assert scores.score[d] == pytest.approx(diff / (doc.size - 1), abs=1e-4)
    kept = top_fraction(scores, 0.5)
    out = write_corpus(Instances(corpus, config), kept, tmp_path / "sel",
                       selection_info(scores, config, kept, Instances(corpus, config)))
    got = TokenCorpus(out)
    assert [got.document(i).tolist() for i in range(got.num_documents)] == \
        [corpus.document(d).tolist() for d in kept]


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_a_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(SelectError, match="ratio"):
        SelectConfig(ratio=ratio)


def test_a_corrupt_score_file_is_named_and_no_output_is_written(
        tmp_path, corpus, teacher, reference):
    config = SelectConfig(seq_len=16, batch_tokens=64)
    with TeacherScorer([teacher.address]) as t:
        score_corpus(corpus, config, {"teacher": t, "reference": reference},
                     tmp_path / "scores", progress=False)
        log = tmp_path / "scores" / LOG
        data = bytearray(log.read_bytes())
        data[20] ^= 0xFF
        log.write_bytes(bytes(data))
        with pytest.raises(ScoreFileError, match=r"scores\.log.*CRC"):
            score_corpus(corpus, config, {"teacher": t, "reference": reference},
                         tmp_path / "scores", progress=False)
        (tmp_path / "scores" / "plan.json").write_text("{not json")
        with pytest.raises(ScoreFileError, match="plan.json"):
            score_corpus(corpus, config, {"teacher": t, "reference": reference},
                         tmp_path / "scores", progress=False)
        score_corpus(corpus, config, {"teacher": t, "reference": reference},
                     tmp_path / "other", progress=False)
        with pytest.raises(ScoreFileError, match="another plan.*seq_len"):
            score_corpus(corpus, SelectConfig(seq_len=32), {"teacher": t, "reference": reference},
                         tmp_path / "other", progress=False)


def test_a_reference_with_another_vocabulary_is_refused_before_scoring(
        tmp_path, corpus, teacher, tiny_backend):
    small = TransformersBackend.tiny_random(vocab_size=500, seed=2, hidden=32, layers=1)
    ref = local_scorer(small, fingerprint=tiny_backend.tokenizer_fingerprint)
    with TeacherScorer([teacher.address]) as t, \
            pytest.raises(SelectError, match="reference.*vocabulary of 500.*corpus 1000"):
        score_corpus(corpus, SelectConfig(seq_len=16), {"teacher": t, "reference": ref},
                     tmp_path / "scores", progress=False)
    assert not (tmp_path / "scores").exists()


def test_missing_corpus_and_tiny_corpus_give_clear_errors(tmp_path):
    from logitcast.data.shards import ShardError

    with pytest.raises(ShardError, match="not found"):
        TokenCorpus(tmp_path / "nope")
    tiny = write_tokens(tmp_path / "tiny", docs=1)
    with pytest.raises(SelectError, match="too small"):
        Instances(tiny, SelectConfig(seq_len=4096))


# ---------------------------------------------------------------------------- cross-tokenizer

ALPHA = "abcdefghijklmnopqrstuvwxyz "


class CharTokenizer:
    """One id per character (2 + index); EOS is 1."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ALPHA.index(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(ALPHA[i - 2] for i in ids if i >= 2)


class PairTokenizer:
    """One id per two characters (a trailing single character has its own ids)."""

    def __call__(self, text, add_special_tokens=False):
        idx = [ALPHA.index(c) for c in text]
        ids = [2 + 27 * a + b for a, b in zip(idx[0::2], idx[1::2])]
        return {"input_ids": ids + ([2 + 729 + idx[-1]] if len(idx) % 2 else [])}


def test_different_tokenizers_score_the_same_text_per_byte(tmp_path, teacher, tiny_backend):
    rng = np.random.default_rng(0)
    w = ShardWriter(tmp_path / "tokens", tiny_backend.tokenizer_fingerprint, 1000, 1)
    char = CharTokenizer()
    texts = [" ".join("".join(rng.choice(list(ALPHA[:26]), rng.integers(2, 7)))
                      for _ in range(rng.integers(2, 6))) for _ in range(20)]
    for i, text in enumerate(texts):
        w.add(char(text)["input_ids"])
        w.commit_source(str(i))
    w.flush()
    corpus = TokenCorpus(tmp_path / "tokens")
    ref_model = TransformersBackend.tiny_random(vocab_size=800, seed=3, hidden=32, layers=1)
    ref = local_scorer(ref_model, fingerprint="pairs")
    config = SelectConfig(ratio=0.5, unit="documents", seq_len=64)
    with TeacherScorer([teacher.address]) as t:
        scorers = {"teacher": t, "reference": ref}
        with pytest.raises(SelectError, match="tokenizers of: corpus, teacher, reference"):
            score_corpus(corpus, config, scorers, tmp_path / "s0", progress=False)
        scores = score_corpus(corpus, config, scorers, tmp_path / "scores", progress=False,
                              tokenizers={"corpus": char, "teacher": char,
                                          "reference": PairTokenizer()})
    assert scores.plan["normalisation"] == "byte"
    mine = local_scorer(tiny_backend)
    for d, text in enumerate(texts):
        t_sum = mine.score(np.array([char(text)["input_ids"]]))[0]
        r_sum = ref.score(np.array([PairTokenizer()(text)["input_ids"]]))[0]
        assert scores.score[d] == pytest.approx((t_sum - r_sum) / len(text.encode()), abs=1e-4)
    kept = top_fraction(scores, 0.5)
    info = selection_info(scores, config, kept, Instances(corpus, config))
    assert info["normalisation"] == "byte"
    assert "byte" in info["normalisation_note"]
