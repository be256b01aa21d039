"""Reliability suite: real `logitcast serve` child processes fuzzed, overloaded, read slowly
and killed, on 127.0.0.1.

- fuzz: seeded requests from several threads, each with a deadline: wrong shapes, negative
  and huge ids, huge row counts, every TargetSpec field at and past its limits, truncated
  and garbage bytes, wrong codec versions and teacher ids, decreasing document ids, random
  metadata, good and bad bearer tokens. Clean = a status in `CLEAN` (UNAUTHENTICATED
  exactly when the token was bad) within the deadline and, for OK, every row in order
  with its CRC and row key; anything else is listed with its request (`FuzzCases(info,
  seed).case(i)` rebuilds it). Then: the server is alive, its RSS grew <= 10 % (after a
  warm-up vs after the fuzz), fixed requests return the bytes they returned before. A
  short burst hits the real teacher (SmolLM2, fp32) the same way.
- overload: 64 clients at once, each sending requests one after another until it has
  asked for 4x the queue token budget: the excess must get RESOURCE_EXHAUSTED, every
  admitted stream must deliver all its rows, and the server's peak RSS must stay
  <= (memory budget + RSS after warm-up) * 1.2.
- slow reader: fast clients' tokens/s with and without one client taking a chunk per
  second, runs alternated (`slow_reader_ratio` = median of with / without); peak RSS.
- kills: a `TeacherClient` streams 200 steps from servers A and B while A is SIGKILLed
  (once its /metrics show a stream open, or after a wait) and restarted on its port 20
  times: no step lost or duplicated, every step's codec bytes equal to the same steps
  fetched from B alone.

    python bench/reliability.py [--quick]

Last line: RESULT fuzz_requests=.. fuzz_unclean=.. fuzz_crashes=.. rss_growth=..
overload_ok=.. slow_reader_ratio=.. kills=.. lost=.. duplicated=.. identical=..
The kills set the wall time: each restart is a fresh process (~10 s of imports on 2
cores), so they run in a background thread beside the other scenarios. The suite
reports what it finds and fixes nothing; tests/e2e/test_reliability.py runs the same
functions with smaller counts.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import torch
from google.protobuf import text_format
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_corpus, write_results

from logitcast.cli.serve import start_server_process
from logitcast.client.teacher_client import TeacherClient
from logitcast.data.packing import Packer, PackingConfig
from logitcast.data.shards import TokenCorpus
from logitcast.ops import METHODS, TargetSpec
from logitcast.ops.codec import VERSION, decode, encode
from logitcast.ops.rowkey import row_key
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.protos.convert import MAX_MESSAGE_BYTES, rows_to_proto, spec_to_proto
from logitcast.server.fleet import free_port

S = grpc.StatusCode
#: Statuses a well-behaved server may answer any request with.
CLEAN = frozenset({S.OK, S.INVALID_ARGUMENT, S.FAILED_PRECONDITION, S.NOT_FOUND,
                   S.RESOURCE_EXHAUSTED})
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", -1)]
SERVICE = "/logitcast.v1.Teacher/"

# ---------------------------------------------------------------------------- child servers


@dataclass
class Child:
    """A `logitcast serve` child process."""

    proc: Any
    address: str
    info: pb.InfoResponse
    args: list[str]
    log: Path

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)


def serve(args: list[str], log: Path, *, port: int | None = None, threads: int = 1) -> Child:
    """Start `logitcast serve ARGS` (1 torch thread: clients share the 2 cores)."""
    proc, address, info = start_server_process(args, log, threads=threads, port=port,
                                               timeout_s=240)
    return Child(proc, address, info, args, log)


class PeakRss:
    """Samples a process's RSS every `every_s` in a thread while in the `with` block."""

    def __init__(self, pid: int, every_s: float = 0.01) -> None:
        self.process, self.every_s, self.peak = psutil.Process(pid), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def bearer(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


def distill_request(tokens: torch.Tensor, spec: TargetSpec | pb.TargetSpec, *,
                    docs: torch.Tensor | None = None, **fields) -> pb.DistillRequest:
    fields.setdefault("codec_version", VERSION)
    msg = spec if isinstance(spec, pb.TargetSpec) else spec_to_proto(spec)
    return pb.DistillRequest(rows=rows_to_proto(tokens, docs), spec=msg, **fields)


def stream_problem(request: pb.DistillRequest, chunks: list[pb.DistillChunk], *,
                   complete: bool = True) -> str | None:
    """What is wrong with the chunks of a stream for `request`, or None: rows in order (all
    of them when `complete`), CRCs, the row keys of the tokens sent, payloads that decode
    to row_count x seq_len positions."""
    rows, seq = request.rows.rows, request.rows.seq_len
    tokens = np.frombuffer(request.rows.tokens, dtype="<i4").reshape(rows, seq)
    at = 0
    for c in chunks:
        if c.row_start != at or c.row_count < 1 or at + c.row_count > rows:
            return f"chunk rows {c.row_start}+{c.row_count} after {at} of {rows}"
        if zlib.crc32(c.payload) != c.crc32:
            return f"chunk {c.row_start}: CRC mismatch"
        if list(c.row_keys) != [row_key(t) for t in tokens[at:at + c.row_count]]:
            return f"chunk {c.row_start}: row keys are not those of the tokens sent"
        if len(decode(c.payload)) != c.row_count * seq:
            return f"chunk {c.row_start}: payload is not {c.row_count}x{seq} positions"
        at += c.row_count
    return None if at == rows or not complete else f"stream ended after {at} of {rows} rows"


def fetch_bytes(stub, request: pb.DistillRequest, metadata: tuple = (),
                timeout: float = 120) -> list[tuple]:
    """Everything a client can compare of a stream: (row_start, row_count, payload, keys)."""
    return [(c.row_start, c.row_count, c.payload, tuple(c.row_keys))
            for c in stub.Distill(request, timeout=timeout, metadata=metadata)]


# ---------------------------------------------------------------------------- fuzz cases

NAN, INF = float("nan"), float("inf")
REAL_EDGES = (0.0, -0.0, 5e-324, 1e-300, 1e-30, 1e-3, 0.00999, 0.01, 0.5, 0.95, 1.0,
              1.0 + 2**-52, 2.0, 12.0, 100.0, 100.001, 127.5, 128.0, 128.0001, 65535.0, 65536.0,
              1e30, 1e300, -1e-9, -1.0, NAN, INF, -INF)
SEED_EDGES = (0, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1)
INT32_EDGES = (-(2**31), -(2**31) + 1, -1, 2**31 - 1)
WEIRD_METHODS = ("", "bogus", "TOPK", "top-k", "sample\x00", "full ", "héad_tail", "x" * 300)
SPEC_REALS = ("p", "unique", "proposal_t", "temperature")
SPEC_UINTS = ("k", "draws", "max_draws", "k_head")
METADATA_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-_."
RESERVED_KEYS = ("te", "content-type", "host", "user-agent", "authorization")
PRINTABLE = bytes(0x20 + b % 95 for b in range(256))  # any byte -> a legal header character


@dataclass(frozen=True)
class FuzzCase:
    """One fuzz request, rebuilt exactly by `FuzzCases(info, seed=..).case(index)`."""

    index: int
    kind: str
    rpc: str
    """Distill, Score or Info."""
    request: Any
    """A request message, or bytes sent as they are."""
    metadata: tuple = ()
    authorized: bool = True
    """False when the bearer token sent is missing or wrong (auth on)."""

    def text(self, limit: int = 400) -> str:
        if isinstance(self.request, bytes):
            body = f"{len(self.request)} raw bytes {self.request[:48].hex()}"
        else:
            body = text_format.MessageToString(self.request, as_one_line=True)
        md = [(k, f"{len(v)} chars" if len(v) > 40 else v) for k, v in self.metadata]
        return f"#{self.index} {self.kind} {self.rpc}({body[:limit]}) metadata={md}"


class FuzzCases:
    """Seeded generator of fuzz requests for one server (its Info gives the limits)."""

    KINDS = {  # kind -> weight
        "valid": 5, "valid_documents": 1.5, "valid_at_limit": 0.15, "score_valid": 1,
        "spec": 22, "shape": 8, "ids": 6, "huge_rows": 6, "bytes": 16, "codec": 4,
        "teacher": 4, "documents": 6, "extras": 5, "score_bad": 4, "info_bytes": 2,
    }

    def __init__(self, info: pb.InfoResponse, *, seed: int, token: str | None = None,
                 oversize_every: int = 5000) -> None:
        self.info, self.seed, self.token, self.oversize_every = info, seed, token, oversize_every
        self.vocab = info.vocab_size
        self.max_seq = min(info.max_seq_len, info.max_tokens)
        self._kinds, self._weights = zip(*self.KINDS.items())

    def case(self, index: int) -> FuzzCase:
        rng = random.Random(self.seed * 1_000_003 + index)
        if self.oversize_every and index % self.oversize_every == self.oversize_every - 1:
            kind = "oversize"
            rpc, request = "Distill", bytes(MAX_MESSAGE_BYTES + 1024)
        else:
            kind = rng.choices(self._kinds, self._weights)[0]
            rpc, request = getattr(self, f"_{kind}")(rng)
        metadata, authorized = self._metadata(rng)
        return FuzzCase(index, kind, rpc, request, metadata, authorized)

    # -- pieces

    def _tokens(self, rng: random.Random, rows: int, seq: int) -> torch.Tensor:
        g = np.random.default_rng(rng.getrandbits(32))
        return torch.from_numpy(g.integers(0, self.vocab, (rows, seq)))

    def _small(self, rng: random.Random) -> torch.Tensor:
        return self._tokens(rng, rng.randint(1, 2), rng.randint(1, 24))

    def _target_spec(self, rng: random.Random, *, valid: bool = False) -> pb.TargetSpec:
        if valid:
            method = rng.choice(METHODS)
            spec = {"full": TargetSpec(method="full"),
                    "topk": TargetSpec(method="topk", k=rng.choice((1, 12, 64))),
                    "top_p_k": TargetSpec(method="top_p_k", k=rng.choice((1, 20)),
                                          p=rng.choice((0.5, 0.95, 1.0))),
                    "sample": TargetSpec(method="sample", unique=rng.choice((1.0, 12.0, 100.0)),
                                         proposal_t=rng.choice((1.0, 0.5))),
                    "head_tail": TargetSpec(method="head_tail", k_head=rng.choice((1, 4)),
                                            draws=rng.choice((1, 16, 128)), unique=None),
                    }[method]
            return spec_to_proto(spec)
        method = rng.choice(METHODS) if rng.random() < 0.85 else rng.choice(WEIRD_METHODS)
        msg = pb.TargetSpec(method=method)
        u32 = (0, 1, 2, 12, 64, 127, 128, 129, 255, 256, self.vocab - 1, self.vocab,
               self.vocab + 1, 65535, 65536, 2**31, 2**32 - 1)
        for name in SPEC_UINTS + SPEC_REALS + ("seed",):
            if rng.random() < 0.4:
                if name == "seed":
                    value = rng.choice(SEED_EDGES) if rng.random() < 0.7 else rng.getrandbits(64)
                elif name in SPEC_UINTS:
                    value = rng.choice(u32) if rng.random() < 0.8 else rng.getrandbits(32)
                else:
                    value = (rng.choice(REAL_EDGES) if rng.random() < 0.8
                             else math.ldexp(rng.random(), rng.randint(-1074, 1023)))
                setattr(msg, name, value)
        return msg

    def _metadata(self, rng: random.Random) -> tuple[tuple, bool]:
        md: list = []
        authorized = True
        if self.token:
            roll = rng.random()
            if roll < 0.9:
                md.append(("authorization", f"Bearer {self.token}"))
            else:
                authorized = False
                md += rng.choice([[], [("authorization", f"Bearer {self.token}x")],
                                  [("authorization", f"bearer {self.token}")],
                                  [("authorization", self.token)], [("authorization", "Bearer ")],
                                  [("authorization", f"Bearer {self.token[:-1]}")],
                                  [("authorization-bin", self.token.encode())]])
        if rng.random() < 0.3:
            for _ in range(rng.randint(1, 4)):
                key = "".join(rng.choices(METADATA_CHARS, k=rng.randint(1, 24)))
                if key.startswith("grpc-") or key in RESERVED_KEYS:
                    continue
                size = rng.choice((0, 1, 16, 200, 2000)) if rng.random() < 0.97 else 20000
                if rng.random() < 0.2:
                    md.append((key + "-bin", rng.randbytes(size)))
                else:
                    md.append((key, rng.randbytes(size).translate(PRINTABLE).decode()))
        return tuple(md), authorized

    # -- kinds: each returns (rpc, request)

    def _valid(self, rng):
        return "Distill", distill_request(self._small(rng), self._target_spec(rng, valid=True),
                                        rows_per_chunk=rng.choice((0, 1, 2)),
                                        extras=rng.choice(([], ["logprob"], ["entropy"],
                                                           ["logprob", "entropy"])))

    def _valid_documents(self, rng):
        tokens = self._small(rng)
        g = np.random.default_rng(rng.getrandbits(32))
        docs = torch.from_numpy(np.sort(g.integers(-3, 4, tokens.shape), axis=1))
        return "Distill", distill_request(tokens, self._target_spec(rng, valid=True), docs=docs)

    def _valid_at_limit(self, rng):
        seq = rng.choice((1, self.max_seq))
        rows = max(1, min(self.info.max_rows, self.info.max_tokens // seq))
        spec = rng.choice((TargetSpec(method="full"), TargetSpec(method="sample", draws=128,
                                                                 unique=None)))
        return "Distill", distill_request(self._tokens(rng, rows, seq), spec)

    def _score_valid(self, rng):
        return "Score", pb.ScoreRequest(rows=rows_to_proto(
            self._tokens(rng, rng.randint(1, 2), rng.randint(2, 24))))

    def _spec(self, rng):
        return "Distill", distill_request(self._small(rng), self._target_spec(rng),
                                        rows_per_chunk=rng.choice((0, 1)))

    def _shape(self, rng):
        tokens = self._small(rng)
        msg = distill_request(tokens, self._target_spec(rng, valid=rng.random() < 0.5))
        r, s = tokens.shape
        choice = rng.randrange(7)
        if choice == 0:
            msg.rows.tokens = msg.rows.tokens[:-rng.randint(1, 4 * r * s)]
        elif choice == 1:
            msg.rows.tokens += rng.randbytes(rng.randint(1, 9))
        elif choice == 2:
            msg.rows.rows, msg.rows.seq_len = rng.choice(((0, s), (r, 0), (0, 0)))
        elif choice == 3:
            msg.rows.rows, msg.rows.seq_len = s, r
        elif choice == 4:
            msg.ClearField("rows")
        elif choice == 5:
            msg.rows.seq_len = self.info.max_seq_len + rng.choice((1, 2**20, 2**32 - 1 -
                                                                   self.info.max_seq_len))
        else:
            msg.rows.document_ids = rng.randbytes(rng.choice((1, 3, 4 * r * s - 4, 4 * r * s + 4)))
        return "Distill", msg

    def _ids(self, rng):
        tokens = self._small(rng)
        bad = [self.vocab, self.vocab + 1, *INT32_EDGES, rng.randint(-(2**31), -1),
               rng.randint(self.vocab, 2**31 - 1)]
        flat = tokens.view(-1)
        for _ in range(rng.randint(1, flat.numel())):
            flat[rng.randrange(flat.numel())] = rng.choice(bad)
        return "Distill", distill_request(tokens, self._target_spec(rng, valid=True))

    def _huge_rows(self, rng):
        msg = distill_request(self._small(rng), self._target_spec(rng, valid=True))
        limit_rows, limit_tokens = self.info.max_rows, self.info.max_tokens
        msg.rows.rows = rng.choice((limit_rows + 1, limit_tokens + 1, 2**16, 2**31, 2**32 - 1))
        msg.rows.seq_len = rng.choice((1, 2, msg.rows.seq_len, 2**31, 2**32 - 1))
        if rng.random() < 0.3:  # bytes that match the claimed shape when that is small
            n = msg.rows.rows * msg.rows.seq_len
            if n * 4 <= 1 << 22:
                msg.rows.tokens = bytes(4 * n)
        return "Distill", msg

    def _bytes(self, rng):
        good = self._valid(rng)[1].SerializeToString()
        choice = rng.randrange(8)
        if choice == 0:
            data = rng.randbytes(rng.randint(0, 4096))
        elif choice == 1:
            data = good[:rng.randrange(len(good))]
        elif choice == 2:
            data = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        elif choice == 3:
            data = good + rng.randbytes(rng.randint(1, 64))
        elif choice == 4:
            data = b"\x0b" * rng.randint(64, 5000)  # nested start-group tags
        elif choice == 5:
            data = b"\x0a" + b"\xff" * rng.randint(4, 12)  # a length prefix past the end
        elif choice == 6:
            data = bytes([rng.choice((0x08, 0x0d, 0x1a, 0x20, 0x2a))]) + rng.randbytes(
                rng.randint(0, 32))  # wrong wire types for known fields
        else:
            data = b""
        return rng.choice(("Distill", "Distill", "Distill", "Score")), data

    def _codec(self, rng):
        version = rng.choice((0, VERSION - 1, VERSION + 1, 2**31, 2**32 - 1))
        return "Distill", distill_request(self._small(rng), self._target_spec(rng, valid=True),
                                        codec_version=version)

    def _teacher(self, rng):
        tid = self.info.teacher_id
        teacher = rng.choice((tid + "x", tid[:-1], tid.upper(), "é" * 64, "x" * 10000,
                              tid + "\x00", " " + tid))
        return "Distill", distill_request(self._small(rng), self._target_spec(rng, valid=True),
                                        teacher_id=teacher)

    def _documents(self, rng):
        tokens = self._tokens(rng, rng.randint(1, 2), rng.randint(2, 24))
        g = np.random.default_rng(rng.getrandbits(32))
        docs = np.sort(g.integers(-5, 5, tokens.shape), axis=1)
        r, c = rng.randrange(docs.shape[0]), rng.randrange(1, docs.shape[1])
        docs[r, c] = docs[r, c - 1] - rng.choice((1, 2, 2**31))  # one step down
        docs = np.clip(docs, -(2**31), 2**31 - 1)
        msg = distill_request(tokens, self._target_spec(rng, valid=True))
        msg.rows.document_ids = docs.astype("<i4").tobytes()
        return "Distill", msg

    def _extras(self, rng):
        msg = distill_request(self._small(rng), self._target_spec(rng, valid=True))
        choice = rng.randrange(3)
        if choice == 0:
            msg.extras.extend(rng.choice((["logprob", "logprob"], ["bogus"], [""],
                                          ["entropy", "x" * 1000], ["LOGPROB"])))
        elif choice == 1:
            msg.rows_per_chunk = rng.choice((2**31, 2**32 - 1, 10**6))
        else:
            msg.extras.extend(["logprob"] * rng.randint(1, 200))
        return "Distill", msg

    def _score_bad(self, rng):
        tokens = self._tokens(rng, rng.randint(1, 2), rng.randint(1, 8))
        msg = pb.ScoreRequest(rows=rows_to_proto(tokens))
        choice = rng.randrange(4)
        if choice == 0:
            msg.rows.seq_len, msg.rows.rows = 1, tokens.numel()
        elif choice == 1:
            msg.rows.document_ids = bytes(len(msg.rows.tokens))
        elif choice == 2:
            msg.rows.rows = rng.choice((0, 2**32 - 1))
        else:
            msg.rows.tokens = np.full(tokens.numel(), rng.choice(INT32_EDGES), "<i4").tobytes()
        return "Score", msg

    def _info_bytes(self, rng):
        return "Info", rng.randbytes(rng.randint(0, 256))


# ---------------------------------------------------------------------------- fuzz runs


def send_case(channel, stub, case: FuzzCase, deadline_s: float) -> tuple[Any, str, str | None]:
    """(status, details, problem with an OK answer or None) of one case."""
    kw = {"timeout": deadline_s, "metadata": case.metadata}
    try:
        if isinstance(case.request, bytes):  # no serializer: the bytes go out as they are
            if case.rpc == "Distill":
                for _ in channel.unary_stream(SERVICE + "Distill")(case.request, **kw):
                    pass
            else:
                channel.unary_unary(SERVICE + case.rpc)(case.request, **kw)
            return S.OK, "", None
        if case.rpc == "Distill":
            return S.OK, "", stream_problem(case.request, list(stub.Distill(case.request, **kw)))
        if case.rpc == "Score":
            sums = stub.Score(case.request, **kw).logprob_sum
            rows = case.request.rows.rows
            return S.OK, "", None if len(sums) == rows else f"{len(sums)} sums for {rows} rows"
        stub.Info(case.request, **kw)
        return S.OK, "", None
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def verdict(case: FuzzCase, code, problem: str | None) -> str | None:
    """Why the answer to `case` is unclean, or None."""
    if not case.authorized:  # only the message size check may come before auth
        if code in (S.UNAUTHENTICATED, S.RESOURCE_EXHAUSTED):
            return None
        return f"{code.name} without a valid token"
    if code not in CLEAN:
        return code.name
    return problem


def run_cases(address: str, cases: FuzzCases, indices: range, *, threads: int,
              deadline_s: float) -> dict:
    """Send cases[indices] from `threads` client threads (one channel each)."""
    lock, it = threading.Lock(), iter(indices)
    codes: Counter = Counter()
    by_kind: dict[str, Counter] = {}
    unclean: list[dict] = []
    generator_errors: list[str] = []
    slowest = [0.0]

    def worker() -> None:
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.TeacherStub(channel)
            while True:
                with lock:
                    index = next(it, None)
                if index is None:
                    return
                try:
                    case = cases.case(index)
                except Exception as exc:  # a bug of this generator, not of the server
                    with lock:
                        generator_errors.append(f"#{index}: {type(exc).__name__}: {exc}")
                    continue
                t0 = time.monotonic()
                code, details, problem = send_case(channel, stub, case, deadline_s)
                seconds = time.monotonic() - t0
                why = verdict(case, code, problem)
                with lock:
                    codes[code.name] += 1
                    by_kind.setdefault(case.kind, Counter())[code.name] += 1
                    slowest[0] = max(slowest[0], seconds)
                    if why is not None:
                        unclean.append({"index": index, "why": why, "status": code.name,
                                        "details": details[:300], "seconds": round(seconds, 3),
                                        "request": case.text()})

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return {"requests": sum(codes.values()), "codes": dict(codes.most_common()),
            "by_kind": {k: dict(v.most_common()) for k, v in sorted(by_kind.items())},
            "unclean": sorted(unclean, key=lambda u: u["index"]),
            "slowest_s": round(slowest[0], 3), "generator_errors": generator_errors[:20]}


def reference_requests(info: pb.InfoResponse) -> list[pb.DistillRequest]:
    """Fixed well-formed requests (rows and document mode, three methods)."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, info.vocab_size, (4, 32), generator=g)
    docs = torch.tensor([0] * 10 + [1] * 22).repeat(4, 1)
    return [
        distill_request(tokens, TargetSpec(method="sample", unique=12.0), rows_per_chunk=1),
        distill_request(tokens, TargetSpec(method="head_tail", k_head=4, draws=32, unique=None,
                                           seed=7), docs=docs, extras=["logprob", "entropy"]),
        distill_request(tokens, TargetSpec(method="top_p_k", k=20, p=0.9, temperature=2.0)),
    ]


def heavy_requests(info: pb.InfoResponse, methods: tuple[str, ...]) -> list:
    """The largest well-formed requests the server's limits allow: the warm-up's peak."""
    seq = min(info.max_seq_len, info.max_tokens)
    rows = max(1, min(info.max_rows, info.max_tokens // seq))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, info.vocab_size, (rows, seq), generator=g)
    specs = [TargetSpec(method="sample", draws=128, unique=None)]
    if "full" in methods:
        specs.append(TargetSpec(method="full"))
    return ([distill_request(tokens, s) for s in specs]
            + [pb.ScoreRequest(rows=rows_to_proto(tokens))])


def fuzz(child: Child, *, requests: int, seed: int, threads: int, deadline_s: float,
         token: str | None = None, warmup: int = 500, full_allowed: bool = False) -> dict:
    """The fuzz scenario against a running child (see the module docstring)."""
    md = bearer(token)
    refs = reference_requests(child.info)
    with grpc.insecure_channel(child.address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.TeacherStub(channel)
        before = [fetch_bytes(stub, r, md) for r in refs]
        for heavy in heavy_requests(child.info, ("full",) if full_allowed else ()):
            call = stub.Distill if isinstance(heavy, pb.DistillRequest) else stub.Score
            try:
                result = call(heavy, timeout=300, metadata=md)
                if isinstance(heavy, pb.DistillRequest):
                    list(result)
            except grpc.RpcError as exc:
                print(f"  warm-up request: {exc.code().name} {exc.details()}")
    run_cases(child.address, FuzzCases(child.info, seed=seed + 1, token=token, oversize_every=0),
              range(warmup), threads=threads, deadline_s=deadline_s)
    rss_warm = child.rss()
    t0 = time.perf_counter()
    out = run_cases(child.address, FuzzCases(child.info, seed=seed, token=token), range(requests),
                    threads=threads, deadline_s=deadline_s)
    seconds = time.perf_counter() - t0
    alive = child.alive()
    rss_after = child.rss() if alive else None
    identical = False
    if alive:
        with grpc.insecure_channel(child.address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.TeacherStub(channel)
            try:
                identical = [fetch_bytes(stub, r, md) for r in refs] == before
            except grpc.RpcError as exc:
                out["after_fuzz_error"] = f"{exc.code().name}: {exc.details()}"
    unclean = out.pop("unclean")
    return {**out, "unclean": unclean[:100], "unclean_count": len(unclean),
            "seconds": round(seconds, 2), "requests_per_s": round(requests / seconds, 1),
            "threads": threads, "deadline_s": deadline_s, "seed": seed,
            "teacher": child.info.teacher_id, "crashed": not alive,
            "exit_code": child.proc.poll(), "rss_warm_bytes": rss_warm,
            "rss_after_bytes": rss_after,
            "rss_growth": None if rss_after is None else round(rss_after / rss_warm - 1, 4),
            "identical_after": identical}


# ---------------------------------------------------------------------------- overload


def _read_all(stub, request, md, deadline_s) -> tuple[Any, str, list]:
    chunks: list = []
    try:
        for c in stub.Distill(request, timeout=deadline_s, metadata=md):
            chunks.append(c)
        return S.OK, "", chunks
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", chunks


def overload(child: Child, *, queue_tokens: int, queue_bytes: int, rows: int, seq_len: int,
             clients: int = 64, token: str | None = None, deadline_s: float = 300) -> dict:
    """`clients` threads at once, each sending requests of rows x seq_len tokens (`full`
    and `sample` in turn) until it has asked for 4 x queue_tokens; RSS sampled meanwhile."""
    md = bearer(token)
    specs = (TargetSpec(method="full"), TargetSpec(method="sample", unique=12.0))
    per_client = max(1, 4 * queue_tokens // (rows * seq_len))
    vocab = child.info.vocab_size
    with grpc.insecure_channel(child.address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.TeacherStub(channel)
        for spec in specs:  # warm-up
            _read_all(stub, distill_request(torch.randint(0, vocab, (rows, seq_len)), spec,
                                            rows_per_chunk=1), md, deadline_s)
    rss_warm = child.rss()
    barrier = threading.Barrier(clients)
    lock = threading.Lock()
    outcomes: Counter = Counter()
    problems: list[str] = []

    def client(c: int) -> None:
        g = torch.Generator().manual_seed(c)
        with grpc.insecure_channel(child.address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.TeacherStub(channel)
            barrier.wait(timeout=120)
            for a in range(per_client):
                req = distill_request(torch.randint(0, vocab, (rows, seq_len), generator=g),
                                      specs[(c + a) % 2], rows_per_chunk=1)
                code, details, chunks = _read_all(stub, req, md, deadline_s)
                problem = None
                if code == S.OK:
                    problem = stream_problem(req, chunks)
                    what = "completed" if problem is None else "incomplete"
                elif code == S.RESOURCE_EXHAUSTED and not chunks:
                    what = "refused"
                else:
                    problem, what = f"{code.name} after {len(chunks)} chunks: {details}", "broken"
                with lock:
                    outcomes[what] += 1
                    if problem:
                        problems.append(f"client {c} request {a}: {problem}"[:300])

    pool = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    t0 = time.perf_counter()
    with PeakRss(child.proc.pid) as peak:
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    if sum(outcomes.values()) != clients * per_client:
        problems.append(f"{sum(outcomes.values())} of {clients * per_client} requests answered")
    bound = (queue_bytes + rss_warm) * 1.2
    ok = (outcomes["completed"] > 0 and outcomes["refused"] > 0 and not problems
          and peak.peak <= bound and child.alive())
    return {"ok": ok, "clients": clients, "requests_per_client": per_client,
            "request_tokens": rows * seq_len, "queue_tokens": queue_tokens,
            "queue_bytes": queue_bytes, "seconds": round(time.perf_counter() - t0, 2),
            "outcomes": dict(outcomes), "problems": problems[:50], "rss_warm_bytes": rss_warm,
            "rss_peak_bytes": peak.peak, "rss_bound_bytes": int(bound),
            "rss_peak_over_bound": round(peak.peak / bound, 4), "alive": child.alive()}


# ---------------------------------------------------------------------------- slow reader


def fast_clients(child: Child, *, clients: int, requests: int, rows: int, seq_len: int,
                 slow_rows: int = 0, slow_interval_s: float = 1.0, metrics_port: int | None = None,
                 token: str | None = None, deadline_s: float = 300) -> dict:
    """Tokens/s of `clients` threads each streaming `requests` requests as fast as they can.

    With slow_rows > 0, one more client first asks for slow_rows x seq_len `full` targets
    and takes one chunk per slow_interval_s until the others are done (then cancels). The
    others start once the server produces about one row per interval for it (its /metrics
    token count): until then the transport (socket buffers, HTTP/2 windows) takes its
    chunks as fast as anyone's, so it is not yet a slow reader to the server."""
    md = bearer(token)
    spec = TargetSpec(method="sample", unique=12.0)
    vocab = child.info.vocab_size
    started, stop = threading.Event(), threading.Event()
    slow: dict = {}

    def slow_client() -> None:
        req = distill_request(torch.randint(0, vocab, (slow_rows, seq_len)),
                              TargetSpec(method="full"), rows_per_chunk=1)
        chunks: list = []
        with grpc.insecure_channel(child.address, options=CHANNEL_OPTIONS) as channel:
            call = pb_grpc.TeacherStub(channel).Distill(req, timeout=deadline_s, metadata=md)
            try:
                for c in call:
                    chunks.append(c)
                    started.set()
                    if stop.wait(slow_interval_s):
                        break
                slow["status"] = "OK" if len(chunks) == slow_rows else "cancelled by the client"
            except grpc.RpcError as exc:
                slow["status"] = f"{exc.code().name}: {exc.details()}"
            finally:
                call.cancel()
                started.set()
        slow.update(chunks=len(chunks), problem=stream_problem(req, chunks, complete=False))

    barrier = threading.Barrier(clients + 1)
    lock = threading.Lock()
    done = Counter()
    problems: list[str] = []

    def fast_client(c: int) -> None:
        g = torch.Generator().manual_seed(100 + c)
        reqs = [distill_request(torch.randint(0, vocab, (rows, seq_len), generator=g), spec,
                                rows_per_chunk=1) for _ in range(requests)]
        with grpc.insecure_channel(child.address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.TeacherStub(channel)
            barrier.wait(timeout=120)
            for req in reqs:
                code, details, chunks = _read_all(stub, req, md, deadline_s)
                problem = stream_problem(req, chunks) if code == S.OK else f"{code.name}: {details}"
                with lock:
                    done["requests"] += 1
                    done["tokens"] += rows * seq_len if problem is None else 0
                    if problem:
                        problems.append(problem[:300])

    slow_thread = threading.Thread(target=slow_client, daemon=True) if slow_rows else None
    rss_before = child.rss()
    with PeakRss(child.proc.pid) as peak:
        if slow_thread is not None:
            t_fill = time.perf_counter()
            tokens_before = metric(metrics_port, "logitcast_teacher_tokens") if metrics_port else 0
            slow_thread.start()
            started.wait(60)
            if metrics_port is not None:  # quiet: about the row per interval it reads
                slow["fill_tokens"] = wait_until_quiet(
                    metrics_port, "logitcast_teacher_tokens",
                    max_per_s=2 * seq_len / slow_interval_s) - tokens_before
            slow["fill_s"] = round(time.perf_counter() - t_fill, 2)
        pool = [threading.Thread(target=fast_client, args=(c,), daemon=True)
                for c in range(clients)]
        for t in pool:
            t.start()
        barrier.wait(timeout=120)
        t0 = time.perf_counter()
        for t in pool:
            t.join()
        seconds = time.perf_counter() - t0
        stop.set()
        if slow_thread is not None:
            slow_thread.join(timeout=60)
    if done["requests"] != clients * requests:
        problems.append(f"{done['requests']} of {clients * requests} requests answered")
    return {"tokens_per_s": done["tokens"] / seconds, "seconds": round(seconds, 3),
            "problems": problems[:20], "slow": slow or None, "rss_before_bytes": rss_before,
            "rss_peak_bytes": peak.peak}


def slow_reader(child: Child, *, pairs: int, slow_rows: int, **load) -> dict:
    """`pairs` runs of `fast_clients` without and with the slow reader, in alternating
    order; ratio = median over pairs of (with / without) tokens/s of the fast clients."""
    runs = []
    for i in range(pairs):
        pair = {slow: fast_clients(child, slow_rows=slow_rows if slow else 0, **load)
                for slow in ((False, True) if i % 2 == 0 else (True, False))}
        runs.append({"without": pair[False], "with": pair[True],
                     "ratio": pair[True]["tokens_per_s"] / pair[False]["tokens_per_s"]})
    with_runs = [r["with"] for r in runs]
    return {"ratio": round(statistics.median(r["ratio"] for r in runs), 4), "pairs": runs,
            "load": {**load, "slow_rows": slow_rows},
            "rss_peak_bytes": max(r["rss_peak_bytes"] for r in with_runs),
            "rss_before_bytes": min(r["rss_before_bytes"] for r in with_runs),
            "problems": sum(len(r[k]["problems"]) for r in runs for k in ("with", "without")),
            "slow_problems": [r["slow"]["problem"] for r in with_runs if r["slow"]["problem"]]}


# ---------------------------------------------------------------------------- kills


def metric(metrics_port: int, name: str) -> float:
    """A metric of a server (summed over labels), read from its /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=2).read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return sum(s.value for s in family.samples if not s.name.endswith("_created"))
    return 0.0


def wait_until_quiet(metrics_port: int, name: str, *, max_per_s: float, window_s: float = 2.0,
                     timeout_s: float = 60.0) -> float:
    """Until the counter `name` grew by at most max_per_s over the last window_s (or
    timeout_s passed); returns its value then."""
    deadline = time.monotonic() + timeout_s
    history: list[tuple[float, float]] = []
    while True:
        now, value = time.monotonic(), metric(metrics_port, name)
        history.append((now, value))
        old = [v for t, v in history if t <= now - window_s]
        if (old and value - old[-1] <= max_per_s * window_s) or now > deadline:
            return value
        time.sleep(0.1)


class Killer(threading.Thread):
    """SIGKILLs a child while it streams (or after `wait_s` without a stream) and restarts
    it on the same port, `kills` times or until `stop` is set. `up` is set while the
    child serves, clear while it is being restarted."""

    def __init__(self, child: Child, metrics_port: int, *, kills: int, log_dir: Path,
                 wait_s: float = 15.0, stop: threading.Event | None = None) -> None:
        super().__init__(daemon=True)
        self.child, self.metrics_port, self.kills = child, metrics_port, kills
        self.log_dir, self.wait_s = log_dir, wait_s
        self.stop = stop or threading.Event()
        self.up = threading.Event()
        self.up.set()
        self.done = self.mid_stream = 0
        self.up_times: list[float] = []
        self.boots: list[float] = []
        self.error: str | None = None

    def run(self) -> None:
        try:
            for i in range(self.kills):
                up_since = time.monotonic()
                deadline = up_since + self.wait_s
                streaming = False
                while not self.stop.is_set() and time.monotonic() < deadline:
                    try:
                        streaming = metric(self.metrics_port,
                                           "logitcast_teacher_inflight_requests") > 0
                    except OSError:
                        streaming = False
                    if streaming:
                        break
                    time.sleep(0.01)
                if self.stop.is_set():
                    return
                self.up.clear()
                self.child.kill()
                self.done += 1
                self.mid_stream += streaming
                self.up_times.append(time.monotonic() - up_since)
                t0 = time.monotonic()
                self.child = serve(self.child.args, self.log_dir / f"restart-{i}.log",
                                   port=self.child.port)
                self.boots.append(time.monotonic() - t0)
                self.up.set()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.up.set()  # never leave the consumer waiting


def kill_server_args(metrics_port: int) -> list[str]:
    """Server A of the kills scenario: the tiny teacher, /metrics on loopback."""
    return ["--model", "tiny", "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]


def kills(a: Child, b: Child, a_metrics_port: int, work: Path, *, steps: int, kills: int,
          seq_len: int, batch: int, token: str | None = None, wait_s: float = 8.0,
          pace_limit_s: float = 3.0, stop: threading.Event | None = None) -> dict:
    """A `TeacherClient` streams `steps` steps from [a, b] while `Killer` kills and restarts
    `a` `kills` times. The consumer waits while `a` restarts (the steps already prefetched
    fail over to b meanwhile) and paces itself while `a` is up, so that every kill falls
    while steps flow and the kills spread over the stream; when a kill is behind its due
    step (`kills_due`) it slows to `pace_limit_s` a step until that kill lands. The
    reference is the same steps from b alone (never killed), fetched meanwhile. Setting
    `stop` ends the kills early; `a`'s last incarnation is killed on the way out."""
    info = b.info
    corpus_dir = work / "tokens"
    random_corpus(corpus_dir, info.tokenizer_fingerprint, info.vocab_size, docs=400)
    packer = Packer(TokenCorpus(corpus_dir), PackingConfig(seq_len=seq_len, global_batch=batch))
    spec = TargetSpec(method="sample", unique=12.0)

    def client(addresses: list[str]) -> TeacherClient:
        return TeacherClient(addresses, spec, tokenizer_fingerprint=info.tokenizer_fingerprint,
                             vocab_size=info.vocab_size, prefetch=4, max_tries=12,
                             backoff_s=0.05, timeout_s=120, auth_token=token)

    reference: list[bytes] = []
    errors: list[str] = []

    def kills_due(delivered: int) -> int:
        """Kills that should have landed once `delivered` steps are consumed: kill i is due
        by step (i + 1) * steps / (kills + 1), so the last one leaves steps to spare."""
        return min(kills, delivered * (kills + 1) // steps)

    def fetch_reference() -> None:
        try:
            with client([b.address]) as c:
                reference.extend(encode(s.targets) for s in c.stream(packer.batch(i)
                                                                      for i in range(steps)))
        except Exception as exc:
            errors.append(f"reference: {type(exc).__name__}: {exc}")

    ref_thread = threading.Thread(target=fetch_reference, daemon=True)
    killer = Killer(a, a_metrics_port, kills=kills, log_dir=work, wait_s=wait_s, stop=stop)
    got: list[tuple[int, bytes]] = []
    retries: dict = {}
    t0 = time.monotonic()
    try:
        ref_thread.start()
        with client([a.address, b.address]) as c:
            killer.start()
            try:
                for s, item in enumerate(c.stream(packer.batch(i) for i in range(steps))):
                    got.append((item.batch.step, encode(item.targets)))
                    if killer.stop.is_set():
                        break
                    left = kills - killer.done
                    if left > 0 and killer.is_alive():
                        killer.up.wait(timeout=600)
                        if killer.done < kills_due(s + 1):
                            # behind schedule (a restarted server is slower to be seen
                            # streaming than the last kill predicted): slow down until the
                            # due kill lands, so no kill is left for after the last step
                            time.sleep(pace_limit_s)
                            continue
                        up_s = statistics.mean(killer.up_times) if killer.up_times else wait_s / 2
                        time.sleep(min(pace_limit_s, up_s * left / max(1, steps - s - 1)))
            except Exception as exc:  # the client gave up: the steps it did not deliver are lost
                errors.append(f"stream: {type(exc).__name__}: {exc}")
            retries = {s.labels.get("code", "?"): s.value for m in c.metrics.retries.collect()
                       for s in m.samples if s.name.endswith("_total")}
        seconds = time.monotonic() - t0
    finally:
        killer.stop.set()
        killer.join(timeout=300)
        ref_thread.join(timeout=300)
        killer.child.kill()
    delivered = [step for step, _ in got]
    lost = len(set(range(steps)) - set(delivered))
    duplicated = len(delivered) - len(set(delivered))
    identical = (len(reference) == steps and delivered == list(range(steps))
                 and all(payload == reference[step] for step, payload in got))
    return {"steps": steps, "kills": killer.done, "kills_mid_stream": killer.mid_stream,
            "killer_error": killer.error, "errors": errors,
            "lost": lost, "duplicated": duplicated,
            "identical": identical, "in_order": delivered == sorted(delivered),
            "rows_per_step": batch, "seq_len": seq_len, "seconds": round(seconds, 1),
            "restart_boot_s": round(statistics.mean(killer.boots), 2) if killer.boots else None,
            "up_before_kill_s": (round(statistics.mean(killer.up_times), 2)
                                 if killer.up_times else None),
            "client_retries": retries}


# ---------------------------------------------------------------------------- main

#: Sizes of the two modes.
MODES = {
    True: {"fuzz": 10_000, "real_fuzz": 300, "threads": 8, "warmup": 500,
           "overload_rows": 4, "overload_seq": 256, "slow_pairs": 4, "slow_requests": 16,
           "steps": 200, "kills": 20, "kill_seq": 64, "kill_batch": 2, "kill_wait_s": 4.0},
    False: {"fuzz": 20_000, "real_fuzz": 1000, "threads": 8, "warmup": 1000,
            "overload_rows": 4, "overload_seq": 256, "slow_pairs": 5, "slow_requests": 16,
            "steps": 200, "kills": 20, "kill_seq": 128, "kill_batch": 4, "kill_wait_s": 10.0},
}
QUEUE_TOKENS, QUEUE_BYTES, STREAM_BUFFER = 4096, 24 << 20, 1 << 20
SLOW_QUEUE_BYTES, SLOW_STREAM_BUFFER = 64 << 20, 256 << 10
TOKEN = "reliability-token"


def shared_args(token_file: Path) -> list[str]:
    """The tiny server of fuzz and overload: auth on, `full` allowed, small request limits
    (at-limit requests stay cheap), small budgets (overload is reachable)."""
    return ["--model", "tiny", "--auth-token-file", str(token_file), "--allow-full",
            "--max-rows", "128", "--max-tokens", "4096", "--max-queue-tokens", str(QUEUE_TOKENS),
            "--max-queue-bytes", str(QUEUE_BYTES), "--stream-buffer-bytes", str(STREAM_BUFFER)]


def slow_args(metrics_port: int) -> list[str]:
    """The slow reader's tiny server: default queue, a small per-stream buffer, /metrics."""
    return ["--model", "tiny", "--allow-full", "--max-queue-bytes", str(SLOW_QUEUE_BYTES),
            "--stream-buffer-bytes", str(SLOW_STREAM_BUFFER), "--metrics-port", str(metrics_port),
            "--metrics-host", "127.0.0.1"]


REAL_ARGS = ["--model", "default", "--dtype", "fp32", "--max-rows", "16", "--max-tokens", "256"]
SLOW_LOAD = {"clients": 4, "rows": 8, "seq_len": 32, "slow_rows": 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    cfg = MODES[p.parse_args().quick]
    logging.getLogger("logitcast.client").setLevel(logging.ERROR)  # retries are counted instead
    quick = cfg is MODES[True]
    work = Path(tempfile.mkdtemp(prefix="logitcast-bench-reliability-"))
    token_file = work / "token"
    token_file.write_text(TOKEN + "\n")
    t_start = time.perf_counter()
    children: list[Child] = []
    results: dict = {}
    stop_kills = threading.Event()
    kill_thread = None
    try:
        booted: dict = {}

        def boot(name: str, args: list[str]) -> None:
            booted[name] = serve(args, work / f"{name}.log")
            children.append(booted[name])

        def boot_all(named: list[tuple[str, list[str]]]) -> list[threading.Thread]:
            threads = [threading.Thread(target=boot, args=n, daemon=True) for n in named]
            for t in threads:
                t.start()
            return threads

        a_metrics, slow_metrics = free_port(), free_port()
        for t in boot_all([("a", kill_server_args(a_metrics)), ("b", ["--model", "tiny"])]):
            t.join()

        def run_kills() -> None:  # the longest scenario (restarts): it runs beside the others
            try:
                results["kills"] = kills(booted["a"], booted["b"], a_metrics, work,
                                         steps=cfg["steps"], kills=cfg["kills"],
                                         seq_len=cfg["kill_seq"], batch=cfg["kill_batch"],
                                         wait_s=cfg["kill_wait_s"], stop=stop_kills)
            except Exception as exc:
                results["kills"] = {"error": f"{type(exc).__name__}: {exc}", "kills": 0,
                                    "lost": cfg["steps"], "duplicated": 0, "identical": False}

        kill_thread = threading.Thread(target=run_kills, daemon=True)
        kill_thread.start()
        for t in boot_all([("shared", shared_args(token_file)), ("slow", slow_args(slow_metrics)),
                           ("real", REAL_ARGS)]):
            t.join()
        print(f"servers up after {time.perf_counter() - t_start:.0f}s; kills running meanwhile")
        shared = booted["shared"]
        results["fuzz"] = fuzz(shared, requests=cfg["fuzz"], seed=0, threads=cfg["threads"],
                               deadline_s=60, token=TOKEN, warmup=cfg["warmup"],
                               full_allowed=True)
        report_fuzz("fuzz (tiny)", results["fuzz"])
        results["overload"] = overload(shared, queue_tokens=QUEUE_TOKENS, queue_bytes=QUEUE_BYTES,
                                       rows=cfg["overload_rows"], seq_len=cfg["overload_seq"],
                                       token=TOKEN)
        o = results["overload"]
        print(f"overload: ok={o['ok']} {o['outcomes']} peak RSS {o['rss_peak_bytes'] >> 20} MiB "
              f"<= bound {o['rss_bound_bytes'] >> 20} MiB: {o['rss_peak_over_bound'] <= 1}")
        results["slow_reader"] = slow_reader(booted["slow"], pairs=cfg["slow_pairs"],
                                             requests=cfg["slow_requests"],
                                             metrics_port=slow_metrics, **SLOW_LOAD)
        sr = results["slow_reader"]
        print(f"slow reader: ratio {sr['ratio']:.3f} (pairs "
              f"{[round(r['ratio'], 3) for r in sr['pairs']]}), peak RSS "
              f"{sr['rss_peak_bytes'] >> 20} MiB from {sr['rss_before_bytes'] >> 20} MiB")
        results["fuzz_real"] = fuzz(booted["real"], requests=cfg["real_fuzz"], seed=10,
                                    threads=4, deadline_s=120, warmup=50)
        report_fuzz("fuzz (real teacher)", results["fuzz_real"])
        kill_thread.join(timeout=900)
        k = results.get("kills") or {"error": "did not finish", "kills": 0, "lost": cfg["steps"],
                                     "duplicated": 0, "identical": False}
        results["kills"] = k
        print(f"kills: {k}")
    finally:
        stop_kills.set()  # on the way out after an error: no restarts behind our back
        if kill_thread is not None:
            kill_thread.join(timeout=300)
        for child in children:
            child.kill()
        shutil.rmtree(work, ignore_errors=True)
    fz, fr, k = results["fuzz"], results["fuzz_real"], results["kills"]
    summary = {
        "fuzz_requests": fz["requests"] + fr["requests"],
        "fuzz_unclean": fz["unclean_count"] + fr["unclean_count"],
        "fuzz_crashes": int(fz["crashed"]) + int(fr["crashed"]),
        "rss_growth": max(g if g is not None else math.inf
                          for g in (fz["rss_growth"], fr["rss_growth"])),
        "overload_ok": int(results["overload"]["ok"]),
        "slow_reader_ratio": results["slow_reader"]["ratio"],
        "kills": k["kills"], "lost": k["lost"], "duplicated": k["duplicated"],
        "identical": int(bool(k["identical"]) and fz["identical_after"]
                         and fr["identical_after"]),
    }
    wall = time.perf_counter() - t_start
    path = write_results("reliability", {
        "config": {"quick": quick, **cfg, "queue_tokens": QUEUE_TOKENS, "queue_bytes": QUEUE_BYTES,
                   "stream_buffer_bytes": STREAM_BUFFER, "shared_server": shared_args(Path("T")),
                   "slow_server": slow_args(0), "real_server": REAL_ARGS,
                   "kill_server": kill_server_args(0)},
        "wall_s": round(wall, 1), "summary": summary, **results}, suffix="-quick" if quick else "")
    print(f"results: {path} ({wall:.0f}s)")
    print("RESULT " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in summary.items()))


def report_fuzz(name: str, f: dict) -> None:
    print(f"{name}: {f['requests']} requests in {f['seconds']}s, {f['codes']}; unclean "
          f"{f['unclean_count']}, crashed {f['crashed']}, RSS {f['rss_warm_bytes'] >> 20} -> "
          f"{(f['rss_after_bytes'] or 0) >> 20} MiB ({f['rss_growth']}), same bytes after: "
          f"{f['identical_after']}")
    for u in f["unclean"][:5]:
        print(f"  unclean: {u['why']} ({u['details'][:120]}) <- {u['request'][:300]}")


if __name__ == "__main__":
    main()
