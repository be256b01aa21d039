import torch

from logitcast.ops.rowkey import segments


def block_diagonal_mask(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention inside each document (bool [B, 1, T, T]) and restarting positions."""
    b, t = document_ids.shape
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    idx = torch.arange(t).expand(b, t)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.cummax(torch.where(starts, idx, 0), dim=1).values
    return (same & causal)[:, None], idx - first


def test_document_mode_equals_a_block_diagonal_4d_mask_on_cpu_sdpa(tiny_backend):
    """The server runs each document segment as its own sequence (bitwise independent of
    the packing); this checks it computes the same thing as one packed row with a
    block-diagonal 4-D mask and per-document positions through CPU SDPA (equal up to
    float rounding, which is why the server does not use the mask path)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (2, 48), generator=g)
    docs = torch.tensor([[0] * 20 + [1] * 28, [0] * 5 + [1] * 30 + [2] * 13])
    segmented = tiny_backend.hidden_states(tokens, docs)
    mask, positions = block_diagonal_mask(docs)
    with torch.inference_mode():
        masked = tiny_backend.model.model(input_ids=tokens, attention_mask=mask,
                                          position_ids=positions).last_hidden_state
    assert torch.allclose(segmented, masked, atol=1e-5)
    plain = tiny_backend.hidden_states(tokens)
    assert not torch.allclose(segmented[0, 20:], plain[0, 20:], atol=1e-3)
    assert [s for s in segments(docs) if s[0] == 1] == [(1, 0, 5), (1, 5, 35), (1, 35, 48)]
