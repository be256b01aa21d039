"""`logitcast cache stats|verify|compact|export ROOT`: inspect and maintain a target cache.

ROOT is a directory or an fsspec URL (s3://bucket/prefix; credentials from the
environment). `verify --repair` quarantines damaged shards (salvaging their
readable records) and rewrites damaged or missing index runs; `compact` seals
shards dead writers left open and merges index runs. Neither touches the files
of a writer another process holds (docs/cache-format.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["stats", "verify", "compact", "export"])
    p.add_argument("root", help="cache directory or URL (holds one folder per namespace)")
    p.add_argument("--namespace", default=None, help="only this namespace (directory name)")
    p.add_argument("--repair", action="store_true",
                   help="verify: quarantine damaged shards and rewrite damaged index runs")
    p.add_argument("--out", type=Path, default=None, help="export: output .safetensors file")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from logitcast.cache import CacheReader, list_namespaces, open_storage
    from logitcast.cache.maintenance import compact, verify

    storage = open_storage(args.root)
    namespaces = [ns for ns in list_namespaces(storage) if args.namespace in (None, ns.name)]
    if not namespaces:
        raise SystemExit(f"no cache namespaces in {storage.url}")
    status = 0
    for ns in namespaces:
        if args.action == "stats":
            reader = CacheReader(storage, ns)
            files = storage.list(ns.name)
            size = sum(storage.size(f"{ns.name}/{f}") for f in files
                       if f.endswith((".shard", ".open", ".index")))
            print(f"{ns.name}: teacher {ns.teacher_id}, spec {ns.spec.key()}, documents "
                  f"{ns.document_mode}: {len(reader)} records, "
                  f"{sum(f.endswith('.shard') for f in files)} sealed + "
                  f"{sum(f.endswith('.open') for f in files)} open shards, "
                  f"{sum(f.endswith('.index') for f in files)} index runs, {size / 1e6:.1f} MB")
            reader.close()
        elif args.action == "verify":
            problems = verify(storage, ns, repair=args.repair, progress=lambda xs, name=ns.name:
                              tqdm(xs, desc=f"verify {name}", unit="shard", leave=False))
            for line in problems:
                print(f"BAD {line}")
            print(f"{ns.name}: {len(problems)} problems" + (", repaired" if args.repair and
                                                           problems else ""))
            status |= bool(problems) and not args.repair
        elif args.action == "compact":
            done = compact(storage, ns)
            print(f"{ns.name}: sealed {done['sealed']} open shards of dead writers; merged "
                  f"{done['merged']} index runs into one of {done['entries']} entries; "
                  f"{done['skipped_live']} live writers left alone")
        else:
            reader = CacheReader(storage, ns)
            _export(reader, args.out or Path(f"{ns.name}.safetensors"))
            reader.close()
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
        parts.append(decode(bytes(payload)))
    t = SparseTargets.cat(parts)
    offsets = torch.tensor([0] + [len(p) for p in parts]).cumsum(0)
    save_file({"keys": torch.stack(keys), "row_offsets": offsets, "ids": t.ids,
               "weights": t.weights, "counts": t.counts, "num_entries": t.num_entries,
               "num_head": t.num_head, "draws": t.draws, "tail_mass": t.tail_mass,
               "logprob": t.logprob, "entropy": t.entropy}, str(out),
              metadata={"vocab_size": str(t.vocab_size), "namespace": reader.namespace.name})
    print(f"exported {len(parts)} records, {len(t)} positions to {out}")
