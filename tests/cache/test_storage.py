"""logitcast.cache.storage on local disk and on S3 (a moto server on 127.0.0.1)."""

import hashlib
import json
import multiprocessing
import os
import signal
import time

import pytest

from logitcast.cache.storage import (
    FsspecStorage,
    LocalStorage,
    WriterIdInUseError,
    open_storage,
)

MiB = 1 << 20
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(autouse=True)
def _logitcast_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOGITCAST_HOME", str(tmp_path / "home"))


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "root")
    return FsspecStorage(request.getfixturevalue("s3_url"), cache_dir=tmp_path / "objects")


@pytest.fixture
def s3(s3_url, tmp_path):
    return FsspecStorage(s3_url, cache_dir=tmp_path / "objects")


def _hold_lock(url: str, name: str, owner: str, ready, done) -> None:
    lock = open_storage(url).lock(name, owner)
    ready.set()
    done.wait(60)
    lock.release()


class _Holder:
    """A child process holding `name` in `url` until told to let go, or killed."""

    def __init__(self, url: str, name: str, owner: str) -> None:
        self.ready, self.done = SPAWN.Event(), SPAWN.Event()
        self.proc = SPAWN.Process(target=_hold_lock, args=(url, name, owner, self.ready, self.done))
        self.proc.start()
        assert self.ready.wait(60), "the holder process did not take the lock"

    def stop(self, kill: bool = False) -> None:
        if kill:
            os.kill(self.proc.pid, signal.SIGKILL)
        else:
            self.done.set()
        self.proc.join(30)
        assert not self.proc.is_alive()


def _wait_for(predicate, tries: int = 200) -> bool:
    for _ in range(tries):
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ----------------------------------------------------------------------------- files


def test_open_storage_picks_the_backend_from_the_root(tmp_path, s3_url):
    local = open_storage(tmp_path / "a")
    assert isinstance(local, LocalStorage)
    assert local.root == tmp_path / "a"
    assert local.is_local
    from_url = open_storage(f"file://{tmp_path}/b")
    assert isinstance(from_url, LocalStorage)
    assert from_url.root == tmp_path / "b"
    remote = open_storage(s3_url, lease_ttl_s=5)
    assert isinstance(remote, FsspecStorage)
    assert not remote.is_local
    assert remote.url == s3_url
    assert open_storage(remote) is remote
    with pytest.raises(ValueError, match="already open storage"):
        open_storage(remote, lease_ttl_s=5)


def test_read_returns_ranges_short_at_the_end_like_a_file(storage):
    data = bytes(range(100))
    storage.write_atomic("ns/a.bin", data)
    assert storage.read("ns/a.bin") == data
    assert storage.read("ns/a.bin", 10, 5) == data[10:15]
    assert storage.read("ns/a.bin", 90) == data[90:]
    assert storage.read("ns/a.bin", 95, 100) == data[95:]
    assert storage.read("ns/a.bin", 100, 5) == b""
    assert storage.read("ns/a.bin", 200) == b""
    assert storage.read("ns/a.bin", 3, 0) == b""
    assert storage.size("ns/a.bin") == 100


def test_list_names_files_and_directories_directly_inside(storage):
    storage.write_atomic("ns/b.bin", b"b")
    storage.write_atomic("ns/a.bin", b"a")
    storage.write_atomic("ns/sub/c.bin", b"c")
    storage.write_atomic("other/manifest.json", b"{}")
    assert storage.list("ns") == ["a.bin", "b.bin", "sub"]
    assert storage.list("") == ["ns", "other"]
    assert storage.list("missing") == []
    assert storage.exists("ns/a.bin")
    assert not storage.exists("ns/missing.bin")


def test_a_missing_object_raises_file_not_found_naming_it(storage):
    for call in (lambda: storage.read("ns/gone"), lambda: storage.read("ns/gone", 0, 0),
                 lambda: storage.read("ns/gone", 5, 10), lambda: storage.size("ns/gone"),
                 lambda: storage.local_path("ns/gone")):
        with pytest.raises(FileNotFoundError, match="gone"):
            call()
    storage.remove("ns/gone")


def test_write_atomic_replaces_the_whole_object_and_leaves_no_temporaries(storage):
    storage.write_atomic("ns/manifest.json", b"first version")
    storage.write_atomic("ns/manifest.json", b"second")
    assert storage.read("ns/manifest.json") == b"second"
    assert storage.list("ns") == ["manifest.json"]
    if storage.is_local:
        assert os.listdir(storage.root / "ns") == ["manifest.json"]


def test_publish_file_makes_a_staged_file_visible_and_removes_it(storage):
    staged = storage.staging_dir("ns") / "w0-000001.open"
    staged.write_bytes(b"records" * 100)
    storage.publish_file(staged, "ns/w0-000001.shard")
    assert storage.read("ns/w0-000001.shard") == b"records" * 100
    assert not staged.exists()
    with pytest.raises(FileNotFoundError):
        storage.publish_file(staged, "ns/w0-000002.shard")


def test_staging_dir_is_the_directory_locally_and_under_logitcast_home_remotely(storage, tmp_path):
    staging = storage.staging_dir("ns")
    assert staging.is_dir()
    if storage.is_local:
        assert staging == storage.root / "ns"
    else:
        assert staging.parent.parent == tmp_path / "home" / "staging"
        assert len(staging.parent.name) == 16
        assert staging.name == "ns"


def test_remove_deletes_and_ignores_a_missing_object(storage):
    storage.write_atomic("ns/x", b"x")
    storage.remove("ns/x")
    storage.remove("ns/x")
    assert not storage.exists("ns/x")


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", "ns/.hidden", "a\\b", "./a"])
def test_bad_names_are_refused_naming_the_name(storage, name):
    with pytest.raises(ValueError, match="bad storage name"):
        storage.write_atomic(name, b"x")


def test_local_path_is_the_real_file_on_local_disk(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.write_atomic("ns/a", b"abc")
    assert storage.local_path("ns/a") == tmp_path / "ns" / "a" == storage.path("ns/a")


def test_bad_roots_and_options_are_refused(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ValueError, match="not a directory"):
        LocalStorage(tmp_path / "file")
    with pytest.raises(ValueError, match="names host"):
        LocalStorage("file://server/share")
    with pytest.raises(ValueError, match="lease_ttl_s"):
        FsspecStorage("s3://bucket/x", lease_ttl_s=0)
    with pytest.raises(ValueError, match="part_bytes"):
        FsspecStorage("s3://bucket/x", part_bytes=MiB)
    with pytest.raises(ValueError, match="cache_bytes"):
        FsspecStorage("s3://bucket/x", cache_bytes=0)


@pytest.mark.parametrize("url", ["s3://AKIAEXAMPLE:supersecret@bucket/cache",
                                 "s3://bucket/cache?X-Amz-Signature=supersecret"])
def test_a_url_carrying_credentials_is_refused_without_echoing_them(url):
    with pytest.raises(ValueError, match="credentials") as err:
        open_storage(url)
    assert "supersecret" not in str(err.value)
    assert "AKIA" not in str(err.value)


# ----------------------------------------------------------------------------- object stores


def test_a_large_file_is_uploaded_in_parts_byte_for_byte(s3_url, tmp_path):
    storage = FsspecStorage(s3_url, part_bytes=5 * MiB)
    data = os.urandom(11 * MiB)
    staged = storage.staging_dir("ns") / "big.open"
    staged.write_bytes(data)
    storage.publish_file(staged, "ns/big.shard")
    assert storage.fs.info(f"{storage._root}/ns/big.shard")["ETag"].strip('"').endswith("-3")
    got = storage.read("ns/big.shard")
    assert len(got) == len(data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert storage.read("ns/big.shard", 5 * MiB - 3, 6) == data[5 * MiB - 3: 5 * MiB + 3]


@pytest.mark.slow  # moto stores ~80 objects a second
def test_list_pages_through_more_than_a_thousand_objects(s3):
    s3.fs.pipe({f"{s3._root}/many/{i:05d}.shard": b"x" for i in range(1005)})
    names = s3.list("many")
    assert names == [f"{i:05d}.shard" for i in range(1005)]


def test_local_path_downloads_once_and_refetches_a_replaced_object(s3):
    s3.write_atomic("ns/a.shard", b"A" * 100)
    first = s3.local_path("ns/a.shard")
    assert first.read_bytes() == b"A" * 100
    assert first.parent == s3.cache_dir
    assert s3.local_path("ns/a.shard") == first
    s3.write_atomic("ns/a.shard", b"B" * 100)
    second = s3.local_path("ns/a.shard")
    assert second != first
    assert second.read_bytes() == b"B" * 100


def test_local_path_cache_evicts_the_least_recently_used_copy(s3_url, tmp_path):
    storage = FsspecStorage(s3_url, cache_dir=tmp_path / "objects", cache_bytes=250)
    for name in ("a", "b", "c"):
        storage.write_atomic(f"ns/{name}", name.encode() * 100)
    a, b = storage.local_path("ns/a"), storage.local_path("ns/b")
    os.utime(a, (1000, 1000))
    os.utime(b, (2000, 2000))
    assert storage.local_path("ns/a") == a  # a hit: a is now the most recently used
    c = storage.local_path("ns/c")
    assert a.is_file()
    assert c.is_file()
    assert not b.exists()
    assert storage.local_path("ns/b").read_bytes() == b"b" * 100


def test_local_path_returns_a_copy_larger_than_the_whole_budget(s3_url, tmp_path):
    storage = FsspecStorage(s3_url, cache_dir=tmp_path / "objects", cache_bytes=50)
    storage.write_atomic("ns/big", b"z" * 100)
    assert storage.local_path("ns/big").read_bytes() == b"z" * 100


# ----------------------------------------------------------------------------- locks


def _url(storage) -> str:
    return str(storage.root) if storage.is_local else storage.url


def test_a_lock_held_by_another_process_fails_at_once_naming_the_holder(storage):
    holder = _Holder(_url(storage), "ns/w0.lock", "host-a pid 123")
    try:
        with pytest.raises(WriterIdInUseError) as err:
            storage.lock("ns/w0.lock", "host-b pid 456")
        assert "host-a pid 123" in str(err.value)
        assert "ns/w0.lock" in str(err.value)
        assert _url(storage) in str(err.value)
    finally:
        holder.stop()
    storage.lock("ns/w0.lock", "host-b pid 456").release()


def test_a_sigkilled_holder_does_not_block_its_successor(storage):
    holder = _Holder(_url(storage), "ns/w0.lock", "doomed")
    holder.stop(kill=True)
    lock = storage.lock("ns/w0.lock", "successor")
    lock.release()
    lock.release()


def test_a_second_lock_in_the_same_process_fails_until_released(storage):
    lock = storage.lock("ns/w0.lock", "first")
    with pytest.raises(WriterIdInUseError, match="first"):
        storage.lock("ns/w0.lock", "second")
    other = storage.lock("ns/w1.lock", "other id")
    lock.release()
    storage.lock("ns/w0.lock", "second").release()
    other.release()


def _write_lease(s3, name, **fields):
    lease = {"owner": "host-z pid 7", "host": "host-z", "pid": 7, "token": "theirs",
             "expires_at": time.time() + 3600, **fields}
    s3.write_atomic(name, json.dumps(lease).encode())


def test_an_unexpired_lease_on_another_host_blocks_and_an_expired_one_is_taken(s3):
    _write_lease(s3, "ns/w0.lock")
    with pytest.raises(WriterIdInUseError, match=r"host-z pid 7 until \d{4}-"):
        s3.lock("ns/w0.lock", "me")
    _write_lease(s3, "ns/w0.lock", expires_at=time.time() - 1)
    lock = s3.lock("ns/w0.lock", "me")
    assert json.loads(s3.read("ns/w0.lock"))["owner"] == "me"
    lock.release()
    assert not s3.exists("ns/w0.lock")


def test_a_lease_is_renewed_and_its_loss_is_noticed(s3_url):
    storage = FsspecStorage(s3_url, lease_ttl_s=0.3)
    lock = storage.lock("ns/w0.lock", "me")
    first = json.loads(storage.read("ns/w0.lock"))["expires_at"]
    assert _wait_for(lambda: json.loads(storage.read("ns/w0.lock"))["expires_at"] > first)
    # Written again each try: a renewal that read our lease just before may overwrite it once.
    assert _wait_for(lambda: _write_lease(storage, "ns/w0.lock") or lock.lost)
    lock.release()
    assert json.loads(storage.read("ns/w0.lock"))["token"] == "theirs"


def test_a_lease_object_that_is_not_a_lease_is_refused(s3):
    s3.write_atomic("ns/w0.lock", b"not json")
    with pytest.raises(ValueError, match="not a writer lease"):
        s3.lock("ns/w0.lock", "me")
