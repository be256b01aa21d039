"""The default corpus: the Python standard library's own source, present on every machine.

Found through `sysconfig` (no download, no dataset hub). Files are listed in a
stable order so every process, teacher or student, sees the same documents.
This module only finds and reads text; tokenizing and packing live elsewhere.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path


def stdlib_source_files() -> list[Path]:
    """Sorted .py files of the running interpreter's standard library (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library source not found at {root}")
    return sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
    )


def stdlib_documents(max_chars: int | None = None) -> Iterator[str]:
    """Texts of `stdlib_source_files()` in order, stopping after about `max_chars` characters."""
    total = 0
    for path in stdlib_source_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        yield text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return
