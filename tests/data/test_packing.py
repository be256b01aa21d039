import numpy as np
import pytest
import torch

from logitcast.data.packing import IGNORE, Packer, PackingConfig
from logitcast.data.shards import TokenCorpus
from logitcast.ops.rowkey import row_key
from tests.data.conftest import write_corpus


@pytest.fixture
def small(tmp_path):
    return write_corpus(tmp_path / "c", docs=40)


def test_rows_are_a_pure_function_of_step_rank_and_world(small):
    cfg = PackingConfig(seq_len=32, global_batch=4, seed=7)
    a = Packer(small, cfg)
    resumed = Packer(TokenCorpus(small.directory), cfg)  # same corpus, a new process
    for step in (0, 3, 11):
        assert a.batch(step).row_keys == resumed.batch(step).row_keys
        halves = [a.batch(step, rank, 2) for rank in (0, 1)]
        assert torch.equal(torch.cat([h.input_ids for h in halves]), a.batch(step).input_ids)
    assert a.batch(1).row_keys != Packer(small, PackingConfig(seq_len=32, global_batch=4,
                                                                seed=8)).batch(1).row_keys


def test_row_mode_labels_are_the_next_tokens_of_one_stream(small):
    p = Packer(small, PackingConfig(seq_len=16, global_batch=2, seed=0))
    rows = [p.row(g) for g in range(p.rows_per_epoch)]
    stream = torch.cat([r[0] for r in rows])
    labels = torch.cat([r[1] for r in rows])
    assert torch.equal(stream[1:], labels[:-1])
    assert int((stream == small.eos_id).sum()) >= small.num_documents - 1
    b = p.batch(0)
    assert b.row_keys == tuple(row_key(r) for r in b.input_ids)
    assert not torch.equal(p.row(0)[0], p.row(p.rows_per_epoch)[0])  # next epoch reshuffles


def test_document_mode_rows_hold_whole_pieces_with_boundaries(small):
    cfg = PackingConfig(seq_len=64, global_batch=2, mode="documents", max_document_tokens=48)
    p = Packer(small, cfg)
    pieces = 0
    for g in range(p.rows_per_epoch):
        ids, labels, docs = p.row(g)
        assert bool((docs[1:] >= docs[:-1]).all())
        for d in docs.unique():
            seg = (docs == d).nonzero()[:, 0]
            assert len(seg) <= 48 or bool((labels[seg] == IGNORE).all())
        pieces += sum(bool((labels[docs == d] != IGNORE).any()) for d in docs.unique())
    assert pieces == int(np.sum((small.lengths + 47) // 48))  # every piece once per epoch
    with pytest.raises(ValueError, match="max_document_tokens"):
        PackingConfig(seq_len=32, mode="documents", max_document_tokens=64)
