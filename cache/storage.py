"""Where cache files live: a local directory, or any fsspec object store (s3://, gs://, az://).

Names are relative to the storage root and use "/" ("<namespace>/w0-000001.shard").
Components starting with "." are reserved for this module's temporaries and refused.
    LocalStorage   files in a directory; writes are tmp + fsync + rename + dir fsync;
                   a writer lock is flock(2), which the kernel drops when its process dies.
    FsspecStorage  objects; a PUT (single or multipart) appears whole or not at all, reads
                   are ranged GETs, `local_path` downloads into a bounded read-through cache,
                   and a writer lock is a lease object renewed from a thread.
A kill leaves at most: a local tmp file (hidden from `list`, harmless), a staged file
that was never published, or a lease that a successor on the same host takes over at
once (dead pid) and anyone else after it expires. What this module does not know: the
cache format, which names mean what, or credentials (those come from the environment;
a URL carrying them is refused).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)

GiB, MiB = 1 << 30, 1 << 20


class WriterIdInUseError(RuntimeError):
    """Another live process holds this writer id (message names the id, the holder and the storage url)."""


class Lock(Protocol):
    def release(self) -> None: ...


class Storage(Protocol):
    url: str
    is_local: bool

    def list(self, directory: str) -> list[str]: ...
    def exists(self, name: str) -> bool: ...
    def read(self, name: str, offset: int = 0, length: int = -1) -> bytes: ...
    def size(self, name: str) -> int: ...
    def write_atomic(self, name: str, data: bytes) -> None: ...
    def publish_file(self, local_path: str | Path, name: str) -> None: ...
    def remove(self, name: str) -> None: ...
    def local_path(self, name: str) -> Path: ...
    def staging_dir(self, directory: str) -> Path: ...
    def lock(self, name: str, owner: str) -> Lock: ...

MAX_OPEN_FILES = 64  # descriptors a LocalStorage keeps open for reads, per thread

def open_storage(root: str | Path | Storage, **kw) -> Storage:
    """A Storage as is; "scheme://..." (other than file://) -> FsspecStorage; else LocalStorage."""
    if not isinstance(root, (str, Path)):
        if kw:
            raise ValueError(f"options {sorted(kw)} given with an already open storage {root.url}")
        return root
    if isinstance(root, str) and "://" in root and not root.startswith("file://"):
        return FsspecStorage(root, **kw)
    return LocalStorage(root, **kw)


def logitcast_home() -> Path:
    """$LOGITCAST_HOME, else $XDG_CACHE_HOME/logitcast, else ~/.cache/logitcast."""
    home = os.environ.get("LOGITCAST_HOME")
    if home:
        return Path(home).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "logitcast"


def _check_name(name: str, *, directory: bool = False) -> str:
    """`name` unchanged if it is a relative "/"-separated name ("" only for a directory)."""
    if not isinstance(name, str):
        raise ValueError(f"storage names are str, got {type(name).__name__} {name!r}")
    if name == "" and directory:
        return name
    parts = name.split("/")
    if "\\" in name or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise ValueError(f"bad storage name {name!r}: want relative '/'-separated parts, none "
                         "empty or starting with '.'")
    return name


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


# ----------------------------------------------------------------------------- local disk


class _Descriptors(OrderedDict):
    """One thread's open read descriptors; closed when dropped (also at thread exit)."""

    def close(self) -> None:
        while self:
            with contextlib.suppress(OSError):
                os.close(self.popitem()[1])

    def __del__(self) -> None:
        self.close()


class LocalStorage:
    """Storage on a local directory (created on first write)."""

    is_local = True

    def __init__(self, root: str | Path) -> None:
        self.url = str(root)
        if isinstance(root, str) and root.startswith("file://"):
            parts = urlsplit(root)
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"file URL {root!r} names host {parts.netloc!r}; use file:///path")
            root = unquote(parts.path)
        if str(root) == "":
            raise ValueError("storage root is empty")
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"storage root {self.url} is not a directory")
        self._local = threading.local()  # per thread: descriptors kept open for reads
        self._generation = 0

    def path(self, name: str) -> Path:
        return self.root / _check_name(name)

    def list(self, directory: str) -> list[str]:
        """Files and subdirectories directly in `directory`, sorted; [] if it does not exist."""
        d = self.root / _check_name(directory, directory=True)
        return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def read(self, name: str, offset: int = 0, length: int = -1) -> bytes:
        """pread on a descriptor this thread keeps open (its `MAX_OPEN_FILES` last opened),
        so a random record read is one system call. Any write, publish or remove through
        this storage makes every thread reopen; a file another process renamed or
        removed meanwhile still reads its bytes."""
        if offset < 0:
            raise ValueError(f"negative offset {offset} reading {name!r}")
        fd = self._fd(name)
        if length < 0:
            length = max(0, os.fstat(fd).st_size - offset)
        return os.pread(fd, length, offset)

    def _fd(self, name: str) -> int:
        fds = getattr(self._local, "fds", None)
        if fds is None or self._local.generation != self._generation:
            self._close_local()
            fds = self._local.fds = _Descriptors()
            self._local.generation = self._generation
        fd = fds.get(name)
        if fd is None:
            fd = fds[name] = os.open(self.path(name), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            while len(fds) > MAX_OPEN_FILES:
                os.close(fds.popitem(last=False)[1])
        return fd

    def _close_local(self) -> None:
        fds = getattr(self._local, "fds", None)
        if fds is not None:
            fds.close()

    def _forget(self, name: str) -> None:
        self._generation += 1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._close_local()

    def size(self, name: str) -> int:
        return self.path(name).stat().st_size

    def write_atomic(self, name: str, data: bytes) -> None:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._forget(name)
        _sync_dir(path.parent)

    def publish_file(self, local_path: str | Path, name: str) -> None:
        """Rename a finished file (from `staging_dir`, same filesystem) to `name`."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_path, path)
        self._forget(name)
        _sync_dir(path.parent)

    def remove(self, name: str) -> None:
        self._forget(name)
        self.path(name).unlink(missing_ok=True)

    def local_path(self, name: str) -> Path:
        path = self.path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no file {name!r} under {self.url}")
        return path

    def staging_dir(self, directory: str) -> Path:
        """The directory itself, so readers can tail a writer's open shard."""
        path = self.root / _check_name(directory, directory=True)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lock(self, name: str, owner: str) -> FileLock:
        return FileLock(self, name, owner)


class FileLock:
    """flock(LOCK_EX | LOCK_NB) on a lock file holding the owner's description. The file
    stays after release: unlinking a flock'd file lets two processes lock different inodes.
    The lock belongs to the open file, so children forked (not exec'd) while it is held
    keep it until they exit too. flock on NFS is emulated with POSIX locks; other network
    filesystems may ignore it."""

    lost = False  # the kernel never takes a flock away from a live holder

    def __init__(self, storage: LocalStorage, name: str, owner: str) -> None:
        path = storage.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise WriterIdInUseError(f"writer lock {name} in {storage.url} is held by {holder}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, owner.encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


# ----------------------------------------------------------------------------- object stores


class FsspecStorage:
    """Storage on an fsspec URL ("s3://bucket/prefix"). Credentials, endpoint and region come
    from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
    AWS_DEFAULT_REGION for s3); `storage_options` go to fsspec for anything else."""

    is_local = False

    def __init__(self, url: str, *, lease_ttl_s: float = 60.0, cache_dir: str | Path | None = None,
                 cache_bytes: int = 2 * GiB, part_bytes: int = 64 * MiB,
                 storage_options: dict | None = None) -> None:
        """cache_dir: local_path's read-through cache (default $LOGITCAST_HOME/objects/<url hash>),
        kept under cache_bytes. part_bytes: multipart part size (files of 2 parts or more are
        uploaded in parts; S3 needs >= 5 MiB)."""
        import fsspec

        parts = urlsplit(url)
        if "@" in parts.netloc or parts.query:
            raise ValueError(f"storage URL {parts.scheme}://... carries credentials (user info or "
                             "a query string); put them in the environment, not the URL")
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be > 0, got {lease_ttl_s}")
        if cache_bytes <= 0:
            raise ValueError(f"cache_bytes must be > 0, got {cache_bytes}")
        if part_bytes < 5 * MiB:
            raise ValueError(f"part_bytes must be >= 5 MiB (the S3 minimum part), got {part_bytes}")
        self.url, self.lease_ttl_s = url, lease_ttl_s
        self.cache_bytes, self.part_bytes = cache_bytes, part_bytes
        options = {"skip_instance_cache": True, "use_listings_cache": False, **(storage_options or {})}
        self.fs, root = fsspec.core.url_to_fs(url, **options)
        self._root = root.rstrip("/")
        if not self._root:
            raise ValueError(f"storage URL {url} names no bucket or container")
        self._url_hash = hashlib.blake2b(url.encode(), digest_size=8).hexdigest()
        self.cache_dir = Path(cache_dir) if cache_dir else logitcast_home() / "objects" / self._url_hash
        self._put_kw = ({"chunksize": part_bytes}
                        if "chunksize" in inspect.signature(self.fs.put_file).parameters else {})

    def _path(self, name: str, *, directory: bool = False) -> str:
        name = _check_name(name, directory=directory)
        return f"{self._root}/{name}" if name else self._root

    @contextlib.contextmanager
    def _named(self, name: str):
        """FileNotFoundError that names the object and the storage URL."""
        try:
            yield
        except FileNotFoundError:
            raise FileNotFoundError(f"no object {name!r} under {self.url}") from None

    def list(self, directory: str) -> list[str]:
        """Objects and prefixes directly under `directory`, sorted (every page); [] if none."""
        try:
            entries = self.fs.ls(self._path(directory, directory=True), detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._path(name))

    def read(self, name: str, offset: int = 0, length: int = -1) -> bytes:
        """A ranged GET of [offset, offset + length) or to the end; short at the end."""
        if offset < 0:
            raise ValueError(f"read offset must be >= 0, got {offset}")
        if length == 0:
            self.size(name)  # missing -> FileNotFoundError, like open()
            return b""
        end = None if length < 0 else offset + length
        with self._named(name):
            try:
                return self.fs.cat_file(self._path(name), start=offset, end=end)
            except FileNotFoundError:
                raise
            except OSError:  # S3 answers 416 for a range starting at or past the end
                if offset >= self.size(name):
                    return b""
                raise

    def size(self, name: str) -> int:
        with self._named(name):
            return int(self.fs.info(self._path(name))["size"])

    def write_atomic(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), bytes(data))

    def publish_file(self, local_path: str | Path, name: str) -> None:
        """Upload (in part_bytes parts when large), then delete the local file."""
        if not Path(local_path).is_file():
            raise FileNotFoundError(f"no local file {local_path} to publish as {name!r}")
        self.fs.put_file(str(local_path), self._path(name), **self._put_kw)
        os.remove(local_path)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(name))

    def local_path(self, name: str) -> Path:
        """A cached local copy, keyed by name, size and ETag (or mtime), so a replaced
        object is fetched again (one HEAD per call). The cache is kept under cache_bytes by evicting the least
        recently used copies (a copy bigger than the budget is still returned); a process
        that mapped an evicted copy keeps reading it (unlinked, not truncated)."""
        path = self._path(name)
        for _ in range(3):
            with self._named(name):
                info = self.fs.info(path)
            stamp = _stamp(info)
            key = hashlib.blake2b(f"{name}\0{stamp}".encode(), digest_size=16)
            cached = self.cache_dir / f"{key.hexdigest()}-{PurePosixPath(name).name}"
            with contextlib.suppress(FileNotFoundError):  # absent, or just evicted elsewhere
                os.utime(cached)
                return cached
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_name(cached)
            try:
                with self._named(name):
                    self.fs.get_file(path, str(tmp))
                if tmp.stat().st_size == int(info["size"]) and _stamp(self.fs.info(path)) == stamp:
                    os.replace(tmp, cached)
                    self._evict(keep=cached)
                    return cached
            finally:
                tmp.unlink(missing_ok=True)
        raise OSError(f"{name!r} under {self.url} kept changing while it was downloaded")

    def _evict(self, keep: Path) -> None:
        copies = []
        for p in self.cache_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):  # another process evicted it
                if not p.name.startswith(".") and p != keep:
                    st = p.stat()
                    copies.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in copies) + keep.stat().st_size
        for _, size, p in sorted(copies):
            if total <= self.cache_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size

    def staging_dir(self, directory: str) -> Path:
        """$LOGITCAST_HOME/staging/<url hash>/<directory>, where writers append before upload."""
        path = logitcast_home() / "staging" / self._url_hash / _check_name(directory, directory=True)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lock(self, name: str, owner: str) -> LeaseLock:
        return LeaseLock(self, name, owner)


def _stamp(info: dict) -> str:
    """What changes when an object is replaced: its size and ETag (or modification time)."""
    tag = next((info[k] for k in ("ETag", "etag", "md5Hash", "LastModified", "last_modified",
                                  "mtime") if info.get(k)), "")
    return f"{info['size']}\0{tag}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LeaseLock:
    """A lease object {owner, host, pid, token, expires_at}, renewed every ttl/3.

    Taken when absent, expired, or held by a dead pid on this host; then written and read
    back to check that our token won. Not airtight: without a conditional put, two
    processes that read "free" before either writes can both see their own token on the
    read-back; the loser finds the other's token at its next renewal (within ttl/3), sets
    `lost` and logs an error, but it may have written in between. A holder stalled past
    its expiry (or a clock skewed by more than the ttl) can be overtaken the same way.
    Host names must tell pid namespaces apart: containers that share a hostname (e.g.
    --network host) but not a pid namespace would take each other's live leases as dead.
    """

    def __init__(self, storage: FsspecStorage, name: str, owner: str) -> None:
        self._storage, self._name, self._owner = storage, name, owner
        self._ttl = storage.lease_ttl_s
        self._token = uuid.uuid4().hex
        self.lost = False
        held = self._read()
        if held is not None:
            dead = held["host"] == socket.gethostname() and not _pid_alive(held["pid"])
            if held["expires_at"] > time.time() and not dead:
                until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(held["expires_at"]))
                raise WriterIdInUseError(f"writer lease {name} in {storage.url} is held by "
                                         f"{held['owner']} until {until} unless renewed")
            logger.warning("%s/%s: taking over the lease of %s (%s)", storage.url, name,
                           held["owner"], "dead pid" if dead else "expired")
        self._write()
        won = self._read()
        if won is None or won["token"] != self._token:
            holder = won["owner"] if won else "nobody (removed at once)"
            raise WriterIdInUseError(f"writer lease {name} in {storage.url} was taken at the same "
                                     f"moment by {holder}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease {name}", daemon=True)
        self._thread.start()

    def _read(self) -> dict | None:
        try:
            raw = self._storage.read(self._name)
        except FileNotFoundError:
            return None
        try:
            lease = json.loads(raw)
            if (isinstance(lease, dict) and isinstance(lease.get("pid"), int) and lease["pid"] > 0
                    and all(isinstance(lease.get(k), str) for k in ("owner", "host", "token"))
                    and isinstance(lease.get("expires_at"), (int, float))):
                return lease
        except ValueError:
            pass
        raise ValueError(f"{self._storage.url}/{self._name} is not a writer lease; remove it "
                         "if no writer runs")

    def _write(self) -> None:
        lease = {"owner": self._owner, "host": socket.gethostname(), "pid": os.getpid(),
                 "token": self._token, "expires_at": time.time() + self._ttl}
        self._storage.write_atomic(self._name, json.dumps(lease).encode())

    def _renew(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            try:
                held = self._read()
                if held is None or held["token"] != self._token:
                    self.lost = True
                    logger.error("%s/%s: lease lost to %s; this writer no longer owns its id",
                                 self._storage.url, self._name, held["owner"] if held else "nobody")
                    return
                self._write()
            except Exception:  # a network blip: retry at the next tick, before expiry
                logger.warning("%s/%s: lease renewal failed", self._storage.url, self._name,
                               exc_info=True)

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        try:
            held = self._read()
            if held is not None and held["token"] == self._token:
                self._storage.remove(self._name)
        except (OSError, ValueError):
            logger.warning("%s/%s: lease not removed; it expires on its own", self._storage.url,
                           self._name, exc_info=True)
