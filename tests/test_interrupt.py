"""What a crash, a kill, a full disk or a second process at the same time leaves behind, and what the
next run makes of it: cache files damaged by hand, concurrent writers of the same files. Crashes are
simulated by writing what they leave, not by killing processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lkfast.eval import EvalOptions, ModelSpec, register_task, run_evaluation
from lkfast.eval.cache import ResultCache
from lkfast.eval.registry import TASKS
from lkfast.tables import temporary_files

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

DAMAGED = [b'{"top1": 1', bytes(range(256)), b"[1, 2]", b"null", b""]


@pytest.mark.parametrize("junk", DAMAGED, ids=["cut-short", "not-utf8", "a-list", "null", "empty"])
def test_a_damaged_result_file_reads_as_missing(tmp_path, junk):
    cache = ResultCache(tmp_path)
    path = cache.save_result("clean", "k", {"top1": 1.0})
    path.write_bytes(junk)
    assert cache.load_result("clean", "k") is None


def test_a_run_recomputes_a_result_and_model_card_filled_with_garbage(tmp_path):
    """A task result and the model card (model.json) damaged by hand (a disk-full or a crash on a
    file system without atomic renames): the next run computes the task again, no traceback."""
    calls = []

    def constant(ctx):
        calls.append(1)
        return {"value": 3}

    register_task("test-constant", constant, replace=True)
    try:
        specs = [ModelSpec("test_resnet", None, "tiny", input_size=32)]
        options = EvalOptions(out=str(tmp_path), workers=0, progress=False, write_report=False)
        first = run_evaluation(specs, ["test-constant"], options)
        results = list(tmp_path.glob("cache/*/test-constant/result.*.json"))
        cards = list(tmp_path.glob("cache/*/model.json"))
        assert len(results) == 1 and len(cards) == 1 and len(calls) == 1
        cards[0].write_bytes(bytes(range(256)))  # every task cached: the card is read, not rebuilt
        second = run_evaluation(specs, ["test-constant"], options)
        assert len(calls) == 1 and second["tiny"]["test-constant"] == first["tiny"]["test-constant"]
        assert "parameters" not in second["tiny"]["_model"]  # what it cannot read is left out
        results[0].write_bytes(bytes(range(256)))
        third = run_evaluation(specs, ["test-constant"], options)
        assert len(calls) == 2 and third["tiny"]["test-constant"]["value"] == 3
        assert json.loads(results[0].read_text())["value"] == 3  # rewritten whole
        assert third["tiny"]["_model"] == first["tiny"]["_model"]
    finally:
        TASKS.pop("test-constant")


def _source(root, per_class=3, size=40):
    from lkfast import data

    g = torch.Generator().manual_seed(0)
    for wnid in ("n01440764", "n01443537"):
        for i in range(per_class):
            path = root / wnid / f"img{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode_jpeg(data.to_uint8(torch.rand(3, size, size, generator=g)), quality=90))
    return root


@pytest.mark.parametrize("left", [b"\xff", b"\xff\xd8\xff"], ids=["1-byte", "3-byte"])
def test_corrupt_rerun_rewrites_an_output_cut_to_a_few_bytes(tmp_path, left):
    """A rendered JPEG cut to 1-3 bytes (a killed copy, a crash before the data reached the disk) is
    not complete and is written again; the check used to seek before the start of the file (OSError)."""
    from lkfast.data import io as data_io
    from lkfast.data.writer import render

    src = _source(tmp_path / "src")
    dst = tmp_path / "dst"
    assert render(src, dst, "c", names=["gaussian_noise"], levels=[1], progress=False) == 6
    whole = dst / "gaussian_noise" / "1" / "n01440764" / "img1.JPEG"
    good = whole.read_bytes()
    whole.write_bytes(left)
    assert not data_io.is_complete(whole)
    counts = {}
    assert render(src, dst, "c", names=["gaussian_noise"], levels=[1], progress=False, counts=counts) == 1
    assert counts["complete"] == 5 and whole.read_bytes() == good


def _cli(*args):
    from lkfast.eval.cli import main

    return main([str(a) for a in args])


def test_an_out_folder_that_cannot_be_written_is_one_line_before_anything_runs(tmp_path, capsys, monkeypatch):
    import lkfast.eval.runner

    monkeypatch.setattr(lkfast.eval.runner, "run_evaluation", lambda *a: pytest.fail("evaluated anyway"))
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "report"  # (root may write read-only folders: a file in the path fails for all)
    assert _cli("--models", "test_resnet=tiny", "--val-dir", _source(tmp_path / "val"), "--out", out,
                "--no-progress") == 2
    err = capsys.readouterr().err
    assert f"lkfast.eval: error: --out {out} cannot be written" in err and "Traceback" not in err


def test_a_full_disk_mid_run_is_one_line_that_says_the_finished_work_is_kept(tmp_path, capsys, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ResultCache, "save_shard", full)
    assert _cli("--models", "test_resnet=tiny", "--val-dir", _source(tmp_path / "val"), "--out", tmp_path / "out",
                "--suite", "clean", "--input-size", 32, "--workers", 0, "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lkfast.eval: error: [Errno 28] No space left on device (free space under "
                              f"{tmp_path / 'out'} or fix its permissions, then rerun")  # (the error names no file)
    assert "finished work is cached" in err[-1] and not any("Traceback" in line for line in err)


def _no_escape(call):
    """call(), failing the test (not stopping pytest) where a KeyboardInterrupt escapes it."""
    try:
        return call()
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt escaped the command (a traceback, not its one line)")


def test_a_ctrl_c_while_the_eval_starts_is_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C or SIGTERM in a run's first seconds, while it imports the tasks (build_parser), printed
    Python's KeyboardInterrupt traceback (and SIGTERM exited 130, not 143); now the one line, as later."""
    import signal

    import lkfast.eval.cli as cli

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert _no_escape(lambda: _cli("--models", "test_resnet", "--out", tmp_path / "out")) == 130
    assert capsys.readouterr().err == ("\nlkfast.eval: interrupted while starting, before anything was written: "
                                       "rerun the command\n")

    def terminated():  # SIGTERM arrives: lkfast.interrupt's handler raises KeyboardInterrupt
        signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(cli, "build_parser", terminated)
    assert _no_escape(lambda: _cli("--models", "test_resnet", "--out", tmp_path / "out")) == 143
    assert "terminated (SIGTERM) while starting" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_second_ctrl_c_while_the_first_is_handled_is_ignored(tmp_path, capsys, monkeypatch):
    """The impatient double Ctrl-C: a second one while the first's line is printed (or the lock let go)
    landed in the handler as a traceback after the line; now it is ignored, and Ctrl-C's handler is
    Python's own again once the command returns."""
    import signal

    import lkfast.eval.cli as cli

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ResultCache, "save_shard", stopped)
    import lkfast.interrupt

    real = lkfast.interrupt.how_stopped  # (what the handler calls first: the second Ctrl-C arrives there)
    monkeypatch.setattr(lkfast.interrupt, "how_stopped", lambda got: signal.raise_signal(signal.SIGINT) or real(got))
    # Ctrl-C raising KeyboardInterrupt, as in a terminal (a background job, CI's, starts with it ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert _no_escape(lambda: _cli("--models", "test_resnet=tiny", "--val-dir", _source(tmp_path / "val"),
                                       "--out", tmp_path / "out", "--suite", "clean", "--input-size", 32, "--workers",
                                       0, "--no-progress")) == 130
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert "\nlkfast.eval: interrupted before any result was written" in err and "Traceback" not in err, err


def test_a_run_removes_the_temporary_files_of_writes_killed_midway(tmp_path):
    """A run killed (SIGKILL) in the middle of an atomic write leaves its temporary file beside the
    target; nothing read it, but it stayed under --out run after run. The next run removes those of
    processes that have ended, and leaves a live process's alone."""
    out = tmp_path / "out"
    options = EvalOptions(out=str(out), data={"val": str(_source(tmp_path / "val"))}, workers=0, progress=False,
                          write_report=False)
    specs = [ModelSpec("test_resnet", None, "tiny", input_size=32)]
    first = run_evaluation(specs, ["clean"], options)
    shard_folder = next(out.glob("cache/*/clean/val"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    left = [shard_folder / f".abc.pt.0123abcd.tmp{dead}", out / f".results.json.89abcdef.tmp{dead}"]
    live = shard_folder / f".abd.pt.0123abce.tmp{os.getpid()}"
    for path in left + [live]:
        path.write_bytes(b"half a shard")
    assert {p.name for p in left} <= {p.name for p in temporary_files(shard_folder) + temporary_files(out)}
    second = run_evaluation(specs, ["clean"], options)
    assert not any(p.exists() for p in left) and live.exists()
    assert second["tiny"]["clean"]["top1"] == first["tiny"]["clean"]["top1"]


@pytest.mark.parametrize("junk", [{"x": 1}, {"items": {"top1": torch.ones(2)}}, {"items": [1], "skipped": 0},
                                  {"items": {"top1": [1, 2]}, "skipped": 0}, torch.ones(3)],
                         ids=["other-keys", "no-skipped", "items-a-list", "not-tensors", "a-tensor"])
def test_a_shard_file_of_another_shape_is_computed_again(tmp_path, junk):
    """A file under a shard's key that loads but is not a shard's records (not written by save_shard)
    raised KeyError: 'skipped' from inside the run; now it reads as missing and is computed again."""
    cache = ResultCache(tmp_path)
    path = cache.save_shard("clean", "val", "k", {"items": {"top1": torch.ones(2)}, "skipped": 1})
    assert cache.load_shard("clean", "val", "k")["skipped"] == 1
    torch.save(junk, path)
    assert cache.load_shard("clean", "val", "k") is None


def test_two_processes_wanting_one_cache_entry_build_it_once(tmp_path):
    """Two evals started together on a fresh cache: the second waits for the first's build and uses
    it. Both used to build at once, and the embedded default's training runs shared a work folder
    that the first to finish deleted under the other ('No such file or directory: .../last.pth')."""
    import threading

    from lkfast.cache import ensure_entry, verify_entry

    entry, started, release, built, said = tmp_path / "models" / "m", threading.Event(), threading.Event(), [], []

    def slow_build(folder):
        built.append("first")
        started.set()
        assert release.wait(10)
        (folder / "w.bin").write_bytes(b"weights")

    def second_build(folder):
        built.append("second")
        (folder / "w.bin").write_bytes(b"weights")

    first = threading.Thread(target=ensure_entry, args=(entry, slow_build, "k"))
    first.start()
    assert started.wait(10)
    # (flock locks are per open file: a second open in this process waits as another process would)
    second = threading.Thread(target=lambda: ensure_entry(entry, second_build, "k", log=said.append))
    second.start()
    second.join(0.5)
    assert second.is_alive() and said and "waiting for another process" in said[0]
    release.set()
    first.join(10)
    second.join(10)
    assert built == ["first"] and verify_entry(entry, "k") == (True, "")
    assert sorted(p.name for p in entry.parent.iterdir()) == ["m"]  # the lock file goes with the lock


@pytest.mark.parametrize("junk", [b"PK\x03\x04 cut short", bytes(range(256)) * 4], ids=["cut-short", "garbage"])
def test_train_names_a_damaged_last_pth_and_what_to_do(tmp_path, capsys, junk):
    """A resumed python -m lkfast.train whose OUT/last.pth is damaged says so in one line naming it
    (it was torch.load's traceback, e.g. 'OSError: [Errno 22] Invalid argument'); the embedded
    default's eval shows the same line for its training work folder."""
    from lkfast.train import main

    data = _source(tmp_path / "data" / "train", per_class=1)
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes(junk)
    assert main(["resnet_tiny", "--data", str(data.parent), "--out", str(out), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"lkfast.train: error: {out / 'last.pth'} cannot be read" in err and "delete it" in err
    assert "Traceback" not in err


def test_train_names_a_last_pth_the_disk_cannot_read(tmp_path, capsys, monkeypatch):
    """An I/O error reading OUT/last.pth (a disk or network-filesystem fault; torch.load of some damaged
    files raised OSError on earlier torch versions, as the test above says) is the same one line, not a
    traceback. The fault is injected: no file on a healthy disk raises it with this torch."""
    import errno

    import lkfast.train as train

    data = _source(tmp_path / "data" / "train", per_class=1)
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes(b"PK\x03\x04")

    def faulty(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(train.torch, "load", faulty)
    assert train.main(["resnet_tiny", "--data", str(data.parent), "--out", str(out), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"lkfast.train: error: {out / 'last.pth'} cannot be read (OSError: [Errno 5] Input/output error)" in err
    assert "Traceback" not in err


def test_a_build_removes_what_killed_builds_of_its_entry_left(tmp_path):
    """A build killed mid-way leaves its temporary folder (the synthetic benchmark's partial images,
    training's empty one); the next build of that entry removes such folders, and only those."""
    from lkfast.cache import ensure_entry

    entry = tmp_path / "synthetic" / "val"
    for name in ("val.tmp-999999-123", "val.old-999999-456"):
        (tmp_path / "synthetic" / name / "cls").mkdir(parents=True)
        (tmp_path / "synthetic" / name / "cls" / "0.png").write_bytes(b"partial")
    (tmp_path / "synthetic" / "val.tmp-notes").mkdir()  # not a name ensure_entry makes: left alone
    (tmp_path / "synthetic" / "val.tmp-999999-7.keep").mkdir()  # begins like one, but is not: left alone
    (tmp_path / "synthetic" / "val2.tmp-1-2").mkdir()   # another entry's: left alone
    (tmp_path / "synthetic" / "val.tmp-1-789").mkdir()  # process 1 is alive (a build the lock did not reach): left alone
    ensure_entry(entry, lambda d: (d / "x").write_text("x"), "k")
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == \
        ["val", "val.tmp-1-789", "val.tmp-999999-7.keep", "val.tmp-notes", "val2.tmp-1-2"]


def test_a_report_killed_before_its_manifest_leaves_no_stale_tables_later(tmp_path, monkeypatch):
    """A report killed after writing its tables but before its manifest: the rerun's report rewrites
    them and must count them as its own, so that a later report without those tasks removes them
    (they were taken for the user's files and kept, looking current)."""
    import lkfast.eval.report as report

    both = {"m": {"clean": {"top1": 50.0}, "imagenet-a": {"top1": 10.0}}, "_meta": {}}
    real = report._write_report

    def killed(out, results):
        real(out, results)
        raise KeyboardInterrupt  # SIGKILL here: everything written but the manifest

    monkeypatch.setattr(report, "_write_report", killed)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(tmp_path, both)
    monkeypatch.setattr(report, "_write_report", real)
    report.write_report(tmp_path, both)  # the rerun
    assert "tables/imagenet_a.md" in json.loads((tmp_path / report.REPORT_FILES).read_text())
    report.write_report(tmp_path, {"m": {"clean": {"top1": 50.0}}, "_meta": {}})
    assert not (tmp_path / "tables" / "imagenet_a.md").exists()
    assert not (tmp_path / "figures" / "figure2.png").exists()


def test_figures_are_written_through_a_temporary_file_of_their_own(tmp_path):
    """save_figure_atomic (every figure of the report and of lkfast.analysis.plots): a PNG with the
    mode the umask allows, no temporary file left, none left when saving fails, and no shared
    temporary name (two runs writing the same figure at once: the old fixed '.NAME.tmp.png')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lkfast.tables import save_figure_atomic

    path = tmp_path / "figures" / "figure4.png"
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / ".figure4.png.tmp.png").mkdir()  # another writer's fixed-name temporary file
    fig = plt.figure()
    old = os.umask(0o022)
    try:
        assert save_figure_atomic(fig, path) == path
    finally:
        os.umask(old)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == [".figure4.png.tmp.png", "figure4.png"]

    class Broken:
        def savefig(self, *args, **kwargs):
            raise RuntimeError("no space")

    with pytest.raises(RuntimeError, match="no space"):
        save_figure_atomic(Broken(), tmp_path / "figures" / "figure6.png")
    assert sorted(p.name for p in path.parent.iterdir()) == [".figure4.png.tmp.png", "figure4.png"]
    plt.close(fig)


def test_the_one_atomic_writer_names_its_temporary_files_for_temporary_files(tmp_path):
    """lkfast.tables.write_atomic serves write_text_atomic, write_bytes_atomic, save_figure_atomic
    and lkfast.data's write_atomic: its temporary file, while being written (where a kill would
    leave it), is one temporary_files finds, but not as stale while its process lives; and each call
    has its own (a write of the same path nested in another shared lkfast.data's .NAME.tmpPID)."""
    from lkfast import tables
    from lkfast.data import io as data_io

    target = tmp_path / "out" / "result.json"

    def outer(f):
        assert tables.temporary_files(target.parent, stale_only=False) == [Path(f.name)]
        assert tables.temporary_files(target.parent) == []  # this process is alive
        data_io.write_atomic(target, b"inner")  # the same path, meanwhile: its own temporary file
        f.write(b"outer")

    assert tables.write_atomic(target, outer) == target
    assert target.read_bytes() == b"outer" and [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_the_atomic_writer_renames_a_closed_complete_file(tmp_path, monkeypatch):
    """write_atomic renames its temporary file only once it is closed: at the rename it holds every
    byte (renamed while still open, the buffered bytes were not yet in it: a reader opening the
    path in between saw a short or empty file)."""
    from lkfast import tables

    real_replace, seen = os.replace, []

    def replace(src, dst):
        seen.append((Path(src).read_bytes(), Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    tables.write_text_atomic(tmp_path / "r.json", '{"top1": 1.0}')
    tables.write_bytes_atomic(tmp_path / "s.pt", b"x" * 100)
    assert seen == [(b'{"top1": 1.0}', "r.json"), (b"x" * 100, "s.pt")]


@pytest.mark.parametrize("name", ["a" * 245 + ".json", "é" * 122 + "a.json"])  # 250 bytes each
def test_a_name_near_the_file_systems_limit_is_written(tmp_path, name):
    """write_atomic's temporary name is ~21 bytes longer than the name: a 250-byte name (the limit is
    255) could not be written at all (OSError: File name too long). The temporary name is now cut to
    fit, is still one temporary_files finds, and each call's own."""
    from lkfast import tables

    target = tmp_path / name
    seen = []

    def write(f):
        seen.append(Path(f.name).name)
        assert Path(f.name) in tables.temporary_files(tmp_path, stale_only=False)
        if len(seen) == 1:
            tables.write_atomic(target, write)  # the same path, meanwhile: another temporary name
        f.write(b"x")

    assert tables.write_atomic(target, write) == target
    assert target.read_bytes() == b"x" and [p.name for p in tmp_path.iterdir()] == [name]
    assert len(set(seen)) == 2 and all(len(os.fsencode(n)) <= 255 for n in seen)


def test_train_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    """A save that fails for want of space (ENOSPC at the write) leaves no .NAME.tmpPID behind and
    ends python -m lkfast.train with one line saying what to do (torch.save into the file gave
    'RuntimeError: basic_ios::clear: iostream error'); a temporary file a killed save left is
    removed by the next run, one of a live process is not."""
    import builtins
    import errno

    import lkfast.train as train_module

    data = _source(tmp_path / "data" / "train", per_class=1)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pth.0123abcd.tmp999999999").write_bytes(b"a killed save")  # no such process
    (out / ".last.pth.0123abcd.tmp1").write_bytes(b"pid 1 is alive")
    (out / ".notes.tmp2").mkdir()  # a folder: not a save's temporary file
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if ".tmp" in Path(file).name and "w" in mode:
            handle.close()

            class Full:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    return False

                def write(self, data):
                    raise OSError(errno.ENOSPC, "No space left on device")
            return Full()
        return handle

    monkeypatch.setattr(builtins, "open", full_disk)
    rc = train_module.main(["resnet_tiny", "--data", str(data.parent), "--out", str(out), "--epochs", "1", "--quiet"])
    monkeypatch.setattr(builtins, "open", real_open)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "lkfast.train: error: [Errno 28] No space left on device (free space" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [".last.pth.0123abcd.tmp1", ".notes.tmp2"]


def test_the_build_lock_gives_way_where_locking_fails(tmp_path, monkeypatch):
    """Waiting for the lock can fail where flock is emulated (ENOLCK/ESTALE on NFS): the entry is then
    built unlocked, as before the lock, rather than the run failing; and a lock file removed during
    the build (a cache folder emptied by hand) does not turn a finished build into an error."""
    import errno
    import fcntl

    from lkfast.cache import ensure_entry, verify_entry

    real_flock = fcntl.flock

    def busy_then_failing(handle, operation):
        if operation & fcntl.LOCK_NB:
            raise BlockingIOError(errno.EWOULDBLOCK, "held elsewhere")
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", busy_then_failing)
    lines = []
    entry = tmp_path / "cache" / "a"
    ensure_entry(entry, lambda d: (d / "x").write_text("x"), "k", log=lines.append)
    assert verify_entry(entry, "k") == (True, "") and any("waiting for another process" in line for line in lines)
    monkeypatch.setattr(fcntl, "flock", real_flock)
    entry = tmp_path / "cache" / "b"
    ensure_entry(entry, lambda d: [p.unlink() for p in d.parent.glob(".*.lock")] and None, "k")
    assert verify_entry(entry, "k") == (True, "")
    assert sorted(p.name for p in entry.parent.iterdir()) == ["a", "b"]


def test_only_storage_errors_become_the_free_space_line(tmp_path, capsys, monkeypatch):
    """The CLIs' one line "free space or fix that folder's permissions" is for the errors that mean
    that (ENOSPC, EDQUOT, EACCES, EPERM, EROFS); another OSError keeps its traceback, and a
    last.pth that fails to load is named with its error, not given the free-space line."""
    import errno

    import lkfast.train as train_module
    from lkfast.tables import is_storage_error

    assert is_storage_error(OSError(errno.ENOSPC, "full")) and is_storage_error(PermissionError(errno.EACCES, "no"))
    assert not is_storage_error(OSError(errno.EIO, "I/O error")) and not is_storage_error(ValueError("x"))
    data = _source(tmp_path / "data" / "train", per_class=1)
    run = ["resnet_tiny", "--data", str(data.parent), "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet"]

    def fails_with(error):
        def train(argv):
            raise error
        monkeypatch.setattr(train_module, "train", train)

    fails_with(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert train_module.main(run) == 2 and "Disk quota exceeded (free space" in capsys.readouterr().err
    fails_with(ConnectionResetError(errno.ECONNRESET, "peer went away"))
    with pytest.raises(ConnectionResetError):
        train_module.main(run)
    monkeypatch.undo()
    out = tmp_path / "run2"
    out.mkdir()
    torch.save({"x": 1}, out / "last.pth")
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(ModuleNotFoundError("no module 'lkfast.old'")))
    capsys.readouterr()
    # (read with weights_only=True since 8cf5b48, a last.pth that fails to load is the file's: named, with the error)
    assert train_module.main(run[:3] + ["--out", str(out)] + run[5:]) == 2
    err = capsys.readouterr().err
    assert "last.pth cannot be read (ModuleNotFoundError: no module 'lkfast.old')" in err and "free space" not in err, err
    monkeypatch.setattr(torch, "load", real_load)


def test_the_table_writer_formats_cells_and_refuses_bad_rows(tmp_path):
    """lkfast.tables' markdown: None and NaN as '—', bools as words (not numbers: their column stays
    left-aligned), '-0.00' without its sign, '|' escaped, numeric columns right-aligned (an empty or
    all-None column left); a row or an align of the wrong length refused; write_table's .md carries
    the caption above a blank line, its .csv the raw cells."""
    from lkfast import tables

    rows = [["a|b", 1.234, True, None, -0.001], ["c", float("nan"), False, None, 2]]
    text = tables.markdown_table(["name", "x", "ok", "none", "y"], rows, caption="Table 9.")
    assert text.splitlines() == ["Table 9.", "", "| name | x | ok | none | y |", "| --- | ---: | --- | --- | ---: |",
                                 "| a\\|b | 1.23 | True | — | 0.00 |", "| c | — | False | — | 2 |"]
    with pytest.raises(ValueError, match=r"row 1 has 2 cells, the header has 3"):
        tables.markdown_table(["a", "b", "c"], [[1, 2, 3], [1, 2]])
    with pytest.raises(ValueError, match="align must be 2 letters"):
        tables.markdown_table(["a", "b"], [[1, 2]], align="l")
    md, csv_path = tables.write_table(tmp_path / "t", ["name", "x"], [["a", 0.5], ["b", None]], caption="Cap.")
    assert md.read_text().startswith("Cap.\n\n| name | x |")
    assert csv_path.read_text() == "name,x\na,0.5\nb,\n"
    # a repeated column name ("paper" beside each measured value) gets the one before it in the CSV (pandas
    # read the summary's four "paper" columns as paper, paper.1, ...); the markdown keeps the short name
    md, csv_path = tables.write_table(tmp_path / "u", ["Model", "A", "paper", "R", "paper"], [["m", 1, 2, 3, None]])
    assert "| Model | A | paper | R | paper |" in md.read_text()
    assert csv_path.read_text().splitlines() == ["Model,A,paper (A),R,paper (R)", "m,1,2,3,"]
