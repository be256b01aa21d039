"""Turn text into token shards with the teacher's tokenizer: files, JSONL, Parquet, HF datasets.

Sources are processed in sorted order and recorded as done once their tokens
are flushed to a shard, so an interrupted run resumes where it stopped. A
document is one text file, one JSONL line, one Parquet row or one dataset row.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from logitcast.data.shards import ShardWriter

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ""}


def list_sources(inputs: list[Path]) -> list[Path]:
    """Files under `inputs` (files or directories), sorted, deduplicated."""
    out: set[Path] = set()
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            out.update(f for f in p.rglob("*") if f.is_file())
        elif p.is_file() or (p / "dataset_info.json").exists():
            out.add(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    return sorted(out)


def documents(source: Path, text_field: str = "text") -> Iterator[str]:
    """Texts of one source, by its suffix (.jsonl, .parquet, a saved HF dataset, else text)."""
    if source.is_dir():
        from datasets import load_from_disk  # optional: only for HF datasets

        for row in load_from_disk(str(source)):
            yield row[text_field]
    elif source.suffix == ".jsonl":
        with open(source, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise ValueError(f"{source}:{n}: no {text_field!r} string ({exc})") from exc
    elif source.suffix == ".parquet":
        import pyarrow.parquet as pq  # optional: only for Parquet

        for batch in pq.ParquetFile(source).iter_batches(columns=[text_field]):
            yield from batch.column(0).to_pylist()
    else:
        try:
            yield source.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            logger.warning("skipping %s: not UTF-8 text", source)


def tokenize_sources(sources: list[Path], out: Path, tokenizer: Any, fingerprint: str, *,
                     vocab_size: int, text_field: str = "text",
                     shard_tokens: int = 64 << 20) -> ShardWriter:
    """Tokenize every source not yet done in `out`; returns the (flushed) writer."""
    writer = ShardWriter(out, fingerprint, vocab_size, tokenizer.eos_token_id,
                         shard_tokens=shard_tokens)
    todo = [s for s in sources if str(s) not in writer.done_sources]
    if len(todo) < len(sources):
        logger.info("resuming: %d of %d sources already tokenized", len(sources) - len(todo),
                    len(sources))
    for source in tqdm(todo, desc="tokenize", unit="file"):
        for text in documents(source, text_field):
            if text:
                writer.add(tokenizer(text, add_special_tokens=False)["input_ids"])
        writer.commit_source(str(source))
    writer.flush()
    return writer
