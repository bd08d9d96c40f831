"""The benchmark tooling: gpu_check.sh end to end on the CPU (--dry-run) and when a step hangs,
bench_gpu's dispatch table, and the two timers of lkfast.timing."""
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
import torch

import lkfast.timing as timing
from reference import triton_interpreter_problem

ROOT = pathlib.Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"
OUT_FILES = {"summary.md", "gpu_bench.json", "gpu_bench.md", "tests.log", "rest.tar.gz"}


def _load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gpu_check(out, *args, env=None, timeout=300):
    return subprocess.run(["bash", str(GPU_CHECK), str(out), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def _files_under(folder: pathlib.Path):
    return [p for p in folder.rglob("*") if p.is_file()]


def test_gpu_check_dry_run_walks_every_step_within_the_file_limit(tmp_path):
    out = tmp_path / "out"
    result = _gpu_check(out, "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    files = _files_under(out)
    # what a GPU session can take back: at most 8 files, no deeper than two folders
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    assert {p.name for p in files} == OUT_FILES

    summary = (out / "summary.md").read_text()
    for line in ("- extension: ok", "- smoke: ok", "- eval_gpu: ok", "- pytest: ok", "- bench_gpu: ok",
                 "steps failed or timed out: 0, skipped for time: 0; exit status 0", "total: "):
        assert line in summary, f"{line!r} missing from summary.md:\n{summary}"

    # the GPU eval tests skip here; the comparison they make runs
    counts = summary.split("- eval_gpu: ok", 1)[1].splitlines()[1]
    assert "1 passed" in counts and "skipped" in counts and "failed" not in counts, summary

    log = (out / "tests.log").read_text()
    smoke = next(line for line in log.splitlines() if line.startswith("smoke: "))
    ran, total = (int(v) for v in smoke.split()[1:4:2])
    assert ran == total > 0 and " 0 failed" in smoke
    # Triton ran in its interpreter; where this Triton/NumPy pair's interpreter cannot run the kernels,
    # the summary says why instead
    problem = triton_interpreter_problem()
    for backend in ("cpu", "torch", "auto") + (() if problem else ("triton",)):
        assert any(line.startswith("ok") and line.split()[1] == backend for line in log.splitlines()), backend
    assert not problem or problem in summary, summary
    assert "tests collected" in log

    bench = json.loads((out / "gpu_bench.json").read_text())
    assert bench["dry_run"] and bench["table"]
    timed = {(r["kind"], r["backend"]) for r in bench["rows"] if "ms" in r}
    assert {("pass", "torch"), ("pass", "cpu"), ("e2e", "auto"), ("e2e", "torch-nchw"),
            ("e2e", "torch-channels_last")} <= timed
    assert "| tiny-k7 |" in (out / "gpu_bench.md").read_text()
    with tarfile.open(out / "rest.tar.gz") as archive:
        names = {pathlib.PurePath(n).name for n in archive.getnames()}
    assert {"extension.log", "smoke.log", "smoke.json", "bench_gpu.log", "versions.log"} <= names


def _gpu_check_with_python(tmp_path, script: str, limit: int):
    """gpu_check.sh --dry-run with PYTHON a shell ``script`` and GPU_CHECK_LIMIT ``limit``: it must end
    within 60 s and fail; returns (OUT_DIR, summary.md's text)."""
    python = tmp_path / "python"
    python.write_text(script)
    python.chmod(0o755)
    out = tmp_path / "out"
    start = time.monotonic()
    result = _gpu_check(out, "--dry-run", env={"PYTHON": str(python), "GPU_CHECK_LIMIT": str(limit)}, timeout=120)
    assert time.monotonic() - start < 60
    assert result.returncode != 0
    return out, (out / "summary.md").read_text()


def test_gpu_check_ends_in_time_and_writes_a_summary_when_a_step_hangs(tmp_path):
    out, summary = _gpu_check_with_python(tmp_path, "#!/bin/sh\nexec sleep 600\n", 26)  # every Python call hangs
    assert "TIMED OUT" in summary and "skipped, no time left" in summary and "total: " in summary
    assert {p.name for p in _files_under(out)} <= OUT_FILES and (out / "rest.tar.gz").exists()


def test_gpu_check_pytest_stopped_at_its_limit_still_reports_failures_and_counts(tmp_path):
    """The pytest step is stopped with SIGINT at its time limit, so the summary still names the
    tests that failed before then and the counts (a SIGTERM would leave only "TIMED OUT")."""
    tests = tmp_path / "test_slow.py"
    tests.write_text("import time\n\ndef test_fails():\n    assert False\n\ndef test_passes():\n    pass\n\n"
                     "def test_hangs():\n    time.sleep(600)\n")
    # pytest runs test_slow.py; `-c` probes run; the other steps pass at once
    _, summary = _gpu_check_with_python(tmp_path, f"""#!/bin/sh
case "$*" in *test_eval_gpu.py*) exit 0;; esac
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then exec {sys.executable} -m pytest -q -p no:cacheprovider {tests}; fi
if [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi
exit 0
""", 45)
    assert "- pytest: TIMED OUT" in summary, summary
    assert "test_slow.py::test_fails" in summary and "1 failed, 1 passed" in summary, summary


def test_gpu_check_smoke_uses_the_first_triton_configuration(tmp_path):
    """The smoke step runs with LKFAST_TRITON_AUTOTUNE=0: autotuning each of its (shape, dtype,
    layout) cases compiles and times every configuration, which does not fit its 120 s on a bare
    GPU machine."""
    seen = tmp_path / "smoke_env"
    _gpu_check_with_python(tmp_path, f"""#!/bin/sh
case "$1" in benchmarks/gpu_smoke.py) echo "autotune=$LKFAST_TRITON_AUTOTUNE" > {seen};; esac
exit 1
""", 40)
    assert seen.read_text().strip() == "autotune=0"


def _quick_test_args():
    """The pytest arguments of gpu_check.sh --quick, read off the script."""
    import re
    import shlex

    block = re.search(r"^\s*quick\)(.*?);;", GPU_CHECK.read_text(), re.S | re.M).group(1)
    words = re.search(r"test_args=\((.*?)\)", block, re.S).group(1)
    return shlex.split(words.replace("\\\n", " "))


def test_gpu_check_quick_tests_leave_out_the_cpu_only_tests():
    """--quick's pytest cap (at most 150 s of GPU time) goes to the GPU cases: the tests that never
    touch a GPU and cost minutes of CPU (the Python replays of the CUDA kernels, the sm_90
    ahead-of-time compiles, torch.compile on CPU tensors) are left out with the "cpu" cases, and
    every GPU test family is still in."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", *_quick_test_args()],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    cpu_only = [i for i in ids if any(s in i for s in ("replay", "compiles_for_sm90", "test_torch_compile", "-cpu]"))]
    assert not cpu_only, cpu_only[:10]
    for family in ("test_cuda.py::test_cuda_backend_matches_conv2d", "test_triton.py::test_triton_gpu",
                   "test_triton_mma.py::test_mma_backend_on_gpu", "test_cuda.py::test_cuda_auto_is_correct_and_uses_table",
                   "test_cuda.py::test_cuda_kernels_compiled_for_every_arch_without_spills"):
        assert any(family in i for i in ids), family
    assert any(i.startswith("tests/test_depthwise.py::test_matches_conv2d_fp32") and i.endswith("-cuda-cuda]")
               for i in ids)


def test_gpu_smoke_stopped_at_its_limit_still_reports_what_it_ran(tmp_path, monkeypatch, capsys):
    """gpu_check.sh stops the smoke test with SIGINT at its cap: the cases done by then are printed
    (each as it finishes) and saved, and the summary line says it was stopped."""
    smoke = _load_benchmark("gpu_smoke")
    real, calls = smoke.reference, []

    def interrupted_at_the_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(smoke, "reference", interrupted_at_the_third)
    try:
        rc = smoke.main(["--device", "cpu", "--tiny", "--json", str(tmp_path / "smoke.json")])
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped gpu_smoke.main: no case line, no summary, no JSON")
    assert rc == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in out if line.startswith("ok")] == [["ok", "cpu", "forward"],
                                                                          ["ok", "cpu", "input_grad"]]
    assert out[-1].startswith("smoke: 2 of 2 cases ok, 0 failed") and "STOPPED" in out[-1]
    assert [r["pass_"] for r in json.loads((tmp_path / "smoke.json").read_text())] == ["forward", "input_grad"]


def test_gpu_check_refuses_an_unknown_mode(tmp_path):
    result = _gpu_check(tmp_path / "out", "--fast")
    assert result.returncode == 2 and "usage: benchmarks/gpu_check.sh OUT_DIR [--quick|--dry-run]" in result.stderr


def _pass_row(backend, op, ms=None, error=None, dtype="float16", layout="channels_last"):
    row = dict(kind="pass", shape="s1", C=128, H=56, W=56, kh=31, kw=31, dtype=dtype, layout=layout, batch=64,
               backend=backend, op=op)
    row.update({"ms": ms} if ms is not None else {"error": error})
    return row


def test_bench_gpu_table_takes_the_fastest_per_pass_and_ships_through_save_table(tmp_path):
    bench = _load_benchmark("bench_gpu")
    cuda_table = pytest.importorskip("lkfast.ops.cuda_table")
    rows = [
        _pass_row("cuda", "forward", 1.0), _pass_row("triton", "forward", 2.0), _pass_row("torch", "forward", 3.0),
        _pass_row("cuda", "input_grad", 4.0), _pass_row("triton", "input_grad", 1.5), _pass_row("torch", "input_grad", 2.0),
        _pass_row("cuda", "weight_grad", 9.0), _pass_row("triton", "weight_grad", error="RuntimeError: boom"),
        _pass_row("torch", "weight_grad", 5.0),
        # no PyTorch time for this key's weight gradient: the key must not enter the table
        _pass_row("cuda", "forward", 1.0, layout="nchw"), _pass_row("torch", "forward", 3.0, layout="nchw"),
        _pass_row("cuda", "input_grad", 1.0, layout="nchw"), _pass_row("torch", "input_grad", 3.0, layout="nchw"),
        _pass_row("cuda", "weight_grad", 1.0, layout="nchw"),
        _pass_row("torch", "weight_grad", error="skipped: time budget spent", layout="nchw"),
    ]
    table = bench.derive_table(rows, "NVIDIA H200")
    assert table == {("NVIDIA H200", "float16", "channels_last", 31, 31, 64, 128, 56, 56): ("cuda", "triton", "torch")}

    results = tmp_path / "gpu_bench.json"
    results.write_text(json.dumps({"measured_on": "NVIDIA H200, test", "dry_run": False,
                                   "table": [[list(k), list(v)] for k, v in table.items()]}))
    shipped = tmp_path / "table.json"
    assert bench.main(["--write-table", str(results), "--table-path", str(shipped)]) == 0
    loaded = cuda_table.load_table(shipped)
    assert dict(loaded.rows) == table and loaded.measured_on == "NVIDIA H200, test"

    # several runs merge in order: a later run's row replaces an earlier one's key, new keys join
    key = ("NVIDIA H200", "float16", "channels_last", 31, 31, 64, 128, 56, 56)
    other = ("NVIDIA H200", "float32", "nchw", 13, 13, 64, 1024, 7, 7)
    kept = ("NVIDIA H200", "bfloat16", "nchw", 27, 27, 64, 512, 14, 14)
    results.write_text(json.dumps({"measured_on": "NVIDIA H200, test", "dry_run": False,
                                   "table": [[list(key), ["cuda"] * 3], [list(kept), ["triton_mma"] * 3]]}))
    later = tmp_path / "later.json"
    later.write_text(json.dumps({"measured_on": "NVIDIA H200, later", "dry_run": False,
                                 "table": [[list(key), ["torch"] * 3], [list(other), ["cuda"] * 3]]}))
    assert bench.main(["--write-table", str(results), str(later), "--table-path", str(shipped)]) == 0
    merged = cuda_table.load_table(shipped)
    assert dict(merged.rows) == {key: ("torch",) * 3, kept: ("triton_mma",) * 3, other: ("cuda",) * 3}
    assert merged.measured_on == "NVIDIA H200, test; NVIDIA H200, later"

    results.write_text(json.dumps({"measured_on": "CPU dry run", "dry_run": True, "table": []}))
    with pytest.raises(SystemExit, match="dry-run"):
        bench.main(["--write-table", str(results), "--table-path", str(shipped)])


@pytest.mark.parametrize("option, given, expected", [
    ("--shapes", None, ["replknet31b-s1"]),
    ("--shapes", "convnext-k7, replknet31b-s4", ["convnext-k7", "replknet31b-s4"]),
    ("--dtypes", "float32", ["float32"]),
    ("--shapes", "replknet31b-s9", "unknown replknet31b-s9; choose from replknet31b-s1, "),
    ("--backends", "cuda,cpu", "unknown cpu; choose from cuda, triton, triton_mma"),
    ("--dtypes", ",", r"unknown \(none given\)"),
])
def test_bench_gpu_picks_named_cases_and_refuses_unknown_ones(option, given, expected):
    bench = _load_benchmark("bench_gpu")
    if isinstance(expected, list):
        assert bench._pick(option, given, [s[0] for s in bench.SHAPES] + list(bench.DTYPES), ["replknet31b-s1"]) == expected
    else:
        known = list(bench.LKFAST_BACKENDS) if option == "--backends" else [s[0] for s in bench.SHAPES]
        with pytest.raises(SystemExit, match=f"{option}: {expected}"):
            bench._pick(option, given, known, [])


def test_bench_gpu_times_no_backend_whose_result_is_wrong(monkeypatch):
    """Each lkfast pass is checked once against PyTorch's before it is timed (on a GPU that first call
    also autotunes, so the configuration timed is the one checked): a wrong result gets no time and
    cannot win a row of the auto table, however fast it is."""
    from lkfast.ops.backends import BACKENDS

    bench = _load_benchmark("bench_gpu")
    cpu = BACKENDS["cpu"]
    if cpu.not_supported_reasons(torch.empty(1, 1, 1, 1), torch.empty(1, 1, 1, 1)):
        pytest.skip("lkfast._C is not built here")
    monkeypatch.setattr(cpu, "forward", lambda x, w, b=None, flip=False: torch.ones_like(x))  # fast and wrong
    rows = []
    bench.per_pass(bench.DRY_RUN_SHAPES[0], "float32", "channels_last", 2, bench.Run("cpu", ("cpu",), 600), rows)
    by_pass = {r["op"]: r for r in rows if r["backend"] == "cpu"}
    for name in ("forward", "input_grad"):
        assert "ms" not in by_pass[name] and by_pass[name]["error"].startswith("wrong result"), by_pass[name]
    assert "ms" in by_pass["weight_grad"] and by_pass["weight_grad"]["rel_err_vs_torch"] < 1e-5
    (key, plan), = bench.derive_table(rows, "CPU").items()
    assert plan[:2] == ("torch", "torch")


def test_bench_gpu_baseline_is_plain_pytorch():
    """The PyTorch side of each pass is F.conv2d / aten.convolution_backward, equal to autograd's."""
    bench = _load_benchmark("bench_gpu")
    x, w, g = bench.make_inputs(("t", 4, 9, 8, 5, 3), torch.float64, "channels_last", 2, "cpu")
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = torch.nn.functional.conv2d(xr, wr, None, padding=(2, 1), groups=4)
    gx, gw = torch.autograd.grad(y, (xr, wr), g)
    torch.testing.assert_close(bench.torch_pass("forward", x, w, g)(), y)
    torch.testing.assert_close(bench.torch_pass("input_grad", x, w, g)()[0], gx)
    torch.testing.assert_close(bench.torch_pass("weight_grad", x, w, g)()[1], gw)


def test_time_interleaved_varies_the_order_and_times_every_round():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = timing.time_interleaved(runs, rounds=12, warmup=1)
    assert calls[:3] == list("abc")  # the warm-up round, in the given order
    rounds = [calls[3 + 3 * r: 6 + 3 * r] for r in range(12)]
    assert all(sorted(r) == list("abc") for r in rounds)  # every callable once per round
    assert {k: len(v) for k, v in times.items()} == {"a": 12, "b": 12, "c": 12}
    # each one runs first in some round, and right after each of the others somewhere
    assert {r[0] for r in rounds} == set("abc")
    follows = {(r[i], r[i + 1]) for r in rounds for i in range(2)}
    assert follows == {(p, q) for p in "abc" for q in "abc" if p != q}
    # the same order every time: a measurement can be repeated
    again = []
    timing.time_interleaved({name: (lambda name=name: again.append(name)) for name in "abc"}, rounds=12, warmup=1)
    assert again == calls
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        timing.time_interleaved(runs, rounds=0)
    assert timing.median([3.0, 1.0, 2.0]) == 2.0 and timing.median([4.0, 1.0, 2.0, 3.0]) == 2.5


class _FakeCuda:
    """A stand-in for torch.cuda: a clock that each timed call advances by its cost in ms."""

    def __init__(self, cost_ms):
        self.now, self.cost_ms, self.calls = 0.0, cost_ms, 0
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = fake.now

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return end.at - self.at

        self.Event = Event

    def fn(self):
        self.calls += 1
        self.now += self.cost_ms(self.calls)


def test_gpu_timer_times_many_back_to_back_calls_and_excludes_warm_up(monkeypatch):
    # the first (warm-up) call costs 1000 ms (autotuning), then every call 0.5 ms
    fake = _FakeCuda(lambda n: 1000.0 if n == 1 else 0.5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    ms = timing.gpu_time_ms(fake.fn, warmup=1, samples=5, sample_ms=10.0)
    assert ms == pytest.approx(0.5)
    # 1 warm-up, 3 probe calls, then 5 samples of 10 ms / 0.5 ms = 20 back-to-back calls each
    assert fake.calls == 1 + 3 + 5 * 20
    # a call slower than a sample: still 2 calls between the events (never one), 3 samples
    slow = _FakeCuda(lambda n: 100.0)
    monkeypatch.setattr(torch.cuda, "Event", slow.Event)
    assert timing.gpu_time_ms(slow.fn, warmup=1, samples=5, sample_ms=10.0) == pytest.approx(100.0)
    assert slow.calls == 1 + 3 + 3 * 2


def test_gpu_timer_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        timing.gpu_time_ms(lambda: None)


def test_model_report_reads_interleaved_groups_and_judges_the_targets():
    """bench_models' table from an interleaved group: each variant's time, the best lkfast variant
    against the faster plain layout, the autocast table, and met / MISSED against the targets."""
    bench_models = _load_benchmark("bench_models")
    machine = {"cpu_model": "test CPU", "lkfast_cpu_isa": "avx2", "torch_cpu_capability": "AVX2",
               "onednn_max_cpu_isa": "AVX2"}

    def group(task, ms, model="replknet_31b"):
        return {"extra_info": {"kind": "interleaved", "model": model, "task": task, "device": "cpu",
                               "dtype": "float32", "batch": 8, "size": 224, "threads": 2, "rounds": 3,
                               "timer": "test timer", "load_average": [0.5, 0, 0], "ms_per_step": ms,
                               "max_rel_err_vs_reference": {v: (3e-3 if v.endswith("_amp") else 0.0) for v in ms},
                               **machine}, "stats": {"median": 99.0}}

    results = {"benchmarks": [
        group("inference", {"plain_cl": 1000.0, "lkfast_cl": 950.0, "lkfast_folded": 800.0,
                            "plain_cl_amp": 500.0, "lkfast_folded_amp": 250.0}),
        group("train_step", {"plain_cl": 10000.0, "lkfast_cl": 4000.0, "plain_cl_amp": 9000.0,
                             "lkfast_cl_amp": 1500.0}),
        # another model's autocast variants get rows of their own in the autocast table
        group("inference", {"plain_cl": 900.0, "lkfast_cl": 600.0, "plain_cl_amp": 450.0, "lkfast_cl_amp": 300.0},
              model="convnext_tiny_k7"),
    ]}
    text = bench_models.markdown_table(results)
    amp_table = text.split("Mixed precision")[1]
    convnext_amp = [c.strip() for c in next(line for line in amp_table.splitlines()
                                            if line.startswith("| convnext_tiny_k7")).split("|")[1:-1]]
    assert convnext_amp[1] == "inference" and convnext_amp[-2:] == ["3.00x", "1.50x"]  # 900 / 300, 450 / 300
    assert "convnext_tiny_k7 lkfast_cl_amp 3.0e-03" in amp_table
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| replknet_31b")}
    assert "in shuffled order, in one process" in text and "avx2" in text
    # main table: inference's best lkfast is the folded model (1000 / 800), training 10000 / 4000
    assert "1.25x" in text.split("Mixed precision")[0] and "2.50x" in text.split("Mixed precision")[0]
    assert rows["train_step"][-2:] == ["6.67x", "6.00x"]  # autocast table: vs plain fp32, vs plain autocast
    assert "plain_cl_amp 3.0e-03" in text
    assert "- inference >= 1.0x faster plain layout: 1.25x (met)" in text
    assert "- train_step >= 5.0x faster plain layout: 2.50x (MISSED)" in text
    assert "with bfloat16 autocast (against the same fp32 baseline): 6.67x (met)" in text
    assert "- input_grad >= 1.5x faster plain layout: not measured (n/a)" in text


def test_isolated_models_run_each_variant_in_its_own_processes(monkeypatch, tmp_path):
    """bench_models.isolated_times: every variant in `processes` fresh processes, started one at a
    time in alternating order, their steps pooled; logits compared with the first variant's; a
    worker that fails stops the run with its stderr."""
    import subprocess

    bench_models = _load_benchmark("bench_models")
    started = []
    scale = {"plain_cl": 1.0, "lkfast_cl": 1.0, "lkfast_folded": 1.5}

    def fake_run(cmd, capture_output, text):
        assert cmd[1].endswith("bench_models.py") and cmd[2] == "--worker"
        model_name, task, variant, rounds, path = cmd[3:8]
        started.append(variant)
        torch.save(torch.tensor([2.0, -4.0]) * scale[variant], path)
        steps = [{"seconds": 0.1 * (len(started) + r), "wall_s": 0.05, "system_s": 0.0, "page_faults": 0}
                 for r in range(int(rounds))]
        return subprocess.CompletedProcess(cmd, 0, stdout="noise\n" + json.dumps({"variant": variant, "steps": steps}))

    monkeypatch.setattr(subprocess, "run", fake_run)
    variants = ["plain_cl", "lkfast_cl", "lkfast_folded"]
    seconds, records, errs = bench_models.isolated_times("replknet_31b", "inference", variants, 2, 3, str(tmp_path))
    assert started == variants + variants[::-1] + variants  # one process at a time, reversed every other pass
    # every process's steps, pooled per variant: plain_cl was the 1st, 6th and 7th process started
    assert seconds["plain_cl"] == pytest.approx([0.1, 0.2, 0.6, 0.7, 0.7, 0.8])
    assert len(records["lkfast_folded"]) == 6
    # logits against the first variant's (max |diff| / max |reference|): 1.5x the reference is off by 0.5
    assert errs == {"plain_cl": 0.0, "lkfast_cl": 0.0, "lkfast_folded": pytest.approx(0.5)}

    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, stdout="", stderr="Traceback ...\nRuntimeError: out of memory"))
    with pytest.raises(RuntimeError, match="worker plain_cl .inference. failed with exit code 1:(.|\n)*out of memory"):
        bench_models.isolated_times("replknet_31b", "inference", variants, 1, 1, str(tmp_path))


def test_model_report_names_isolated_runs():
    bench_models = _load_benchmark("bench_models")
    e = {"kind": "isolated", "model": "replknet_31b", "task": "input_grad", "device": "cpu", "dtype": "float32",
         "batch": 8, "size": 224, "threads": 2, "rounds": 3, "processes": 2, "timer": "t",
         "load_average": [1.0, 0, 0], "ms_per_step": {"plain_cl": 900.0, "lkfast_folded": 600.0},
         "max_rel_err_vs_reference": {"plain_cl": 0.0, "lkfast_folded": 1e-6}}
    text = bench_models.markdown_table({"benchmarks": [{"extra_info": e, "stats": {"median": 1.0}}]})
    assert "each variant in 2 processes of its own" in text and "median of their 3 steps" in text
    assert "- input_grad >= 1.5x faster plain layout: 1.50x (met)" in text


def test_ceiling_variant_makes_every_large_depthwise_conv_free(monkeypatch):
    """bench_models._free_depthwise: no large depthwise conv is left, the fast op is never called
    (forward or backward), eval returns the input unchanged and training keeps the branches' BNs."""
    from lkfast.models import create_model
    from lkfast.nn.depthwise import DepthwiseConv2d
    from lkfast.nn.reparam import ReparamLargeKernelConv
    import lkfast.nn.depthwise as depthwise

    bench_models = _load_benchmark("bench_models")
    torch.manual_seed(0)
    model = create_model("replknet_tiny_k31", num_classes=10)
    originals = [m for m in model.modules() if isinstance(m, ReparamLargeKernelConv)]
    assert bench_models._free_depthwise(model) == len(originals) > 0
    assert not any(isinstance(m, (ReparamLargeKernelConv, DepthwiseConv2d)) for m in model.modules())

    def refuse(*args):
        raise AssertionError("the fast depthwise op ran in the ceiling model")

    monkeypatch.setattr(depthwise, "depthwise_conv2d", refuse)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    model.train()(x).sum().backward()
    assert x.grad is not None
    free = [m for m in model.modules() if isinstance(m, bench_models._FreeDepthwise)][0]
    y = torch.randn(2, originals[0].in_channels, 5, 5)
    expected = originals[0].lkb_origin.bn(y) + (originals[0].small_conv.bn(y) if hasattr(originals[0], "small_conv") else 0)
    torch.testing.assert_close(free(y), expected)
    free.eval()
    assert free(y) is y

    convnext = torch.nn.Sequential(DepthwiseConv2d(4, 7), torch.nn.Conv2d(4, 4, 1))
    assert bench_models._free_depthwise(convnext) == 1
    torch.testing.assert_close(convnext[0](y[:, :4]), y[:, :4])


def test_model_report_shows_the_ceiling():
    """With the ceiling variants timed, a table of plain / depthwise-free time and the targets'
    lines name the ceiling next to the measured ratio."""
    bench_models = _load_benchmark("bench_models")
    e = {"kind": "isolated", "model": "replknet_31b", "task": "train_step", "device": "cpu", "dtype": "float32",
         "batch": 8, "size": 224, "threads": 2, "rounds": 3, "processes": 2, "timer": "t",
         "load_average": [1.0, 0, 0],
         "ms_per_step": {"plain_cl": 12000.0, "lkfast_cl": 5000.0, "lkfast_nchw": 6000.0, "lkfast_cl_nodw": 4000.0},
         "max_rel_err_vs_reference": {"plain_cl": 0.0, "lkfast_cl": 1e-6, "lkfast_nchw": 1e-6, "lkfast_cl_nodw": 0.9}}
    text = bench_models.markdown_table({"benchmarks": [{"extra_info": e, "stats": {"median": 1.0}}]})
    row = [line for line in text.splitlines() if line.startswith("| replknet_31b | train_step | 12000")][0]
    assert [c.strip() for c in row.split("|")[1:-1]] == ["replknet_31b", "train_step", "12000", "5000", "4000",
                                                         "2.40x", "3.00x", "20%", "n/a"]
    assert "- train_step >= 5.0x faster plain layout: 2.40x (MISSED; ceiling with the depthwise convs free 3.00x)" in text
    # With the isolated workers' step records: the median page faults of the fastest lkfast variant
    # (lkfast_cl, not the slower lkfast_nchw) and of the depthwise-free one.
    step = lambda faults: {"seconds": 1.0, "wall_s": 0.5, "system_s": 0.1, "page_faults": faults}  # noqa: E731
    e["steps"] = {"plain_cl": [step(1)], "lkfast_cl": [step(150_000), step(125_000), step(166_000)],
                  "lkfast_nchw": [step(900_000)], "lkfast_cl_nodw": [step(0), step(12_500), step(0), step(4_000)]}
    text = bench_models.markdown_table({"benchmarks": [{"extra_info": e, "stats": {"median": 1.0}}]})
    row = [line for line in text.splitlines() if line.startswith("| replknet_31b | train_step | 12000")][0]
    assert [c.strip() for c in row.split("|")[1:-1]][-1] == "150k / 2k"


def test_gpu_smoke_check_extension_says_whether_a_carried_build_can_serve(monkeypatch, capsys):
    """gpu_check.sh uses a carried lkfast._C only when gpu_smoke.py --check-extension passes: built
    from the checkout's csrc/ (its record), with CUDA, and right on the device (here: the CPU kernels
    stand in for the CUDA ones)."""
    from lkfast import _ext
    from lkfast.ops.backends import BACKENDS

    if _ext._C is None:
        pytest.skip(f"lkfast._C is not built here: {_ext.load_error}")
    smoke = _load_benchmark("gpu_smoke")

    class WithCuda:  # the real extension, said to be built with CUDA
        def __getattr__(self, name):
            return getattr(real, name)
        with_cuda = True

    real = _ext._C
    if not real.with_cuda:
        assert smoke.main(["--check-extension", "--device", "cpu"]) == 1
        assert "extension: built without CUDA" in capsys.readouterr().out
    monkeypatch.setattr(_ext, "_C", WithCuda())
    assert smoke.main(["--check-extension", "--device", "cpu"]) == 0, capsys.readouterr().out
    assert "fits: built from these sources, with CUDA, and correct on cpu" in capsys.readouterr().out
    monkeypatch.setattr(_ext, "stale", "built from other sources")
    assert smoke.main(["--check-extension", "--device", "cpu"]) == 1
    assert "extension: built from other sources" in capsys.readouterr().out
    monkeypatch.setattr(_ext, "stale", None)
    real_forward = BACKENDS["cpu"].forward
    monkeypatch.setattr(BACKENDS["cpu"], "forward", lambda x, w, b, flip: real_forward(x, w, b, flip) * (1.0 + flip))
    assert smoke.main(["--check-extension", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "input_grad: max error" in out and "forward:" not in out


@pytest.mark.parametrize("case", ["fits", "fits-without-pip", "does-not-fit", "none-carried"])
def test_gpu_check_uses_a_carried_extension_only_when_it_fits(tmp_path, case):
    """On a GPU, gpu_check.sh --quick installs a carried lkfast/_C<abi>.so without compiling
    (LKFAST_PREBUILT=1) when gpu_smoke.py --check-extension passes, and compiles otherwise. A copy of
    the script in a made-up checkout, with a python that logs its calls and succeeds (the extension
    check as the case says)."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "lkfast").mkdir()
    shutil.copy(GPU_CHECK, repo / "benchmarks" / "gpu_check.sh")
    abi = ".cpython-312-x86_64-linux-gnu.so"
    if case != "none-carried":
        (repo / "lkfast" / f"_C{abi}").write_bytes(b"")
    calls = tmp_path / "calls"
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
echo "LKFAST_PREBUILT=${{LKFAST_PREBUILT:-}} $*" >> {calls}
case "$*" in
  *EXT_SUFFIX*) echo {abi};;
  *"--check-extension"*) case {case} in fits) ;; fits-without-pip) [ "$PYTHONPATH" = "{repo}" ] || exit 1;; *) exit 1;; esac;;
  "-m pip install"*) [ {case} = fits-without-pip ] && [ "$LKFAST_PREBUILT" = 1 ] && exit 1;;
esac
exit 0
""")
    python.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), str(out), "--quick"],
                            capture_output=True, text=True, timeout=120,
                            env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHON": str(python),
                                 "GPU_CHECK_LIMIT": "120"})
    summary = (out / "summary.md").read_text()
    log = calls.read_text().splitlines()
    prebuilt_installs = [c for c in log if c.startswith("LKFAST_PREBUILT=1 -m pip install")]
    builds = [c for c in log if c.startswith("LKFAST_PREBUILT= -m pip install")]
    if case.startswith("fits"):
        assert f"- build: skipped, the carried lkfast/_C{abi} was built from these sources" in summary, summary
        assert len(prebuilt_installs) == 1 and not builds, log
        assert (repo / "lkfast" / "kernels").is_symlink() == (case == "fits-without-pip")
    else:
        assert len(builds) == 1, log
        assert len(prebuilt_installs) == (case == "does-not-fit"), log
        assert (f"the carried lkfast/_C{abi} does not fit" in summary) == (case == "does-not-fit"), summary
    assert "--no-index --no-build-isolation --no-deps -e ." in (prebuilt_installs + builds)[0]
    assert result.returncode in (0, 1), result.stderr[-2000:]


def _gpu_check_with_fake_sanitizer(tmp_path, sanitizer_body: str, **env):
    """Run a copy of gpu_check.sh --quick in a made-up checkout, with a python on PATH that succeeds
    at everything and a compute-sanitizer whose shell body is ``sanitizer_body``; ``env`` adds to the
    environment (GPU_CHECK_LIMIT defaults to 120). Returns the CompletedProcess; the summary is in
    tmp_path / "out" / "summary.md"."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "lkfast").mkdir()
    shutil.copy(GPU_CHECK, repo / "benchmarks" / "gpu_check.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("python", "exit 0"), ("compute-sanitizer", sanitizer_body)):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "--quick"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                               "PYTHON": str(bin_dir / "python"), "GPU_CHECK_LIMIT": "120", **env})


def test_gpu_check_sanitizer_runs_without_the_caching_allocator_on_the_edge_cases(tmp_path):
    """compute-sanitizer's memcheck sees only what cudaMalloc handed out: with PyTorch's caching
    allocator on, an access past a small tensor lands inside a cached block and is not reported. So
    gpu_check.sh --quick runs it with PYTORCH_NO_CUDA_MEMORY_CACHING=1, on the smoke test's tiny shape
    and the CUDA kernels' edge cases (--tiny --edge). A copy of the script in a made-up checkout, a
    python that succeeds at everything and a compute-sanitizer on PATH that logs how it was called."""
    seen = tmp_path / "sanitizer_call"
    result = _gpu_check_with_fake_sanitizer(
        tmp_path, f'echo "caching_off=${{PYTORCH_NO_CUDA_MEMORY_CACHING:-}} $*" > {seen}\nexit 0')
    assert seen.exists(), (tmp_path / "out" / "summary.md").read_text() + result.stderr[-2000:]
    call = seen.read_text().split()
    assert call[0] == "caching_off=1", call
    assert call[1:4] == ["--tool", "memcheck", "--error-exitcode"], call
    assert call[-5:] == ["benchmarks/gpu_smoke.py", "--tiny", "--edge", "--device", "cuda"], call


@pytest.mark.parametrize("case", ["cut-short", "no-time-left"])
def test_gpu_check_sanitizer_short_of_time_is_not_a_failure(tmp_path, case):
    """--quick gives compute-sanitizer what the steps before it left. With under 45 s left it does
    not start (left to the full mode, not counted as skipped); a run cut short by its cap is
    inconclusive, counted as skipped for time, never as a failed step. A copy of the script, a python
    that succeeds at everything and a compute-sanitizer that hangs (cut-short) or logs its call."""
    seen = tmp_path / "sanitizer_call"
    limit = "120" if case == "cut-short" else "60"  # 20 s are reserved: 40 s left from the start
    result = _gpu_check_with_fake_sanitizer(tmp_path, f"echo called > {seen}\nexec sleep 60",
                                            GPU_CHECK_LIMIT=limit, GPU_CHECK_SANITIZER_CAP="6")
    summary = (tmp_path / "out" / "summary.md").read_text()
    lines = [line for line in summary.splitlines() if line.startswith("- ") and "sanitizer" in line]
    counts = re.search(r"steps failed or timed out: (\d+), skipped for time: (\d+)", summary)
    assert counts, summary + result.stderr[-2000:]
    if case == "cut-short":
        assert seen.exists(), summary
        assert lines[0].startswith("- sanitizer: did not finish in 6 s: inconclusive"), summary
        assert int(counts.group(2)) >= 1, summary
    else:
        assert not seen.exists(), summary
        assert lines[0].startswith("- compute-sanitizer: left to the full mode"), summary
    assert not any("TIMED OUT" in line or "FAILED" in line for line in lines), summary


def test_bench_gpu_plots_the_end_to_end_speed_ups(tmp_path):
    pytest.importorskip("matplotlib")
    bench = _load_benchmark("bench_gpu")
    rows = [dict(kind="e2e", shape="replknet31b-s1", layout=layout, dtype="float16", mode=mode, backend=backend, ms=ms)
            for layout in ("nchw", "channels_last") for mode in bench.MODES
            for backend, ms in (("auto", 1.0), ("torch-nchw", 3.0), ("torch-channels_last", 4.0))]
    results = tmp_path / "gpu_bench.json"
    results.write_text(json.dumps({"device": "NVIDIA H200", "batch": 64, "dry_run": False, "rows": rows}))
    png = tmp_path / "speedup.png"
    assert bench.main(["--plot", str(results), str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results.write_text(json.dumps({"device": "NVIDIA H200", "batch": 64, "dry_run": False, "rows": rows[:0]}))
    with pytest.raises(SystemExit, match="no end-to-end timings"):
        bench.main(["--plot", str(results), str(png)])
    results.write_text(json.dumps({"device": "CPU dry run", "batch": 2, "dry_run": True, "rows": rows}))
    with pytest.raises(SystemExit, match="dry-run"):
        bench.main(["--plot", str(results), str(png)])


def test_bench_gpu_speedup_is_pytorchs_faster_layout_over_auto():
    bench = _load_benchmark("bench_gpu")
    assert bench.speedup({"auto": 2.0, "torch-nchw": 8.0, "torch-channels_last": 6.0}) == pytest.approx(3.0)
    assert bench.speedup({"auto": 2.0, "torch-nchw": None, "torch-channels_last": 5.0}) == pytest.approx(2.5)
    assert bench.speedup({"auto": 2.0}) is None and bench.speedup({"torch-nchw": 1.0}) is None
    assert bench.speedup({"auto": None, "torch-nchw": 1.0}) is None


@pytest.mark.parametrize("argv, message", [
    (["--dry-run", "--out", "x", "--shapes", "convnext-k7"], "--dry-run times its own tiny CPU case; --shapes apply"),
    (["--dry-run", "--out", "x", "--quick"], "--quick apply to GPU runs"),
    (["--write-table", "a.json", "--plot", "a.json", "b.png"], "--write-table and --plot are separate runs"),
])
def test_bench_gpu_refuses_options_that_do_not_go_together(argv, message, capsys):
    bench = _load_benchmark("bench_gpu")
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, backends, shapes, dtypes, e2e", [
    (["--quick"], ("cuda", "triton_mma"), ["replknet31b-s1", "replknet31b-s3"], ["float16"], True),
    ([], ("cuda", "triton", "triton_mma"), None, ["float16", "bfloat16", "float32"], True),
    (["--shapes", "convnext-k7", "--dtypes", "float32", "--backends", "cuda", "--no-e2e"], ("cuda",),
     ["convnext-k7"], ["float32"], False),
])
def test_bench_gpu_measures_what_its_options_name(argv, backends, shapes, dtypes, e2e, monkeypatch, tmp_path):
    """On a GPU (faked: no kernel runs), the cases, backends and parts a run measures are those its
    options name: --quick's, all by default, --shapes/--dtypes/--backends; --no-e2e gives the whole
    budget to the per-pass part and skips the end-to-end one."""
    bench = _load_benchmark("bench_gpu")
    calls = {"pass": [], "e2e": [], "run": []}
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(bench, "per_pass", lambda shape, dtype, layout, batch, run, rows:
                        calls["pass"].append((shape[0], dtype, layout)) or calls["run"].append(run))
    monkeypatch.setattr(bench, "end_to_end", lambda shape, dtype, layout, *a: calls["e2e"].append((shape[0], dtype, layout)))
    assert bench.main(["--out", str(tmp_path), "--budget", "100", *argv]) == 0
    shapes = shapes or [s[0] for s in bench.SHAPES]
    want = [(s, d, layout) for d in dtypes for s in shapes for layout in bench.LAYOUTS]
    assert calls["pass"] == want and calls["e2e"] == (want if e2e else [])
    run = calls["run"][0]
    assert run.backends == backends and run.device == "cuda"
    assert run.pass_deadline - run.start == pytest.approx(100 if not e2e else 55)
    assert json.loads((tmp_path / "gpu_bench.json").read_text())["device"] == "Fake GPU"


@pytest.mark.parametrize("content, message", [
    (None, "does not exist; give a gpu_bench.json that python benchmarks/bench_gpu.py --out DIR writes"),
    ("{not json", "is not JSON"),
    ('{"rows": []}', "is not a gpu_bench.json that python benchmarks/bench_gpu.py --out DIR writes (it has no"),
])
@pytest.mark.parametrize("mode", ["--write-table", "--plot"])
def test_bench_gpu_says_what_is_wrong_with_a_results_file(mode, content, message, tmp_path):
    bench = _load_benchmark("bench_gpu")
    results = tmp_path / "gpu_bench.json"
    if content is not None:
        results.write_text(content)
    argv = [mode, str(results), *([str(tmp_path / "out.png")] if mode == "--plot" else ["--table-path", str(tmp_path / "t.json")])]
    with pytest.raises(SystemExit, match=re.escape(f"bench_gpu: {results} ") + ".*" + re.escape(message)):
        bench.main(argv)
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "out.png").exists()



def test_cpu_bench_runs_the_shape_set_it_is_asked_for(monkeypatch, capsys):
    """`python -m lkfast.bench --shapes convnext` times ConvNeXt-T's 7x7 stages, not RepLKNet's; an
    unknown set is refused with the names there are; the report names the set its shapes come from."""
    import lkfast.bench as cpu_bench

    made = []

    def fake_case(impl, passes, batch, channels, size, k, *args, **kwargs):
        made.append((channels, size, k))
        return cpu_bench.Case(impl, impl, passes, (batch, channels, size, size, k, k), lambda: None, 1.0)

    monkeypatch.setattr(cpu_bench, "make_case", fake_case)
    monkeypatch.setattr(cpu_bench, "matmul_gflops", lambda *a, **k: 1.0)
    cpu_bench.main(["--shapes", "convnext", "--quick"])
    assert sorted(set(made)) == sorted(cpu_bench.CONVNEXT_SHAPES) and {k for _, _, k in made} == {7}
    with pytest.raises(SystemExit):
        cpu_bench.main(["--shapes", "convnxt"])
    assert "convnext" in capsys.readouterr().err
    with pytest.raises(ValueError, match="replknet, convnext"):
        cpu_bench.shapes_named("convnxt")
    assert cpu_bench.shape_set_of([(768, 7, 7), (96, 56, 7)]) == "convnext"
    assert cpu_bench.shape_set_of(cpu_bench.STAGE_SHAPES) == "replknet"
    with pytest.raises(ValueError, match="not one of the sets"):
        cpu_bench.shape_set_of([(96, 56, 7), (128, 56, 31)])


def test_cpu_bench_refuses_an_unusable_json_path_and_counts_below_one_before_timing(monkeypatch, capsys, tmp_path):
    """--json under a file was found only after the whole benchmark (a FileExistsError traceback, the
    timings lost); --batch 0 / --repeat 0 silently meant the defaults, -1 gave tracebacks. All are
    argparse errors now, before anything is timed; a missing folder for --json is created."""
    import json

    import lkfast.bench as cpu_bench

    made = []

    def fake_case(impl, passes, batch, channels, size, k, *args, **kwargs):
        made.append(batch)
        return cpu_bench.Case(impl, impl, passes, (batch, channels, size, size, k, k), lambda: None, 1.0)

    monkeypatch.setattr(cpu_bench, "make_case", fake_case)
    monkeypatch.setattr(cpu_bench, "matmul_gflops", lambda *a, **k: 1.0)
    (tmp_path / "afile").write_text("")
    for argv, says in ((["--json", str(tmp_path / "afile" / "out.json")], "--json .*afile/out.json cannot be written"),
                       (["--json", str(tmp_path)], "is a folder: give a file name"),
                       (["--batch", "0"], "argument --batch: expected an integer >= 1, got 0"),
                       (["--batch", "-1"], "argument --batch: expected an integer >= 1, got -1"),
                       (["--repeat", "0"], "argument --repeat: expected an integer >= 1, got 0"),
                       (["--repeat", "-1"], "argument --repeat: expected an integer >= 1, got -1")):
        with pytest.raises(SystemExit) as exit_info:
            cpu_bench.main(["--quick", "--shapes", "convnext", *argv])
        assert exit_info.value.code == 2 and re.search(says, capsys.readouterr().err), argv
    assert made == []
    out = tmp_path / "new" / "folder" / "out.json"
    cpu_bench.main(["--quick", "--shapes", "convnext", "--batch", "1", "--repeat", "1", "--json", str(out)])
    assert set(made) == {1} and json.loads(out.read_text())["rows"]


def test_cpu_bench_hands_lkfast_the_input_layout_it_is_asked_for(monkeypatch, capsys, tmp_path):
    """`python -m lkfast.bench --input-layout nchw` (LKFAST_BENCH_INPUT_LAYOUT=nchw for
    bench_depthwise.py) times lkfast on NCHW tensors, as an NCHW model calls it, PyTorch's cases each
    on its own layout, and says so in the table and the JSON rows; channels_last by default."""
    import json

    import torch

    import lkfast.bench as cpu_bench

    seen = []
    real_make_case = cpu_bench.make_case

    def recording_case(impl, passes, batch, channels, size, k, dtype=torch.float32, **kwargs):
        seen.append((impl, kwargs.get("input_layout", "channels_last")))
        return real_make_case(impl, passes, 1, 4, 6, 3, dtype, **kwargs)

    monkeypatch.setattr(cpu_bench, "make_case", recording_case)
    monkeypatch.setattr(cpu_bench, "matmul_gflops", lambda *a, **k: 1.0)
    calls = []
    import lkfast.ops as ops
    real_op = ops.depthwise_conv2d
    monkeypatch.setattr(ops, "depthwise_conv2d", lambda x, *a, **k: calls.append(x.is_contiguous()) or real_op(x, *a, **k))
    cpu_bench.main(["--quick", "--repeat", "1", "--input-layout", "nchw", "--json", str(tmp_path / "b.json")])
    assert seen and {layout for _, layout in seen} == {"nchw"}
    assert calls and all(calls)  # lkfast's calls got NCHW (contiguous) tensors
    assert "lkfast given NCHW tensors" in capsys.readouterr().out
    assert {r["input_layout"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]} == {"nchw"}
    calls.clear()
    cpu_bench.main(["--quick", "--repeat", "1"])
    assert calls and not any(calls)  # channels_last by default
    assert "lkfast given NCHW" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown input layout"):
        real_make_case("lkfast_auto", "forward", 1, 4, 6, 3, input_layout="nhwc")


def test_cpu_bench_times_the_dtype_it_is_asked_for(monkeypatch, capsys, tmp_path):
    """`python -m lkfast.bench --dtype bfloat16` makes every case (PyTorch's and lkfast's) in bf16 and
    says so in the table and the JSON rows; bench_depthwise.py's report does the same from the
    benchmark JSON (LKFAST_BENCH_DTYPE), fp32 where a JSON predates the field."""
    import json

    import torch

    import lkfast.bench as cpu_bench

    dtypes = []

    def fake_case(impl, passes, batch, channels, size, k, dtype=torch.float32, **kwargs):
        dtypes.append(dtype)
        return cpu_bench.Case(impl, impl, passes, (batch, channels, size, size, k, k), lambda: None, 1.0)

    monkeypatch.setattr(cpu_bench, "make_case", fake_case)
    monkeypatch.setattr(cpu_bench, "matmul_gflops", lambda *a, **k: 1.0)
    cpu_bench.main(["--quick", "--dtype", "bfloat16", "--json", str(tmp_path / "b.json")])
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert "\nbf16, batch 2;" in capsys.readouterr().out
    assert {r["dtype"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]} == {"bfloat16"}
    with pytest.raises(SystemExit):
        cpu_bench.main(["--dtype", "int8"])

    report = _load_benchmark("report_depthwise")
    rows = [{"kind": "depthwise_round", "passes": "forward", "shape": [8, 96, 56, 56, 7, 7], "flop": 1e9,
             "times": {"pytorch_channels_last": [2e-3], "lkfast_auto": [1e-3]}}]
    for dtype, label in (("bfloat16", "bf16"), (None, "fp32")):
        info = dict(rows[0], **({"dtype": dtype} if dtype else {}))
        path = tmp_path / f"run_{label}.json"
        path.write_text(json.dumps({"benchmarks": [{"extra_info": info, "stats": {"min": 1e-3}}]}))
        report.main(str(path))
        assert (tmp_path / f"run_{label}.md").read_text().count(f"{label}, batch 8;") == 1


def test_pointwise_linear_bench_times_what_it_names_and_reports_per_round_ratios(monkeypatch, tmp_path):
    """bench_pointwise_linear: "pytorch" is F.linear itself, "conv" the forced 1x1 convolution (even
    with the calibration saying otherwise), "lkfast_auto" the calibrated pointwise_linear; the table
    gives the per-round ratio's median and the auto choice recorded."""
    import json

    import torch
    import torch.nn.functional as F

    bench = _load_benchmark("bench_pointwise_linear")
    monkeypatch.setenv("LKFAST_POINTWISE", "auto")
    calls = []
    real_conv = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append("conv") or real_conv(*a, **k))
    x, w, b = torch.randn(2, 3, 4, 8), torch.randn(5, 8), torch.randn(5)
    assert bench._linear("pytorch") is F.linear
    for impl, expected in (("conv", ["conv"]), ("lkfast_auto", [])):  # uncalibrated in the tests: F.linear
        calls.clear()
        torch.testing.assert_close(bench._linear(impl)(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert calls == expected, impl
    row = {"kind": "pointwise_linear", "shape_name": "s1-fc1", "shape": [8, 56, 56, 96, 384], "passes": "forward",
           "auto_choice": "conv", "threads": 2, "machine": {"cpu_model": "cpu", "torch": "t"},
           "times": {"pytorch": [2.0, 3.0, 4.0], "conv": [1.0, 1.0, 4.0], "lkfast_auto": [1.0, 2.0, 2.0]}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmarks": [{"extra_info": row}], "datetime": "d", "commit_info": {"id": "abc"}}))
    text = bench.report(str(path)).read_text()
    # medians: 3000 / 1000 / 2000 ms; per-round ratios 2, 3, 1 -> 2.00x and 2, 1.5, 2 -> 2.00x
    assert "| s1-fc1 (8, 56, 56, 96 -> 384) | forward | 3000.0 | 1000.0 | 2000.0 | conv | 2.00x | 2.00x |" in text
    assert text.startswith("Machine: cpu, 2 threads, torch t; run d, commit abc")
    path.write_text(json.dumps({"benchmarks": [{"extra_info": {"kind": "host_overhead"}}]}))
    with pytest.raises(SystemExit, match=r"no pointwise_linear entries \(run pytest benchmarks/bench_pointwise_linear.py"):
        bench.report(str(path))


def test_host_overhead_report_reads_its_rows_and_the_cuda_table_choice(tmp_path):
    """bench_host_overhead's report: µs per call from the median round over LOOP calls, ratios as
    medians of per-round ratios, and the CUDA table's fresh and kept choice on its own line."""
    bench = _load_benchmark("bench_host_overhead")
    loop = 100
    op = {"kind": "host_overhead", "case": "tiny", "shape": [1, 4, 8, 8, 3], "passes": "forward", "loop": loop,
          "machine": {"cpu_model": "cpu", "threads": 2, "torch": "t"},
          "times": {"pytorch": [0.006, 0.005, 0.004], "lkfast_eager": [0.002, 0.002, 0.002],
                    "lkfast_registered": [0.003, 0.003, 0.003], "lkfast_auto": [0.002, 0.0025, 0.001]}}
    choice = {"kind": "cuda_table_choice", "case": "200-row table", "loop": loop,
              "times": {"fresh": [0.06, 0.05, 0.07], "kept": [0.0004, 0.0003, 0.0005], "pytorch": [0.005] * 3}}
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"benchmarks": [{"extra_info": op}, {"extra_info": choice}], "datetime": "d",
                                "commit_info": {"id": "abc"}}))
    text = bench.report(str(path)).read_text()
    # medians 50 / 20 / 30 / 20 us; per-round registered/eager 1.5 each; pytorch/auto 3, 2, 4 -> 3; a file
    # from before the calibration-off columns: "-" there
    assert "| tiny (1, 4, 8, 8, 3) | forward | 50.0 | 20.0 | 30.0 | 20.0 | - | - | 1.50x | 3.00x | - |" in text
    assert ("chosen from a 200-row table (Python, timed here on the CPU): fresh (nearest-row search and its "
            "sentence) 600.0 us, kept (a key already answered, the table unchanged) 4.0 us; a tiny PyTorch F.conv2d "
            "forward 50.0 us") in text
    assert "Per call, the op asked" not in text  # a file from before the op kept its choices
    op["times"].update(lkfast_auto_table=[0.0025, 0.002, 0.002], lkfast_auto_table_unkept=[0.05, 0.04, 0.06])
    path.write_text(json.dumps({"benchmarks": [{"extra_info": op}], "datetime": "d", "commit_info": {"id": "abc"}}))
    # medians 20 / 50 us with calibration off, kept and not; per-round pytorch/auto-table 2.4, 2.5, 2 -> 2.4
    assert ("| tiny (1, 4, 8, 8, 3) | forward | 50.0 | 20.0 | 30.0 | 20.0 | 20.0 | 500.0 | 1.50x | 3.00x | 2.40x |"
            in bench.report(str(path)).read_text())
    choice["times"].update(asked=[0.004, 0.0035, 0.003], op=[0.0005, 0.0005, 0.0003])
    path.write_text(json.dumps({"benchmarks": [{"extra_info": op}, {"extra_info": choice}], "datetime": "d",
                                "commit_info": {"id": "abc"}}))
    # medians 35 / 5 us; per-round asked/op 8, 7, 10 -> 8
    assert ("Per call, the op asked the table with every backend's checks and the file read 35.0 us; it keeps the "
            "choice per exact call against the file's stamp now: 5.0 us (8.0x less)") in bench.report(str(path)).read_text()
