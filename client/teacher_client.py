"""`TeacherClient`: sparse targets for the trainer's exact rows, ahead of time, failing over.

For each step the client looks the rows up in the cache, sends the misses to
the fleet (one server-streaming Distill call), verifies every chunk (CRC and
the server's echo of each row's content hash), writes fetched rows back to the
cache, and decodes to tensors on the trainer's device. A window of upcoming
steps is fetched in the background; steps are delivered exactly once, in
order. UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED / INTERNAL are
retried on the next address with jittered backoff, asking only for the rows not
yet received; anything else (a bad request), or too many tries, raises.

It knows nothing about training: it takes `PackedBatch`es, gives `StepTargets`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import random
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from logitcast.cache import CacheNamespace, TargetCache
from logitcast.client.metrics import ClientMetrics
from logitcast.client.steps import StepTargets, batch_units, is_padding, prefetched
from logitcast.data.packing import PackedBatch
from logitcast.ops import SparseTargets, TargetSpec
from logitcast.ops.codec import VERSION, decode, encode
from logitcast.ops.rowkey import row_key
from logitcast.protos import teacher_pb2 as pb
from logitcast.protos import teacher_pb2_grpc as pb_grpc
from logitcast.protos.convert import (
    MAX_MESSAGE_BYTES,
    rows_to_proto,
    spec_to_proto,
)

logger = logging.getLogger(__name__)

#: Retried on the next address (bounded by max_tries): draining or unhealthy replicas,
#: deadlines, overload (budgets, OOM, a stalled stream) and teacher faults, which one
#: sick replica may produce while its health check catches up.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)


class TeacherMismatchError(RuntimeError):
    """The fleet serves a different tokenizer, vocabulary or codec than the trainer uses."""


class TeacherUnavailableError(RuntimeError):
    """No server delivered a step's targets within the allowed tries."""


class CorruptStreamError(RuntimeError):
    """A chunk failed its CRC, echoed other row hashes, or the stream ended early."""


class MemoryTargetCache:
    """In-memory stand-in for the target cache: key bytes -> codec payload."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            return self._data.get(key)

    def put(self, key: bytes, payload: bytes) -> None:
        with self._lock:
            self._data.setdefault(key, payload)

    def __len__(self) -> int:
        return len(self._data)


def is_local_target(address: str) -> bool:
    """Whether a gRPC target reaches only this machine: a unix socket, `localhost`,
    127.0.0.0/8 or ::1, written `host:port`, `[::1]:port`, `ipv4:`/`ipv6:` (every
    address listed) or `dns:[//authority/]host:port`."""
    def loopback(hostport: str) -> bool:
        if hostport.startswith("["):
            host = hostport[1:].partition("]")[0]
        else:
            host = hostport if hostport.count(":") > 1 else hostport.partition(":")[0]
        if host.lower().rstrip(".") == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    scheme, sep, rest = address.partition(":")
    scheme = scheme.lower() if sep else ""
    if scheme in ("unix", "unix-abstract"):
        return True
    if scheme in ("ipv4", "ipv6"):
        return all(loopback(a) for a in rest.split(","))
    if scheme == "dns":
        return loopback(rest[2:].partition("/")[2] if rest.startswith("//") else rest)
    return loopback(address)


def retry_reason(exc: BaseException) -> str | None:
    """Why a failed call may be retried on the next address ("CODE: details"), or None
    when it must not be (a status outside RETRYABLE, or not an RPC/stream failure)."""
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}" if exc.code() in RETRYABLE else None
    if isinstance(exc, CorruptStreamError):
        return f"CORRUPT: {exc}"
    return None


def backoff_delay(backoff_s: float, attempt: int) -> float:
    """Seconds to wait before try `attempt + 1`: exponential (capped at 32x), jittered."""
    return backoff_s * (2 ** min(attempt, 5)) * (0.5 + random.random())


def fleet_infos(addresses: list[str], stubs: list, metadata) -> list[tuple[str, pb.InfoResponse]]:
    """(address, Info) of every reachable server; TeacherUnavailableError naming each
    failure when none answers."""
    found, errors = [], []
    for addr, stub in zip(addresses, stubs):
        try:
            found.append((addr, stub.Info(pb.InfoRequest(), timeout=30, metadata=metadata)))
        except grpc.RpcError as exc:
            errors.append(f"{addr}: {exc.code().name}")
    if not found:
        raise TeacherUnavailableError(f"no teacher reachable: {', '.join(errors)}")
    return found


def open_channels(addresses: list[str], *, auth_token: str | None = None,
                  tls_root_certs: bytes | None = None, application: str | None = None,
                  allow_insecure_auth: bool = False) -> tuple[list[grpc.Channel], list]:
    """(one channel per address, call metadata): what every client of the fleet opens.
    A bearer token goes unencrypted only to loopback addresses or with allow_insecure_auth;
    `application` names the Ray Serve application behind a gRPC proxy."""
    if not addresses:
        raise ValueError("at least one teacher address is needed")
    if auth_token and not tls_root_certs and not allow_insecure_auth:
        exposed = [a for a in addresses if not is_local_target(a)]
        if exposed:
            raise ValueError(
                f"refusing to send the bearer token unencrypted to {', '.join(exposed)}: "
                f"use TLS (tls_root_certs=...) or pass allow_insecure_auth=True")
    meta = [("authorization", f"Bearer {auth_token}")] if auth_token else []
    if application:
        meta.append(("application", application))
    opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    creds = grpc.ssl_channel_credentials(tls_root_certs) if tls_root_certs else None
    return [grpc.secure_channel(a, creds, options=opts) if creds
            else grpc.insecure_channel(a, options=opts) for a in addresses], meta


class TeacherClient:
    """Client of a teacher fleet (one or more addresses)."""

    def __init__(
        self,
        addresses: list[str],
        spec: TargetSpec,
        *,
        tokenizer_fingerprint: str,
        vocab_size: int,
        teacher_id: str | None = None,
        cache=None,
        prefetch: int = 4,
        max_tries: int = 6,
        timeout_s: float = 300.0,
        backoff_s: float = 0.1,
        extras: tuple[str, ...] = ("logprob",),
        device: str | torch.device = "cpu",
        auth_token: str | None = None,
        tls_root_certs: bytes | None = None,
        metrics: ClientMetrics | None = None,
        write_cache: bool = True,
        writer_id: str | None = None,
        application: str | None = None,
        allow_insecure_auth: bool = False,
    ) -> None:
        """cache: None, an object with get/put (e.g. MemoryTargetCache), or a cache root
        (a directory or an fsspec URL); a damaged record there is a miss, fetched again,
        re-written when write_cache, and counted in `metrics.cache_corrupt_records`.
        write_cache: also store fetched misses (single-machine setups; turn it off when
        the servers tee into the same cache). writer_id: this client's cache writer id
        (None: unique per process). application: the Ray Serve application name, sent as
        `application` metadata when the addresses are Ray Serve gRPC proxies.
        allow_insecure_auth: send `auth_token` without TLS to addresses off this machine
        (refused by default; loopback and unix sockets are always allowed)."""
        if prefetch < 1 or max_tries < 1:
            raise ValueError(f"prefetch and max_tries must be >= 1, got {prefetch}, {max_tries}")
        self.addresses, self.spec, self.cache = list(addresses), spec, cache
        self.write_cache, self.writer_id = write_cache, writer_id
        self.tokenizer_fingerprint, self.vocab_size = tokenizer_fingerprint, vocab_size
        self._disk_caches: dict[bool, TargetCache] = {}
        self._cache_lock = threading.Lock()
        self.prefetch, self.max_tries, self.timeout_s = prefetch, max_tries, timeout_s
        self.backoff_s, self.extras, self.device = backoff_s, extras, torch.device(device)
        self.metrics = metrics or ClientMetrics()
        self._channels, self._meta = open_channels(
            self.addresses, auth_token=auth_token, tls_root_certs=tls_root_certs,
            application=application, allow_insecure_auth=allow_insecure_auth)
        self._stubs = [pb_grpc.TeacherStub(c) for c in self._channels]
        self._pool = ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="teacher-client")
        self.teacher_id = self._check_fleet(tokenizer_fingerprint, vocab_size, teacher_id)

    # ------------------------------------------------------------------ connect

    def _check_fleet(self, fingerprint: str, vocab: int, teacher_id: str | None) -> str:
        """Info() on every reachable server; any mismatch is an error before training."""
        seen = None
        for addr, info in fleet_infos(self.addresses, self._stubs, self._meta):
            problems = []
            if info.tokenizer_fingerprint != fingerprint:
                problems.append(f"tokenizer {info.tokenizer_fingerprint} != trainer's {fingerprint}")
            if info.vocab_size != vocab:
                problems.append(f"vocab {info.vocab_size} != trainer's {vocab}")
            if VERSION not in info.codec_versions:
                problems.append(f"codecs {list(info.codec_versions)} lack version {VERSION}")
            if teacher_id and info.teacher_id != teacher_id:
                problems.append(f"teacher {info.teacher_id!r} != requested {teacher_id!r}")
            if seen is not None and info.teacher_id != seen:
                problems.append(f"teacher {info.teacher_id!r} differs from {seen!r} elsewhere")
            if problems:
                raise TeacherMismatchError(f"{addr}: " + "; ".join(problems))
            seen = info.teacher_id
        return seen

    # ------------------------------------------------------------------ steps

    def stream(self, batches: Iterable[PackedBatch]) -> Iterator[StepTargets]:
        """Targets for `batches` in order, fetching `prefetch` steps ahead."""
        return prefetched(self.fetch, batches, self._pool, self.prefetch, self.metrics)

    def fetch(self, batch: PackedBatch) -> StepTargets:
        """One step's targets now (cache first, then the fleet).

        Cache units are whole rows, or in document mode each document segment, so a
        student with another batch size, world size (or, for documents, seq_len)
        finds the same records.
        """
        units = batch_units(batch)
        cache = self._cache_for(batch.document_ids is not None)
        keys = [row_key(batch.input_ids[r, s:e]) for r, s, e in units]
        padding = [is_padding(batch, u) for u in units]
        payloads: list[bytes | None] = [
            b"" if pad else (cache.get(k) if cache else None) for k, pad in zip(keys, padding)]
        missing = [i for i, p in enumerate(payloads) if p is None]
        hits = len(keys) - len(missing)
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(len(missing))
        if missing:
            rows = sorted({units[i][0] for i in missing})
            fetched = dict(zip(rows, self._fetch_rows(batch, rows)))
            for i in missing:
                r, s, e = units[i]
                if batch.document_ids is None:
                    payloads[i] = fetched[r]
                else:  # one record per document segment
                    part = decode(fetched[r])[s:e]
                    payloads[i] = encode(part.pad_to(int(part.num_entries.max())),
                                         extras=self.extras)
                if cache is not None and self.write_cache:
                    cache.put(keys[i], payloads[i])
        targets = SparseTargets.cat([
            decode(p) if p else SparseTargets.empty(
                e - s, self.vocab_size, tail_from_counts=self.spec.proposal_t == 1.0)
            for p, (_, s, e) in zip(payloads, units)])
        if self.device.type == "cuda":
            targets = _pinned(targets).to(self.device, non_blocking=True)
        return StepTargets(batch, targets, hits)

    def _cache_for(self, document_mode: bool):
        if self.cache is None or not isinstance(self.cache, (str, Path)):
            return self.cache
        with self._cache_lock:
            if document_mode not in self._disk_caches:
                ns = CacheNamespace(teacher_id=self.teacher_id,
                                    tokenizer_fingerprint=self.tokenizer_fingerprint,
                                    spec=self.spec, document_mode=document_mode)
                self._disk_caches[document_mode] = TargetCache(
                    self.cache, ns, writable=self.write_cache, writer_id=self.writer_id,
                    on_corrupt=lambda exc: self.metrics.cache_corrupt_records.inc())
            return self._disk_caches[document_mode]

    def _fetch_rows(self, batch: PackedBatch, rows: list[int]) -> list[bytes]:
        """Payloads of `rows` of `batch`. After a failure (mid-stream included) only the
        rows not yet received are asked for again, from the next address."""
        got: dict[int, bytes] = {}
        last = None
        for attempt in range(self.max_tries):
            pending = [r for r in rows if r not in got]
            i = (batch.step + attempt) % len(self._stubs)  # spread steps over addresses
            try:
                self._distill(self._stubs[i], batch, pending, got)
                return [got[r] for r in rows]
            except (grpc.RpcError, CorruptStreamError) as exc:
                last = retry_reason(exc)
                if last is None:
                    raise
                self.metrics.retries.labels(last.split(":", 1)[0]).inc()
                delay = backoff_delay(self.backoff_s, attempt)
                logger.warning("step %d: %s from %s after %d of %d rows; asking for the other "
                               "%d elsewhere in %.2fs", batch.step, last, self.addresses[i],
                               len(got), len(rows), len(rows) - len(got), delay)
                time.sleep(delay)
        raise TeacherUnavailableError(
            f"step {batch.step}: {len(rows) - len(got)} of {len(rows)} rows missing after "
            f"{self.max_tries} tries over {self.addresses}; last error {last}")

    def _distill(self, stub, batch: PackedBatch, rows: list[int], got: dict[int, bytes]) -> None:
        """Stream `rows` of `batch` into `got` (batch row -> payload), checking each chunk's
        CRC and the server's echo of the row's key; raises on the first bad chunk."""
        docs = batch.document_ids[rows] if batch.document_ids is not None else None
        request = pb.DistillRequest(
            rows=rows_to_proto(batch.input_ids[rows], docs), spec=spec_to_proto(self.spec),
            codec_version=VERSION, teacher_id=self.teacher_id, rows_per_chunk=1,
            extras=list(self.extras))
        received = 0
        for chunk in stub.Distill(request, timeout=self.timeout_s, metadata=self._meta):
            if zlib.crc32(chunk.payload) != chunk.crc32:
                raise CorruptStreamError(f"chunk for rows {chunk.row_start}+{chunk.row_count} "
                                         f"failed its CRC check")
            if chunk.row_start != received or chunk.row_count != 1 or received >= len(rows):
                raise CorruptStreamError(f"unexpected chunk rows {chunk.row_start}+{chunk.row_count}")
            row = rows[received]
            if list(chunk.row_keys) != [batch.row_keys[row]]:
                raise CorruptStreamError(f"row {row}: the server saw other tokens (key "
                                         f"{[k.hex() for k in chunk.row_keys]} != "
                                         f"{batch.row_keys[row].hex()})")
            self.metrics.received_bytes.inc(len(chunk.payload))
            got[row] = chunk.payload
            received += 1
        if received != len(rows):
            raise CorruptStreamError(f"stream ended after {received} of {len(rows)} rows")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for cache in self._disk_caches.values():
            cache.close()
        for c in self._channels:
            c.close()

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pinned(t: SparseTargets) -> SparseTargets:
    return dataclasses.replace(t, **{
        f.name: getattr(t, f.name).pin_memory() for f in dataclasses.fields(t)
        if isinstance(getattr(t, f.name), torch.Tensor)})
