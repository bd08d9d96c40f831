"""lkfast's on-disk cache: built folders that are checked before they are trusted.

    cache_dir() -> Path                  $LKFAST_CACHE, else ~/.cache/lkfast
    ensure_entry(path, build, key) -> Path
    verify_entry(path, key) -> (ok, reason)

A cache *entry* is a folder built by a function. When the build has finished, a manifest
(``.lkfast-manifest.json``: the entry's key and the size and SHA-256 of every file) is written last,
so an entry without a manifest is a partial build. ``ensure_entry`` rebuilds an entry whose manifest
is missing, whose key differs (the data or model it holds would be different), or whose files
differ from the manifest in any way: a file missing, added, truncated or with other bytes. A cached
file is never used on trust.

Builds run in a temporary sibling folder that replaces the entry only once complete, so an
interrupted build leaves either the previous entry or nothing behind. Two processes that want the same
entry take turns (a lock file beside it): the second uses what the first built.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

MANIFEST = ".lkfast-manifest.json"
_FORMAT = 1


def cache_dir() -> Path:
    """The cache folder: ``$LKFAST_CACHE`` when set, else ``~/.cache/lkfast`` (not created here)."""
    root = os.environ.get("LKFAST_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lkfast"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list:
    """Relative POSIX paths of every file under ``folder`` except the manifest, sorted."""
    out = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            rel = Path(dirpath, name).relative_to(folder).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(folder, key: str) -> Path:
    """Record ``key`` and the size and SHA-256 of every file under ``folder``; returns the manifest path."""
    folder = Path(folder)
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)} for rel in _files(folder)}
    manifest = folder / MANIFEST
    tmp = manifest.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": _FORMAT, "key": key, "files": files}, sort_keys=True))
    os.replace(tmp, manifest)
    return manifest


def verify_entry(folder, key: str) -> Tuple[bool, str]:
    """(True, "") when ``folder`` holds a complete entry built for ``key`` whose files match its
    manifest byte for byte; else (False, the first reason found)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not folder.is_dir():
        return False, "not built"
    if not manifest.is_file():
        return False, "no manifest (a partial or interrupted build)"
    try:
        data = json.loads(manifest.read_text())
        files = data["files"]
    except (ValueError, KeyError, TypeError):
        return False, "unreadable manifest"
    if data.get("format") != _FORMAT or data.get("key") != key:
        return False, "built for other settings"
    present = _files(folder)
    if present != sorted(files):
        extra = sorted(set(present) - set(files))
        missing = sorted(set(files) - set(present))
        return False, f"files differ from the manifest ({len(missing)} missing, {len(extra)} unexpected)"
    for rel, info in files.items():
        path = folder / rel
        if path.stat().st_size != info["size"]:
            return False, f"{rel}: size {path.stat().st_size}, manifest says {info['size']}"
        if _sha256(path) != info["sha256"]:
            return False, f"{rel}: contents differ from the manifest (SHA-256)"
    return True, ""


def ensure_entry(folder, build: Callable[[Path], None], key: str, log: Optional[Callable[[str], None]] = None) -> Path:
    """The verified entry ``folder``, (re)built first when it is missing, partial, built for another
    ``key`` or altered. ``build(tmp)`` fills the empty folder ``tmp``; it replaces ``folder`` only
    after ``build`` returns and the manifest is written. ``log`` gets one line saying why a rebuild
    happens. Returns ``folder``. A build that raises leaves ``folder`` as it was."""
    folder = Path(folder)
    ok, reason = verify_entry(folder, key)
    if ok:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder, log) as locked:
        ok, reason = verify_entry(folder, key)  # another process may have built it while this one waited
        if ok:
            return folder
        if log is not None and reason != "not built":
            log(f"lkfast cache: rebuilding {folder} ({reason})")
        leftovers = re.compile(re.escape(folder.name) + r"\.(?:tmp|old)-(\d+)-\d+")
        for leftover in folder.parent.iterdir() if locked else ():
            # .tmp-/.old- folders of a build that was killed: with the lock held, and their process
            # gone (a lock that does not reach another host, as on some NFS mounts, still leaves a
            # live build alone when its process id is alive here)
            found = leftovers.fullmatch(leftover.name)
            if found and leftover.is_dir() and process_gone(int(found.group(1))):
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
        tmp.mkdir()
        try:
            build(tmp)
            write_manifest(tmp, key)
            if folder.exists():
                old = folder.with_name(f"{folder.name}.old-{os.getpid()}-{time.monotonic_ns()}")
                os.replace(folder, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextlib.contextmanager
def _build_lock(folder: Path, log: Optional[Callable[[str], None]] = None):
    """An exclusive lock (``flock`` on the hidden file ``.<name>.lock`` beside the entry, removed when
    released) held while an entry is built, so that two processes on one cache (two ``python -m
    lkfast.eval`` started together on a fresh cache) do not build the same entry at once: the second
    waits, saying so in ``log``, then finds the first one's entry complete. Builds that share a work
    folder (the default's training runs) would otherwise delete it under each other. The lock goes
    with the process, however it ends. Yields whether it locked: not where ``fcntl`` is missing
    (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    path = folder.with_name(f".{folder.name}.lock")
    said = False
    while True:
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None and not said:
                log(f"lkfast cache: waiting for another process that is building {folder}")
                said = True
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError:  # waiting failed (ENOLCK, ESTALE on NFS): build unlocked, as before
                handle.close()
                yield False
                return
        except OSError:  # a file system without flock: build unlocked, as before
            handle.close()
            yield False
            return
        try:  # the holder before may have removed the file while this process waited: lock the new one
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield True
    finally:
        try:  # before unlocking: a process that opened it meanwhile sees it gone and retries
            with contextlib.suppress(FileNotFoundError):  # (someone emptied the cache folder meanwhile)
                os.unlink(path)
        finally:
            handle.close()


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (a killed writer's temporary files may go).
    This process, and one that exists but cannot be signalled (another user's), are not gone."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's)
        return False
    return False


def config_key(*parts) -> str:
    """A short stable hash of JSON-able ``parts`` (settings that change what an entry holds)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = ["cache_dir", "ensure_entry", "verify_entry", "write_manifest", "config_key", "process_gone", "MANIFEST"]
