import json

import numpy as np
import pytest

from logitcast.data.shards import ShardError, ShardWriter, TokenCorpus
from logitcast.data.tokenize import documents, list_sources, tokenize_sources


class WhitespaceTokenizer:
    """A stand-in for a HF tokenizer: one id per whitespace-separated word."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (sum(map(ord, w)) % 998) for w in text.split()]}


def test_documents_round_trip_across_shards(tmp_path):
    w = ShardWriter(tmp_path, "fp", 70000, 1, shard_tokens=10)
    docs = [np.arange(n) + 60000 for n in (3, 12, 0, 7)]
    for i, d in enumerate(docs):
        w.add(d)
        w.commit_source(f"s{i}")
    w.flush()
    corpus = TokenCorpus(tmp_path, tokenizer_fingerprint="fp")
    kept = [d for d in docs if d.size]
    assert corpus.num_documents == 3
    assert corpus.num_tokens == 22
    for i, d in enumerate(kept):
        assert np.array_equal(corpus.document(i), d)
    assert json.loads((tmp_path / "manifest.json").read_text())["dtype"] == "<u4"


def test_tokenize_text_and_jsonl_then_resume_skips_done_sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("alpha beta gamma")
    (src / "b.jsonl").write_text('{"text": "one two"}\n\n{"text": "three"}\n')
    out = tmp_path / "out"
    tokenize_sources(list_sources([src]), out, WhitespaceTokenizer(), "ws", vocab_size=1000)
    corpus = TokenCorpus(out)
    assert corpus.num_documents == 3
    assert corpus.num_tokens == 6
    (src / "c.txt").write_text("delta")
    w = tokenize_sources(list_sources([src]), out, WhitespaceTokenizer(), "ws", vocab_size=1000)
    assert len(w.done_sources) == 3
    assert TokenCorpus(out).num_documents == 4


def test_bad_jsonl_line_is_named(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match="x.jsonl:2: no 'text' string"):
        list(documents(bad))


def test_mismatches_and_corruption_are_refused(tmp_path):
    w = ShardWriter(tmp_path, "fp", 1000, 1)
    w.add([5, 6, 7])
    w.commit_source("s")
    w.flush()
    with pytest.raises(ShardError, match="expected other"):
        TokenCorpus(tmp_path, tokenizer_fingerprint="other")
    with pytest.raises(ShardError, match="resuming with"):
        ShardWriter(tmp_path, "other", 1000, 1)
    (tmp_path / "shard-00000.tokens").write_bytes(b"\0")
    with pytest.raises(ShardError, match="wrong size"):
        TokenCorpus(tmp_path)
    with pytest.raises(ShardError, match="not a token shard directory"):
        TokenCorpus(tmp_path / "nowhere")


def test_tokenize_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b", "c d e", "f"], "id": [1, 2, 3]}),
                   tmp_path / "docs.parquet", row_group_size=2)
    out = tmp_path / "out"
    tokenize_sources(list_sources([tmp_path / "docs.parquet"]), out, WhitespaceTokenizer(), "ws",
                     vocab_size=1000)
    corpus = TokenCorpus(out)
    assert corpus.num_documents == 3
    assert corpus.num_tokens == 6
