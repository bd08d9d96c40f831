"""The CPU dispatch by measurement (lkfast.ops.cpu_dispatch): which backend a calibration picks,
how its cache is keyed, and that a corrupt or stale cache is rebuilt. Timings are faked: tests
check the dispatch logic, never speed."""
import json
import os
import warnings

import pytest
import torch

from lkfast.ops import cpu_dispatch as cd
from lkfast.ops import depthwise_conv2d as ops_depthwise


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path))
    monkeypatch.setenv("LKFAST_CALIBRATE", "1")
    monkeypatch.setattr(cd, "_calibration", None)
    return cd.cache_path()  # this process's fingerprint's file under tmp_path


def fake_timer(seconds, calls):
    """A measure_fn returning ``seconds`` per candidate (a timing not named there, such as PyTorch's
    NCHW forward "torch_nchw": 1000 s, never the winner)."""
    def measure(runs):
        assert "cpu" in runs and 2 <= len(runs) and set(runs) <= set(cd.TIMED) or set(runs) == set(cd.POINTWISE_CANDIDATES)
        calls.append(sorted(runs))
        return {name: seconds.get(name, 1e3) for name in runs}
    return measure


def inputs(shape=(2, 16, 20, 20), k=7, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype), torch.randn(shape[1], 1, k, k, dtype=dtype)


@pytest.mark.parametrize("seconds, expected", [({"cpu": 1e-3, "torch": 2e-3}, "cpu"),
                                               ({"cpu": 3e-3, "torch": 2e-3}, "torch")])
def test_calibration_picks_the_faster_and_caches_it(cache, seconds, expected):
    x, w = inputs()
    calls = []
    choice = cd.choose(x, w, "forward", measure_fn=fake_timer(seconds, calls))
    assert choice.backend == expected and "calibrated on this machine" in choice.source
    assert len(calls) == 1
    # the input gradient has the forward's cost: it reuses the forward's measurement
    assert cd.choose(x, w, "input_grad", measure_fn=fake_timer({"cpu": 9, "torch": 0}, calls)).backend == expected
    assert len(calls) == 1
    # another shape in the same class (sizes rounded up to powers of two) reuses it too
    x2, w2 = inputs((2, 15, 18, 19))
    assert cd.choose(x2, w2, "forward", measure_fn=fake_timer({"cpu": 9, "torch": 0}, calls)).backend == expected
    assert len(calls) == 1
    # the weight gradient is measured on its own
    assert cd.choose(x, w, "weight_grad", measure_fn=fake_timer({"cpu": 1, "torch": 5}, calls)).backend == "cpu"
    assert len(calls) == 2
    saved = json.loads(cache.read_text())
    assert saved["fingerprint"] == cd.fingerprint() and len(saved["entries"]) == 2
    # a new process (fresh Calibration object) reads the file instead of measuring again
    cd._calibration = None
    assert cd.choose(x, w, "forward", measure_fn=fake_timer({"cpu": 9, "torch": 0}, calls)).backend == expected
    assert len(calls) == 2


def test_a_rebuilt_kernel_is_measured_again(cache, monkeypatch):
    """The choice depends on the kernels' speed, which a rebuild from other sources changes while the
    version number stays: the sources lkfast._C was built from are part of the fingerprint, so a
    rebuilt extension opens a calibration of its own instead of trusting the old build's times."""
    from lkfast import _ext

    x, w = inputs()
    calls = []
    assert cd.choose(x, w, "forward", measure_fn=fake_timer({"cpu": 2, "torch": 1}, calls)).backend == "torch"
    assert cd.fingerprint()["kernels"] == (_ext.sources or "unrecorded")
    monkeypatch.setattr(_ext, "sources", "0123456789abcdef")  # the next process, after a rebuild
    cd._calibration = None
    assert cd.cache_path() != cache
    assert cd.choose(x, w, "forward", measure_fn=fake_timer({"cpu": 1, "torch": 2}, calls)).backend == "cpu"
    assert len(calls) == 2
    assert json.loads(cd.cache_path().read_text())["fingerprint"]["kernels"] == "0123456789abcdef"


def test_the_kernels_build_record_is_read_back(tmp_path):
    """lkfast._sources.built_from: the hash setup.py recorded beside the extension, None without a
    readable record (a wheel built before records, a damaged file)."""
    from lkfast import _sources

    ext = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    assert _sources.built_from(ext) is None
    _sources.write_record(ext, "feedfacecafebeef", compiler="test")
    assert _sources.built_from(ext) == "feedfacecafebeef"
    _sources.record_path(ext).write_text("{not json")
    assert _sources.built_from(ext) is None


def test_keys_separate_dtype_layout_kernel_and_size(cache):
    x, w = inputs()
    keys = {cd.shape_class(x.shape, 7, 7, torch.float32, False),
            cd.shape_class(x.shape, 7, 7, torch.float64, False),
            cd.shape_class(x.shape, 7, 7, torch.float32, True),
            cd.shape_class(x.shape, 9, 7, torch.float32, False),
            cd.shape_class(x.shape, 7, 9, torch.float32, False),
            cd.shape_class((2, 16, 40, 40), 7, 7, torch.float32, False)}
    assert len(keys) == 6


def test_another_fingerprint_keeps_its_own_file_and_a_stale_file_is_measured_again(cache, monkeypatch):
    x, w = inputs()
    calls = []
    cd.choose(x, w, "forward", measure_fn=fake_timer({"cpu": 1, "torch": 2}, calls))
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 977)  # another thread count: another machine, in effect
    assert cd.choose(x, w, "forward", measure_fn=fake_timer({"cpu": 2, "torch": 1}, calls)).backend == "torch"
    assert len(calls) == 2
    other = cd.cache_path()
    assert other != cache and json.loads(other.read_text())["fingerprint"]["threads"] == 977
    assert json.loads(cache.read_text())["fingerprint"]["threads"] == threads  # left as it was
    # back to the first thread count: its own file answers, nothing is measured
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert cd.choose(x, w, "forward", measure_fn=fake_timer({"cpu": 2, "torch": 1}, calls)).backend == "cpu"
    assert len(calls) == 2
    # a file under this fingerprint's name that records another fingerprint (copied from elsewhere,
    # edited) is stale: measured afresh, and rewritten with this fingerprint
    data = json.loads(other.read_text())
    data["checksum"] = cd._checksum(data["entries"])
    cache.write_text(json.dumps(data))  # valid, but 977 threads' file under this process's name
    cd._calibration = None
    assert cd.choose(x, w, "forward", measure_fn=fake_timer({"cpu": 1, "torch": 2}, calls)).backend == "cpu"
    assert len(calls) == 3
    assert json.loads(cache.read_text())["fingerprint"]["threads"] == threads


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edited", "bad_backend", "schema"])
def test_corrupt_cache_is_detected_and_rebuilt(cache, damage):
    x, w = inputs()
    calls = []
    cd.choose(x, w, "forward", measure_fn=fake_timer({"cpu": 1, "torch": 2}, calls))
    text = cache.read_text()
    if damage == "truncate":
        cache.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        cache.write_bytes(b"\x00\xffnot json")
    else:
        data = json.loads(text)
        entry = next(iter(data["entries"].values()))
        if damage == "edited":  # a hand edit without the checksum: not trusted
            entry["backend"] = "torch"
        elif damage == "schema":  # a file of another (future) format, checksum and all valid
            data["schema"] = cd.SCHEMA + 1
        else:
            entry["backend"] = "warp-drive"
            data["checksum"] = cd._checksum(data["entries"])
        cache.write_text(json.dumps(data))
    cd._calibration = None
    with pytest.warns(RuntimeWarning, match="corrupt"):
        choice = cd.choose(x, w, "forward", measure_fn=fake_timer({"cpu": 1, "torch": 2}, calls))
    assert choice.backend == "cpu" and len(calls) == 2
    data = json.loads(cache.read_text())  # rewritten whole and valid
    assert data["checksum"] == cd._checksum(data["entries"])


@pytest.mark.parametrize("value, on", [("1", True), ("0", False), (None, True), ("false", "error"), ("no", "error"),
                                       ("", "error")])
def test_calibrate_takes_0_or_1_and_refuses_the_rest(value, on, monkeypatch):
    """LKFAST_CALIBRATE=false (or no, off) left the measuring on: anything but 0 and 1 is refused."""
    if value is None:
        monkeypatch.delenv("LKFAST_CALIBRATE", raising=False)
    else:
        monkeypatch.setenv("LKFAST_CALIBRATE", value)
    if on == "error":
        with pytest.raises(ValueError, match=f"LKFAST_CALIBRATE={value!r}: expected 0 .* or 1"):
            cd.calibration_enabled()
        with pytest.raises(ValueError, match="LKFAST_CALIBRATE"):
            ops_depthwise(torch.randn(1, 4, 8, 8), torch.randn(4, 1, 7, 7))
    else:
        assert cd.calibration_enabled() is on


@pytest.mark.parametrize("uses_onednn", [True, False])
def test_calibration_off_uses_the_shipped_table_then_the_builtin_rule(cache, monkeypatch, uses_onednn):
    monkeypatch.setenv("LKFAST_CALIBRATE", "0")
    monkeypatch.setattr(cd, "torch_uses_onednn", lambda dtype: uses_onednn)
    x, w = inputs()
    isa = cd.fingerprint()["isa"]
    key = list(cd.shape_class(x.shape, 7, 7, torch.float32, False))
    table = {isa: {"rows": [{"pass": "forward", "key": key, "backend": "torch"},
                            {"pass": "forward", "key": key[:2] + [31, 31] + key[4:], "backend": "cpu"}]}}
    monkeypatch.setattr(cd, "_load_table", lambda path: table)

    def no_measuring(runs):
        raise AssertionError("calibration is off: nothing may be measured")

    choice = cd.choose(x, w, "forward", measure_fn=no_measuring)
    assert choice.backend == "torch" and "shipped" in choice.source
    x31, w31 = inputs(k=29)  # nearest row in log kernel size: the 31x31 one
    assert cd.choose(x31, w31, "forward", measure_fn=no_measuring).backend == "cpu"
    # no row for the weight gradient: the built-in rule (lkfast's kernel)
    wg = cd.choose(x, w, "weight_grad", measure_fn=no_measuring)
    assert wg.backend == "cpu" and "built-in" in wg.source
    # fp16 forward has no row either: the built-in rule keeps oneDNN's half-precision path where PyTorch
    # runs fp16 through oneDNN, and takes lkfast's kernel where PyTorch would fall back to its generic one
    xh, wh = inputs(dtype=torch.float16)
    half = cd.choose(xh, wh, "forward", measure_fn=no_measuring)
    assert half.backend == ("torch" if uses_onednn else "cpu") and "built-in" in half.source
    assert ("no oneDNN path for float16" in half.source) is not uses_onednn
    assert not cache.exists()


def test_torch_uses_onednn_asks_pytorchs_own_check(monkeypatch):
    cd.torch_uses_onednn.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    try:
        assert cd.torch_uses_onednn(torch.float16) is False
        assert cd.torch_uses_onednn(torch.bfloat16) is True
        assert cd.torch_uses_onednn(torch.float32) is True  # not a half dtype: nothing to ask
    finally:
        cd.torch_uses_onednn.cache_clear()


def test_table_lookup_matches_the_layout_as_well_as_the_dtype():
    # the nearest row by size is the NCHW one, but a channels_last call must use a channels_last row
    table = {"isa_x": {"rows": [
        {"pass": "forward", "key": ["float32", "nchw", 7, 7, 2, 16, 32, 32], "backend": "cpu"},
        {"pass": "forward", "key": ["float32", "channels_last", 31, 31, 2, 512, 64, 64], "backend": "torch"}]}}
    found = cd.table_lookup("isa_x", "forward", ("float32", "channels_last", 7, 7, 2, 16, 32, 32), table)
    assert found == ("torch", ("float32", "channels_last", 31, 31, 2, 512, 64, 64))
    assert cd.table_lookup("isa_x", "forward", ("float32", "nchw", 31, 31, 2, 512, 64, 64), table)[0] == "cpu"
    assert cd.table_lookup("isa_x", "forward", ("float16", "nchw", 7, 7, 2, 16, 32, 32), table) is None
    assert cd.table_lookup("isa_x", "weight_grad", ("float32", "nchw", 7, 7, 2, 16, 32, 32), table) is None
    assert cd.table_lookup("other", "forward", ("float32", "nchw", 7, 7, 2, 16, 32, 32), table) is None


def test_an_instruction_set_without_rows_of_its_own_takes_its_stand_ins():
    """"avx512bf16" runs the AVX-512 code (but the bf16 forward of packed tiles): where the table has no
    rows for it, the "avx512" rows choose; rows of its own, once measured, come first; another
    instruction set borrows nothing."""
    row = lambda backend: {"pass": "forward", "key": ["float32", "nchw", 7, 7, 2, 16, 32, 32], "backend": backend}  # noqa: E731
    key = ("float32", "nchw", 7, 7, 2, 16, 32, 32)
    table = {"avx512": {"rows": [row("torch")]}}
    assert cd.table_lookup("avx512bf16", "forward", key, table)[0] == "torch"
    assert cd.table_choices_digest("avx512bf16", table) == cd.table_choices_digest("avx512", table) != "none"
    table["avx512bf16"] = {"rows": [row("cpu")]}
    assert cd.table_lookup("avx512bf16", "forward", key, table)[0] == "cpu"
    assert cd.table_lookup("avx2", "forward", key, {"avx512": {"rows": [row("torch")]}}) is None


def test_measure_stops_early_only_when_one_is_clearly_faster(monkeypatch):
    import lkfast.timing

    ran = []
    monkeypatch.setattr(lkfast.timing, "time_interleaved",
                        lambda runs, rounds, warmup=0: ran.append(rounds) or {n: [1.0] * rounds for n in runs})
    clock = iter([0.0, 0.001, 1.0, 1.5])  # warm-up: a takes 1 ms, b takes 500 ms
    monkeypatch.setattr(cd.time, "perf_counter", lambda: next(clock))
    assert cd.measure({"a": lambda: None, "b": lambda: None}) == pytest.approx({"a": 0.001, "b": 0.5})
    assert ran == []
    clock = iter([0.0, 0.010, 1.0, 1.012])  # 10 ms against 12 ms: not clear, time more rounds
    monkeypatch.setattr(cd.time, "perf_counter", lambda: next(clock))
    assert cd.measure({"a": lambda: None, "b": lambda: None}, rounds=3) == {"a": 1.0, "b": 1.0}
    assert ran == [3]
    clock = iter([0.0, 0.25, 1.0, 1.85])  # over clear_ratio (3x) faster with the 50 ms allowance off: no more rounds
    monkeypatch.setattr(cd.time, "perf_counter", lambda: next(clock))
    assert cd.measure({"a": lambda: None, "b": lambda: None}) == pytest.approx({"a": 0.25, "b": 0.85})
    assert ran == [3]
    # 1 ms against 4 ms: 4x, but a first call's one-time setup (oneDNN building its kernel for the
    # shape) can be that 3 ms: time the rounds
    # (each then timed 3 more times, after its setup: at least 0.5 ms and 2 ms a call, so a's rounds
    # repeat it 4 times)
    clock = iter([0.0, 0.001, 1.0, 1.004, 2.0, 2.0005, 2.1, 2.1007, 2.2, 2.2009, 3.0, 3.002, 3.1, 3.103, 3.2, 3.204])
    monkeypatch.setattr(cd.time, "perf_counter", lambda: next(clock))
    assert cd.measure({"a": lambda: None, "b": lambda: None}, rounds=3) == {"a": 0.25, "b": 1.0}
    assert ran == [3, 3]


def test_probes_on_growing_parts_of_the_batch_stand_in_for_a_clearly_slower_candidate(monkeypatch):
    """A candidate with a probe (its call on the batch's first k images) after the first candidate
    runs probes first, from one image up: where one is clear_ratio times the fastest whole call
    (the allowance taken off), the whole call is never made and that probe's time is recorded as a
    lower bound with its image count; the next probe is the power of two of images at which the
    last one's time, grown in proportion, would reach that; where no probe short of the whole batch
    does, the whole call is timed as any other."""
    import lkfast.timing

    monkeypatch.setattr(lkfast.timing, "time_interleaved",
                        lambda runs, rounds, warmup=0: {n: [1.0] * rounds for n in runs})
    made = []

    def candidates(images=64):
        return {"a": cd.Candidate(lambda: made.append("a"), lambda k: made.append(("a", k)), images),
                "b": cd.Candidate(lambda: made.append("b"), lambda k: made.append(("b", k)), images)}

    def clock(*seconds):  # each call: start at t, end at t + s
        ticks = iter([t for i, s in enumerate(seconds) for t in (10.0 * i, 10.0 * i + s)])
        monkeypatch.setattr(cd.time, "perf_counter", lambda: next(ticks))

    clock(0.010, 0.2)  # a's whole call 10 ms; b's first image 200 ms, past 3 x 10 ms + 50 ms
    got = cd.measure(candidates())
    assert made == ["a", ("b", 1)]  # the first candidate has nothing to be compared with: whole
    assert got == pytest.approx({"a": 0.010, "b": 0.2}) and got.bounded == {"b": 1}
    made.clear()
    # limit 80 ms: one image 30 ms (grown: 80 ms at 2.7 images, so 4 next), four images 70 ms (80 ms at
    # 4.6: at least twice four, 8 next), eight 90 ms: ruled out on 8 of the 64
    clock(0.010, 0.030, 0.070, 0.090)
    got = cd.measure(candidates())
    assert made == ["a", ("b", 1), ("b", 4), ("b", 8)] and got.bounded == {"b": 8}
    assert got["b"] == pytest.approx(0.090)
    made.clear()
    clock(0.010, 0.002, 0.5)  # one image 2 ms: 80 ms would take 40 images, 64 next: the whole call
    got = cd.measure(candidates())
    assert made == ["a", ("b", 1), "b"] and got == pytest.approx({"a": 0.010, "b": 0.5}) and not got.bounded
    made.clear()
    clock(0.010, 0.5)  # a batch of one: nothing to probe
    got = cd.measure(candidates(images=1))
    assert made == ["a", "b"] and not got.bounded


def test_a_calibration_records_a_probe_s_time_as_a_bound(cache, monkeypatch):
    """The timing tensors' probes run on the batch's first k images; an entry measured with a
    probe's time says so (``bounded``: the candidate and its images), and so does the choice's
    sentence."""
    from lkfast.ops import backends

    shapes = []
    monkeypatch.setattr(backends.BACKENDS["cpu"], "weight_grad",
                        lambda go, x, kh, kw: shapes.append(("cpu", x.shape, go.shape)))
    monkeypatch.setattr(backends.BACKENDS["torch"], "weight_grad",
                        lambda go, x, kh, kw: shapes.append(("torch", x.shape, go.shape)))
    x, w = inputs((5, 16, 20, 20))
    runs = cd._runs(x, w, "weight_grad")
    for run in runs.values():
        assert run.images == 5
        run()
        run.probe(2)
    whole, two = (5, 16, 20, 20), (2, 16, 20, 20)
    assert shapes == [("cpu", whole, whole), ("cpu", two, two), ("torch", whole, whole), ("torch", two, two)]
    timings = cd.Timings({"cpu": 0.001, "torch": 0.5}, bounded={"torch": 2})
    choice = cd.choose(x, w, "weight_grad", measure_fn=lambda runs: timings)
    assert choice.backend == "cpu" and "torch over 500.00 ms (its first 2 image(s) alone)" in choice.source
    entry = next(iter(json.loads(cache.read_text())["entries"].values()))
    assert entry["bounded"] == {"torch": 2} and entry["seconds"] == {"cpu": 0.001, "torch": 0.5}


@pytest.mark.parametrize("times, bounded, layout", [
    ({"channels_last": 2.0, "nchw": 1.0}, {}, "nchw"),  # both whole calls: the faster
    ({"channels_last": 2.0, "nchw": 1.0}, {"channels_last": 4, "nchw": 4}, "nchw"),  # both on 4 images: alike
    ({"channels_last": 2.0, "nchw": 1.0}, {"channels_last": 2, "nchw": 4}, "channels_last"),  # not alike: not known
    ({"channels_last": 2.0, "nchw": 1.0}, {"channels_last": 1}, "nchw"),  # whole NCHW call under cl's bound
    ({"channels_last": 1.0, "nchw": 2.0}, {"channels_last": 1}, "channels_last"),  # not known: the default
    ({"channels_last": 1.0, "nchw": 2.0}, {"nchw": 1}, "channels_last"),  # whole cl call under NCHW's bound
    ({"channels_last": 2.0, "nchw": 1.0}, {"nchw": 1}, "channels_last")])  # NCHW's bound under cl: not known
def test_pytorch_s_layout_is_chosen_from_comparable_timings(times, bounded, layout):
    assert cd._faster_layout(times, bounded) == layout


def test_measure_takes_the_least_round_and_repeats_fast_calls(monkeypatch):
    """A stalled round only adds time: on a loaded machine a 0.025-ms call measured 16-24 ms in two of
    three rounds and the median chose the 0.067-ms candidate (cached for every later process). A
    round of a call faster than SAMPLE_SECONDS repeats it, and the time is per call."""
    import lkfast.timing

    counts = {"a": 0, "b": 0}
    runs = {name: (lambda name=name: counts.__setitem__(name, counts[name] + 1)) for name in counts}
    monkeypatch.setattr(cd, "SAMPLE_SECONDS", 2.0 ** -9)  # ~2 ms; powers of two keep the counts exact
    per_call = {"a": 2.0 ** -15, "b": 2.0 ** -13}  # ~0.03 and ~0.12 ms a call: 64 and 16 a round
    rounds = {"a": [16e-3, per_call["a"], 24e-3], "b": [per_call["b"]] * 3}  # a's rounds 1 and 3 stalled

    def interleaved(samples, n, warmup=0):
        for sample in samples.values():
            sample()
        return {name: [t * (2.0 ** -9 / per_call[name])  # a round: as many calls as fill the sample
                       for t in rounds[name]] for name in samples}
    monkeypatch.setattr(lkfast.timing, "time_interleaved", interleaved)
    clock = iter([0.0, 1e-3, 1.0, 1.0 + 1e-3,  # warm-ups (setup), then 3 calls each, their least the time per call
                  2.0, 2.0 + 4e-3, 2.5, 2.5 + per_call["a"], 2.7, 2.7 + 1e-4,  # one stalled by a 4-ms tick
                  3.0, 3.0 + per_call["b"], 3.5, 3.5 + per_call["b"], 3.7, 3.7 + per_call["b"]])
    monkeypatch.setattr(cd.time, "perf_counter", lambda: next(clock))
    got = cd.measure(runs)
    assert counts == {"a": 4 + 64, "b": 4 + 16}  # warm-up, 3 more, and one round's repeats
    assert got["a"] == pytest.approx(per_call["a"]) and got["b"] == pytest.approx(per_call["b"])  # per call, least


def test_real_measurement_runs_both_backends(cache):
    pytest.importorskip("lkfast._C")
    x, w = inputs((1, 16, 12, 12), k=5)
    choice = cd.choose(x, w, "weight_grad")
    entry = next(iter(json.loads(cache.read_text())["entries"].values()))
    assert choice.backend in cd.CANDIDATES and set(entry["seconds"]) == set(cd.CANDIDATES)
    assert all(s > 0 for s in entry["seconds"].values())


def test_real_forward_measurement_times_pytorch_in_both_layouts(cache):
    """An NCHW forward times lkfast's kernel and PyTorch's convolution both on a channels_last copy
    and on the input as it is, and records the faster layout for the torch backend."""
    pytest.importorskip("lkfast._C")
    x, w = inputs((1, 16, 12, 12), k=5, dtype=torch.bfloat16)
    choice = cd.choose(x, w, "forward")
    entry = next(iter(json.loads(cache.read_text())["entries"].values()))
    assert set(entry["seconds"]) == set(cd.TIMED) and all(s > 0 for s in entry["seconds"].values())
    faster = "nchw" if entry["seconds"]["torch_nchw"] < entry["seconds"]["torch"] else "channels_last"
    assert entry["torch_layout"] == faster
    assert "torch_nchw" in choice.source
    assert cd.torch_forward_layout(x, w) == faster


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nchw_wins", [True, False], ids=["nchw_wins", "channels_last_wins"])
def test_pytorch_runs_an_nchw_forward_in_the_layout_that_won(cache, monkeypatch, dtype, nchw_wins):
    """Where PyTorch's NCHW forward was the fastest timing (bf16 at 7x7 on the Zen 5), ``auto``
    takes the torch backend and F.conv2d gets the NCHW tensor as it is, for the forward and the
    input gradient, with the right values; where the channels_last copy was the faster PyTorch
    timing, the torch backend copies. The weight gradient stays lkfast's (measured on its own)."""
    pytest.importorskip("lkfast._C")
    from reference import TOLERANCE, reference, rel_err

    from lkfast.ops import backends, depthwise_conv2d, plan_for

    seconds = {"cpu": 2.0, "torch": 3.0, "torch_nchw": 1.0} if nchw_wins else {"cpu": 2.0, "torch": 1.0, "torch_nchw": 3.0}
    monkeypatch.setattr(cd, "measure", lambda runs: {n: (seconds[n] if len(runs) == 3 else {"cpu": 1.0}.get(n, 9.0))
                                                     for n in runs})
    layouts = []
    real_conv2d = backends.F.conv2d

    def conv2d(x, *args, **kwargs):
        layouts.append("channels_last" if cd._is_channels_last(x) else "nchw")
        return real_conv2d(x, *args, **kwargs)

    monkeypatch.setattr(backends.F, "conv2d", conv2d)
    x, w = inputs((2, 24, 11, 13), k=7, dtype=dtype)
    explained = plan_for(x, w, explain=True)
    assert tuple(explained.plan) == ("torch", "torch", "cpu")
    assert f"torch in {'NCHW' if nchw_wins else 'channels_last'}" in explained.source
    assert cd.torch_forward_layout(x, w) == ("nchw" if nchw_wins else "channels_last")
    layouts.clear()
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    go = torch.randn_like(x)
    y = depthwise_conv2d(xg, wg)
    gx, gw = torch.autograd.grad(y, (xg, wg), go)
    assert layouts == ["nchw" if nchw_wins else "channels_last"] * 2  # forward and input gradient
    assert y.is_contiguous() and gx.is_contiguous()
    want = reference(x, w, None, go)
    for name, got in (("forward", y), ("input_grad", gx), ("weight_grad", gw)):
        assert rel_err(got, want[name]) < TOLERANCE[dtype][name], name


def test_pytorch_s_nchw_forward_is_not_timed_where_it_cannot_be_used(cache, monkeypatch):
    """channels_last inputs time PyTorch's channels_last path only; the bf16 shapes whose
    channels_last oneDNN kernel hangs time its NCHW path only, and the entry says so; with
    calibration off the torch backend runs the channels_last copy (as the shipped table was
    measured) without measuring anything."""
    calls = []
    xc, wc = inputs((2, 32, 20, 20), k=7)
    cd.choose(xc.contiguous(memory_format=torch.channels_last), wc, "forward", measure_fn=fake_timer({}, calls))
    xh, wh = inputs((1, 8, 20, 20), k=15, dtype=torch.bfloat16)  # 2-16 channels, a kernel 15 or more wide
    choice = cd.choose(xh, wh, "forward", measure_fn=fake_timer({"cpu": 2.0, "torch_nchw": 1.0}, calls))
    assert calls == [["cpu", "torch"], ["cpu", "torch_nchw"]]
    assert choice.backend == "torch" and cd.torch_forward_layout(xh, wh) == "nchw"
    monkeypatch.setenv("LKFAST_CALIBRATE", "0")
    x, w = inputs((2, 32, 20, 20), k=9)
    assert cd.torch_forward_layout(x, w) == "channels_last" and len(calls) == 2


def test_measure_drops_each_clearly_slower_candidate(monkeypatch):
    """With three candidates, one clearly slower than the fastest after the warm-up (PyTorch's NCHW
    forward at a 31x31 kernel: 30x its channels_last one in cpu_calibration_nchw_zen5.json) keeps its warm-up time and is not
    timed again; the two close ones are timed in rounds."""
    import lkfast.timing

    timed = []
    monkeypatch.setattr(lkfast.timing, "time_interleaved",
                        lambda runs, rounds, warmup=0: timed.append(sorted(runs)) or {n: [1.0] * rounds for n in runs})
    clock = iter([0.0, 0.010, 1.0, 1.012, 2.0, 2.9])  # warm-ups: 10 ms, 12 ms, 900 ms
    monkeypatch.setattr(cd.time, "perf_counter", lambda: next(clock))
    got = cd.measure({"a": lambda: None, "b": lambda: None, "c": lambda: None}, rounds=3)
    assert timed == [["a", "b"]]
    assert got == pytest.approx({"a": 1.0, "b": 1.0, "c": 0.9})


def test_plan_for_and_the_op_follow_the_calibration(cache, monkeypatch):
    pytest.importorskip("lkfast._C")
    import torch.nn.functional as F

    from lkfast.ops import depthwise_conv2d, plan_for

    passes = []

    def fake(runs):  # oneDNN "wins" the forward here, lkfast the weight gradient
        return {"cpu": 2.0, "torch": 1.0} if passes[-1] == "forward" else {"cpu": 1.0, "torch": 2.0}

    real_runs = cd._runs
    monkeypatch.setattr(cd, "_runs", lambda x, w, p: passes.append(p) or real_runs(x, w, p))
    monkeypatch.setattr(cd, "measure", fake)
    x, w = inputs()
    explained = plan_for(x, w, explain=True)
    assert tuple(explained.plan) == ("torch", "torch", "cpu")
    assert "calibrated on this machine" in explained.source
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = depthwise_conv2d(x, w)
    y.square().sum().backward()
    xr, wr = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    F.conv2d(xr, wr, padding=3, groups=16).square().sum().backward()
    torch.testing.assert_close(y.double(), F.conv2d(xr, wr, padding=3, groups=16), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), wr.grad, rtol=1e-4, atol=1e-3)


def test_the_op_remembers_its_plan_until_the_calibration_changes(cache, monkeypatch):
    """``auto`` asks for a plan on every call; per exact shape the answer is kept while the
    calibration in use stays the same, and asked again when it changes (a new cache folder,
    another thread count) or when calibration is switched off (then kept for the shipped table)."""
    from lkfast.ops import plan_for

    asked = []
    real_choose = cd.choose
    monkeypatch.setattr(cd, "choose", lambda x, w, p, **kw: asked.append(p) or real_choose(x, w, p, **kw))
    winner = {"name": "cpu"}
    monkeypatch.setattr(cd, "measure", lambda runs: {n: 1.0 if n == winner["name"] else 2.0 for n in runs})
    monkeypatch.setattr(cd, "_runs", lambda x, w, p: {n: None for n in cd.CANDIDATES})
    x, w = inputs()
    assert tuple(plan_for(x, w)) == ("cpu", "cpu", "cpu") and len(asked) == 2
    assert tuple(plan_for(x, w)) == ("cpu", "cpu", "cpu") and len(asked) == 2  # remembered
    x2, w2 = inputs((2, 16, 20, 19))  # another exact shape (same shape class): asked, not measured
    plan_for(x2, w2)
    assert len(asked) == 4
    # a fresh calibration (here: another cache folder, where oneDNN wins) is not answered from memory
    winner["name"] = "torch"
    monkeypatch.setenv("LKFAST_CACHE", str(cache.parent / "elsewhere"))
    assert tuple(plan_for(x, w)) == ("torch", "torch", "torch") and len(asked) == 6
    # nor is another thread count
    monkeypatch.setattr(torch, "get_num_threads", lambda: 977)
    winner["name"] = "cpu"
    assert tuple(plan_for(x, w)) == ("cpu", "cpu", "cpu") and len(asked) == 8
    # with calibration off the shipped table decides: asked once, then kept too
    monkeypatch.setenv("LKFAST_CALIBRATE", "0")
    plan_for(x, w)
    plan_for(x, w)
    assert len(asked) == 10


def test_a_first_calibration_leaves_the_global_random_generator_alone(cache):
    """Measuring draws random timing tensors; the caller's generator must not advance, or dropout,
    drop-path and augmentation draws would depend on whether the cache file existed (a resumed run
    would train on other draws than the uninterrupted one)."""
    pytest.importorskip("lkfast._C")
    from lkfast.nn import DepthwiseConv2d, PointwiseConv2d

    layer = DepthwiseConv2d(8, 5)
    pointwise = PointwiseConv2d(8, 4)
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    x_nhwc = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    layer(x).sum().backward()  # forward and weight gradient: both measured now (empty cache)
    pointwise(x_nhwc)  # a 1x1 conv on a channels_last map: measured too
    entries = json.loads(cache.read_text())["entries"]
    assert {k.split("|")[0] for k in entries} == {"forward", "weight_grad", "pointwise"}
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_a_first_calibration_under_a_default_device_context_times_on_the_cpu(cache):
    """Inside ``with torch.device("meta")`` (or "cuda"), a CPU call's first calibration makes its
    timing tensors on the CPU: they were made on the default device, and the C++ kernels refused
    them ("tensors must be on CPU", of tensors the caller had put there)."""
    pytest.importorskip("lkfast._C")
    import torch.nn.functional as F

    x, w = inputs((1, 4, 9, 11), k=7)
    with torch.device("meta"):
        y = ops_depthwise(x, w)
    assert y.device.type == "cpu"
    torch.testing.assert_close(y, F.conv2d(x, w, padding=3, groups=4), rtol=1e-5, atol=1e-5)
    assert "forward" in {k.split("|")[0] for k in json.loads(cache.read_text())["entries"]}  # measured here


def test_plan_for_tells_apart_the_dtype_and_the_layout_of_one_shape(cache, monkeypatch):
    """``auto``'s plan is remembered per exact call; the dtype and the layout are part of that key
    and of what is measured: the same shape in float64, or channels_last, is measured on its own
    (here oneDNN wins there, lkfast's kernel in float32 NCHW) and gets its own plan."""
    pytest.importorskip("lkfast._C")
    from lkfast.ops import plan_for

    seen = []

    def runs(x, w, pass_):
        seen.append((x.dtype, cd._is_channels_last(x)))
        return {n: None for n in cd.CANDIDATES}

    monkeypatch.setattr(cd, "_runs", runs)
    monkeypatch.setattr(cd, "measure", lambda r: {"cpu": 1.0, "torch": 2.0} if seen[-1] == (torch.float32, False)
                        else {"cpu": 2.0, "torch": 1.0})
    x, w = inputs()
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # the second round answers from memory: nothing measured again
        assert tuple(plan_for(x, w)) == ("cpu",) * 3
        assert tuple(plan_for(x.double(), w.double())) == ("torch",) * 3
        assert tuple(plan_for(x_nhwc, w)) == ("torch",) * 3
    assert seen == [(torch.float32, False)] * 2 + [(torch.float64, False)] * 2 + [(torch.float32, True)] * 2


def test_with_calibration_off_the_plan_is_remembered_until_what_made_it_changes(monkeypatch):
    """With calibration off (the embedded default run's setting) ``auto``'s plan for a call is worked
    out once and remembered (looked up afresh, the table's rows cost ~0.3 ms of Python a call), and
    worked out again when what made it changes: another table, PyTorch's answer about running a
    half dtype through oneDNN (the built-in rule's question where the table has no row), or the
    instruction set of the lkfast._C loaded."""
    pytest.importorskip("lkfast._C")
    from lkfast.ops import depthwise, plan_for

    monkeypatch.setenv("LKFAST_CALIBRATE", "0")
    monkeypatch.setattr(depthwise, "_PLAN_MEMO", {})
    x, w = inputs()
    key = list(cd.shape_class(x.shape, 7, 7, torch.float32, False))
    tables = {b: {cd.fingerprint()["isa"]: {"rows": [{"pass": p, "key": key, "backend": b} for p in cd.MEASURED_PASSES]}}
              for b in ("cpu", "torch")}
    lookups = []
    lookup = cd.table_lookup
    monkeypatch.setattr(cd, "table_lookup", lambda *args: lookups.append(args[1]) or lookup(*args))
    monkeypatch.setattr(cd, "_load_table", lambda path: tables["cpu"])
    for _ in range(3):
        assert tuple(plan_for(x, w)) == ("cpu",) * 3
    assert lookups == ["forward", "weight_grad"]  # once per measured pass, not per call
    monkeypatch.setattr(cd, "_load_table", lambda path: tables["torch"])
    assert tuple(plan_for(x, w)) == ("torch",) * 3
    xh, wh = x.half(), w.half()  # no fp16 rows: the built-in rule, which asks PyTorch
    for uses_onednn, forward in ((True, "torch"), (False, "cpu"), (True, "torch")):
        monkeypatch.setattr(cd, "torch_uses_onednn", lambda dtype: uses_onednn if dtype == torch.float16 else True)
        assert tuple(plan_for(xh, wh)) == (forward, forward, "cpu")
    # another build of lkfast._C, whose kernels run another instruction set: that set's rows (the
    # instruction set is asked once per extension module, not per call)
    from lkfast import _ext

    isa = cd.fingerprint()["isa"]
    other = "avx2" if isa != "avx2" else "generic"
    both = {isa: tables["cpu"][isa], other: tables["torch"][isa]}
    monkeypatch.setattr(cd, "_load_table", lambda path: both)
    assert tuple(plan_for(x, w)) == ("cpu",) * 3
    real = _ext._C

    class OtherBuild:  # the same kernels, run on another instruction set
        def __getattr__(self, name):
            return getattr(real, name)

        def cpu_isa(self):
            return other

    monkeypatch.setattr(_ext, "_C", OtherBuild())
    assert tuple(plan_for(x, w)) == ("torch",) * 3
    monkeypatch.setattr(_ext, "_C", real)
    assert tuple(plan_for(x, w)) == ("cpu",) * 3


def test_the_onednn_cap_is_part_of_the_fingerprint(cache, monkeypatch):
    """ONEDNN_MAX_CPU_ISA changes what oneDNN runs: a process with another cap opens a calibration
    of its own (another file), even when the variable changes after the first choice."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    first = cd.calibration()
    assert first.fingerprint["onednn_max_cpu_isa"] == ""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    second = cd.calibration()
    assert second is not first and second.fingerprint["onednn_max_cpu_isa"] == "AVX2"
    assert second.path != first.path and second.path == cd.cache_path()
    assert cd.memo_token() == second.generation != first.generation


def test_an_unwritable_cache_keeps_the_choice_for_this_process(cache, monkeypatch):
    """A cache folder that cannot be written (a read-only home): a warning naming LKFAST_CACHE, and
    the measured choice still made and kept for this process (not measured again)."""
    import lkfast.tables

    def refuse(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(lkfast.tables, "write_text_atomic", refuse)
    x, w = inputs()
    calls = []
    with pytest.warns(RuntimeWarning, match="cannot write the CPU calibration cache .*LKFAST_CACHE"):
        assert cd.choose(x, w, "forward", measure_fn=fake_timer({"cpu": 2, "torch": 1}, calls)).backend == "torch"
    assert cd.choose(x, w, "forward", measure_fn=fake_timer({"cpu": 1, "torch": 2}, calls)).backend == "torch"
    assert len(calls) == 1 and not cache.exists()


def test_table_lookup_distance_weighs_kernel_width_batch_channels_and_map_area():
    """The nearest row differs from the call in one of kw, N, C or H*W at a time: each counts."""
    def row(kh, kw, c, h, w, backend, n=2):
        return {"pass": "forward", "key": ["float32", "nchw", kh, kw, n, c, h, w], "backend": backend}

    def nearest(rows, kh, kw, c, h, w, n=2):
        return cd.table_lookup("isa_x", "forward", ("float32", "nchw", kh, kw, n, c, h, w), {"isa_x": {"rows": rows}})[0]

    assert nearest([row(7, 7, 16, 32, 32, "cpu"), row(7, 31, 16, 32, 32, "torch")], 7, 29, 16, 32, 32) == "torch"
    assert nearest([row(7, 7, 16, 32, 32, "cpu"), row(7, 7, 512, 32, 32, "torch")], 7, 7, 256, 32, 32) == "torch"
    # a 64x4 map has the area of 16x16, not of 64x64 (whose height it shares)
    assert nearest([row(7, 7, 16, 64, 64, "cpu"), row(7, 7, 16, 16, 16, "torch")], 7, 7, 16, 64, 4) == "torch"
    # the batch: rows at 8 and 64 of one shape, asked at 64 and at 1
    by_batch = [row(7, 7, 1024, 8, 8, "cpu", n=8), row(7, 7, 1024, 8, 8, "torch", n=64)]
    assert nearest(by_batch, 7, 7, 1024, 8, 8, n=64) == "torch"
    assert nearest(by_batch, 7, 7, 1024, 8, 8, n=1) == "cpu"
    assert nearest(by_batch[::-1], 7, 7, 1024, 8, 8, n=64) == "torch"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_the_timing_tensors_have_the_call_s_shape_dtype_and_layout(monkeypatch, channels_last):
    """What a calibration times is the call's case: both candidates run on fresh tensors of its
    shape, dtype and layout (oneDNN's NCHW and channels_last paths differ several-fold), and
    PyTorch's forward of an NCHW input in both layouts it may run in: a channels_last copy
    ("torch") and as it is ("torch_nchw")."""
    from lkfast.ops import backends

    got = []

    class Recorder(backends.TorchBackend):
        def forward(self, x, w, b, flip):
            got.append(("forward", x.dtype, cd._is_channels_last(x), tuple(x.shape), tuple(w.shape), flip))

        def forward_in(self, layout, x, w, b, flip):
            got.append((f"forward in {layout}", x.dtype, cd._is_channels_last(x), tuple(x.shape), tuple(w.shape), flip))

        def weight_grad(self, go, x, kh, kw):
            got.append(("weight_grad", x.dtype, cd._is_channels_last(x), cd._is_channels_last(go), tuple(go.shape), (kh, kw)))

    for name in cd.CANDIDATES:
        monkeypatch.setitem(backends.BACKENDS, name, Recorder())
    x = torch.randn(2, 16, 10, 12, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 1, 7, 5, dtype=torch.float64)
    timed = {"forward": {"cpu", "torch"} if channels_last else {"cpu", "torch", "torch_nchw"},
             "weight_grad": {"cpu", "torch"}}
    for pass_ in cd.MEASURED_PASSES:
        runs = cd._runs(x, w, pass_)
        assert set(runs) == timed[pass_]
        for run in runs.values():
            run()
    case = (torch.float64, channels_last, (2, 16, 10, 12), (16, 1, 7, 5), False)
    layouts = ["channels_last"] if channels_last else ["channels_last", "nchw"]
    assert got == [("forward", *case)] + [(f"forward in {layout}", *case) for layout in layouts] + [
        ("weight_grad", torch.float64, channels_last, channels_last, (2, 16, 10, 12), (7, 5))] * 2


def test_nothing_is_measured_while_torch_compile_traces(cache, monkeypatch):
    """Inside a trace (torch.compiler.is_compiling(), faked here) calibration is off whatever
    LKFAST_CALIBRATE says: the depthwise choice comes from the table or the built-in rule, the 1x1
    choice is PyTorch's convolution, and there is no calibration generation to memoize against."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    def no_measuring(runs):
        raise AssertionError("nothing may be measured while tracing")

    x, w = inputs()
    for pass_ in ("forward", "input_grad", "weight_grad"):
        choice = cd.choose(x, w, pass_, calibrate=True, measure_fn=no_measuring)
        assert "calibrated" not in choice.source and ("shipped" in choice.source or "built-in" in choice.source)
    x1 = torch.randn(1, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    assert cd.choose_pointwise(x1, torch.randn(4, 8, 1, 1), calibrate=True, measure_fn=no_measuring).backend == "conv"
    assert cd.memo_token() is None
    assert not cache.exists()


def test_an_unknown_pass_is_refused_naming_the_passes():
    x, w = inputs()
    with pytest.raises(ValueError, match="unknown pass 'backward'; expected forward, input_grad or weight_grad"):
        cd.choose(x, w, "backward")


@pytest.mark.parametrize("fast", [True, False], ids=["environ-dict", "os.environ.get"])
def test_the_settings_reader_sees_every_environment_change(fast, monkeypatch):
    """backends.getenv (the calibration's and the CUDA table's per-call reads) answers as
    os.environ.get does, at once after each change, from os.environ's own dict or (another Python:
    no such dict) through os.environ.get."""
    from lkfast.ops import backends

    if not fast:
        monkeypatch.setattr(backends, "_ENVIRON_DATA", None)
    name = "LKFAST_TEST_SETTING_\u00e9"
    monkeypatch.delenv(name, raising=False)
    assert backends.getenv(name) is None and backends.getenv(name, "d") == "d"
    for value in ("1", "", "caf\u00e9 /tmp/x"):
        monkeypatch.setenv(name, value)
        assert backends.getenv(name, "d") == value == os.environ.get(name)
    monkeypatch.delenv(name)
    assert backends.getenv(name, "gone") == "gone"


_PUTTING_CHILD = """
import sys
from lkfast.ops import cpu_dispatch as cd
calibration = cd.Calibration(cd.cache_path(), cd.fingerprint())
for i in range(30):
    calibration.put(("proc", sys.argv[1], i), {"backend": "cpu", "seconds": {}})
"""


def test_processes_sharing_a_calibration_file_keep_each_others_entries(cache, tmp_path):
    """Processes of one fingerprint (torchrun ranks, parallel jobs on the same thread count) share
    the file; each rewrote it from its own entries, so the last writer dropped the others' (4
    processes measuring 30 shapes each left 31 of 120 entries) and later runs measured them again."""
    import subprocess
    import sys

    fp = cd.fingerprint()
    first, second = cd.Calibration(cache, fp), cd.Calibration(cache, fp)  # both opened before either wrote
    first.put(("a",), {"backend": "cpu"})
    second.put(("b",), {"backend": "torch"})
    assert set(json.loads(cache.read_text())["entries"]) == {"a", "b"}
    assert second.get(("a",)) == {"backend": "cpu"}  # and the writer now holds the other's too
    children = [subprocess.Popen([sys.executable, "-c", _PUTTING_CHILD, str(k)], env={**os.environ})
                for k in range(4)]
    assert [child.wait(timeout=300) for child in children] == [0] * 4
    entries = cd.Calibration(cache, fp).entries
    assert {f"proc|{k}|{i}" for k in range(4) for i in range(30)} | {"a", "b"} == set(entries)
    assert not list(tmp_path.glob(".*.lock"))  # the lock file goes with its last holder
