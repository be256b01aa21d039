"""Target sources for one rank: the teacher fleet, a cache, or none.

`open_source` turns a `TeacherConfig`-like choice into an object with
`stream(batches)` / `fetch(batch)` / `close()` yielding `StepTargets`
(`TeacherClient` or `CacheSource`), or None for CE-only runs. A cache source
finds its namespace from the corpus tokenizer and the stored spec, and from
`teacher_id` when the cache holds targets of several teachers.
"""

from __future__ import annotations

from pathlib import Path

from logitcast.cache import CacheNamespace, default_writer_id, list_namespaces, open_storage
from logitcast.client.metrics import ClientMetrics
from logitcast.client.offline import CacheSource
from logitcast.client.teacher_client import TeacherClient
from logitcast.ops import TargetSpec


def find_namespace(root: str | Path, *, tokenizer_fingerprint: str, spec: TargetSpec,
                   document_mode: bool, teacher_id: str | None = None) -> CacheNamespace:
    """The one namespace under `root` (a directory or an fsspec URL) matching the
    tokenizer, spec, mode (and teacher)."""
    stored = list_namespaces(open_storage(root))
    found = [ns for ns in stored
             if ns.tokenizer_fingerprint == tokenizer_fingerprint and ns.spec == spec
             and ns.document_mode == document_mode
             and (teacher_id is None or ns.teacher_id == teacher_id)]
    if not found:
        have = [f"{ns.teacher_id} {ns.spec.key()}" for ns in stored]
        raise FileNotFoundError(
            f"cache {root} has no targets for spec {spec.key()} (tokenizer "
            f"{tokenizer_fingerprint}, document_mode={document_mode}"
            f"{', teacher ' + teacher_id if teacher_id else ''}); it holds: {have or 'nothing'}")
    if len(found) > 1:
        raise ValueError(f"cache {root} holds this spec for several teachers "
                         f"{sorted(ns.teacher_id for ns in found)}; set teacher.teacher_id")
    return found[0]


def open_source(source: str, *, spec: TargetSpec, stored_spec: TargetSpec | None = None,
                tokenizer_fingerprint: str, vocab_size: int, document_mode: bool,
                addresses: list[str] = (), cache_dir: str | None = None,
                write_cache: bool = False, cache_on_corrupt: str = "error",
                teacher_id: str | None = None, prefetch: int = 4,
                auth_token: str | None = None, allow_insecure_auth: bool = False,
                application: str | None = None, rank: int = 0, device: str = "cpu",
                extras: tuple[str, ...] = ("logprob",), metrics: ClientMetrics | None = None,
                steps: tuple[int, int] | list[int] | None = None):
    """TeacherClient (online), CacheSource (cache) or None (none). cache_on_corrupt: the
    CacheSource's `on_corrupt` (online, a damaged record is always fetched again).
    steps: cache only, the window [lo, hi) of recorded teacher steps served."""
    if steps is not None and source != "cache":
        raise ValueError(f"a teacher-step window needs the cache source, got {source!r}")
    if source == "none":
        return None
    if source == "online":
        return TeacherClient(list(addresses), spec, tokenizer_fingerprint=tokenizer_fingerprint,
                             vocab_size=vocab_size, teacher_id=teacher_id, cache=cache_dir,
                             write_cache=write_cache,
                             writer_id=default_writer_id(f"trainer_rank{rank}"),
                             prefetch=prefetch, device=device, extras=extras,
                             auth_token=auth_token, allow_insecure_auth=allow_insecure_auth,
                             application=application, metrics=metrics)
    if source == "cache":
        stored = find_namespace(cache_dir, tokenizer_fingerprint=tokenizer_fingerprint,
                                spec=stored_spec or spec, document_mode=document_mode,
                                teacher_id=teacher_id)
        src = CacheSource(cache_dir, stored, spec=spec, device=device, prefetch=prefetch,
                          metrics=metrics, on_corrupt=cache_on_corrupt,
                          steps=None if steps is None else tuple(steps))
        if src.vocab_size != vocab_size:
            src.close()
            raise ValueError(f"cache {cache_dir} targets index a vocabulary of "
                             f"{src.vocab_size}, the student has {vocab_size}")
        return src
    raise ValueError(f"unknown target source {source!r}; choose online, cache or none")
