"""python -m lkfast.eval end to end on tiny fake datasets in every benchmark layout, written here:
results, report, resume after an interruption, a 2-process torchrun run, and bad input."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

from lkfast import data, metrics
from optional_deps import needs_av, needs_frost
from lkfast.eval import EvalError, EvalOptions, ModelSpec, register_task, run_evaluation
from lkfast.eval.cache import ResultCache
from lkfast.eval.cli import main
from lkfast.eval.models import count_macs
from lkfast.eval.registry import TASKS

SIZE = 32  # image and model input size: small enough to keep the file fast on 2 busy cores
ROOT = Path(__file__).resolve().parents[1]


def _wnids():
    classes = data.imagenet_classes()
    a = {classes[i] for i in data.imagenet_a_indices().tolist()}
    r = {classes[i] for i in data.imagenet_r_indices().tolist()}
    return sorted(a & r)[:2]  # two classes that ImageNet-A and -R both hold


def _jpeg(path: Path, generator: torch.Generator, size: int = 40) -> None:
    # a flat colour plus a little noise: the test model (below) tells such images apart
    colour = torch.rand(3, 1, 1, generator=generator) * 0.8
    image = colour + 0.2 * torch.rand(3, size, size, generator=generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode_jpeg(data.to_uint8(image), quality=90))


def _images(root: Path, classes, per_class: int, generator, size: int = 40) -> None:
    for c in classes:
        for i in range(per_class):
            _jpeg(root / c / f"img{i}.JPEG", generator, size)


def build_data_root(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    wnids = _wnids()
    _images(root / "val", wnids, 3, g)
    _images(root / "imagenet-a", wnids, 2, g)
    _images(root / "imagenet-r", wnids, 2, g)
    _images(root / "imagenet-o", wnids, 2, g)
    for s in range(1, 6):
        _images(root / "imagenet-c" / "gaussian_noise" / str(s), wnids, 1, g, size=SIZE)
    _images(root / "imagenet-c" / "snow" / "5", wnids, 1, g, size=SIZE)
    for name, wnid in (("gaussian_noise", wnids[0]), ("translate", wnids[1])):
        folder = root / "imagenet-p" / name / wnid
        folder.mkdir(parents=True)
        for k in range(2):
            start, end = torch.rand(2, 3, 1, 1, generator=g)
            steps = torch.linspace(0, 1, 8).view(8, 1, 1, 1)
            frames = ((1 - steps) * start + steps * end + 0.1 * torch.rand(8, 3, SIZE, SIZE, generator=g)).clamp(0, 1)
            np.save(folder / f"seq{k}.npy", (frames * 255).round().to(torch.uint8).numpy())
    for variant in ("original", "mixed_same", "mixed_rand"):
        _images(root / "imagenet-9" / variant / "val", ["00_dog", "01_bird", "02_vehicle"], 1, g)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return build_data_root(tmp_path_factory.mktemp("data"))


ACTIVE = None  # logit rows the test model can predict (set by the checkpoint fixture)


def tiny_model_state():
    """test_resnet whose head only ever predicts 4 classes (the two fake wnids, a dog and a bird
    class), chosen from the main directions in which flat-colour images' features differ, so
    predictions vary from image to image and every accuracy is a real number, not 0 or 100."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet").eval()
    classes = data.imagenet_classes()
    active = [10] + [classes.index(w) for w in _wnids()] + [151]  # 10 (a bird) is outside A and R
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 1, 1, generator=g) * 0.8 + 0.2 * torch.rand(64, 3, SIZE, SIZE, generator=g)
    with torch.inference_mode():
        features = model.forward_head(model.forward_features((x - 0.5) / 0.5), pre_logits=True)
    mean = features.mean(0)
    directions = torch.pca_lowrank(features - mean, q=4)[2].T
    state = model.state_dict()
    state["fc.weight"] = torch.zeros_like(state["fc.weight"])
    state["fc.weight"][active] = 50 * directions
    state["fc.bias"] = torch.full_like(state["fc.bias"], -1000.0)
    state["fc.bias"][active] = -(state["fc.weight"][active] @ mean)
    return state


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "test_resnet.pth"
    torch.save({"state_dict": tiny_model_state()}, path)
    return str(path)


@pytest.fixture(scope="module")
def baseline_checkpoint(tmp_path_factory):
    import torchvision

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "mobilenet_v3_small.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    return str(path)


def cli(*args) -> int:
    return main([str(a) for a in args])


def common(out, checkpoint, data_root, *extra):
    return ["--models", f"test_resnet:{checkpoint}=tiny", "--data-root", data_root, "--out", out,
            "--input-size", SIZE, "--workers", 0, "--batch-size", 4, "--no-progress", *extra]


def load(out) -> dict:
    return json.loads((Path(out) / "results.json").read_text())


def numbers(results) -> dict:
    """results without run metadata and timings (what two runs must agree on)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("seconds",)}
        return x
    return {k: strip(v) for k, v in results.items() if k != "_meta"}


# -- reference: the same numbers computed directly with the readers, the model and lkfast.metrics --
def reference_model(checkpoint):
    model = timm.create_model("test_resnet")
    model.load_state_dict(torch.load(checkpoint)["state_dict"])
    return model.eval()


def reference_logits(model, dataset) -> tuple:
    logits, targets = [], []
    with torch.inference_mode():
        for i in range(len(dataset)):
            x, y = dataset[i]
            if x is None:
                continue
            x = x.unsqueeze(0) if x.dim() == 3 else x
            logits.append(model((x - 0.5) / 0.5))  # test_resnet's mean/std are 0.5
            targets.append(y)
    return torch.cat(logits), torch.tensor(targets)


def config():
    return {"input_size": (3, SIZE, SIZE), "interpolation": "bilinear", "crop_pct": 0.95, "crop_mode": "center"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_root, checkpoint, baseline_checkpoint):
    out = tmp_path_factory.mktemp("full")
    rc = cli(*common(out, checkpoint, data_root, "--baseline-model", f"mobilenet_v3_small:{baseline_checkpoint}"))
    assert rc == 0
    return out, load(out)


def test_cli_end_to_end_matches_a_direct_computation(full_run, data_root, checkpoint):
    out, results = full_run
    r = results["tiny"]
    assert results["_meta"]["options"]["gpu_decode"] is False  # as it acted: the option acts on CUDA only
    model = reference_model(checkpoint)
    tf = data.transform_for(config())
    # clean and A: top-1 as lkfast.metrics computes it on the readers' items
    logits, y = reference_logits(model, data.ImageFolderBenchmark(data_root / "val", tf))
    assert r["clean"]["top1"] == pytest.approx(metrics.accuracy(logits, y))
    assert 0 < r["clean"]["top1"] < 100
    a_logits, a_y = reference_logits(model, data.ImageNetA(data_root / "imagenet-a", tf))
    assert r["imagenet-a"]["top1"] == pytest.approx(metrics.accuracy(a_logits, a_y, data.imagenet_a_indices()))
    assert metrics.accuracy(a_logits, a_y) != r["imagenet-a"]["top1"]  # the 200-logit subset matters here
    # O: -max softmax over ImageNet-O's classes, val restricted to them
    o = data.ImageNetO(data_root / "imagenet-o", tf)
    in_logits, _ = reference_logits(model, data.ImageNetVal(data_root / "val", tf, classes=o.classes))
    out_logits, _ = reference_logits(model, o)
    score = lambda z: -z[:, o.class_subset].softmax(1).max(1).values  # noqa: E731
    expected = metrics.ood_scores(score(in_logits), score(out_logits))
    assert {k: r["imagenet-o"][k] for k in expected} == pytest.approx(expected)
    # C from disk: 224-px images fed without a resize
    err = {}
    for c, severities in data.imagenet_c_contents(data_root / "imagenet-c").items():
        for s in severities:
            z, t = reference_logits(model, data.ImageNetC(data_root / "imagenet-c", c, s, data.transform_for(config(), False)))
            err.setdefault(c, {})[s] = 1 - metrics.accuracy(z, t) / 100
    expected = metrics.corruption_errors(err, clean_error=1 - r["clean"]["top1"] / 100)
    for key in ("mce", "relative_mce", "sev5_top1", "mean_top1"):
        assert r["imagenet-c"][key] == pytest.approx(expected[key]), key
    assert r["imagenet-c"]["source"].startswith("disk")
    # P: flip probability and top-5 distance per perturbation; mFR / mT5D against the baseline's
    for name in ("gaussian_noise", "translate"):
        seq = data.ImageNetP(data_root / "imagenet-p", name)
        z = torch.stack([reference_logits(model, [(seq[i][0], 0)])[0] for i in range(len(seq))])
        noise = name == "gaussian_noise"
        assert r["imagenet-p"]["fp"][name] == pytest.approx(100 * metrics.flip_probability(z.argmax(2), noise))
        assert r["imagenet-p"]["t5d"][name] == pytest.approx(metrics.top5_distance(z, noise))
    p = r["imagenet-p"]  # Table 2's unnormalised means: over the perturbations scored (2 here), not the 10
    assert p["mean_fp"] == pytest.approx((p["fp"]["gaussian_noise"] + p["fp"]["translate"]) / 2)
    assert p["mean_t5d_unnormalised"] == pytest.approx((p["t5d"]["gaussian_noise"] + p["t5d"]["translate"]) / 2)
    base = r["imagenet-p"]["baseline"]
    assert r["imagenet-p"]["mfr"] == pytest.approx(metrics.mfr(r["imagenet-p"]["fp"], base["fp"]))
    assert r["imagenet-p"]["fr"] == pytest.approx({n: 100 * r["imagenet-p"]["fp"][n] / base["fp"][n] for n in base["fp"]})
    assert r["imagenet-p"]["t5d_normalised"] == pytest.approx({n: 100 * r["imagenet-p"]["t5d"][n] / base["t5d"][n]
                                                               for n in base["t5d"]})
    assert r["imagenet-p"]["mt5d"] == pytest.approx(metrics.mt5d(r["imagenet-p"]["t5d"], base["t5d"]))
    # 9: 1000 logits mapped to the nine classes; images fed as they are, as the release feeds them
    acc = {}
    for variant in ("original", "mixed_same", "mixed_rand"):
        z, t = reference_logits(model, data.ImageNet9(data_root / "imagenet-9", variant, data.transform_for(config(), False)))
        acc[variant] = metrics.imagenet9_accuracy(z, t, data.imagenet9_class_map())
    assert r["imagenet-9"]["top1"] == pytest.approx(acc)
    assert r["imagenet-9"]["bg_gap"] == pytest.approx(acc["mixed_same"] - acc["mixed_rand"])
    # metadata and the report
    meta = results["_meta"]
    assert meta["torch"] == torch.__version__ and meta["device"] == "cpu" and meta["data_sources"]["val"]
    report = (out / "report.md").read_text()
    for heading in ("Table 1", "Table 2", "Table 3", "Figure 2", "Figure 3", "Table 6"):
        assert heading in report
    for png in ("figure2.png", "figure3.png"):
        assert (out / "figures" / png).stat().st_size > 1000
    assert (out / "tables" / "table1_mce.csv").read_text().startswith("Model,mCE")
    # this data has 1 of ImageNet-C's 15 corruptions with all 5 severities and 2 of ImageNet-P's 10
    # perturbations: the means are marked as partial wherever they are shown, never as the benchmark's
    c, p = r["imagenet-c"], r["imagenet-p"]
    assert c["mce_complete"] is False and c["mce_over"] == ["gaussian_noise"] and "snow" in c["ce_skipped"]
    assert p["mfr_complete"] is False and p["mfr_over"] == ["gaussian_noise", "translate"]
    # no paper value for this model (not one the paper reports): its tables have no paper columns
    # whole rows: each number in its column (the unnormalised means are checked against the data above)
    assert (f"| tiny | {c['mce']:.2f} | {c['relative_mce']:.2f} | 1/15 | {c['mean_top1']:.2f} | {c['sev5_top1']:.2f} |"
            in (out / "tables" / "table1_mce.md").read_text())
    assert len({round(v, 2) for v in (c["mce"], c["relative_mce"], c["mean_top1"], c["sev5_top1"])}) == 4
    assert (f"| tiny | {p['mfr']:.2f} | {p['mt5d']:.2f} | 2/10 | {p['mean_fp']:.2f} | {p['mean_t5d_unnormalised']:.2f} |"
            in (out / "tables" / "table2_mfr_mt5d.md").read_text())
    assert len({round(v, 2) for v in (p["mfr"], p["mt5d"], p["mean_fp"], p["mean_t5d_unnormalised"])}) == 4
    assert "paper" not in (out / "tables" / "table1_mce.csv").read_text().splitlines()[0]
    assert "mCE over 1 of the 15 corruptions** (gaussian_noise): not the benchmark's mCE" in report
    assert "mFR/mT5D over 2 of the 10 perturbations** (gaussian_noise, translate)" in report


def test_resume_after_interruption_gives_the_same_results(tmp_path, full_run, data_root, checkpoint, monkeypatch,
                                                          capsys):
    args = common(tmp_path, checkpoint, data_root, "--suite", "clean,imagenet-c", "--shard-size", 1)
    saved = []
    original = ResultCache.save_shard

    def interrupted(self, *a, **k):
        if len(saved) == 5:
            raise KeyboardInterrupt  # the run is killed while computing its sixth shard
        saved.append(a)
        return original(self, *a, **k)
    monkeypatch.setattr(ResultCache, "save_shard", interrupted)
    assert cli(*args) == 130  # Ctrl-C: one line saying how to resume, no traceback
    assert "rerun the same command" in capsys.readouterr().err
    monkeypatch.setattr(ResultCache, "save_shard", lambda self, *a, **k: saved.append(a) or original(self, *a, **k))
    assert cli(*args) == 0
    resumed = load(tmp_path)
    total = 6 + 12  # val images + ImageNet-C images, one shard each
    assert len(saved) == total, "the resumed run recomputed shards that were already stored"
    expected = numbers(full_run[1])["tiny"]
    assert numbers(resumed)["tiny"]["clean"] == expected["clean"] | {"source": expected["clean"]["source"]}
    for key in ("top1", "mce", "relative_mce", "sev5_top1"):
        assert resumed["tiny"]["imagenet-c"][key] == expected["imagenet-c"][key]
    # a finished run is not recomputed: no shard is saved and no model is built
    monkeypatch.setattr("lkfast.eval.runner.load_model", lambda *a, **k: pytest.fail("model loaded again"))
    assert cli(*args) == 0
    assert len(saved) == total
    assert numbers(load(tmp_path)) == numbers(resumed)


_SLOW_SHARDS = r"""
import sys, time
from lkfast.eval.cache import ResultCache
from lkfast.eval.cli import main
original = ResultCache.save_shard
def slow(self, *args, **kwargs):  # each shard stored, then said in the log, then a pause to be stopped in
    path = original(self, *args, **kwargs)
    with open(sys.argv[1], "a") as log:
        log.write("saved\n")
    time.sleep(0.3)
    return path
ResultCache.save_shard = slow
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_stops_the_run_as_ctrl_c_does_and_a_rerun_goes_on(tmp_path, full_run, data_root, checkpoint,
                                                                  monkeypatch):
    """SIGTERM (Slurm at a time limit or on preemption, torchrun stopping its workers, kill) ended the
    process at once without a word; it now stops the run as Ctrl-C does: exit status 143, one line
    saying how to go on, no traceback, the finished shards kept; the rerun computes only the rest and
    gives the uninterrupted run's numbers."""
    import signal
    import time

    log, out = tmp_path / "saved.log", tmp_path / "out"
    args = [str(a) for a in common(out, checkpoint, data_root, "--suite", "clean,imagenet-c", "--shard-size", 1)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.Popen([sys.executable, "-c", _SLOW_SHARDS, str(log), *args], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (log.exists() and log.read_text().count("saved") >= 3):
        assert run.poll() is None, run.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no shard stored in time"
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    err = run.communicate(timeout=120)[1]
    assert run.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "lkfast.eval: terminated (SIGTERM); finished shards are kept under" in err and "Traceback" not in err, err
    stored = log.read_text().count("saved")
    total = 6 + 12  # val images + ImageNet-C images, one shard each
    assert 3 <= stored < total
    saved = []
    original = ResultCache.save_shard
    monkeypatch.setattr(ResultCache, "save_shard", lambda self, *a, **k: saved.append(a) or original(self, *a, **k))
    assert cli(*args) == 0
    assert len(saved) == total - stored, "the rerun recomputed shards the stopped run had stored"
    expected = numbers(full_run[1])["tiny"]
    resumed = load(out)
    assert numbers(resumed)["tiny"]["clean"] == expected["clean"] | {"source": expected["clean"]["source"]}
    for key in ("top1", "mce", "relative_mce", "sev5_top1"):
        assert resumed["tiny"]["imagenet-c"][key] == expected["imagenet-c"][key]


def test_only_a_task_that_declares_the_seed_draws_from_it(tmp_path):
    """The seed joins the keys of the tasks with "seed" in their reads only, so a task that draws
    random numbers without declaring it would be served, for another --seed, what it drew with the
    first: its ctx.generators and ctx.seed refuse, naming what to do. ImageNet-C/-P draw only when
    generated from val, and their own keys then hold the seed."""
    import lkfast.eval.analysis_tasks  # noqa: F401  (registers the analyses)
    from lkfast.eval.registry import Task
    from lkfast.eval.runner import Runner, TaskContext

    runner = Runner([], ["clean"], EvalOptions(out=str(tmp_path / "out"), seed=3))

    def context(task):
        return TaskContext(runner, task, None, None, {}, None)
    undeclared = context(Task("draws", lambda ctx: {}))
    for draw in (lambda: undeclared.generators("val", [0]), lambda: undeclared.seed):
        with pytest.raises(RuntimeError, match="task 'draws' draws random numbers but does not declare it: register "
                                               "it with reads=\\(..., 'seed'\\)"):
            draw()
    declared = context(Task("draws", lambda ctx: {}, reads=("seed",)))
    assert declared.seed == 3 == context(TASKS["imagenet-c"]).seed
    assert torch.equal(torch.rand(4, generator=declared.generator("val", 7)),
                       torch.rand(4, generator=context(TASKS["pgd"]).generator("val", 7)))
    assert {name for name, task in TASKS.items() if "seed" in task.reads} == {
        "occlusion", "pgd", "taig", "lesion", "frequency", "feature-variance"}


def test_another_seed_recomputes_only_the_tasks_that_draw_random_numbers(tmp_path, data_root, checkpoint,
                                                                         monkeypatch):
    """--seed seeds the random draws (here frequency's noise): a rerun with another seed into the same
    --out computes those again and keeps clean and ImageNet-C read from disk, which draw nothing
    (every task was computed again before: 3.75M images of ImageNet-C for nothing)."""
    out = tmp_path / "out"
    args = common(out, checkpoint, data_root, "--suite", "clean,imagenet-c,frequency", "--baseline-model", "none")
    assert cli(*args) == 0
    first = load(out)["tiny"]
    saved = []
    original = ResultCache.save_shard
    monkeypatch.setattr(ResultCache, "save_shard", lambda self, task, *a, **k: saved.append(task) or
                        original(self, task, *a, **k))
    assert cli(*args, "--seed", 1) == 0
    assert set(saved) == {"frequency"}, saved
    second = load(out)["tiny"]
    assert numbers({"m": second})["m"]["imagenet-c"] == numbers({"m": first})["m"]["imagenet-c"]
    saved.clear()
    assert cli(*args) == 0 and saved == []  # seed 0's results are all still there


def test_a_later_models_bad_checkpoint_is_one_error_before_anything_is_evaluated(tmp_path, data_root, checkpoint,
                                                                                capsys, monkeypatch):
    """A checkpoint that does not fit the second model of --models (no head) was found at its turn,
    after the first had been evaluated on everything, and stopped the run there without a report or
    the model's label; now every model with work left is loaded first, and the run stops before
    evaluating anything, naming each model that cannot be, and what to do."""
    import lkfast.eval.runner as runner_module

    state = torch.load(checkpoint)["state_dict"]
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, headless)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    args = ["--data-root", data_root, "--out", out, "--input-size", SIZE, "--workers", 0, "--batch-size", 4,
            "--no-progress", "--suite", "clean,imagenet-a", "--baseline-model", "none"]
    models = f"test_resnet:{checkpoint}=good,test_resnet:{headless}=bad,test_resnet:{garbage}=worse"
    assert cli("--models", models, *args) == 2
    err = capsys.readouterr().err
    assert "checking that the 3 models with results to compute load before evaluating any: good, bad, worse" in err
    assert ("lkfast.eval: error: 2 of the 3 models cannot be evaluated, so none was: model 'bad': checkpoint "
            f"'{headless}' does not fit ResNet: 2 missing keys: fc.weight, fc.bias. The checkpoint has no classifier "
            f"(no fc.* weights): it holds the features alone (saved without the head, or from pre-training); the "
            f"benchmarks score a model's ImageNet-1k classifier: evaluate a checkpoint saved with it;") in err, err
    assert "; model 'worse': " in err and "Fix those --models/--baseline-model entries (or leave them out) and " \
        "rerun" in err and "Traceback" not in err, err
    assert not (out / "results.json").exists() and not list(out.glob("cache/*/*"))
    # the first model is loaded once (kept for its turn), and a bad first one is said with the others
    loads = []
    real = runner_module.load_model
    monkeypatch.setattr(runner_module, "load_model", lambda spec, *a, **k: loads.append(spec.display) or
                        real(spec, *a, **k))
    assert cli("--models", f"test_resnet:{headless}=bad,test_resnet:{checkpoint}=good", *args) == 2
    assert "error: 1 of the 2 models cannot be evaluated, so none was: model 'bad': checkpoint" in \
        capsys.readouterr().err and loads == ["bad", "good"]
    loads.clear()
    assert cli("--models", f"test_resnet:{checkpoint}=good,test_resnet=random", *args) == 0
    assert loads == ["good", "random", "random"]  # (a model checked on the CPU is loaded on its device at its turn)
    # a model whose results are all cached is not loaded: the bad one alone is said, as it was
    capsys.readouterr()
    loads.clear()
    assert cli("--models", f"test_resnet:{checkpoint}=good,test_resnet:{headless}=bad", *args) == 2
    err = capsys.readouterr().err
    assert f"lkfast.eval: error: model 'bad': checkpoint '{headless}' does not fit" in err and "checking" not in err
    assert loads == ["bad"]
    # the baseline too, where a task normalises by it (the ImageNet-C task reads it)
    assert cli("--models", f"test_resnet:{checkpoint}=good", *args[:-1], "mobilenet_v3_small:" + str(garbage),
               "--suite", "clean,imagenet-c") == 2
    assert ("error: 1 of the 2 models cannot be evaluated, so none was: model 'mobilenet_v3_small': "
            f"'{garbage}' is not a readable checkpoint") in capsys.readouterr().err


def test_an_interrupted_rerun_says_its_report_is_an_earlier_runs(tmp_path, data_root, checkpoint, monkeypatch,
                                                                 capsys):
    """A run interrupted after some tasks, into an --out holding an earlier run's report: its
    results.json holds what finished and report.md is still the earlier one's; the last line says
    so and how to write a report of what finished, which says it is not finished."""
    from lkfast.eval.report import main as report_main

    out = tmp_path / "out"
    assert cli(*common(out, checkpoint, data_root, "--suite", "clean")) == 0
    capsys.readouterr()
    original = ResultCache.save_shard

    def interrupted(self, task, *a, **k):
        if task == "imagenet-r":
            raise KeyboardInterrupt  # after clean and imagenet-a finished
        return original(self, task, *a, **k)
    monkeypatch.setattr(ResultCache, "save_shard", interrupted)
    assert cli(*common(out, checkpoint, data_root, "--suite", "clean,imagenet-a,imagenet-r", "--limit", 5)) == 130
    err = capsys.readouterr().err
    assert f"{out / 'results.json'} holds the tasks that finished, {out / 'report.md'} is still an earlier run's " \
           f"(python -m lkfast.eval.report {out} writes a report of what finished)" in err, err
    assert sorted(t for t in load(out)["tiny"] if not t.startswith("_")) == ["clean", "imagenet-a"]
    assert report_main([str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "**not finished** (interrupted" in report and "ImageNet-A" in report
    # interrupted again before any task finished: results.json (the last one) is older than the report
    monkeypatch.setattr(ResultCache, "save_shard", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli(*common(out, checkpoint, data_root, "--suite", "clean", "--limit", 4)) == 130
    err = capsys.readouterr().err
    assert "rerun the same command to go on from there\n" in err and "earlier run" not in err, err


def test_a_run_stopped_before_writing_anything_does_not_claim_kept_results(tmp_path, data_root, checkpoint,
                                                                            monkeypatch, capsys):
    """Stopped before its first result (while the first model loads, or the embedded default trains
    its models), the run said that finished shards were kept under OUT/cache and that
    OUT/results.json held the finished tasks, neither of which existed; it now says nothing was written."""
    out = tmp_path / "out"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("lkfast.eval.runner.load_model", stopped)
    assert cli(*common(out, checkpoint, data_root, "--suite", "clean")) == 130
    err = capsys.readouterr().err
    assert err.strip().endswith(f"lkfast.eval: interrupted before any result was written to {out}: rerun the same "
                                "command to start again"), err
    assert not (out / "cache").exists() and not (out / "results.json").exists()
    # stopped after a stored shard, before any task finished, with no report from an earlier run:
    # the shards are kept, and there is no results.json to speak of
    monkeypatch.undo()
    original, saved = ResultCache.save_shard, []

    def after_one_shard(self, *a, **k):
        if saved:
            raise KeyboardInterrupt
        saved.append(a)
        return original(self, *a, **k)
    monkeypatch.setattr(ResultCache, "save_shard", after_one_shard)
    assert cli(*common(out, checkpoint, data_root, "--suite", "clean", "--shard-size", 1)) == 130
    err = capsys.readouterr().err
    assert err.strip().endswith(f"finished shards are kept under {out / 'cache'}: rerun the same command to go on "
                                "from there"), err
    assert not (out / "results.json").exists()


def test_a_second_run_into_the_same_out_fails_while_the_first_writes_there(tmp_path, data_root, checkpoint, capsys):
    """Two runs into one --out at once computed the same shards twice and the last one's results.json
    and report replaced the other's (with other --models, its models vanished): the second now stops
    at once, naming the first's pid, and runs once the first is done."""
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lkfast-eval.lock", "a+") as held:  # what the first run holds while it writes
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(str(os.getpid()))  # a run that is alive
        held.flush()
        assert cli(*common(out, checkpoint, data_root, "--suite", "clean")) == 2
        err = capsys.readouterr().err
        assert f"lkfast.eval: error: another python -m lkfast.eval (pid {os.getpid()}) is writing to {out}: wait " \
               "for it" in err
        assert not (out / "results.json").exists()
    assert cli(*common(out, checkpoint, data_root, "--suite", "clean")) == 0  # released: this one runs
    assert "clean" in load(out)["tiny"]
    assert cli(*common(out, checkpoint, data_root, "--suite", "clean")) == 0  # and the lock goes with each run


def test_a_killed_runs_lock_is_not_kept_by_processes_it_forked(tmp_path, data_root, checkpoint, capsys):
    """A run killed with -9 left its DataLoader workers, which had inherited the --out lock, holding it
    for seconds: a rerun was refused, "another python -m lkfast.eval (pid N) is writing", naming the
    dead run. A process forked while a run holds the lock does not hold it; and a lock whose run has
    ended, still held (by a process it started), says so."""
    import signal
    import time

    fcntl = pytest.importorskip("fcntl")
    from lkfast.eval.runner import OUT_LOCK, _out_lock

    out = tmp_path / "out"
    started, running = os.pipe()
    with _out_lock(out):
        child = os.fork()  # as a DataLoader worker is
        if child == 0:
            os.write(running, b"1")
            time.sleep(60)
            os._exit(0)
    os.read(started, 1)  # the child runs (what happens at a fork in it is done)
    os.close(started)
    os.close(running)
    try:  # the run is over, its child still alive: the lock is free
        with open(out / OUT_LOCK, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    with open(out / OUT_LOCK, "a+") as held:  # held, in the name of a run that has ended
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0)
        held.truncate()
        held.write(str(ended.pid))
        held.flush()
        assert cli(*common(out, checkpoint, data_root, "--suite", "clean")) == 2
        err = capsys.readouterr().err
        assert f"lkfast.eval: error: the python -m lkfast.eval that was writing to {out} (pid {ended.pid}) has ended; " \
               "processes it started (its data-loader workers) still hold its lock: retry in a few seconds" in err, err


def test_torchrun_two_processes_equal_one(tmp_path, full_run, data_root, checkpoint):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with socket.socket() as probe:  # a free port: other test files start process groups too
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "lkfast.eval", *map(str, common(tmp_path, checkpoint, data_root, "--suite", "clean,imagenet-c,imagenet-9",
                                                  "--shard-size", 1))]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = load(tmp_path)
    assert results["_meta"]["world_size"] == 2
    expected = numbers(full_run[1])["tiny"]
    for task in ("clean", "imagenet-c", "imagenet-9"):
        got = numbers(results)["tiny"][task]
        assert got == {k: v for k, v in expected[task].items() if k in got}, task


RANK_FAILS = """
import sys
import weakref

from torch.distributed.distributed_c10d import _get_default_group

from lkfast.eval import EvalError, EvalOptions, ModelSpec, register_task, run_evaluation
from lkfast.eval import distributed as dist

kind, checkpoint, val, out = sys.argv[1:]


def task(ctx):
    def compute(x, y, indices):
        # rank 1's second shard fails (an error on its first batch would be said to be the inputs')
        if dist.rank() == 1 and indices[0] > 1:
            raise (EvalError if kind == "task" else ZeroDivisionError)("rank 1 cannot compute its shard")
        return {"m": ctx.forward(x).mean(1)}
    return {"n": len(ctx.records("val", ctx.dataset("val"), compute)["m"])}


register_task("test-rank-fails", task, needs=("val",))
dist.init("cpu")
group, rank = weakref.ref(_get_default_group()), dist.rank()
options = EvalOptions(out=out, data={"val": val}, workers=0, progress=False, shard_size=1, write_report=False)
outcome = "finished"
try:
    run_evaluation([ModelSpec("test_resnet", checkpoint, "tiny", input_size=32)], ["test-rank-fails", "clean"], options)
except Exception as error:
    outcome = f"{type(error).__name__}: {error}"
dist.shutdown()
# the group is gone once shut down: one kept alive (by torch.distributed.nn's defaults, imported
# after the group was joined) ran its gloo threads into the interpreter's exit, which aborted a rank
# now and then (SIGABRT) after its work was done
if group() is not None:
    outcome += " (the process group outlived dist.shutdown())"
with open(f"{out}.rank{rank}", "w") as said:  # (exit 0: torchrun stops the other rank at a failure)
    said.write(outcome)
"""


@pytest.mark.parametrize("kind", ["task", "bug"])
def test_torchrun_a_shard_failing_on_one_rank_fails_on_every_rank_without_a_hang(tmp_path, data_root, checkpoint,
                                                                                 kind):
    """Under torchrun the ranks compute their shares of a task's shards and then gather them: a rank
    whose shard failed left the task while the others waited in the gather for its shards, a hang
    until the process group's timeout. Now every rank hears of it: a task's error (EvalError) fails
    that task on every rank and the run goes on to the next task in step; any other error stops every
    rank. And the process group is freed by dist.shutdown (lkfast.train.join_process_group)."""
    script = tmp_path / "rank_fails.py"
    script.write_text(RANK_FAILS)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), kind, checkpoint, str(data_root / "val"), str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)  # ~10 s; a hang
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    said = [(tmp_path / f"out.rank{rank}").read_text() for rank in (0, 1)]
    assert not any(line.endswith("(the process group outlived dist.shutdown())") for line in said), said
    if kind == "task":
        for line in said:  # the run finished its other task, then named the failed one
            assert line.startswith("EvalError: 1 task(s) failed (tiny: test-rank-fails)"), said
        r = load(tmp_path / "out")["tiny"]
        assert r["test-rank-fails"]["error"] == "test-rank-fails/val: rank 1: EvalError: rank 1 cannot compute its shard"
        assert 0 < r["clean"]["top1"] < 100
    else:
        assert said == ["RuntimeError: test-rank-fails/val: rank 1: ZeroDivisionError: rank 1 cannot compute its shard",
                        "ZeroDivisionError: rank 1 cannot compute its shard"], said


def test_torchrun_ranks_exchange_over_gloo_and_take_their_own_gpus(tmp_path, monkeypatch):
    """The ranks exchange pickled objects only, and a rank waits for the others' shards for as long
    as they take (checked with torchrun by hand: 2 processes, the embedded default on tiny settings,
    which stopped on rank 1 before is_main knew torchrun's RANK): over NCCL (chosen before on CUDA) the objects went through GPU memory and a wait
    past its watchdog's 10 minutes (one TAIG shard) aborted the run. gloo, with a long timeout, on
    every device. --device cuda:N under torchrun put every rank on GPU N: refused; "cuda" gives each
    rank its LOCAL_RANK's GPU, modulo the GPUs it sees (one per rank through CUDA_VISIBLE_DEVICES)."""
    import datetime

    import torch.distributed

    import lkfast.eval.tasks  # noqa: F401  (registers clean)
    from lkfast.eval import distributed
    from lkfast.eval.runner import Runner

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    joined, current = [], []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: joined.append(kwargs))
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    # before the group is joined (the embedded default prepares its data and models then), rank 0 is
    # torchrun's RANK 0: every rank took --out's lock, and all but one stopped
    assert not distributed.is_main()
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_main()
    monkeypatch.setenv("RANK", "3")
    for count, gpu in ((4, "cuda:3"), (1, "cuda:0"), (2, "cuda:1")):
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        assert distributed.local_device("cuda") == gpu
    distributed.init("cuda")
    distributed.init("cpu")
    assert current == ["cuda:1"]
    assert [j["backend"] for j in joined] == ["gloo", "gloo"]
    assert all(j["timeout"] >= datetime.timedelta(hours=24) for j in joined)
    with pytest.raises(EvalError, match="--device cuda:1 under torchrun would put every process on that one GPU: give "
                                        r"--device cuda \(each process takes the GPU of its LOCAL_RANK\)"):
        Runner([], ["clean"], EvalOptions(out=str(tmp_path), device="cuda:1"))
    assert Runner([], ["clean"], EvalOptions(out=str(tmp_path), device="cuda")).device == "cuda:1"
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: any GPU
    assert Runner([], ["clean"], EvalOptions(out=str(tmp_path), device="cuda:1")).device == "cuda:1"
    with pytest.raises(EvalError, match=r"--device gpu0: expected cpu, cuda or cuda:N \("):  # (the API's; the CLI
        Runner([], ["clean"], EvalOptions(out=str(tmp_path), device="gpu0"))  # checks --device before)


def _eval_with_val_only(tmp_path, data_root, checkpoint, suite):
    """The eval CLI on a data root holding only val/ (ImageNet-C/-P generated from it), 2 images a
    part, no baseline model, results in tmp_path/out; returns its exit status."""
    only_val = tmp_path / "data"
    only_val.mkdir()
    (only_val / "val").symlink_to(data_root / "val")
    return cli(*common(tmp_path / "out", checkpoint, only_val, "--suite", suite, "--limit", 2, "--baseline-model", "none"))


@needs_frost
@needs_av
def test_generated_imagenet_c_and_p_from_val(tmp_path, data_root, checkpoint, monkeypatch):
    import lkfast.corrupt

    applied, difficulties = [], []
    real_corrupt, real_sequence = lkfast.corrupt.corrupt, lkfast.corrupt.perturbation_sequence
    monkeypatch.setattr(lkfast.corrupt, "corrupt", lambda x, name, s, **k: applied.append((name, s)) or real_corrupt(x, name, s, **k))
    monkeypatch.setattr(lkfast.corrupt, "perturbation_sequence",
                        lambda x, name, d, **k: applied.append(name) or difficulties.append(d) or
                        real_sequence(x, name, d, **k))
    assert _eval_with_val_only(tmp_path, data_root, checkpoint, "imagenet-c,imagenet-p") == 0
    r = load(tmp_path / "out")["tiny"]
    assert r["imagenet-c"]["source"].startswith("generated")
    assert r["imagenet-c"]["mce_complete"] is True and len(r["imagenet-c"]["sev5_over"]) == 19
    assert set(r["imagenet-p"]["fp"]) == set(metrics.IMAGENET_P)
    assert sorted(applied, key=str) == sorted([(c, s) for c in metrics.IMAGENET_C_ALL for s in range(1, 6)] * 2
                                              + list(metrics.IMAGENET_P) * 2, key=str)  # once per image (2 a part)
    assert set(difficulties) == {1}  # the paper's ImageNet-P: difficulty 1
    assert r["imagenet-p"]["mfr"] is None and "baseline" in r["imagenet-p"]["normalisation_note"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "generated from" in report and "mfr omitted" in report.lower().replace("normalisation", "mfr")
    # a rerun takes the generated parts from the cache; after a change to the corruptions (a new
    # lkfast.corrupt.VERSION) it generates them again (it reused the old code's before)
    applied.clear()
    out = tmp_path / "out"
    rerun = common(out, checkpoint, tmp_path / "data", "--suite", "imagenet-p", "--limit", 2, "--baseline-model", "none")
    assert cli(*rerun) == 0 and applied == []
    monkeypatch.setattr(lkfast.corrupt, "VERSION", lkfast.corrupt.VERSION + 1)
    assert cli(*rerun) == 0 and sorted(applied) == sorted(metrics.IMAGENET_P * 2)
    # another --seed draws other corruptions: generated again (from disk they do not depend on it)
    applied.clear()
    assert cli(*rerun, "--seed", 1) == 0 and sorted(applied) == sorted(metrics.IMAGENET_P * 2)
    assert load(out)["tiny"]["imagenet-p"]["source"].endswith("(seed 1)")


@needs_frost
@needs_av
def test_generated_imagenet_c_and_p_do_not_depend_on_the_batch_size(tmp_path, data_root, checkpoint):
    """Each image is corrupted with the generator of its own dataset index, so the generated
    benchmarks score the same images whatever --batch-size and --shard-size cut them into."""
    only_val = tmp_path / "data"
    only_val.mkdir()
    (only_val / "val").symlink_to(data_root / "val")
    results = []
    for run, sizes in enumerate([("--batch-size", 4, "--shard-size", 1000), ("--batch-size", 1, "--shard-size", 1)]):
        out = tmp_path / f"out{run}"
        args = common(out, checkpoint, only_val, "--suite", "imagenet-c,imagenet-p", "--limit", 3,
                      "--baseline-model", "none")
        at = args.index("--batch-size")
        assert cli(*args[:at], *args[at + 2:], *sizes) == 0
        results.append(load(out)["tiny"])
    for name in ("gaussian_noise", "shot_noise", "snow"):
        assert results[0]["imagenet-p"]["t5d"][name] == pytest.approx(results[1]["imagenet-p"]["t5d"][name], abs=1e-12)
    assert results[0]["imagenet-p"]["fp"] == pytest.approx(results[1]["imagenet-p"]["fp"], abs=1e-9)
    assert results[0]["imagenet-c"]["top1"] == results[1]["imagenet-c"]["top1"]


def test_generated_imagenet_c_without_frost_photographs_is_unavailable_with_the_reason(tmp_path, data_root,
                                                                                        checkpoint, monkeypatch):
    """Generating ImageNet-C needs frost's photographs: without them the task is recorded as
    unavailable with what to install, before any corruption is generated, and the run goes on."""
    import lkfast.corrupt

    monkeypatch.setenv("LKFAST_FROST_DIR", str(tmp_path / "no-frost"))
    monkeypatch.setattr(lkfast.corrupt, "corrupt", lambda *a, **k: pytest.fail("a corruption was generated"))
    assert _eval_with_val_only(tmp_path, data_root, checkpoint, "clean,imagenet-c") == 0
    r = load(tmp_path / "out")["tiny"]
    assert "top1" in r["clean"]
    reason = r["imagenet-c"]["unavailable"]
    assert reason.startswith("ImageNet-C cannot be generated from val: frost photographs missing in"), reason


def test_dry_run_prints_the_plan(tmp_path, data_root, checkpoint, capsys):
    assert cli(*common(tmp_path, checkpoint, data_root, "--suite", "clean,imagenet-9,imagenet-a", "--dry-run")) == 0
    plan = capsys.readouterr().out
    assert "| tiny | clean | 6 | 1.00 |" in plan and "| tiny | imagenet-9 | 9 | 1.00 |" in plan and "img/s" in plan
    assert not (tmp_path / "results.json").exists()


def test_dry_run_says_what_a_task_reading_no_images_reads(tmp_path, data_root, checkpoint, capsys):
    """kernel-distance and ablation read no images (the weights; the kernel size, the tables coming from
    the other tasks): their plan rows said 'img/s measured'."""
    assert cli(*common(tmp_path, checkpoint, data_root, "--suite", "clean,kernel-distance,ablation", "--dry-run")) == 0
    rows = {line.split("|")[2].strip(): line.split("|")[-2].strip()
            for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")}
    assert rows["clean"].endswith("img/s measured")
    assert rows["kernel-distance"] == "no images: reads the model's depthwise kernel weights"
    assert rows["ablation"] == "no images: reads the model's kernel size (its tables come from the other tasks)"


def test_a_task_that_cannot_run_is_planned_and_reported_as_such(tmp_path, data_root, checkpoint, capsys):
    """TAIG with one model (no surrogate of the other family): --dry-run planned it (3,784 passes per
    image, 30 minutes) where the run says it is not run; the run then ended with "no task could run
    (none had its data...)", which was not the cause. And a run whose only task failed said "the other
    tasks finished"."""
    assert cli(*common(tmp_path, checkpoint, data_root, "--suite", "clean,taig", "--dry-run")) == 0
    rows = {line.split("|")[2].strip(): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| tiny |")}
    assert "not run: TAIG needs a surrogate model of the other family" in rows["taig"], rows["taig"]
    assert "| tiny | clean | 6 | 1.00 |" in rows["clean"]
    err = run_failing(capsys, *common(tmp_path / "a", checkpoint, data_root, "--suite", "taig"))
    assert "tiny: taig not run: TAIG needs a surrogate" in err
    assert "lkfast.eval: error: no task could run (the reasons are above and in" in err and "data" not in \
        err.split("no task could run")[1], err
    err = run_failing(capsys, *common(tmp_path / "b", checkpoint, data_root, "--suite", "imagenet-c",
                                      "--imagenet-c-dir", data_root / "val"))
    assert "1 task(s) failed (tiny: imagenet-c)" in err and "no other task ran" in err and "other tasks finished" \
        not in err, err


def test_a_suite_in_a_task_list_says_what_it_adds(tmp_path, data_root, checkpoint, capsys):
    """'ablation' is a task and the suite of the tasks its tables need: --suite pgd,ablation ran seven
    more tasks (generating ImageNet-C from val where absent) without a word."""
    assert cli(*common(tmp_path, checkpoint, data_root, "--suite", "clean,ablation", "--dry-run")) == 0
    err = capsys.readouterr().err
    assert "lkfast.eval: note: --suite: 'ablation' is a suite and adds its tasks: clean, imagenet-a, " in err, err
    assert cli(*common(tmp_path, checkpoint, data_root, "--suite", "ablation", "--dry-run")) == 0
    assert "note" not in capsys.readouterr().err  # the suite alone: what was asked for


def test_dry_run_lists_every_task_whose_data_is_wrong(tmp_path, data_root, checkpoint, capsys):
    """--dry-run stopped at the first folder in the wrong layout (one error line, no plan): now every
    such task is a 'fails:' row of the plan beside the rows that would run, and the exit is 2."""
    assert cli(*common(tmp_path, checkpoint, data_root, "--suite", "clean,imagenet-c,imagenet-a,imagenet-9",
                       "--imagenet-c-dir", data_root / "val", "--imagenet-a-dir", data_root / "imagenet-c",
                       "--dry-run")) == 2
    captured = capsys.readouterr()
    rows = {line.split("|")[2].strip(): line for line in captured.out.splitlines() if line.startswith("| tiny |")}
    assert "| tiny | clean | 6 | 1.00 |" in rows["clean"] and "| tiny | imagenet-9 | 9 | 1.00 |" in rows["imagenet-9"]
    assert "fails: ImageNet-C:" in rows["imagenet-c"] and "fails: ImageNet-A:" in rows["imagenet-a"]  # named (it said "image folder")
    assert "lkfast.eval: error: 2 task(s) would fail on their data (tiny: imagenet-c, tiny: imagenet-a)" in captured.err
    assert not (tmp_path / "results.json").exists()


def test_dry_run_counts_the_passes_an_analysis_makes_per_image(tmp_path, data_root, checkpoint, capsys):
    """The estimate counts forward-pass equivalents (a backward = two forwards): FGSM makes a forward
    and a backward then the attacked forward per eps, PGD 3 per step + 1 per attack, frequency one
    forward per band, the occlusion one per ratio (per ratio and type with a saliency source), the
    lesion one per drawn set of blocks, TAIG (per eps) the surrogate's steps x (path steps + 1) forwards
    and backwards then the target's forward, plus the clean forward; the minutes scale with them."""
    from lkfast import attacks
    from lkfast.analysis.frequency import FREQUENCIES
    from lkfast.analysis.lesion import LesionPlan

    assert cli(*common(tmp_path, checkpoint, data_root, "--suite", "clean,fgsm,pgd,frequency,occlusion,lesion,taig",
                       "--taig-surrogate", "tiny", "--dry-run")) == 0
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:7]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")}
    pgd_steps = [5] * len(attacks.PGD_EPS) + list(attacks.PGD_STEPS)
    lesion = LesionPlan(reference_model(checkpoint), scope="paper")
    assert lesion.counts == [1] and lesion.draws == 10  # test_resnet: one block removed at a time, 10 draws
    expected = {"clean": 1, "fgsm": 1 + 4 * len(attacks.FGSM_EPS), "frequency": 1 + len(FREQUENCIES),
                "pgd": 1 + sum(3 * n + 1 for n in pgd_steps),
                "occlusion": 1 + 9,  # no masks, no DINO: the random drop only, at 9 ratios
                "lesion": 1 + 1 * 10,
                "taig": 1 + 3 * (20 * 21 * 3 + 1)}  # eps 0.03/0.06/0.1, 20 steps, 20 path steps
    assert {task: float(rows[task][1]) for task in expected} == expected
    from lkfast.eval.runner import plan

    options = EvalOptions(out=str(tmp_path), data={"val": str(data_root / "val")}, workers=0, progress=False,
                          analysis={"taig_surrogate": "tiny"})  # one model: TAIG runs only with a surrogate named
    minutes = {row[1]: row[4] for row in plan([ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)],
                                             list(expected), options)}
    for task in expected:  # one measured throughput: minutes in proportion to the passes
        assert minutes[task] / minutes["clean"] == pytest.approx(expected[task], rel=1e-9), task
    # with a saliency source the occlusion drops by all three types (DINO's file is not read for the plan)
    options = EvalOptions(out=str(tmp_path), data={"val": str(data_root / "val")}, workers=0, progress=False,
                          analysis={"dino_checkpoint": str(tmp_path / "dino.pth")})
    (row,) = plan([ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)], ["occlusion"], options)
    assert row[3] == 1 + 9 * 3


def test_what_users_get_wrong_is_said_in_one_line_before_anything_runs(tmp_path, data_root, checkpoint, capsys,
                                                                       monkeypatch):
    """Data options without --models (even a data root with no benchmark folder), --dry-run of the
    embedded default, --out naming a file, and a data root that is one dataset's class folders: exit
    2 with one line that says what to do; the embedded default is never started by mistake."""
    import lkfast.eval.default

    monkeypatch.setattr(lkfast.eval.default, "prepare_default", lambda args: pytest.fail("the default started"))
    (tmp_path / "empty").mkdir()
    err = run_failing(capsys, "--data-root", tmp_path / "empty", "--out", tmp_path / "o1")
    assert "no --models given" in err
    err = run_failing(capsys, "--dry-run", "--out", tmp_path / "o2")
    assert "embedded default" in err and "without --dry-run" in err
    (tmp_path / "afile").write_text("x")
    err = run_failing(capsys, *common(tmp_path / "afile", checkpoint, data_root, "--suite", "clean"))
    assert "--out" in err and "is a file" in err
    err = run_failing(capsys, *common(tmp_path / "o3", checkpoint, data_root / "val", "--suite", "clean"))
    assert "holds none of the benchmark folders" in err and f"--val-dir {data_root / 'val'}" in err
    for benchmark, folders in (("imagenet-c", "corruptions"), ("imagenet-p", "perturbations")):
        err = run_failing(capsys, *common(tmp_path / "o4", checkpoint, data_root / benchmark, "--suite", "clean"))
        assert f"; it looks like an ImageNet-{benchmark[-1].upper()} folder (its folders are {folders}): pass it as " \
               f"--{benchmark}-dir {data_root / benchmark} (or its parent as --data-root)" in err, err
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4"))


def test_a_folder_of_validation_perturbations_is_told_apart_from_imagenet_c(tmp_path):
    """--data-root pointed at a benchmark's own folder says which benchmark it looks like. spatter,
    speckle_noise and gaussian_blur are ImageNet-C extras and ImageNet-P validation perturbations;
    shear is ImageNet-P's alone: ImageNet-C's corruptions hold severity folders."""
    from lkfast.eval.cli import _corruptions_or_perturbations

    p = tmp_path / "p"
    for folder in ("shear", "speckle_noise_2", "spatter"):
        (p / folder / "n01440764").mkdir(parents=True)
    assert _corruptions_or_perturbations(p, ["shear", "speckle_noise_2"]) == "imagenet-p"
    assert _corruptions_or_perturbations(p, ["spatter", "shear"]) == "imagenet-p"
    (p / "spatter" / "3").mkdir()
    assert _corruptions_or_perturbations(p, ["spatter"]) == "imagenet-c"


def test_a_run_where_no_task_had_data_fails(tmp_path, data_root, checkpoint, capsys):
    """Every task skipped for lack of data is not a success: exit 2, each reason on one line."""
    err = run_failing(capsys, *common(tmp_path, checkpoint, data_root, "--suite", "imagenet-o",
                                      "--val-dir", data_root / "imagenet-a", "--data-root", tmp_path))
    assert "lkfast.eval: tiny: imagenet-o not run: no imagenet-o data: pass --data-root" in err  # not 'reads it too'
    assert "no task could run" in err
    err = run_failing(capsys, *common(tmp_path, checkpoint, data_root, "--suite", "imagenet-o", "--data-root", tmp_path,
                                      "--imagenet-o-dir", data_root / "imagenet-o"))
    assert "imagenet-o not run: no val data (imagenet-o reads it too: its in-distribution negatives" in err
    err = run_failing(capsys, *common(tmp_path, checkpoint, data_root, "--workers", -1))
    assert "--workers must be 0" in err


def test_random_weights_are_said_and_get_no_paper_values(tmp_path, data_root, capsys):
    """A model without a checkpoint is evaluated untrained: a warning, a line in the report, its
    card in results.json says so, and no paper value stands beside its numbers (the label names a
    model the paper reports: 85.20 top-1 would otherwise sit beside it)."""
    args = ["--models", "test_resnet=RepLKNet-31B", "--data-root", data_root, "--out", tmp_path, "--input-size", SIZE,
            "--workers", 0, "--batch-size", 4, "--no-progress", "--suite", "clean", "--limit", 2]
    assert cli(*args) == 0
    assert "'RepLKNet-31B' has no checkpoint: it is evaluated with random weights" in capsys.readouterr().err
    r = load(tmp_path)["RepLKNet-31B"]
    assert r["_model"]["weights"] == "random (no checkpoint)" and r["_model"]["checkpoint"] is None
    model = timm.create_model("test_resnet").eval()  # the card's multiply-adds: the model's at the input size
    assert r["_model"]["macs"] == count_macs(model, (3, SIZE, SIZE), "cpu") > 0
    assert "**Random weights**: RepLKNet-31B" in (tmp_path / "report.md").read_text()
    summary = (tmp_path / "tables" / "summary.md").read_text()
    assert "85.20" not in summary and "| Model | ImageNet | ImageNet-A |" in summary  # no paper column


def test_a_model_that_cannot_be_counted_is_still_evaluated(tmp_path, data_root, checkpoint, capsys, monkeypatch):
    """The card's multiply-adds are a fact about the model, not part of the evaluation: a model whose
    forward fails under torch.utils.flop_counter's FlopCounterMode (an op the mode cannot run) is
    evaluated all the same, its card without them, and the reason said in one line."""
    from torch.utils.flop_counter import FlopCounterMode

    def refuse(self, func_packet, out, args, kwargs):
        raise RuntimeError(f"FlopCounterMode cannot run {func_packet}")

    monkeypatch.setattr(FlopCounterMode, "_count_flops", refuse)
    assert cli(*common(tmp_path, checkpoint, data_root, "--suite", "clean", "--limit", 2)) == 0
    err = capsys.readouterr().err
    assert "lkfast.eval: tiny: multiply-adds not counted (RuntimeError: FlopCounterMode cannot run" in err
    r = load(tmp_path)["tiny"]
    assert "top1" in r["clean"] and r["_model"]["parameters"] > 0 and "macs" not in r["_model"]
    row = (tmp_path / "tables" / "model_card.md").read_text().split("| tiny |")[1].split("\n")[0]
    assert row.split("|")[3].strip() == "—"  # GMACs


def test_result_keys_follow_what_changes_each_tasks_numbers(tmp_path, monkeypatch):
    """--limit changes every task's key, --seed those of the tasks that draw; an analysis option changes only the keys of the
    tasks that read it (a DINO checkpoint: occlusion, not the benchmarks), by path, by the file's
    content (a replaced file) and through its environment variable; the data folders' files too."""
    import lkfast.eval.analysis_tasks  # noqa: F401  (registers occlusion)
    import lkfast.eval.tasks  # noqa: F401
    from lkfast.eval.runner import Runner

    monkeypatch.delenv("LKFAST_DINO_CHECKPOINT", raising=False)
    val = tmp_path / "val" / "n01440764"
    val.mkdir(parents=True)
    (val / "a.JPEG").write_bytes(b"x")
    dino = tmp_path / "dino.pth"
    dino.write_bytes(b"weights")

    def keys(**options):
        options = {"out": str(tmp_path / "out"), "data": {"val": str(tmp_path / "val")}, **options}
        runner = Runner([], ["clean"], EvalOptions(**options))
        return runner.result_key(None, TASKS["clean"]), runner.result_key(None, TASKS["occlusion"])
    base = keys()
    assert keys(limit=2)[0] != base[0] and keys(limit=2) != keys(limit=4)
    # --analysis-images changes the analyses' keys only
    assert keys(analysis_images=2)[0] == base[0] and keys(analysis_images=2)[1] != base[1] != keys(analysis_images=3)[1]
    # --seed changes the keys of the tasks that draw random numbers only (occlusion's random drop, not clean)
    assert keys(seed=1)[0] == base[0] and keys(seed=1)[1] != base[1] != keys(seed=2)[1]
    # on CUDA (fp32 kept fp32 there) a task gives the CPU's numbers and shares its keys, unless it draws
    # random numbers (a CUDA generator draws others: keyed by the device type, not by which GPU)
    cuda = keys(device="cuda", gpu_decode=False)
    assert cuda[0] == base[0] and cuda[1] != base[1] and keys(device="cuda:1", gpu_decode=False) == cuda
    assert keys(device="cuda", gpu_decode=False, seed=1)[1] not in (cuda[1], keys(seed=1)[1])
    # --amp computes in bf16 on the CPU and in fp16 on CUDA: other results
    assert keys(amp=True)[0] != base[0] and keys(amp=True, device="cuda", gpu_decode=False)[0] != keys(amp=True)[0]
    # decoding on the GPU (nvJPEG) gives other pixels: --no-gpu-decode on CUDA is another result;
    # on the CPU the option does nothing, and changes nothing
    assert keys(gpu_decode=False) == base
    assert keys(device="cuda")[0] != base[0] and keys(device="cuda:1")[1] != cuda[1]
    with_dino = keys(analysis={"dino_checkpoint": str(dino)})
    taig = [Runner([], ["taig"], EvalOptions(out=str(tmp_path / "out"), data={"val": str(tmp_path / "val")},
                                             analysis={"taig_surrogate": s})).result_key(None, TASKS["taig"])
            for s in ("A", "B")]
    assert taig[0] != taig[1]  # another surrogate is another TAIG result
    assert with_dino[0] == base[0] and with_dino[1] != base[1]
    monkeypatch.setenv("LKFAST_DINO_CHECKPOINT", str(dino))
    assert keys() == with_dino
    dino.write_bytes(b"other weights")
    assert keys()[1] != with_dino[1]
    # the same folder typed relative to another working directory, or through a link: the same keys
    (tmp_path / "link").symlink_to(tmp_path / "val")
    monkeypatch.chdir(tmp_path / "val")
    assert keys(data={"val": "."}) == keys() == keys(data={"val": str(tmp_path / "link")})
    monkeypatch.chdir(tmp_path)
    assert keys(data={"val": "val"}) == keys()
    assert keys(analysis={"dino_checkpoint": "dino.pth"}) == keys(analysis={"dino_checkpoint": str(dino)})
    (val / "b.JPEG").write_bytes(b"y")
    assert keys()[0] != base[0]
    # another label set (a python -m lkfast.train run's classes) is another result, by name and by size
    from lkfast.eval.classes import ClassSpace

    spaces = [ClassSpace("run A", ("n01440764", "n01443537")), ClassSpace("run B", ("n01440764", "n01443537")),
              ClassSpace("run A", ("n01440764",)), ClassSpace("run A", ("n01443537", "n01440764")),
              ClassSpace("run A", ("n01440764", "n01443537"), subsets={"imagenet-a": (1,)})]
    spaced = [Runner([], [], EvalOptions(out=str(tmp_path / "out"), data={"val": str(tmp_path / "val")}, class_space=c))
              .result_key(None, TASKS["clean"]) for c in spaces]
    assert len(set(spaced + [keys()[0]])) == 6
    # the baseline model joins the keys of the tasks it normalises (ImageNet-C/-P) only
    options = EvalOptions(out=str(tmp_path / "out"), data={"val": str(tmp_path / "val")})
    with_baseline = EvalOptions(out=str(tmp_path / "out"), data={"val": str(tmp_path / "val")},
                                baseline=ModelSpec("alexnet", str(dino)))
    for task, changes in (("clean", False), ("occlusion", False), ("imagenet-p", True), ("imagenet-c", True)):
        assert (Runner([], [], options).result_key(None, TASKS[task]) !=
                Runner([], [], with_baseline).result_key(None, TASKS[task])) is changes, task


def test_taigs_result_key_follows_its_surrogate(tmp_path):
    """TAIG's result depends on the surrogate the run gives it: another surrogate checkpoint (its
    file replaced, or another file under the same label), another label for it (the result names
    it) or none at all is another key; a cached result made with vit.pth was served for vit2.pth.
    The other tasks' keys do not depend on which models are in the run."""
    import lkfast.eval.analysis_tasks  # noqa: F401  (registers taig)
    from lkfast.eval.runner import Runner

    val = tmp_path / "val" / "n01440764"
    val.mkdir(parents=True)
    (val / "a.JPEG").write_bytes(b"x")
    files = {}
    for name in ("tiny.pth", "vit.pth", "vit2.pth"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    tiny = ModelSpec("test_resnet", str(files["tiny.pth"]), label="tiny")

    def key(task, *others, **analysis):
        options = EvalOptions(out=str(tmp_path / "out"), data={"val": str(tmp_path / "val")}, analysis=analysis)
        runner = Runner([tiny, *others], [task], options)
        return runner.result_key(tiny, TASKS[task])

    vit = ModelSpec("test_vit", str(files["vit.pth"]), label="vit")
    base = key("taig", vit)
    assert key("taig", vit) == base  # nothing changed: the cached result is served
    assert key("taig", ModelSpec("test_vit", str(files["vit2.pth"]), label="vit")) != base
    assert key("taig", ModelSpec("test_vit", str(files["vit.pth"]), label="ViT")) != base
    assert key("taig") != base  # no surrogate: not a result made with one
    assert key("taig", vit, ModelSpec("test_vit", str(files["vit2.pth"]), label="vit2"), taig_surrogate="vit2") != \
        key("taig", vit, ModelSpec("test_vit", str(files["vit2.pth"]), label="vit2"), taig_surrogate="vit")
    files["vit.pth"].write_bytes(b"retrained")
    assert key("taig", vit) != base
    assert key("clean", vit) == key("clean") and key("fgsm", vit) == key("fgsm")


def test_a_model_without_weights_is_the_same_random_net_each_time():
    """A model with no checkpoint (random weights, cached under the key "random") is built from one
    seed: two loads are the same net, so a resumed run's shards and a rerun's cached results come
    from the weights the run evaluates; the caller's random generator is left as it was."""
    from lkfast.eval.models import load_model

    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    first, _ = load_model(ModelSpec("test_resnet"))
    assert torch.equal(torch.rand(2), expected)
    second, _ = load_model(ModelSpec("test_resnet"))
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.float().std() > 0 for k, v in a.items() if k.endswith("weight"))  # initialised, not zeros


def test_a_missing_baseline_checkpoint_stops_only_the_normalisation(tmp_path, data_root, checkpoint):
    """Through the API (the CLI refuses it up front), a baseline whose checkpoint is missing leaves
    the tasks that do not use it alone, and ImageNet-P says why it is unnormalised."""
    specs = [ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)]
    options = EvalOptions(out=str(tmp_path), data={"val": str(data_root / "val"), "imagenet-p": str(data_root / "imagenet-p")},
                          workers=0, progress=False, baseline=ModelSpec("alexnet", str(tmp_path / "nope.pth")))
    r = run_evaluation(specs, ["clean", "imagenet-p"], options)["tiny"]
    assert 0 < r["clean"]["top1"] < 100 and r["imagenet-p"]["mfr"] is None
    assert "nope.pth" in r["imagenet-p"]["normalisation_note"] and "not found" in r["imagenet-p"]["normalisation_note"]


def test_registered_task_runs_and_is_cached(tmp_path, data_root, checkpoint):
    calls = []

    def mean_logit(ctx):
        calls.append(1)
        images = ctx.dataset("val")  # the registry docstring's example
        rec = ctx.records("val", images, lambda x, y, indices: {"m": ctx.forward(x).mean(1)})
        return {"mean_logit": float(rec["m"].mean()), "n": len(rec["m"])}
    register_task("test-mean-logit", mean_logit, needs=("val",), replace=True)
    try:
        specs = [ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)]
        options = EvalOptions(out=str(tmp_path), data={"val": str(data_root / "val")}, workers=0, progress=False)
        first = run_evaluation(specs, ["test-mean-logit"], options)
        second = run_evaluation(specs, ["test-mean-logit"], options)
        assert first["tiny"]["test-mean-logit"]["n"] == 6 and len(calls) == 1
        assert second["tiny"]["test-mean-logit"] == first["tiny"]["test-mean-logit"]
    finally:
        TASKS.pop("test-mean-logit")


def _tf32_readings() -> list:
    """Every way of reading torch's TF32 settings: its value, or "ERR" where torch refuses the read
    (a setting read through another API than it was set through), "-" where this torch lacks it."""
    def read(get):
        try:
            return get()
        except RuntimeError:
            return "ERR"
        except AttributeError:
            return "-"
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    return [read(lambda: cudnn.allow_tf32), read(lambda: matmul.allow_tf32), read(torch.get_float32_matmul_precision),
            *(read(lambda o=o: o().fp32_precision) for o in (lambda: cudnn.conv, lambda: cudnn.rnn, lambda: matmul,
                                                             lambda: cudnn, lambda: torch.backends))]


# How a process may have set TF32 before an eval run (the first: PyTorch's defaults)
TF32_BEFORE = {
    "defaults": "torch.backends.cudnn.allow_tf32 = True",
    "all through the newer setting": "torch.backends.fp32_precision = 'tf32'",
    "cuDNN's through the newer setting": "torch.backends.cudnn.fp32_precision = 'tf32'",
    "cuDNN's convolutions apart from its RNNs": "torch.backends.cudnn.conv.fp32_precision = 'tf32'; "
                                                "torch.backends.cudnn.rnn.fp32_precision = 'ieee'",
    "cuBLAS's through the matmul precision": "torch.set_float32_matmul_precision('high')",
    "cuBLAS's through allow_tf32": "torch.backends.cuda.matmul.allow_tf32 = True",
}


def test_a_run_computes_fp32_in_fp32_on_a_gpu_and_puts_the_settings_back(tmp_path, data_root, checkpoint):
    """PyTorch lets cuDNN round fp32 convolution inputs to TF32 on Ampere and later GPUs by default:
    a GPU run gave other numbers than the CPU's under the same cache keys. The run turns TF32 off
    for cuDNN (convolutions and RNNs) and cuBLAS while it computes, says so in its metadata, and puts
    the settings back exactly, however the process had set them (TF32_BEFORE). During the run every
    way of reading them answers: torch.backends.cudnn.flags(...), which models and libraries use,
    reads allow_tf32, which raised all run long when only the newer setting was turned off; turning
    off only allow_tf32 left a process-wide fp32_precision = 'tf32' in force."""
    from lkfast.eval.runner import ieee_fp32

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    newer = hasattr(getattr(cudnn, "conv", None), "fp32_precision")
    raw = [(torch.backends, "fp32_precision"), (cudnn, "fp32_precision"), (getattr(cudnn, "conv", None), "fp32_precision"),
           (getattr(cudnn, "rnn", None), "fp32_precision"), (matmul, "fp32_precision")]
    raw = [(owner, name) for owner, name in raw if hasattr(owner, name)]
    initial, initial_raw = _tf32_readings(), [getattr(owner, name) for owner, name in raw]
    seen = []

    def precision(ctx):
        seen.append(_tf32_readings())
        with torch.backends.cudnn.flags(enabled=True):  # reads allow_tf32 (and sets its own while open)
            pass
        return {"n": 1}
    register_task("test-precision", precision, needs=("val",), replace=True)
    results = {}
    try:
        for number, (state, code) in enumerate(TF32_BEFORE.items()):
            exec(code)
            before = _tf32_readings()
            if number == 0:  # a whole run once; the rest through the context it runs in
                options = EvalOptions(out=str(tmp_path), data={"val": str(data_root / "val")}, workers=0,
                                      progress=False, write_report=False)
                run_evaluation([ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)], ["test-precision"],
                               options)
                with pytest.raises(KeyError), ieee_fp32():  # put back after an error too
                    raise KeyError
            else:
                with ieee_fp32():
                    precision(None)
            results[state] = (before, seen.pop(), _tf32_readings())
            # back to this process's settings (the conftest's), set afresh
            for (owner, name), value in zip(raw, initial_raw):
                setattr(owner, name, value)
            cudnn.allow_tf32 = False
            torch.set_float32_matmul_precision("highest")
            for (owner, name), value in zip(raw, initial_raw):
                setattr(owner, name, value)
    finally:
        TASKS.pop("test-precision")
    off = [False, False, "highest", *(["ieee", "ieee", "ieee"] if newer else ["-"] * 3)]
    for state, (before, inside, after) in results.items():
        assert inside[:6] == off or (inside[2] == "ERR" and before[2] == "ERR" and inside[3:6] == off[3:6]
                                     and inside[:2] == off[:2]), (state, inside)  # (unreadable before: as it was)
        assert after == before, state
    assert results["defaults"][0][0] is True  # PyTorch's default, TF32 on for cuDNN
    assert load(tmp_path)["_meta"]["fp32"] == "ieee (no TF32)"
    assert _tf32_readings() == initial


def test_generated_corruptions_are_the_cpus_on_any_device(tmp_path):
    """Generated ImageNet-C/-P corrupt each image with a generator of its own on the CPU, whatever the
    evaluation device (lkfast.corrupt draws on the generator's device): a CUDA generator draws other
    numbers for the same seed, so a GPU run scored other images than the CPU's (and the writer's)
    under the same keys. Here the device is "cuda" on a machine that may have no GPU: the CPU
    generators are what lets it run, and the images are the CPU run's."""
    import lkfast.corrupt
    from lkfast.eval.runner import Runner, TaskContext
    from lkfast.eval.tasks import _per_image

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    corrupted = []
    for device in ("cpu", "cuda"):
        runner = Runner([], ["imagenet-c"], EvalOptions(out=str(tmp_path), device=device))
        ctx = TaskContext(runner, TASKS["imagenet-c"], None, None, {}, None)
        corrupted.append(_per_image(ctx, "gaussian_noise/3", images, [4, 0, 7],
                                    lambda x, g: lkfast.corrupt.corrupt(x, "gaussian_noise", 3, generator=g)))
    assert not torch.equal(corrupted[0], images) and torch.equal(corrupted[0], corrupted[1])


def test_no_model_is_held_after_its_turn_the_baseline_included(tmp_path, data_root, checkpoint, baseline_checkpoint):
    """Each model is let go after its tasks (its GPU memory freed for the next); the baseline, loaded
    for ImageNet-P's normalisation, was held to the end of the run."""
    import lkfast.eval.tasks  # noqa: F401  (registers imagenet-p)
    from lkfast.eval.runner import Runner

    options = EvalOptions(out=str(tmp_path), data={"imagenet-p": str(data_root / "imagenet-p")}, workers=0,
                          progress=False, write_report=False,
                          baseline=ModelSpec.parse(f"mobilenet_v3_small:{baseline_checkpoint}", source="torchvision"))
    runner = Runner([ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)], ["imagenet-p"], options)
    result = runner.run()["tiny"]["imagenet-p"]
    assert result["mfr"] is not None and runner._loaded == {}


def test_a_gpu_out_of_memory_while_decoding_is_raised_not_counted_as_bad_files(data_root, monkeypatch):
    """torch.cuda.OutOfMemoryError is a RuntimeError, as a bad file's decode error is: a full GPU made
    every image of the batch "undecodable", and the shard was cached on fewer images."""
    import torchvision.io

    from lkfast.eval.sources import EncodedImages

    folder = data.ImageFolderBenchmark(data_root / "val", data.transform_for(config()))
    encoded = EncodedImages(folder, config())
    items = [encoded[i][0] for i in range(2)]
    for error in (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                  RuntimeError("CUDA error: an illegal memory access was encountered")):
        monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda *a, error=error, **k: (_ for _ in ()).throw(error))
        with pytest.raises(type(error), match="CUDA"):
            encoded.decode_batch(items, "cpu")
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("Unsupported marker type 0x4f")))  # a broken file: each image is marked, none raised
    assert encoded.decode_batch(items, "cpu")[1].tolist() == [False, False]


OUT_OF_MEMORY = {  # what torch raises, on a GPU that is full and from its CPU allocator
    "cuda": (lambda n: torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} GiB"),
             "OutOfMemoryError: CUDA out of memory. Tried to allocate {n} GiB"),
    "cublas": (lambda n: RuntimeError(f"CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)` "
                                      f"({n} images)"),
               "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)` ({n} images)"),
    "cpu": (lambda n: RuntimeError(f"[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                                   f"allocate memory: you tried to allocate {n} bytes. Error code 12"),
            "RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate {n} bytes. Error code 12"),
}


@pytest.mark.parametrize("where", sorted(OUT_OF_MEMORY))
def test_out_of_memory_goes_on_in_smaller_pieces(tmp_path, data_root, checkpoint, where):
    """A batch that runs out of memory (an attack's gradients need more than --batch-size's clean
    forward) is computed again in halves, with one warning, and the task's later batches go at the
    size that fitted: the records are a run's at that batch size. One image that does not fit fails
    that task in one line, and the other tasks still run. Any other error is not retried."""
    calls = []
    error, reason = OUT_OF_MEMORY[where]

    def logits(limit, fail=error):
        def run(ctx):
            def compute(x, y, indices):
                calls.append(len(x))
                if len(x) > limit:
                    raise fail(len(x))
                return {"logits": ctx.forward(x), "index": torch.tensor(indices)}
            return {k: v.tolist() for k, v in ctx.records("val", ctx.dataset("val"), compute).items()}
        return run
    specs = [ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)]
    data_ = {"val": str(data_root / "val")}
    try:
        register_task("test-oom", logits(1), needs=("val",), replace=True)
        with pytest.warns(UserWarning) as said:
            pieces = run_evaluation(specs, ["test-oom"], EvalOptions(out=str(tmp_path / "a"), data=data_, workers=0,
                                                                     progress=False, batch_size=4))["tiny"]["test-oom"]
        said = [str(w.message) for w in said if "out of memory" in str(w.message)]
        assert said == [f"test-oom/val: out of memory at {n} images per batch ({reason.format(n=n)}); going on at "
                        f"{n // 2} for this task (the same images and seeds; --batch-size {n // 2} starts there)"
                        for n in (4, 2)]
        # 6 images in batches [0..3], [4, 5]: the first too large at 4 and at 2, then one at a time; the second
        # batch goes at the size that fitted at once
        assert calls == [4, 2, 1, 1, 1, 1, 1, 1], calls
        calls.clear()
        whole = run_evaluation(specs, ["test-oom"], EvalOptions(out=str(tmp_path / "b"), data=data_, workers=0,
                                                                progress=False, batch_size=1))["tiny"]["test-oom"]
        assert calls == [1] * 6 and pieces["index"] == list(range(6))
        assert torch.allclose(torch.tensor(pieces["logits"]), torch.tensor(whole["logits"]), atol=1e-5)
        register_task("test-oom", logits(0), needs=("val",), replace=True)
        with pytest.warns(UserWarning, match="going on at 1"), pytest.raises(EvalError, match=r"\(tiny: test-oom\)"):
            run_evaluation(specs, ["test-oom", "clean"], EvalOptions(out=str(tmp_path / "c"), data=data_, workers=0,
                                                                     progress=False, batch_size=4))
        r = load(tmp_path / "c")["tiny"]
        assert f"test-oom/val: out of memory with one image at a time ({reason.split(':')[0]}): free the cpu device's " \
               "memory, or run this task with --amp or on a device with more memory" in r["test-oom"]["error"]
        assert 0 < r["clean"]["top1"] < 100
        calls.clear()
        register_task("test-oom", logits(1, fail=lambda n: RuntimeError("shapes do not match")), needs=("val",),
                      replace=True)
        with pytest.raises(EvalError, match=r"\(tiny: test-oom\)"):
            run_evaluation(specs, ["test-oom"], EvalOptions(out=str(tmp_path / "d"), data=data_, workers=0,
                                                            progress=False, batch_size=4))
        assert calls == [4] and "the model failed on its first batch of 32x32 images (RuntimeError: shapes do not " \
            "match)" in load(tmp_path / "d")["tiny"]["test-oom"]["error"]
    finally:
        TASKS.pop("test-oom")


def test_the_same_data_through_a_link_or_a_relative_path_reuses_the_stored_shards(tmp_path, data_root, checkpoint,
                                                                                     monkeypatch):
    """A rerun that names the data folder another way (relative to another directory, through a
    link) reads its shards from the cache: its paths used to be part of the keys as typed."""
    computed = []

    def count(ctx):
        rec = ctx.records("val", ctx.dataset("val"), lambda x, y, i: computed.append(len(i)) or {"m": x.mean((1, 2, 3))})
        return {"n": len(rec["m"])}
    register_task("test-shard-paths", count, needs=("val",), replace=True)
    try:
        (tmp_path / "link").symlink_to(data_root)
        specs = [ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)]
        monkeypatch.chdir(data_root)
        for i, val in enumerate((str(data_root / "val"), "val", str(tmp_path / "link" / "val"))):
            options = EvalOptions(out=str(tmp_path / "out"), data={"val": val}, workers=0, progress=False,
                                  shard_size=4)
            for entry in (tmp_path / "out" / "cache").glob("*/test-shard-paths/result.*"):
                entry.unlink()  # the result is recomputed from the stored shards
            assert run_evaluation(specs, ["test-shard-paths"], options)["tiny"]["test-shard-paths"]["n"] == 6
            assert sum(computed) == 6, (i, val, computed)  # the first run's two shards, nothing since
    finally:
        TASKS.pop("test-shard-paths")


def test_stored_shards_follow_their_key_and_their_files(tmp_path, data_root, checkpoint):
    """The shard cache under a task: two records() calls of one part that differ only in ``key``
    get their own shards (the second does not load the first's), and an image rewritten in place
    (same path, other pixels) is computed again on the next run, not read from its stored shard."""
    val = tmp_path / "val"
    shutil.copytree(data_root / "val", val)
    computed = []

    def two_keys(ctx):
        images = ctx.dataset("val")
        out = {}
        for key, scale in (("a", 1.0), ("b", 2.0)):
            def compute(x, y, indices, scale=scale):
                computed.append(len(indices))
                return {"m": scale * x.float().mean((1, 2, 3))}
            out[key] = ctx.records("val", images, compute, key=key)["m"].tolist()
        return out
    register_task("test-shard-keys", two_keys, needs=("val",), replace=True)
    try:
        specs = [ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)]
        options = EvalOptions(out=str(tmp_path / "out"), data={"val": str(val)}, workers=0, progress=False)
        first = run_evaluation(specs, ["test-shard-keys"], options)["tiny"]["test-shard-keys"]
        assert len(first["a"]) == 6 and sum(computed) == 12
        assert first["b"] == pytest.approx([2 * m for m in first["a"]])
        files = sorted(val.rglob("*.JPEG"))
        files[0].write_bytes(files[-1].read_bytes())
        computed.clear()
        second = run_evaluation(specs, ["test-shard-keys"], options)["tiny"]["test-shard-keys"]
        assert sum(computed) > 0
        changed = [i for i, (m, n) in enumerate(zip(first["a"], second["a"])) if m != pytest.approx(n)]
        assert len(changed) == 1 and second["a"][changed[0]] == pytest.approx(second["a"][-1]), (first, second)
    finally:
        TASKS.pop("test-shard-keys")


def test_stored_shards_of_images_with_masks_follow_both_files(tmp_path, data_root, checkpoint):
    """The occlusion's dataset (val images with their foreground masks, one item from two files) has
    no folder reader's samples: its shard key had the val folder's name and nothing of its files, so
    an image or a mask rewritten in place was read back from the stored shard on the next run."""
    from lkfast.eval.analysis_tasks import _val_dataset

    val, masks = tmp_path / "val", tmp_path / "masks"
    shutil.copytree(data_root / "val", val)
    files = sorted(val.rglob("*.JPEG"))
    for path in files:
        mask = torch.zeros(3, SIZE, SIZE)
        mask[:, : SIZE // 2, : SIZE // 2] = 1.0
        (masks / path.relative_to(val)).parent.mkdir(parents=True, exist_ok=True)
        (masks / path.relative_to(val)).write_bytes(data.encode_jpeg(data.to_uint8(mask), quality=95))

    def means(ctx):
        rows = ctx.records("val", _val_dataset(ctx, masks=True),
                           lambda x, y, indices: {"image": x[:, :3].float().mean((1, 2, 3)), "mask": x[:, 3].float().mean((1, 2))})
        return {k: v.tolist() for k, v in rows.items()}
    register_task("test-masked-shards", means, needs=("val", "masks"), replace=True)
    try:
        specs = [ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)]
        options = EvalOptions(out=str(tmp_path / "out"), data={"val": str(val), "masks": str(masks)}, workers=0,
                              progress=False)

        def run():
            return run_evaluation(specs, ["test-masked-shards"], options)["tiny"]["test-masked-shards"]
        first = run()
        assert len(first["mask"]) == 6 and 0.2 < first["mask"][0] < 0.4  # a quarter, resized and cropped
        (masks / files[0].relative_to(val)).write_bytes(data.encode_jpeg(data.to_uint8(torch.ones(3, SIZE, SIZE))))
        second = run()
        assert second["mask"][0] == pytest.approx(1.0, abs=0.02) and second["mask"][1:] == first["mask"][1:]
        files[0].write_bytes(files[-1].read_bytes())
        third = run()
        assert third["image"][0] == pytest.approx(third["image"][-1]) != pytest.approx(first["image"][0])
    finally:
        TASKS.pop("test-masked-shards")


def test_stored_shards_of_a_dataset_without_files_follow_its_root(tmp_path, data_root, checkpoint):
    """A dataset with no files to fingerprint (no ``samples``, no ``item_files``) is told apart by its
    ``root`` alone: the same task over another data folder computes its shards again (with the root
    left out of the shard key the second run read the first folder's)."""
    calls = []

    class FromRoot(torch.utils.data.Dataset):
        def __init__(self, root):
            self.root = root

        def __len__(self):
            return 2

        def __getitem__(self, index):
            return torch.zeros(3, SIZE, SIZE), 0

    def roots(ctx):
        root = str(ctx.source("val"))
        return {"n": ctx.records("val", FromRoot(root), lambda x, y, indices: calls.append(root) or {"y": y})["y"].tolist()}
    register_task("test-root-shards", roots, needs=("val",), replace=True)
    other = tmp_path / "val"
    shutil.copytree(data_root / "val", other)
    try:
        specs = [ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)]
        for val in (data_root / "val", other):
            run_evaluation(specs, ["test-root-shards"], EvalOptions(out=str(tmp_path / "out"), data={"val": str(val)},
                                                                    workers=0, progress=False))
        assert calls == [str(data_root / "val"), str(other)]
    finally:
        TASKS.pop("test-root-shards")


def test_stored_records_are_not_read_back_in_another_class_space(tmp_path, data_root, checkpoint):
    """The same model and images scored in two label sets of one name and size (ImageNet's wnids in
    their order and reversed): the second run's targets are its own, not the first's stored shard."""
    from lkfast.eval.classes import ClassSpace, imagenet_class_space

    def targets(ctx):
        return {"y": ctx.records("val", ctx.dataset("val"), lambda x, y, indices: {"y": y})["y"].tolist()}
    register_task("test-class-space", targets, needs=("val",), replace=True)
    try:
        specs = [ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)]
        imagenet = imagenet_class_space()
        reversed_space = ClassSpace(imagenet.name, imagenet.class_names[::-1])
        got = [run_evaluation(specs, ["test-class-space"], EvalOptions(
            out=str(tmp_path / "out"), data={"val": str(data_root / "val")}, workers=0, progress=False,
            class_space=space))["tiny"]["test-class-space"]["y"] for space in (imagenet, reversed_space)]
        assert len(got[0]) == 6 and got[1] == [999 - y for y in got[0]], got
    finally:
        TASKS.pop("test-class-space")


# -- bad input ------------------------------------------------------------------------------------
def run_failing(capsys, *args) -> str:
    assert cli(*args) == 2
    return capsys.readouterr().err


def test_a_report_that_cannot_be_made_keeps_the_results_and_says_how_to_write_it(tmp_path, data_root, checkpoint,
                                                                                  capsys, monkeypatch):
    """A figure matplotlib refused (a negative error bar, in a first version of Fig. 7's bars) ended the run in
    an error naming only matplotlib's complaint, and under torchrun would have left the other ranks at the
    barrier waiting for rank 0. The results stand, the message says how to write the report from them."""
    import lkfast.eval.report as report

    def broken(out, results):
        raise ValueError("'yerr' must not contain negative values")

    monkeypatch.setattr(report, "write_report", broken)
    out = tmp_path / "out"
    err = run_failing(capsys, *common(out, checkpoint, data_root, "--suite", "clean"))
    assert ("report.md not written (ValueError: 'yerr' must not contain negative values): the results are complete in "
            f"{out / 'results.json'}; once this is fixed, python -m lkfast.eval.report {out} writes the report") in err
    assert load(out)["tiny"]["clean"]["images"] > 0 and "finished" in load(out)["_meta"]


def test_missing_dataset_folder(tmp_path, data_root, checkpoint, capsys):
    err = run_failing(capsys, *common(tmp_path, checkpoint, data_root, "--imagenet-a-dir", tmp_path / "nowhere"))
    assert "--imagenet-a-dir" in err and "no such folder" in err
    # under --data-root an absent benchmark is skipped with the reason, in results.json and the report
    root = tmp_path / "root"
    (root / "val").mkdir(parents=True)
    (root / "val" / _wnids()[0]).symlink_to(data_root / "val" / _wnids()[0])
    assert cli(*common(tmp_path / "out", checkpoint, root, "--suite", "clean,imagenet-r")) == 0
    r = load(tmp_path / "out")["tiny"]
    assert "imagenet-r" in r["imagenet-r"]["unavailable"] and r["clean"]["images"] == 3
    assert "Not run" in (tmp_path / "out" / "report.md").read_text()


def test_wrong_layout_says_what_was_expected(tmp_path, data_root, checkpoint, capsys):
    """A folder in the wrong layout fails its task with what was expected; the tasks around it still
    run and are reported (nothing lost), and the run ends with exit 2 naming the failure."""
    err = run_failing(capsys, *common(tmp_path, checkpoint, data_root, "--suite", "clean,imagenet-c,imagenet-a",
                                      "--imagenet-c-dir", data_root / "val"))
    assert "expected" in err and "<corruption>/<severity" in err and "ImageNet-val" in err
    assert "tiny: imagenet-c failed:" in err and "the other tasks finished" in err
    # one statement of the failure (when it fails); the final line names the task, not the message again
    assert err.count("<corruption>/<severity") == 1, err
    final = [line for line in err.splitlines() if line.startswith("lkfast.eval: error:")]
    assert len(final) == 1 and "1 task(s) failed (tiny: imagenet-c)" in final[0], err
    r = load(tmp_path)["tiny"]
    assert 0 < r["clean"]["top1"] < 100 and "top1" in r["imagenet-a"] and "<corruption>" in r["imagenet-c"]["error"]
    assert "imagenet-c" in (tmp_path / "report.md").read_text().split("Not run")[-1]


@pytest.mark.parametrize("batch_size", [4, 1])  # the odd image in a batch with others / in a batch of its own
def test_images_fed_without_a_resize_must_share_one_size(tmp_path, data_root, checkpoint, capsys, batch_size):
    """ImageNet-C and -9 are fed as they are: an image of another size among them ended the run in a
    traceback from torch.stack (in one batch) or was fed at its own size (in a batch of its own). The
    task fails naming both files and their sizes; the others run."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(data_root / "imagenet-c", root / "imagenet-c")
    shutil.copytree(data_root / "val", root / "val")
    odd = root / "imagenet-c" / "snow" / "5" / _wnids()[1] / "img0.JPEG"
    _jpeg(odd, torch.Generator().manual_seed(1), size=SIZE + 8)
    err = run_failing(capsys, *common(tmp_path / "out", checkpoint, root, "--suite", "clean,imagenet-c",
                                      "--batch-size", batch_size))
    first = root / "imagenet-c" / "snow" / "5" / _wnids()[0] / "img0.JPEG"
    assert f"tiny: imagenet-c failed: {odd} is {SIZE + 8}x{SIZE + 8} but {first} is {SIZE}x{SIZE}: this " \
           f"benchmark's images are fed to the model as they are, without a resize" in err, err
    assert "Traceback" not in err and load(tmp_path / "out")["tiny"]["clean"]["images"] == 6


def test_a_misnamed_perturbation_or_variant_folder_fails_its_task(tmp_path, data_root, checkpoint, capsys):
    """ImageNet-P's gaussian-noise/ and ImageNet-9's MixedRand/ were left out without a word (the run
    scored what it recognised, exit 0); ImageNet-C's misnamed folders were already an error."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(data_root / "imagenet-p", root / "imagenet-p")
    shutil.copytree(data_root / "imagenet-9", root / "imagenet-9")
    (root / "imagenet-p" / "gaussian_noise").rename(root / "imagenet-p" / "gaussian-noise")
    (root / "imagenet-9" / "mixed_rand").rename(root / "imagenet-9" / "MixedRand")
    err = run_failing(capsys, *common(tmp_path / "out", checkpoint, root, "--suite", "imagenet-p,imagenet-9",
                                      "--baseline-model", "none"))
    assert "tiny: imagenet-p failed: ImageNet-P: folder(s) gaussian-noise in" in err, err
    assert "tiny: imagenet-9 failed: ImageNet-9: folder(s) MixedRand in" in err, err


def test_a_harder_noise_level_without_its_difficulty_1_folder_is_said_not_scored(tmp_path, data_root, checkpoint,
                                                                                  capsys):
    """The release ships each noise difficulty as its own archive: gaussian_noise_2/ extracted without
    gaussian_noise/ was left out without a word (the eval scores difficulty 1). It is recorded and
    reported as not scored; with nothing but harder levels the task fails saying so. A sequence of
    another frame size is refused naming the files (the advice once named ImageNet-C alone)."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(data_root / "imagenet-p", root / "imagenet-p")
    (root / "imagenet-p" / "gaussian_noise").rename(root / "imagenet-p" / "gaussian_noise_2")
    assert cli(*common(tmp_path / "out", checkpoint, root, "--suite", "imagenet-p", "--baseline-model", "none")) == 0
    r = load(tmp_path / "out")["tiny"]["imagenet-p"]
    assert r["mfr_over"] == ["translate"] and r["not_scored"] == ["gaussian_noise_2"]
    assert "**not scored** (a harder noise level without its difficulty-1 folder; difficulty 1 is scored): " \
           "gaussian_noise_2" in (tmp_path / "out" / "report.md").read_text()
    shutil.rmtree(root / "imagenet-p" / "translate")
    err = run_failing(capsys, *common(tmp_path / "out2", checkpoint, root, "--suite", "imagenet-p",
                                      "--baseline-model", "none"))
    assert "(only the harder noise levels gaussian_noise_2: the eval scores difficulty 1, the folders without _2 " \
           "or _3)" in err, err
    shutil.copytree(data_root / "imagenet-p" / "translate", root / "imagenet-p" / "translate")
    odd = next((root / "imagenet-p" / "translate").rglob("seq1.npy"))
    np.save(odd, np.zeros((8, SIZE + 8, SIZE + 8, 3), np.uint8))
    err = run_failing(capsys, *common(tmp_path / "out3", checkpoint, root, "--suite", "imagenet-p",
                                      "--baseline-model", "none"))
    assert f"{odd} is {SIZE + 8}x{SIZE + 8} but" in err and "renders ImageNet-C and ImageNet-P at 224x224" in err, err


def test_the_releases_validation_perturbations_are_scored_outside_mfr(tmp_path, data_root, checkpoint,
                                                                      baseline_checkpoint):
    """The ImageNet-P release's test.py also scores its 4 validation perturbations (speckle_noise,
    gaussian_blur, spatter, shear; speckle_noise a noise sequence with _2/_3 folders). Such folders
    beside the 10 made the eval refuse the whole ImageNet-P folder ("not perturbation names"). They
    are scored (flip probability, top-5 distance, FR against the baseline) and named, but the means,
    mFR and mT5D stay over the 10 of the benchmark, as the release's numbers are.

    speckle_noise and shear copy gaussian_noise and translate (checking each is scored as its kind);
    spatter holds translate's sequences with their frames reordered, so its flip probability, top-5
    distance and rates differ: a mean (or mFR / mT5D) taken over every scored perturbation differs from
    the one over the benchmark's 2, which the precondition checks (with copies only, the two were equal
    and the mean assertions could not fail)."""
    import shutil

    root = tmp_path / "root"
    shutil.copytree(data_root / "imagenet-p", root / "imagenet-p")
    p_dir = root / "imagenet-p"
    shutil.copytree(p_dir / "gaussian_noise", p_dir / "speckle_noise")
    shutil.copytree(p_dir / "translate", p_dir / "shear")
    shutil.copytree(p_dir / "translate", p_dir / "speckle_noise_2")  # a harder level: not scored, not refused
    for sequence in (p_dir / "translate").glob("*/*.npy"):
        target = p_dir / "spatter" / sequence.parent.name / sequence.name
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, np.load(sequence)[[0, 4, 1, 5, 2, 6, 3, 7]])
    out = tmp_path / "out"
    assert cli(*common(out, checkpoint, root, "--suite", "imagenet-p",
                       "--baseline-model", f"mobilenet_v3_small:{baseline_checkpoint}")) == 0
    r = load(out)["tiny"]["imagenet-p"]
    assert set(r["fp"]) == {"gaussian_noise", "translate", "speckle_noise", "shear", "spatter"}
    assert r["outside_mfr"] == ["speckle_noise", "spatter", "shear"]  # the release's order (speckle_noise .. shear)
    assert r["mfr_over"] == ["gaussian_noise", "translate"]
    # speckle_noise holds gaussian_noise's sequences and is scored as noise (every frame against the first)
    assert r["fp"]["speckle_noise"] == pytest.approx(r["fp"]["gaussian_noise"])
    assert r["t5d"]["shear"] == pytest.approx(r["t5d"]["translate"])
    base = r["baseline"]
    assert set(r["fr"]) == set(r["fp"]) and r["fr"]["shear"] == pytest.approx(100 * r["fp"]["shear"] / base["fp"]["shear"])
    # precondition: averaging every scored perturbation would give other numbers than the benchmark's 2
    for values in (r["fp"], r["t5d"], r["fr"], r["t5d_normalised"]):
        everything, benchmark = sum(values.values()) / len(values), (values["gaussian_noise"] + values["translate"]) / 2
        assert everything != pytest.approx(benchmark), values
    assert r["mean_fp"] == pytest.approx((r["fp"]["gaussian_noise"] + r["fp"]["translate"]) / 2)
    assert r["mean_t5d_unnormalised"] == pytest.approx((r["t5d"]["gaussian_noise"] + r["t5d"]["translate"]) / 2)
    ten = ("gaussian_noise", "translate")
    assert r["mfr"] == pytest.approx(metrics.mfr({n: r["fp"][n] for n in ten}, {n: base["fp"][n] for n in ten}))
    assert r["mt5d"] == pytest.approx(metrics.mt5d({n: r["t5d"][n] for n in ten}, {n: base["t5d"][n] for n in ten}))
    report = (out / "report.md").read_text()
    assert "validation perturbations speckle_noise, spatter, shear scored per perturbation, outside the means" in report
    header = (out / "tables" / "imagenet_p_fp.csv").read_text().splitlines()[0]
    assert header == "Model,gaussian_noise,translate,shear (validation),spatter (validation),speckle_noise (validation)"


def test_paper_values_stand_beside_comparable_numbers_only(tmp_path, data_root, checkpoint, baseline_checkpoint):
    """ImageNet-P's mFR / mT5D normalised by a baseline other than AlexNet stood beside the paper's
    (AlexNet-normalised) values, the report never naming the baseline; a model in a class space other
    than ImageNet-1k had the paper's ImageNet numbers beside its own. The notes name the baseline and
    its weights, and the paper's values stand only beside numbers of the same definition."""
    from lkfast.eval.report import write_report

    out = tmp_path / "out"
    assert cli("--models", f"test_resnet:{checkpoint}=ResNet-50", "--data-root", data_root, "--out", out,
               "--input-size", SIZE, "--workers", 0, "--batch-size", 4, "--no-progress", "--suite", "clean,imagenet-p",
               "--baseline-model", f"mobilenet_v3_small:{baseline_checkpoint}") == 0
    results = load(out)
    p = results["ResNet-50"]["imagenet-p"]
    assert p["baseline_model"] == "mobilenet_v3_small" and p["mfr"] is not None
    assert p["normalised_by"] == f"the baseline model mobilenet_v3_small, {baseline_checkpoint} on the same sequences"

    def table2_row(results):
        """(mFR, its paper value, mT5D, its paper value) of Table 2's ResNet-50 row, "—" for the paper
        columns when the table leaves them out (it does when no row has a paper value), and the report."""
        write_report(out, results)
        report = (out / "report.md").read_text()
        lines = (out / "tables" / "table2_mfr_mt5d.md").read_text().splitlines()
        header = next(line for line in lines if line.startswith("| Model |"))
        row = [c.strip() for c in next(line for line in lines if line.startswith("| ResNet-50 |")).split("|")[2:-1]]
        return (row[:4] if "| paper |" in header else [row[0], "—", row[1], "—"]), report

    (mfr, paper_mfr, mt5d, paper_mt5d), report = table2_row(results)
    assert float(mfr) == pytest.approx(p["mfr"], abs=0.01) and paper_mfr == paper_mt5d == "—"
    assert "| Model | mFR (%) | mT5D (%) |" in report  # no paper value in the table: no paper column
    assert (f"normalised by the baseline model mobilenet_v3_small, {baseline_checkpoint} on the same sequences (not "
            f"AlexNet, as the release and the paper: the paper's values are not shown beside)") in report
    p["baseline_model"] = "alexnet"  # the release's baseline: the paper's values (ResNet-50: 58.0, 82.0) beside
    assert table2_row(results)[0][1::2] == ["58.00", "82.00"]
    # sequences lkfast generated from val estimate the release's: no paper value beside them, and the note says so
    source = p["source"]
    p["source"] = "generated from /data/val with lkfast.corrupt (seed 0)"
    (_, paper_mfr, _, paper_mt5d), report = table2_row(results)
    assert paper_mfr == paper_mt5d == "—"
    assert ("data: generated from /data/val with lkfast.corrupt (seed 0) (an estimate of the release's files: the "
            "paper's values are not shown beside)") in report
    p["source"] = source
    assert table2_row(results)[0][1::2] == ["58.00", "82.00"]
    from lkfast.eval.report import _paper  # Table 1 and Fig. 2b the same way

    for where, expected in (("disk: /data/imagenet-c", 76.7), ("generated from /data/val with lkfast.corrupt", None)):
        results["ResNet-50"]["imagenet-c"] = {"source": where}
        assert _paper(results, "ResNet-50", "mce") == expected and _paper(results, "ResNet-50", "mfr") == 58.0
    del results["ResNet-50"]["imagenet-c"]
    # a results.json from before ImageNet-P's version 5 (flip probabilities under fr / mean_fr_unnormalised)
    # gives the same report (python -m lkfast.eval.report on an old run showed "—" and no per-perturbation table)
    old = json.loads(json.dumps(results))
    q = old["ResNet-50"]["imagenet-p"]
    q["fr"], q["mean_fr_unnormalised"] = q.pop("fp"), q.pop("mean_fp")
    assert table2_row(old)[1] == table2_row(results)[1]
    assert "Flip probability (%) per perturbation" in table2_row(old)[1] and "fr" in old["ResNet-50"]["imagenet-p"]
    results["_meta"]["class_space_is_imagenet"] = False  # other classes: no paper value anywhere
    assert table2_row(results)[0][1::2] == ["—", "—"]


def test_a_model_that_cannot_take_a_benchmarks_size_fails_that_task_only(tmp_path, data_root, capsys):
    """A fixed-size model (a ViT built for 224 px) given ImageNet-C, fed at its own size without a resize,
    ended the whole run in an AssertionError traceback; now that task fails in one line saying why."""
    err = run_failing(capsys, "--models", "vit_tiny_patch16_224=vt", "--data-root", data_root, "--out", tmp_path / "out",
                      "--workers", 0, "--batch-size", 4, "--no-progress", "--suite", "clean,imagenet-c")
    assert (f"vt: imagenet-c failed: imagenet-c/gaussian_noise/1: the model failed on its first batch of {SIZE}x{SIZE} "
            f"images (AssertionError: Input height ({SIZE}) doesn't match model (224).); the model's input size is "
            f"224x224 and this benchmark is fed at its own size, without a resize") in err, err
    assert "Traceback" not in err and load(tmp_path / "out")["vt"]["clean"]["images"] == 6


def test_device_decode_refuses_images_of_two_sizes(data_root, tmp_path):
    from lkfast.eval.sources import EncodedImages

    _images(tmp_path / "c", _wnids(), 1, torch.Generator().manual_seed(0), size=SIZE)
    _jpeg(tmp_path / "c" / _wnids()[1] / "img0.JPEG", torch.Generator().manual_seed(1), size=SIZE + 8)
    folder = data.ImageFolderBenchmark(tmp_path / "c", data.transform_for(config(), resize=False))
    encoded = EncodedImages(folder, config(), resize=False)
    with pytest.raises(data.DatasetLayoutError, match=f"img0.JPEG is {SIZE + 8}x{SIZE + 8} but .*img0.JPEG is "
                                                      f"{SIZE}x{SIZE}: this benchmark's images are fed"):
        encoded.decode_batch([encoded[0][0], encoded[1][0]], "cpu", [0, 1])


def test_each_ranks_final_line_is_true_of_its_own_output(tmp_path, data_root, checkpoint, capsys, monkeypatch):
    """Under torchrun only rank 0 prints the per-task lines, yet every rank ended with "the reasons are
    above" (nothing was above on rank 1); and where no task could run, rank 1 exited 0. Rank 1 (faked:
    lkfast.eval.distributed.rank, which is_main reads) now names the failed tasks and points at rank 0."""
    from lkfast.eval import distributed

    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    err = run_failing(capsys, *common(tmp_path / "a", checkpoint, data_root, "--suite", "imagenet-c",
                                      "--imagenet-c-dir", data_root / "val"))
    assert "failed:" not in err and "<corruption>" not in err  # rank 0's lines, not printed here
    (final,) = [line for line in err.splitlines() if line.startswith("lkfast.eval: error:")]
    assert "1 task(s) failed (tiny: imagenet-c)" in final and "above" not in final, err
    assert "this is rank 1: rank 0 printed the reasons and wrote them to results.json and report.md" in final
    # every task not run for lack of data (test_a_run_where_no_task_had_data_fails on rank 0): exit 2 here too
    err = run_failing(capsys, *common(tmp_path / "b", checkpoint, data_root, "--suite", "imagenet-o",
                                      "--val-dir", data_root / "imagenet-a", "--data-root", tmp_path))
    assert "not run" not in err and "above" not in err, err


def test_unknown_wnids(tmp_path, data_root, checkpoint, capsys):
    bad = tmp_path / "val"
    _images(bad, ["n00000001"], 1, torch.Generator().manual_seed(0))
    err = run_failing(capsys, *common(tmp_path, checkpoint, data_root, "--suite", "clean", "--val-dir", bad))
    assert "n00000001" in err and "not known class names" in err


def test_model_whose_classes_do_not_fit(tmp_path, data_root, checkpoint, capsys):
    options = EvalOptions(out=str(tmp_path), data={"val": str(data_root / "val")}, workers=0, progress=False)
    with pytest.raises(EvalError, match="outputs 10 classes.*1000 classes.*train with --num-classes 1000") as raised:
        run_evaluation([ModelSpec("test_resnet", kwargs=(("num_classes", 10),), input_size=SIZE)], ["clean", "fgsm"],
                       options)
    assert "other tasks finished" not in str(raised.value)  # a model that cannot be scored stops the run at once
    assert not (tmp_path / "report.md").exists()
    ten = tmp_path / "ten.pth"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), ten)
    err = run_failing(capsys, *common(tmp_path, ten, data_root, "--suite", "clean"))
    # the eval's words, not create_model's "pass num_classes=10" (no option of the command)
    assert "The checkpoint's classifier has 10 classes; the benchmarks are scored in ImageNet-1k's 1000: evaluate " \
           "a checkpoint with a 1000-class head" in err and "num_classes=" not in err, err


def test_parts_with_nothing_readable_are_left_out_and_named(tmp_path, data_root, checkpoint):
    """An ImageNet-C part (or a whole val folder) whose every image is unreadable is not scored as
    NaN or 0: the part is left out and named in the result and the report, a task with nothing
    readable is recorded unavailable with the reason, and the run goes on."""
    c_dir, val = tmp_path / "imagenet-c", tmp_path / "val"
    shutil.copytree(data_root / "imagenet-c", c_dir)
    shutil.copytree(data_root / "val", val)
    for f in list((c_dir / "gaussian_noise" / "3").rglob("*.JPEG")) + list(val.rglob("*.JPEG")):
        f.write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="unreadable"):
        assert cli(*common(tmp_path / "out", checkpoint, data_root, "--suite", "clean,imagenet-c",
                           "--imagenet-c-dir", c_dir, "--val-dir", val)) == 0
    r = load(tmp_path / "out")["tiny"]
    assert "could be read" in r["clean"]["unavailable"]
    c = r["imagenet-c"]
    assert c["unreadable_parts"] == ["gaussian_noise/3"] and sorted(c["top1"]["gaussian_noise"]) == ["1", "2", "4", "5"]
    assert "gaussian_noise" in c["ce_skipped"] and c["mce"] is None and c["sev5_top1"] is not None
    assert "every item unreadable, not scored**: gaussian_noise/3" in (tmp_path / "out" / "report.md").read_text()


def test_imagenet_o_against_a_val_lacking_some_of_its_classes_says_so(tmp_path, data_root, checkpoint):
    """ImageNet-O's negatives are val's images of its classes: a val holding only some of them (a
    subset of ImageNet, a partial copy) gave other AUPR / AUROC with only a warning on stderr. The
    result and the report's notes say how many of the classes val holds."""
    val = tmp_path / "val"
    shutil.copytree(data_root / "val", val)
    shutil.rmtree(val / _wnids()[1])
    with pytest.warns(UserWarning, match="1 of the 2 requested class folders"):
        assert cli(*common(tmp_path / "out", checkpoint, data_root, "--suite", "imagenet-o", "--val-dir", val)) == 0
    r = load(tmp_path / "out")["tiny"]["imagenet-o"]
    note = f"{val} holds 1 of the 2 ImageNet-O classes whose val images are the negatives: not the benchmark's AUPR / AUROC"
    assert r["classes"] == 2 and r["in_classes"] == 1 and r["in_classes_note"] == note
    assert f"**negatives from fewer classes**: {note}" in (tmp_path / "out" / "report.md").read_text()
    assert cli(*common(tmp_path / "whole", checkpoint, data_root, "--suite", "imagenet-o")) == 0
    whole = load(tmp_path / "whole")["tiny"]["imagenet-o"]
    assert whole["in_classes"] == 2 and "in_classes_note" not in whole and whole["in_images"] > r["in_images"]


def test_imagenet_o_with_nothing_readable_on_one_side_is_not_run_with_the_reason(tmp_path, data_root, checkpoint,
                                                                                 capsys):
    """ImageNet-O scores its images against val's of its classes: where every image of either side is
    unreadable the task is not run, saying which side, as any task with nothing readable; the others run."""
    o_dir, val = tmp_path / "imagenet-o", tmp_path / "val"
    shutil.copytree(data_root / "imagenet-o", o_dir)
    shutil.copytree(data_root / "val", val)
    for f in o_dir.rglob("*.JPEG"):
        f.write_bytes(b"?!")
    with pytest.warns(UserWarning, match="unreadable"):
        assert cli(*common(tmp_path / "out", checkpoint, data_root, "--suite", "clean,imagenet-o",
                           "--imagenet-o-dir", o_dir)) == 0
    r = load(tmp_path / "out")["tiny"]
    assert r["clean"]["images"] == 6
    reason = f"none of the imagenet-o images in {o_dir} could be read (4 unreadable)"
    assert r["imagenet-o"]["unavailable"] == reason
    assert f"tiny: imagenet-o not run: {reason}" in capsys.readouterr().err
    # readable ImageNet-O, unreadable val: the negatives are the ones missing (and alone, the run exits 2)
    shutil.rmtree(o_dir)
    shutil.copytree(data_root / "imagenet-o", o_dir)
    for f in val.rglob("*.JPEG"):
        f.write_bytes(b"?!")
    with pytest.warns(UserWarning, match="unreadable"):
        err = run_failing(capsys, *common(tmp_path / "out2", checkpoint, data_root, "--suite", "imagenet-o",
                                          "--imagenet-o-dir", o_dir, "--val-dir", val))
    assert f"tiny: imagenet-o not run: none of the val images in {val} of ImageNet-O's 2 classes (its negatives) " \
           "could be read (6 unreadable)" in err and "no task could run" in err, err


def test_noise_sequences_are_the_ones_scored_against_their_first_frame():
    from lkfast.eval import tasks

    assert [n for n in metrics.IMAGENET_P if tasks._is_noise(n)] == ["gaussian_noise", "shot_noise"]


def test_unreadable_image_is_skipped_warned_and_counted(tmp_path, data_root, checkpoint):
    val = tmp_path / "val"
    for folder in (data_root / "val").iterdir():
        (val / folder.name).mkdir(parents=True)
        for f in folder.iterdir():
            (val / folder.name / f.name).write_bytes(f.read_bytes())
    broken = sorted(val.rglob("*.JPEG"))[1]
    broken.write_bytes(broken.read_bytes()[:300])  # a truncated JPEG
    with pytest.warns(UserWarning, match="unreadable"):
        assert cli(*common(tmp_path / "out", checkpoint, data_root, "--suite", "clean", "--val-dir", val)) == 0
    r = load(tmp_path / "out")["tiny"]["clean"]
    assert r["skipped_unreadable"] == 1 and r["images"] == 5
    logits, y = reference_logits(reference_model(checkpoint), data.ImageFolderBenchmark(val, data.transform_for(config())))
    assert r["top1"] == pytest.approx(metrics.accuracy(logits, y))
    assert "1 unreadable item(s) skipped" in (tmp_path / "out" / "report.md").read_text()
    # the file repaired in place (same path): the same --out reads it again instead of the cached result
    original = data_root / "val" / broken.parent.name / broken.name
    broken.write_bytes(original.read_bytes())
    assert cli(*common(tmp_path / "out", checkpoint, data_root, "--suite", "clean", "--val-dir", val)) == 0
    r = load(tmp_path / "out")["tiny"]["clean"]
    assert r["skipped_unreadable"] == 0 and r["images"] == 6
    logits, y = reference_logits(reference_model(checkpoint), data.ImageFolderBenchmark(val, data.transform_for(config())))
    assert r["top1"] == pytest.approx(metrics.accuracy(logits, y))


def test_imagenet_o_rerun_after_its_classes_change_is_not_served_from_the_cache(tmp_path, data_root, checkpoint):
    """ImageNet-O's score is a softmax over its classes' logits and its negatives are val images of
    those classes: a folder that gains a class, evaluated into the same --out, gives the numbers of
    a fresh run (neither the cached result nor the cached in-distribution shard is reused)."""
    o_dir = tmp_path / "imagenet-o"
    folders = sorted(p.name for p in (data_root / "imagenet-o").iterdir())
    shutil.copytree(data_root / "imagenet-o" / folders[0], o_dir / folders[0])
    args = ["--suite", "imagenet-o", "--imagenet-o-dir", o_dir]
    assert cli(*common(tmp_path / "same", checkpoint, data_root, *args)) == 0
    first = load(tmp_path / "same")["tiny"]["imagenet-o"]
    # the negatives are the val images of ImageNet-O's classes only (Hendrycks et al.'s
    # eval_many_models.py links the val folders named like ImageNet-O's): 3 of val's 6 here
    assert first["classes"] == 1 and first["in_images"] == 3 and first["out_images"] == 2
    shutil.copytree(data_root / "imagenet-o" / folders[1], o_dir / folders[1])
    assert cli(*common(tmp_path / "same", checkpoint, data_root, *args)) == 0
    assert cli(*common(tmp_path / "fresh", checkpoint, data_root, *args)) == 0
    again, fresh = load(tmp_path / "same")["tiny"]["imagenet-o"], load(tmp_path / "fresh")["tiny"]["imagenet-o"]
    assert fresh["classes"] == 2 and fresh["in_images"] == 6
    assert {k: again[k] for k in ("aupr", "auroc", "fpr95", "in_images", "out_images", "classes")} == \
        {k: fresh[k] for k in ("aupr", "auroc", "fpr95", "in_images", "out_images", "classes")}


def test_subset_reaches_every_reader_and_is_its_own_result(tmp_path, data_root, checkpoint, capsys, monkeypatch):
    """--subset N gives every dataset the run reads N images spread evenly over it (val's 2 classes x
    3 images, N = 3: targets first, first, second), --limit N the first N (first, first, first);
    the one never reuses the other's stored results in the same OUT, the report says which it was,
    and the two options cannot be given together."""
    first, second = (data.imagenet_classes().index(w) for w in _wnids())
    built = []
    init = data.ImageFolderBenchmark.__init__

    def spy(self, *args, **kwargs):  # every reader ends here: what selection did each one get?
        init(self, *args, **kwargs)
        built.append((type(self).__name__, kwargs.get("limit"), kwargs.get("spread")))
    monkeypatch.setattr(data.ImageFolderBenchmark, "__init__", spy)

    class View(torch.utils.data.Dataset):  # no files to key its shards by: only the options tell the runs apart
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, index):
            return self.dataset[index]

    def targets(ctx):
        return {"targets": ctx.records("val", ctx.dataset("val"), lambda x, y, i: {"y": y})["y"].tolist(),
                "view": ctx.records("view", View(ctx.dataset("val")), lambda x, y, i: {"y": y})["y"].tolist()}
    register_task("test-targets", targets, needs=("val",), replace=True)
    suite = "clean,imagenet-a,imagenet-r,imagenet-o,imagenet-c,imagenet-p,imagenet-9,test-targets"
    out = tmp_path / "out"
    try:
        for option, expected, line in (
                ("--subset", [first, first, second], "At most 3 images of each dataset (--subset 3), spread evenly over "
                 "its sorted order: estimates of the whole sets' numbers (a top-1 over 3 images is within about ±56.6 "
                 "points of the whole set's, 95% binomial interval at 50%)"),  # 1.96 * sqrt(0.25 / 3) = 0.566
                ("--limit", [first, first, first], "Only the first 3 images of each dataset in sorted order (--limit 3)")):
            built.clear()
            assert cli(*common(out, checkpoint, data_root, "--suite", suite, option, 3, "--baseline-model", "none")) == 0
            result = load(out)["tiny"]
            assert result["test-targets"]["targets"] == result["test-targets"]["view"] == expected, option
            assert result["clean"]["images"] == 3 and result["imagenet-o"]["in_images"] == 3
            assert {(limit, spread) for _, limit, spread in built} == {(3, option == "--subset")}, (option, built)
            # (ImageNet-C's folders and val, -A, -R, -O are read as plain image folders)
            assert {"ImageNet9", "ImageNetP", "ImageFolderBenchmark"} <= {name for name, _, _ in built}, built
            assert line in (out / "report.md").read_text()
    finally:
        TASKS.pop("test-targets")
    assert cli(*common(tmp_path / "plain", checkpoint, data_root, "--suite", "clean")) == 0
    assert "images of each dataset" not in (tmp_path / "plain" / "report.md").read_text()
    with pytest.raises(SystemExit) as stopped:
        cli(*common(tmp_path / "x", checkpoint, data_root, "--limit", 2, "--subset", 2))
    assert stopped.value.code == 2 and "argument --subset: not allowed with argument --limit" in capsys.readouterr().err


def test_analysis_images_spread_over_what_the_run_keeps(tmp_path, data_root, checkpoint, capsys):
    """--analysis-images N: the tasks that read "images" (the per-image analyses) read N val images
    spread evenly over what --limit/--subset kept, the others all of it; the report says so."""
    first, second = (data.imagenet_classes().index(w) for w in _wnids())

    def targets(ctx):
        return {"targets": ctx.records("val", ctx.dataset("val"), lambda x, y, i: {"y": y})["y"].tolist()}
    register_task("test-analysis", targets, needs=("val",), reads=("images",), replace=True)
    register_task("test-benchmark", targets, needs=("val",), replace=True)
    try:
        for extra, analysed, benchmarked in (
                ((), [first, second], [first] * 3 + [second] * 3),
                (("--subset", 4), [first, second], [first, first, second, second]),  # val's 0, 1, 3, 4; then 0, 2
                (("--limit", 3), [first, first], [first] * 3)):
            out = tmp_path / "-".join(map(str, extra or ("all",)))
            assert cli(*common(out, checkpoint, data_root, "--suite", "clean,fgsm,test-analysis,test-benchmark",
                               "--analysis-images", 2, *extra)) == 0
            r = load(out)["tiny"]
            assert r["test-analysis"]["targets"] == analysed and r["test-benchmark"]["targets"] == benchmarked, extra
            assert r["fgsm"]["images"] == 2 and r["clean"]["images"] == len(benchmarked)
            assert "**The per-image analyses (occlusion, FGSM, PGD, TAIG, lesion, frequency) read at most 2 val " \
                "images, spread evenly over it (--analysis-images 2).**" in (out / "report.md").read_text()
    finally:
        TASKS.pop("test-analysis")
        TASKS.pop("test-benchmark")
    err = run_failing(capsys, *common(tmp_path / "x", checkpoint, data_root, "--analysis-images", 0))
    assert "--analysis-images must be a positive number of images, got 0" in err


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")
def test_results_name_the_commit_of_the_code(tmp_path, data_root, checkpoint, monkeypatch):
    """results.json and the report name the git commit of lkfast's source tree ("+dirty" when
    tracked files were changed): which code computed the numbers. None outside a checkout of its own."""
    from lkfast.eval import runner
    from lkfast.eval.runner import source_commit

    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "code.py").write_text("x = 1\n")

    def git(*args):
        return subprocess.run(["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                              capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    git("add", "pkg/code.py")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert source_commit(str(repo)) == head
    (repo / "untracked.txt").write_text("not part of the code")
    assert source_commit(str(repo)) == head
    (repo / "pkg" / "code.py").write_text("x = 2\n")
    assert source_commit(str(repo)) == head + "+dirty"
    assert source_commit(str(repo / "pkg")) is None  # a package inside another project's repository
    assert source_commit(str(tmp_path / "out-of-git")) is None
    def in_root(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout.strip()
    own = in_root("rev-parse", "--show-toplevel") == str(ROOT)  # (no: a copy of the tree without its .git)
    assert (source_commit() or "").split("+")[0] == (in_root("rev-parse", "HEAD") if own else "")
    out = tmp_path / "out"
    monkeypatch.setattr(runner, "source_commit", lambda: "0123abc+dirty")
    assert cli(*common(out, checkpoint, data_root, "--suite", "clean")) == 0
    assert load(out)["_meta"]["lkfast_commit"] == "0123abc+dirty"
    assert "lkfast 0.1.0 (commit 0123abc+dirty), torch" in (out / "report.md").read_text()


def test_limit_zero_and_unknown_task(tmp_path, data_root, checkpoint, capsys):
    err = run_failing(capsys, *common(tmp_path, checkpoint, data_root, "--limit", 0))
    assert "--limit" in err and "positive" in err
    err = run_failing(capsys, *common(tmp_path, checkpoint, data_root, "--suite", "clean,imagenet-x"))
    assert "'imagenet-x'" in err and "imagenet-9" in err and "paper" in err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in ("--models", "--suite", "--data-root", "--imagenet-c-dir", "--out", "--device", "--batch-size",
                   "--workers", "--amp", "--channels-last", "--limit", "--subset", "--analysis-images", "--seed", "--trust-checkpoint", "--dry-run",
                   "--baseline-model", "examples:"):
        assert option in text


def test_device_jpeg_decode_matches_the_pil_path(data_root):
    # the GPU path (decode_jpeg on the evaluation device, resize + crop there), run on the CPU here
    from lkfast.eval.sources import EncodedImages

    cfg = config()
    folder = data.ImageFolderBenchmark(data_root / "val", data.transform_for(cfg))
    encoded = EncodedImages(folder, cfg)
    assert EncodedImages.supports(folder, cfg)
    items = [encoded[i] for i in range(len(encoded))]
    broken = items[0][0][:200]  # a truncated file among them
    images, ok = encoded.decode_batch([broken] + [x for x, _ in items], "cpu")
    assert ok.tolist() == [False] + [True] * len(items)
    expected = torch.stack([folder[i][0] for i in range(len(folder))])
    assert images.shape == expected.shape
    assert (images - expected).abs().mean() < 0.02


def test_report_puts_the_papers_value_beside_the_measured_one(tmp_path):
    from lkfast.eval.report import write_report

    results = {
        "RepLKNet-31B": {"_model": {"name": "replknet_31b"}, "imagenet-c": {"mce": 40.0, "sev5_top1": 45.0},
                         "imagenet-9": {"top1": {"original": 90.0, "mixed_same": 80.0, "mixed_rand": 70.0},
                                        "bg_gap": 10.0}},
        "mine": {"_model": {"name": "vit_large_patch16_224"}, "imagenet-c": {"mce": 50.0, "sev5_top1": 40.0},
                 "imagenet-9": {"unavailable": "no imagenet-9 data"}},
        "_meta": {"device": "cpu"},
    }
    report = write_report(tmp_path, results).read_text()
    assert "| RepLKNet-31B | 40.00 | 36.50 |" in report          # Table 1: measured, paper
    assert "| mine | 50.00 | 45.50 |" in report                  # matched by architecture name (ViT-L/16)
    assert "| RepLKNet-31B | 90.00 | 97.30 | 80.00 | 92.30 | 70.00 | 88.20 | 10.00 | 4.10 |" in report
    assert "mine: imagenet-9: no imagenet-9 data" in report
    assert (tmp_path / "tables" / "table3_imagenet9.csv").is_file() and (tmp_path / "figures" / "figure2.png").is_file()


# The paper's Tables 1-6 (Chen et al., ICML 2024), transcribed from the paper's text, row by row, for the
# models the paper reports (the methods DeepAugment + AugMix and AugMix of Tables 1-2, Table 5's
# RepLKNet-3B ablation and its Salient-Drop / Noise columns are not models the report matches). Table 4's
# and Table 6's "ViT-L" is Tables 1-3's ViT-L/16; "BiT-r152 x 4" is written BiT-r152x4, "BiT m-r101 x 3"
# BiT m-r101x3.
_TABLE1_MCE = {"ResNet-50": 76.7, "BiT m-r101x3": 58.3, "ViT-L/16": 45.5, "RepLKNet-31B": 36.5}
_TABLE2_MFR_MT5D = {"ResNet-50": (58.0, 82.0), "BiT m-r101x3": (50.0, 76.7), "ViT-L/16": (33.1, 50.2),
                    "RepLKNet-31B": (29.2, 49.8)}
_TABLE3_ORIGIN_SAME_RAND_GAP = {"BiT m-r101x3": (94.3, 81.2, 76.6, 4.6), "ResNet-50": (95.6, 86.2, 78.9, 7.3),
                                "ViT-L/16": (96.7, 88.5, 81.7, 6.8), "RepLKNet-31B": (97.3, 92.3, 88.2, 4.1)}
_TABLE4_TAIG = {"ResNet-50": (47.7, 65.2, 67.9), "BiT-r152x4": (44.6, 60.2, 63.1), "ViT-B": (62.3, 73.3, 75.6),
                "ViT-L/16": (54.9, 67.9, 69.8), "RepLKNet-31B": (39.2, 56.1, 59.3)}  # eps 0.03, 0.06, 0.1
_TABLE5_A_C_R_O = {"RepLKNet-31B": (29.4, 49.2, 43.9, 78.9), "ViT-B": (26.7, 42.2, 38.0, 68.0)}
_TABLE6_IMAGENET_A_R_C = {"BiT-r152x4": (85.4, 13.2, 33.8, 39.9), "ViT-B": (84.0, 26.7, 38.0, 42.2),
                          "ViT-L/16": (85.2, 28.1, 40.6, 49.9), "ConvNeXt-B": (85.8, 33.9, 45.5, 53.2),
                          "ConvNeXt-L": (86.6, 38.7, 47.6, 56.5), "RepLKNet-31B": (85.2, 29.4, 43.9, 49.2),
                          "RepLKNet-31L": (86.6, 39.6, 49.1, 52.6)}


def _papers_values():
    """The report's PAPER as it should be, built from the transcribed tables above."""
    paper = {}
    for name, mce in _TABLE1_MCE.items():
        paper.setdefault(name, {})["mce"] = mce
    for name, (mfr, mt5d) in _TABLE2_MFR_MT5D.items():
        paper[name].update(mfr=mfr, mt5d=mt5d)
    for name, (origin, same, rand, gap) in _TABLE3_ORIGIN_SAME_RAND_GAP.items():
        paper[name].update(original=origin, mixed_same=same, mixed_rand=rand, bg_gap=gap)
    for name, rates in _TABLE4_TAIG.items():
        paper.setdefault(name, {})["taig"] = dict(zip((0.03, 0.06, 0.1), rates))
    for name, (clean, a, r, c) in _TABLE6_IMAGENET_A_R_C.items():
        paper.setdefault(name, {}).update({"clean": clean, "imagenet-a": a, "imagenet-r": r, "c_sev5": c})
    for name, (a, c, r, o) in _TABLE5_A_C_R_O.items():
        assert (paper[name]["imagenet-a"], paper[name]["c_sev5"], paper[name]["imagenet-r"]) == (a, c, r)  # = Table 6
        paper[name]["aupr"] = o
    return paper


def test_the_papers_values_are_the_papers_tables():
    """Every value the report shows as "the paper's" is the paper's (Tables 1-6), entry for entry: the
    tests pinned about 15 of ~70, and a swapped digit elsewhere (ConvNeXt-L's ImageNet-C 56.5 as 65.5,
    BiT's mFR 50.0 as 5.0, ResNet-50's TAIG 47.7 as 74.7) went unseen."""
    from lkfast.eval.report import PAPER

    expected = _papers_values()
    assert sorted(PAPER) == sorted(expected)
    for name in expected:
        assert PAPER[name] == expected[name], name


@pytest.mark.parametrize("architecture, name", [
    ("replknet_31b.in22k_ft_in1k", "RepLKNet-31B"), ("replknet_31l.in22k_ft_in1k", "RepLKNet-31L"),
    ("vit_base_patch16_224.augreg2_in21k_ft_in1k", "ViT-B"), ("vit_large_patch16_224.augreg_in21k_ft_in1k", "ViT-L/16"),
    ("convnext_base.fb_in22k_ft_in1k", "ConvNeXt-B"), ("convnext_large.fb_in22k_ft_in1k", "ConvNeXt-L"),
    ("resnetv2_152x4_bit.goog_in21k_ft_in1k", "BiT-r152x4"), ("resnetv2_101x3_bit.goog_in21k_ft_in1k", "BiT m-r101x3"),
    ("resnet50.tv_in1k", "ResNet-50"), ("resnet50", "ResNet-50"),
    # not the paper's models: no paper values beside them
    ("replknet_3b", None), ("replknet_xl", None), ("resnet50d.ra2_in1k", None), ("resnet101.tv_in1k", None),
    ("vit_base_patch32_224.augreg_in21k_ft_in1k", None), ("convnext_tiny.fb_in1k", None),
    ("vit_large_patch14_clip_224.openai_ft_in12k_in1k", None)])
def test_paper_name_maps_each_architecture_to_its_papers_model(architecture, name):
    """Which paper row a model's results stand beside, from its timm / lkfast architecture name (any
    pretrained tag): ConvNeXt-B and -L swapped, ConvNeXt-B's numbers stood beside ConvNeXt-L's paper values
    with every test passing. RepLKNet-3B (Table 5's ablation) is not RepLKNet-31B."""
    from lkfast.eval.report import paper_name

    assert paper_name("m", {"_model": {"name": architecture, "weights": "checkpoint"}}) == name


def test_summary_and_imagenet_o_tables_put_each_number_in_its_column(tmp_path):
    """Table 6's layout (summary.md / .csv) shows ImageNet-C's severity-5 mean top-1 (the paper's Fig. 2b
    number), not the mean over severities; ImageNet-O's table shows AUPR, AUROC, FPR95 in that order. Every
    measured number here is distinct, so a column showing another key reads wrong; the paper's values beside
    RepLKNet-31B are Table 6's and Table 5's."""
    from lkfast.eval.report import write_report

    results = {
        "RepLKNet-31B": {"_model": {"name": "replknet_31b", "weights": "checkpoint"}, "clean": {"top1": 84.0},
                         "imagenet-a": {"top1": 28.0}, "imagenet-r": {"top1": 42.0},
                         "imagenet-c": {"sev5_top1": 47.0, "mean_top1": 61.0},
                         "imagenet-o": {"aupr": 75.0, "auroc": 85.0, "fpr95": 40.0}},
        "m": {"_model": {"name": "test_resnet", "weights": "checkpoint"}, "clean": {"top1": 80.0},
              "imagenet-a": {"top1": 30.0}, "imagenet-r": {"top1": 20.0},
              "imagenet-c": {"sev5_top1": 45.0, "mean_top1": 60.0},
              "imagenet-o": {"aupr": 70.0, "auroc": 80.0, "fpr95": 30.0}},
        "_meta": {"device": "cpu"},
    }
    write_report(tmp_path, results)
    summary = (tmp_path / "tables" / "summary.md").read_text()
    assert "| RepLKNet-31B | 84.00 | 85.20 | 28.00 | 29.40 | 42.00 | 43.90 | 47.00 | 49.20 |" in summary
    assert "| m | 80.00 | — | 30.00 | — | 20.00 | — | 45.00 | — |" in summary
    assert (tmp_path / "tables" / "summary.csv").read_text().splitlines()[-1].split(",")[-2] == "45.0"
    imagenet_o = (tmp_path / "tables" / "imagenet_o.md").read_text()
    assert "| RepLKNet-31B | 75.00 | 78.90 | 85.00 | 40.00 |" in imagenet_o
    assert "| m | 70.00 | — | 80.00 | 30.00 |" in imagenet_o


def test_report_says_how_many_classes_the_subset_benchmarks_were_scored_over(tmp_path):
    """ImageNet-A/-R/-O are scored over their classes present (results.json's "classes"): the report
    said 200 whatever the run used."""
    from lkfast.eval.report import write_report

    results = {"mine": {"_model": {"name": "test_resnet"}, "imagenet-a": {"top1": 50.0, "images": 4, "classes": 2},
                        "imagenet-r": {"top1": 50.0, "images": 4, "classes": 3},
                        "imagenet-o": {"aupr": 50.0, "auroc": 50.0, "fpr95": 90.0, "classes": 2}},
               "old": {"_model": {"name": "test_resnet"}, "imagenet-o": {"aupr": 40.0, "auroc": 50.0, "fpr95": 90.0}},
               "_meta": {"device": "cpu"}}
    report = write_report(tmp_path, results).read_text()
    assert "ImageNet-A top-1 on its 2 classes." in report and "ImageNet-R top-1 on its 3 classes." in report
    assert "score = -max softmax over the 2 ImageNet-O classes." in report
    del results["mine"]  # results that do not say: the benchmark's 200
    assert "score = -max softmax over the 200 ImageNet-O classes." in write_report(tmp_path, results).read_text()


def test_report_flags_a_clean_top1_far_from_the_papers(tmp_path):
    """The paper's values stand beside any checkpoint of a model the paper reports, e.g. the
    ImageNet-1K RepLKNet-31B (83.5) where the paper's 85.2 is the 22K-pretrained one: the report
    says so when the measured clean top-1 is more than a point from the paper's."""
    from lkfast.eval.report import write_report

    results = {
        "31B-1k": {"_model": {"name": "replknet_31b", "weights": "checkpoint"}, "clean": {"top1": 83.5}},
        "31B-22k": {"_model": {"name": "replknet_31b", "weights": "checkpoint"}, "clean": {"top1": 85.0}},
        "mine": {"_model": {"name": "resnet_tiny", "weights": "checkpoint"}, "clean": {"top1": 50.0}},
        "_meta": {"device": "cpu"},
    }
    report = write_report(tmp_path, results).read_text()
    flagged = [line for line in report.splitlines() if line.startswith("**Clean top-1 far from the paper's**")]
    assert len(flagged) == 1, report
    assert "31B-1k: 83.50 (the paper's RepLKNet-31B: 85.2)" in flagged[0]
    assert "31B-22k" not in flagged[0] and "mine" not in flagged[0]  # within a point; no paper value
    results["31B-1k"]["clean"]["top1"] = 84.5
    assert "far from the paper" not in write_report(tmp_path / "close", results).read_text()
    # above the paper's as well as below; exactly a point off is not more than a point
    results["31B-1k"]["clean"]["top1"] = 86.5
    results["31B-22k"]["clean"]["top1"] = 85.2 + 1.0  # 86.2 - 85.2 == 1.0 exactly in binary floating point
    assert results["31B-22k"]["clean"]["top1"] - 85.2 == 1.0
    report = write_report(tmp_path / "above", results).read_text()
    flagged = [line for line in report.splitlines() if line.startswith("**Clean top-1 far from the paper's**")]
    assert len(flagged) == 1 and "31B-1k: 86.50 (the paper's RepLKNet-31B: 85.2)" in flagged[0]
    assert "31B-22k" not in flagged[0]
    # the paper's ResNet-50 rows (Hendrycks & Dietterich's, torchvision's ResNet-50: 76.13) state no clean
    # top-1: a timm ResNet-50 of a later recipe (80.4) stood beside its mCE 76.7 with nothing said
    results = {"r50-a1": {"_model": {"name": "resnet50.a1_in1k", "weights": "checkpoint"}, "clean": {"top1": 80.4}},
               "r50-tv": {"_model": {"name": "resnet50.tv_in1k", "weights": "checkpoint"}, "clean": {"top1": 76.1}},
               "_meta": {"device": "cpu"}}
    report = write_report(tmp_path / "r50", results).read_text()
    flagged = [line for line in report.splitlines() if line.startswith("**Clean top-1 far from the paper's**")]
    assert len(flagged) == 1 and "r50-a1: 80.40 (the ResNet-50 behind the paper's values: 76.13)" in flagged[0]
    assert "r50-tv" not in flagged[0]
    results["_meta"]["class_space_is_imagenet"] = False  # no paper value beside them at all: nothing to flag
    assert "far from the paper" not in write_report(tmp_path / "r50-other", results).read_text()


def test_report_has_the_model_card_of_figure_1(tmp_path):
    from lkfast.eval.report import write_report

    results = {
        "RepLKNet-31B": {"_model": {"name": "replknet_31b", "weights": "checkpoint", "parameters": 79_000_000,
                                    "macs": 15_353_525_248, "input_size": [3, 224, 224]}, "clean": {"top1": 85.0}},
        "mine": {"_model": {"name": "resnet_tiny", "weights": "checkpoint"}, "clean": {"unavailable": "no val data"}},
        "small": {"_model": {"name": "resnet_tiny", "weights": "checkpoint", "parameters": 720_000, "macs": 5_234_567},
                  "clean": {"top1": 80.5}},
        "_meta": {"device": "cpu"},
    }
    report = write_report(tmp_path, results).read_text()
    assert "## Figure 1: models\n\n![Figure 1](figures/figure1.png)" in report
    assert "| RepLKNet-31B | replknet_31b | checkpoint | 79.00 | 15.4 | 224×224 | 85.00 | 85.20 |" in report
    assert "| mine | resnet_tiny | checkpoint | — | — | — | — | — |" in report
    assert "| small | resnet_tiny | checkpoint | 0.72 | 0.00523 | — | 80.50 | — |" in report  # 3 significant digits  # no card from the cache, no clean result
    assert (tmp_path / "figures" / "figure1.png").is_file() and (tmp_path / "tables" / "model_card.csv").is_file()
    files = json.loads((tmp_path / ".report-files.json").read_text())
    assert {"figures/figure1.png", "tables/model_card.csv", "tables/model_card.md"} <= set(files)
    # neither parameters nor a clean result: no section
    assert "Figure 1" not in write_report(tmp_path / "none", {"mine": {"_model": {"name": "resnet_tiny"}}}).read_text()


def test_figure1_marks_the_papers_top1_beside_the_measured(tmp_path, monkeypatch):
    import lkfast.eval.report as report

    drawn = {}
    monkeypatch.setattr(report, "save_figure_atomic",
                        lambda fig, path: drawn.update({Path(path).name: fig.axes}) or Path(path))
    results = {"RepLKNet-31B": {"_model": {"name": "replknet_31b", "weights": "checkpoint", "parameters": 79_000_000},
                                "clean": {"top1": 85.0}},
               "small": {"_model": {"name": "resnet_tiny", "weights": "checkpoint", "parameters": 720_000},
                         "clean": {"top1": 80.5}}}
    report.write_report(tmp_path, results)
    size, top1 = drawn["figure1.png"]
    assert [bar.get_height() for bar in size.patches] == pytest.approx([79.0, 0.72]) and not size.collections
    assert [bar.get_height() for bar in top1.patches] == [85.0, 80.5]
    (paper,) = top1.collections  # the paper's 85.2 over RepLKNet-31B's bar only
    assert paper.get_offsets().tolist() == [[0.0, 85.2]]


def test_report_accuracy_bars_of_zeros_run_from_0_to_100(tmp_path, monkeypatch):
    """Figure 2's and 3's accuracy bars all at 0 had a y-axis from 0 to 0.055 (matplotlib's flat
    range): 0..100 now; bars with a height keep their range, and the parameters panel is no percentage."""
    import lkfast.eval.report as report

    drawn = {}
    monkeypatch.setattr(report, "save_figure_atomic",
                        lambda fig, path: drawn.update({Path(path).name: fig.axes}) or Path(path))
    results = {m: {"_model": {"name": "resnet_tiny", "parameters": 720_000}, "clean": {"top1": 52.0},
                   "imagenet-a": {"top1": 0.0}, "imagenet-r": {"top1": 0.0}} for m in ("a", "b")}
    report.write_report(tmp_path, results)
    assert drawn["figure2.png"][0].get_ylim() == (0.0, 100.0) and drawn["figure3.png"][0].get_ylim() == (0.0, 100.0)
    size, top1 = drawn["figure1.png"]
    # 52 %: matplotlib's range from 0, as before, and room above the bar for its label (it sat on the frame)
    assert top1.get_ylim()[0] == 0 and 52 + 5 <= top1.get_ylim()[1] < 62
    assert size.get_ylim()[0] == 0 and size.get_ylim()[1] < 1  # 0.72 M parameters: not an accuracy


def test_report_draws_chance_and_says_each_note_once(tmp_path, monkeypatch):
    """From a review of the default run's report: ImageNet-R's bars sat at chance (10 classes) on an axis
    zoomed to 0..13, nothing saying so; a tallest bar's label sat on the frame; every note (the same data
    folder) came once per model; Fig. 2's caption promised red marks no model had."""
    import lkfast.eval.report as report

    drawn = {}
    monkeypatch.setattr(report, "save_figure_atomic",
                        lambda fig, path: drawn.update({Path(path).name: fig.axes}) or Path(path))
    results = {m: {"_model": {"name": "resnet_tiny", "parameters": 720_000}, "clean": {"top1": 52.0},
                   "imagenet-a": {"top1": 2.0, "classes": 10, "source": "/d/a"},
                   "imagenet-o": {"aupr": 60.0, "in_images": 180, "out_images": 80, "source": "/d/o"},
                   "imagenet-r": {"top1": top1, "classes": 10, "source": "/d/r"}}
               for m, top1 in (("a", 12.5), ("b", 9.0))}
    text = report.write_report(tmp_path, results).read_text()
    (r_axis,) = drawn["figure3.png"]
    chance = [line for line in r_axis.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and chance[0].get_ydata()[0] == pytest.approx(10.0)
    assert r_axis.get_ylim()[1] >= 12.5 + 0.1 * 12.5  # room for the "12.5" label under the frame
    a_axis, o_axis = drawn["figure2.png"]
    assert [line.get_ydata()[0] for line in o_axis.get_lines()] == [pytest.approx(100 * 80 / 260)]  # share of anomalies
    assert "Red marks" not in text and "Dashed: chance" in text
    assert text.count("data: /d/r") == 1 and "- all models: data: /d/r" in text
    results["b"]["imagenet-r"]["classes"] = 20  # models scored over other class counts: no one chance line
    report.write_report(tmp_path, results)
    assert not [line for line in drawn["figure3.png"][0].get_lines() if line.get_label().startswith("chance")]


def test_report_says_the_sampling_error_of_a_small_clean_set(tmp_path):
    """The default's 200 val images put a top-1 within about ±6.9 points (95%): its models 1-5 points apart
    read as a ranking. Said at the top where the interval is a point or wider; not for ImageNet's 50,000."""
    from lkfast.eval.report import write_report

    results = {m: {"_model": {"name": "resnet_tiny"}, "clean": {"top1": t, "images": 200}} for m, t in (("a", 70.0),
                                                                                                          ("b", 72.0))}
    text = write_report(tmp_path / "small", results).read_text()
    assert ("**Sampling error**: a top-1 over 200 images is within about ±6.9 points of what the model would score "
            "on all such images (95% binomial interval at 50%)") in text
    for m in results:
        results[m]["clean"]["images"] = 50_000
    assert "Sampling error" not in write_report(tmp_path / "large", results).read_text()


def test_report_bar_labels_tell_apart_what_the_table_does(tmp_path, monkeypatch):
    """Figure 1 labelled 0.34, 0.24 and 0.18 M parameters (the default run's RepLKNet-tiny nets) all
    "0.2" or "0.3": a panel's labels now carry three significant digits of its largest bar, at least
    one decimal."""
    import lkfast.eval.report as report

    assert [report.bar_decimals(v) for v in ([0.34, 0.72], [80.5, 4.9], [8.63, None], [335.2], [0.0], [0.004])] \
        == [3, 1, 2, 1, 1, 3]
    drawn = {}
    monkeypatch.setattr(report, "save_figure_atomic",
                        lambda fig, path: drawn.update({Path(path).name: fig.axes}) or Path(path))
    results = {m: {"_model": {"name": "resnet_tiny", "parameters": p}, "clean": {"top1": t}}
               for m, p, t in (("a", 342_000, 50.5), ("b", 236_000, 80.25), ("c", 720_000, 0.0))}
    report.write_report(tmp_path, results)
    size, top1 = drawn["figure1.png"]
    assert [t.get_text() for t in size.texts] == ["0.342", "0.236", "0.720"]
    assert [t.get_text() for t in top1.texts] == ["50.5", "80.2", "0.0"]


def test_report_lists_imagenet_c_top1_per_corruption_without_a_baseline(tmp_path):
    """Without a baseline model (the default run) the report gave ImageNet-C only as two means: the
    per-corruption top-1 behind them (mean over the severities present) is now a table of its own."""
    from lkfast.eval.report import write_report

    results = {"a": {"imagenet-c": {"ce": None, "mean_top1": 50.0, "sev5_top1": 30.0,
                                    "top1": {"snow": {"1": 80.0, "5": 30.0}, "fog": {"3": 40.0}}}},
               "b": {"imagenet-c": {"ce": None, "top1": {"snow": {"2": 10.0}}}}}
    write_report(tmp_path, results)
    rows = (tmp_path / "tables" / "imagenet_c_top1.csv").read_text().splitlines()
    assert rows == ["Model,fog,snow", "a,40.0,55.0", "b,,10.0"]
    assert "Top-1 (%) per corruption" in (tmp_path / "report.md").read_text()


def test_count_macs_counts_lkfast_depthwise_op_as_conv2d(monkeypatch):
    """The card's multiply-adds count a depthwise conv the same on lkfast's op as on nn.Conv2d (the
    op's FLOP formula), one per tap and output element, beside the other convs and the head; with
    the CPU calibration on, its timing runs are not counted."""
    from lkfast.nn import patch_model

    monkeypatch.setenv("LKFAST_CALIBRATE", "1")

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, (7, 5), padding=(3, 2), groups=8),
                        nn.Flatten(), nn.Linear(8 * 6 * 5, 4)).eval()
    expected = 8 * 3 * 9 * 30 + 8 * 35 * 30 + 240 * 4  # (3x3 conv) + (7x5 depthwise) + head, on a 6x5 map
    assert count_macs(net, (3, 6, 5), "cpu") == expected
    assert patch_model(net, min_kernel_size=5) == 2  # the depthwise conv and the head
    assert count_macs(net, (3, 6, 5), "cpu") == expected


def test_no_models_and_no_data_explains_what_to_run(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lkfast.eval.default" else real(name, *a))
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "--models" in err and "--data-root" in err


def test_device_decode_path_through_the_runner(tmp_path, full_run, data_root, checkpoint, monkeypatch):
    # what --device cuda does with JPEG folders, forced on the CPU: file bytes through the loader,
    # decoded and resized by EncodedImages.decode_batch; a broken file is skipped and counted
    from lkfast.eval.runner import TaskContext
    from lkfast.eval.sources import EncodedImages

    monkeypatch.setattr(TaskContext, "_device_decoded", lambda self, ds: EncodedImages(ds, self.config, ds.eval_resize)
                        if hasattr(ds, "eval_resize") else ds)
    val = tmp_path / "val"
    shutil.copytree(data_root / "val", val)
    (val / _wnids()[0] / "img9.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.warns(UserWarning, match="undecodable"):
        assert cli(*common(tmp_path / "out", checkpoint, data_root, "--suite", "clean", "--val-dir", val)) == 0
    r = load(tmp_path / "out")["tiny"]["clean"]
    assert r["skipped_unreadable"] == 1 and r["images"] == 6
    assert r["top1"] == full_run[1]["tiny"]["clean"]["top1"]


def test_imagenet_c_outside_imagenet_is_normalised_by_the_baseline(tmp_path, data_root, checkpoint):
    import dataclasses

    from lkfast.eval import imagenet_class_space

    space = dataclasses.replace(imagenet_class_space(), name="not ImageNet", published_baselines=False)
    spec = ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)
    options = EvalOptions(out=str(tmp_path / "a"), data={"imagenet-c": str(data_root / "imagenet-c")}, workers=0,
                          progress=False, class_space=space)
    r = run_evaluation([spec], ["imagenet-c"], options)["tiny"]["imagenet-c"]
    assert r["mce"] is None and "baseline" in r["mce_note"] and r["sev5_top1"] is not None
    # the model as its own baseline: every CE is 100 % by definition
    options = dataclasses.replace(options, out=str(tmp_path / "b"), baseline=dataclasses.replace(spec, label="base"))
    r = run_evaluation([spec], ["imagenet-c"], options)["tiny"]["imagenet-c"]
    assert r["ce"] == {"gaussian_noise": pytest.approx(100.0)} and r["mce"] == pytest.approx(100.0)
    assert "baseline" in r["normalised_by"]


def _not_imagenet_run(tmp_path, data_root, checkpoint, monkeypatch, out, tasks, baseline):
    """``tasks`` of the tiny model in a class space without published baselines, the baseline model's
    result for every task being ``baseline`` (hand-made)."""
    import dataclasses

    from lkfast.eval import imagenet_class_space
    from lkfast.eval.runner import Runner

    space = dataclasses.replace(imagenet_class_space(), name="not ImageNet", published_baselines=False)
    spec = ModelSpec("test_resnet", checkpoint, "tiny", input_size=SIZE)
    monkeypatch.setattr(Runner, "baseline_result", lambda self, name: (baseline, None))
    options = EvalOptions(out=str(tmp_path / out), data={k: str(data_root / k) for k in ("val", "imagenet-c", "imagenet-p")},
                          workers=0, progress=False, write_report=False, class_space=space,
                          baseline=dataclasses.replace(spec, label="base"))
    return run_evaluation([spec], tasks, options)["tiny"]


def test_imagenet_c_outside_imagenet_takes_the_baselines_errors_and_its_clean_error(tmp_path, data_root, checkpoint,
                                                                                    monkeypatch):
    """Outside ImageNet, CE divides by the baseline's mean error over the 5 severities of a corruption it
    has whole, and relative CE by that minus the baseline's own clean error (not the model's); a
    corruption the baseline lacks a severity of gets no CE; a baseline without a clean error gives no
    relative mCE, and the note says so."""
    base = {"top1": {"gaussian_noise": {"1": 80.0, "2": 70.0, "3": 60.0, "4": 50.0, "5": 40.0}, "snow": {"5": 10.0}},
            "clean_error": 0.1}  # mean error 0.4 over gaussian_noise's severities
    r = _not_imagenet_run(tmp_path, data_root, checkpoint, monkeypatch, "whole", ["clean", "imagenet-c"], base)
    c, clean_error = r["imagenet-c"], 1 - r["clean"]["top1"] / 100
    mean_error = sum(1 - v / 100 for v in c["top1"]["gaussian_noise"].values()) / 5
    assert abs(clean_error - 0.1) > 0.05 and abs(mean_error - clean_error) > 0.05  # the swaps would show
    assert c["ce"] == {"gaussian_noise": pytest.approx(100 * mean_error / 0.4)}
    assert c["mce"] == pytest.approx(100 * mean_error / 0.4)
    assert c["relative_mce"] == pytest.approx(100 * (mean_error - clean_error) / (0.4 - 0.1))
    # the baseline misses gaussian_noise/3 (unreadable there): no CE for it, nothing to average
    partial = {"top1": {"gaussian_noise": {"1": 80.0, "2": 70.0, "4": 50.0, "5": 40.0}}, "clean_error": 0.1}
    c = _not_imagenet_run(tmp_path, data_root, checkpoint, monkeypatch, "partial", ["clean", "imagenet-c"],
                          partial)["imagenet-c"]
    assert c["ce"] == {} and c["mce"] is None and c["relative_mce"] is None and "gaussian_noise" in c["ce_skipped"]
    # the baseline has no clean error: CE as before, no relative mCE, and why
    c = _not_imagenet_run(tmp_path, data_root, checkpoint, monkeypatch, "no-clean", ["clean", "imagenet-c"],
                          dict(base, clean_error=None))["imagenet-c"]
    assert c["mce"] == pytest.approx(100 * mean_error / 0.4) and c["relative_mce"] is None
    assert c["relative_mce_note"] == "the baseline has no clean error (no val data for it)"
    # a baseline not hurt by the corruption (clean error 0.5, above its 0.4 there): that corruption has no
    # relative CE, named with why; CE and mCE stay (the undefined relative CE discarded the whole result)
    from lkfast.eval.report import _notes

    c = _not_imagenet_run(tmp_path, data_root, checkpoint, monkeypatch, "unhurt", ["clean", "imagenet-c"],
                          dict(base, clean_error=0.5))["imagenet-c"]
    assert c["mce"] == pytest.approx(100 * mean_error / 0.4) and c["relative_mce"] is None
    assert c["relative_ce_skipped"] == {"gaussian_noise": "undefined: the baseline's corruption error (0.4) is not "
                                                          "above its clean error (0.5)"}
    assert c["relative_mce_note"] == "the baseline is not hurt by any corruption of the mCE (see relative_ce_skipped)"
    note = "\n".join(_notes({"m": {"imagenet-c": c}}, "imagenet-c"))
    assert "**relative mCE over 0 of the 1 corruptions of the mCE**: no relative CE for gaussian_noise (undefined" in note


def test_imagenet_p_mfr_needs_every_baseline_rate_non_zero(tmp_path, data_root, checkpoint, monkeypatch):
    """mFR / mT5D divide by the baseline's flip rate and top-5 distance of each perturbation: a zero
    (or missing) one of either leaves both out, naming the perturbation, instead of failing the task."""
    fp, t5d = {"gaussian_noise": 40.0, "translate": 20.0}, {"gaussian_noise": 2.0, "translate": 0.5}
    p = _not_imagenet_run(tmp_path, data_root, checkpoint, monkeypatch, "both", ["imagenet-p"],
                          {"fp": fp, "t5d": t5d})["imagenet-p"]
    assert p["mfr"] == pytest.approx((p["fp"]["gaussian_noise"] / 40.0 + p["fp"]["translate"] / 20.0) / 2 * 100)
    assert p["mt5d"] == pytest.approx((p["t5d"]["gaussian_noise"] / 2.0 + p["t5d"]["translate"] / 0.5) / 2 * 100)
    assert p["fr"] == pytest.approx({"gaussian_noise": p["fp"]["gaussian_noise"] / 40.0 * 100,
                                     "translate": p["fp"]["translate"] / 20.0 * 100})
    for name, baseline in (("fp", {"fp": dict(fp, translate=0.0), "t5d": t5d}),
                           ("t5d", {"fp": fp, "t5d": dict(t5d, gaussian_noise=0.0)})):
        p = _not_imagenet_run(tmp_path, data_root, checkpoint, monkeypatch, name, ["imagenet-p"], baseline)["imagenet-p"]
        zero = "translate" if name == "fp" else "gaussian_noise"
        assert p["mfr"] is None and p["mt5d"] is None and "fr" not in p, name
        assert p["normalisation_note"] == f"the baseline has no (or zero) flip probability / top-5 distance for {[zero]}"


def test_a_zero_baseline_rate_on_a_validation_perturbation_leaves_mfr_standing(tmp_path, data_root, checkpoint,
                                                                                monkeypatch):
    """A validation perturbation (outside mFR) the baseline never flips on has no FR, said in a note;
    mFR / mT5D over the benchmark's perturbations stand. Its zero took mFR, mT5D and every FR away
    (helper-68's audit: a baseline that never flips is common on small runs)."""
    from lkfast.eval.report import _notes

    root = tmp_path / "data"
    shutil.copytree(data_root / "imagenet-p", root / "imagenet-p")
    shutil.copytree(root / "imagenet-p" / "translate", root / "imagenet-p" / "shear")
    for name in ("val", "imagenet-c"):
        (root / name).symlink_to(data_root / name)
    fp, t5d = {"gaussian_noise": 40.0, "translate": 20.0, "shear": 0.0}, {"gaussian_noise": 2.0, "translate": 0.5, "shear": 0.7}
    p = _not_imagenet_run(tmp_path, root, checkpoint, monkeypatch, "out", ["imagenet-p"], {"fp": fp, "t5d": t5d})["imagenet-p"]
    assert p["outside_mfr"] == ["shear"] and "normalisation_note" not in p
    assert p["mfr"] == pytest.approx((p["fp"]["gaussian_noise"] / 40.0 + p["fp"]["translate"] / 20.0) / 2 * 100)
    assert p["mt5d"] == pytest.approx((p["t5d"]["gaussian_noise"] / 2.0 + p["t5d"]["translate"] / 0.5) / 2 * 100)
    assert set(p["fr"]) == set(p["t5d_normalised"]) == {"gaussian_noise", "translate"}
    assert p["fr_note"] == ("the baseline has no (or zero) flip probability / top-5 distance for ['shear'] (outside "
                            "mFR): no FR or normalised T5D there")
    assert "- m: fr omitted: the baseline has no (or zero) flip probability / top-5 distance for ['shear']" in \
        "\n".join(_notes({"m": {"imagenet-p": p}}, "imagenet-p"))


def test_unreadable_video_is_skipped_and_counted(tmp_path, data_root, checkpoint):
    p = tmp_path / "imagenet-p"
    shutil.copytree(data_root / "imagenet-p", p)
    (p / "translate" / _wnids()[1] / "seq9.npy").write_bytes(b"not a numpy file")
    with pytest.warns(UserWarning, match="unreadable"):
        assert cli(*common(tmp_path / "out", checkpoint, data_root, "--suite", "imagenet-p", "--imagenet-p-dir", p,
                           "--baseline-model", "none")) == 0
    r = load(tmp_path / "out")["tiny"]["imagenet-p"]
    assert r["skipped_unreadable"] == 1 and r["skipped_by_part"] == {"translate": 1}
    assert r["sequences"] == {"gaussian_noise": 2, "translate": 2}  # sequences scored (translate: 3 files)


def test_imagenet_p_with_no_readable_sequence_is_not_run_with_the_reason(tmp_path, data_root, checkpoint, capsys):
    """ImageNet-P whose every sequence is unreadable was an empty result (mFR None, exit 0) that did not
    say why: it is not run, saying so, as the other tasks with nothing readable; a perturbation whose
    every sequence is unreadable is left out and named."""
    p = tmp_path / "imagenet-p"
    shutil.copytree(data_root / "imagenet-p", p)
    for f in (p / "translate").rglob("*.npy"):
        np.save(f, np.zeros((8, SIZE, SIZE, 3), dtype=np.float32))  # not the uint8 frames of a sequence
    with pytest.warns(UserWarning, match="unreadable"):
        assert cli(*common(tmp_path / "out", checkpoint, data_root, "--suite", "imagenet-p", "--imagenet-p-dir", p,
                           "--baseline-model", "none")) == 0
    r = load(tmp_path / "out")["tiny"]["imagenet-p"]
    assert r["unreadable_parts"] == ["translate"] and r["mfr_over"] == ["gaussian_noise"]
    assert "every item unreadable, not scored**: translate" in (tmp_path / "out" / "report.md").read_text()
    capsys.readouterr()
    for f in p.rglob("*.npy"):
        np.save(f, np.zeros((8, SIZE, SIZE, 3), dtype=np.float32))
    with pytest.warns(UserWarning, match="unreadable"):
        err = run_failing(capsys, *common(tmp_path / "out2", checkpoint, data_root, "--suite", "imagenet-p",
                                          "--imagenet-p-dir", p, "--baseline-model", "none"))
    reason = f"none of the imagenet-p sequences in {p} could be read (4 unreadable)"
    assert f"tiny: imagenet-p not run: {reason}" in err and "no task could run" in err, err
    assert load(tmp_path / "out2")["tiny"]["imagenet-p"] == {"unavailable": reason}


def test_a_result_the_task_now_makes_otherwise_is_not_served_from_the_cache(tmp_path, data_root, checkpoint,
                                                                            capsys, monkeypatch):
    """ImageNet-P with nothing readable was an empty result, cached: a run of today's code under the
    same --out served it again. The task's result_version joins the result's key (not its records'):
    the old result is passed over, and the forward passes cached for a readable one are reused."""
    import dataclasses

    from lkfast.eval import cache, registry

    p = tmp_path / "imagenet-p"
    shutil.copytree(data_root / "imagenet-p", p)
    for f in p.rglob("*.npy"):
        np.save(f, np.zeros((8, SIZE, SIZE, 3), dtype=np.float32))  # nothing readable
    args = common(tmp_path / "out", checkpoint, data_root, "--suite", "imagenet-p", "--imagenet-p-dir", p,
                  "--baseline-model", "none")
    today = registry.TASKS["imagenet-p"]
    assert today.result_version != "1"
    old = dataclasses.replace(today, result_version="1", run=lambda ctx: {"fr": {}, "mfr": None, "mfr_over": []})
    monkeypatch.setitem(registry.TASKS, "imagenet-p", old)  # the code before: an empty result, cached
    assert cli(*args) == 0 and load(tmp_path / "out")["tiny"]["imagenet-p"]["mfr_over"] == []
    monkeypatch.setitem(registry.TASKS, "imagenet-p", today)
    with pytest.warns(UserWarning, match="unreadable"):
        err = run_failing(capsys, *args)
    assert "tiny: imagenet-p not run: none of the imagenet-p sequences" in err, err
    shutil.rmtree(p)
    shutil.copytree(data_root / "imagenet-p", p)  # readable: computed once, then its records are reused
    assert cli(*args) == 0
    first = load(tmp_path / "out")["tiny"]["imagenet-p"]
    bumped = str(int(today.result_version) + 1)
    ran, computed = [], []
    real_run, real_save = today.run, cache.ResultCache.save_shard
    monkeypatch.setitem(registry.TASKS, "imagenet-p", dataclasses.replace(
        today, result_version=bumped, run=lambda ctx: ran.append(1) or real_run(ctx)))
    monkeypatch.setattr(cache.ResultCache, "save_shard", lambda *a, **k: computed.append(1) or real_save(*a, **k))
    assert cli(*args) == 0
    again = load(tmp_path / "out")["tiny"]["imagenet-p"]
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    assert ran == [1] and computed == []  # the result made again, from the records cached


def test_imagenet_9_with_a_variant_missing(tmp_path, data_root, checkpoint):
    nine = tmp_path / "imagenet-9"
    g = torch.Generator().manual_seed(1)
    for variant in ("mixed_same", "mixed_rand"):  # the original variant is not there
        _images(nine / variant / "val", ["00_dog", "01_bird", "02_vehicle"], 1, g)
    out = tmp_path / "out"
    assert cli(*common(out, checkpoint, data_root, "--suite", "imagenet-9", "--imagenet-9-dir", nine)) == 0
    r = load(out)["tiny"]["imagenet-9"]
    assert set(r["top1"]) == {"mixed_same", "mixed_rand"} and r["original"] is None
    assert r["bg_gap"] == pytest.approx(r["top1"]["mixed_same"] - r["top1"]["mixed_rand"])
    # without mixed_rand: the variants there are scored, BG-Gap is None with the reason (not a failed task)
    shutil.rmtree(nine / "mixed_rand")
    _images(nine / "original" / "val", ["00_dog", "01_bird", "02_vehicle"], 1, g)
    out = tmp_path / "out2"
    assert cli(*common(out, checkpoint, data_root, "--suite", "imagenet-9", "--imagenet-9-dir", nine)) == 0
    r = load(out)["tiny"]["imagenet-9"]
    assert set(r["top1"]) == {"original", "mixed_same"} and r["bg_gap"] is None
    assert r["bg_gap_note"] == "needs the mixed_same and mixed_rand variants"


def test_imagenet_a_folder_with_a_class_outside_its_200_fails_naming_it(tmp_path, data_root, checkpoint, capsys):
    """An ImageNet class that is not one of ImageNet-A's 200 (val pointed at as ImageNet-A, a stray
    folder) would be scored as always wrong on the 200 logits: the task fails naming the folder."""
    a_classes = {data.imagenet_classes()[i] for i in data.imagenet_a_indices().tolist()}
    stray = next(w for w in data.imagenet_classes() if w not in a_classes)
    a = tmp_path / "imagenet-a"
    shutil.copytree(data_root / "imagenet-a", a)
    _images(a, [stray], 1, torch.Generator().manual_seed(2))
    err = run_failing(capsys, *common(tmp_path / "out", checkpoint, data_root, "--suite", "imagenet-a",
                                      "--imagenet-a-dir", a))
    assert f"ImageNet-A: class folder(s) {stray} in {a} are not among the 200 ImageNet-A classes of ImageNet-1k: " \
           "give the ImageNet-A release's folder as --imagenet-a-dir (or as imagenet-a/ under --data-root), or move " \
           "these folders out" in err, err
    # an ImageNet-9 folder without its variants: the same words
    nine = tmp_path / "imagenet-9"
    _images(nine, ["00_dog"], 1, torch.Generator().manual_seed(3))
    err = run_failing(capsys, *common(tmp_path / "out9", checkpoint, data_root, "--suite", "imagenet-9",
                                      "--imagenet-9-dir", nine))
    assert f"ImageNet-9: expected <variant>/val/<class>/ folders under {nine} (variants original, " in err and \
        "found 00_dog: give the folder holding the variants as --imagenet-9-dir (or as imagenet-9/ under " \
        "--data-root)" in err, err


def test_imagenet_9_images_are_fed_as_they_are(tmp_path, data_root, checkpoint, monkeypatch):
    # The backgrounds-challenge release scores its 224 x 224 images with transforms.ToTensor() only
    # (MadryLab/backgrounds_challenge tools/datasets.py, in9_eval.py; challenge_eval.py pastes
    # foregrounds onto backgrounds pixel for pixel, so no resize or crop may come between), as
    # ImageNet-C's are fed. Here the images are 40 px and the model's input 32 px (crop_pct 0.95):
    # a resize-and-crop would hand the model 32 x 32 images.
    from lkfast.eval.runner import TaskContext

    seen = []
    forward = TaskContext.forward

    def recording(self, images):
        seen.append(images.detach().cpu().clone())
        return forward(self, images)
    monkeypatch.setattr(TaskContext, "forward", recording)
    out = tmp_path / "out"
    assert cli(*common(out, checkpoint, data_root, "--suite", "imagenet-9")) == 0
    fed = torch.cat(seen)
    expected = torch.cat([torch.stack([x for x, _ in data.ImageNet9(data_root / "imagenet-9", v)])
                          for v in ("original", "mixed_same", "mixed_rand")])
    assert fed.shape == expected.shape == (9, 3, 40, 40)
    assert torch.equal(fed, expected)


def test_one_batch_loaders_decode_in_this_process():
    """loader_for forks no worker processes for a single batch (nothing to overlap, and each fork
    costs copy-on-write faults for every page this process then writes); more batches get --workers."""
    from lkfast.eval.sources import _data_loader, loader_for

    dataset = [(torch.zeros(3, 4, 4), k) for k in range(6)]
    options = EvalOptions(out="unused", data={}, workers=2)
    assert _data_loader(dataset, [[0, 1, 2, 3, 4, 5]], options, "cpu").num_workers == 0
    loader = _data_loader(dataset, [[0, 1, 2], [3, 4, 5]], options, "cpu")
    assert loader.num_workers == 2
    images, targets, indices, skipped = next(iter(loader_for(dataset, [[0, 1, 2, 3, 4, 5]], options, "cpu")))
    assert targets.tolist() == [0, 1, 2, 3, 4, 5] and indices == [0, 1, 2, 3, 4, 5] and skipped == 0


def test_loader_names_the_dataset_index_of_each_kept_item():
    """An unreadable item is dropped, and the batch says which dataset indices it kept (the per-image
    seeds of generated corruptions and the analyses' draws follow them)."""
    from lkfast.eval.sources import loader_for

    dataset = [(None if k in (1, 4) else torch.full((3, 2, 2), float(k)), 10 + k) for k in range(6)]
    options = EvalOptions(out="unused", data={}, workers=0)
    batches = list(loader_for(dataset, [[0, 1, 2], [3, 4, 5]], options, "cpu"))
    assert [b[2] for b in batches] == [[0, 2], [3, 5]]
    assert [b[1].tolist() for b in batches] == [[10, 12], [13, 15]] and [b[3] for b in batches] == [1, 1]
    assert batches[1][0][:, 0, 0, 0].tolist() == [3.0, 5.0]


def test_file_hash_reads_a_file_once_until_it_changes(tmp_path, monkeypatch):
    """A checkpoint's hash (part of every cache key of its model) is read once per process, and read
    again when the file changes."""
    import builtins
    import hashlib

    from lkfast.eval import cache

    path = tmp_path / "weights.pth"
    path.write_bytes(b"first")
    assert cache.file_hash(str(path)) == hashlib.sha256(b"first").hexdigest()[:16]
    real_open, opened = builtins.open, []
    monkeypatch.setattr(builtins, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert cache.file_hash(str(path), 8) == hashlib.sha256(b"first").hexdigest()[:8] and opened == []
    path.write_bytes(b"second!")
    assert cache.file_hash(str(path)) == hashlib.sha256(b"second!").hexdigest()[:16] and opened == [str(path)]


def test_file_fingerprints_see_size_and_time_alone_and_skip_hidden_entries(tmp_path):
    """Cache keys from file stats: file_hash is read again when only the modification time changes
    (same size, other bytes) or only the size (the time set back); files_fingerprint changes with
    either alone; tree_fingerprint is files_fingerprint of the files in sorted order, hidden files and
    folders left out, a linked folder read as its files; stable_hash does not depend on key order."""
    import hashlib

    from lkfast.eval import cache

    path = tmp_path / "weights.pth"
    path.write_bytes(b"first")
    first = cache.file_hash(str(path))
    stamp = path.stat().st_mtime_ns
    path.write_bytes(b"other")  # same size
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    assert cache.file_hash(str(path)) != first
    path.write_bytes(b"longer bytes")
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # same time as the read before, other size
    assert cache.file_hash(str(path)) == hashlib.sha256(b"longer bytes").hexdigest()[:16]

    before = cache.files_fingerprint([path])
    os.utime(path, ns=(stamp, stamp))
    assert cache.files_fingerprint([path]) != before  # the time alone
    before = cache.files_fingerprint([path])
    path.write_bytes(b"longer bytez!")
    os.utime(path, ns=(stamp, stamp))
    assert cache.files_fingerprint([path]) != before  # the size alone

    root = tmp_path / "data"
    names = [f"c{i % 3}/{n:03d}.JPEG" for i, n in enumerate(range(40, 0, -1))]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "a.JPEG").write_bytes(b"y")
    (root / "c9").symlink_to(tmp_path / "linked")
    expected = cache.files_fingerprint(sorted([str(root / n) for n in names] + [str(root / "c9" / "a.JPEG")]))
    assert cache.tree_fingerprint(str(root)) == expected
    counted = []  # a progress bar's updates: every file once, the same fingerprint
    assert cache.tree_fingerprint(str(root), counted.append) == expected and sum(counted) == 41 and counted
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.JPEG").write_bytes(b"z")
    (root / "c0" / ".DS_Store").write_bytes(b"z")
    assert cache.tree_fingerprint(str(root)) == expected
    assert cache.stable_hash({"a": 1, "b": [2]}) == cache.stable_hash({"b": [2], "a": 1})


def test_model_keys_follow_what_the_model_computes(tmp_path):
    """A model's cache key (the folder of all its results) changes with its create_model arguments
    and their values, its --input-size, its output order and its checkpoint's bytes; not with its label."""
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    base = ModelSpec("resnet18", str(weights))
    variants = [ModelSpec("resnet18", str(weights), kwargs=(("num_classes", 10),)),
                ModelSpec("resnet18", str(weights), kwargs=(("num_classes", 9),)),
                ModelSpec("resnet18", str(weights), input_size=160),
                ModelSpec("resnet18", str(weights), logit_order=(1, 0)),
                ModelSpec("resnet18", str(weights), logit_order=(0, 1)),
                ModelSpec("resnet18", None), ModelSpec("resnet34", str(weights))]
    keys = [base.key()] + [v.key() for v in variants]
    assert len(set(keys)) == len(keys), keys
    assert ModelSpec("resnet18", str(weights), label="mine").key() == base.key()


def test_result_cache_paths_and_unreadable_shards(tmp_path):
    """A shard lives under its task and part (two parts with one key do not share a file), names
    become one safe path component, and a shard that cannot be loaded (cut short, not a torch file,
    a pickle holding other objects) reads as missing."""
    store = ResultCache(tmp_path)
    a = store.save_shard("imagenet-c", "snow/3", "k", {"items": {"top1": torch.zeros(1)}, "skipped": 0})
    b = store.save_shard("imagenet-c", "fog/3", "k", {"items": {"top1": torch.ones(1)}, "skipped": 0})
    assert a != b and a.parent.name == "snow_3" and a.parent.parent == tmp_path / "imagenet-c"
    assert torch.equal(store.load_shard("imagenet-c", "snow/3", "k")["items"]["top1"], torch.zeros(1))
    a.write_bytes(a.read_bytes()[:40])
    assert store.load_shard("imagenet-c", "snow/3", "k") is None
    b.write_bytes(b"\x80\x02cbuiltins\nprint\nq\x00.")  # a pickle of a global weights_only refuses
    assert store.load_shard("imagenet-c", "fog/3", "k") is None
    from lkfast.eval.cache import safe_name

    assert [safe_name(n) for n in ("a/b c", "imagenet-c", "x.y_z", "")] == ["a_b_c", "imagenet-c", "x.y_z", "_"]


def test_cache_shards_get_the_mode_the_umask_allows(tmp_path):
    """Shards are written through mkstemp (private 0600 files); in a shared results folder they get
    what a plain open would give (0644 under umask 022), as results.json and the tables do."""
    old = os.umask(0o022)
    try:
        path = ResultCache(tmp_path).save_shard("clean", "val", "k", {"items": {}, "skipped": 0})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_run_that_leaves_out_an_earlier_runs_model_says_so(tmp_path, data_root, checkpoint, capsys):
    """results.json and the report hold one run's models: a second run into the same --out with other
    models names the ones that leave the report and how to keep them (from the cache)."""
    assert cli(*common(tmp_path, checkpoint, data_root, "--suite", "clean")) == 0
    assert "which this run does not evaluate" not in capsys.readouterr().err
    other = common(tmp_path, checkpoint, data_root, "--suite", "clean")
    other[1] = f"test_resnet:{checkpoint}=other"
    assert cli(*other) == 0
    err = capsys.readouterr().err
    assert "results.json held tiny, which this run does not evaluate" in err and "--models" in err
    assert list(load(tmp_path)) == ["other", "_meta"]
    both = common(tmp_path, checkpoint, data_root, "--suite", "clean")
    both[1] = f"test_resnet:{checkpoint}=tiny,test_resnet:{checkpoint}=other"
    assert cli(*both) == 0
    assert "which this run does not evaluate" not in capsys.readouterr().err


def test_a_second_report_into_the_same_out_leaves_no_tables_or_figures_of_the_first(tmp_path, data_root, checkpoint):
    """Tables and figures of tasks the new report does not have are removed (they looked current);
    files of the user's own in those folders are left alone."""
    assert cli(*common(tmp_path, checkpoint, data_root, "--suite", "clean,imagenet-a,imagenet-r")) == 0
    assert (tmp_path / "tables" / "imagenet_a.csv").is_file() and (tmp_path / "figures" / "figure3.png").is_file()
    (tmp_path / "tables" / "my_notes.txt").write_text("mine")
    assert cli(*common(tmp_path, checkpoint, data_root, "--suite", "clean")) == 0
    tables = sorted(p.name for p in (tmp_path / "tables").iterdir())
    assert tables == ["model_card.csv", "model_card.md", "my_notes.txt", "summary.csv", "summary.md"]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["figure1.png"]  # the model card's


def test_loader_workers_started_by_spawn_read_every_dataset(tmp_path, data_root, checkpoint):
    """Loader workers started by "spawn" (macOS, Windows; Python 3.14's "forkserver" on Linux pickles
    too) receive the dataset pickled: ImageNet-P read in a class space of its own was a class made
    inside a function ("Can't pickle local object"). Every disk benchmark, in such a class space,
    with one image per batch so that workers decode, under spawn in a child process (the start
    method is process-wide), gives what decoding in this process gives. (ImageNet-A and -R, whose
    readers are module-level classes as -O's is, are left out, and ImageNet-C keeps one folder: each
    loader's worker imports torch anew.)"""
    root = tmp_path / "data"
    for name in ("val", "imagenet-o", "imagenet-p", "imagenet-9"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).symlink_to(data_root / name)
    (root / "imagenet-c" / "gaussian_noise").mkdir(parents=True)
    (root / "imagenet-c" / "gaussian_noise" / "3").symlink_to(data_root / "imagenet-c" / "gaussian_noise" / "3")
    run = """
import dataclasses, json
from lkfast.eval import EvalOptions, ModelSpec, imagenet_class_space, run_evaluation

def run(checkpoint, root, out, size, workers):
    space = dataclasses.replace(imagenet_class_space(), name="not ImageNet", published_baselines=False)
    tasks = ["clean", "imagenet-o", "imagenet-c", "imagenet-p", "imagenet-9"]
    options = EvalOptions(out=out, data={k: root + "/" + k for k in ["val"] + tasks[1:]}, workers=workers,
                          batch_size=1, progress=False, write_report=False, class_space=space)
    r = run_evaluation([ModelSpec("test_resnet", checkpoint, "tiny", input_size=size)], tasks, options)["tiny"]
    return {t: {k: v for k, v in r[t].items() if k != "seconds"} for t in tasks}
"""
    spawned = run + """
import multiprocessing, sys
multiprocessing.set_start_method("spawn")
print(json.dumps(run(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), 1)))
"""
    done = subprocess.run([sys.executable, "-c", spawned, checkpoint, str(root), str(tmp_path / "spawn"),
                           str(SIZE)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    here = {}
    exec(run, here)
    expected = json.loads(json.dumps(here["run"](checkpoint, str(root), str(tmp_path / "here"), SIZE, 0)))
    assert expected["imagenet-p"]["fp"] and expected["imagenet-c"]["top1"]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
