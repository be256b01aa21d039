"""Cache at scale: 4 writer processes, 10^8 records, index compaction, readers.

Synthetic records (random 16-byte keys, random-byte payloads) written by 4
writer *processes*, each its own `CacheWriter` and writer id, into one
namespace on local disk; then `maintenance.compact` (what an operator runs) and
a reader measured before and after it, each in a fresh process: open time,
anonymous heap per record (RssAnon from /proc/self/status after opening and
the lookups, minus before opening), random `get`/s warm (page cache filled by
reading every file first) and cold (no root to drop caches: every shard and
index file gets posix_fadvise(DONTNEED) first). Then ~9 KB payloads, each
standing for a 512-position row: one writer's records read back in write order
with `get(key)` (the default reader, 8 MiB readahead blocks, and
`readahead_bytes=0` in the same run), on local
disk and on an S3 API served by moto on loopback (in its own process, as a
real store would be).

Keys: key i of writer w = splitmix64 of (seed, w, i): reproducible in write
order and at random, never colliding, so writers run with `skip_existing=False`
(a second, smaller write measures the default `skip_existing=True`). What this
does not know: the codec (payloads are random bytes), other clients.

    python -m bench.cache_scale [--quick] [--records N] [--root DIR] [--no-tiny]

Last line: RESULT records=N open_s=.. heap_bytes_per_record=.. random_get_per_s=..
seq_pos_per_s=.. s3_read_mb_s=..
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.common import write_results
from logitcast.cache import CacheNamespace, CacheReader, CacheWriter, open_storage
from logitcast.cache.maintenance import compact
from logitcast.ops import TargetSpec

WRITERS, SEQ, TINY, SEED, BATCH = 4, 512, 8, 20261201, 1 << 14
READAHEAD = 8 << 20  # the block size readers use on object stores
REAL = (8192, 10240)  # payload bytes drawn uniformly: ~9 KB, a 512-position RS-12 row
SIZES = {  # quick / full
    "records": (2_000_000, 100_000_000), "skip_existing_records": (100_000, 1_000_000),
    "real_per_writer": (5_000, 25_000), "s3_records": (2_000, 2_000), "s3_baseline_s": (3.0, 10.0),
    "warm_gets": (50_000, 300_000), "cold_gets": (3_000, 20_000), "cold_s": (2.0, 20.0),
}
GOALS = {"heap_bytes_per_record": (2, "<="), "open_s": (2, "<="),
         "random_get_per_s": (50_000, ">="), "seq_pos_per_s": (5e6, ">="),
         "s3_read_mb_s": (200, ">=")}

NOTES = [
    "writers: skip_existing=False (random 128-bit keys never collide); write_skip_existing is "
    "the default skip_existing=True on a smaller count",
    "cold passes: posix_fadvise(DONTNEED) on every shard and index file (no root to drop caches)",
    "warm gets: the page cache filled, then two passes over the same keys in the reader's "
    "fresh process; random_get_per_s is the second (steady state), warm.first_pass_per_s the "
    "first, which also pays the fresh process's own warm-up (measured ~2x slower at 10^6)",
    "heap: RssAnon after opening a reader and the lookups minus before, in a fresh process; "
    "open_s with a cold page cache, open_s_warm a second open",
    "sequential: positions = records x 512; MB/s count payload bytes; 'default' is "
    "CacheReader's own choice (no readahead on local disk, 8 MiB blocks on object stores), "
    "'readahead' 8 MiB blocks, 'no_readahead' readahead_bytes=0; the readahead_bytes=0 "
    "baseline on S3 reads the first records that fit in s3_baseline_s (one GET each)",
    "s3: moto's ThreadedMotoServer in its own process on loopback; store_one_get_at_a_time_mb_s "
    "is the store alone (the shard in readahead-sized ranged GETs, no overlap)",
]


def namespace(name: str) -> CacheNamespace:
    return CacheNamespace(teacher_id=f"bench-scale-{name}", tokenizer_fingerprint="bench",
                          spec=TargetSpec(method="sample", unique=12.0))


# ---------------------------------------------------------------------------- records

def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64, so distinct inputs never collide."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def record_keys(writer: int, index: np.ndarray) -> list[bytes]:
    """Key of record `index` (int [N]) of `writer`: 16 random-looking bytes."""
    ctr = (np.uint64(writer) << np.uint64(40)) | np.asarray(index, np.uint64)
    salt = _mix(np.array([SEED], np.uint64))[0]
    keys = np.empty((len(ctr), 2), ">u8")  # hi from counter 2c, lo from 2c + 1: all distinct
    keys[:, 0] = _mix((ctr << np.uint64(1)) ^ salt)
    keys[:, 1] = _mix((ctr << np.uint64(1) | np.uint64(1)) ^ salt)
    buf = keys.tobytes()
    return [buf[j:j + 16] for j in range(0, len(buf), 16)]


def split_counts(total: int) -> list[int]:
    return [total // WRITERS + (w < total % WRITERS) for w in range(WRITERS)]


def sample_keys(counts: list[int], n: int, seed: int) -> list[bytes]:
    """`n` keys drawn uniformly from every record written."""
    g = np.random.default_rng(seed).integers(0, sum(counts), n)
    bounds = np.cumsum([0, *counts])
    w = np.searchsorted(bounds, g, side="right") - 1
    out = [b""] * n
    for writer in range(len(counts)):
        sel = np.nonzero(w == writer)[0]
        for j, key in zip(sel.tolist(), record_keys(writer, g[sel] - bounds[writer])):
            out[j] = key
    return out


def _write(root: str, ns: CacheNamespace, writer: int, count: int, payload: str,
           skip_existing: bool, barrier, progress, results) -> None:
    """One writer process: `count` records in key order 0..count-1, then close."""
    rng = np.random.default_rng([SEED, writer])
    pool = rng.bytes(4 << 20)
    w = CacheWriter(root, ns, writer_id=f"bench_w{writer}", skip_existing=skip_existing)
    barrier.wait()
    t0 = time.monotonic()
    for start in range(0, count, BATCH):
        n = min(BATCH, count - start)
        sizes = np.full(n, TINY) if payload == "tiny" else rng.integers(REAL[0], REAL[1] + 1, n)
        offs = rng.integers(0, len(pool) - REAL[1], n)
        for key, o, s in zip(record_keys(writer, np.arange(start, start + n)), offs.tolist(),
                             sizes.tolist()):
            w.put(key, pool[o:o + s])
        progress[writer] += n
    w.close()
    results.put({"writer": writer, "records": w.records_written, "bytes": w.bytes_written,
                 "t0": t0, "t1": time.monotonic()})


def write_parallel(ctx, root: Path, ns: CacheNamespace, total: int, payload: str, *,
                   skip_existing: bool, label: str) -> dict:
    """4 writer processes together; the clock runs from a common start to the last close."""
    counts = split_counts(total)
    barrier, results = ctx.Barrier(WRITERS), ctx.Queue()
    progress = ctx.Array("q", WRITERS, lock=False)
    procs = [ctx.Process(target=_write, args=(str(root), ns, w, counts[w], payload, skip_existing,
                                              barrier, progress, results)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    got = []
    with tqdm(total=total, desc=label, unit="rec", unit_scale=True) as bar:
        while len(got) < WRITERS:
            while not results.empty():
                got.append(results.get())
            bar.update(sum(progress) - bar.n)
            if any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError(f"a writer process failed: {[p.exitcode for p in procs]}")
            time.sleep(0.5)
    for p in procs:
        p.join()
    seconds = max(r["t1"] for r in got) - min(r["t0"] for r in got)
    records, nbytes = sum(r["records"] for r in got), sum(r["bytes"] for r in got)
    assert records == total, (records, total)
    return {"records": records, "writers": WRITERS, "payload": payload,
            "skip_existing": skip_existing, "seconds": seconds, "records_per_s": records / seconds,
            "mb_per_s": nbytes / seconds / 1e6, "record_bytes": nbytes, "counts": counts}


# ---------------------------------------------------------------------------- reading

def rss_anon() -> int:
    """Anonymous resident memory of this process, bytes (RssAnon in /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def cache_files(root: Path, ns: CacheNamespace) -> list[Path]:
    return sorted(p for p in (root / ns.name).iterdir() if p.suffix in (".shard", ".index"))


def drop_cache(files: list[Path]) -> None:
    """Evict the files from the page cache (without root, instead of drop_caches)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(files: list[Path], buf: bytearray) -> None:
    """Read every file through `buf` (allocated by the caller, so the heap figure
    does not count it)."""
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def timed_gets(reader: CacheReader, keys: list[bytes], limit_s: float = float("inf")) -> dict:
    misses, done = 0, 0
    t0 = time.perf_counter()
    for done, key in enumerate(keys, 1):
        misses += reader.get(key) is None
        if not done % 256 and time.perf_counter() - t0 > limit_s:
            break
    seconds = time.perf_counter() - t0
    return {"gets": done, "seconds": seconds, "per_s": done / seconds, "misses": misses}


def measure_reader(root: str, ns: CacheNamespace, counts: list[int], sizes: dict) -> dict:
    """In a fresh process: open (cold page cache), cold gets, warm gets, heap per record."""
    files = cache_files(Path(root), ns)
    cold_keys = sample_keys(counts, sizes["cold_gets"], seed=1)
    warm_keys = sample_keys(counts, sizes["warm_gets"], seed=2)
    buf = bytearray(8 << 20)
    gc.collect()
    before = rss_anon()
    drop_cache(files)
    t0 = time.perf_counter()
    reader = CacheReader(root, ns)
    open_s = time.perf_counter() - t0
    cold = timed_gets(reader, cold_keys, sizes["cold_s"])
    warm_cache(files, buf)
    first = timed_gets(reader, warm_keys)  # includes a fresh process's own warm-up
    warm = timed_gets(reader, warm_keys)  # steady state: the figure the goal is about
    warm["first_pass_per_s"] = first["per_s"]
    heap = rss_anon() - before
    if cold["misses"] or warm["misses"]:
        raise RuntimeError(f"keys written were not found: {cold['misses'] + warm['misses']} misses")
    reader.close()
    t0 = time.perf_counter()
    CacheReader(root, ns).close()
    return {"index_runs": sum(p.suffix == ".index" for p in files), "open_s": open_s,
            "open_s_warm": time.perf_counter() - t0, "heap_bytes": heap,
            "heap_bytes_per_record": heap / sum(counts), "random_get_per_s": warm["per_s"],
            "random_get_cold_per_s": cold["per_s"], "warm": warm, "cold": cold}


def run_compaction(root: str, ns: CacheNamespace) -> dict:
    t0 = time.perf_counter()
    stats = compact(root, ns)
    return {"seconds": time.perf_counter() - t0, **stats,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def in_fresh_process(ctx, fn, *args):
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def read_in_order(root, ns: CacheNamespace, keys: list[bytes], readahead: int | None,
                  files: list[Path] | None = None, limit_s: float = float("inf")) -> dict:
    """Keys through a fresh reader's `get` (readahead None: the reader's default), in order,
    all of them or those read within `limit_s`; `files` dropped from the page cache first
    (a cold pass)."""
    if files:
        drop_cache(files)
    reader = CacheReader(root, ns, **({} if readahead is None else {"readahead_bytes": readahead}))
    nbytes, t0 = 0, time.perf_counter()
    for done, key in enumerate(keys, 1):
        nbytes += len(reader.get(key))
        if not done % 64 and time.perf_counter() - t0 > limit_s:
            break
    seconds = time.perf_counter() - t0
    reader.close()
    return {"records": done, "seconds": seconds, "pos_per_s": done * SEQ / seconds,
            "mb_per_s": nbytes / seconds / 1e6}


def sequential(root, ns: CacheNamespace, keys: list[bytes], files: list[Path] | None,
               baseline_s: float = float("inf")) -> dict:
    """The default reader, 8 MiB readahead and `readahead_bytes=0` (the first records read
    within `baseline_s`): warm best of 3 (alternating: the machine is shared), and cold."""
    passes = {"default": [], "readahead": [], "no_readahead": []}
    for _ in range(3):
        passes["default"].append(read_in_order(root, ns, keys, None))
        passes["readahead"].append(read_in_order(root, ns, keys, READAHEAD))
        passes["no_readahead"].append(read_in_order(root, ns, keys, 0, limit_s=baseline_s))
    out = {name: max(p, key=lambda r: r["pos_per_s"]) for name, p in passes.items()}
    out["all_passes_pos_per_s"] = {name: [r["pos_per_s"] for r in p] for name, p in passes.items()}
    if files:
        out["readahead_cold"] = read_in_order(root, ns, keys, READAHEAD, files)
        out["no_readahead_cold"] = read_in_order(root, ns, keys, 0, files)
        cold = out["readahead_cold"]["pos_per_s"], out["no_readahead_cold"]["pos_per_s"]
        out["cold_ratio"] = cold[0] / cold[1]
    out["ratio"] = out["readahead"]["pos_per_s"] / out["no_readahead"]["pos_per_s"]
    out["default_ratio"] = out["default"]["pos_per_s"] / out["no_readahead"]["pos_per_s"]
    return out


def _moto(address, stop) -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    address.put(server.get_host_and_port())
    stop.wait()
    server.stop()


def s3_sequential(ctx, n: int, home: Path, baseline_s: float) -> dict:
    """`n` ~9 KB records written by one CacheWriter to moto, read back in write order;
    and the store alone: the shard fetched in readahead-sized ranged GETs, one at a time."""
    import s3fs

    address, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_moto, args=(address, stop))
    server.start()
    try:
        host, port = address.get(timeout=60)
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                           "LOGITCAST_HOME": str(home)})
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench-scale")
        url, ns = "s3://bench-scale/cache", namespace("s3")
        rng = np.random.default_rng([SEED, 99])
        pool = rng.bytes(4 << 20)
        keys = record_keys(99, np.arange(n))
        t0 = time.perf_counter()
        with CacheWriter(url, ns, writer_id="bench_s3", skip_existing=False) as w:
            for key, o, s in zip(keys, rng.integers(0, len(pool) - REAL[1], n).tolist(),
                                 rng.integers(REAL[0], REAL[1] + 1, n).tolist()):
                w.put(key, pool[o:o + s])
        write_s = time.perf_counter() - t0
        out = sequential(url, ns, keys, None, baseline_s)
        store, step = open_storage(url), READAHEAD
        shard = f"{ns.name}/{next(s for s in store.list(ns.name) if s.endswith('.shard'))}"
        t0, size = time.perf_counter(), store.size(shard)
        for at in range(0, size, step):
            store.read(shard, at, step)
        out["store_one_get_at_a_time_mb_s"] = size / (time.perf_counter() - t0) / 1e6
        out["write"] = {"records": n, "seconds": write_s,
                        "mb_per_s": w.bytes_written / write_s / 1e6}
        out["server"] = "moto ThreadedMotoServer on 127.0.0.1, in its own process"
        return out
    finally:
        stop.set()
        server.join(timeout=30)


# ---------------------------------------------------------------------------- main

def goal_lines(result: dict, records: int) -> dict:
    goals = {}
    for name, (target, op) in GOALS.items():
        value = result[name]
        ok = value <= target if op == "<=" else value >= target
        goals[name] = {"value": value, "target": f"{op} {target:g}", "met": ok}
        note = f" (at {records:,} records; the goal is stated at 10^8)" \
            if name == "open_s" and records < 10**8 else ""
        print(f"goal {name} {op} {target:g}: {value:.4g} {'PASS' if ok else 'MISS'}{note}")
    return goals


def source_state() -> dict:
    """The commit measured, and whether cache/ had uncommitted changes (it is being worked on)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cache"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return {"head": None}
    return {"head": head, "cache_uncommitted": sorted(line[3:] for line in dirty if line)}


def versions() -> dict:
    out = {}
    for pkg in ("s3fs", "fsspec", "moto", "boto3", "msgpack"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def run(ctx, work: Path, records: int, payload: str, sizes: dict, phases: dict) -> dict:
    """Every phase in order; `phases` gets each one's wall seconds."""
    def clock(name, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        phases[name] = time.perf_counter() - t0
        return out

    ns, out = namespace("scale"), {}
    out["write"] = w = clock("write", write_parallel, ctx, work, ns, records, payload,
                             skip_existing=False, label="write")
    print(f"write: {records:,} {payload} records by {WRITERS} processes (skip_existing=False: "
          f"random 128-bit keys never collide) {w['records_per_s']:,.0f} records/s")
    out["write_skip_existing"] = w = clock(
        "write_skip_existing", write_parallel, ctx, work, namespace("skip"),
        sizes["skip_existing_records"], payload, skip_existing=True,
        label="write skip_existing=True")
    print(f"write with the default skip_existing=True, {w['records']:,} records: "
          f"{w['records_per_s']:,.0f} records/s")
    counts = out["write"]["counts"]
    out["reader_before_compaction"] = clock("reader_before", in_fresh_process, ctx, measure_reader,
                                            str(work), ns, counts, sizes)
    out["compaction"] = c = clock("compact", in_fresh_process, ctx, run_compaction, str(work), ns)
    print(f"compact: {c['seconds']:.1f} s ({c['merged']} runs into one, peak RSS "
          f"{c['peak_rss_bytes'] / 1e9:.2f} GB)")
    out["reader_after_compaction"] = clock("reader_after", in_fresh_process, ctx, measure_reader,
                                           str(work), ns, counts, sizes)
    for name in ("before", "after"):
        r = out[f"reader_{name}_compaction"]
        print(f"reader {name} compaction: {r['index_runs']} runs, open {r['open_s'] * 1e3:.1f} ms, "
              f"heap {r['heap_bytes_per_record']:.3f} B/record, get {r['random_get_per_s']:,.0f}/s "
              f"warm (first pass {r['warm']['first_pass_per_s']:,.0f}/s), "
              f"{r['random_get_cold_per_s']:,.0f}/s cold (fadvise DONTNEED, no root to drop "
              "caches)")
    shutil.rmtree(work / ns.name)

    real_ns = namespace("real")
    out["write_realistic"] = w = clock("write_realistic", write_parallel, ctx, work, real_ns,
                                       sizes["real_per_writer"] * WRITERS, "real",
                                       skip_existing=False, label="write ~9 KB")
    keys = record_keys(0, np.arange(w["counts"][0]))  # writer 0's records, in write order
    out["sequential_local"] = q = clock("sequential_local", sequential, work, real_ns, keys,
                                        cache_files(work, real_ns))
    print(f"sequential (writer 0 in write order, ~9 KB = {SEQ} positions each): default reader "
          f"{q['default']['pos_per_s'] / 1e6:.2f} M pos/s; 8 MiB readahead x{q['ratio']:.2f} vs "
          f"none (cold: x{q['cold_ratio']:.2f})")
    out["s3"] = q = clock("s3", s3_sequential, ctx, sizes["s3_records"], work / "home",
                          sizes["s3_baseline_s"])
    print(f"s3 (moto) sequential: default reader {q['default']['mb_per_s']:.0f} MB/s; 8 MiB "
          f"readahead {q['readahead']['mb_per_s']:.0f} MB/s, x{q['ratio']:.1f} vs none"
          f" ({q['no_readahead']['mb_per_s']:.1f} MB/s); the store alone serves "
          f"{q['store_one_get_at_a_time_mb_s']:.0f} MB/s in 8 MiB ranged GETs one at a time")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2e6 records; under 2 minutes on 2 cores")
    ap.add_argument("--records", type=int, help="scale-set records (default 2e6 quick, 1e8 full)")
    ap.add_argument("--root", type=Path, help="where to make the scratch directory, removed at "
                    "the end (default: the temp dir)")
    ap.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=True,
                    help=f"{TINY}-byte payloads in the scale set (default), else ~9 KB")
    args = ap.parse_args()
    sizes = {k: v[0 if args.quick else 1] for k, v in SIZES.items()}
    records = args.records or sizes["records"]
    load_start, source = os.getloadavg(), source_state()
    ctx = mp.get_context("forkserver")  # children fork from a fresh process: no writing-phase heap
    ctx.set_forkserver_preload(["numpy", "logitcast.cache", "logitcast.cache.maintenance"])
    work = Path(tempfile.mkdtemp(prefix="logitcast-bench-cache-scale-", dir=args.root))
    t_start, phases = time.perf_counter(), {}
    try:
        out = run(ctx, work, records, "tiny" if args.tiny else "real", sizes, phases)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - t_start
    after = out["reader_after_compaction"]
    result = {"records": records, "open_s": round(after["open_s"], 4),
              "heap_bytes_per_record": round(after["heap_bytes_per_record"], 4),
              "random_get_per_s": round(after["random_get_per_s"]),
              "seq_pos_per_s": round(out["sequential_local"]["default"]["pos_per_s"]),
              "s3_read_mb_s": round(out["s3"]["default"]["mb_per_s"], 1)}
    goals = goal_lines(result, records)
    path = write_results("cache_scale", {
        "quick": args.quick, "records": records, "wall_s": wall, "phase_s": phases,
        "versions": versions(), "source": source, "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(), "machine_shared": load_start[0] > 0.5,
        "notes": NOTES, "sizes": sizes, **out, "goals": goals, "result": result},
        suffix="-quick" if args.quick else "")
    print(f"wrote {path} ({wall:.0f} s)")
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
