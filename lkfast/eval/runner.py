"""The evaluation loop: models x tasks, each task's per-image work cut into shards that are cached,
resumed and spread over torchrun ranks, and results.json written as tasks finish.

    results = run_evaluation(models, tasks, EvalOptions(out="runs/x", data={"val": "/data/val"}))

Shards are fixed ranges of a dataset in its sorted order (``shard_size`` images each). A shard's
batches never cross its ends and the seeds of generated corruptions depend only on the image
index, so the numbers do not depend on how many processes ran or where a run was interrupted.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import time
import warnings
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from lkfast.eval import distributed as dist
from lkfast.eval.cache import ResultCache, files_fingerprint, read_json_object, stable_hash, tree_fingerprint
from lkfast.eval.classes import ClassSpace
from lkfast.eval.models import (ModelSpec, WeightsUnavailable, count_macs, count_parameters, load_model,
                                output_classes)
from lkfast.data.imagenet import DatasetLayoutError
from lkfast.eval.registry import TASKS, Task, TaskUnavailable
from lkfast.tables import write_text_atomic

RESULTS_FILE = "results.json"
META_KEY = "_meta"


# analysis option -> the environment variable that sets it when the option is not given
ANALYSIS_ENV = {"dino_checkpoint": "LKFAST_DINO_CHECKPOINT", "taig_surrogate": "LKFAST_TAIG_SURROGATE"}


# tasks that need ImageNet-val beside their own data, and what for (said when val is missing)
_ALSO_READS = {"imagenet-o": "its in-distribution negatives are the val images of ImageNet-O's 200 classes",
               "imagenet-c": "the clean error of relative mCE, or the images to generate it from",
               "imagenet-p": "the images to generate it from"}


class EvalError(RuntimeError):
    """A problem with the user's input (models, data, options); the message says what to change."""


class ModelError(EvalError):
    """A model that cannot be evaluated at all (e.g. its head has another class count): stops the run."""


@dataclass
class EvalOptions:
    """Everything a run needs besides the models and the task names.

    data: source name ("val", "imagenet-a", ..., see ``lkfast.eval.sources``) -> folder.
    class_space: the label set (None: ImageNet-1k). baseline: the model ImageNet-P's flip rates are
    normalised by (None: report unnormalised values only, with ``no_baseline`` as the reason).
    limit: first N images of each dataset; with spread, N images evenly spaced over each dataset's
    sorted order instead (``--subset``).
    analysis_images: the tasks that read "images" (the Section 4 analyses) read N images spread evenly
    over what limit/spread kept (``--analysis-images``), the benchmarks all of it.
    shard_size: images per cached shard. amp: bf16 autocast on the CPU, fp16 on CUDA.
    """

    out: str = "lkfast-report"
    data: Dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    batch_size: int = 64
    workers: int = 4
    amp: bool = False
    channels_last: bool = False
    limit: Optional[int] = None
    spread: bool = False
    analysis_images: Optional[int] = None  # the analyses (tasks that read "images"): N val images, spread
    seed: int = 0
    shard_size: int = 1000
    trust_checkpoint: bool = False
    baseline: Optional[ModelSpec] = None
    no_baseline: str = "no baseline model (--baseline-model none)"  # why, where baseline is None
    class_space: Optional[ClassSpace] = None
    analysis: Dict[str, str] = field(default_factory=dict)  # dino_checkpoint, taig_surrogate (Section 4 tasks)
    gpu_decode: bool = True
    progress: bool = True
    write_report: bool = True

    def analysis_option(self, name: str) -> Optional[str]:
        """An analysis option ("dino_checkpoint", "taig_surrogate"): the one given, else its
        environment variable (``ANALYSIS_ENV``), else None."""
        return self.analysis.get(name) or os.environ.get(ANALYSIS_ENV.get(name, "")) or None

    @property
    def decodes_on_gpu(self) -> bool:
        """Whether JPEG folders are decoded on the GPU: gpu_decode acts on CUDA only."""
        return self.gpu_decode and self.device.startswith("cuda")

    def numeric_key(self, reads: Sequence[str] = ()) -> Dict[str, Any]:
        """The options that change a task's numbers (part of its cache keys): amp, channels_last,
        the seed of a task that draws random numbers ("seed" in ``reads``, the task's ``Task.reads``;
        a task that draws none is keyed as seed 0, the default, so another --seed reuses its results
        and the keys made before it was left out stay valid), the GPU's JPEG decoding where it acts
        (on CUDA), and the analysis options in ``reads`` that are set, each as its value (from
        ``analysis`` or its environment variable) and, when it names a file, that file's size and
        modification time (a replaced checkpoint is a new key).

        Off the CPU two more: ``--amp``'s dtype (fp16 on CUDA, bf16 on the CPU, keyed ``True`` as
        before), and for a task that draws random numbers the generator's device type (a CUDA generator
        draws other numbers than a CPU one for the same seed). Everything else gives the CPU's numbers
        to float32 rounding on a GPU (the run keeps fp32 as fp32: no TF32, ``ieee_fp32``), so results
        are shared across devices only where they agree."""
        device_type = self.device.split(":")[0]
        amp: Any = self.amp
        if amp and device_type != "cpu":
            amp = "float16"
        key: Dict[str, Any] = {"amp": amp, "channels_last": self.channels_last,
                               "seed": self.seed if "seed" in reads else 0}
        if "seed" in reads and device_type != "cpu":
            key["generator"] = device_type
        if self.decodes_on_gpu:  # nvJPEG's pixels are not libjpeg's: --no-gpu-decode is another result
            key["decode"] = "gpu"
        used = {}
        if "images" in reads and self.analysis_images is not None:
            used["images"] = [self.analysis_images, None]
        for name in sorted(set(reads) - {"images"}):
            value = self.analysis_option(name)
            if value:
                if os.path.isfile(value):  # by its real path (see Runner) and its size and time
                    real = os.path.realpath(value)
                    used[name] = [real, files_fingerprint([real])]
                else:
                    used[name] = [value, None]
        if used:
            key["analysis"] = used
        return key


def _readable(get) -> bool:
    """Whether ``get()`` answers: torch 2.9+ refuses (RuntimeError) to read a TF32 setting through an
    API other than the one it was last set through ("a mix of the legacy and new APIs")."""
    try:
        get()
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def ieee_fp32():
    """fp32 computed in fp32 on CUDA while the evaluation runs: cuDNN's convolutions and cuBLAS's
    matrix products without TF32. PyTorch's default lets cuDNN round fp32 convolution inputs to TF32
    (10-bit mantissas) on Ampere and later GPUs, so a GPU run gave other numbers than the CPU's under
    the same cache keys; without it they agree to float32 rounding (lkfast's own GPU kernels never use
    TF32). ``--amp`` is the fast path. The settings are put back afterwards, in the order set.

    Set so that every way of reading them answers during the run, whichever way the process set them
    before (torch 2.9+ raises on reading a setting through another API than it was set through, and
    ``torch.backends.cudnn.flags(...)``, which models and libraries use, and inductor's convolutions
    read the old one): cuDNN's through ``allow_tf32 = False`` and then its convolutions' and RNNs'
    ``fp32_precision = "ieee"`` (the first alone left a process-wide ``fp32_precision = "tf32"`` in
    force; the second alone made ``allow_tf32`` unreadable); cuBLAS's through
    ``set_float32_matmul_precision("highest")`` while that reads back, else ``fp32_precision``."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    steps = []  # (read, write, value for the run): read before, written back after (read None: not), in order

    def attribute(owner, name, value, read=True):
        steps.append((read and (lambda: getattr(owner, name)), lambda v: setattr(owner, name, v), value))

    # (unreadable: the process set cuDNN's through the newer settings, which are read and put back below)
    attribute(cudnn, "allow_tf32", False, read=_readable(lambda: cudnn.allow_tf32))
    if hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        attribute(cudnn.conv, "fp32_precision", "ieee")
        attribute(cudnn.rnn, "fp32_precision", "ieee")
    if _readable(torch.get_float32_matmul_precision):
        steps.append((torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "highest"))
    if hasattr(matmul, "fp32_precision"):  # (torch 2.11's cuBLAS has only the above)
        attribute(matmul, "fp32_precision", "ieee")
    before = [read() if read else None for read, _, _ in steps]
    for _, write, value in steps:
        write(value)
    try:
        yield
    finally:
        for (read, write, _), value in zip(steps, before):
            if read:
                write(value)


def source_commit(folder: Optional[str] = None) -> Optional[str]:
    """The git commit of lkfast's source tree (``folder``: the one holding the package), with "+dirty"
    when tracked files differ from it: which code computed a results.json, where "lkfast 0.1.0" does
    not say. None for an installed copy outside a git checkout, or without git."""
    import subprocess

    import lkfast

    folder = folder or os.path.dirname(os.path.dirname(os.path.abspath(lkfast.__file__)))
    try:
        def git(*args):
            return subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(folder):
            return None  # the package sits in someone else's repository (a site-packages inside a checkout)
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _error_line(error: BaseException) -> str:
    """``Type: first line of the message`` of ``error``, for one-line reports."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is running out of memory: CUDA's OutOfMemoryError, Python's MemoryError, or
    a RuntimeError saying so: PyTorch's CPU allocator ("DefaultCPUAllocator: can't allocate memory"),
    CUDA's runtime outside PyTorch's allocator ("CUDA error: out of memory"), cuBLAS's and cuDNN's
    workspaces ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    message = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in message for sign in ("can't allocate memory", "CUDA error: out of memory", "_STATUS_ALLOC_FAILED"))


def _item_files(dataset) -> Optional[Sequence[Sequence[str]]]:
    """The files each item of ``dataset`` is read from, item by item: its ``item_files`` where it has
    them (an item read from several files, as the occlusion's image and mask), else the paths of a
    folder reader's ``samples`` ([(path, target)]); None for a dataset with neither."""
    files = getattr(dataset, "item_files", None)
    if files is not None:
        return files
    samples = getattr(dataset, "samples", None)
    return None if samples is None else [(path,) for path, _ in samples]


GENERATED_FROM_VAL = ("imagenet-c", "imagenet-p")  # generated with lkfast.corrupt where their folder is absent


def generated_data_key() -> str:
    """What benchmarks generated from val depend on beside val: the corruptions' code
    (lkfast.corrupt.VERSION), in their task results' keys and their records'."""
    from lkfast import corrupt

    return f"lkfast.corrupt {corrupt.VERSION}"


def has_folder(options: EvalOptions, name: str) -> bool:
    """Whether data source ``name`` (a benchmark's folder, val) is given and is a folder."""
    path = options.data.get(name)
    return path is not None and Path(path).is_dir()


class _Progress:
    def __init__(self, desc: str, total: Optional[int], enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr, leave=True)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self, keep: bool = True) -> None:
        if self.bar is not None:
            self.bar.leave = keep
            self.bar.close()
            self.bar = None


class TaskContext:
    """What a task's ``run(ctx)`` works with.

    Attributes: ``model`` (``Normalized``: [0, 1] images in, logits out), ``spec`` (ModelSpec),
    ``config`` (the model's data config), ``options`` (EvalOptions), ``class_space``, ``device``.
    Methods: ``source(name)`` (a data folder, or TaskUnavailable), ``dataset(name)`` (that folder as
    preprocessed images), ``forward(images)``,
    ``records(part, dataset, compute)`` (the sharded, cached, distributed per-image loop),
    ``result_of(task)`` and ``baseline_result(task)`` (other results this one builds on),
    ``generators(part, indices)`` (one seeded generator per image, for random draws) and ``seed``
    (--seed; both only for a task with "seed" in its ``reads``).
    """

    def __init__(self, runner: "Runner", task: Task, spec: ModelSpec, model, config: Dict[str, Any],
                 cache: ResultCache, is_baseline: bool = False):
        self.runner, self.task, self.spec, self.model, self.config = runner, task, spec, model, config
        self.cache, self.is_baseline = cache, is_baseline
        self.options: EvalOptions = runner.options
        self.class_space: ClassSpace = runner.class_space
        self.device = runner.device
        self.skipped: Dict[str, int] = {}
        self.sources_used: Dict[str, str] = {}
        self.progress: Optional[_Progress] = None
        self._piece: Optional[int] = None  # images per compute call that fit in memory, once one did not

    # data ------------------------------------------------------------------------------------
    def source(self, name: str) -> Path:
        """The folder of data source ``name``; TaskUnavailable naming the option to set when absent."""
        path = self.options.data.get(name)
        if path is None:
            why = f" ({self.task.name} reads it too: {_ALSO_READS[self.task.name]})" \
                if self.task.name in _ALSO_READS and name == "val" else ""
            raise TaskUnavailable(f"no {name} data{why}: pass --data-root DIR holding {name}/ or --{name}-dir DIR")
        path = Path(path)
        if not path.is_dir():
            raise TaskUnavailable(f"{name} folder not found: {path} (expected a folder; set --{name}-dir or "
                                  f"put it under --data-root as {name}/)")
        return path

    def dataset(self, name: str):
        """Data source ``name`` read as an image folder (``<class folder>/<image>``), preprocessed for
        this model, the images ``--limit`` or ``--subset`` keeps (e.g. ``ctx.dataset("val")``)."""
        from lkfast.eval.tasks import image_folder

        return image_folder(self, self.source(name), self.class_space.folder_index())

    def has_source(self, name: str) -> bool:
        return has_folder(self.options, name)

    @property
    def seed(self) -> int:
        """--seed, for a task that declares it draws random numbers (``"seed"`` in its ``reads``, so that
        the seed is part of its cache keys) or ImageNet-C/-P generated from val (their own keys hold it).
        Any other task raises RuntimeError: a result it drew with one seed would be served for another."""
        if "seed" not in self.task.reads and self.task.name not in GENERATED_FROM_VAL:
            raise RuntimeError(f"task {self.task.name!r} draws random numbers but does not declare it: register it "
                               f"with reads=(..., 'seed') so that --seed is part of its cache keys")
        return self.options.seed

    def generator(self, part: str, index: int, device: Optional[str] = None) -> torch.Generator:
        """A generator seeded by (--seed, part, dataset index of the image), on the evaluation device
        (the draws of an analysis: a CUDA generator draws on the GPU, other numbers than the CPU's for
        the same seed, so these tasks' keys hold the device type; see ``EvalOptions.numeric_key``) or
        on ``device`` ("cpu" for data that must be the same on every device: generated ImageNet-C/-P,
        as ``lkfast.data.writer`` renders them)."""
        seed = int(stable_hash([self.seed, part, int(index)], 12), 16)
        return torch.Generator(device=device or self.device).manual_seed(seed)

    def generators(self, part: str, indices: Sequence[int], device: Optional[str] = None) -> List[torch.Generator]:
        """One generator per image of a batch (``indices``: ``records``' third argument): an image's
        random draws do not depend on the batch size, the shard size, the number of ranks or which
        other images were unreadable."""
        return [self.generator(part, i, device) for i in indices]

    # compute ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 logits of [0, 1] ``images`` (N, 3, H, W) on the evaluation device, in chunks of
        ``--batch-size``, with ``--amp`` and ``--channels-last`` applied."""
        outputs = []
        amp_dtype = torch.float16 if self.device.startswith("cuda") else torch.bfloat16
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.inference_mode(), torch.autocast(device_type, dtype=amp_dtype, enabled=self.options.amp):
            for chunk in images.split(self.options.batch_size):
                chunk = chunk.to(self.device, non_blocking=True).float()
                if self.options.channels_last:
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                outputs.append(self.model(chunk).float())
        return torch.cat(outputs)

    def records(self, part: str, dataset, compute: Callable, batch_size: Optional[int] = None,
                frames: int = 1, key: Any = None) -> Dict[str, torch.Tensor]:
        """Run ``compute(images, targets, indices) -> {name: tensor with one row per item}`` over
        ``dataset`` and return each name's rows for the whole dataset, in dataset order.

        images/targets: a batch on the evaluation device (unreadable items already dropped, see
        ``skipped``); indices: the dataset index of each of its items (a list of ints; seed per-image
        random draws with ``generators(part, indices)``). part: a name unique within
        the task (e.g. "snow/3"). frames: forward passes per item (progress and throughput only).
        key: anything else that changes the records (part of the shard cache key).
        The dataset is cut into shards of ``--shard-size`` items; each finished shard is stored, a
        stored one is loaded instead of recomputed, and under torchrun the missing shards are shared
        round-robin between the ranks and gathered on every rank."""
        n = len(dataset)
        dataset = self._device_decoded(dataset)
        size = self.options.shard_size
        shards = [(s, min(s + size, n)) for s in range(0, n, size)]
        base = {"task": self.task.name, "version": self.task.version, "part": part, "n": n, "key": key,
                **({"spread": True} if self.options.spread else {}),  # (only then: other runs' keys stay)
                "options": self.options.numeric_key(self.task.reads), "config": self.config,
                "classes": self.class_space.fingerprint,
                "root": str(getattr(dataset, "root", ""))}
        files = _item_files(dataset)  # the files each item is read from: their stats join the key
        keys = [stable_hash({**base, "range": [a, b], **({"files": files_fingerprint(p for item in files[a:b] for p in item)}
                                                          if files is not None else {})}) for a, b in shards]
        stored: Dict[int, Dict[str, Any]] = {}
        if dist.is_main():
            for i, k in enumerate(keys):
                found = self.cache.load_shard(self.task.name, part, k)
                if found is not None:
                    stored[i] = found
        done = set(dist.broadcast(sorted(stored)))
        todo = [i for i in range(len(shards)) if i not in done]
        mine = todo[dist.rank()::dist.world_size()]
        if self.progress is not None:  # stored shards count as done
            self.progress.update(sum(b - a for i, (a, b) in enumerate(shards) if i in done) * frames)
        computed, failure = {}, None
        try:
            for i, records in self._compute(part, dataset, [shards[i] for i in mine], mine, compute,
                                            batch_size or self.options.batch_size, frames):
                self.cache.save_shard(self.task.name, part, keys[i], records)
                computed[i] = records
        except Exception as error:  # noqa: BLE001 (re-raised below, after the other ranks hear of it)
            if not dist.active():
                raise
            failure = error  # the other ranks wait for this one's shards in all_gather: tell them, not hang them
        shares = dist.all_gather({"records": {**stored, **computed},
                                  "error": None if failure is None else
                                  (isinstance(failure, (EvalError, DatasetLayoutError)), _error_line(failure))})
        if failure is not None:
            raise failure
        for rank, share in enumerate(shares):
            if share["error"] is not None:  # every rank fails this task alike: the run goes on (or stops) in step
                task_error, line = share["error"]
                raise (EvalError if task_error else RuntimeError)(f"{self.task.name}/{part}: rank {rank}: {line}")
        everything: Dict[int, Dict[str, Any]] = {}
        for share in shares:
            everything.update(share["records"])
        if dist.is_main():
            for i, records in everything.items():
                if i not in stored and not self.cache.shard_path(self.task.name, part, keys[i]).is_file():
                    self.cache.save_shard(self.task.name, part, keys[i], records)
        missing = [i for i in range(len(shards)) if i not in everything]
        if missing:
            raise RuntimeError(f"{self.task.name}/{part}: shards {missing} were not computed by any rank")
        skipped = sum(int(everything[i]["skipped"]) for i in range(len(shards)))
        if skipped:
            self.skipped[part] = self.skipped.get(part, 0) + skipped
        names = list(dict.fromkeys(k for i in range(len(shards)) for k in everything[i]["items"]))
        out = {}
        for name in names:
            pieces = [everything[i]["items"][name] for i in range(len(shards)) if name in everything[i]["items"]]
            out[name] = torch.cat(pieces) if pieces else torch.empty(0)
        return out

    def _device_decoded(self, dataset):
        """On CUDA (unless --no-gpu-decode), an image folder made by ``tasks.image_folder`` is read
        as file bytes and decoded on the GPU (``sources.EncodedImages``); anything else as it is."""
        from lkfast.eval.sources import EncodedImages

        if self.options.decodes_on_gpu and hasattr(dataset, "eval_resize") \
                and EncodedImages.supports(dataset, self.config):
            return EncodedImages(dataset, self.config, resize=dataset.eval_resize)
        return dataset

    def _first_batch(self, compute, images, targets, indices, part):
        """``compute`` on a part's first batch, where a model that cannot take these inputs fails (a ViT
        built for 384 px given ImageNet-C's 224 px, fed without a resize; --input-size on a fixed-size
        model): EvalError saying so, so that this task fails in one line and the others run. A failure
        on a later batch is not the inputs' shape and goes up as it is, as does an EvalError of the
        task's own (it says what failed: the occlusion's DINO, say)."""
        try:
            return compute(images, targets, indices)
        except Exception as error:  # noqa: BLE001 (KeyboardInterrupt still stops the run)
            if out_of_memory(error) or isinstance(error, EvalError):
                raise
            size = "x".join(map(str, images.shape[-2:]))
            wanted = "x".join(map(str, self.config["input_size"][-2:]))
            hint = (f"; the model's input size is {wanted} and this benchmark is fed at its own size, without a "
                    f"resize: evaluate a model that takes {size} inputs or give the benchmark at {wanted}") if size != wanted else ""
            raise EvalError(f"{self.task.name}/{part}: the model failed on its first batch of {size} images "
                            f"({_error_line(error)}){hint}") \
                from error

    def _in_pieces_that_fit(self, compute, images, targets, indices, part) -> Dict[str, torch.Tensor]:
        """``compute`` on a batch, in pieces of the largest size that fitted so far in this task. Out of
        memory (CUDA's or the host's), the batch is computed again in halves, and the task's later
        batches go in pieces of the size that fitted, with one warning: an attack's gradients or TAIG's
        21 passes per step need more memory than --batch-size's clean forward, and a run should not die
        of it hours in. Records have one row per item and per-image seeds, so pieces give the batch's
        records (up to the rounding of kernels chosen per batch size). One image that does not fit is
        an EvalError: this task fails, the others run."""
        size = min(self._piece or len(images), len(images))
        while True:
            try:
                pieces = [compute(images[a:a + size], targets[a:a + size], indices[a:a + size])
                          for a in range(0, len(images), size)]
                break
            except Exception as error:  # noqa: BLE001 (only running out of memory is handled here)
                if not out_of_memory(error):
                    raise
                if size == 1:
                    raise EvalError(f"{self.task.name}/{part}: out of memory with one image at a time "
                                    f"({type(error).__name__}): free the {self.device} device's memory, or run this "
                                    f"task with --amp or on a device with more memory") from error
                reason = _error_line(error)
            pieces = None  # (free what the failed attempt held before the next one)
            gc.collect()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            size = max(1, size // 2)
            warnings.warn(f"{self.task.name}/{part}: out of memory at {size * 2} images per batch ({reason}); going "
                          f"on at {size} for this task (the same images and seeds; --batch-size {size} starts "
                          f"there)", stacklevel=2)
            self._piece = size
        if len(pieces) == 1:
            return pieces[0]
        return {name: torch.cat([piece[name] for piece in pieces]) for name in pieces[0]}

    def _compute(self, part, dataset, ranges, indices, compute, batch_size, frames):
        """Yield (shard index, records) for each shard of ``ranges`` as it finishes."""
        if not ranges:
            return
        from lkfast.eval.sources import MixedSizes, loader_for, mixed_sizes_error

        batches, owner = [], []
        for i, (a, b) in zip(indices, ranges):
            for s in range(a, b, batch_size):
                batches.append(list(range(s, min(s + batch_size, b))))
                owner.append(i)
        last = {i: j for j, i in enumerate(owner)}
        pending: Dict[int, Dict[str, Any]] = {}
        loader = loader_for(dataset, batches, self.options, self.device)
        first = None
        for j, (images, targets, indices, skipped) in enumerate(loader):
            i = owner[j]
            shard = pending.setdefault(i, {"items": {}, "skipped": 0})
            if skipped:
                shard["skipped"] += int(skipped)
                warnings.warn(f"{self.task.name}/{part}: skipped {skipped} unreadable item(s) among dataset "
                              f"indices {batches[j][0]}..{batches[j][-1]} (counted in the report)", stacklevel=2)
            if isinstance(images, list):  # EncodedImages: decode on the evaluation device
                images, ok = dataset.decode_batch(images, self.device, indices) if images else (None, torch.ones(0, dtype=torch.bool))
                if not bool(ok.all()):
                    bad = int((~ok).sum())
                    shard["skipped"] += bad
                    warnings.warn(f"{self.task.name}/{part}: skipped {bad} undecodable JPEG(s) among dataset indices "
                                  f"{batches[j][0]}..{batches[j][-1]} (counted in the report)", stacklevel=2)
                    targets = targets[ok]
                    indices = [index for index, good in zip(indices, ok.tolist()) if good]
            if images is not None and len(images):
                size = (indices[0], tuple(images.shape[-2:]))  # one size across batches too (no resize: C, P, 9)
                first = first or size
                if size[1] != first[1]:
                    raise mixed_sizes_error(dataset, MixedSizes(first + size))
                images = images.to(self.device, non_blocking=True)
                targets = targets.to(self.device, non_blocking=True)
                run = compute if j else (lambda x, y, i: self._first_batch(compute, x, y, i, part))
                computed = self._in_pieces_that_fit(run, images, targets, indices, part)
                for name, value in computed.items():
                    shard["items"].setdefault(name, []).append(value.detach().cpu())
                if self.progress is not None:
                    self.progress.update(len(images) * frames)
            if last[i] == j:
                done = pending.pop(i)
                yield i, {"items": {k: torch.cat(v) for k, v in done["items"].items()}, "skipped": done["skipped"]}

    # other results -----------------------------------------------------------------------------
    def result_of(self, task: str) -> Dict[str, Any]:
        """This model's result for another task (computed now if it is not cached)."""
        return self.runner.task_result(self.spec, task, baseline=self.is_baseline)

    def baseline_result(self, task: str):
        """(the baseline model's result for ``task``, None) or (None, the reason there is none)."""
        return self.runner.baseline_result(task)


class Runner:
    """Evaluates models on tasks with caching; ``run()`` returns and writes results.json."""

    def __init__(self, models: Sequence[ModelSpec], tasks: Sequence[str], options: EvalOptions):
        from lkfast.eval.classes import imagenet_class_space

        # each data folder by its real path: the cache keys hold its paths, and "data" typed from another
        # folder, "/abs/data" or a link to it are the same files, whose finished work is reused
        options = dataclasses.replace(options, data={k: os.path.realpath(os.fspath(v)) for k, v in options.data.items()})
        self.models, self.tasks, self.options = list(models), list(tasks), options
        labels = [m.display for m in self.models]
        duplicates = sorted({x for x in labels if labels.count(x) > 1})
        if duplicates:
            raise EvalError(f"--models: label(s) {duplicates} used twice; give each model its own =label")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise EvalError(f"unknown task(s) {unknown}; valid: {', '.join(TASKS)}")
        if options.limit is not None and options.limit < 1:
            raise EvalError(f"--{'subset' if options.spread else 'limit'} must be a positive number of images "
                            f"(the {'N spread over' if options.spread else 'first N of'} each dataset), got {options.limit}")
        if options.analysis_images is not None and options.analysis_images < 1:
            raise EvalError(f"--analysis-images must be a positive number of images, got {options.analysis_images}")
        if options.spread and options.limit is None:
            raise EvalError("spread=True needs limit=N: the number of images to spread over each dataset (--subset N)")
        if options.shard_size < 1 or options.batch_size < 1:
            raise EvalError("--shard-size and --batch-size must be at least 1")
        if options.workers < 0:
            raise EvalError(f"--workers must be 0 (decode in this process) or more, got {options.workers}")
        try:
            self.device = dist.local_device(options.device)
        except ValueError as error:  # cuda:N under torchrun
            raise EvalError(str(error)) from None
        except RuntimeError as error:  # a name torch.device does not take
            raise EvalError(f"--device {options.device}: expected cpu, cuda or cuda:N ({error})") from None
        self.class_space = options.class_space or imagenet_class_space()
        self.out = Path(options.out)
        self._loaded: Dict[ModelSpec, Any] = {}
        self._results: Dict[tuple, Dict[str, Any]] = {}
        self._active: List[tuple] = []
        self._data_print: Optional[Dict[str, List[str]]] = None
        # tasks that failed on the user's data or options: ("model: task", message); run() names them at the end
        self.errors: List[Tuple[str, str]] = []
        self.meta: Dict[str, Any] = {}

    # models ------------------------------------------------------------------------------------
    def _load(self, spec: ModelSpec, device: str, channels_last: bool = False):
        """``spec``'s model and data config on ``device``, or ModelError naming the model where it cannot be
        evaluated: its weights unavailable, a checkpoint that does not fit it, another number of classes."""
        from lkfast.models import CheckpointError

        try:
            model, config = load_model(spec, device, self.options.trust_checkpoint, channels_last)
        except WeightsUnavailable as error:  # every task of the model would need them: stop, saying what to pass
            raise ModelError(str(error)) from error
        except CheckpointError as error:
            raise ModelError(f"model {spec.display!r}: {error}") from error
        classes = output_classes(model, config, device)
        if classes != self.class_space.num_classes:
            raise ModelError(
                f"model {spec.display!r} outputs {classes} classes, but the benchmarks are scored in "
                f"{self.class_space.name} with {self.class_space.num_classes} classes: evaluate a model with a "
                f"{self.class_space.num_classes}-class head (a checkpoint fine-tuned on it; a python -m "
                f"lkfast.train run on some of the classes: train with --num-classes "
                f"{self.class_space.num_classes} on class folders named by their wnids)")
        return model, config

    def _check_models_load(self) -> None:
        """Load each model with results still to compute (the first on its device, kept: its turn comes
        at once; the others on the CPU, one at a time) and the baseline where a task normalises by it:
        a checkpoint that does not fit the fourth model of --models, weights that are not there, a head
        of another size, each is one error naming every such model before anything is evaluated (it
        was found at that model's turn, after the models before it had been evaluated on everything,
        and stopped the run there without a report). A model whose every result is cached is not loaded."""
        # rank 0 reads the cache (as task_result does), so every rank loads the same models in the same order
        reads = dist.is_main() or not dist.active()
        working = dist.broadcast([i for i, spec in enumerate(self.models) if self._has_work(spec)] if reads else None)
        pending = [self.models[i] for i in working]
        baseline = self.options.baseline
        if (baseline is not None and (baseline.checkpoint is not None or baseline.pretrained)
                and baseline not in self.models and any("baseline" in TASKS[n].reads for n in self.tasks)):
            pending.append(baseline)
        if len(pending) > 1 and dist.is_main():
            print(f"lkfast.eval: checking that the {len(pending)} models with results to compute load before "
                  f"evaluating any: {', '.join(spec.display for spec in pending)}", file=sys.stderr, flush=True)
        failures = []
        for spec in pending:
            try:
                if spec is pending[0] and spec in self.models:
                    self._model(spec)
                else:
                    self._load(spec, "cpu")
            except ModelError as error:
                failures.append(str(error).rstrip("."))
            except FileNotFoundError as error:  # (the CLI says so up front; a baseline's then only skips normalising)
                if spec in self.models:
                    failures.append(str(error).rstrip("."))
            finally:
                gc.collect()
        if len(failures) == 1 and len(pending) == 1:
            raise ModelError(failures[0])
        if failures:
            raise ModelError(f"{len(failures)} of the {len(pending)} models cannot be evaluated, so none was: "
                             + "; ".join(failures) + ". Fix those --models/--baseline-model entries (or leave "
                             "them out) and rerun")

    def _has_work(self, spec: ModelSpec) -> bool:
        """Whether some task's result for ``spec`` is not in the cache."""
        cache = self._cache(spec)
        return any(cache.load_result(name, self.result_key(spec, TASKS[name])) is None for name in self.tasks)

    def _model(self, spec: ModelSpec):
        if spec not in self._loaded:
            model, config = self._load(spec, self.device, self.options.channels_last)
            facts = {"parameters": count_parameters(model)}
            macs = self._macs(spec, model, config)
            if macs is not None:
                facts["macs"] = macs
            self._loaded[spec] = (model, config, facts)
        return self._loaded[spec]

    def _macs(self, spec: ModelSpec, model, config) -> Optional[int]:
        """The card's multiply-adds (count_macs), or None, said in one line, when the model cannot be
        counted (a forward that fails under torch.utils.flop_counter's mode): a fact for the model
        card, not part of the evaluation, so it never stops one."""
        try:
            return count_macs(model, config["input_size"], self.device)
        except Exception as error:  # noqa: BLE001 (KeyboardInterrupt still stops the run)
            if dist.is_main():
                print(f"lkfast.eval: {spec.display}: multiply-adds not counted ({type(error).__name__}: {error}); "
                      f"the model card goes without them", file=sys.stderr, flush=True)
            return None

    def _model_card(self, spec: ModelSpec) -> Dict[str, Any]:
        """Name, checkpoint, parameters, multiply-adds and input size of a model (kept in its cache folder, so a
        fully cached run reports the same without building the model)."""
        from lkfast.eval.report import PUBLISHED_WEIGHTS, RANDOM_WEIGHTS

        path = self._cache(spec).root / "model.json"
        card = {"name": spec.name, "checkpoint": spec.checkpoint,
                "weights": "checkpoint" if spec.checkpoint else
                f"{PUBLISHED_WEIGHTS}: {spec.published_weights()}" if spec.pretrained else RANDOM_WEIGHTS}
        if spec in self._loaded:
            model, config, facts = self._loaded[spec]
            card.update(facts, input_size=list(config["input_size"]))
            if dist.is_main():
                write_text_atomic(path, json.dumps(card))
        else:  # missing or damaged (read_json_object gives None): the card goes without them
            stored = read_json_object(path) or {}
            card.update({k: v for k, v in stored.items() if k in ("parameters", "macs", "input_size")})
        return card

    def _release(self, spec: ModelSpec) -> None:
        self._loaded.pop(spec, None)
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def _cache(self, spec: ModelSpec) -> ResultCache:
        return ResultCache(self.out / "cache" / spec.key())

    def result_key(self, spec: ModelSpec, task: Task, config: Optional[Dict[str, Any]] = None) -> str:
        key = {"task": task.name, "version": task.version,
               **({"result_version": task.result_version} if task.result_version != "1" else {}),  # (other keys stay)
               "options": self.options.numeric_key(task.reads),
               "limit": self.options.limit, **({"spread": True} if self.options.spread else {}),
               "data": self._data_fingerprint(),
               "classes": [self.class_space.name, self.class_space.fingerprint],
               "baseline": self._baseline_part(task)}
        if task.depends is not None:  # (only then: the other tasks' keys stay as they were)
            key["depends"] = task.depends(self, spec)
        if task.name in GENERATED_FROM_VAL and not has_folder(self.options, task.name):
            # generated from val: the corruptions' code is the data (a rerun after a change to them, into
            # the same --out, reused the old results); the keys of benchmarks read from disk stay as they were
            key["generated"] = generated_data_key()
            if self.options.seed:  # (seed 0 keeps the keys made when every task was keyed by the seed)
                key["generated_seed"] = self.options.seed
        return stable_hash(key)

    def _baseline_part(self, task: Task):
        """The baseline's part of a result key: None for a task that reads none, [name, weights] where there
        is one; without one, None, or the reason a run gives for having none where it is not the usual one
        (the embedded default's: it is stored in the results' notes)."""
        if "baseline" not in task.reads:
            return None
        if self.options.baseline is None:
            return None if self.options.no_baseline == EvalOptions.no_baseline else ["none", self.options.no_baseline]
        return [self.options.baseline.name, self._baseline_key()]

    def _baseline_key(self) -> str:
        try:
            return self.options.baseline.key()
        except FileNotFoundError as error:  # its tasks say so (baseline_result); the key says which file
            return f"missing: {error}"

    def _data_fingerprint(self) -> Dict[str, List[str]]:
        """Data source -> [folder, fingerprint of the files under it] (one stat per file, once a run)."""
        if self._data_print is None:
            from tqdm.auto import tqdm

            # a bar only where it takes a while (a fully cached rerun on the releases' folders said nothing for
            # a minute or more), gone when done
            with tqdm(desc="data files read for the cache keys", unit=" files", file=sys.stderr, delay=2.0,
                      leave=False, dynamic_ncols=True, disable=not (self.options.progress and dist.is_main())) as bar:
                self._data_print = {k: [str(v), tree_fingerprint(str(v), bar.update)]
                                    for k, v in sorted(self.options.data.items())}
        return self._data_print

    # tasks -------------------------------------------------------------------------------------
    def task_result(self, spec: ModelSpec, name: str, baseline: bool = False) -> Dict[str, Any]:
        """``spec``'s result for task ``name``: from memory, the cache, or computed now."""
        task = TASKS[name]
        memo = (spec, name)
        if memo in self._results:
            return self._results[memo]
        if memo in self._active:
            raise RuntimeError(f"task {name!r} depends on itself")
        cache = self._cache(spec)
        key = self.result_key(spec, task) + ("-as-baseline" if baseline else "")  # a baseline run skips normalising
        found = dist.broadcast(cache.load_result(name, key) if dist.is_main() else None)
        if found is not None:
            self._results[memo] = found
            return found
        self._active.append(memo)
        try:
            model, config, _ = self._model(spec)
            ctx = TaskContext(self, task, spec, model, config, cache, is_baseline=baseline)
            total = None
            if task.count is not None:
                try:
                    total = int(task.count(ctx))
                except TaskUnavailable:
                    total = None
            ctx.progress = _Progress(f"{spec.display} {name}", total, self.options.progress and dist.is_main())
            started = time.perf_counter()
            try:
                result = dict(task.run(ctx))
            except TaskUnavailable:
                ctx.progress.close(keep=False)  # no empty bar left for a task that did not run
                raise
            finally:
                ctx.progress.close()
            result.setdefault("skipped_unreadable", sum(ctx.skipped.values()))
            if ctx.skipped:
                result.setdefault("skipped_by_part", dict(ctx.skipped))
            result.setdefault("seconds", round(time.perf_counter() - started, 3))
            result = json.loads(json.dumps(result))  # what the cache will give back next time
            if dist.is_main():
                cache.save_result(name, key, result)
        finally:
            self._active.remove(memo)
        self._results[memo] = result
        return result

    def baseline_result(self, name: str):
        spec = self.options.baseline
        if spec is None:
            return None, self.options.no_baseline
        if spec.checkpoint is None and not spec.pretrained:
            return None, (f"no weights for the baseline {spec.name!r}: pass --baseline-model {spec.name}:PATH with "
                          f"local weights (for AlexNet, torchvision's alexnet-owt-7be5be79.pth), or --pretrained "
                          f"for torchvision's published weights (its cache or the network)")
        try:
            result = self.task_result(spec, name, baseline=True)
        except (TaskUnavailable, FileNotFoundError) as error:
            return None, f"baseline {spec.display}: {error}"
        if "unavailable" in result:
            return None, f"baseline {spec.display}: {result['unavailable']}"
        return result, None

    def run(self) -> Dict[str, Any]:
        """Evaluate every model on every task; returns the results dict (also written as results.json
        on rank 0, after each task). A task whose data is absent is recorded as
        ``{"unavailable": reason}`` and the run goes on. A task whose data or options are wrong
        (EvalError, DatasetLayoutError) is recorded the same way (with ``"error"``), the other tasks
        and the report still run, and then EvalError names every such failure. One run at a time
        writes to an ``out`` folder: EvalError at once where another holds it (``_out_lock``).
        fp32 stays fp32 on a GPU (``ieee_fp32``), and ``cuda:N`` is the current device while it runs."""
        on_gpu = torch.cuda.device(self.device) if self.device.startswith("cuda:") else contextlib.nullcontext()
        with _out_lock(self.out) if dist.is_main() else contextlib.nullcontext() as locked, ieee_fp32(), on_gpu:
            if locked:  # (only where this run alone writes out: unlocked, another machine's may be live)
                _remove_leftovers(self.out)
            return self._run()

    def _run(self) -> Dict[str, Any]:
        import lkfast

        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        options = {k: v for k, v in asdict(self.options).items() if k not in ("class_space", "baseline", "data")}
        options["gpu_decode"] = self.options.decodes_on_gpu  # as it acted: never on the CPU
        self.meta = {
            "lkfast": lkfast.__version__, "lkfast_commit": source_commit(), "torch": torch.__version__,
            "python": platform.python_version(),
            "device": self.device, "device_name": torch.cuda.get_device_name(self.device)
            if self.device.startswith("cuda") else platform.processor() or platform.machine(),
            "fp32": "ieee (no TF32)",  # ieee_fp32: on a GPU, PyTorch's default rounds cuDNN's fp32 inputs to TF32
            "world_size": dist.world_size(), "options": options, "tasks": list(self.tasks),
            "data_sources": {k: str(v) for k, v in sorted(self.options.data.items())},
            "class_space": self.class_space.name,
            "class_space_is_imagenet": bool(self.class_space.published_baselines),  # the paper's values apply
            "class_space_about": self.class_space.about,
            "baseline": None if self.options.baseline is None else
            {"name": self.options.baseline.name, "checkpoint": self.options.baseline.checkpoint},
            "started": started, "command": " ".join(sys.argv),
        }
        if dist.is_main():
            self._say_which_models_leave_the_report()
        self._check_models_load()
        results: Dict[str, Any] = {}
        for spec in self.models:
            entry: Dict[str, Any] = {}
            results[spec.display] = entry
            for name in self.tasks:
                try:
                    entry[name] = self.task_result(spec, name)
                except TaskUnavailable as error:
                    entry[name] = {"unavailable": str(error)}
                    if dist.is_main():  # one line, not a warning with its source line: it is the user's data
                        print(f"lkfast.eval: {spec.display}: {name} not run: {error}", file=sys.stderr, flush=True)
                except ModelError:
                    raise
                except (EvalError, DatasetLayoutError) as error:
                    # the user's data or options are wrong for this task: the others go on, the report is
                    # written, and the run ends with the error (what finished is cached for the rerun)
                    entry[name] = {"unavailable": f"error: {error}", "error": str(error)}
                    self.errors.append((f"{spec.display}: {name}", str(error)))
                    if dist.is_main():
                        print(f"lkfast.eval: {spec.display}: {name} failed: {error}", file=sys.stderr, flush=True)
                self._write(results)
            entry["_model"] = self._model_card(spec)
            self._write(results)
            self._release(spec)
            if self.options.baseline is not None:  # its results are kept (self._results): no need to hold it
                self._release(self.options.baseline)
        self.meta["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._write(results)
        report_error = None
        if self.options.write_report and dist.is_main():
            from lkfast.eval.report import write_report

            try:
                write_report(self.out, self._with_meta(results))
            except Exception as error:  # a table or figure that could not be made: results.json stands (and the
                # other ranks wait at the barrier below for rank 0, which would never come)
                report_error = f"{type(error).__name__}: {error}"
                print(f"lkfast.eval: the report could not be written ({report_error}); every result is in "
                      f"{self.out / RESULTS_FILE}", file=sys.stderr, flush=True)
        dist.barrier()
        if report_error and not self.errors:
            raise EvalError(f"report.md not written ({report_error}): the results are complete in "
                            f"{self.out / RESULTS_FILE}; once this is fixed, python -m lkfast.eval.report {self.out} "
                            "writes the report from them without evaluating anything")
        if self.errors:
            # each message was printed (by rank 0) when its task failed and is in the report: the error names
            # the tasks (the messages stay on it as .failures for callers of run_evaluation). Under torchrun
            # the other ranks' output holds no such line, so their error points at rank 0's instead.
            written = RESULTS_FILE + (" and report.md" if self.options.write_report and not report_error else "")
            reasons = (f"the reasons are above and in {written}" if dist.is_main() else
                       f"this is rank {dist.rank()}: rank 0 printed the reasons and wrote them to {written}")
            finished = any(not t.startswith("_") and isinstance(r, dict) and "unavailable" not in r
                           for entry in results.values() for t, r in entry.items())
            error = EvalError(f"{len(self.errors)} task(s) failed ({', '.join(task for task, _ in self.errors)}): "
                              f"{reasons}; " + (f"the other tasks finished (in {self.out}); " if finished else
                                                f"no other task ran (results in {self.out}); ") +
                              "fix this and rerun: finished work is cached")
            error.failures = [f"{task}: {message}" for task, message in self.errors]
            raise error
        return self._with_meta(results)

    def _say_which_models_leave_the_report(self) -> None:
        """results.json and the report hold the models of one run. One line names the models of an
        earlier run into the same --out that this one leaves out, and how to keep them."""
        earlier = read_json_object(self.out / RESULTS_FILE) or {}  # missing or damaged: nothing to say
        now = {spec.display for spec in self.models}
        left = [name for name in earlier if name != META_KEY and name not in now]
        if left:
            print(f"lkfast.eval: {self.out / RESULTS_FILE} held {', '.join(left)}, which this run does not evaluate: "
                  "the new results.json and report cover this run's models only (to keep them, pass them to "
                  "--models too: their finished tasks are read from the cache)", file=sys.stderr, flush=True)

    def _with_meta(self, results):
        return {**results, META_KEY: self.meta}

    def _write(self, results) -> None:
        if dist.is_main():
            write_text_atomic(self.out / RESULTS_FILE, json.dumps(self._with_meta(results), indent=1, sort_keys=False))


OUT_LOCK = ".lkfast-eval.lock"  # under --out: held (flock) by the run writing there, with its pid in it
_held_lock: Optional[int] = None  # the descriptor of the OUT_LOCK this process holds, if any
_held_out: Optional[str] = None  # the folder it locks (held again there by the same process: no second lock)


def _lock_not_inherited() -> None:
    """In a process forked while this one holds an OUT_LOCK (a DataLoader worker), its copy of the
    lock's descriptor is pointed at /dev/null: a flock is released only when every descriptor of it
    is closed, and workers that outlive a run killed with -9 kept the next run out."""
    if _held_lock is not None:
        try:
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, _held_lock)  # (not closed: the number stays valid for whatever closes it later)
            os.close(devnull)
        except OSError:
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_lock_not_inherited)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists
        return True
    return True


def _remove_leftovers(out: Path) -> None:
    """Remove the temporary files that write_atomic left under ``out`` (cache shards, results,
    results.json, tables) where a run was killed mid-write: only those of processes that have ended
    (``lkfast.tables.temporary_files``), so a concurrent writer's are left alone. They were never read
    (the renamed files are), only left on disk, run after run."""
    from lkfast.tables import temporary_files

    for folder, _, _ in os.walk(out):
        for leftover in temporary_files(folder):
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def _out_lock(out: Path):
    """Held while a run writes ``out``: a second run into the same folder (the same command started
    twice, or one with other models) fails at once with EvalError naming the first one's pid; the two
    would compute the same shards twice and overwrite each other's results.json and report. The
    lock goes with the process, however it ends (processes it forks do not hold it: see
    ``_lock_not_inherited``); where the pid it names has ended, the error says so. Unlocked where
    flock is missing (Windows) or refused (some network file systems), as before. Held already by
    this process (the embedded default's preparation holds it while it trains its models), it is
    held on."""
    global _held_lock, _held_out
    if _held_out is not None and _held_out == os.path.realpath(out):
        yield True
        return
    try:
        import fcntl
    except ImportError:
        yield False
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / OUT_LOCK, "a+")
    except OSError:  # an unwritable --out fails on its first write, saying so
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            if holder.isdigit() and not _alive(int(holder)):
                raise EvalError(f"the python -m lkfast.eval that was writing to {out} (pid {holder}) has ended; "
                                f"processes it started (its data-loader workers) still hold its lock: retry in a few "
                                f"seconds (its finished work is cached)") from None
            raise EvalError(f"another python -m lkfast.eval{f' (pid {holder})' if holder.isdigit() else ''} is "
                            f"writing to {out}: wait for it to finish and rerun (its finished work is cached), or "
                            f"pass another --out") from None
        except OSError:
            yield False
            return
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        _held_lock, _held_out = handle.fileno(), os.path.realpath(out)
        try:
            yield True
        finally:
            _held_lock = _held_out = None


def run_evaluation(models: Sequence[ModelSpec], tasks: Sequence[str], options: EvalOptions) -> Dict[str, Any]:
    """Evaluate ``models`` on ``tasks`` (registered names) with ``options``; see ``Runner``."""
    import lkfast.eval.tasks  # noqa: F401  (registers the benchmarks)
    import lkfast.eval.analysis_tasks  # noqa: F401  (and the Section 4 analyses)

    return Runner(models, tasks, options).run()


def measure_throughput(model, config: Dict[str, Any], options: EvalOptions, device: str, seconds: float = 1.0) -> float:
    """Images/s of ``model`` on random [0, 1] input of its size (one warm-up batch, then batches for
    about ``seconds``), batch min(--batch-size, 16), with --amp / --channels-last applied."""
    batch = max(1, min(options.batch_size, 16))
    x = torch.rand(batch, *config["input_size"], device=device)
    amp_dtype = torch.float16 if device.startswith("cuda") else torch.bfloat16
    if options.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=amp_dtype,
                                                enabled=options.amp):
        model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        done, start = 0, time.perf_counter()
        while done == 0 or time.perf_counter() - start < seconds:
            model(x)
            done += batch
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
    return done / (time.perf_counter() - start)


def plan(models: Sequence[ModelSpec], tasks: Sequence[str], options: EvalOptions) -> List[List[Any]]:
    """The ``--dry-run`` plan: rows [model, task, images, passes per image, estimated minutes, note],
    nothing evaluated. Counts come from the datasets as found, passes per image from the task's
    ``cost`` (forward-pass equivalents), the estimate from a short measured forward throughput. A task
    whose data is laid out wrongly has the note ``fails: <the error>`` (every such task is listed, not
    only the first)."""
    import lkfast.eval.tasks  # noqa: F401
    import lkfast.eval.analysis_tasks  # noqa: F401

    runner = Runner(models, tasks, options)
    rows = []
    for spec in runner.models:
        model, config, _ = runner._model(spec)
        speed = measure_throughput(model, config, options, runner.device)
        for name in runner.tasks:
            task = TASKS[name]
            ctx = TaskContext(runner, task, spec, model, config, runner._cache(spec))
            cached = runner._cache(spec).load_result(name, runner.result_key(spec, task)) is not None
            cost = None
            try:
                count = int(task.count(ctx)) if task.count is not None else None
                cost = float(task.cost(ctx)) if task.cost is not None else 1.0
                if cached:
                    note = "cached"
                elif task.without_images:
                    note = f"no images: reads {task.without_images}"
                else:
                    note = f"{speed:.1f} img/s measured"
                if not cached and name in ("imagenet-c", "imagenet-p") and not ctx.has_source(name):
                    note += "; generating the corruptions from val is not in the estimate"
            except TaskUnavailable as error:
                count, note = None, f"not run: {error}"
            except (EvalError, DatasetLayoutError) as error:  # the run would fail this task: the plan says so for all
                count, note = None, f"fails: {error}"
            minutes = None if count is None or cached else count * cost / speed / 60 / max(dist.world_size(), 1)
            rows.append([spec.display, name, count, cost if count is not None else None, minutes, note])
        runner._release(spec)
    return rows
