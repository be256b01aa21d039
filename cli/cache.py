"""`logitcast cache stats|verify|compact|export ROOT`: inspect and maintain a target cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["stats", "verify", "compact", "export"])
    p.add_argument("root", type=Path, help="cache directory (holds one folder per namespace)")
    p.add_argument("--namespace", default=None, help="only this namespace (directory name)")
    p.add_argument("--out", type=Path, default=None, help="export: output .safetensors file")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from logitcast.cache import CacheReader, CacheWriter, list_namespaces

    namespaces = [ns for ns in list_namespaces(args.root)
                  if args.namespace in (None, ns.name)]
    if not namespaces:
        raise SystemExit(f"no cache namespaces under {args.root}")
    status = 0
    for ns in namespaces:
        reader = CacheReader(args.root, ns)
        files = reader.storage.list(ns.name)
        if args.action == "stats":
            size = sum(reader.storage.size(f"{ns.name}/{f}") for f in files)
            print(f"{ns.name}: teacher {ns.teacher_id}, spec {ns.spec.key()}, documents "
                  f"{ns.document_mode}: {len(reader)} records, "
                  f"{sum(f.endswith('.shard') for f in files)} sealed + "
                  f"{sum(f.endswith('.open') for f in files)} open shards, {size / 1e6:.1f} MB")
        elif args.action == "verify":
            problems = reader.verify(
                lambda keys, name=ns.name: tqdm(keys, desc=f"verify {name}", unit="rec", leave=False))
            for line in problems:
                print(f"BAD {line}")
            print(f"{ns.name}: {len(reader)} records, {len(problems)} problems")
            status |= bool(problems)
        elif args.action == "compact":
            old = [f for f in files if f.endswith((".shard", ".index", ".open"))]
            writer_id = f"compact{int(time.time())}"
            kept = 0
            # rewrite every readable record once into fresh shards, dropping damaged ones
            with CacheWriter(args.root, ns, writer_id=writer_id, skip_existing=False) as writer:
                for key in tqdm(reader.keys(), desc=f"compact {ns.name}", unit="rec"):
                    try:
                        payload = reader.get(key)
                    except ValueError as exc:
                        print(f"dropped {exc}")
                        continue
                    kept += writer.put(key, payload)
            for f in old:
                reader.storage.remove(f"{ns.name}/{f}")
            print(f"{ns.name}: {kept} records in fresh shards; removed {len(old)} old files")
        else:
            _export(reader, args.out or Path(f"{ns.name}.safetensors"))
    return status


def _export(reader, out: Path) -> None:
    """Decoded fixed-width tensors of every record, plus keys and row offsets."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from logitcast.ops import SparseTargets
    from logitcast.ops.codec import decode

    keys, parts = [], []
    for key, payload in tqdm(reader.scan(), total=len(reader), desc="export", unit="rec"):
        keys.append(torch.frombuffer(bytearray(key), dtype=torch.uint8))
        parts.append(decode(payload))
    t = SparseTargets.cat(parts)
    offsets = torch.tensor([0] + [len(p) for p in parts]).cumsum(0)
    save_file({"keys": torch.stack(keys), "row_offsets": offsets, "ids": t.ids,
               "weights": t.weights, "counts": t.counts, "num_entries": t.num_entries,
               "num_head": t.num_head, "draws": t.draws, "tail_mass": t.tail_mass,
               "logprob": t.logprob, "entropy": t.entropy}, str(out),
              metadata={"vocab_size": str(t.vocab_size), "namespace": reader.namespace.name})
    print(f"exported {len(parts)} records, {len(t)} positions to {out}")
