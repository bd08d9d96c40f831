"""What lkfast._C was built from: a fingerprint of the C++/CUDA sources (csrc/), written by setup.py
beside the built extension (``_C.<abi>.sources``, JSON) and compared by ``lkfast._ext`` with the
checkout's csrc/ when lkfast is imported from a source tree, so a stale build is named instead of
silently run. Standard library only: setup.py loads this file by path, before lkfast is importable.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def source_hash(csrc) -> str:
    """sha256 (16 hex digits) over csrc's source files: their paths and contents."""
    root = Path(csrc)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def record_path(extension_file) -> Path:
    """The record beside a built extension: ``_C.cpython-312-x86_64-linux-gnu.so`` ->
    ``_C.cpython-312-x86_64-linux-gnu.sources``."""
    return Path(str(extension_file)).with_suffix(".sources")


def write_record(extension_file, sources: str, **details) -> Path:
    """The record beside ``extension_file``: ``sources`` is the ``source_hash`` of the csrc/ it was
    built from, taken before the build began."""
    path = record_path(extension_file)
    path.write_text(json.dumps({"sources": sources, **details}, indent=1) + "\n")
    return path


def built_from(extension_file) -> Optional[str]:
    """The ``source_hash`` recorded beside ``extension_file`` (None without a readable record)."""
    try:
        sources = json.loads(record_path(extension_file).read_text())["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sources if isinstance(sources, str) else None


def stale_reason(extension_file, csrc) -> Optional[str]:
    """Why ``extension_file`` does not match the sources in ``csrc`` (None when it does, and when
    nothing can be said: no csrc/ beside the package, as in an installed wheel, or no record, as in
    a build older than the record)."""
    csrc = Path(csrc)
    if not csrc.is_dir():
        return None
    built = built_from(extension_file)
    if built is None:
        return None
    now = source_hash(csrc)
    if built == now:
        return None
    return (f"{Path(str(extension_file)).name} was built from other sources than {csrc} holds now (built from "
            f"{built}, the checkout's are {now}): rebuild with `pip install --no-build-isolation -e .`")
