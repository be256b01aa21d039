"""Token shards: a tokenized corpus on disk, written once, memory-mapped by every rank.

Layout of a shard directory (version 1):
    manifest.json             tokenizer fingerprint, vocab size, EOS id, dtype, shards,
                              and the sources already tokenized (for resuming)
    shard-00000.tokens        token ids, little-endian uint16 (V <= 65536) or uint32
    shard-00000.offsets       int64 little-endian [documents + 1] start offsets
Shards and the manifest are written to a temporary name, fsynced and renamed, so
a killed `logitcast tokenize` leaves a consistent directory and resumes from the
sources it had not finished. Documents are stored without separators; packing
adds EOS. This module knows nothing about packing or teachers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from logitcast.cache import LocalStorage

FORMAT, VERSION = "logitcast-tokens", 1
MANIFEST = "manifest.json"


class ShardError(ValueError):
    """A shard directory is missing, corrupt, or does not match what was asked for."""


@dataclass
class ShardWriter:
    """Appends tokenized documents; `commit_source` marks a source done once flushed."""

    directory: Path
    tokenizer_fingerprint: str
    vocab_size: int
    eos_id: int
    shard_tokens: int = 64 << 20
    _docs: list[np.ndarray] = field(default_factory=list)
    _sources: list[str] = field(default_factory=list)
    _manifest: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = "<u2" if self.vocab_size <= 1 << 16 else "<u4"
        path = self.directory / MANIFEST
        if path.exists():
            self._manifest = read_manifest(self.directory)
            for key, want in (("tokenizer_fingerprint", self.tokenizer_fingerprint),
                              ("vocab_size", self.vocab_size)):
                if self._manifest[key] != want:
                    raise ShardError(f"{path}: {key} is {self._manifest[key]!r}, resuming with "
                                     f"{want!r}; use a new directory")
        else:
            self._manifest = {"format": FORMAT, "version": VERSION,
                              "tokenizer_fingerprint": self.tokenizer_fingerprint,
                              "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                              "dtype": self.dtype, "shards": [], "done_sources": []}

    @property
    def done_sources(self) -> set[str]:
        return set(self._manifest["done_sources"])

    def add(self, tokens: list[int] | np.ndarray) -> None:
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ShardError(f"token id outside [0, {self.vocab_size})")
        if arr.size:
            self._docs.append(arr)

    def commit_source(self, source: str) -> None:
        """`source` is fully added; flush when the pending tokens fill a shard."""
        self._sources.append(source)
        if sum(d.size for d in self._docs) >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._sources and not self._docs:
            return
        name = f"shard-{len(self._manifest['shards']):05d}"
        lengths = np.array([d.size for d in self._docs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
        tokens = (np.concatenate(self._docs) if self._docs else np.zeros(0, np.int64))
        storage = LocalStorage(self.directory)
        storage.write_atomic(f"{name}.tokens", tokens.astype(self.dtype).tobytes())
        storage.write_atomic(f"{name}.offsets", offsets.tobytes())
        self._manifest["shards"].append({"name": name, "documents": int(lengths.size),
                                         "tokens": int(tokens.size)})
        self._manifest["done_sources"].extend(self._sources)
        storage.write_atomic(MANIFEST, json.dumps(self._manifest, indent=1).encode())
        self._docs, self._sources = [], []


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ShardError(f"{path} not found: not a token shard directory") from exc
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ShardError(f"{path}: format {manifest.get('format')!r} version "
                         f"{manifest.get('version')!r}, expected {FORMAT!r} {VERSION}")
    return manifest


class TokenCorpus:
    """Read-only, memory-mapped view of a shard directory: documents by global index."""

    def __init__(self, directory: str | Path, *, tokenizer_fingerprint: str | None = None) -> None:
        self.directory = Path(directory)
        m = read_manifest(self.directory)
        if tokenizer_fingerprint is not None and m["tokenizer_fingerprint"] != tokenizer_fingerprint:
            raise ShardError(f"{self.directory} was tokenized with tokenizer "
                             f"{m['tokenizer_fingerprint']}, expected {tokenizer_fingerprint}")
        self.tokenizer_fingerprint = m["tokenizer_fingerprint"]
        self.vocab_size, self.eos_id = int(m["vocab_size"]), int(m["eos_id"])
        self._tokens, starts, lengths = [], [], []
        for shard in m["shards"]:
            tok_path = self.directory / f"{shard['name']}.tokens"
            off_path = self.directory / f"{shard['name']}.offsets"
            item = np.dtype(m["dtype"]).itemsize
            if not tok_path.exists() or tok_path.stat().st_size != shard["tokens"] * item:
                raise ShardError(f"{tok_path} is missing or has the wrong size")
            if not off_path.exists() or off_path.stat().st_size != (shard["documents"] + 1) * 8:
                raise ShardError(f"{off_path} is missing or has the wrong size")
            offsets = np.fromfile(off_path, dtype="<i8")
            if offsets[0] != 0 or offsets[-1] != shard["tokens"] or (np.diff(offsets) < 0).any():
                raise ShardError(f"{off_path} offsets are inconsistent")
            tokens = (np.memmap(tok_path, dtype=m["dtype"], mode="r") if shard["tokens"]
                      else np.zeros(0, m["dtype"]))
            self._tokens.append(tokens)
            starts.append(offsets[:-1])
            lengths.append(np.diff(offsets))
        self._shard_of = np.concatenate([np.full(len(s), i) for i, s in enumerate(starts)]
                                        ) if starts else np.zeros(0, np.int64)
        self._start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)

    @property
    def num_documents(self) -> int:
        return int(self.lengths.size)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def document(self, i: int) -> np.ndarray:
        """int64 token ids of document i."""
        s = self._start[i]
        return np.asarray(self._tokens[self._shard_of[i]][s:s + self.lengths[i]], dtype=np.int64)
