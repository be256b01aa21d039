"""Score files: the per-piece log-prob sums of one selection plan, appended as they arrive.

Layout of a scores directory (version 1):
    plan.json     everything that decides a piece's score: corpus, unit, seq_len, seed,
                  reference split, each side's model, tokenizer and piece count
    scores.log    frames, one per scored batch: uint32 length | msgpack {"side": str,
                  "pieces": int64 LE bytes, "sums": float64 LE bytes} | uint32 crc32
    scores.npy    written when scoring completes: float64 [instances], the difference
                  score of each instance (NaN: not a candidate), for people and notebooks
A kill leaves at most a torn last frame, cut off on the next open, so a rerun scores
only the pieces that are missing; a complete frame that fails its CRC is corruption
and raises `ScoreFileError` naming the file and offset. A plan that differs from the
one on disk is refused (another corpus or model would mix scores). No pickle:
msgpack and JSON only, and numpy loads with allow_pickle=False. This module knows
nothing about models, corpora or selection.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import msgpack
import numpy as np

from logitcast.cache import LocalStorage

FORMAT, VERSION = "logitcast-scores", 1
PLAN, LOG, COLUMN = "plan.json", "scores.log", "scores.npy"
_HEAD = struct.Struct("<I")


class ScoreFileError(ValueError):
    """A scores directory is corrupt or belongs to another plan."""


class ScoreLog:
    """The scores of one plan: `sums[side]` float64 [pieces], NaN until scored."""

    def __init__(self, directory: str | Path, plan: dict) -> None:
        """plan: JSON-able; plan["sides"][side]["pieces"] is that side's piece count."""
        self.directory = Path(directory)
        self.plan = {"format": FORMAT, "version": VERSION, **plan}
        self.directory.mkdir(parents=True, exist_ok=True)
        storage = LocalStorage(self.directory)
        path = self.directory / PLAN
        if path.exists():
            try:
                on_disk = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ScoreFileError(f"{path} is not valid JSON: {exc}") from exc
            if on_disk != self.plan:
                keys = sorted(k for k in set(on_disk) | set(self.plan)
                              if on_disk.get(k) != self.plan.get(k))
                raise ScoreFileError(
                    f"{self.directory} holds scores of another plan (differs in {keys}); "
                    f"use another scores directory or delete this one")
        else:
            storage.write_atomic(PLAN, json.dumps(self.plan, indent=1).encode())
        self.sums = {side: np.full(int(s["pieces"]), np.nan)
                     for side, s in self.plan["sides"].items()}
        self._read()
        self._file = open(self.directory / LOG, "ab")  # closed in close()

    def _read(self) -> None:
        path = self.directory / LOG
        if not path.exists():
            return
        data = path.read_bytes()
        at = 0
        while at < len(data):
            if at + _HEAD.size > len(data):
                break
            (n,) = _HEAD.unpack_from(data, at)
            end = at + _HEAD.size + n + 4
            if end > len(data):
                break  # torn tail: the frame a kill interrupted
            payload = data[at + _HEAD.size:end - 4]
            if zlib.crc32(payload) != _HEAD.unpack_from(data, end - 4)[0]:
                raise ScoreFileError(f"{path}: frame at byte {at} fails its CRC check "
                                     f"(corrupt score file; delete it to rescore)")
            self._apply(payload, path, at)
            at = end
        if at < len(data):
            with open(path, "r+b") as f:
                f.truncate(at)

    def _apply(self, payload: bytes, path: Path, at: int) -> None:
        try:
            rec = msgpack.unpackb(payload, raw=False)
            side, pieces = rec["side"], np.frombuffer(rec["pieces"], "<i8")
            sums = np.frombuffer(rec["sums"], "<f8")
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise ScoreFileError(f"{path}: frame at byte {at} is not a score record ({exc})"
                                 ) from exc
        if side not in self.sums or pieces.shape != sums.shape or (
                pieces.size and (pieces.min() < 0 or pieces.max() >= self.sums[side].size)):
            raise ScoreFileError(f"{path}: frame at byte {at} names pieces outside the plan")
        self.sums[side][pieces] = sums

    def missing(self, side: str) -> np.ndarray:
        """int64 indices of `side`'s pieces not scored yet."""
        return np.flatnonzero(np.isnan(self.sums[side]))

    def append(self, side: str, pieces: np.ndarray, sums: np.ndarray) -> None:
        """Record a scored batch durably (flushed and fsynced) before it counts as done."""
        pieces, sums = np.asarray(pieces, "<i8"), np.asarray(sums, "<f8")
        payload = msgpack.packb({"side": side, "pieces": pieces.tobytes(),
                                 "sums": sums.tobytes()})
        self._file.write(_HEAD.pack(len(payload)) + payload + _HEAD.pack(zlib.crc32(payload)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.sums[side][pieces] = sums

    def write_column(self, scores: np.ndarray) -> None:
        """scores.npy: the finished difference scores (atomic)."""
        tmp = self.directory / f".{COLUMN}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(scores, "<f8"), allow_pickle=False)
        os.replace(tmp, self.directory / COLUMN)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ScoreLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
