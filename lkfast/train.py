"""``python -m lkfast.train``: train an image classifier by name on an ImageFolder dataset with a
ConvNeXt/DeiT-style recipe built from timm's parts, resumable, on one process or under torchrun.

    python -m lkfast.train replknet_tiny_k31 --data DIR --epochs 30 --out runs/k31
    python -m lkfast.train convnext_tiny --kernel-sizes 31 --data /imagenet --input-size 224 --epochs 300
    torchrun --nproc_per_node 2 -m lkfast.train resnet_tiny --data DIR --out runs/r

DIR holds ``train/<class>/*`` and (optionally) ``val/<class>/*``. Each epoch ends with an atomic
checkpoint ``OUT/last.pth`` (model, optimiser, EMA, epoch and the recipe); running the same command
again resumes from it, and, because every epoch's randomness is seeded from (seed, epoch) (each
image's augmentation from (seed, epoch, index), whichever loader worker reads it), a resumed run ends
with the same weights as an uninterrupted one, also with another --workers (on a GPU, as far as cuDNN's
algorithms are deterministic: lkfast does not force them). At the end ``OUT/model.safetensors`` holds
the weights to evaluate (the EMA weights when EMA is on) and ``OUT/summary.json`` the final
accuracy. Large depthwise kernels run through lkfast's op (``lkfast.models.create_model(fast=True)``).

The recipe, each part a flag: AdamW (``timm.optim.create_optimizer_v2``, no weight decay on norms
and biases), cosine schedule with linear warm-up per step (``timm.scheduler.CosineLRScheduler``),
label smoothing (``timm.loss``), mixup/cutmix (``timm.data.Mixup``), RandAugment and random resized
crops (``timm.data.create_transform``), EMA of the weights (``timm.utils.ModelEmaV3``); ``--amp``
for mixed precision (``amp_settings``: fp16 with loss scaling on CUDA, bf16 on the CPU; ``--amp-dtype``
picks).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import random
import re
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

EXAMPLES = """examples:
  python -m lkfast.train replknet_tiny_k31 --data ~/.cache/lkfast/synthetic/<key> --epochs 10 --out runs/k31
  python -m lkfast.train convnext_tiny --kernel-sizes 31 --data /imagenet --input-size 224 --epochs 300 \\
      --batch-size 128 --lr 4e-3 --mixup 0.8 --cutmix 1.0 --aa rand-m9-mstd0.5-inc1 --ema-decay 0.9999
  python -m lkfast.train replknet_3b --data /imagenet --input-size 224 --out runs/3b   (the kernel ablation)
  torchrun --nproc_per_node 2 -m lkfast.train resnet_tiny --data DIR --out runs/r   (DDP; gloo on the CPU)
Running a command again with the same --out resumes from OUT/last.pth (--no-resume starts over)."""


class TrainError(ValueError):
    """A mistake in the command or its data, found before or while training: what was expected, what
    was found, what to do. ``python -m lkfast.train`` prints it on one line and exits with 2."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`. ``checkpoint``: OUT/last.pth; ``epoch``: the epoch it holds, or
    None when this run saved nothing yet (so a rerun starts over)."""

    def __init__(self, checkpoint: Path, epoch: Optional[int]):
        super().__init__(checkpoint, epoch)
        self.checkpoint, self.epoch = checkpoint, epoch


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The examples as written, and each option's default after its help unless the help says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default is not argparse.SUPPRESS
        if action.option_strings and shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lkfast.train", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLES, formatter_class=_HelpFormatter)
    p.add_argument("model", help="model name: a RepLKNet name (replknet_31b, replknet_3b, replknet_tiny_k31, ...) "
                                 "or any timm name (convnext_tiny, resnet50, ...)")
    p.add_argument("--data", required=True, help="dataset root holding train/<class>/* and optionally val/<class>/*")
    p.add_argument("--out", default=None, help="output folder for checkpoints (default: runs/<model>)")
    p.add_argument("--epochs", type=int, default=30, help="epochs to train")
    p.add_argument("--batch-size", type=int, default=64, help="images per step, per process")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-5, help="learning rate the cosine schedule ends at")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="epochs of linear warm-up")
    p.add_argument("--weight-decay", type=float, default=0.05, help="not applied to norms and biases")
    p.add_argument("--opt", default="adamw", help="timm optimiser name")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing; 0 turns it off")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha: 0 off, ConvNeXt used 0.8")
    p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha: 0 off, ConvNeXt used 1.0")
    p.add_argument("--mixup-prob", type=float, default=1.0, help="probability that a batch is mixed")
    p.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment); "
                                              "default none")
    p.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="random-resized-crop area range (default: 0.08 1.0)")
    p.add_argument("--hflip", type=float, default=0.5, help="probability of a horizontal flip")
    p.add_argument("--color-jitter", type=float, default=0.0, help="colour jitter strength; 0 off")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    p.add_argument("--ema-decay", type=float, default=0.0, help="EMA decay per step: 0 off, e.g. 0.999")
    p.add_argument("--kernel-sizes", type=int, default=None, help="kernel size of every depthwise conv, for models "
                                                                  "that take kernel_sizes (convnext_*)")
    p.add_argument("--input-size", type=int, default=None, help="input side (default: the model's pretrained_cfg)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="outputs of the model (default: the number of class folders; lkfast.eval's ImageNet "
                        "benchmarks need 1000)")
    p.add_argument("--classes", default=None, metavar="A,B,...",
                   help="class folder names in the order of the model's outputs (default: sorted folder names, "
                        "as torchvision's ImageFolder); summary.json records it, and lkfast.eval reads each output "
                        "as its class")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes per training process (the "
                                                          "trained weights do not depend on it)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights, the data order and the augmentation")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-fast", action="store_true", help="plain nn.Conv2d instead of lkfast's op")
    p.add_argument("--channels-last", action="store_true", help="train in channels_last memory format "
                                                                "(often faster on the CPU)")
    p.add_argument("--amp", action="store_true", help="mixed precision: fp16 autocast with loss scaling on CUDA, "
                                                      "bf16 autocast on the CPU (weights and optimiser stay fp32)")
    p.add_argument("--amp-dtype", choices=AMP_DTYPES, default=None,
                   help="--amp's autocast dtype (default: float16 on CUDA, bfloat16 on the CPU); float16 scales the "
                        "loss, bfloat16 needs no scaling (e.g. on A100/H100-class GPUs)")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT/last.pth exists")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help=argparse.SUPPRESS)  # tests
    p.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)  # tests: an interruption
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the per-epoch lines stay)")
    return p


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _atomic_save(obj, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` through lkfast.tables' atomic writer (a temporary file with
    this process's id in its name, and a rename; nothing left on failure). Serialised in memory
    first: torch.save into a file on a full disk raises a RuntimeError with no reason given
    ('basic_ios::clear: iostream error'); a plain write says ENOSPC. The price: the checkpoint is
    in memory twice while it is written."""
    import io

    from lkfast.tables import write_bytes_atomic

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getbuffer())


_OUTPUTS = ("last.pth", "model.safetensors", "summary.json")  # the files lkfast.train writes into --out


def _remove_dead_temporaries(out: Path) -> None:
    """The temporary files of this command's saves killed mid-way (their process gone): a full-size
    checkpoint each, otherwise never removed. Only write_atomic's names for the files lkfast.train
    writes: anything else in --out is the user's."""
    from lkfast.tables import temporary_files

    for tmp in temporary_files(out):
        if tmp.name.startswith(tuple(f".{name}." for name in _OUTPUTS)):
            tmp.unlink(missing_ok=True)


def _save_weights(tensors: dict, path: Path) -> None:
    """``tensors`` to the safetensors file ``path`` through write_bytes_atomic, with the mode a plain open
    gives (0666 less the umask, as last.pth and summary.json; safetensors' save_file writes 0600)."""
    from safetensors.torch import save

    from lkfast.tables import write_bytes_atomic

    write_bytes_atomic(path, save(tensors))


def _backend(device: torch.device) -> str:
    """The process group's backend for a run on ``device``: NCCL for a CUDA device, gloo for the CPU
    (LKFAST_TRAIN_BACKEND=gloo: gloo on CUDA too). From the device the run uses, not from whether the
    machine has CUDA: NCCL reduces CUDA tensors alone, so --device cpu on a GPU host, given NCCL,
    failed in DDP's first broadcast of the CPU module."""
    if device.type == "cuda" and os.environ.get("LKFAST_TRAIN_BACKEND") != "gloo":
        return "nccl"
    return "gloo"


def _distributed(device: torch.device) -> tuple:
    """(rank, world size), joining the process group torchrun describes with ``_backend(device)``
    (a group joined already, as lkfast.eval's, is kept)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        join_process_group(_backend(device))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_process_group(backend: str, **options) -> None:
    """``torch.distributed.init_process_group(backend, **options)`` with ``torch.distributed.nn``
    imported first (lkfast.train's and lkfast.eval's one way in). That module's functions take
    ``group=group.WORLD`` as a default argument, evaluated when it is imported: imported after the
    group exists (timm's first import reaches it through torch._dynamo), they hold the group for good,
    and ``destroy_process_group`` leaves it and its gloo threads running until the interpreter exits.
    A worker thread that then drops its last collective's tensors needs the GIL, which a finalizing
    interpreter no longer gives: "terminate called without an active exception" and SIGABRT, after
    the process had done its work (2 of 57 torchrun runs of a test under load, torch 2.11)."""
    import torch.distributed.nn  # noqa: F401  (before the group exists: its defaults hold None)

    dist.init_process_group(backend=backend, **options)


def process_device(device, world: int) -> torch.device:
    """This process's device, the one rule of ``lkfast.train`` and ``lkfast.eval``: under torchrun
    (``world`` > 1 processes) ``cuda`` is the GPU of the process's LOCAL_RANK, modulo the GPUs it
    sees (a launcher that gives each process one GPU through CUDA_VISIBLE_DEVICES makes it cuda:0:
    LOCAL_RANK 1 was 'invalid device ordinal'); ``cuda:N`` there would put every process on GPU N
    (it was replaced without a word): ValueError. One process: the device as given."""
    device = torch.device(device)
    if device.type != "cuda" or world == 1:
        return device
    if device.index is not None:
        raise ValueError(f"--device {device} under torchrun would put every process on that one GPU: give --device "
                         "cuda (each process takes the GPU of its LOCAL_RANK)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))


def _summed(values: list, device: torch.device) -> list:
    """``values`` (numbers) summed over the processes of the group, in float64. The tensor is on the
    training ``device``: NCCL reduces CUDA tensors alone (a CPU one raised 'No backend type associated
    with device type cpu', which ended every multi-GPU run at the end of its first epoch, before its
    save); gloo reduces CPU and CUDA tensors."""
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(summed)
    return summed.tolist()


def _barrier(device: torch.device) -> None:
    """``dist.barrier()``, under NCCL on the training GPU: NCCL runs it as an all_reduce of a tensor
    it allocates on the device named (else on the current one, with a warning); gloo needs none."""
    if device.type == "cuda" and dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device() if device.index is None else device.index])
    else:
        dist.barrier()


class _Unreadable:
    """What a dataset item (and so its batch) is in place of an image PIL cannot read: the file and why.
    Returned, not raised, so that the main process says it in one line also from a loader worker
    (whose exceptions arrive wrapped around the worker's traceback)."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason


def _collate(items):
    """torch's default_collate, or the first _Unreadable among ``items``."""
    from torch.utils.data import default_collate

    return next((item for item in items if isinstance(item, _Unreadable)), None) or default_collate(items)


def _batches(loader):
    """The (x, y) batches of ``loader``; TrainError naming the file for a batch holding an unreadable image.
    An error rather than the eval's skip: a training set that silently differs from its folder (and
    from run to run, as files are fixed) learns something else and orders its epochs otherwise."""
    for batch in loader:
        if isinstance(batch, _Unreadable):
            raise TrainError(f"cannot read the image {batch.path} ({batch.reason}): replace or delete it, then rerun "
                             f"the same command (it resumes from the last saved epoch)")
        yield batch


class _SeededDraws:
    """Python's, NumPy's and torch's (CPU) global random draws seeded from ``key`` (integers) inside the
    ``with``, and each put back as it was after it: a sample's augmentation drawn from (seed, epoch,
    index) alone, the same whichever process draws it and whatever it drew before (the loader
    workers' own streams, base seed + worker id, made it depend on --workers), and the main
    process's draws (mixup, drop path) left untouched."""

    def __init__(self, key: tuple):
        words = np.random.SeedSequence([int(k) % 2 ** 63 for k in key]).generate_state(4, dtype=np.uint32)
        self.seed = int(words[0]) << 32 | int(words[1])
        self.numpy_seed = words[2:]

    def __enter__(self):
        self.states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(self.seed)
        np.random.seed(self.numpy_seed)
        # the CPU generator alone: torch.manual_seed also seeds every GPU (and only the CPU's state is put
        # back), so with --workers 0 the main process's CUDA generator, which draws drop path's masks on
        # a GPU, was reseeded by every image loaded (the same weights for any --workers held on the CPU only)
        torch.default_generator.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        python_state, numpy_state, torch_state = self.states
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        return False


def _val_optional(folder: Path) -> str:
    return f"or remove {folder} (val/ is optional: no accuracy is reported then)"


def _dataset(folder: Path, transform, classes, split: str = "train"):
    """torchvision's ImageFolder with ``classes`` (folder names) as the label order; ``split``
    "train" (the classes' own folders) or "val" (which needs a folder of images for each)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not folder.is_dir():
        raise TrainError(f"expected an ImageFolder at {folder} (one sub-folder per class)")
    try:
        from lkfast._train_folder import OrderedImageFolder  # (imports torchvision: only when a dataset is made)

        return OrderedImageFolder(str(folder), transform, classes, split)
    except FileNotFoundError as error:  # ImageFolder's 'Found no valid file for the classes ...'
        def has_image(path):
            return any(name.lower().endswith(IMG_EXTENSIONS) for _, _, names in os.walk(path, followlinks=True)
                       for name in names)

        empty = [folder / c for c in classes if not has_image(folder / c)]
        if not empty:
            raise
        where = ", ".join(map(str, empty))
        kinds = " ".join(IMG_EXTENSIONS)
        if split == "val":
            raise TrainError(f"no image ({kinds}) in {where}: add that class's validation images, "
                             f"{_val_optional(folder)}") from None
        raise TrainError(f"no image ({kinds}) in {where}: each folder of {folder} is a class; add its images or "
                         f"delete the folder") from None


def _make_model(args, num_classes: int) -> nn.Module:
    from lkfast.models import create_model

    kwargs = {"num_classes": num_classes}
    if args.kernel_sizes is not None:
        kwargs["kernel_sizes"] = args.kernel_sizes
    if args.drop_path:
        kwargs["drop_path_rate"] = args.drop_path
    try:
        model = create_model(args.model, fast=not args.no_fast, **kwargs)
    except TypeError as error:
        if args.kernel_sizes is not None and "kernel_sizes" in str(error):
            raise TrainError(f"{args.model} does not take --kernel-sizes ({error})") from None
        raise
    return model.train()


def _fixed_input_size(model: nn.Module) -> Optional[tuple]:
    """(H, W) for a model that refuses any other input size (timm's ViTs, DeiT, Swin...: a PatchEmbed
    with ``strict_img_size``), else None."""
    for module in model.modules():
        if getattr(module, "strict_img_size", False) and getattr(module, "img_size", None) is not None:
            return tuple(module.img_size)
    return None


def mix_batch(mixup, x: torch.Tensor, y: torch.Tensor, num_classes: int, smoothing: float) -> tuple:
    """``mixup`` (timm's Mixup: mixup/cutmix with label smoothing) of the batch ``x``, ``y``: images
    and soft targets. timm's Mixup needs an even batch, so an odd batch's last image keeps its own
    label, smoothed like the rest (an odd --batch-size would otherwise never be mixed)."""
    from timm.data.mixup import mixup_target

    even = len(x) - len(x) % 2
    if even == len(x):
        return mixup(x, y)
    last = mixup_target(y[even:], num_classes, smoothing=smoothing)
    if even == 0:
        return x, last
    mixed_x, mixed_y = mixup(x[:even], y[:even])
    return torch.cat([mixed_x, x[even:]]), torch.cat([mixed_y, last])


# What lkfast.train's last.pth holds (beside "classes", "ema" and "args", read where present).
_CHECKPOINT_KEYS = ("model_name", "num_classes", "epoch", "model", "optimizer", "history", "seconds")


def _read_checkpoint(last: Path) -> dict:
    """OUT/last.pth as lkfast.train saved it, read with ``weights_only=True``: tensors, numbers,
    strings and containers only, everything lkfast.train saves; a file that pickles anything else
    was not written by lkfast.train, and unpickling it could run any code. TrainError, naming the
    file and what to do, for a file that cannot be read or is not lkfast.train's."""
    elsewhere = (f"move it out of {last.parent} or use another --out (--no-resume would overwrite it)")
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as error:  # nothing is unpickled but data: any failure is the file's
        # torch's weights_only message: its advice about weights_only=False (not ours to give), then the reason
        reasons = [part for part in str(error).split("\n\n") if part.strip() and not
                   part.lstrip().startswith(("Weights only load failed", "Check the documentation", "Please file"))]
        text = " ".join((reasons[0] if reasons else str(error)).split())[:200]
        found = re.search(r"\bGLOBAL ([\w.]+)", str(error))  # 'Unsupported global: GLOBAL a.B was not', 'GLOBAL os.x whose'
        if isinstance(error, pickle.UnpicklingError) and found:
            raise TrainError(f"{last} was not written by lkfast.train: it pickles a {found.group(1)} (lkfast.train's "
                             f"checkpoints hold tensors, numbers and strings; not unpickled, as that could run any "
                             f"code): {elsewhere}") from None
        raise TrainError(f"{last} cannot be read ({type(error).__name__}: {text}): it is damaged, or no checkpoint of "
                         f"lkfast.train; delete it (or move it out of {last.parent}) to train from the start, or pass "
                         f"--no-resume") from None
    if not isinstance(state, dict) or not all(key in state for key in _CHECKPOINT_KEYS):
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            found = f"a state_dict of {len(state)} tensors"
        elif isinstance(state, dict):
            keys = ", ".join(map(str, list(state)[:8])) + (", ..." if len(state) > 8 else "")
            found = f"a dict with the keys {keys}"
        else:
            found = f"a {type(state).__name__}"
        raise TrainError(f"{last} is not a checkpoint of lkfast.train (it holds {found}; lkfast.train's hold "
                         f"{', '.join(_CHECKPOINT_KEYS)}): {elsewhere}")
    return state


def _resume_conflicts(state: dict, args, classes: list, num_classes: int) -> list:
    """How the run saved in ``state`` (OUT/last.pth) was built differently from this command: the
    model, its kernel size, its outputs (class count and order); one text for each difference."""
    conflicts = []
    if state["model_name"] != args.model:
        conflicts.append(f"model {state['model_name']} (this command: {args.model})")
    if state["num_classes"] != num_classes:
        conflicts.append(f"{state['num_classes']} classes (this command: {num_classes})")
    saved = state.get("args") or {}
    if "kernel_sizes" in saved and saved["kernel_sizes"] != args.kernel_sizes:
        given = [f"--kernel-sizes {k}" if k is not None else "no --kernel-sizes"
                 for k in (saved["kernel_sizes"], args.kernel_sizes)]
        conflicts.append(f"{given[0]} (this command: {given[1]})")
    saved_classes = state.get("classes")
    if saved_classes is not None and list(saved_classes) != list(classes):
        same_set = sorted(saved_classes) == sorted(classes)
        hint = f"; pass --classes {','.join(saved_classes)}" if same_set else ""
        conflicts.append(f"{'the class order' if same_set else 'classes'} {','.join(saved_classes)} "
                         f"(this command: {','.join(classes)}{hint})")
    return conflicts


# Settings that leave what a run learns unchanged, are checked as conflicts (_resume_conflicts), or
# change on resume by design (--epochs: train longer); every other setting is the recipe.
_NOT_RECIPE = frozenset({"model", "kernel_sizes", "num_classes", "classes", "data", "out", "epochs", "workers",
                         "device", "no_fast", "channels_last", "no_resume", "max_steps_per_epoch", "stop_after_epoch",
                         "quiet", "no_progress"})


def _recipe_differences(saved: dict, args) -> list:
    """The recipe settings (--lr, --batch-size, ...) this command gives otherwise than the run whose
    arguments were ``saved`` (OUT/last.pth's ``args``); one text each, e.g. '--lr 0.1 (saved run: 0.002)'."""
    def shown(value):
        if isinstance(value, (list, tuple)):
            return " ".join(str(v) for v in value)
        return "none" if value is None else str(value)

    return [f"--{key.replace('_', '-')} {shown(value)} (saved run: {shown(saved[key])})"
            for key, value in vars(args).items()
            if key not in _NOT_RECIPE and key in saved and shown(saved[key]) != shown(value)]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_dtype: Optional[torch.dtype] = None) -> tuple:
    """Top-1 accuracy in percent of ``model`` on ``loader`` and the number of images, both summed
    over every process (each process's loader holds its own share of the images). ``amp_dtype``:
    autocast to it (``amp_settings``), None for none."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in _batches(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(x)
        correct[0] += (logits.argmax(-1) == y).sum()
        correct[1] += len(y)
    if dist.is_initialized():
        dist.all_reduce(correct)
    model.train(was_training)
    return float(100.0 * correct[0] / correct[1].clamp(min=1)), int(correct[1])


AMP_DTYPES = ("float16", "bfloat16")


def amp_settings(device: torch.device, amp: bool, dtype: Optional[str] = None) -> tuple:
    """``--amp``'s (autocast dtype, loss scaler) on ``device``: ``dtype`` ("float16" or "bfloat16",
    --amp-dtype), by default fp16 on CUDA and bf16 on the CPU (the dtype CPU autocast computes in).
    fp16 comes with an enabled ``torch.amp.GradScaler`` (fp16's range needs the loss scaled: small
    gradients underflow to zero); bf16's fp32 range needs no scaling (the scaler is disabled, a
    pass-through). Without --amp: (None, a disabled scaler)."""
    if not amp:
        return None, torch.amp.GradScaler(device.type, enabled=False)
    autocast = getattr(torch, dtype) if dtype else torch.float16 if device.type == "cuda" else torch.bfloat16
    return autocast, torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype, enabled=True) if dtype is not None else contextlib.nullcontext()


def _check_arguments(args) -> None:
    """Refuse values no run can use (TrainError naming the option), before anything is read or built."""
    at_least = {"--epochs": (args.epochs, 1), "--batch-size": (args.batch_size, 1), "--workers": (args.workers, 0),
                "--num-classes": (args.num_classes, 1), "--input-size": (args.input_size, 8),
                "--kernel-sizes": (args.kernel_sizes, 1)}
    for option, (value, least) in at_least.items():
        if value is not None and value < least:
            raise TrainError(f"{option} must be at least {least}, got {value}")
    if args.kernel_sizes is not None and args.kernel_sizes % 2 == 0:  # 'same' padding k // 2 needs an odd k
        raise TrainError(f"--kernel-sizes must be odd (3, 5, 7, ...), got {args.kernel_sizes}")
    # (option, value, lowest, lowest allowed?, highest, highest allowed?, what it means): NaN fails every test
    ranges = [("--lr", args.lr, 0, False, math.inf, False, "the peak learning rate"),
              ("--min-lr", args.min_lr, 0, True, math.inf, False, "where the cosine schedule ends"),
              ("--warmup-epochs", args.warmup_epochs, 0, True, math.inf, False, "0 for no warm-up"),
              ("--weight-decay", args.weight_decay, 0, True, math.inf, False, "0 for none"),
              ("--smoothing", args.smoothing, 0, True, 1, False, "0 turns it off"),
              ("--mixup", args.mixup, 0, True, math.inf, False, "0 off, ConvNeXt used 0.8"),
              ("--cutmix", args.cutmix, 0, True, math.inf, False, "0 off, ConvNeXt used 1.0"),
              ("--mixup-prob", args.mixup_prob, 0, True, 1, True, "a probability"),
              ("--hflip", args.hflip, 0, True, 1, True, "a probability"),
              ("--color-jitter", args.color_jitter, 0, True, math.inf, False, "0 off, e.g. 0.4"),
              ("--drop-path", args.drop_path, 0, True, 1, False, "0 off, e.g. 0.1"),
              ("--ema-decay", args.ema_decay, 0, True, 1, False, "0 turns EMA off, e.g. 0.999")]
    for option, value, low, low_in, high, high_in, meaning in ranges:
        if not ((value >= low if low_in else value > low) and (value <= high if high_in else value < high)):
            interval = (f"at least {low}" if low_in else f"more than {low}") if high == math.inf else \
                f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"
            raise TrainError(f"{option} must be {interval} ({meaning}), got {value}")
    if args.amp_dtype and not args.amp:
        raise TrainError(f"--amp-dtype {args.amp_dtype} sets --amp's dtype: add --amp (or leave --amp-dtype out)")
    if args.min_lr > args.lr:
        raise TrainError(f"--min-lr {args.min_lr} is above --lr {args.lr}: the cosine schedule falls from --lr to "
                         f"--min-lr")
    low, high = args.scale
    if not 0 < low <= high <= 1:
        raise TrainError(f"--scale {low} {high}: expected MIN MAX with 0 < MIN <= MAX <= 1 (the fractions of the "
                         f"image's area a random crop keeps; default 0.08 1.0)")
    if args.aa is not None and args.aa.lower() == "none":
        args.aa = None  # what the help calls the default
    if args.aa is not None:
        from timm.data import create_transform

        try:  # timm's own parser of the policy (an AssertionError for an unknown name)
            create_transform(32, is_training=True, auto_augment=args.aa)
        except (AssertionError, ValueError, KeyError, IndexError, TypeError) as error:
            raise TrainError(f"--aa {args.aa}: not a timm auto-augment policy ({error}); expected e.g. "
                             f"rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w3 (AugMix), or original, originalr, v0, "
                             f"v0r, 3a (AutoAugment), or none") from None
    from timm.optim import list_optimizers

    names = list_optimizers()
    if args.opt.lower().split("_")[-1] not in names:  # timm's parse: an optional lookahead_ prefix, then the name
        raise TrainError(f"--opt {args.opt}: not a timm optimiser; expected one of {', '.join(names)} (optionally "
                         f"prefixed lookahead_)")


def device_option(name: Optional[str]) -> torch.device:
    """``--device`` of ``python -m lkfast.train`` and ``python -m lkfast.eval`` as a torch.device
    (default: cuda when available, else cpu); ValueError, naming the option, for a name torch does
    not know, for a device type lkfast cannot run on (mps, xpu, ...), for CUDA where there is none and for
    a CUDA device number the machine lacks (both commands print it as their one error line)."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise ValueError(f"--device {name}: expected cpu, cuda or cuda:N ({error})") from None
    if device.type not in ("cpu", "cuda"):  # mps, xpu, meta...: torch names them, lkfast runs on neither
        raise ValueError(f"--device {name}: expected cpu, cuda or cuda:N (lkfast runs on no {device.type!r} device); "
                         "use --device cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def _out_folder(args) -> Path:
    return Path(args.out or f"runs/{args.model}")


def train(argv=None) -> dict:
    """Run ``python -m lkfast.train`` with the argument list ``argv``; returns the summary dict
    (also written to OUT/summary.json): final val top-1 (``val_top1``, of the exported weights, over
    ``val_images`` images),
    per-epoch mean training loss (``train_loss``), epochs, seconds, and the recipe.

    Raises TrainError for a mistake in the command or the data, ValueError for an unknown model name,
    TrainInterrupted (a KeyboardInterrupt) on Ctrl-C, saying which epoch OUT/last.pth holds."""
    args = build_parser().parse_args(argv)
    saved = {"epoch": None}  # the epoch OUT/last.pth holds for this run, updated as epochs end
    try:
        return _train(args, saved)
    except KeyboardInterrupt:
        raise TrainInterrupted(_out_folder(args) / "last.pth", saved["epoch"]) from None


def _train(args, saved: dict) -> dict:
    from timm.data import Mixup, create_transform, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler, Subset
    from tqdm import tqdm

    _check_arguments(args)
    try:
        device = device_option(args.device)
    except ValueError as error:  # a mistake in the command: TrainError, as train() says
        raise TrainError(str(error)) from None
    data = Path(args.data).expanduser()
    out = _out_folder(args)
    if not data.is_dir():
        raise TrainError(f"--data {args.data}: no such folder" if not data.exists() else
                         f"--data {args.data} is a file: give the folder holding train/<class>/<image>")
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file: give a folder for last.pth, model.safetensors and summary.json")
    train_dir, val_dir = data / "train", data / "val"
    if not train_dir.is_dir():
        raise TrainError(f"--data {args.data} has no train/ folder: expected DATA/train/<class>/<image> (and "
                         f"optionally DATA/val/<class>/<image>)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else []
    if classes and args.classes:
        order = [c.strip() for c in args.classes.split(",") if c.strip()]
        if sorted(order) != classes:
            raise TrainError(f"--classes must name each class folder of {train_dir} once: "
                             f"folders {', '.join(classes)}; --classes {', '.join(order)}")
        classes = order
    if not classes:
        raise TrainError(f"no class folders in {train_dir}; expected DATA/train/<class>/<image>")
    num_classes = args.num_classes or len(classes)
    if num_classes < len(classes):
        raise TrainError(f"--num-classes {num_classes} is fewer than the {len(classes)} class folders of {train_dir}")
    rank, world = _distributed(device)
    try:
        device = process_device(device, world)
    except ValueError as error:
        raise TrainError(str(error)) from None
    if device.type == "cuda" and world > 1:
        torch.cuda.set_device(device)

    _seed_everything(args.seed)
    model = _make_model(args, num_classes).to(device)
    fixed = _fixed_input_size(model)
    if args.input_size and fixed is not None and fixed != (args.input_size, args.input_size):
        raise TrainError(f"{args.model} takes {fixed[0]}x{fixed[1]} inputs only (its patch embedding is built for "
                         f"that size): pass --input-size {fixed[0]} or leave --input-size out")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    config = resolve_data_config({}, model=model)
    if args.input_size:
        config["input_size"] = (3, args.input_size, args.input_size)
    train_tf = create_transform(config["input_size"], is_training=True, scale=tuple(args.scale), hflip=args.hflip,
                                color_jitter=args.color_jitter, auto_augment=args.aa,
                                interpolation=config["interpolation"], mean=config["mean"], std=config["std"])
    eval_tf = create_transform(config["input_size"], is_training=False, interpolation=config["interpolation"],
                               mean=config["mean"], std=config["std"], crop_pct=config["crop_pct"])
    train_set = _dataset(train_dir, train_tf, classes)
    val_set = _dataset(val_dir, eval_tf, classes, "val") if val_dir.is_dir() else None
    if train_set.classes != classes:
        raise TrainError("class folders changed while reading")

    steps_per_epoch = math.ceil(len(train_set) / (args.batch_size * world))
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch, lr_min=args.min_lr,
                                  warmup_t=int(args.warmup_epochs * steps_per_epoch), warmup_lr_init=args.lr * 1e-3,
                                  warmup_prefix=True, t_in_epochs=False)
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      label_smoothing=args.smoothing, num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    amp_dtype, scaler = amp_settings(device, args.amp, args.amp_dtype)
    from lkfast.ops import dtype_name

    amp_name = dtype_name(amp_dtype) if amp_dtype is not None else None

    history, start_epoch, elapsed, state = [], 0, 0.0, {}
    last = out / "last.pth"
    if last.is_file() and not args.no_resume:
        state = _read_checkpoint(last)
        conflicts = _resume_conflicts(state, args, classes, num_classes)
        if conflicts:
            raise TrainError(f"{last} holds a run built differently: {'; '.join(conflicts)}. Resume with "
                             f"its settings, or use another --out or --no-resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler.is_enabled() and state.get("scaler"):  # the loss scale it had reached (a run without --amp has none)
            scaler.load_state_dict(state["scaler"])
        start_epoch, history, elapsed = state["epoch"], state["history"], state["seconds"]
        saved["epoch"] = start_epoch
        differences = _recipe_differences(state.get("args") or {}, args)
        if "amp_dtype" in state and state["amp_dtype"] != amp_name and not any(
                d.startswith(("--amp ", "--amp-dtype ")) for d in differences):  # the same flags on another device
            differences.append(f"--amp's autocast dtype {amp_name} on {device.type} (saved run: {state['amp_dtype']}; "
                               f"--amp-dtype sets it)")
        if start_epoch >= args.epochs and (out / "model.safetensors").is_file() and (out / "summary.json").is_file():
            if rank == 0:
                done = (f"{start_epoch}/{args.epochs} epochs" if start_epoch == args.epochs
                        else f"{start_epoch} epochs, more than --epochs {args.epochs}")
                print(f"lkfast.train: {out} already finished ({done}): nothing to do (pass --epochs N to train "
                      f"longer, or another --out)", file=sys.stderr)
                if differences:
                    print(f"lkfast.train: warning: this command's settings differ from the finished run's in {last} "
                          f"and were not used: {'; '.join(differences)} (pass --no-resume or another --out to train "
                          f"with them)", file=sys.stderr)
            return json.loads((out / "summary.json").read_text())
        if start_epoch > args.epochs:  # a finished run's export cut short: exporting it as --epochs would misstate it
            missing = " and ".join(name for name in ("model.safetensors", "summary.json") if not (out / name).is_file())
            raise TrainError(f"{last} holds {start_epoch} trained epochs, more than --epochs {args.epochs}, and {out} "
                             f"lacks its {missing}: pass --epochs {start_epoch} to write them from it (or more to "
                             f"train longer), or --no-resume or another --out to train {args.epochs} afresh")
        if rank == 0 and differences:
            print(f"lkfast.train: warning: this command's settings differ from the run's in {last}: "
                  f"{'; '.join(differences)}; its remaining epochs train with this command's, which summary.json "
                  f"records (pass the saved values to keep its recipe, or --no-resume or another --out to train "
                  f"afresh)", file=sys.stderr)
        if rank == 0 and not args.quiet:
            print(f"lkfast.train: resuming {args.model} from {last} after epoch {start_epoch}", file=sys.stderr)
    # Built after the resume, so an EMA the interrupted run did not keep starts from the resumed weights.
    ema = ModelEmaV3(model, decay=args.ema_decay) if args.ema_decay > 0 else None
    if ema is not None and state.get("ema") is not None:
        ema.module.load_state_dict(state["ema"])
    val_loader = None
    if val_set is not None:
        # Every image once: each process takes every world-th image (DistributedSampler would pad the
        # shares to equal length with repeated images, counted twice in the accuracy).
        share = val_set if world == 1 else Subset(val_set, range(rank, len(val_set), world))
        val_loader = DataLoader(share, batch_size=args.batch_size * 2, sampler=SequentialSampler(share),
                                num_workers=args.workers, collate_fn=_collate, pin_memory=device.type == "cuda")

    if val_loader is not None and history and "val_top1" not in history[-1]:  # its validation did not finish
        history[-1]["val_top1"], history[-1]["val_images"] = evaluate(ema.module if ema is not None else model,
                                                                      val_loader, device, amp_dtype)
    if rank == 0:
        try:  # before any training: an --out that cannot be written is said now, not after an epoch
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrainError(f"--out {out}: cannot create the folder ({error.strerror}: {error.filename})") from None
        _remove_dead_temporaries(out)
    started = time.time()
    for epoch in range(start_epoch, args.epochs):
        epoch_seed = args.seed * 100_003 + epoch * 1_009 + rank
        _seed_everything(epoch_seed)  # mixup and drop-path draws: same on resume
        train_set.augment_key = (args.seed, epoch)  # augmentation: same on resume, and for any --workers
        if world > 1:
            sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(args.seed * 7919 + epoch))
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                            drop_last=len(train_set) >= args.batch_size * world * 2,
                            generator=torch.Generator().manual_seed(epoch_seed),
                            persistent_workers=False, collate_fn=_collate,
                            pin_memory=device.type == "cuda")  # page-locked batches: the copies below overlap the GPU
        net.train()
        total, count, skipped = 0.0, 0, 0
        scale = scaler.get_scale() if scaler.is_enabled() else None  # the loss scale, read once a step
        bar = tqdm(total=min(len(loader), steps_per_epoch), desc=f"{args.model} epoch {epoch + 1}/{args.epochs}",
                   disable=rank != 0 or args.quiet or args.no_progress, leave=False, unit="batch")
        for step, (x, y) in enumerate(_batches(loader)):
            if step >= steps_per_epoch:
                break
            x, y = x.to(device, memory_format=memory_format, non_blocking=True), y.to(device, non_blocking=True)
            if mixup is not None:
                x, y = mix_batch(mixup, x, y, num_classes, args.smoothing)
            with _autocast(device, amp_dtype):
                loss = criterion(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)  # (with loss scaling: unscales, and skips a step whose gradients overflowed)
            scaler.update()
            if scale is not None:  # the scale lowered: the step overflowed and was skipped (on every
                before, scale = scale, scaler.get_scale()  # process alike: the gradients are all-reduced first)
                skipped += scale < before
            scheduler.step_update(epoch * steps_per_epoch + step + 1)
            if ema is not None:
                ema.update(model, step=epoch * steps_per_epoch + step + 1)
            value = float(loss.detach())
            if scale is None or math.isfinite(value):  # (a loss that overflowed in fp16 trained nothing)
                total += value * len(y)
                count += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{total / max(count, 1):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.close()
        total, count = _summed([total, count], device)  # every process's
        record = {"epoch": epoch + 1, "train_loss": total / count if count or not skipped else math.nan}
        if scaler.is_enabled():
            record["skipped_steps"] = skipped
        history.append(record)
        if rank == 0:  # saved before the validation, which cannot lose the epoch's training then (its accuracy
            # joins last.pth with the next epoch's save; a resume validates a last epoch saved without one)
            out.mkdir(parents=True, exist_ok=True)
            _atomic_save({"model_name": args.model, "num_classes": num_classes, "classes": classes,
                          "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "ema": ema.module.state_dict() if ema is not None else None, "history": history,
                          "scaler": scaler.state_dict() if scaler.is_enabled() else None, "amp_dtype": amp_name,
                          "seconds": elapsed + time.time() - started, "args": vars(args)}, last)
        saved["epoch"] = epoch + 1
        if val_loader is not None:
            record["val_top1"], record["val_images"] = evaluate(ema.module if ema is not None else model, val_loader,
                                                                device, amp_dtype)
        if rank == 0:
            if not args.quiet:
                line = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
                print(f"lkfast.train: {args.model}: {line}", file=sys.stderr)
        if dist.is_initialized():
            _barrier(device)
        if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch and epoch + 1 < args.epochs:
            return {"stopped_after_epoch": epoch + 1}

    final = ema.module if ema is not None else model
    summary = {"model": args.model, "classes": classes, "epochs": args.epochs,
               "train_loss": [h["train_loss"] for h in history],
               "val_top1": history[-1].get("val_top1") if history else None,
               "val_images": history[-1].get("val_images") if history else None,
               "seconds": elapsed + time.time() - started, "world_size": world, "weights": "ema" if ema else "model",
               "recipe": {k: v for k, v in vars(args).items() if k not in ("data", "out", "quiet", "no_progress")}}
    if rank == 0:
        from lkfast.tables import write_text_atomic

        _save_weights({k: v.detach().cpu().contiguous() for k, v in final.state_dict().items()},
                      out / "model.safetensors")
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    if dist.is_initialized():
        _barrier(device)
    return summary


def main(argv=None) -> int:
    """``python -m lkfast.train``: 0 when done, 2 with one line ``lkfast.train: error: ...`` for a
    mistake in the command or the data (argparse's own usage errors exit 2 too), 130 on Ctrl-C and
    143 on SIGTERM with one line saying how to resume."""
    from lkfast.interrupt import sigterm_as_interrupt

    args = build_parser().parse_args(argv)  # usage errors before any work
    with sigterm_as_interrupt() as terminated:  # SIGTERM (Slurm, torchrun, kill) stops it as Ctrl-C does
        return _main(args, argv, terminated)


def _main(args, argv, terminated: list) -> int:
    from lkfast.interrupt import how_stopped
    from lkfast.memory import keep_freed_memory
    from lkfast.tables import is_storage_error

    try:
        keep_freed_memory()  # fewer page faults per step (see lkfast.memory; LKFAST_MALLOC=default: glibc's own)
        train(argv)
    except (ValueError, FileNotFoundError) as error:  # TrainError, a bad LKFAST_MALLOC, an unknown model
        print(f"lkfast.train: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a folder it may not write: what finished is saved
        if not is_storage_error(error):
            raise
        print(f"lkfast.train: error: {error} (free space or fix that folder's permissions, then rerun the same "
              "command: it resumes from the last saved epoch)", file=sys.stderr)
        return 2
    except TrainInterrupted as interrupted:
        stopped, status = how_stopped(terminated)
        if int(os.environ.get("RANK", "0")) == 0:
            if interrupted.epoch is None:
                print(f"\nlkfast.train: {stopped} before an epoch was saved; rerun the same command to start again",
                      file=sys.stderr)
            else:
                rerun = "rerun it without --no-resume" if args.no_resume else "rerun the same command"
                print(f"\nlkfast.train: {stopped}; {rerun} to resume from {interrupted.checkpoint} "
                      f"(epoch {interrupted.epoch})", file=sys.stderr)
        return status
    except KeyboardInterrupt:  # before training began
        stopped, status = how_stopped(terminated)
        print(f"\nlkfast.train: {stopped}", file=sys.stderr)
        return status
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
