"""The paper's Section 4 analyses as ``python -m lkfast.eval`` tasks, and their report section.

Tasks (results.json keys per model, beside the benchmark tasks):

    occlusion         ratios, clean_top1, top1 {random, salient, non_salient: [...]}, dropped_fraction,
                      saliency ("masks", "dino" or None: random drop only, with saliency_note),
                      salient_drop_50 (top-1 change at 50% salient drop, Table 5), example (Fig. 5: the first
                      val image as a base64 PNG, its index and file, and each type's dropped patches at 50%)
    fgsm              eps, top1 (Fig. 6a), clean_top1
    pgd               eps, top1 (Fig. 6b, 5 steps), steps, steps_top1 (Fig. 6c, eps 0.006), clean_top1
    taig              surrogate, eps, success_rate (%, Table 4: error on all attacked images, as the paper's
                      script), success_rate_clean_correct, clean_top1, note (an eps the
                      20 steps of 1/255 cannot reach: 0.1 > 20/255, kept as the paper's script has it)
    lesion            candidates, counts, fraction (of the model's blocks, Fig. 7's x-axis), candidate_fraction,
                      model_blocks, mean, min, max, draws, removed, clean_top1 (Fig. 7)
    frequency         frequencies, frequencies_over_pi, top1, drop (Fig. 8), change_at_0_7pi (Table 5)
    kernel-distance   layers [{name, stage, kernel_size, weights, distance, normalized, ...}], weights, note
                      (Fig. 9; RepLKNet: the large kernel's own weights as the paper's script, merged ones named)
    feature-variance  layers, depth, variance, normalized (Fig. 10), images, indices (64 val images in a
                      random order seeded by --seed, the same for every model), seed
    ablation          name, family, kernel_size (None: no depthwise kernel; a reference row) (Tables 5, 7)

The ``ablation`` task only identifies each model's kernel size and family
(``lkfast.analysis.ablation``); the report lays out, for every family measured at two or more kernel
sizes, Table 5 (ImageNet-A/-C/-R/-O, Salient-Drop-50%, Noise-0.7π, change against ViT-B as in the
paper when the run has a ViT, else against the family's largest kernel) and Table 7 (ImageNet, -A, -R)
from the other tasks' results, and a figure of every metric against kernel size. The ``ablation``
suite runs exactly the tasks those tables need.

Data: ImageNet-val (``val``); the occlusion's salient/non-salient drops use the foreground masks
of ``masks`` (the embedded default's val-masks/) when present, else the DINO ViT-S/16 checkpoint
named by the ``LKFAST_DINO_CHECKPOINT`` environment variable, else only the random drop runs.
TAIG's surrogate follows the paper (RepLKNet-31B for ViTs, ViT-B for the others: the first model
of the run whose name matches) unless ``LKFAST_TAIG_SURROGATE`` names a model label of the run.

Occlusion, fgsm, pgd, taig, lesion and frequency run their per-image work through ``ctx.records``:
cached per ``--shard-size`` shard, resumed after an interruption, split across torchrun ranks. Their
random draws (patches, PGD starts, TAIG-R path noise, frequency noise) are seeded per image by
(``--seed``, image index), so the numbers do not depend on the shard size, batch size or number of
processes; they differ from the library sweeps' draws (one generator over the whole loader). The
lesion's removed blocks are drawn once per task (seeded).

    write_analysis_report(out, results) -> markdown text (figures under out/figures/)
"""
from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch.utils.data import Dataset

from lkfast import analysis, attacks
from lkfast.analysis import plots
from lkfast.analysis.ablation import table5_csv, table5_rows, table7_rows
from lkfast.tables import write_table
from lkfast.eval.registry import SUITES, TASKS, TaskUnavailable, register_task
from lkfast.eval.tasks import image_folder

ANALYSIS_TASKS = ("occlusion", "fgsm", "pgd", "taig", "lesion", "frequency", "kernel-distance", "feature-variance",
                  "ablation")
VARIANCE_BATCH = 64  # the paper's batch for Fig. 10


class _WithMasks(Dataset):
    """(image with its foreground mask as a fourth channel, target) from an image folder and its mask
    folder (same files), so that ``ctx.records`` carries the masks with the images; (None, target)
    when either file is unreadable."""

    def __init__(self, images, masks):
        if [Path(p).relative_to(images.root).with_suffix("") for p, _ in images.samples] != \
                [Path(p).relative_to(masks.root).with_suffix("") for p, _ in masks.samples]:
            raise TaskUnavailable(f"the masks folder {masks.root} does not hold one mask per val image "
                                  f"(same class folders and file names)")
        self.images, self.masks, self.root = images, masks, images.root
        # both files of each item join its shard's cache key (lkfast.eval.runner), as a folder reader's one file
        self.item_files = [(image, mask) for (image, _), (mask, _) in zip(images.samples, masks.samples)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image, target = self.images[index]
        mask, _ = self.masks[index]
        if image is None or mask is None:
            return None, target
        return torch.cat([image, (mask[:1] > 0.5).to(image.dtype)]), target


def _split_masks(images):
    """(images, foreground masks) of a ``_WithMasks`` batch."""
    return images[:, :3], images[:, 3] > 0.5


def _val_dataset(ctx, masks: bool = False):
    """ImageNet-val preprocessed for the model (with ``masks``: ``_WithMasks``); TaskUnavailable when empty."""
    index = ctx.class_space.folder_index()
    dataset = image_folder(ctx, ctx.source("val"), index)
    if masks:
        dataset = _WithMasks(dataset, image_folder(ctx, ctx.source("masks"), index))
    if len(dataset) == 0:
        raise TaskUnavailable(f"no images in {ctx.source('val')}")
    return dataset


def _model(ctx):
    """The model for gradient-based work: fp32, eval mode. Not re-parameterised: lkfast's RepLKNet
    already folds its BNs on the fly in eval mode, and the folded copy measured slower
    (benchmarks/results/attacks_cpu.md)."""
    return ctx.model.float().eval()


# Each analysis below runs its per-batch core (lkfast.analysis / lkfast.attacks ``*_outcomes``) through
# ``ctx.records`` (sharded, cached, resumed, spread over torchrun ranks) and turns the gathered
# per-image rows into the sweep's result with the matching ``*_summary``.

# where DINO's weights for the occlusion's saliency come from: a file, or under --pretrained (set by the CLI once
# it found them) timm's published ones; the occlusion reads both, in this order
_DINO_OPTIONS = ("dino_checkpoint", "dino_pretrained")


def _dino(checkpoint, device):
    """DINO for the occlusion's saliency: from ``checkpoint``, else (None) timm's published weights;
    loaded once for all the models of a run (each model's occlusion asks), again only when the
    file, the device or the DINO model name changes."""
    stamp = None
    if checkpoint:
        try:
            st = os.stat(checkpoint)
            stamp = (os.path.abspath(checkpoint), st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:  # (load_dino says what is wrong with it; a failed load is not remembered)
            stamp = (os.path.abspath(checkpoint), None)
    from lkfast.analysis.occlusion import DINO_MODEL
    from lkfast.models import CheckpointError

    try:
        return _load_dino(stamp, checkpoint, str(device), DINO_MODEL)
    except CheckpointError as error:
        raise error.with_advice("architecture", f"give --dino-checkpoint (or LKFAST_DINO_CHECKPOINT) the weights of "
                                                f"timm's {DINO_MODEL} (DINO ViT-S/16)") from None


@functools.lru_cache(maxsize=1)
def _load_dino(stamp, checkpoint, device, model_name):
    return analysis.load_dino(checkpoint, device, pretrained=not checkpoint)


def _saying_dino_failed(saliency, weights: str):
    """``saliency`` (DINO's) whose failure (other than running out of memory, which the runner meets
    in smaller pieces) is an EvalError naming DINO: the runner would blame the evaluated model."""
    from lkfast.analysis import occlusion
    from lkfast.eval.runner import EvalError, _error_line, out_of_memory

    def dino(images):
        try:
            return saliency(images)
        except Exception as error:  # noqa: BLE001 (KeyboardInterrupt still stops the run)
            if out_of_memory(error):
                raise
            raise EvalError(f"occlusion: the DINO ViT-S/16 that picks the salient patches ({weights}) failed on "
                            f"{images.shape[-2]}x{images.shape[-1]} images ({_error_line(error)}), not the evaluated "
                            f"model: give --dino-checkpoint timm's {occlusion.DINO_MODEL} weights") from error
    return dino


def occlusion(ctx) -> dict:
    from lkfast.analysis.occlusion import batch_saliency, occlusion_outcomes, occlusion_summary, patch_grid

    try:  # 16-px patches: a side of another size (--input-size 100, a timm model at 299) cannot be cut
        grid = patch_grid(*ctx.config["input_size"][-2:])
    except ValueError as error:
        raise TaskUnavailable(str(error)) from None
    saliency, note, source = None, None, None
    if ctx.has_source("masks"):
        saliency, source = "masks", str(ctx.source("masks"))
    else:
        checkpoint, published = (ctx.options.analysis_option(name) for name in _DINO_OPTIONS)
        if checkpoint or published:  # a file, else (--pretrained: the CLI found them) the published weights
            saliency = _saying_dino_failed(analysis.dino_saliency(_dino(checkpoint, ctx.device)),
                                           checkpoint or f"timm's published {published}")
            source = f"dino:{checkpoint or 'published ' + published}:head{analysis.DINO_HEAD}"
        else:
            note = ("salient/non-salient drops skipped: no foreground masks and no DINO checkpoint "
                    "(pass --dino-checkpoint, or set LKFAST_DINO_CHECKPOINT, to a vit_small_patch16_224.dino weights file, "
                    "or --pretrained for timm's published DINO weights)")
    dataset = _val_dataset(ctx, masks=saliency == "masks")
    modes, ratios = (analysis.MODES if saliency is not None else ("random",)), analysis.RATIOS

    def compute(images, targets, indices):
        masks = None
        if saliency == "masks":
            images, masks = _split_masks(images)
        patch_saliency = batch_saliency(images, masks, saliency, modes)
        return occlusion_outcomes(ctx.model, images, targets, ratios, modes, patch_saliency, saliency == "masks",
                                  generator=ctx.generators("val", indices))
    records = ctx.records("val", dataset, compute, key={"saliency": source, "modes": modes, "ratios": ratios})
    result = occlusion_summary(records, ratios, modes, grid, saliency=saliency)
    result["saliency"] = "dino" if callable(saliency) else saliency
    if note:
        result["saliency_note"] = note
        from lkfast.eval import distributed as dist

        if dist.is_main():  # said where the run is watched, not only in results.json and the report
            print(f"lkfast.eval: {ctx.spec.display}: occlusion: {note}", file=sys.stderr, flush=True)
    _with_salient_drop_50(result)
    example = _occlusion_example(dataset, saliency, modes, ctx.seed)
    if example is not None:
        result["example"] = example
    return result


def _with_salient_drop_50(result: dict) -> dict:
    """Adds Table 5's Salient-Drop-50%, ``salient_drop_50``: the top-1 change (dropped - clean, points)
    at the 50% salient drop, when the sweep has the salient type and that ratio."""
    if "salient" in result["top1"] and 0.5 in result["ratios"]:
        result["salient_drop_50"] = result["top1"]["salient"][result["ratios"].index(0.5)] - result["clean_top1"]
    return result


FIGURE5 = "figure5_occlusion_examples.png"
EXAMPLE_RATIO = 0.5  # the drop Fig. 5 shows
# Fig. 5's image is stored in every model's occlusion result (results.json and the cache): as JPEG at this
# quality it took 27-31 KB (base64) for five 224-px photos, as PNG 102-111 KB; drawn at ~360 px, no difference shows.
EXAMPLE_QUALITY = 95


def _occlusion_example(dataset, saliency, modes, seed: int):
    """Fig. 5's content, kept in the occlusion result so that every report draws the figure from
    results.json alone (also from a cached result, or a report rebuilt in another folder): the first
    readable val image as the model sees it (``image``: base64 JPEG at quality 95, ~30 KB for a 224-px
    photo where a PNG took ~100 KB in every model's result; older results hold a PNG), its dataset ``index`` and
    ``file``, and the patches each occlusion type of the run drops of it at ``EXAMPLE_RATIO``
    (``drops``: mode -> rows of "0"/"1", "1" dropped; random patches drawn with ``seed``: the same
    for every model of a run). None when no val image is readable."""
    import base64

    from lkfast.analysis.occlusion import PATCH_SIZE
    from lkfast.data import encode_jpeg, to_uint8

    for index in range(len(dataset)):
        image, _ = dataset[index]
        if image is not None:
            break
    else:
        return None
    x, patch_saliency = image[None], None
    if saliency == "masks":
        x, masks = _split_masks(x)
        patch_saliency = analysis.mask_saliency(masks)
    elif saliency is not None:
        patch_saliency = saliency(x)
    generator = torch.Generator().manual_seed(seed)
    drops = {mode: analysis.drop_masks(x, EXAMPLE_RATIO, mode, patch_saliency, saliency == "masks",
                                       generator=generator)[0] for mode in modes}
    samples = getattr(getattr(dataset, "images", dataset), "samples", None)  # _WithMasks reads its images' folder
    return {"index": index, "file": str(samples[index][0]) if samples else None, "ratio": EXAMPLE_RATIO,
            "patch_size": PATCH_SIZE,
            "image": base64.b64encode(encode_jpeg(to_uint8(x[0].cpu()), quality=EXAMPLE_QUALITY)).decode("ascii"),
            "drops": {mode: ["".join("1" if dropped else "0" for dropped in row) for row in mask.tolist()]
                      for mode, mask in drops.items()}}


def fgsm(ctx) -> dict:
    model, eps = _model(ctx), attacks.FGSM_EPS
    attack_set = attacks.fgsm_attacks(eps)
    records = ctx.records("val", _val_dataset(ctx), lambda x, y, indices: attacks.attack_outcomes(model, x, y, attack_set),
                          key={"eps": eps})
    return attacks.fgsm_summary(records, eps)


PGD = dict(eps_values=attacks.PGD_EPS, steps=5, steps_values=attacks.PGD_STEPS, steps_eps=0.006, alpha_ratio=0.25)


def pgd(ctx) -> dict:
    model = _model(ctx)

    def compute(x, y, indices):
        return attacks.attack_outcomes(model, x, y, attacks.pgd_attacks(**PGD, generator=ctx.generators("val", indices)))
    records = ctx.records("val", _val_dataset(ctx), compute, key=PGD)
    return attacks.pgd_summary(records, **PGD)


def _is_vit(name: str) -> bool:
    return any(key in name.lower() for key in ("vit", "deit", "beit", "swin", "eva"))


def _surrogate_spec(ctx):
    return _surrogate_for(ctx.runner, ctx.spec)


def _surrogate_for(runner, target):
    """TAIG's surrogate for ``target``: the model of the run --taig-surrogate names, else one of the
    other family (see the module docstring); TaskUnavailable where there is none."""
    wanted = runner.options.analysis_option("taig_surrogate")
    others = [s for s in runner.models if s != target]
    if wanted:
        chosen = [s for s in runner.models if s.display == wanted]
        if not chosen:
            raise TaskUnavailable(f"TAIG surrogate {wanted!r} is not a model label of this run "
                                  f"({', '.join(s.display for s in runner.models)})")
        return chosen[0]
    if _is_vit(target.name):
        chosen = [s for s in others if s.name.startswith("replknet_31b")] or \
            [s for s in others if not _is_vit(s.name)]
    else:
        chosen = [s for s in others if s.name.startswith("vit_base")] or [s for s in others if _is_vit(s.name)]
    if not chosen:
        raise TaskUnavailable("TAIG needs a surrogate model of the other family in the same run (the paper: ViT-B "
                              "for ConvNets, RepLKNet-31B for ViTs); add one to --models or name one with --taig-surrogate "
                              "to a model label of the run")
    return chosen[0]


def _surrogate_key(runner, target):
    """What TAIG's result depends on beyond its options: the surrogate chosen, by label (the result
    names it) and weights (``ModelSpec.key``); None where there is none (the task does not run)."""
    try:
        surrogate = _surrogate_for(runner, target)
    except TaskUnavailable:
        return None
    try:
        return [surrogate.display, surrogate.key()]
    except FileNotFoundError as error:  # its load says so when the task runs; the key says which file
        return [surrogate.display, f"missing: {error}"]


# TAIG-R as the paper's script runs it (lkfast.attacks.transfer_success's defaults)
TAIG = dict(eps_values=attacks.TAIG_EPS, steps=attacks.TAIG_STEPS, path_steps=attacks.TAIG_PATH_STEPS,
            alpha=attacks.TAIG_ALPHA, random_path=True)


class _Memo:
    """Recently computed tensors (least recently used dropped first) within a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget, self.items, self.held = budget_bytes, {}, 0

    @staticmethod
    def _size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    def get(self, key):
        value = self.items.pop(key, None)
        if value is not None:
            self.items[key] = value  # most recently used last
        return value

    def put(self, key, tensors) -> None:
        size = self._size(tensors)
        if size > self.budget:
            return
        old = self.items.pop(key, None)
        self.held += size - (self._size(old) if old is not None else 0)
        self.items[key] = tensors
        while self.held > self.budget:
            self.held -= self._size(self.items.pop(next(iter(self.items))))


def taig_memory_bytes() -> int:
    """LKFAST_TAIG_MEMORY_MB (default 1024) in bytes; ValueError naming the variable for anything but
    a number of megabytes >= 0. Read when TAIG first needs it (and by the CLI's checks before a run
    with TAIG), not at import: a bad value stopped every ``python -m lkfast.eval``, --help included."""
    text = os.environ.get("LKFAST_TAIG_MEMORY_MB", "1024")
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = float("nan")
    if not megabytes >= 0 or megabytes == float("inf"):
        raise ValueError(f"LKFAST_TAIG_MEMORY_MB={text!r}: expected a number of megabytes >= 0 (memory for TAIG's "
                         f"adversarial images kept across target models; 0 keeps none; default 1024)")
    return int(megabytes * 2 ** 20)


# TAIG images kept in host memory for the run's next target (LKFAST_TAIG_MEMORY_MB, default 1024; the embedded default's
# need ~15 MB, ImageNet-val's 50,000 x 3 eps do not fit and are recomputed per target). Made at TAIG's
# first batch (``_adversarials``).
_ADVERSARIALS = None


def _adversarials() -> _Memo:
    global _ADVERSARIALS
    if _ADVERSARIALS is None:
        _ADVERSARIALS = _Memo(taig_memory_bytes())
    return _ADVERSARIALS


def _digest(*tensors) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def taig(ctx) -> dict:
    from lkfast.eval.models import load_model

    spec = _surrogate_spec(ctx)
    targets = {ctx.spec.display: _model(ctx)}
    loaded = []

    def surrogate_model():  # loaded on the first shard to compute: a rerun with every shard cached needs none
        if not loaded:
            surrogate, config = load_model(spec, ctx.device, ctx.options.trust_checkpoint)
            if tuple(config["input_size"]) != tuple(ctx.config["input_size"]):
                raise TaskUnavailable(f"TAIG surrogate {spec.display!r} takes {tuple(config['input_size'])} images, the "
                                      f"target {tuple(ctx.config['input_size'])}: use models with the same input size "
                                      "(--input-size)")
            loaded.append(surrogate.float().eval())
        return loaded[0]

    def compute(x, y, indices):
        # The surrogate's images depend on the surrogate, the images and their seeds, not on the target:
        # the run's other targets of the same surrogate reuse them (20 x 21 passes per eps per batch).
        surrogate = surrogate_model()
        key = (spec.key(), repr(sorted(TAIG.items())), ctx.seed, tuple(indices), _digest(x, y))
        memo = _adversarials()
        adversarials = memo.get(key)
        if adversarials is None:
            adversarials = attacks.transfer_adversarials(surrogate, x, y, generator=ctx.generators("val", indices),
                                                         **TAIG)
            memo.put(key, [a.cpu() for a in adversarials])  # in host memory: not the GPU's for the whole run
        return attacks.transfer_outcomes(surrogate, targets, x, y, adversarials=adversarials, **TAIG)
    records = ctx.records("val", _val_dataset(ctx), compute, key={"surrogate": spec.key(), **TAIG})
    result = dict(attacks.transfer_summary(records, list(targets), **TAIG)[ctx.spec.display], surrogate=spec.display)
    note = taig_budget_note(result["eps"], result["steps"], result["alpha"])
    if note:
        result["note"] = note
    return result


def taig_budget_note(eps_values, steps: int, alpha: float):
    """A line naming the eps that TAIG's ``steps`` steps of ``alpha`` cannot reach (each step moves a
    pixel by at most alpha, so the perturbation stays within steps * alpha), or None when every eps
    is reachable. The paper's setting (20 steps of 1/255, eps up to 0.1) is kept as its script runs
    it; the report says so beside Table 4."""
    reach = steps * alpha
    short = [e for e in eps_values if e > reach + 1e-12]
    if not short:
        return None
    step = f"1/{round(1 / alpha)}" if abs(1 / alpha - round(1 / alpha)) < 1e-6 else f"{alpha:g}"
    return (f"at eps {', '.join(f'{e:g}' for e in short)} the attack never uses its whole budget: {steps} steps of "
            f"{step} move a pixel by at most {reach:.4f}, as in the paper's script, whose setting this keeps")


def lesion(ctx) -> dict:
    from lkfast.analysis.lesion import LesionPlan, lesion_outcomes, lesion_summary

    try:
        plan = LesionPlan(ctx.model, seed=ctx.seed, scope="paper")  # drawn once for every shard
    except ValueError as error:  # nothing removable: the run goes on, the report says why
        raise TaskUnavailable(str(error)) from error
    records = ctx.records("val", _val_dataset(ctx), lambda x, y, indices: lesion_outcomes(ctx.model, x, y, plan),
                          key={"removed": plan.names(), "candidates": [b.name for b in plan.candidates]})
    return lesion_summary(records, plan)


def frequency(ctx) -> dict:
    from lkfast.analysis.frequency import FREQUENCIES, NOISE_EPS, WIDTH, frequency_outcomes, frequency_summary

    def compute(x, y, indices):
        return frequency_outcomes(ctx.model, x, y, FREQUENCIES, NOISE_EPS, WIDTH, ctx.generators("val", indices))
    records = ctx.records("val", _val_dataset(ctx), compute,
                          key={"frequencies": FREQUENCIES, "eps": NOISE_EPS, "width": WIDTH})
    return _with_noise_0_7pi(frequency_summary(records, FREQUENCIES, NOISE_EPS, WIDTH))


def _with_noise_0_7pi(result: dict) -> dict:
    """Adds Table 5's Noise-0.7π column, ``change_at_0_7pi``: the top-1 change (noisy - clean, points)
    in the band centred at 0.7π, when the sweep has that band."""
    at = [i for i, f in enumerate(result["frequencies_over_pi"]) if abs(f - 0.7) < 1e-9]
    if at:
        result["change_at_0_7pi"] = -result["drop"][at[0]]
    return result


def kernel_distance(ctx) -> dict:
    try:
        return analysis.kernel_attention_distance(getattr(ctx.model, "model", ctx.model))  # not the wrapper's name
    except ValueError as error:
        raise TaskUnavailable(str(error)) from None


def feature_variance(ctx) -> dict:
    try:
        points = analysis.variance_points(ctx.model)
    except ValueError as error:  # a family whose blocks are not known: the run goes on, the report says why
        raise TaskUnavailable(str(error)) from None
    images, indices = _random_images(_val_dataset(ctx), VARIANCE_BATCH, ctx.seed)
    result = analysis.feature_map_variance(ctx.model, images.to(ctx.device), points)
    result.update(images=len(images), indices=indices, seed=ctx.seed)
    return result


def _random_images(dataset, count: int, seed: int):
    """(images (n, ...), their dataset indices): the first ``count`` readable images of a seeded random
    order of ``dataset`` (the same for every model of a run), as the paper's script draws random
    validation images: the first images of ImageNet-val in folder order are one or two classes."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    images, indices = [], []
    for index in order:
        image, _ = dataset[index]
        if image is not None:
            images.append(image)
            indices.append(index)
            if len(images) == count:
                break
    if not images:
        raise TaskUnavailable("no readable image in the validation set")
    return torch.stack(images), indices


def ablation(ctx) -> dict:
    kernel = analysis.model_kernel_size(getattr(ctx.model, "model", ctx.model))
    result = {"name": ctx.spec.name, "family": analysis.kernel_family(ctx.spec.name), "kernel_size": kernel}
    if kernel is None:
        result["note"] = "no depthwise convolution: a reference row of the ablation tables, not a family member"
    return result


def _count(ctx) -> int:
    return len(image_folder(ctx, ctx.source("val"), ctx.class_space.folder_index()))


# Forward-pass equivalents per image (a backward counts as two forwards), for --dry-run's estimate.
def _occlusion_cost(ctx) -> float:
    with_saliency = ctx.has_source("masks") or any(ctx.options.analysis_option(name) for name in _DINO_OPTIONS)
    return 1 + len(analysis.RATIOS) * (len(analysis.MODES) if with_saliency else 1)


def _pgd_cost(ctx) -> float:
    steps = [PGD["steps"]] * len(PGD["eps_values"]) + list(PGD["steps_values"])
    return 1 + sum(3 * n + 1 for n in steps)


def _lesion_cost(ctx) -> float:
    from lkfast.analysis.lesion import LesionPlan

    try:
        plan = LesionPlan(ctx.model, seed=ctx.seed, scope="paper")
    except ValueError:
        return 1
    return 1 + len(plan.counts) * plan.draws


_COSTS = {"occlusion": _occlusion_cost, "pgd": _pgd_cost, "lesion": _lesion_cost,
          "fgsm": lambda ctx: 1 + 4 * len(attacks.FGSM_EPS),  # per eps: forward + backward, then the attacked forward
          # the surrogate's 20 steps x 21 path points (forward + backward) per eps, shared by its targets; a run
          # without a surrogate plans it as not run (TaskUnavailable from _surrogate_spec, as the run says)
          "taig": lambda ctx: _surrogate_spec(ctx) and
          1 + len(TAIG["eps_values"]) * (TAIG["steps"] * (TAIG["path_steps"] + 1) * 3 + 1),
          "frequency": lambda ctx: 1 + len(analysis.frequency.FREQUENCIES)}


_RUNS = {"occlusion": occlusion, "fgsm": fgsm, "pgd": pgd, "taig": taig, "lesion": lesion, "frequency": frequency,
         "kernel-distance": kernel_distance, "feature-variance": feature_variance, "ablation": ablation}
_DESCRIPTIONS = {
    "occlusion": "Fig. 4: top-1 drop under random / salient / non-salient 16-px patch drop, 10-90%",
    "fgsm": "Fig. 6a: top-1 under FGSM, eps 0.1-0.4", "pgd": "Fig. 6b-c: top-1 under PGD over eps and steps",
    "taig": "Table 4: TAIG-R transfer attack success rate at eps 0.03/0.06/0.1",
    "lesion": "Fig. 7: top-1 with n blocks removed (10 draws per n)",
    "frequency": "Fig. 8: top-1 drop under band-limited noise, centre 0..pi",
    "kernel-distance": "Fig. 9: sorted kernel attention distance per large depthwise kernel",
    "feature-variance": "Fig. 10: normalised feature-map variance against depth",
    "ablation": "Tables 5 and 7: the kernel-size ablation (each model's kernel size and family; the tables come "
                "from the other tasks)"}
# version 2: occlusion to frequency run through ctx.records (sharded; random draws seeded per image)
_SHARDED = ("occlusion", "fgsm", "pgd", "taig", "lesion", "frequency")
# the analysis options each reads; "images" (--analysis-images): the per-image analyses read that many val images
# "seed": the tasks that draw random numbers (occlusion's random drop and Fig. 5's example, PGD's start,
# TAIG-R's paths, lesion's draws, frequency's noise, feature-variance's images): only they are computed again
# for another --seed
_READS = {name: ("images",) for name in _SHARDED}
_READS.update({"occlusion": _DINO_OPTIONS + ("images", "seed"), "pgd": ("images", "seed"),
               "taig": ("taig_surrogate", "images", "seed"), "lesion": ("images", "seed"),
               "frequency": ("images", "seed"), "feature-variance": ("seed",)})
_DEPENDS = {"taig": _surrogate_key}  # what else a result depends on (Task.depends)
# later versions: occlusion 3 (Fig. 5's example in the result), lesion 3 (fraction over the model's blocks),
# kernel-distance 2 (the large kernel's own weights, as the paper's script), feature-variance 2 (seeded random
# val images), 3 (the stem's and transitions' outputs and every residual: a ViT block's attention and MLP apart,
# as the paper's script), taig 3 (success_rate over all attacked images, as the paper's script), occlusion 4 (random
# drop: floor(K * patches), as the paper's script, was rounded)
_VERSIONS = {"occlusion": "4", "lesion": "3", "kernel-distance": "2", "feature-variance": "3", "taig": "3"}
# what the tasks that read no images read instead (--dry-run's note)
_WITHOUT_IMAGES = {"kernel-distance": "the model's depthwise kernel weights",
                   "ablation": "the model's kernel size (its tables come from the other tasks)"}
for _name in ANALYSIS_TASKS:
    if _name not in TASKS:
        _no_data = _name in _WITHOUT_IMAGES
        register_task(_name, _RUNS[_name], needs=() if _no_data else ("val",), count=None if _no_data else _count,
                      description=_DESCRIPTIONS[_name],
                      version=_VERSIONS.get(_name, "2" if _name in _SHARDED else "1"),
                      reads=_READS.get(_name, ()), cost=_COSTS.get(_name),
                      without_images=_WITHOUT_IMAGES.get(_name, ""), depends=_DEPENDS.get(_name))
SUITES.setdefault("analysis", ANALYSIS_TASKS)
# The kernel-size ablation: the tasks whose numbers Tables 5 and 7 show, and the ablation task.
SUITES.setdefault("ablation", analysis.ablation.TABLE_TASKS + ("ablation",))
# The paper's suite is Section 3's benchmarks and Section 4's analyses.
SUITES["paper"] = tuple(dict.fromkeys(SUITES["paper"] + ANALYSIS_TASKS))


# --- report ------------------------------------------------------------------------------------------

def _collect(results: Dict[str, Any], task: str) -> Dict[str, dict]:
    return {m: r[task] for m, r in results.items() if not m.startswith("_") and isinstance(r, dict)
            and isinstance(r.get(task), dict) and "unavailable" not in r[task]}


def _table(out, stem: str, heading: str, header, rows, note, csv=None) -> str:
    """A section with a table written through the project's table writer (markdown + CSV; ``csv``:
    (header, rows) of a CSV holding other columns than the markdown)."""
    md, _ = write_table(Path(out) / "tables" / stem, header, rows, caption=note, csv=csv)
    return f"{heading}\n\n{md.read_text()}\n([CSV](tables/{stem}.csv))\n"


def write_analysis_report(out, results: Dict[str, Any]) -> str:
    """The markdown of the Section 4 part of report.md (Figures 4-10, Tables 4 and 5's analysis
    columns), writing the figures under ``out/figures/``; empty when no analysis task ran."""
    figures = Path(out) / "figures"
    parts: List[str] = []
    found = {task: _collect(results, task) for task in ANALYSIS_TASKS}
    if found["occlusion"]:
        plots.plot_occlusion(found["occlusion"], figures / "figure4_occlusion.png")
        sources = {m: r.get("saliency") or "none (random only)" for m, r in found["occlusion"].items()}
        clean = ", ".join(f"{m}: {r['clean_top1']:.2f}" for m, r in found["occlusion"].items())
        parts.append("## Figure 4: occlusion\n\n![Figure 4](figures/figure4_occlusion.png)\n\n"
                     f"Top-1 drop from the clean top-1 (%; {clean}). Saliency: "
                     + ", ".join(f"{m}: {s}" for m, s in sources.items()) + ".\n")
        parts.append(_figure5_section(figures, found["occlusion"]))
    if found["fgsm"] or found["pgd"]:
        plots.plot_attacks(found["fgsm"], found["pgd"], figures / "figure6_attacks.png")
        parts.append("## Figure 6: adversarial attacks (eps in [0, 1] pixel units)\n\n"
                     "![Figure 6](figures/figure6_attacks.png)\n")
    if found["taig"]:
        from lkfast.eval.report import paper_taig

        eps = next(iter(found["taig"].values()))["eps"]
        paper = [[paper_taig(results, m, e) for e in r["eps"]] for m, r in found["taig"].items()]
        with_paper = any(v is not None for row in paper for v in row)  # the paper's beside, where comparable
        parts.append(_table(out, "table4_taig", "## Table 4: TAIG transfer attack success rate (%, lower is more robust)",
                            ["Model", "surrogate"] + [h for e in eps for h in ((f"eps = {e}", "paper") if with_paper
                                                                               else (f"eps = {e}",))],
                            # a model that is its own surrogate (--taig-surrogate naming it) was attacked white-box
                            [[m, r["surrogate"] if r["surrogate"] != m else f"{m} (itself: white-box, not a transfer)",
                              *[v for value, known in zip(r["success_rate"], row)
                                for v in ((value, known) if with_paper else (value,))]]
                             for (m, r), row in zip(found["taig"].items(), paper)],
                            "Success = misclassified after the attack, among all attacked images (as the paper's "
                            "script TAIG_test.py counts it; results.json's success_rate_clean_correct counts only "
                            "the images the model classifies correctly when clean)."
                            + (" Paper: Table 4's rate, beside a model attacked through the surrogate the paper "
                               "paired with it." if with_paper else "") + _taig_notes(found["taig"])))
    if found["lesion"]:
        plots.plot_lesion(found["lesion"], figures / "figure7_lesion.png")
        parts.append("## Figure 7: lesion study\n\n![Figure 7](figures/figure7_lesion.png)\n\n"
                     + _lesion_caption(found["lesion"]))
    if found["frequency"]:
        plots.plot_frequency(found["frequency"], figures / "figure8_frequency.png")
        parts.append("## Figure 8: noise frequency\n\n![Figure 8](figures/figure8_frequency.png)\n\n"
                     + _frequency_caption(found["frequency"]))
    if found["kernel-distance"]:
        plots.plot_kernel_distance(found["kernel-distance"], figures / "figure9_kernel_distance.png")
        parts.append("## Figure 9: kernel attention distance\n\n![Figure 9](figures/figure9_kernel_distance.png)\n\n"
                     "Each channel's Σ|w|·r / Σ|w|, r the tap's distance from the centre over the kernel's corner "
                     "distance (0: all weight at the centre, 1: all in the corners), channels sorted; dotted: a kernel "
                     "of equal |w| at every tap (no spatial preference) of that size. "
                     + _kernel_weights_line(found["kernel-distance"]))
    if found["feature-variance"]:
        plots.plot_feature_variance(found["feature-variance"], figures / "figure10_feature_variance.png")
        images = sorted({r.get("images") for r in found["feature-variance"].values()} - {None})
        parts.append("## Figure 10: feature-map variance\n\n![Figure 10](figures/figure10_feature_variance.png)\n\n"
                     "Each image's spatial variance of the features, averaged over images and channels, at the "
                     "stem's and transitions' outputs and after every residual addition (a ViT block's attention "
                     "and MLP apart), each model's curve divided by its own largest value"
                     + (f"; {' / '.join(map(str, images))} random val images" if images else "") + ".\n")
    ablation_text, families = _ablation_report(out, results, found["ablation"])
    if not families and (found["occlusion"] or found["frequency"]):  # else the ablation's Table 5 holds them
        models = sorted(set(found["occlusion"]) | set(found["frequency"]))
        rows = [[m, found["occlusion"].get(m, {}).get("salient_drop_50"),
                 found["frequency"].get(m, {}).get("change_at_0_7pi")] for m in models]
        if any(v is not None for row in rows for v in row[1:]):  # a table of dashes only says nothing
            parts.append(_table(out, "table5_analysis", "## Table 5 (analysis columns): top-1 change (points)",
                                ["Model", "Salient-Drop-50%", "Noise-0.7π"], rows, None))
    if ablation_text:
        parts.append(ablation_text)
    return "\n".join(parts)


def _figure5_section(figures: Path, found: Dict[str, dict]) -> str:
    """Fig. 5 drawn from the first model's occlusion example (the same image and drops for every
    model of the same input size), or a line saying why there is none."""
    import base64
    import io

    from lkfast.data import load_image

    heading = "### Figure 5: occlusion examples\n\n"
    label, example = next(((m, r["example"]) for m, r in found.items() if r.get("example")), (None, None))
    if example is None:
        return heading + ("Not drawn: the occlusion results hold no example image (computed by an older lkfast; "
                          "rerun python -m lkfast.eval to compute them again).\n")
    image = load_image(io.BytesIO(base64.b64decode(example["image"])))
    drops = example["drops"]  # in the paper's order: the cache stores results with their keys sorted
    masks = {f"{mode.replace('_', '-')} drop {round(100 * example['ratio'])}%":
             torch.tensor([[c == "1" for c in row] for row in drops[mode]]) for mode in analysis.MODES if mode in drops}
    plots.plot_occlusion_examples(image, masks, figures / FIGURE5, patch_size=example["patch_size"])
    return (heading + f"![Figure 5](figures/{FIGURE5})\n\nVal image {example['index']}"
            + (f" ({Path(example['file']).name})" if example.get("file") else "")
            + f" as {label} sees it, and the patches each occlusion type drops at {round(100 * example['ratio'])}%.\n")


def _lesion_caption(found: Dict[str, dict]) -> str:
    """What each model's lesion drew from: a curve is only comparable with one drawn over the same kind
    of candidates (the default's ResNet-tiny can lose one block of eight, its ViT any of four)."""
    def one(m, r):
        candidates, blocks = r.get("candidates") or [], r.get("model_blocks")
        return f"{m}: {len(candidates)} of {blocks} blocks" if blocks else f"{m}: {len(candidates)} blocks"

    scopes = sorted({r.get("scope") for r in found.values()} - {None})
    draws = sorted({r.get("draws_per_count") for r in found.values()} - {None})
    return ("Top-1 (line: mean; band, or bars set side by side for a model with one or two counts: min to max over "
            + (" / ".join(map(str, draws)) or "the") + " draws per count) with blocks removed at random (each "
            "replaced by its skip connection) from each model's candidates" + (f" (scope {', '.join(scopes)}: for a staged model its widest stage, as the paper's "
                            "script draws from RepLKNet-31B's 18 third-stage blocks; for a ViT every block)"
                            if scopes == ["paper"] else "") + "; the x axis counts them against all the "
            "model's blocks. Candidates: " + "; ".join(one(m, r) for m, r in found.items()) + ". Curves over "
            "candidates of another kind or number are not compared on equal terms.\n")


def _frequency_caption(found: Dict[str, dict]) -> str:
    """The noise of Fig. 8: amplitude, band width, images, as the results say."""
    settings = sorted({(r.get("eps"), r.get("width"), r.get("images")) for r in found.values()}, key=str)
    said = [f"ε = {eps:g}, band {width / math.pi:.2g}π wide, {n} val images" for eps, width, n in settings
            if None not in (eps, width, n)]
    return ("Top-1 drop (points) under sign noise of amplitude ε kept to a square frequency band centred at each "
            "frequency (0 to π, π the Nyquist frequency)" + (f"; {'; '.join(said)}" if said else "") + ".\n")


def _taig_notes(found: Dict[str, dict]) -> str:
    """" Note: ..." for every distinct TAIG setting of the run whose steps cannot reach an eps (from
    each result's eps, steps and alpha, so a result cached before the note existed gets it too)."""
    notes = dict.fromkeys(taig_budget_note(r["eps"], r["steps"], r["alpha"]) for r in found.values()
                          if {"eps", "steps", "alpha"} <= set(r))
    return "".join(f" Note: {note[0].upper()}{note[1:]}." for note in notes if note)


def _kernel_weights_line(found: Dict[str, dict]) -> str:
    """Which weights Fig. 9 measured for each model (lkfast.analysis.kernels), the merged ones named."""
    from lkfast.analysis.kernels import CONV_WEIGHT, LARGE_KERNEL, MERGED_KERNEL

    said = {LARGE_KERNEL: "the large kernels' own weights (lkb_origin.conv.weight, as the paper's script)",
            MERGED_KERNEL: "the merged kernels (re-parameterised checkpoint: BNs and the small kernel folded in, "
                           "scaled per channel unlike the paper's script)",
            CONV_WEIGHT: "the depthwise convolutions' weights"}
    by_text: Dict[str, List[str]] = {}  # one line per kind of weights, naming its models
    for m, r in found.items():
        by_text.setdefault(", ".join(said.get(w, w) for w in r.get("weights", [])) or "not recorded", []).append(m)
    from lkfast.eval.report import models_named

    return "Weights measured: " + "; ".join(f"{models_named(ms, list(found))}: {text}"
                                            for text, ms in by_text.items()) + ".\n"


def _ablation_report(out, results: Dict[str, Any], found: Dict[str, dict]):
    """(markdown, families): Tables 5 and 7 and the ablation figure, one table pair per family
    measured at two or more kernel sizes; a line saying why when the ablation task ran but no such
    family exists."""
    if not found:
        return "", {}
    from lkfast.analysis.ablation import TABLE5_COLUMNS, TABLE7_COLUMNS, ablation_families

    families = ablation_families({m: (r["family"], r["kernel_size"]) for m, r in found.items()})
    if not families:
        sizes = ", ".join(f"{m}: {r['family']} k={r['kernel_size']}" for m, r in found.items())
        return ("## Tables 5 and 7: kernel-size ablation\n\nNo family was measured at two or more kernel sizes "
                f"({sizes}); add the same architecture at other kernel sizes to --models (e.g. replknet_31b and "
                "replknet_3b, or convnext_tiny trained with python -m lkfast.train --kernel-sizes K).\n"), {}
    vits = [m for m, r in found.items() if r["kernel_size"] is None and _is_vit(r["name"])]
    parts = ["## Tables 5 and 7: kernel-size ablation\n"]
    for family, members in families.items():
        reference = vits[0] if vits else members[-1][1]
        against = (f"against {reference} (a ViT, as the paper compares with ViT-B)" if vits
                   else f"against the largest kernel, {reference}")
        parts.append(_table(out, f"table5_ablation_{family}", f"### Table 5 layout: {family}",
                            ["Model", "Kernel"] + [h for h, _, _ in TABLE5_COLUMNS],
                            table5_rows(results, members, reference),
                            f"Top-1 (%) on ImageNet-A/-R, mean top-1 over the corruptions at severity 5 on "
                            f"ImageNet-C, AUPR (%) on ImageNet-O, top-1 change (points) at 50% salient drop and under "
                            f"noise at 0.7π; in brackets the difference {against}.",
                            csv=table5_csv(results, members, reference)))
        parts.append(_table(out, f"table7_ablation_{family}", f"### Table 7 layout: {family}",
                            ["Model", "Kernel"] + [h for h, _, _ in TABLE7_COLUMNS], table7_rows(results, members),
                            "Top-1 (%) on ImageNet (the clean set), ImageNet-A and ImageNet-R."))
    columns = tuple(dict.fromkeys(TABLE7_COLUMNS + TABLE5_COLUMNS))
    try:
        plots.plot_ablation(results, families, columns, Path(out) / "figures" / "ablation_kernel_size.png")
        parts.append("![kernel-size ablation](figures/ablation_kernel_size.png)\n\nBars on a top-1: its 95% "
                     "interval over the images scored (each panel has its own y range).\n")
    except ValueError as error:  # no metric measured: the tables say "—"
        parts.append(f"(No figure: {error}.)\n")
    labels = [label for members in families.values() for _, label in members]
    missing = [t for t in dict.fromkeys(t for _, t, _ in columns)
               if not any(isinstance(results[m].get(t), dict) and "unavailable" not in results[m][t] for m in labels)]
    if missing:
        parts.append("Columns not measured: " + ", ".join(missing) + " (not in --suite, or no data: see \"Not run\" "
                     "below; --suite ablation runs them all).\n")
    return "\n".join(parts), families
