import hashlib

from logitcast.cache import CacheNamespace, CacheReader, CacheWriter
from logitcast.cli.main import main
from logitcast.ops import TargetSpec

NS = CacheNamespace(teacher_id="t", tokenizer_fingerprint="fp", spec=TargetSpec())


def fill(root, n=20):
    import torch

    from logitcast.ops import row_positions, sparsify
    from logitcast.ops.codec import encode

    with CacheWriter(root, NS, writer_id="a", shard_bytes=4000) as w:
        for i in range(n):
            logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(i))
            k, p = row_positions(torch.tensor([i]), 8)
            w.put(hashlib.blake2b(str(i).encode(), digest_size=16).digest(),
                  encode(sparsify(logits, TargetSpec(), row_keys=k, positions=p)))


def test_stats_verify_compact_export(tmp_path, capsys):
    fill(tmp_path)
    assert main(["cache", "stats", str(tmp_path)]) == 0
    assert "20 records" in capsys.readouterr().out
    assert main(["cache", "verify", str(tmp_path)]) == 0
    shard = sorted((tmp_path / NS.name).glob("*.shard"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 4
    shard.write_bytes(bytes(data))
    assert main(["cache", "verify", str(tmp_path)]) == 1
    assert f"BAD {NS.name}/{shard.name} offset" in capsys.readouterr().out
    assert main(["cache", "verify", "--repair", str(tmp_path)]) == 0
    assert (tmp_path / NS.name / "quarantine" / shard.name).exists()
    assert main(["cache", "verify", str(tmp_path)]) == 0
    assert main(["cache", "compact", str(tmp_path)]) == 0
    assert "merged" in capsys.readouterr().out
    assert main(["cache", "verify", str(tmp_path)]) == 0
    assert len(CacheReader(tmp_path, NS)) == 19
    out = tmp_path / "x.safetensors"
    assert main(["cache", "export", str(tmp_path), "--out", str(out)]) == 0
    from safetensors.torch import load_file

    tensors = load_file(str(out))
    assert tensors["keys"].shape == (19, 16)
    assert tensors["ids"].shape[0] == 19 * 8
