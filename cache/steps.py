"""Step logs: which teacher training step each recorded target comes from.

A trainer recording its own targets (PD §3.5, `logitcast.trainer.record`) writes
ordinary cache records, byte for byte what a teacher server would write, so the
step cannot live in the payload. Each recording writer keeps a step log beside
its shards in the namespace directory, `<writer id>.steps.jsonl`:

    {"format": "logitcast-steps", "version": 1, "run": "<run name>", "writer": "<id>"}
    {"step": 12, "keys": ["<row key hex>", ...], "digests": ["<blake2b-8 hex>", ...]}

one line per recorded micro-batch, appended (one `write` per line) after its
records were handed to the writer, so a kill leaves at most a torn last line
(ignored with a warning; a writer resuming the log truncates it first) and
records whose line never got written (served without a step, never inside a
step window). A key recorded again at a later step has several entries; the
highest step wins (the last line among equal steps), and the digest of its
payload picks that copy among the stored ones. Any other unreadable line is a
`StepLogError` naming the file and line. JSON only, never pickle. Writing
needs a local cache directory; reading works on any `Storage`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from logitcast.cache.namespace import KEY_BYTES
from logitcast.cache.records import check_writer_id
from logitcast.cache.storage import Storage

logger = logging.getLogger(__name__)

FORMAT = "logitcast-steps"
VERSION = 1
SUFFIX = ".steps.jsonl"
STEP_LOG_NAME = re.compile(r"(?P<writer>[A-Za-z0-9_]+)\.steps\.jsonl")
DIGEST_BYTES = 8


class StepLogError(ValueError):
    """A step log is unreadable (not a torn last line); the message names file and line."""


def payload_digest(payload: bytes) -> bytes:
    """blake2b-64 of a record's payload: which stored copy a step-log entry means."""
    return hashlib.blake2b(payload, digest_size=DIGEST_BYTES).digest()


@dataclass(frozen=True)
class StepEntry:
    step: int
    digest: bytes


def check_step_window(steps) -> tuple[int, int]:
    """(lo, hi) of a window of teacher steps [lo, hi); ValueError naming what is wrong."""
    ok = (isinstance(steps, (list, tuple)) and len(steps) == 2
          and all(isinstance(x, int) and not isinstance(x, bool) for x in steps))
    if not ok:
        raise ValueError(f"a step window is two integers [lo, hi), got {steps!r}")
    lo, hi = steps
    if not 0 <= lo < hi:
        raise ValueError(f"a step window [lo, hi) needs 0 <= lo < hi, got [{lo}, {hi})")
    return lo, hi


def _header(run: str, writer_id: str) -> dict:
    return {"format": FORMAT, "version": VERSION, "run": run, "writer": writer_id}


def _parse(lines: list[bytes], name: str) -> tuple[dict, list[tuple[int, dict]]]:
    """(header, [(line number, entry)]) of complete lines; raises StepLogError."""
    out = []
    header = None
    for number, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StepLogError(f"step log {name} line {number}: not JSON ({exc})") from None
        if number == 1:
            if not isinstance(obj, dict) or obj.get("format") != FORMAT:
                raise StepLogError(f"step log {name} line 1: not a {FORMAT} header: {obj!r:.80}")
            if obj.get("version") != VERSION:
                raise StepLogError(f"step log {name}: version {obj.get('version')!r}, this "
                                   f"reader knows {VERSION}")
            header = obj
            continue
        ok = (isinstance(obj, dict) and isinstance(obj.get("step"), int) and obj["step"] >= 0
              and isinstance(obj.get("keys"), list) and isinstance(obj.get("digests"), list)
              and len(obj["keys"]) == len(obj["digests"]))
        if not ok:
            raise StepLogError(f"step log {name} line {number}: expected step, keys and "
                               f"digests, got {line[:80]!r}")
        out.append((number, obj))
    if header is None:
        raise StepLogError(f"step log {name} has no header line")
    return header, out


def _split(data: bytes, name: str) -> tuple[list[bytes], int]:
    """Complete lines and the byte length they cover (a torn tail is logged and left out)."""
    end = data.rfind(b"\n") + 1
    if end < len(data):
        logger.warning("step log %s: ignoring a torn last entry of %d bytes (a writer killed "
                       "mid-line)", name, len(data) - end)
    return data[:end].splitlines(), end


def read_step_logs(storage: Storage, directory: str) -> tuple[dict[bytes, StepEntry], set[str]]:
    """({row key: latest StepEntry}, run names) of every step log in a namespace
    directory; empty when it holds none (targets not recorded during training)."""
    latest: dict[bytes, StepEntry] = {}
    runs: set[str] = set()
    for name in sorted(storage.list(directory)):
        if not STEP_LOG_NAME.fullmatch(name):
            continue
        path = f"{directory}/{name}"
        lines, _ = _split(storage.read(path), path)
        if not lines:
            continue
        header, entries = _parse(lines, path)
        runs.add(str(header.get("run")))
        for number, entry in entries:
            step = entry["step"]
            for k, d in zip(entry["keys"], entry["digests"]):
                try:
                    key, digest = bytes.fromhex(k), bytes.fromhex(d)
                except (TypeError, ValueError):
                    key = digest = b""
                if len(key) != KEY_BYTES or len(digest) != DIGEST_BYTES:
                    raise StepLogError(f"step log {path} line {number}: bad key or digest "
                                       f"{k!r:.40} / {d!r:.20}")
                old = latest.get(key)
                if old is None or step >= old.step:
                    latest[key] = StepEntry(step, digest)
    return latest, runs


class StepLogWriter:
    """Appends one writer's step log in a local namespace directory (the caller owns the
    writer id: `CacheWriter` holds its lock)."""

    def __init__(self, directory: str | Path, *, writer_id: str, run: str) -> None:
        """Opens (or resumes) `<directory>/<writer_id>.steps.jsonl`; a torn last line
        is truncated; a log of another run or an unreadable one raises StepLogError."""
        self.path = Path(directory) / f"{check_writer_id(writer_id)}{SUFFIX}"
        head = (json.dumps(_header(run, writer_id)) + "\n").encode()
        if self.path.exists() and self.path.stat().st_size:
            lines, end = _split(self.path.read_bytes(), str(self.path))
            if lines:
                header, _ = _parse(lines, str(self.path))
                if header.get("run") != run:
                    raise StepLogError(f"step log {self.path} belongs to run "
                                       f"{header.get('run')!r}, not {run!r}")
                os.truncate(self.path, end)
            else:
                os.truncate(self.path, 0)
        self._file = open(self.path, "ab", buffering=0)
        if self._file.tell() == 0:
            self._file.write(head)

    def append(self, step: int, keys: list[bytes], digests: list[bytes]) -> None:
        """One line: `keys` were recorded at teacher step `step` (payload `digests`)."""
        line = json.dumps({"step": int(step), "keys": [k.hex() for k in keys],
                           "digests": [d.hex() for d in digests]}, separators=(",", ":"))
        data = (line + "\n").encode()
        if self._file.write(data) != len(data):
            raise OSError(f"short write to {self.path}")

    def close(self) -> None:
        if not self._file.closed:
            os.fsync(self._file.fileno())
            self._file.close()
