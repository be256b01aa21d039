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


def test_backend_choice_and_vllm_options_are_checked_before_anything_loads(tmp_path):
    import pytest

    from logitcast.server.backends import load_backend
    from logitcast.server.ray_app import ReplicaConfig
    from logitcast.server.vllm_backend import VLLMOptions, read_lm_head, resolve_model_dir

    hf = load_backend("tiny")
    assert (hf.name, hf.batch_invariant) == ("hf", True)  # eager CPU: tested byte-identical
    with pytest.raises(ValueError, match="backend must be one of"):
        load_backend("tiny", backend="onnx")
    with pytest.raises(ValueError, match="given for backend 'hf'"):
        load_backend("tiny", vllm_options={"max_model_len": 512})
    for bad, msg in [({"tensor_parallel_size": 0}, "tensor_parallel_size"),
                     ({"max_model_len": 1}, "max_model_len"),
                     ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
                     ({"batch_invariant": "yes"}, "batch_invariant"),
                     ({"kv_cache_gib": 0}, "kv_cache_gib")]:
        with pytest.raises(ValueError, match=msg):
            VLLMOptions(**bad)
    with pytest.raises(ValueError, match="need backend: vllm"):
        ReplicaConfig(vllm={"max_model_len": 512})
    with pytest.raises(ValueError, match="backend must be hf or vllm"):
        ReplicaConfig(backend="trt")
    with pytest.raises(ValueError, match="max_model_len"):
        ReplicaConfig(backend="vllm", vllm={"max_model_len": 0})
    with pytest.raises(ValueError, match="GGUF"):
        resolve_model_dir("/models/teacher.Q4_1.gguf")
    # an LM head is found in a sharded checkpoint, tied or not, and its absence is named
    from safetensors.torch import save_file

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"tie_word_embeddings": true}')
    emb = torch.randn(10, 4)
    save_file({"model.embed_tokens.weight": emb}, ckpt / "a.safetensors")
    save_file({"model.norm.weight": torch.ones(4)}, ckpt / "b.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.embed_tokens.weight": "a.safetensors", '
        '"model.norm.weight": "b.safetensors"}}')
    assert torch.equal(read_lm_head(ckpt), emb)
    (ckpt / "config.json").write_text('{"tie_word_embeddings": false}')
    from logitcast.server.vllm_backend import TeacherLoadError

    with pytest.raises(TeacherLoadError, match="no LM head weight"):
        read_lm_head(ckpt)
