"""The result cache: one file per finished shard and one per finished task, written atomically.

Layout under ``<out>/cache/``::

    <model key>/<task>/<part>/<shard key>.pt     per-item records of one shard (torch.save of a dict)
    <model key>/<task>/result.<options key>.json the task's metrics once every shard is done

A model key names the model and the hash of its checkpoint; shard and options keys hash everything
that changes the numbers (options, data folder, image range, record format, and the files read: a
shard the path, size and modification time of each of its files, a task result those of every file
under each data folder, so a repaired, re-rendered, added or removed file is read again). A killed run loses at
most the shard in flight; a rerun loads what is there and computes only what is missing.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from lkfast.tables import write_bytes_atomic, write_text_atomic


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of the JSON form of ``obj`` (keys sorted): equal inputs give equal keys across runs."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


_FILE_HASHES: Dict[tuple, str] = {}


def file_hash(path: str, length: int = 16) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks), cut to ``length`` hex digits. Remembered
    per (path, size, modification time) within a process: a checkpoint is read once per run, not
    once per task."""
    st = os.stat(path)
    memo = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[memo] = digest.hexdigest()
    return _FILE_HASHES[memo][:length]


def _stat_row(path: str) -> list:
    try:
        st = os.stat(path)
    except OSError:
        return [path, None]
    return [path, st.st_size, st.st_mtime_ns]


def files_fingerprint(paths) -> str:
    """Hash of each file's path, size and modification time (an unreadable or missing one counts as
    such): a repaired, re-rendered, added or removed file changes it, without reading any bytes."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(json.dumps(_stat_row(str(path))).encode())
    return digest.hexdigest()[:16]


def tree_fingerprint(root: str, progress: Optional[Callable[[int], Any]] = None) -> str:
    """``files_fingerprint`` of every file under folder ``root`` in sorted order (hidden entries
    skipped): one stat per file, no file read. "" for a path that is not a folder. ``progress(n)``
    is called as the files are stat'ed, n at a time (a progress bar's update: ImageNet-C's 3.75M
    files take ~40 s on a local disk, minutes on a network one)."""
    if not os.path.isdir(root):
        return ""
    paths = []
    for folder, dirs, files in os.walk(root, followlinks=True):  # a linked folder is read as its files
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths.extend(os.path.join(folder, f) for f in sorted(files) if not f.startswith("."))
    if progress is None:
        return files_fingerprint(paths)

    def counted(step=4096):
        for start in range(0, len(paths), step):
            chunk = paths[start:start + step]
            yield from chunk
            progress(len(chunk))
    return files_fingerprint(counted())


def read_json_object(path) -> Optional[Dict[str, Any]]:
    """The JSON object (dict) stored in ``path``, or None when the file is missing or damaged: cut
    short, garbage bytes (not UTF-8), or valid JSON that is not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # ValueError: JSONDecodeError and UnicodeDecodeError
        return None
    return data if isinstance(data, dict) else None


def safe_name(text: str) -> str:
    """``text`` as one path component: anything but letters, digits, '.', '-', '_' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "_"


class ResultCache:
    """Shard records and task results of one model under ``root`` (= ``<out>/cache/<model key>``)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def shard_path(self, task: str, part: str, key: str) -> Path:
        return self.root / safe_name(task) / safe_name(part) / f"{key}.pt"

    def load_shard(self, task: str, part: str, key: str) -> Optional[Dict[str, Any]]:
        """The stored records of a shard ({"items": {name: tensor}, "skipped": int}), or None when it was
        never finished, cannot be read or holds something else."""
        path = self.shard_path(task, part, key)
        if not path.is_file():
            return None
        try:
            found = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated file from a crash on a filesystem without atomic rename
            return None
        if not (isinstance(found, dict) and isinstance(found.get("items"), dict) and isinstance(found.get("skipped"), int)
                and all(isinstance(v, torch.Tensor) for v in found["items"].values())):
            return None  # a file of another shape under the key (not written by save_shard): computed again
        return found

    def save_shard(self, task: str, part: str, key: str, records: Dict[str, Any]) -> Path:
        """Store a shard's records atomically (temporary file + rename)."""
        buffer = io.BytesIO()  # torch.save into a file on a full disk raises a RuntimeError from its C++
        torch.save(records, buffer)  # writer with no reason given; a plain write says ENOSPC
        return write_bytes_atomic(self.shard_path(task, part, key), buffer.getbuffer())

    def result_path(self, task: str, key: str) -> Path:
        return self.root / safe_name(task) / f"result.{key}.json"

    def load_result(self, task: str, key: str) -> Optional[Dict[str, Any]]:
        """The stored result of a task, or None when there is none or the file is damaged (cut short,
        not UTF-8, not a JSON object: the task is computed again and the file rewritten)."""
        return read_json_object(self.result_path(task, key))

    def save_result(self, task: str, key: str, result: Dict[str, Any]) -> Path:
        return write_text_atomic(self.result_path(task, key), json.dumps(result, indent=1, sort_keys=True))
