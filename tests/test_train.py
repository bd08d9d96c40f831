"""python -m lkfast.train: learns, resumes to the same weights, runs under torchrun with gloo."""
import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from lkfast.data import synthetic as syn
from lkfast.train import TrainError, build_parser, main, train

CLASSES = syn.CLASSES[:4]
FAST = ["--batch-size", "4", "--warmup-epochs", "0", "--lr", "3e-3", "--scale", "1.0", "1.0", "--hflip", "0",
        "--quiet", "--smoothing", "0"]
MODEL = "replknet_tiny_k7"  # a RepLKNet whose 7x7 kernels run through lkfast's op


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """DATA/train (4 shapes x 8 images) and DATA/val (4 x 3), on one background so it is learnable fast."""
    root = tmp_path_factory.mktemp("data")
    for split, count in (("train", 8), ("val", 3)):
        d = syn.render(CLASSES, 0, "train" if split == "train" else "val", count, background_correlation=1.0)
        from PIL import Image

        for k, (image, label) in enumerate(zip(d.images, d.labels)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{k}.png")
    return root


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_training_lowers_the_loss(dataset, tmp_path):
    summary = train([MODEL, "--data", str(dataset), "--out", str(tmp_path), "--epochs", "3", *FAST])
    losses = summary["train_loss"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.1, losses
    assert summary["classes"] == sorted(CLASSES)
    assert 0 <= summary["val_top1"] <= 100
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["train_loss"] == losses
    from lkfast.models import create_model

    model = create_model(MODEL, checkpoint=str(tmp_path / "model.safetensors"), num_classes=4)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 4)


def test_resume_gives_the_uninterrupted_result(dataset, tmp_path):
    recipe = [MODEL, "--data", str(dataset), "--epochs", "2", "--max-steps-per-epoch", "2", "--ema-decay", "0.9",
              "--mixup", "0.2", "--cutmix", "1.0", "--smoothing", "0.1", "--aa", "rand-m9-mstd0.5", *FAST[:-2]]
    whole = train(recipe + ["--out", str(tmp_path / "whole")])
    stopped = train(recipe + ["--out", str(tmp_path / "split"), "--stop-after-epoch", "1"])
    assert stopped == {"stopped_after_epoch": 1}
    assert not (tmp_path / "split" / "model.safetensors").exists()
    assert torch.load(tmp_path / "split" / "last.pth", weights_only=False)["epoch"] == 1
    resumed = train(recipe + ["--out", str(tmp_path / "split")])
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def _top1(out: Path, val: Path) -> float:
    """Top-1 in percent of OUT/model.safetensors on the ImageFolder ``val``, in this process, with the
    evaluation transform python -m lkfast.train uses."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    from lkfast.models import create_model

    model = create_model(MODEL, checkpoint=str(out / "model.safetensors"), num_classes=len(CLASSES))
    config = resolve_data_config({}, model=model)
    transform = create_transform(config["input_size"], is_training=False, interpolation=config["interpolation"],
                                 mean=config["mean"], std=config["std"], crop_pct=config["crop_pct"])
    images = ImageFolder(str(val), transform)
    with torch.no_grad():
        x = torch.stack([image for image, _ in images])
        correct = (model(x).argmax(-1) == torch.tensor(images.targets)).sum().item()
    return 100.0 * correct / len(images)


def test_torchrun_two_processes_gloo(dataset, tmp_path):
    # 5 val images on 2 processes: each is counted once (DistributedSampler's padding counted one twice)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train").symlink_to(dataset / "train")
    first_two = [sorted((dataset / "val" / name).iterdir())[:2] for name in sorted(CLASSES)]
    for path in first_two[0] + [paths[0] for paths in first_two[1:]]:  # every class, one twice
        (data / "val" / path.parent.name).mkdir(parents=True, exist_ok=True)
        (data / "val" / path.parent.name / path.name).symlink_to(path)
    assert len(list((data / "val").glob("*/*.png"))) == 5
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # gloo for --device cpu, also on a GPU host (gpu_check.sh's)
    env.pop("LKFAST_TRAIN_BACKEND", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lkfast.train", MODEL, "--data", str(data), "--out", str(out), "--epochs", "1",
           "--device", "cpu", *FAST]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert np.isfinite(summary["train_loss"]).all()
    assert set(_weights(out)) == set(torch.load(out / "last.pth", weights_only=False)["model"])
    assert summary["val_images"] == 5
    assert summary["val_top1"] == pytest.approx(_top1(out, data / "val"))


def test_help_and_bad_input(dataset, tmp_path, capsys):
    text = build_parser().format_help()
    assert "torchrun" in text and "--kernel-sizes" in text and "replknet_3b" in text
    flat = " ".join(text.split())  # every default is shown (--epochs and --batch-size were not)
    for shown in ("--epochs EPOCHS epochs to train (default: 30)", "images per step, per process (default: 64)",
                  "--lr LR peak learning rate (default: 0.002)", "(default: 0.0)", "(default: runs/<model>)"):
        assert shown in flat, shown
    assert "(default: None)" not in flat and "(default: False)" not in flat
    with pytest.raises(TrainError, match="does not take --kernel-sizes"):
        train([MODEL, "--data", str(dataset), "--out", str(tmp_path), "--kernel-sizes", "31", "--quiet"])
    (tmp_path / "train").mkdir()
    with pytest.raises(TrainError, match="no class folders"):
        train([MODEL, "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"])


def test_device_mistakes_raise_train_error(dataset, tmp_path, monkeypatch):
    """train() raises TrainError for a mistake in the command, as its docstring says (plain
    ValueError is an unknown model name): --device is one, the name unknown or CUDA absent."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = [MODEL, "--data", str(dataset), "--out", str(tmp_path / "o"), "--quiet"]
    with pytest.raises(TrainError, match="--device cuda: CUDA is not available here"):
        train([*run, "--device", "cuda"])
    with pytest.raises(TrainError, match="--device tpu9: expected cpu, cuda or cuda:N"):
        train([*run, "--device", "tpu9"])
    assert not (tmp_path / "o").exists()


def test_no_progress_keeps_the_epoch_lines(dataset, tmp_path, capsys):
    """--no-progress drops the progress bar only (lkfast.eval passes it for the embedded default's
    training under its own --no-progress); --quiet drops the per-epoch lines too."""
    recipe = [MODEL, "--data", str(dataset), "--epochs", "1", "--max-steps-per-epoch", "2", *FAST[:-3], "--smoothing", "0"]
    train(recipe + ["--out", str(tmp_path / "a")])
    shown = capsys.readouterr().err
    assert "%|" in shown and "lkfast.train: replknet_tiny_k7: epoch 1" in shown  # bar and epoch line
    train(recipe + ["--out", str(tmp_path / "b"), "--no-progress"])
    shown = capsys.readouterr().err
    assert "%|" not in shown and "lkfast.train: replknet_tiny_k7: epoch 1" in shown
    train(recipe + ["--out", str(tmp_path / "c"), "--quiet"])
    assert "lkfast.train" not in capsys.readouterr().err


def test_bad_malloc_setting_is_named_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LKFAST_MALLOC", "bogus")
    assert main([MODEL, "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "lkfast.train: error: LKFAST_MALLOC='bogus': expected one of keep, default" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_mistakes_are_one_line_and_exit_2(dataset, tmp_path, capsys, monkeypatch):
    """Each was a traceback (or exit 1): an unknown model, CUDA where there is none, --batch-size 0
    (ZeroDivisionError), --out naming a file (FileExistsError after an epoch), --data that is not there
    (said as 'no class folders'). Nothing is written for any of them."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    run = ["--data", str(dataset), "--out", str(tmp_path / "o"), "--epochs", "1", "--max-steps-per-epoch", "1", *FAST]
    expected = {
        ("resnet188", *run): "create_model: unknown model 'resnet188'",
        (MODEL, *run, "--device", "cuda"): "--device cuda: CUDA is not available here; use --device cpu",
        (MODEL, *run, "--device", "tpu9"): "--device tpu9: expected cpu, cuda or cuda:N",
        (MODEL, *run, "--batch-size", "0"): "--batch-size must be at least 1, got 0",
        (MODEL, *run, "--num-classes", "2"): "--num-classes 2 is fewer than the 4 class folders of",
        (MODEL, *run, "--epochs", "0"): "--epochs must be at least 1, got 0",
        (MODEL, *run, "--workers", "-1"): "--workers must be at least 0, got -1",
        (MODEL, *run, "--input-size", "4"): "--input-size must be at least 8, got 4",
        ("vit_tiny_p8", *run, "--input-size", "48"): "vit_tiny_p8 takes 64x64 inputs only (its patch embedding is "
                                                     "built for that size): pass --input-size 64 or leave --input-size out",
        ("convnext_atto", *run, "--kernel-sizes", "30"): "--kernel-sizes must be odd (3, 5, 7, ...), got 30",
        (MODEL, *run, "--ema-decay", "1.5"): "--ema-decay must be in [0, 1) (0 turns EMA off, e.g. 0.999), got 1.5",
        (MODEL, *run, "--ema-decay", "1"): "--ema-decay must be in [0, 1)",
        (MODEL, *run, "--smoothing", "1"): "--smoothing must be in [0, 1) (0 turns it off), got 1.0",
        (MODEL, *run, "--smoothing", "-0.5"): "--smoothing must be in [0, 1)",
        (MODEL, *run, "--drop-path", "2"): "--drop-path must be in [0, 1) (0 off, e.g. 0.1), got 2.0",
        (MODEL, *run, "--hflip", "2"): "--hflip must be in [0, 1] (a probability), got 2.0",
        (MODEL, *run, "--mixup-prob", "2"): "--mixup-prob must be in [0, 1] (a probability), got 2.0",
        (MODEL, *run, "--mixup", "-1"): "--mixup must be at least 0 (0 off, ConvNeXt used 0.8), got -1.0",
        (MODEL, *run, "--cutmix", "nan"): "--cutmix must be at least 0",
        (MODEL, *run, "--color-jitter", "-1"): "--color-jitter must be at least 0 (0 off, e.g. 0.4), got -1.0",
        (MODEL, *run, "--warmup-epochs", "-3"): "--warmup-epochs must be at least 0 (0 for no warm-up), got -3.0",
        (MODEL, *run, "--weight-decay", "-1"): "--weight-decay must be at least 0 (0 for none), got -1.0",
        (MODEL, *run, "--lr", "0"): "--lr must be more than 0 (the peak learning rate), got 0.0",
        (MODEL, *run, "--min-lr", "1"): "--min-lr 1.0 is above --lr 0.003: the cosine schedule falls from --lr to",
        (MODEL, *run, "--scale", "-1", "0"): "--scale -1.0 0.0: expected MIN MAX with 0 < MIN <= MAX <= 1",
        (MODEL, *run, "--scale", "1", "0.5"): "--scale 1.0 0.5: expected MIN MAX with 0 < MIN <= MAX <= 1",
        (MODEL, *run, "--aa", "nosuch"): "--aa nosuch: not a timm auto-augment policy (Unknown AA policy nosuch); "
                                         "expected e.g. rand-m9-mstd0.5-inc1 (RandAugment)",
        (MODEL, *run, "--opt", "nosuchopt"): "--opt nosuchopt: not a timm optimiser; expected one of adabelief, ",
        (MODEL, *run, "--device", "meta"): "--device meta: expected cpu, cuda or cuda:N (lkfast runs on no 'meta' device)",
        (MODEL, *run, "--classes", ",".join(CLASSES[:3])): "--classes must name each class folder of",
        (MODEL, *run, "--classes", ",".join(CLASSES + CLASSES[:1])): "--classes must name each class folder of",
        (MODEL, *run, "--out", str(a_file)): f"--out {a_file} is a file: give a folder",
        (MODEL, *run, "--out", str(a_file / "o")): f"--out {a_file / 'o'}: cannot create the folder (Not a directory",
        (MODEL, *run, "--data", str(tmp_path / "nonexist")): f"--data {tmp_path / 'nonexist'}: no such folder",
        (MODEL, *run, "--data", str(tmp_path)): f"--data {tmp_path} has no train/ folder: expected DATA/train/<class>",
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, message in expected.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert f"lkfast.train: error: {message}" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as usage:  # argparse's own: usage and 2, like the eval's
        main([MODEL, "--data", str(dataset), "--epochs", "x"])
    assert usage.value.code == 2


def test_sigterm_stops_training_as_ctrl_c_does(dataset, tmp_path, capsys, monkeypatch):
    """SIGTERM (Slurm's stop at a time limit or on preemption, torchrun stopping its workers) ended
    the process without a word; it now stops training as Ctrl-C does, exit status 143, saying how to
    resume, and the handler before is put back."""
    import os
    import signal

    import lkfast.train as train_module

    evaluations = []

    def terminated_in_epoch_2(*args):
        evaluations.append(1)
        if len(evaluations) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return 50.0, 12

    monkeypatch.setattr(train_module, "evaluate", terminated_in_epoch_2)
    out = tmp_path / "o"
    before = signal.getsignal(signal.SIGTERM)
    run = [MODEL, "--data", str(dataset), "--out", str(out), "--epochs", "3", "--max-steps-per-epoch", "1", *FAST]
    assert main(run) == 143  # in epoch 2's validation: its training is saved already
    assert capsys.readouterr().err.strip() == (f"lkfast.train: terminated (SIGTERM); rerun the same command to "
                                               f"resume from {out / 'last.pth'} (epoch 2)")
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_says_how_to_resume(dataset, tmp_path, capsys, monkeypatch):
    import lkfast.train as train_module

    evaluations = []

    def interrupted_in_epoch_2(*args):
        evaluations.append(1)
        if len(evaluations) == 2:
            raise KeyboardInterrupt
        return 50.0, 12

    monkeypatch.setattr(train_module, "evaluate", interrupted_in_epoch_2)
    out = tmp_path / "o"
    run = [MODEL, "--data", str(dataset), "--out", str(out), "--epochs", "3", "--max-steps-per-epoch", "1", *FAST]
    assert main(run) == 130  # in epoch 2's validation: its training is saved already
    err = capsys.readouterr().err
    assert err.strip() == (f"lkfast.train: interrupted; rerun the same command to resume from {out / 'last.pth'} "
                           f"(epoch 2)")
    evaluations[:] = [1]  # the next validation, epoch 1's, is interrupted
    assert main(run + ["--no-resume"]) == 130  # its first epoch replaced last.pth: epoch 1 of the new run
    assert f"rerun it without --no-resume to resume from {out / 'last.pth'} (epoch 1)" in capsys.readouterr().err

    def interrupted_while_building(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_make_model", interrupted_while_building)
    assert main(run[:3] + ["--out", str(tmp_path / "p")] + run[5:]) == 130
    assert capsys.readouterr().err.strip() == ("lkfast.train: interrupted before an epoch was saved; rerun the same "
                                               "command to start again")


def test_an_odd_batch_is_mixed_but_its_last_image_and_smoothed():
    """timm's Mixup takes even batches: an odd batch's first images are mixed as a batch of their own,
    the last keeps its label, smoothed like the others (not a plain one-hot target)."""
    from timm.data import Mixup

    from lkfast.train import mix_batch

    mixup = Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    x, y = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2])
    np.random.seed(0)
    mixed_x, mixed_y = mix_batch(mixup, x.clone(), y, 4, 0.1)
    np.random.seed(0)  # the same draws for the even part alone
    expected_x, expected_y = mixup(x[:2].clone(), y[:2])
    torch.testing.assert_close(mixed_x, torch.cat([expected_x, x[2:]]), rtol=0, atol=0)
    torch.testing.assert_close(mixed_y[:2], expected_y, rtol=0, atol=0)
    assert not torch.equal(expected_y, torch.tensor([[0.925, 0.025, 0.025, 0.025], [0.025, 0.925, 0.025, 0.025]]))
    torch.testing.assert_close(mixed_y[2], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    np.random.seed(0)  # an even batch is timm's Mixup of the whole batch, its last image mixed too
    even_x, even_y = mix_batch(mixup, x[:2].clone(), y[:2], 4, 0.1)
    torch.testing.assert_close(even_x, expected_x, rtol=0, atol=0)
    torch.testing.assert_close(even_y, expected_y, rtol=0, atol=0)
    single_x, single_y = mix_batch(mixup, x[:1].clone(), y[:1], 4, 0.1)  # a last batch of one
    torch.testing.assert_close(single_x, x[:1], rtol=0, atol=0)
    torch.testing.assert_close(single_y, torch.tensor([[0.925, 0.025, 0.025, 0.025]]))


def test_an_ema_added_on_resume_starts_from_the_resumed_weights(dataset, tmp_path):
    recipe = [MODEL, "--data", str(dataset), "--out", str(tmp_path), "--epochs", "2", "--max-steps-per-epoch", "1",
              *FAST]
    train(recipe + ["--stop-after-epoch", "1"])  # no EMA kept
    resumed = torch.load(tmp_path / "last.pth", weights_only=False)["model"]
    train(recipe + ["--ema-decay", "0.5"])  # one step (step 2: timm's decay applies): halfway from where it started
    final = torch.load(tmp_path / "last.pth", weights_only=False)["model"]
    exported = _weights(tmp_path)
    floats = [k for k, v in resumed.items() if v.is_floating_point()]
    assert floats and set(floats) <= set(exported)
    assert any(not torch.equal(resumed[key], final[key]) for key in floats)
    for key in floats:
        torch.testing.assert_close(exported[key], 0.5 * resumed[key] + 0.5 * final[key], msg=key)


def test_resume_refuses_another_kernel_size_or_class_order(dataset, tmp_path):
    """A resumed run with another kernel size, class order, class count or model is refused by name
    (without their checks the last two end in a load_state_dict traceback)."""
    run = ["--data", str(dataset), "--epochs", "2", "--max-steps-per-epoch", "1", *FAST]
    out = ["--out", str(tmp_path / "convnext")]
    train(["convnext_atto", "--kernel-sizes", "7", *run, *out, "--stop-after-epoch", "1"])
    with pytest.raises(TrainError, match=r"last\.pth holds a run built differently: --kernel-sizes 7 \(this command: "
                                         r"--kernel-sizes 5\)\. Resume with its settings, or use another --out"):
        train(["convnext_atto", "--kernel-sizes", "5", *run, *out])
    with pytest.raises(TrainError, match=r"--kernel-sizes 7 \(this command: no --kernel-sizes\)"):
        train(["convnext_atto", *run, *out])
    saved = ",".join(sorted(CLASSES))
    other = ",".join(sorted(CLASSES, reverse=True))
    out = ["--out", str(tmp_path / "replknet")]
    train([MODEL, *run, *out, "--stop-after-epoch", "1"])
    with pytest.raises(TrainError, match=f"holds a run built differently: the class order {saved} \\(this command: "
                                         f"{other}; pass --classes {saved}\\)"):
        train([MODEL, *run, *out, "--classes", other])
    with pytest.raises(TrainError, match=r"holds a run built differently: 4 classes \(this command: 6\)"):
        train([MODEL, *run, *out, "--num-classes", "6"])
    with pytest.raises(TrainError, match=f"holds a run built differently: model {MODEL} \\(this command: resnet_tiny\\)"):
        train(["resnet_tiny", *run, *out])
    assert torch.load(tmp_path / "replknet" / "last.pth", weights_only=False)["epoch"] == 1  # untouched
    assert train([MODEL, *run, *out, "--classes", saved])["classes"] == sorted(CLASSES)  # the same order resumes


def test_a_finished_run_is_left_alone_and_changed_settings_are_named(dataset, tmp_path, capsys):
    """Rerun on a finished --out, a command (here with another --lr and --batch-size) said nothing
    under --quiet, exited 0 and rewrote summary.json with its own recipe, as if that had trained the
    weights. Now it says the run is finished and that those settings were not used; resuming an
    unfinished run with another recipe names the settings that change."""
    run = [MODEL, "--data", str(dataset), "--out", str(tmp_path), "--epochs", "1", "--max-steps-per-epoch", "1", *FAST]
    first = train(run)
    capsys.readouterr()
    files = {name: (tmp_path / name).read_bytes() for name in ("model.safetensors", "summary.json")}
    again = train(run + ["--batch-size", "2", "--lr", "0.1"])
    err = capsys.readouterr().err
    assert again == json.loads(files["summary.json"]) and again["recipe"] == first["recipe"]
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    assert (f"lkfast.train: {tmp_path} already finished (1/1 epochs): nothing to do (pass --epochs N to train longer, "
            f"or another --out)") in err
    assert (f"warning: this command's settings differ from the finished run's in {tmp_path / 'last.pth'} and were "
            f"not used: --batch-size 2 (saved run: 4); --lr 0.1 (saved run: 0.003) (pass --no-resume") in err
    assert train(run)["recipe"] == first["recipe"]  # the same command: no warning
    assert "warning" not in capsys.readouterr().err

    out = tmp_path / "unfinished"
    run = [MODEL, "--data", str(dataset), "--out", str(out), "--epochs", "2", "--max-steps-per-epoch", "1", *FAST]
    train(run + ["--stop-after-epoch", "1"])
    capsys.readouterr()
    assert train(run + ["--lr", "0.01"])["recipe"]["lr"] == 0.01
    assert (f"warning: this command's settings differ from the run's in {out / 'last.pth'}: --lr 0.01 (saved run: "
            f"0.003); its remaining epochs train with this command's") in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_output_file_has_the_mode_the_umask_allows(dataset, tmp_path, umask):
    """model.safetensors was 0600 (safetensors writes through a private temporary file) while
    last.pth and summary.json were 0644 under umask 022."""
    previous = os.umask(umask)
    try:
        train([MODEL, "--data", str(dataset), "--out", str(tmp_path / "o"), "--epochs", "1", "--max-steps-per-epoch",
               "1", *FAST])
    finally:
        os.umask(previous)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in (tmp_path / "o").iterdir()}
    assert modes == {name: oct(0o666 & ~umask) for name in ("last.pth", "model.safetensors", "summary.json")}


def test_a_class_order_and_a_class_count_are_what_the_run_saves(dataset, tmp_path):
    """--classes (spaces around names allowed) is the label order: summary.json and last.pth record it
    as given, not sorted; --num-classes wider than the folders is the model's output count; a val
    folder lacking one of the classes is refused before training; dead temporaries of a killed save
    are removed from OUT, and only those (any .<x>.tmp<digits> was: a user's file too)."""
    order = sorted(CLASSES, reverse=True)
    out = tmp_path / "o"
    out.mkdir()
    dead = out / ".last.pth.0123abcd.tmp999999999"  # write_atomic's name, its process gone
    dead.write_bytes(b"partial")
    users = [".notes.tmp999999999", ".last.pth.tmp999999999", ".last.pth.0123ABCD.tmp999999999",
             ".notes.0123abcd.tmp999999999"]  # not write_atomic's, or not of a file lkfast.train writes
    for name in users:
        (out / name).write_text("the user's")
    run = [MODEL, "--data", str(dataset), "--epochs", "1", "--max-steps-per-epoch", "1", *FAST]
    summary = train([*run, "--out", str(out), "--classes", " , ".join(order), "--num-classes", "6"])
    assert summary["classes"] == order and json.loads((out / "summary.json").read_text())["classes"] == order
    state = torch.load(out / "last.pth", weights_only=False)
    assert state["classes"] == order and state["num_classes"] == 6
    assert _weights(out)["head.weight"].shape[0] == 6
    assert not dead.exists() and all((out / name).read_text() == "the user's" for name in users)
    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    (data / "train").symlink_to(dataset / "train")
    for name in CLASSES[1:]:
        (data / "val" / name).symlink_to(dataset / "val" / name)
    with pytest.raises(TrainError, match=f"{data / 'val'} lacks a folder for the class\\(es\\) {CLASSES[0]} of "):
        train([MODEL, "--data", str(data), "--out", str(tmp_path / "p"), "--epochs", "1", *FAST])
    assert not (tmp_path / "p").exists()


def test_val_lacking_a_class_and_empty_class_folders_are_named(dataset, tmp_path, capsys):
    """val/ lacking a class of train/ was blamed on --classes (not given); an empty class folder, in
    train/ or val/, was torchvision's 'Found no valid file for the classes X', naming no folder. Each
    is now one line naming the folder and the fix (val/ being optional), before anything is written."""
    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    (data / "train").symlink_to(dataset / "train")
    for name in CLASSES[1:]:
        (data / "val" / name).symlink_to(dataset / "val" / name)
    run = [MODEL, "--data", str(data), "--out", str(tmp_path / "o"), "--epochs", "1", *FAST]
    expected = [f"{data / 'val'} lacks a folder for the class(es) {CLASSES[0]} of {data / 'train'}: add one holding "
                f"its validation images, or remove {data / 'val'} (val/ is optional: no accuracy is reported then)"]
    (data / "val" / CLASSES[0]).mkdir()  # there, but empty (a .txt is no image)
    (data / "val" / CLASSES[0] / "notes.txt").write_text("x")
    expected.append(f"no image (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp) in {data / 'val' / CLASSES[0]}: "
                    f"add that class's validation images, or remove {data / 'val'} (val/ is optional")
    train_dir = tmp_path / "data2" / "train"
    train_dir.mkdir(parents=True)
    for name in CLASSES[:2]:
        (train_dir / name).symlink_to(dataset / "train" / name)
    (train_dir / "zz_empty").mkdir()
    expected.append(f"no image (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp) in {train_dir / 'zz_empty'}: each "
                    f"folder of {train_dir} is a class; add its images or delete the folder")
    for k, message in enumerate(expected):
        argv = run if k < 2 else [*run[:2], str(train_dir.parent), *run[3:]]
        if k == 0:
            (data / "val" / CLASSES[0]).rename(tmp_path / "aside")
        elif k == 1:
            (tmp_path / "aside").rename(data / "val" / CLASSES[0])
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"lkfast.train: error: {message}" in err and "--classes" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_the_model_gets_the_commands_settings_and_evaluation_leaves_it_training():
    """_make_model passes --drop-path (the last block pair at the full rate) and the class count;
    evaluate() puts a training model back in training mode (else every epoch after the first would
    train with frozen BN statistics and no drop path)."""
    from timm.layers import DropPath

    from lkfast.train import _make_model, evaluate

    args = build_parser().parse_args([MODEL, "--data", "x", "--drop-path", "0.3"])
    model = _make_model(args, 5)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.3) and model.training
    assert model.head.out_features == 5
    loader = [(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))]
    top1, count = evaluate(model, loader, torch.device("cpu"))
    assert count == 2 and 0 <= top1 <= 100 and model.training
    assert evaluate(model.eval(), loader, torch.device("cpu"))[1] == 2 and not model.training


def test_amp_trains_and_validates_in_bf16_on_the_cpu_and_keeps_fp32_weights(dataset, tmp_path, monkeypatch):
    """--amp on the CPU: the forward passes (training and validation) run under bf16 autocast, the
    large kernels go through lkfast's op in bf16, the weights stay fp32; it trains other weights than
    the fp32 run, to the same weights when interrupted and resumed; --amp is part of the recipe."""
    import lkfast.ops.depthwise as op
    import lkfast.train as train_module
    from lkfast.train import amp_settings

    assert amp_settings(torch.device("cpu"), True)[0] == torch.bfloat16
    assert not amp_settings(torch.device("cpu"), True)[1].is_enabled()  # bf16 needs no loss scaling
    assert amp_settings(torch.device("cpu"), False)[0] is None
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else nullcontext():
        assert amp_settings(torch.device("cuda"), True)[0] == torch.float16  # (its scaler: the next test)
    assert amp_settings(torch.device("cpu"), True, "float16")[1].is_enabled()  # fp16 scales the loss
    dtype, scaler = amp_settings(torch.device("cuda"), True, "bfloat16")
    assert dtype == torch.bfloat16 and not scaler.is_enabled()

    seen = {"op": set(), "train": set(), "eval": set()}
    check = op._check_inputs
    monkeypatch.setattr(op, "_check_inputs", lambda x, w, b: (seen["op"].add(x.dtype), check(x, w, b))[1])
    make = train_module._make_model

    def spied(args, num_classes):
        model = make(args, num_classes)
        model.register_forward_hook(lambda m, i, out: seen["train" if m.training else "eval"].add(out.dtype))
        return model
    monkeypatch.setattr(train_module, "_make_model", spied)
    recipe = [MODEL, "--data", str(dataset), "--epochs", "2", "--max-steps-per-epoch", "2", *FAST]
    summary = train(recipe + ["--amp", "--out", str(tmp_path / "amp")])
    assert seen == {"op": {torch.bfloat16}, "train": {torch.bfloat16}, "eval": {torch.bfloat16}}
    assert summary["recipe"]["amp"] is True and all(np.isfinite(summary["train_loss"]))
    amp = _weights(tmp_path / "amp")
    assert {t.dtype for t in amp.values() if t.is_floating_point()} == {torch.float32}
    train(recipe + ["--out", str(tmp_path / "fp32")])
    assert any(not torch.equal(amp[k], t) for k, t in _weights(tmp_path / "fp32").items())
    assert train(recipe + ["--amp", "--out", str(tmp_path / "split"), "--stop-after-epoch", "1"]) == {
        "stopped_after_epoch": 1}
    train(recipe + ["--amp", "--out", str(tmp_path / "split")])
    for key, value in _weights(tmp_path / "split").items():
        torch.testing.assert_close(value, amp[key], rtol=1e-5, atol=1e-6, msg=key)

    from lkfast.train import _recipe_differences

    saved = vars(build_parser().parse_args([MODEL, "--data", "a"]))
    assert _recipe_differences(saved, build_parser().parse_args([MODEL, "--data", "a", "--amp"])) == [
        "--amp True (saved run: False)"]


def test_amp_loss_scaling_skips_overflowing_steps_and_resumes_with_its_scale(dataset, tmp_path, monkeypatch):
    """--amp's fp16 path (a GradScaler, as on CUDA), run on the CPU: fp16 autocast and a scaler that
    starts so high that some steps overflow (skipped, the scale halved) and others grow it. The scale
    reached is saved in last.pth and a resumed run goes on from it: the same weights as the
    uninterrupted run (starting again from the initial scale skips other steps)."""
    import lkfast.train as train_module

    scales = []

    def fp16(device, amp, dtype=None):
        scaler = torch.amp.GradScaler("cpu", init_scale=3e4, growth_interval=1, enabled=amp)
        update = scaler.update
        scaler.update = lambda *a: (update(*a), scales.append(scaler.get_scale()))
        return (torch.float16 if amp else None), scaler
    monkeypatch.setattr(train_module, "amp_settings", fp16)
    recipe = [MODEL, "--data", str(dataset), "--epochs", "2", "--max-steps-per-epoch", "3", "--amp", *FAST]
    train(recipe + ["--out", str(tmp_path / "whole")])
    whole = list(scales)
    assert any(b < a for a, b in zip([3e4] + whole, whole)) and any(b > a for a, b in zip([3e4] + whole, whole)), \
        whole  # both an overflow (halved) and a clean step (doubled): the scale matters
    scales.clear()
    train(recipe + ["--out", str(tmp_path / "split"), "--stop-after-epoch", "1"])
    saved = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    assert saved["scaler"]["scale"] == whole[2] == scales[-1]
    lowered = [sum(b < a for a, b in list(zip([3e4] + whole, whole))[first:first + 3]) for first in (0, 3)]
    assert [record["skipped_steps"] for record in saved["history"]] == lowered[:1]  # the steps that overflowed
    summary = train(recipe + ["--out", str(tmp_path / "split")])
    assert scales[3:] == whole[3:]
    history = torch.load(tmp_path / "split" / "last.pth", weights_only=True)["history"]
    assert [record["skipped_steps"] for record in history] == lowered
    assert all(np.isfinite(summary["train_loss"]))
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert all(t.isfinite().all() for t in a.values())  # the overflowing steps were skipped
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_amp_dtype_float16_on_the_cpu_scales_the_loss_as_on_a_gpu(dataset, tmp_path, capsys):
    """--amp --amp-dtype float16 runs the CUDA default's path on the CPU, unpatched: fp16 autocast and
    an enabled GradScaler from its default scale (2**16), which the first steps overflow: each
    skipped step halves it (no growth within 2000 steps), so the scale saved in last.pth is 2**16
    over 2 to the skipped steps counted. --amp-dtype is part of the recipe; alone it is refused."""
    recipe = [MODEL, "--data", str(dataset), "--epochs", "2", "--max-steps-per-epoch", "3", *FAST]
    summary = train(recipe + ["--amp", "--amp-dtype", "float16", "--out", str(tmp_path / "o")])
    saved = torch.load(tmp_path / "o" / "last.pth", weights_only=True)
    skipped = sum(record["skipped_steps"] for record in saved["history"])
    assert skipped > 0 and saved["scaler"]["scale"] == 2.0 ** 16 / 2 ** skipped
    assert summary["recipe"]["amp_dtype"] == "float16" and all(np.isfinite(summary["train_loss"]))
    assert all(t.isfinite().all() for t in _weights(tmp_path / "o").values())
    assert main(recipe + ["--amp-dtype", "bfloat16", "--out", str(tmp_path / "p")]) == 2
    assert "--amp-dtype bfloat16 sets --amp's dtype: add --amp" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_a_resume_whose_amp_dtype_changed_with_the_device_says_so(dataset, tmp_path, monkeypatch, capsys):
    """--amp's default dtype follows the device (bf16 on the CPU, fp16 on CUDA), which is no recipe
    setting: a run resumed on another device type with the same flags is warned that its autocast
    dtype changed; on the same device, no warning."""
    import lkfast.train as train_module

    def recipe(out):
        return [MODEL, "--data", str(dataset), "--epochs", "2", "--max-steps-per-epoch", "2", "--amp", *FAST,
                "--out", str(tmp_path / out)]
    for out in ("same", "other"):
        train(recipe(out) + ["--stop-after-epoch", "1"])
        assert torch.load(tmp_path / out / "last.pth", weights_only=True)["amp_dtype"] == "bfloat16"
    capsys.readouterr()
    train(recipe("same"))
    assert "autocast dtype" not in capsys.readouterr().err
    settings = train_module.amp_settings
    monkeypatch.setattr(train_module, "amp_settings", lambda device, amp, dtype=None: settings(
        device, amp, "float16"))  # what a GPU's default gives
    train(recipe("other"))
    err = capsys.readouterr().err
    assert "settings differ from the run's in" in err, err
    assert "--amp's autocast dtype float16 on cpu (saved run: bfloat16; --amp-dtype sets it)" in err, err


def test_amp_leaves_a_step_whose_loss_overflowed_out_of_the_epochs_loss(dataset, tmp_path, monkeypatch):
    """With loss scaling, a step whose loss came out infinite (fp16 logits overflowing) is skipped by
    the scaler, counted in the epoch's skipped_steps and left out of its mean loss (it trained
    nothing; counted, the epoch's loss read inf)."""
    import lkfast.train as train_module

    monkeypatch.setattr(train_module, "amp_settings", lambda device, amp, dtype=None: (
        torch.float16, torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1000)))
    losses = []

    class FirstLossOverflows(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            loss = super().forward(logits, target)
            losses.append(float(loss.detach()))
            return loss * (math.inf if len(losses) == 1 else 1.0)
    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", FirstLossOverflows)
    summary = train([MODEL, "--data", str(dataset), "--epochs", "1", "--max-steps-per-epoch", "3", "--amp",
                     "--out", str(tmp_path), *FAST])
    history = torch.load(tmp_path / "last.pth", weights_only=True)["history"]
    assert history[0]["skipped_steps"] == 1 and len(losses) == 3
    assert summary["train_loss"][0] == pytest.approx(np.mean(losses[1:]), rel=1e-6)  # batches of 4: equal weights
    assert all(t.isfinite().all() for t in _weights(tmp_path).values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_amp_on_a_gpu_trains_in_its_dtype_and_resumes(dataset, tmp_path, monkeypatch, dtype):
    """--amp --device cuda: lkfast's op sees fp16 CUDA tensors (bf16 with --amp-dtype bfloat16), the
    fp16 run's loss scale is saved in last.pth (bf16: none, no scaling), the weights stay fp32 and
    finite, and an interrupted run resumes to the uninterrupted one's weights (as far as cuDNN's
    algorithms are deterministic: close, not equal)."""
    import lkfast.ops.depthwise as op

    seen = set()
    check = op._check_inputs
    monkeypatch.setattr(op, "_check_inputs", lambda x, w, b: (seen.add((x.device.type, x.dtype)), check(x, w, b))[1])
    recipe = [MODEL, "--data", str(dataset), "--epochs", "2", "--max-steps-per-epoch", "3", "--amp", "--device", "cuda",
              *(("--amp-dtype", dtype) if dtype else ()), *FAST]
    train(recipe + ["--out", str(tmp_path / "whole")])
    assert seen == {("cuda", torch.bfloat16 if dtype else torch.float16)}
    assert train(recipe + ["--out", str(tmp_path / "split"), "--stop-after-epoch", "1"]) == {"stopped_after_epoch": 1}
    saved = torch.load(tmp_path / "split" / "last.pth", weights_only=True)
    if dtype:
        assert saved["scaler"] is None and "skipped_steps" not in saved["history"][0]
    else:
        assert saved["scaler"]["scale"] > 0 and saved["history"][0]["skipped_steps"] >= 0
    train(recipe + ["--out", str(tmp_path / "split")])
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    assert {t.dtype for t in a.values() if t.is_floating_point()} == {torch.float32}
    assert all(t.isfinite().all() for t in a.values())
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)


def test_recipe_differences_name_the_recipe_settings_alone():
    """Settings that leave what a run learns unchanged or change by design (--epochs: train longer,
    --workers, --out, ...) are no recipe difference; --lr and --scale are, shown as typed."""
    from lkfast.train import _recipe_differences

    saved = vars(build_parser().parse_args([MODEL, "--data", "a", "--epochs", "2", "--lr", "0.1"]))
    same = build_parser().parse_args([MODEL, "--data", "b", "--out", "o", "--epochs", "5", "--workers", "2",
                                      "--quiet", "--lr", "0.1", "--no-progress", "--channels-last"])
    assert _recipe_differences(saved, same) == []
    other = build_parser().parse_args([MODEL, "--data", "a", "--epochs", "2", "--lr", "0.2", "--scale", "0.5", "1"])
    assert _recipe_differences(saved, other) == ["--lr 0.2 (saved run: 0.1)", "--scale 0.5 1.0 (saved run: 0.08 1.0)"]


def test_option_values_at_the_edges_of_their_ranges_are_taken():
    """The range checks refuse only what no run can use: the ends a recipe uses pass, '--aa none' (what
    the help calls the default) is no policy, and timm's lookahead_ prefix and any case of a name pass."""
    from lkfast.train import _check_arguments

    edges = ["--ema-decay", "0", "--smoothing", "0", "--drop-path", "0.999", "--hflip", "1", "--mixup-prob", "0",
             "--mixup", "0", "--cutmix", "0", "--color-jitter", "0", "--warmup-epochs", "0", "--weight-decay", "0",
             "--min-lr", "0.1", "--lr", "0.1", "--scale", "1", "1", "--aa", "none", "--opt", "lookahead_AdamW"]
    args = build_parser().parse_args([MODEL, "--data", "x", *edges])
    _check_arguments(args)
    assert args.aa is None
    _check_arguments(build_parser().parse_args([MODEL, "--data", "x", "--aa", "rand-m9-mstd0.5-inc1", "--opt", "sgd"]))


class _Trap:
    """Unpickling it creates the folder ``path``: code run by reading a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def test_a_last_pth_not_written_by_lkfast_train_is_refused_unread(dataset, tmp_path, capsys):
    """A last.pth in --out that lkfast.train did not write ended in a KeyError traceback ('model_name'),
    and whatever it pickled was run (torch.load with weights_only=False). Now it is read with
    weights_only=True and refused in one line naming the file and what to do; the file is left as it is."""
    from lkfast.models import create_model

    out = tmp_path / "o"
    out.mkdir()
    run = [MODEL, "--data", str(dataset), "--out", str(out), "--epochs", "1", "--max-steps-per-epoch", "1", *FAST]
    marker = tmp_path / "code_ran"
    contents = {
        "a state_dict": (create_model("resnet_tiny", num_classes=3).state_dict(),
                         "is not a checkpoint of lkfast.train (it holds a state_dict of "),
        "some keys": ({"model_name": MODEL, "epoch": 1}, "is not a checkpoint of lkfast.train (it holds a dict with "
                                                         "the keys model_name, epoch; lkfast.train's hold model_name, "
                                                         "num_classes, epoch, model, optimizer, history, seconds)"),
        "a list": ([1, 2], "is not a checkpoint of lkfast.train (it holds a list;"),
        "code": ({"model": _Trap(marker)}, "was not written by lkfast.train: it pickles a os.makedirs"),
        "a module": (torch.nn.Linear(2, 2), "it pickles a torch.nn.modules.linear.Linear"),
    }
    for what, (obj, message) in contents.items():
        torch.save(obj, out / "last.pth")
        written = (out / "last.pth").read_bytes()
        assert main(run) == 2, what
        err = capsys.readouterr().err
        assert message in err, (what, err)
        assert err.startswith(f"lkfast.train: error: {out / 'last.pth'} "), err
        assert "or use another --out (--no-resume would overwrite it)" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert (out / "last.pth").read_bytes() == written and not marker.exists(), what
    (out / "last.pth").write_bytes(b"garbage, no checkpoint")
    assert main(run) == 2
    err = capsys.readouterr().err
    assert f"{out / 'last.pth'} cannot be read (UnpicklingError: " in err and "delete it" in err, err


def test_a_finished_runs_cut_short_export_is_not_written_as_fewer_epochs(dataset, tmp_path, capsys):
    """Killed between the final last.pth and model.safetensors, a 2-epoch run rerun with --epochs 1 wrote
    a summary.json saying 1 epoch beside 2 losses and 2 epochs' weights, without a word (with
    model.safetensors there it says 'more than --epochs 1: nothing to do'). Now it says what last.pth
    holds and how to export it; --epochs 2 then writes the weights of the uninterrupted run."""
    run = [MODEL, "--data", str(dataset), "--out", str(tmp_path), "--max-steps-per-epoch", "1", *FAST]
    train(run + ["--epochs", "2"])
    weights = (tmp_path / "model.safetensors").read_bytes()
    summary = (tmp_path / "summary.json").read_text()
    (tmp_path / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(run + ["--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"lkfast.train: error: {tmp_path / 'last.pth'} holds 2 trained epochs, more than --epochs "
                           f"1, and {tmp_path} lacks its model.safetensors: pass --epochs 2 to write them from it (or "
                           f"more to train longer), or --no-resume or another --out to train 1 afresh")
    assert (tmp_path / "summary.json").read_text() == summary and not (tmp_path / "model.safetensors").exists()
    assert train(run + ["--epochs", "2"])["epochs"] == 2
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    assert "already finished (2 epochs, more than --epochs 1)" not in capsys.readouterr().err
    train(run + ["--epochs", "1"])  # with the export there: nothing to do, as before
    assert "already finished (2 epochs, more than --epochs 1): nothing to do" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_named_and_a_trained_epoch_is_kept(dataset, tmp_path, capsys, workers):
    """A truncated or non-image file in train/ or val/ ended in a traceback (a truncated one not named);
    one in val/ lost the epoch just trained, every rerun repeating it. Now one line names the file (also
    from a loader worker), and the epoch is saved before its validation: fixed, the rerun resumes,
    validates it and ends with the weights of a run that never met the file."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    a_png = sorted((data / "train" / CLASSES[0]).iterdir())[0]
    truncated = data / "train" / CLASSES[0] / "truncated.png"
    truncated.write_bytes(a_png.read_bytes()[:100])
    run = [MODEL, "--data", str(data), "--workers", str(workers), *FAST,
           "--device", "cpu"]  # bitwise: on a GPU cuDNN's backward algorithms need not be deterministic
    out = tmp_path / "o"
    assert main([*run, "--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lkfast.train: error: cannot read the image {truncated} (OSError: ") and err.endswith(
        "): replace or delete it, then rerun the same command (it resumes from the last saved epoch)\n"), err
    assert len(err.strip().splitlines()) == 1, err
    assert not (out / "last.pth").exists()
    truncated.unlink()

    garbage = data / "val" / CLASSES[1] / "garbage.png"
    garbage.write_bytes(b"no image")
    run += ["--epochs", "2", "--max-steps-per-epoch", "1"]
    assert main([*run, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"lkfast.train: error: cannot read the image {garbage} (PIL cannot identify it as an "
                           f"image): replace or delete it, then rerun the same command (it resumes from the last "
                           f"saved epoch)"), err
    assert torch.load(out / "last.pth", weights_only=True)["epoch"] == 1  # the epoch's training is kept
    garbage.unlink()
    resumed = train([*run, "--out", str(out)])
    whole = train([*run, "--out", str(tmp_path / "whole")])
    assert resumed["val_top1"] == whole["val_top1"] and resumed["train_loss"] == whole["train_loss"]
    history = torch.load(out / "last.pth", weights_only=True)["history"]
    assert sorted(history[0]) == ["epoch", "train_loss", "val_images", "val_top1"]  # validated on resume
    a, b = _weights(out), _weights(tmp_path / "whole")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_only_models_with_a_fixed_input_size_are_held_to_it():
    from lkfast.models import create_model
    from lkfast.train import _fixed_input_size

    assert _fixed_input_size(create_model("vit_tiny_p8")) == (64, 64)
    assert _fixed_input_size(create_model(MODEL)) is None  # convolutional: any --input-size
    assert _fixed_input_size(create_model("resnet_tiny")) is None


def test_the_worker_count_changes_no_draw_and_a_resume_may_change_it(dataset, tmp_path):
    """Each loader worker drew augmentations from its own stream (base seed + worker id, batches dealt
    round-robin), so --workers 0, 1 and 2 trained different weights and a resume with another
    --workers ended elsewhere than the uninterrupted run, silently. Each image's augmentation is now
    drawn from (seed, epoch, index): the same weights for any --workers, resumed or not."""
    recipe = [MODEL, "--data", str(dataset), "--epochs", "2", "--max-steps-per-epoch", "2", "--batch-size", "4",
              "--warmup-epochs", "0", "--lr", "3e-3", "--quiet", "--aa", "rand-m9-mstd0.5", "--color-jitter", "0.4",
              "--mixup", "0.2", "--cutmix", "1.0", "--drop-path", "0.1",
              "--device", "cpu"]  # bitwise: on a GPU cuDNN's backward algorithms need not be deterministic
    whole = train(recipe + ["--out", str(tmp_path / "w0")])
    assert train(recipe + ["--out", str(tmp_path / "w2"), "--workers", "2"])["train_loss"] == whole["train_loss"]
    train(recipe + ["--out", str(tmp_path / "split"), "--stop-after-epoch", "1"])
    assert train(recipe + ["--out", str(tmp_path / "split"), "--workers", "1"])["train_loss"] == whole["train_loss"]
    a = _weights(tmp_path / "w0")
    for other in ("w2", "split"):
        b = _weights(tmp_path / other)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{other}: {key}")


def test_loader_workers_started_by_spawn_train_as_fork_and_none_do(dataset, tmp_path):
    """macOS and Windows start loader workers with "spawn", which pickles the dataset: its class was
    defined inside a function, so every --workers > 0 run failed there ("Can't pickle local object").
    Run with spawn as the start method (a child process: the method is process-wide) and compare
    with the same recipe without workers."""
    recipe = [MODEL, "--data", str(dataset), "--epochs", "1", "--max-steps-per-epoch", "2", *FAST,
              "--device", "cpu"]  # bitwise: on a GPU cuDNN's backward algorithms need not be deterministic
    alone = train(recipe + ["--out", str(tmp_path / "alone")])
    script = ("import json, multiprocessing, sys\n"
              "multiprocessing.set_start_method('spawn')\n"
              "from lkfast.train import train\n"
              "print(json.dumps(train(json.loads(sys.argv[1]))['train_loss']))\n")
    argv = recipe + ["--out", str(tmp_path / "spawn"), "--workers", "2"]
    done = subprocess.run([sys.executable, "-c", script, json.dumps(argv)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == alone["train_loss"]
    a, b = _weights(tmp_path / "alone"), _weights(tmp_path / "spawn")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_the_seeded_augmentation_leaves_the_gpus_generators_alone(monkeypatch):
    """Each image's augmentation is drawn from its own seed inside _SeededDraws, which put back the
    CPU's generator only, but seeded with torch.manual_seed, which seeds every GPU too: with --workers
    0 the main process's CUDA generator (drop path's masks on a GPU) was reseeded by every image."""
    import lkfast.train as train_module

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded.append)
    before = torch.get_rng_state()
    with train_module._SeededDraws((0, 3, 17)):
        inside = torch.rand(3)
    with train_module._SeededDraws((0, 3, 17)):
        assert torch.equal(torch.rand(3), inside)  # the same key, the same draws
    assert seeded == [] and torch.equal(torch.get_rng_state(), before)


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(dataset, tmp_path, monkeypatch):
    """LOCAL_RANK modulo the GPUs the process sees (one per process through CUDA_VISIBLE_DEVICES:
    LOCAL_RANK 1 was 'invalid device ordinal'); --device cuda:N would put every process on one GPU
    and was replaced without a word: refused, as train's one error line. One process: the device as
    given. (lkfast.eval's ranks follow the same function: test_eval's torchrun test.)"""
    import lkfast.train as train_module
    from lkfast.train import TrainError, process_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    for count, index in ((4, 3), (1, 0), (2, 1)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        assert process_device(torch.device("cuda"), 4) == torch.device("cuda", index)
        assert process_device("cuda", 4) == torch.device("cuda", index)
    refusal = (r"--device cuda:1 under torchrun would put every process on that one GPU: "
               r"give --device cuda \(each process takes the GPU of its LOCAL_RANK\)")
    with pytest.raises(ValueError, match=refusal):
        process_device(torch.device("cuda:1"), 4)
    assert process_device(torch.device("cuda:1"), 1) == torch.device("cuda:1")
    assert process_device(torch.device("cpu"), 4) == torch.device("cpu")
    # through train(): a TrainError (its one error line), before any model or data is made
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train_module, "_distributed", lambda device: (0, 4))
    monkeypatch.setattr(train_module, "_make_model", lambda *a: pytest.fail("a model was made"))
    with pytest.raises(TrainError, match=refusal):
        train_module.train(["resnet18", "--data", str(dataset), "--out", str(tmp_path / "out"), "--device", "cuda:1"])


def test_the_process_group_backend_follows_the_run_s_device(dataset, tmp_path, monkeypatch):
    """Under torchrun the backend was NCCL whenever the machine had CUDA, whatever --device said:
    `--device cpu` on a GPU host then failed in DDP (NCCL reduces CUDA tensors alone). It follows the
    run's device: NCCL on CUDA, gloo on the CPU; LKFAST_TRAIN_BACKEND=gloo gives gloo on CUDA too. A GPU
    host is faked, and the run stops where it would join the group."""
    import torch.distributed as dist

    class Joined(Exception):
        pass

    chosen = []

    def init_process_group(backend=None, **kwargs):
        chosen.append(backend)
        raise Joined

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    monkeypatch.delenv("LKFAST_TRAIN_BACKEND", raising=False)
    run = [MODEL, "--data", str(dataset), "--out", str(tmp_path / "o"), *FAST]
    cases = [(True, ["--device", "cpu"], None, "gloo"), (True, ["--device", "cuda"], None, "nccl"),
             (True, [], None, "nccl"),  # no --device: cuda where there is one
             (True, ["--device", "cuda"], "gloo", "gloo"), (False, [], None, "gloo")]
    for cuda, options, setting, backend in cases:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        if setting is None:
            monkeypatch.delenv("LKFAST_TRAIN_BACKEND", raising=False)
        else:
            monkeypatch.setenv("LKFAST_TRAIN_BACKEND", setting)
        chosen.clear()
        with pytest.raises(Joined):
            train([*run, *options])
        assert chosen == [backend], (cuda, options, setting)
    assert not dist.is_initialized() and not (tmp_path / "o").exists()


def test_a_cpu_run_under_torchrun_on_a_gpu_host_trains(dataset, tmp_path, monkeypatch):
    """A faked 2-process torchrun on a GPU host with --device cpu. The group this process joins is a
    real one-process group (so DDP, the reductions and the barriers run), and one asked for NCCL has a
    backend for CUDA tensors alone, as NCCL: a CPU tensor raises 'No backend type associated with device
    type cpu' (the old choice, NCCL for any run on a machine with CUDA, failed so in DDP). Every tensor
    the run hands to a collective is on its device."""
    import torch.distributed as dist

    join, cuda = dist.init_process_group, torch.cuda.is_available
    joined, collectives = [], []

    def init_process_group(backend=None, **kwargs):
        joined.append(backend)
        monkeypatch.setattr(torch.cuda, "is_available", cuda)  # the GPU host faked up to here: a step of torch's
        # optimisers on such a host asks for the GPU's current stream
        join("cuda:gloo" if backend == "nccl" else backend, store=dist.FileStore(str(tmp_path / "store"), 1),
             rank=0, world_size=1)

    def recorded(name, collective):
        def call(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            collectives.append((name, [t.device for t in tensors]))
            return collective(*args, **kwargs)
        return call

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LKFAST_TRAIN_BACKEND", raising=False)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)  # the other process is faked
    for name in ("all_reduce", "broadcast", "barrier", "all_gather", "reduce", "all_gather_object",
                 "broadcast_object_list"):
        monkeypatch.setattr(dist, name, recorded(name, getattr(dist, name)))
    out = tmp_path / "o"
    try:
        summary = train([MODEL, "--data", str(dataset), "--out", str(out), "--epochs", "1",
                         "--max-steps-per-epoch", "2", "--device", "cpu", *FAST])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert joined == ["gloo"]
    assert summary["world_size"] == 2 and np.isfinite(summary["train_loss"]).all()
    assert (out / "last.pth").is_file() and (out / "model.safetensors").is_file()
    names = [name for name, _ in collectives]
    assert names.count("all_reduce") == 2 and names.count("barrier") == 2, names  # loss, accuracy; epoch, end
    assert all(device == torch.device("cpu") for _, devices in collectives for device in devices), collectives


def test_the_collectives_are_on_the_training_device(monkeypatch):
    """NCCL (the backend on CUDA) reduces CUDA tensors alone: the epoch's loss was summed over the
    processes in a CPU tensor, and every multi-GPU run failed at the end of its first epoch, before
    last.pth was saved (so did each rerun). The sum is on the training device, and NCCL's barrier runs
    on the training GPU. No GPU here: 'meta' stands for one in the sum (a device other than the CPU),
    and the barrier's NCCL group is faked."""
    import torch.distributed as dist

    import lkfast.train as train_module

    class Reduced(Exception):
        pass

    reduced, barriers = [], []

    def all_reduce(tensor, *args, **kwargs):
        reduced.append((tensor.device, tensor.dtype, tuple(tensor.shape)))
        raise Reduced  # a meta tensor holds no values to give back

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(Reduced):
        train_module._summed([3.5, 4], torch.device("meta"))
    assert reduced == [(torch.device("meta"), torch.float64, (2,))]
    monkeypatch.setattr(dist, "barrier", lambda **kwargs: barriers.append(kwargs))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    train_module._barrier(torch.device("cuda", 1))
    assert barriers == [{"device_ids": [1]}]
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    train_module._barrier(torch.device("cpu"))
    train_module._barrier(torch.device("cuda", 1))  # gloo: LKFAST_TRAIN_BACKEND=gloo on CUDA
    assert barriers == [{"device_ids": [1]}, {}, {}]
