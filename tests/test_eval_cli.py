"""python -m lkfast.eval's command line before any model or data is touched: how --models and
--baseline-model texts are read, the errors for checkpoints that are not there, and what a
python -m lkfast.train folder given as the checkpoint sets (its input size)."""
from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch

from lkfast.eval.cli import build_parser
from lkfast.eval.models import ModelSpec


def parsed(text, **kwargs):
    spec = ModelSpec.parse(text, **kwargs)
    return spec.name, spec.checkpoint, spec.label


def test_model_spec_name_checkpoint_label():
    assert parsed("replknet_31b:/ckpt/31b.pth=RepLKNet-31B") == ("replknet_31b", "/ckpt/31b.pth", "RepLKNet-31B")
    assert parsed(" resnet50 ") == ("resnet50", None, None)
    assert parsed("resnet50=ResNet-50") == ("resnet50", None, "ResNet-50")
    assert parsed("resnet50:r50.pth") == ("resnet50", "r50.pth", None)


def test_model_spec_checkpoint_path_with_equals_sign(tmp_path):
    # Hydra-style run folders: the '=' belongs to the path, not to a label
    assert parsed("resnet50:/runs/optim.lr=0.1/model.pth") == ("resnet50", "/runs/optim.lr=0.1/model.pth", None)
    assert parsed("resnet50:/runs/optim.lr=0.1/model.pth=R50") == ("resnet50", "/runs/optim.lr=0.1/model.pth", "R50")
    assert parsed("resnet50:runs/a=1/b=2/model.pth") == ("resnet50", "runs/a=1/b=2/model.pth", None)
    # a path ending in "=value" is a checkpoint when it exists, else the value is a label
    folder = tmp_path / "lr=0.1"
    folder.mkdir()
    assert parsed(f"resnet50:{folder}") == ("resnet50", str(folder), None)
    assert parsed(f"resnet50:{folder}=R50") == ("resnet50", str(folder), "R50")
    assert parsed(f"resnet50:{tmp_path / 'lr=0.2'}") == ("resnet50", str(tmp_path / "lr"), "0.2")


def test_models_list_with_a_comma_in_a_checkpoint_path(tmp_path):
    """--models is a comma list; a ',' belongs to a checkpoint path that exists with it (as '=' does)."""
    from lkfast.eval.cli import _split_models

    odd = tmp_path / "runs" / "a,b"
    odd.mkdir(parents=True)
    (odd / "model.pth").write_bytes(b"")
    (tmp_path / "r.pth").write_bytes(b"")
    assert _split_models(f"resnet50:{odd}/model.pth") == [f"resnet50:{odd}/model.pth"]
    assert _split_models(f"resnet50:{odd}/model.pth=R50,vit:{tmp_path}/r.pth,convnext_tiny") == \
        [f"resnet50:{odd}/model.pth=R50", f"vit:{tmp_path}/r.pth", "convnext_tiny"]
    assert _split_models(f"a:{tmp_path}/r.pth,b:{odd}/model.pth") == [f"a:{tmp_path}/r.pth", f"b:{odd}/model.pth"]
    # a ',' before an item's ':' ends a model name, even where the rest names an existing path
    assert _split_models(f"a,b:{tmp_path}/r.pth") == ["a", f"b:{tmp_path}/r.pth"]
    assert _split_models(f"a,b:{odd}/model.pth,c") == ["a", f"b:{odd}/model.pth", "c"]
    # paths that do not exist: every ',' separates, as before
    assert _split_models("a:x,b/m.pth,c, ,") == ["a:x", "b/m.pth", "c"]


def test_model_spec_errors_name_the_option():
    with pytest.raises(ValueError, match=r"^--models: the label after '=' must be non-empty.*'_x'"):
        ModelSpec.parse("resnet50:r.pth=_x")
    with pytest.raises(ValueError, match=r"^--baseline-model: expected name\[:checkpoint\]\[=label\], got ':a.pth'"):
        ModelSpec.parse(":a.pth", source="torchvision", option="--baseline-model")


def test_help_states_the_equals_rule():
    text = re.sub(r"\s+", " ", build_parser().format_help())
    assert "A checkpoint path may hold '=' (runs/lr=0.1/model.pth): text after the last '=' is the label only if " \
           "it has no '/'" in text


def run_cli(capsys, *args):
    from lkfast.eval.cli import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_missing_checkpoint_names_the_option_and_the_model(tmp_path, capsys):
    # checked before any model is built or any checkpoint hashed (the cache key reads the file)
    out = ["--out", tmp_path / "out", "--no-progress", "--workers", 0]
    rc, err = run_cli(capsys, "--models", f"test_resnet:{tmp_path / 'nope.pth'}=tiny", *out)
    assert rc == 2
    assert f"lkfast.eval: error: --models test_resnet (label 'tiny'): checkpoint '{tmp_path / 'nope.pth'}' not found" in err
    assert "Errno" not in err
    rc, err = run_cli(capsys, "--models", "test_resnet", "--baseline-model", "alexnet:/nope/alexnet.pth", *out)
    assert rc == 2
    assert "lkfast.eval: error: --baseline-model alexnet: checkpoint '/nope/alexnet.pth' not found" in err
    assert "Errno" not in err
    # a path ending in '=value' that is not there: the message says how it was read
    rc, err = run_cli(capsys, "--models", f"test_resnet:{tmp_path / 'runs' / 'lr=0.1'}", *out)
    assert rc == 2
    assert (f"--models test_resnet (label '0.1'): checkpoint '{tmp_path / 'runs' / 'lr'}' not found; the text after "
            f"the last '=' was read as the label, and '{tmp_path / 'runs' / 'lr=0.1'}' does not exist either") in err
    assert not (tmp_path / "out").exists()


def test_a_misspelt_task_name_is_one_line_saying_the_closest(tmp_path, capsys):
    """--suite imagenet_a (timm's spelling of the folder) or a typo: one line naming the closest task,
    as a misspelt model name does; a name close to none gets the list alone."""
    out = ["--models", "test_resnet", "--out", tmp_path / "out", "--no-progress"]
    rc, err = run_cli(capsys, "--suite", "clean,imagenet_a,freqency,xyz", *out)
    assert rc == 2
    assert ("lkfast.eval: error: --suite: unknown task name(s) 'imagenet_a', 'freqency', 'xyz' ('imagenet_a': did "
            "you mean 'imagenet-a'?; 'freqency': did you mean 'frequency'?); valid: paper, quick") in err, err
    assert not (tmp_path / "out").exists()


def test_a_misspelt_model_name_is_one_line_before_any_model_runs(tmp_path, capsys):
    """A typo in the second model of --models (or in --baseline-model) was reported only when that
    model's turn came, after the first had been evaluated on everything; now it is the one error
    line, naming the closest names, before anything is written."""
    data = tmp_path / "data" / "val" / "n01440764"
    data.mkdir(parents=True)
    out = tmp_path / "out"
    common = ["--data-root", tmp_path / "data", "--out", out, "--no-progress", "--workers", 0, "--suite", "clean"]
    rc, err = run_cli(capsys, "--models", "test_resnet,convnext_attto", *common)
    assert rc == 2
    assert "lkfast.eval: error: create_model: unknown model 'convnext_attto' (not a RepLKNet name and not in " \
           "timm's registry); did you mean convnext_atto" in err
    assert not out.exists()  # test_resnet was not evaluated first
    rc, err = run_cli(capsys, "--models", "test_resnet", "--baseline-model", "alexnett:/nope.pth", *common)
    assert rc == 2 and "lkfast.eval: error: baseline model 'alexnett' is not a torchvision model; did you mean " \
                       "alexnet?" in err
    rc, err = run_cli(capsys, "--models", "replknet_31:/nope.pth", *common)
    assert rc == 2 and "unknown model 'replknet_31'" in err and "replknet_31b" in err
    rc, err = run_cli(capsys, "--models", "qqqqq", *common)  # no name close to it
    assert rc == 2 and "lkfast.eval: error: create_model: unknown model 'qqqqq' (not a RepLKNet name and not in " \
                       "timm's registry): timm.list_models('PATTERN*') lists the names" in err, err
    assert not out.exists()


def test_analysis_option_mistakes_are_one_line_before_anything_runs(tmp_path, capsys):
    """A --dino-checkpoint that is not there stopped the run at the occlusion's turn (after the
    benchmarks, with "checkpoint not found" naming no option); a --taig-surrogate that is no label
    of the run left TAIG "not run" at its turn. Both are now the one error line up front."""
    (tmp_path / "data" / "val" / "n01440764").mkdir(parents=True)
    out = tmp_path / "out"
    common = ["--models", "test_resnet=R", "--data-root", tmp_path / "data", "--out", out, "--no-progress",
              "--workers", 0]
    rc, err = run_cli(capsys, *common, "--suite", "clean,occlusion", "--dino-checkpoint", tmp_path / "dino.pth")
    assert rc == 2 and f"lkfast.eval: error: --dino-checkpoint {tmp_path / 'dino.pth'}: no such file" in err
    rc, err = run_cli(capsys, *common, "--suite", "clean,taig", "--taig-surrogate", "RR")
    assert rc == 2
    assert "lkfast.eval: error: --taig-surrogate 'RR' (from the option or LKFAST_TAIG_SURROGATE) is not a model " \
           "label of this run: give one of R" in err
    assert not out.exists()


def test_taig_memory_variable_is_read_when_taig_runs_and_a_bad_value_named(tmp_path, capsys, monkeypatch):
    """LKFAST_TAIG_MEMORY_MB was parsed at the import of lkfast.eval.analysis_tasks: 'lots' crashed
    every python -m lkfast.eval (--help too) with a bare float() traceback, and -5 was taken. It is
    read at TAIG's turn, checked up front in a run with TAIG, and refused naming the variable."""
    import subprocess
    import sys

    env = dict(os.environ, LKFAST_TAIG_MEMORY_MB="lots")
    done = subprocess.run([sys.executable, "-c", "import lkfast.eval.analysis_tasks, lkfast.eval.cli"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    from lkfast.eval import analysis_tasks

    for bad in ("lots", "-5", "nan", "inf", ""):
        monkeypatch.setenv("LKFAST_TAIG_MEMORY_MB", bad)
        with pytest.raises(ValueError, match=re.escape(f"LKFAST_TAIG_MEMORY_MB={bad!r}: expected a number of "
                                                       f"megabytes >= 0")):
            analysis_tasks.taig_memory_bytes()
    for good, expected in (("0", 0), ("1.5", 3 * 2 ** 19), ("2048", 2 ** 31)):
        monkeypatch.setenv("LKFAST_TAIG_MEMORY_MB", good)
        assert analysis_tasks.taig_memory_bytes() == expected
    monkeypatch.delenv("LKFAST_TAIG_MEMORY_MB")
    assert analysis_tasks.taig_memory_bytes() == 1024 * 2 ** 20
    (tmp_path / "data" / "val" / "n01440764").mkdir(parents=True)
    out = tmp_path / "out"
    monkeypatch.setenv("LKFAST_TAIG_MEMORY_MB", "lots")
    rc, err = run_cli(capsys, "--models", "test_resnet=R", "--data-root", tmp_path / "data", "--out", out,
                      "--no-progress", "--workers", 0, "--suite", "clean,taig")
    assert rc == 2 and "lkfast.eval: error: LKFAST_TAIG_MEMORY_MB='lots': expected a number of megabytes >= 0" in err
    assert not out.exists()


def test_analysis_options_for_tasks_the_run_does_not_have_are_said_to_be_ignored(tmp_path, capsys):
    """--dino-checkpoint, --taig-surrogate and --analysis-images with a --suite that has none of their
    tasks ran without a word (the tester's --suite clean --dino-checkpoint nothere.pth: exit 0, as if
    used); each is now a warning line. With their tasks in the run, no such line."""
    (tmp_path / "data" / "val" / "n01440764").mkdir(parents=True)
    common = ["--models", "test_resnet=R", "--data-root", tmp_path / "data", "--out", tmp_path / "out",
              "--no-progress", "--workers", 0, "--dry-run"]
    _, err = run_cli(capsys, *common, "--suite", "clean", "--dino-checkpoint", tmp_path / "nothere.pth",
                     "--taig-surrogate", "Nope", "--analysis-images", 3)
    for option, tasks in (("--dino-checkpoint", "occlusion"), ("--taig-surrogate", "taig"),
                          ("--analysis-images", "occlusion / fgsm / pgd / taig / lesion / frequency")):
        assert f"lkfast.eval: warning: {option} is for {tasks}, which this run does not have (--suite clean): " \
               "it is ignored" in err, option
    _, err = run_cli(capsys, *common, "--suite", "clean,pgd", "--analysis-images", 3)
    assert "ignored" not in err


def test_device_mistakes_are_one_line_as_in_train(tmp_path, capsys, monkeypatch):
    """--device is read as python -m lkfast.train reads it (lkfast.train.device_option): CUDA where
    there is none, or a name torch does not know, is the same error line, exit 2, before anything
    runs (the eval passed an unknown name on, to fail later)."""
    from lkfast.train import main as train_main

    a_file = tmp_path / "a_file"
    a_file.write_text("x")  # --out naming a file: were --device accepted, that would be the error
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in {"cuda": "--device cuda: CUDA is not available here; use --device cpu",
                            "cuda:1": "--device cuda:1: CUDA is not available here; use --device cpu",
                            "tpu9": "--device tpu9: expected cpu, cuda or cuda:N",
                            # names torch knows but lkfast cannot run on: were a traceback from model.to()
                            "mps": "--device mps: expected cpu, cuda or cuda:N (lkfast runs on no 'mps' device)",
                            "meta": "--device meta: expected cpu, cuda or cuda:N"}.items():
        rc, err = run_cli(capsys, "--device", device, "--out", a_file)
        assert rc == 2 and f"lkfast.eval: error: {message}" in err, err
        assert train_main(["resnet_tiny", "--data", str(tmp_path), "--device", device]) == 2
        assert f"lkfast.train: error: {message}" in capsys.readouterr().err
    # a CUDA device number the machine does not have: the same kind of line, not a CUDA error later
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    rc, err = run_cli(capsys, "--device", "cuda:2", "--out", a_file)
    assert rc == 2 and "lkfast.eval: error: --device cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1" in err


def test_model_spec_key_of_a_missing_checkpoint_says_so(tmp_path):
    # the API path (run_evaluation with ModelSpec objects) hashes the checkpoint for the cache key
    with pytest.raises(FileNotFoundError, match=r"^model 'A': checkpoint '.*nope\.pth' not found$"):
        ModelSpec("alexnet", str(tmp_path / "nope.pth"), "A", "torchvision").key()
    with pytest.raises(FileNotFoundError, match=r"^model 'resnet50': checkpoint '.*' is a folder"):
        ModelSpec("resnet50", str(tmp_path)).key()
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    assert ModelSpec("resnet50", str(weights)).key().startswith("timm-resnet50-")


def test_a_training_run_is_evaluated_at_its_trained_input_size(tmp_path):
    """A python -m lkfast.train folder trained with --input-size N is evaluated at N, not at the
    model's own size (64 here); the eval's --input-size still decides when given."""
    import json

    from safetensors.torch import save_file

    from lkfast.eval.cli import _models, _with_input_size
    from lkfast.eval.models import load_model, with_training_run
    from lkfast.models import create_model

    def run(name, recipe):
        folder = tmp_path / name
        folder.mkdir()
        model = create_model("replknet_tiny_k7", num_classes=3)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        summary = {"model": "replknet_tiny_k7", "classes": ["a", "b", "c"],
                   "recipe": {"kernel_sizes": None, "num_classes": None, **recipe}}
        (folder / "summary.json").write_text(json.dumps(summary))
        return folder

    trained_at_48, own_size = run("k7_48", {"input_size": 48}), run("k7", {"input_size": None})
    spec, plain = _models([f"replknet_tiny_k7:{trained_at_48}=A,replknet_tiny_k7:{own_size}=B"])
    assert (spec.input_size, dict(spec.kwargs)) == (48, {"num_classes": 3})
    assert plain.input_size is None
    model, config = load_model(spec)
    assert config["input_size"] == (3, 48, 48)
    assert model(torch.rand(1, *config["input_size"])).shape == (1, 3)
    assert load_model(plain)[1]["input_size"] == (3, 64, 64)
    assert spec.key() != dataclasses.replace(spec, input_size=None).key()  # its results are cached apart
    # the eval's --input-size replaces it; set on the spec (the API), it is kept
    assert [s.input_size for s in _with_input_size([spec, plain], 40)] == [40, 40]
    assert [s.input_size for s in _with_input_size([spec, plain], None)] == [48, None]
    assert with_training_run(ModelSpec("replknet_tiny_k7", str(trained_at_48), input_size=56)).input_size == 56


def _training_folder(folder, classes, num_classes, predicts=0):
    """A python -m lkfast.train output of test_resnet with ``num_classes`` outputs trained on the class
    folders ``classes`` (in that output order), whose weights always predict output ``predicts``."""
    import json

    from safetensors.torch import save_file

    from lkfast.models import create_model

    folder.mkdir()
    model = create_model("test_resnet", num_classes=num_classes)
    with torch.no_grad():
        model.get_classifier().weight.zero_()
        model.get_classifier().bias.zero_()[predicts] = 10.0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    summary = {"model": "test_resnet", "classes": list(classes),
               "recipe": {"kernel_sizes": None, "num_classes": num_classes, "input_size": 32}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_a_training_run_on_some_imagenet_classes_is_scored_in_its_class_order(tmp_path, capsys):
    """Trained on three ImageNet class folders (not the first three) with --num-classes 1000, a run's
    outputs 0..2 are those folders in its summary's order: the eval reads them as those classes (it
    read output i as ImageNet class i and scored 0% without a word); class folders that are not
    ImageNet classes are refused, naming them."""
    import json

    from PIL import Image

    from lkfast import data
    from lkfast.eval.cli import _models
    from lkfast.eval.models import load_model

    wnids = data.imagenet_classes()
    trained = [wnids[5], wnids[2], wnids[9]]
    run = _training_folder(tmp_path / "run", trained, 1000, predicts=0)  # always its first class, wnids[5]
    val = tmp_path / "val" / wnids[5]
    val.mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (40, 40), (40 * k, 90, 200)).save(val / f"img{k}.JPEG")
    rc, err = run_cli(capsys, "--models", f"test_resnet:{run}=Learn", "--val-dir", tmp_path / "val", "--suite", "clean",
                      "--out", tmp_path / "out", "--workers", 0, "--no-progress", "--baseline-model", "none")
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "results.json").read_text())["Learn"]["clean"]["top1"] == 100.0

    (spec,) = _models([f"test_resnet:{run}"])
    model, config = load_model(spec)
    x = torch.rand(2, *config["input_size"])
    with torch.no_grad():
        outputs, inner = model(x), model.model((x - model.mean) / model.std)
    for output, wnid in enumerate(trained):
        torch.testing.assert_close(outputs[:, wnids.index(wnid)], inner[:, output])
    assert sorted(spec.logit_order) == list(range(1000))
    assert spec.key() != dataclasses.replace(spec, logit_order=None).key()  # its results are cached apart
    in_order = _training_folder(tmp_path / "first", wnids[:3], 1000)  # ImageNet's own order: nothing to reorder
    assert _models([f"test_resnet:{in_order}"])[0].logit_order is None

    other = _training_folder(tmp_path / "other", ["cat", "dog", wnids[0]], 1000)
    rc, err = run_cli(capsys, "--models", f"test_resnet:{other}", "--val-dir", tmp_path / "val", "--suite", "clean",
                      "--out", tmp_path / "out2", "--workers", 0, "--no-progress")
    assert rc == 2
    assert (f"lkfast.eval: error: model 'test_resnet': it was trained on class folders that are not ImageNet-1k "
            f"classes (cat, dog: the \"classes\" of {other / 'summary.json'}), so its outputs cannot be matched") in err


def _fake_hub_cache(root, name, tag, predicts):
    """The Hugging Face cache layout (as a download leaves it) holding timm's ``name.tag`` weights,
    which always predict ImageNet class ``predicts``."""
    from safetensors.torch import save_file

    import timm

    model = timm.create_model(f"{name}.{tag}")
    with torch.no_grad():
        model.get_classifier().weight.zero_()
        model.get_classifier().bias.zero_()[predicts] = 10.0
    repo = root / f"models--timm--{name}.{tag}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    return model


def test_pretrained_evaluates_timms_published_weights_from_the_local_cache(tmp_path, capsys, monkeypatch):
    """--models NAME without a checkpoint could only be evaluated with random weights (timm's hub
    loading was out of the command's reach); --pretrained loads the published weights, here from the
    Hugging Face cache with the network off, and a cache without them, a RepLKNet name (not on a hub),
    a timm name without published weights and the embedded default are each one error line."""
    import json

    from huggingface_hub import constants
    from PIL import Image

    from lkfast import data

    wnids = data.imagenet_classes()
    _fake_hub_cache(tmp_path / "hub", "test_convnext", "r160_in1k", predicts=7)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    val = tmp_path / "val" / wnids[7]
    val.mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (40, 40), (40 * k, 90, 200)).save(val / f"img{k}.JPEG")
    common = ["--val-dir", tmp_path / "val", "--suite", "clean", "--workers", 0, "--no-progress",
              "--baseline-model", "none"]

    rc, err = run_cli(capsys, "--models", "test_convnext=Pub", "--pretrained", "--out", tmp_path / "out", *common)
    assert rc == 0, err
    assert "random" not in err
    # a name without a tag gets timm's default for it: the run says which, and the tags to pick from
    assert "lkfast.eval: note: model 'Pub': --pretrained loads timm test_convnext.r160_in1k, timm's default for " \
           "'test_convnext'; to evaluate other published weights name their tag (test_convnext.r160_in1k)" in err
    result = json.loads((tmp_path / "out" / "results.json").read_text())["Pub"]
    assert result["clean"]["top1"] == 100.0  # the cached weights' prediction: every image is class 7
    assert result["_model"]["weights"] == "published (--pretrained): timm test_convnext.r160_in1k"
    rc, err = run_cli(capsys, "--models", "test_convnext.r160_in1k=Pub", "--pretrained", "--out", tmp_path / "out",
                      *common)  # the same weights named with their tag: no note, the same cached result
    assert rc == 0 and "note" not in err, err
    assert json.loads((tmp_path / "out" / "results.json").read_text())["Pub"]["_model"]["weights"] == \
        "published (--pretrained): timm test_convnext.r160_in1k"
    assert [p.name for p in (tmp_path / "out" / "cache").iterdir()] == ["timm-test_convnext-hub-r160_in1k"]

    rc, err = run_cli(capsys, "--models", "test_convnext=Pub", "--out", tmp_path / "out", *common)  # without
    assert rc == 0 and "evaluated with random weights (pass test_convnext:CHECKPOINT, or --pretrained" in err
    assert json.loads((tmp_path / "out" / "results.json").read_text())["Pub"]["_model"]["weights"] == \
        "random (no checkpoint)"
    assert sorted(p.name for p in (tmp_path / "out" / "cache").iterdir()) == \
        ["timm-test_convnext-hub-r160_in1k", "timm-test_convnext-random"]  # cached apart

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    rc, err = run_cli(capsys, "--models", "test_convnext", "--pretrained", "--out", tmp_path / "out2", *common)
    assert rc == 2
    err = err.split("\n", 1)[1]  # after the note on the default tag
    assert err.startswith(f"lkfast.eval: error: model 'test_convnext': timm's published weights for 'test_convnext' "
                          f"are neither in the local cache ({tmp_path / 'empty'}) nor reachable")
    assert err.rstrip().endswith("give the file as test_convnext:PATH") and "Traceback" not in err
    assert "HF_HUB_OFFLINE" not in err  # set above: nothing to suggest
    from lkfast.eval.models import hub_unavailable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # not set: the hub's retries cost tens of seconds offline
    assert hub_unavailable("x's weights", OSError("no network"), "pass x:PATH") == (
        f"x's weights are neither in the local cache ({tmp_path / 'empty'}) nor reachable (OSError: no network); "
        "with no network, HF_HUB_OFFLINE=1 says so at once, without the hub's retries; pass x:PATH")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    for models, says in (("test_resnet,replknet_31b", "model 'replknet_31b': the official RepLKNet weights are not on "
                                                       "a hub timm can reach; download them from"),
                         ("cspresnet50d", "model 'cspresnet50d': timm publishes no weights for 'cspresnet50d'"),
                         # published, but not for ImageNet-1k's classes: refused before the download
                         ("convnext_tiny.fb_in22k", "model 'convnext_tiny.fb_in22k': timm's convnext_tiny.fb_in22k has "
                          "a 21841-class head, the benchmarks are scored in 1000 classes: name published weights with "
                          "a 1000-class head (convnext_tiny.fb_in1k, convnext_tiny.fb_in22k_ft_in1k, "),
                         ("test_vit,vit_small_patch16_224.dino", "model 'vit_small_patch16_224.dino': timm's "
                          "vit_small_patch16_224.dino has no classifier head")):
        rc, err = run_cli(capsys, "--models", models, "--pretrained", "--out", tmp_path / "out3", *common)
        assert rc == 2 and err.startswith(f"lkfast.eval: error: --pretrained: {says}"), err
        assert not (tmp_path / "out3").exists()  # before anything ran
    from lkfast.eval.models import published_with_head  # what the note and the refusal offer: 1000-class heads

    offered = set(published_with_head("convnext_tiny", 1000))
    assert {"convnext_tiny.fb_in1k", "convnext_tiny.in12k_ft_in1k"} <= offered
    assert not offered & {"convnext_tiny.fb_in22k", "convnext_tiny.in12k", "convnext_tiny.dinov3_lvd1689m"}
    rc, err = run_cli(capsys, "--pretrained", "--out", tmp_path / "out3")
    assert rc == 2 and "the embedded default (no --models, no data) trains its own models" in err

    import lkfast.eval.runner as runner

    ran = []  # what the run is handed: the baseline too loads published weights, a given checkpoint stays
    monkeypatch.setattr(runner, "run_evaluation", lambda models, tasks, options: ran.append((models, options)) or {})
    (tmp_path / "r.pth").write_bytes(b"")
    rc, err = run_cli(capsys, "--models", f"test_convnext,test_resnet:{tmp_path / 'r.pth'}", "--pretrained", "--out",
            tmp_path / "out4", *common[:-2], "--baseline-model", "squeezenet1_1")
    assert len(ran) == 1, err
    (models, options), = ran
    assert [(m.hub_weights, m.checkpoint) for m in models] == [(True, None), (False, str(tmp_path / "r.pth"))]
    assert options.baseline.name == "squeezenet1_1" and options.baseline.hub_weights


def test_pretrained_baseline_loads_torchvisions_published_weights_from_the_cache(tmp_path, monkeypatch):
    """Under --pretrained the baseline (torchvision) loads its published weights from torch.hub's cache;
    where they are neither cached nor reachable, the error says to pass a local file."""
    import urllib.error

    import torchvision
    import torchvision.models._api as api

    from lkfast.eval.models import WeightsUnavailable, load_model

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(1)
    published = torchvision.models.squeezenet1_1().state_dict()
    torch.save(published, tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth")
    spec = ModelSpec("squeezenet1_1", source="torchvision", pretrained=True)
    model, _ = load_model(spec)
    for key, value in published.items():
        assert torch.equal(model.model.state_dict()[key], value), key
    assert spec.key() == "torchvision-squeezenet1_1-hub-IMAGENET1K_V1"
    assert spec.published_weights() == "torchvision SqueezeNet1_1_Weights.IMAGENET1K_V1"  # the model card's words

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailable, match=r"baseline model 'squeezenet1_1': torchvision's published weights "
                                                 rf"are neither in the local cache \({tmp_path / 'hub' / 'checkpoints'}\) "
                                                 r".* pass --baseline-model squeezenet1_1:PATH \(or --baseline-model "
                                                 r"none: no normalised mFR / mT5D\)"):
        load_model(spec)
    random_weights, _ = load_model(dataclasses.replace(spec, pretrained=False))  # no download attempted
    assert not torch.equal(random_weights.model.state_dict()["features.0.weight"], published["features.0.weight"])


def test_pretrained_gives_the_occlusion_dinos_published_saliency(tmp_path, capsys, monkeypatch):
    """Without --dino-checkpoint (and without masks) the occlusion ran random drops only; under
    --pretrained DINO's published weights give the salient and non-salient drops (cached apart from
    the random-only result), and where they are neither cached nor reachable that is one error line
    before anything runs. A small timm ViT stands in for DINO ViT-S/16 here."""
    import json

    from huggingface_hub import constants
    from PIL import Image

    from lkfast import data
    from lkfast.analysis import occlusion

    from safetensors.torch import save_file

    wnids = data.imagenet_classes()
    model = _fake_hub_cache(tmp_path / "hub", "test_convnext", "r160_in1k", predicts=3)
    weights = tmp_path / "c.safetensors"  # the same model in every run: only DINO changes with --pretrained
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(occlusion, "DINO_MODEL", "test_vit.r160_in1k")
    val = tmp_path / "val" / wnids[3]
    val.mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (48, 48), (40 * k, 90, 200)).save(val / f"img{k}.JPEG")
    common = ["--models", f"test_convnext:{weights}=C", "--val-dir", tmp_path / "val", "--suite", "occlusion",
              "--workers", 0,
              "--no-progress", "--baseline-model", "none", "--out", tmp_path / "out"]

    def saliency():
        return json.loads((tmp_path / "out" / "results.json").read_text())["C"]["occlusion"]

    rc, err = run_cli(capsys, *common)  # no DINO: random drops only, as before
    assert rc == 0, err
    assert saliency()["saliency"] is None and list(saliency()["top1"]) == ["random"]
    rc, err = run_cli(capsys, *common[:-2], "--out", tmp_path / "out2", "--pretrained")
    assert rc == 2 and err.startswith("lkfast.eval: error: --pretrained: the occlusion's salient drops need DINO's "
                                      "published weights (timm test_vit.r160_in1k), which are neither in the local cache"), err
    assert not (tmp_path / "out2" / "results.json").exists()
    _fake_hub_cache(tmp_path / "hub", "test_vit", "r160_in1k", predicts=0)
    rc, err = run_cli(capsys, *common, "--pretrained")
    assert rc == 0, err
    assert saliency()["saliency"] == "dino" and list(saliency()["top1"]) == ["random", "salient", "non_salient"]
    assert saliency()["clean_top1"] == 100.0  # the checkpoint's model, as in the first run


def test_warnings_are_one_line_of_the_command_while_it_runs(tmp_path, monkeypatch):
    """Warnings (an unreadable image skipped, a checkpoint holding EMA weights too) came out as Python
    prints them: file, line number, category and the source line of lkfast's warnings.warn call."""
    import warnings

    import lkfast.eval.runner as runner
    from lkfast.eval import cli

    seen = []
    monkeypatch.setattr(runner, "run_evaluation", lambda models, tasks, options: seen.append(
        warnings.formatwarning(UserWarning("skipping unreadable file 'x.JPEG'"), UserWarning, "/a/b.py", 3)) or {})
    before = warnings.formatwarning
    (tmp_path / "m.pth").write_bytes(b"")
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    cli.main(["--models", f"test_resnet:{tmp_path / 'm.pth'}", "--val-dir", str(tmp_path / "val"), "--out",
              str(tmp_path / "out"), "--suite", "clean", "--no-progress"])
    assert seen == ["lkfast.eval: warning: skipping unreadable file 'x.JPEG'\n"]
    assert warnings.formatwarning is before  # restored: the command's format is not left on its caller


def test_the_occlusions_dino_is_loaded_once_for_all_models(tmp_path, capsys, monkeypatch):
    """Every model's occlusion needs DINO's saliency: with --dino-checkpoint it is loaded once for all
    the models of a run (it was loaded again for each), and again once the file changes. A small
    timm ViT stands in for DINO ViT-S/16."""
    import json

    import timm
    from PIL import Image
    from safetensors.torch import save_file

    from lkfast import analysis, data
    from lkfast.analysis import occlusion

    monkeypatch.setattr(occlusion, "DINO_MODEL", "test_vit.r160_in1k")
    dino = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit.r160_in1k").state_dict().items()}, str(dino))
    for name in "AB":  # two models (two draws of random weights: the same one twice would share its results)
        save_file({k: v.contiguous() for k, v in timm.create_model("test_convnext.r160_in1k").state_dict().items()},
                  str(tmp_path / f"{name}.safetensors"))
    val = tmp_path / "val" / data.imagenet_classes()[3]
    val.mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (48, 48), (40 * k, 90, 200)).save(val / f"img{k}.JPEG")
    loads = []
    real = analysis.load_dino
    monkeypatch.setattr(analysis, "load_dino", lambda *a, **kw: loads.append(a) or real(*a, **kw))

    def run(out):
        rc, err = run_cli(capsys, "--models", ",".join(f"test_convnext:{tmp_path / name}.safetensors={name}" for name in "AB"),
                          "--val-dir", tmp_path / "val", "--suite", "occlusion", "--workers", 0, "--no-progress",
                          "--baseline-model", "none", "--dino-checkpoint", dino, "--out", tmp_path / out)
        assert rc == 0, err
        results = json.loads((tmp_path / out / "results.json").read_text())
        assert [results[label]["occlusion"]["saliency"] for label in "AB"] == ["dino", "dino"]

    run("out")
    assert len(loads) == 1
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit.r160_in1k").state_dict().items()}, str(dino))
    run("out2")  # the file was written again: loaded again, once
    assert len(loads) == 2


def test_the_occlusions_dino_takes_the_evaluated_models_size_and_its_failure_names_it(tmp_path, capsys,
                                                                                      monkeypatch):
    """DINO was fed the evaluated model's images at that model's size, and a ViT built for another size
    refused them: the occlusion failed, saying the evaluated model had. DINO now takes any size on the
    occlusion's 16-px grid, and a failure inside it names DINO. A small timm ViT built for 160 px
    stands in for DINO ViT-S/16 (built for 224 px), the model is evaluated at 64 px."""
    import json

    import timm
    from PIL import Image
    from safetensors.torch import save_file

    from lkfast import data
    from lkfast.analysis import occlusion
    from nets import register_fixed_size_vit

    monkeypatch.setattr(occlusion, "DINO_MODEL", register_fixed_size_vit())
    dino = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(occlusion.DINO_MODEL).state_dict().items()}, str(dino))
    save_file({k: v.contiguous() for k, v in timm.create_model("test_convnext.r160_in1k").state_dict().items()},
              str(tmp_path / "C.safetensors"))
    val = tmp_path / "val" / data.imagenet_classes()[3]
    val.mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (48, 48), (40 * k, 90, 200)).save(val / f"img{k}.JPEG")
    common = ["--models", f"test_convnext:{tmp_path / 'C.safetensors'}=C", "--input-size", 64, "--val-dir",
              tmp_path / "val", "--suite", "occlusion", "--workers", 0, "--no-progress", "--baseline-model", "none",
              "--dino-checkpoint", dino]
    rc, err = run_cli(capsys, *common, "--out", tmp_path / "out")
    assert rc == 0, err
    result = json.loads((tmp_path / "out" / "results.json").read_text())["C"]["occlusion"]
    assert result["saliency"] == "dino" and result["grid"] == [4, 4]
    assert list(result["top1"]) == ["random", "salient", "non_salient"]

    def fails(*args, **kwargs):
        raise RuntimeError("attention went wrong")
    monkeypatch.setattr(occlusion, "dino_attention", fails)
    rc, err = run_cli(capsys, *common, "--out", tmp_path / "out2")
    assert rc == 2 and f"C: occlusion failed: occlusion: the DINO ViT-S/16 that picks the salient patches ({dino}) " \
                       "failed on 64x64 images (RuntimeError: attention went wrong), not the evaluated model" in err, err
    assert "the model failed" not in err


def test_a_1000_class_checkpoint_of_a_family_with_another_default_head_is_built_with_1000(tmp_path):
    """The small families build a 10-class head by default: their 1000-class checkpoint (a
    `python -m lkfast.train --num-classes 1000` run's last.pth, a model.safetensors away from its
    summary.json) was refused with "the checkpoint's classifier has 1000 classes ... evaluate a
    checkpoint with a 1000-class head". The eval builds them with the 1000 it scores in."""
    from lkfast.eval.models import load_model, output_classes
    from lkfast.models import create_model

    source = create_model("resnet_tiny", num_classes=1000).eval()
    path = tmp_path / "last.pth"
    torch.save(source.state_dict(), path)
    model, config = load_model(ModelSpec("resnet_tiny", str(path)))
    assert output_classes(model, config, "cpu") == 1000
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.model(x), source(x), atol=1e-5)


def test_weights_of_another_architecture_name_the_option_that_gave_them(tmp_path, monkeypatch):
    """A --baseline-model or --dino-checkpoint file holding another model's weights was told to change
    "the name before ':' in python -m lkfast.eval --models": each names its own option (--models too)."""
    import timm

    from lkfast.analysis import occlusion
    from lkfast.eval import analysis_tasks
    from lkfast.eval.models import load_model
    from lkfast.models import CheckpointError

    resnet = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), resnet)
    with pytest.raises(CheckpointError) as info:
        load_model(ModelSpec("mobilenet_v3_small", str(resnet), source="torchvision"))
    assert str(info.value).endswith("it looks like the weights of another architecture; pass the torchvision model it "
                                    "was saved from as the name before ':' in --baseline-model (e.g. --baseline-model "
                                    "alexnet:PATH)"), info.value
    with pytest.raises(CheckpointError) as info:
        load_model(ModelSpec("test_convnext", str(resnet)))
    assert str(info.value).endswith("it looks like the weights of another architecture; build the model the "
                                    "checkpoint was saved from (the name before ':' in --models)"), info.value
    monkeypatch.setattr(occlusion, "DINO_MODEL", "test_vit.r160_in1k")
    with pytest.raises(CheckpointError) as info:
        analysis_tasks._dino(str(resnet), "cpu")
    assert str(info.value).endswith("it looks like the weights of another architecture; give --dino-checkpoint (or "
                                    "LKFAST_DINO_CHECKPOINT) the weights of timm's test_vit.r160_in1k (DINO ViT-S/16)")
