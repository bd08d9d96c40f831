"""The embedded default (lkfast.eval.default), shrunken: `python -m lkfast.eval` with no models and no
data builds the synthetic benchmark, trains the models, evaluates and reports; a rerun reuses the cache."""
import json
import os

import pytest

pytest.importorskip("lkfast.eval.cli")

import lkfast.eval.default as default  # noqa: E402
from lkfast.data.synthetic import SyntheticConfig  # noqa: E402

TINY = default.DefaultSettings(
    data=SyntheticConfig(train_per_class=3, val_per_class=2, c_per_class=1, p_per_class=1, in9_per_class=2,
                         r_per_class=1, ood_per_class=1, a_pool_per_class=3,
                         corruptions=("gaussian_noise", "contrast"), perturbations=("brightness", "translate")),
    models=(("resnet_tiny", "ResNet-tiny"), ("replknet_tiny_k31", "k31"), ("replknet_tiny_k3", "k3")),
    recipe=("--epochs", "1", "--batch-size", "10", "--max-steps-per-epoch", "2", "--quiet"))


def test_default_run_end_to_end_and_rerun_from_cache(tmp_path, monkeypatch, capsys):
    from lkfast.eval.cli import main

    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default, "DEFAULT", TINY)
    monkeypatch.setattr("sys.argv", ["lkfast.eval"])
    # as on a user's machine (the test suite turns calibration off): the default run fixes the
    # kernel choices itself, so nothing is timed, in training or in the evaluation
    monkeypatch.delenv("LKFAST_CALIBRATE")

    def no_timing(*args):
        raise AssertionError("the embedded default measured kernel timings (a calibration)")

    monkeypatch.setattr("lkfast.ops.cpu_dispatch._calibrated", no_timing)
    out = tmp_path / "report"
    assert main(["--out", str(out), "--no-progress"]) == 0
    assert os.environ["LKFAST_CALIBRATE"] == "0"
    captured = capsys.readouterr()
    printed = captured.out
    assert "synthetic benchmark:" not in captured.err  # --no-progress: no bar while building the data
    assert "| Model | ImageNet |" in printed and "ResNet-tiny" in printed  # the summary table is printed
    results = json.loads((out / "results.json").read_text())
    assert results["_meta"]["options"]["workers"] == 0  # the small images decode in the eval's process
    report = (out / "report.md").read_text()
    tasks = default.default_suite().split(",")
    for label in ("ResNet-tiny", "k31"):
        assert label in results, sorted(results)
        for task in tasks:
            assert task in results[label], (label, task, sorted(results[label]))
    assert 0 <= results["k31"]["clean"]["top1"] <= 100
    for heading in ("ImageNet-A", "ImageNet-C", "ImageNet-O", "ImageNet-P", "ImageNet-R", "ImageNet-9",
                    "## Figure 4: occlusion", "### Figure 5: occlusion examples", "## Figure 6", "## Figure 7",
                    "## Figure 8", "## Figure 9", "## Figure 10", "### Table 5 layout: replknet_tiny",
                    "### Table 7 layout: replknet_tiny"):
        assert heading in report, heading
    assert list((out / "figures").glob("*.png")) and list((out / "tables").glob("*.csv"))
    # the report says at its top what the data is (its sets were labelled ImageNet-A, ... and nothing said
    # they are 64-px shapes), and the notes why mCE / mFR are missing (they said "--baseline-model none",
    # an option nobody had given)
    assert ('**Not ImageNet-1k**: every number here is over the class space "synthetic shapes" (the paper\'s values '
            "are not shown beside them). lkfast's embedded default benchmark (lkfast.data.synthetic): 10 classes of "
            "synthetic shapes drawn at 64x64") in report
    assert "--baseline-model none" not in report
    assert ("mce omitted: the embedded default normalises by no baseline model: its reference ResNet-tiny never "
            f"flips on several perturbations (a zero flip probability cannot normalise), and its ImageNet-C holds "
            f"{TINY.data.c_per_class * 10} of val's {TINY.data.val_per_class * 10} images") in report
    assert results["k31"]["imagenet-p"]["normalisation_note"].startswith("the embedded default normalises by no")
    # the models' outputs are in the class space's order (the readers' labels), not sorted folder names
    from lkfast.data import synthetic

    summaries = list((tmp_path / "cache" / "models").glob("*/summary.json"))
    assert len(summaries) == 3
    for path in summaries:
        assert json.loads(path.read_text())["classes"] == synthetic.class_space()["classes"], path

    # A rerun trains nothing and builds nothing: every cache entry verifies.
    def no_training(argv):
        raise AssertionError(f"retrained on a rerun: {argv}")

    monkeypatch.setattr("lkfast.train.train", no_training)
    monkeypatch.setattr("lkfast.data.synthetic.render", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-rendered")))
    prepared = default.prepare_default(type("Args", (), {"suite": "paper"})(), TINY)
    assert [m.label for m in prepared["models"]] == ["ResNet-tiny", "k31", "k3"]
    assert prepared["class_space"].num_classes == 10
    assert set(prepared["data"]) >= {"val", "imagenet-a", "imagenet-c", "imagenet-o", "imagenet-p", "imagenet-r",
                                     "imagenet-9", "masks"}


def test_default_without_frost_photographs_says_what_to_install_before_building(tmp_path, monkeypatch, capsys):
    """Without the frost photographs (lkfast installed with --no-deps) the default run stops at
    once with one line naming what to install, before any part of the benchmark is built."""
    from lkfast.data import synthetic
    from lkfast.eval.cli import main

    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LKFAST_FROST_DIR", str(tmp_path / "no-frost"))
    with_frost = default.DefaultSettings(data=SyntheticConfig(**{**TINY.data.__dict__, "corruptions": ("frost",)}),
                                         models=TINY.models, recipe=TINY.recipe)
    monkeypatch.setattr(default, "DEFAULT", with_frost)
    monkeypatch.setattr(synthetic, "build_split", lambda *a: pytest.fail("a part was built before the check"))
    assert main(["--out", str(tmp_path / "report"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lkfast.eval: error: frost photographs missing in") and "Traceback" not in err, err
    assert not (tmp_path / "report" / "results.json").exists()


def test_altered_model_file_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path / "cache"))
    small = default.DefaultSettings(data=TINY.data, models=(("resnet_tiny", "ResNet-tiny"),), recipe=TINY.recipe)
    root = default.benchmark_root(small)
    from lkfast.data import synthetic

    synthetic.build_base(root, small.data)
    path = default.ensure_model("resnet_tiny", small, root)
    first = path.read_bytes()
    path.write_bytes(first[: len(first) // 2])  # a partial download or a disk error
    calls = []
    import lkfast.train

    real = lkfast.train.train
    monkeypatch.setattr(lkfast.train, "train", lambda argv: calls.append(argv) or real(argv))
    again = default.ensure_model("resnet_tiny", small, root)
    assert calls, "the truncated weights were trusted"
    assert again.read_bytes() == first  # training is deterministic: the same weights come back


def test_a_new_corruption_version_rebuilds_only_the_corrupted_sets(tmp_path, monkeypatch):
    """The embedded ImageNet-C and -P are renderings of lkfast.corrupt: when its output changes
    (lkfast.corrupt.VERSION), a cache built before must not serve the old images, while the clean
    parts (and so the trained models, keyed on them) stay."""
    import lkfast.corrupt
    from lkfast.data import synthetic

    synthetic.build_base(tmp_path, TINY.data, progress=False)
    said = []
    synthetic.build_base(tmp_path, TINY.data, log=said.append, progress=False)
    assert said == []
    monkeypatch.setattr(lkfast.corrupt, "VERSION", lkfast.corrupt.VERSION + 1)
    synthetic.build_base(tmp_path, TINY.data, log=said.append, progress=False)
    assert sorted(line.split()[3] for line in said) == [str(tmp_path / "imagenet-c"), str(tmp_path / "imagenet-p")]
    assert all(line.endswith("(built for other settings)") for line in said), said


def test_kernel_choices_fixed_unless_the_user_chose(monkeypatch, capsys):
    """fix_kernel_choices turns calibration off when LKFAST_CALIBRATE is unset and keeps the user's
    setting otherwise; the trained models' cache key follows the setting (other kernels, other
    weights), so a model trained under one is not reused under the other."""
    monkeypatch.delenv("LKFAST_CALIBRATE")
    assert default.fix_kernel_choices() == "0" and os.environ["LKFAST_CALIBRATE"] == "0"
    assert "fixed kernel choices" in capsys.readouterr().err
    fixed = default._model_key("resnet_tiny", TINY)
    monkeypatch.setenv("LKFAST_CALIBRATE", "1")
    assert default.fix_kernel_choices() == "1" and os.environ["LKFAST_CALIBRATE"] == "1"
    assert default._model_key("resnet_tiny", TINY) != fixed


def test_the_model_key_follows_the_shipped_table_s_choices_not_its_times(monkeypatch):
    """With fixed choices the trained models depend on which backend the shipped table picks for
    each shape: a table with another choice keys other models; one re-timed to the same choices
    keeps the key (no retraining)."""
    from lkfast.ops import cpu_dispatch as cd

    monkeypatch.setenv("LKFAST_CALIBRATE", "0")
    isa = cd.fingerprint()["isa"]
    row = {"pass": "forward", "key": ["float32", "channels_last", 7, 7, 64, 256, 32, 32], "backend": "cpu",
           "seconds": {"cpu": 0.001, "torch": 0.002}}
    tables = {"base": {isa: {"rows": [row]}},
              "retimed": {isa: {"rows": [dict(row, seconds={"cpu": 0.003, "torch": 0.004})]}},
              "flipped": {isa: {"rows": [dict(row, backend="torch")]}},
              "other_isa": {"not_" + isa: {"rows": [row]}}}
    keys = {}
    for name, table in tables.items():
        monkeypatch.setattr(cd, "_load_table", lambda path, table=table: table)
        keys[name] = default._model_key("resnet_tiny", TINY)
    assert keys["base"] == keys["retimed"]
    assert len({keys["base"], keys["flipped"], keys["other_isa"]}) == 3


def test_the_model_key_follows_the_kernels_sources_and_torch(monkeypatch):
    """The trained models depend on the code that computes the layers: kernels rebuilt from other
    sources (same lkfast version), another PyTorch or lkfast.train drawing otherwise (TRAINING_VERSION)
    key other models; the same code keeps the key."""
    import torch

    from lkfast import _ext

    monkeypatch.setenv("LKFAST_CALIBRATE", "0")
    base = default._model_key("resnet_tiny", TINY)
    assert default._model_key("resnet_tiny", TINY) == base
    monkeypatch.setattr(_ext, "sources", "another-build")
    rebuilt = default._model_key("resnet_tiny", TINY)
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    other_torch = default._model_key("resnet_tiny", TINY)
    monkeypatch.setattr(default, "TRAINING_VERSION", default.TRAINING_VERSION + 1)  # training that draws otherwise
    assert len({base, rebuilt, other_torch, default._model_key("resnet_tiny", TINY)}) == 4


def test_analysis_option_mistakes_are_found_before_the_default_trains(tmp_path, monkeypatch, capsys):
    """With no --models (the embedded default), a --dino-checkpoint that is not a file and a
    --taig-surrogate that is no label of the default's models were checked only after the benchmark
    was built and the models trained (minutes): now they are the one error line before either."""
    from lkfast.eval.cli import main

    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default, "DEFAULT", TINY)

    class Built(Exception):
        pass

    def build_base(*args, **kwargs):
        raise Built  # the first step of the default's building: a correct option gets here
    monkeypatch.setattr(default.synthetic, "build_base", build_base)
    monkeypatch.setattr("lkfast.train.train", lambda *a, **k: pytest.fail("the default trained its models"))
    out = tmp_path / "out"

    def run(*argv):
        argv = [*map(str, argv), "--out", str(out), "--no-progress"]
        monkeypatch.setattr("sys.argv", ["lkfast.eval", *argv])  # the default reads whether --suite was typed
        return main(argv)

    assert run("--dino-checkpoint", tmp_path / "dino.pth") == 2  # the default suite has the occlusion
    assert f"lkfast.eval: error: --dino-checkpoint {tmp_path / 'dino.pth'}: no such file" in capsys.readouterr().err
    assert run("--suite", "clean,taig", "--taig-surrogate", "ResNet") == 2
    assert "--taig-surrogate 'ResNet' (from the option or LKFAST_TAIG_SURROGATE) is not a model label of this " \
           "run: give one of ResNet-tiny, k31, k3" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(Built):  # a label of the default's models passes the check
        run("--suite", "clean,taig", "--taig-surrogate", "ResNet-tiny")


def test_a_second_default_run_into_a_busy_out_stops_before_building(tmp_path, monkeypatch, capsys):
    """The --out lock was taken when the evaluation began: a second `python -m lkfast.eval` into the
    folder a first one was preparing waited on the first one's model training (minutes) before it
    was told another run writes there. It is told before building anything; the lock is held
    through the preparation and the evaluation, and let go after."""
    fcntl = pytest.importorskip("fcntl")
    from lkfast.eval.cli import main

    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default, "DEFAULT", TINY)
    monkeypatch.setattr("sys.argv", ["lkfast.eval"])
    out = tmp_path / "out"
    out.mkdir()

    class Built(Exception):
        pass

    def build_base(*args, **kwargs):  # the default's first step: the lock is held by then
        with open(out / ".lkfast-eval.lock", "a+") as probe:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        raise Built
    monkeypatch.setattr(default.synthetic, "build_base", build_base)
    with open(out / ".lkfast-eval.lock", "a+") as held:  # what a first run holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(str(os.getpid()))
        held.flush()
        assert main(["--out", str(out), "--no-progress"]) == 2  # build_base would raise Built
    assert f"lkfast.eval: error: another python -m lkfast.eval (pid {os.getpid()}) is writing to {out}" \
        in capsys.readouterr().err
    with pytest.raises(Built):
        main(["--out", str(out), "--no-progress"])
    with open(out / ".lkfast-eval.lock", "a+") as after:  # let go when the run ends, however it ends
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_default_checks_its_analysis_options_once_against_what_it_runs(tmp_path, monkeypatch):
    """The analysis options of a default run were checked twice: on its planned run before the
    building, and again on the built one. prepare_default now builds its models and suite from
    planned_run, so the one check before the building is the check of what is evaluated. The
    building and training are faked (paths, no files): the run stops where the evaluation starts."""
    from lkfast.eval import cli

    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default, "DEFAULT", TINY)
    monkeypatch.setattr(default, "fix_kernel_choices", lambda: "0")
    parts = {name: tmp_path / name for name in ("val", "val-masks", "imagenet-c", "imagenet-p", "imagenet-9")}
    monkeypatch.setattr(default.synthetic, "build_base", lambda *a, **k: dict(parts))
    monkeypatch.setattr(default, "ensure_model", lambda name, *a: tmp_path / f"{name}.pth")
    monkeypatch.setattr(default, "ensure_reference_sets",
                        lambda *a: {name: tmp_path / name for name in ("imagenet-a", "imagenet-r", "imagenet-o")})
    checked, evaluated = [], []
    real_check = cli._check_analysis_options
    monkeypatch.setattr(cli, "_check_analysis_options", lambda options, tasks, models: checked.append(
        (tuple(tasks), [spec.display for spec in models])) or real_check(options, tasks, models))

    class Evaluated(Exception):
        pass

    def run_evaluation(models, tasks, options):
        evaluated.append((tuple(tasks), [spec.display for spec in models], [spec.checkpoint for spec in models]))
        raise Evaluated
    monkeypatch.setattr("lkfast.eval.runner.run_evaluation", run_evaluation)
    argv = ["--suite", "clean,taig", "--taig-surrogate", "k31", "--out", str(tmp_path / "out"), "--no-progress"]
    monkeypatch.setattr("sys.argv", ["lkfast.eval", *argv])
    with pytest.raises(Evaluated):
        cli.main(argv)
    assert checked == [(("clean", "taig"), ["ResNet-tiny", "k31", "k3"])]
    assert evaluated == [(("clean", "taig"), ["ResNet-tiny", "k31", "k3"],
                          [str(tmp_path / f"{name}.pth") for name, _ in TINY.models])]


def test_the_default_runs_its_own_suite_unless_one_is_typed(monkeypatch):
    """The CLI's --suite defaults to 'paper'; the embedded default runs its own suite (no TAIG, the
    quick analyses) unless --suite was typed; planned_run says so without building anything."""
    from lkfast.eval.registry import resolve_suite

    args = type("Args", (), {"suite": "paper"})()
    monkeypatch.setattr("sys.argv", ["lkfast.eval", "--out", "x"])
    planned = default.planned_run(args, TINY)
    assert planned["suite"] == resolve_suite(default.default_suite()) and "taig" not in planned["suite"]
    assert [m.label for m in planned["models"]] == ["ResNet-tiny", "k31", "k3"]
    assert default.planned_run(args, default.DefaultSettings(suite="clean,imagenet-a"))["suite"] == \
        resolve_suite("clean,imagenet-a")
    for typed in (["--suite", "paper"], ["--suite=paper"]):
        monkeypatch.setattr("sys.argv", ["lkfast.eval", *typed])
        assert default.planned_run(args, TINY)["suite"] == resolve_suite("paper"), typed
    assert default.planned_run(type("Args", (), {"suite": "clean"})(), TINY)["suite"] == resolve_suite("clean")


def test_the_default_trains_its_models_on_the_eval_s_device(tmp_path, monkeypatch):
    """The default's models were trained without --device, so lkfast.train took CUDA wherever there is
    one: `python -m lkfast.eval --device cpu` on a GPU host trained on GPU 0, and so did `--device
    cuda:1`. They train on the eval's device now (without --device: the eval's default, cuda where there
    is one). A host with two GPUs is faked; the building is too, and the run stops at the first training."""
    import torch

    from lkfast.eval.cli import main

    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default, "DEFAULT", TINY)
    monkeypatch.setattr(default, "fix_kernel_choices", lambda: "0")
    monkeypatch.setattr(default.synthetic, "build_base", lambda *a, **k: {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("sys.argv", ["lkfast.eval"])

    class Trained(Exception):
        pass

    trained = []

    def train(argv):
        trained.append(argv)
        raise Trained

    monkeypatch.setattr("lkfast.train.train", train)
    for given, expected in ((["--device", "cpu"], "cpu"), (["--device", "cuda:1"], "cuda:1"), ([], "cuda")):
        trained.clear()
        with pytest.raises(Trained):
            main([*given, "--out", str(tmp_path / "out"), "--no-progress"])
        argv = trained[0]
        assert argv[0] == default.REFERENCE_MODEL and argv.count("--device") == 1, argv
        assert argv[argv.index("--device") + 1] == expected, (given, argv)


def test_under_torchrun_each_rank_trains_the_default_as_one_process(tmp_path, monkeypatch):
    """Under torchrun every rank prepares the default before the eval joins its process group, and the
    cache's lock lets one of them train each model while the others wait to reuse it. lkfast.train saw
    torchrun's WORLD_SIZE and joined a process group, which the waiting ranks never joined: the run
    hung. It trains as one process now, and torchrun's environment is put back afterwards."""
    from lkfast.eval.cli import main

    monkeypatch.setenv("LKFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default, "DEFAULT", TINY)
    monkeypatch.setattr(default, "fix_kernel_choices", lambda: "0")
    monkeypatch.setattr(default.synthetic, "build_base", lambda *a, **k: {})
    monkeypatch.setattr("sys.argv", ["lkfast.eval"])
    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)

    class Trained(Exception):
        pass

    seen = []

    def train(argv):
        seen.append(os.environ.get("WORLD_SIZE"))
        raise Trained
    monkeypatch.setattr("lkfast.train.train", train)
    with pytest.raises(Trained):
        main(["--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress"])
    assert seen == ["1"] and os.environ["WORLD_SIZE"] == "2"


def test_the_model_key_names_a_gpu_and_keeps_every_cpu_key(monkeypatch):
    """Weights trained on a GPU differ from the CPU's (TF32, other kernels, cuDNN's non-deterministic
    ones): a model trained on one is not reused for a run on the other. The key names the device type
    off the CPU only, so the CPU's keys are the ones made before (computed here as they were), and
    the models cached by earlier runs are reused."""
    import torch

    from lkfast import __version__, _ext
    from lkfast.cache import config_key
    from lkfast.data import synthetic
    from lkfast.ops.cpu_dispatch import table_choices_digest

    monkeypatch.setenv("LKFAST_CALIBRATE", "0")
    before = config_key("model", "resnet_tiny", list(TINY.recipe), TINY.data.key(), __version__,
                        list(synthetic.CLASSES), f"table-{table_choices_digest()}", _ext.sources or "unrecorded",
                        torch.__version__, default.TRAINING_VERSION)
    cpu = default._model_key("resnet_tiny", TINY, "cpu")
    assert cpu == before == default._model_key("resnet_tiny", TINY)
    gpu = default._model_key("resnet_tiny", TINY, "cuda")
    assert gpu != cpu and default._model_key("resnet_tiny", TINY, "cuda:1") == gpu  # the type, not the index
