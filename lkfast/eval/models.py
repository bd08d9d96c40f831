"""Model specs as the command line gives them, and loading a model for evaluation.

Every evaluated model is wrapped in ``Normalized``: it takes [0, 1] images and applies the model's
own mean/std inside, so attacks and occlusion work in pixel space and every dataset hands over
un-normalised tensors. Preprocessing (input size, crop, interpolation, mean/std) comes from the
model's ``pretrained_cfg`` through ``timm.data.resolve_data_config``. A model whose outputs are in
another class order than the class space's (a ``python -m lkfast.train`` run on some of its classes)
has them reordered there too (``ModelSpec.logit_order``), so every task reads logit i as class i.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from lkfast.eval.cache import file_hash, safe_name, stable_hash


class WeightsUnavailable(RuntimeError):
    """A model's published weights (``ModelSpec.pretrained``) are neither in the local cache nor reachable."""


def hub_unavailable(whose: str, error: BaseException, remedy: str, cache: Optional[str] = None) -> str:
    """The message for published weights (``whose``: "timm's published weights for 'x'") that ``error``
    (or the cause it was raised from) says neither the local ``cache`` (default: the Hugging Face
    cache, timm's) nor the network gave, ending with what to pass instead. For the Hugging Face hub,
    unless HF_HUB_OFFLINE is set, it says that HF_HUB_OFFLINE=1 makes a machine with no network
    fail at once (the hub retries for tens of seconds first)."""
    offline_hint = ""
    if cache is None:
        from huggingface_hub import constants

        cache = constants.HF_HUB_CACHE
        if not constants.HF_HUB_OFFLINE:
            offline_hint = "with no network, HF_HUB_OFFLINE=1 says so at once, without the hub's retries; "
    cause = error.__cause__ or error
    return (f"{whose} are neither in the local cache ({cache}) nor reachable "
            f"({type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}); {offline_hint}{remedy}")


class Normalized(nn.Module):
    """``model`` behind a (x - mean) / std layer: call it with [0, 1] images. ``.model`` is the inner net.
    With ``logit_order``, output j is the inner net's output ``logit_order[j]`` (see ``ModelSpec``)."""

    def __init__(self, model: nn.Module, mean, std, logit_order: Optional[Tuple[int, ...]] = None):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        order = None if logit_order is None else torch.tensor(logit_order, dtype=torch.long)
        self.register_buffer("logit_order", order, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        return logits if self.logit_order is None else logits.index_select(-1, self.logit_order)


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate.

    name: a RepLKNet or timm name (``source="timm"``), or a torchvision name (``source="torchvision"``,
        used for the AlexNet baseline). checkpoint: local weights file or None. label: the name in
        results.json and the report (default: the name). kwargs: extra ``create_model`` arguments
        (e.g. ``num_classes``) as (name, hashable value) pairs, part of the cache key.
        input_size: evaluate at N x N instead of the model's own input size (``--input-size``).
        logit_order: for a model whose outputs are not in the class space's order, the output each
        class of the class space reads (a permutation; ``with_training_run`` sets it from a training
        run's class list). None: output i is class i.
        pretrained: with no checkpoint, load the model's published weights (timm's hub for timm names,
        torchvision's for the baseline) from the local cache or the network (``--pretrained``),
        instead of random weights.
    """

    name: str
    checkpoint: Optional[str] = None
    label: Optional[str] = None
    source: str = "timm"
    kwargs: Tuple[Tuple[str, Any], ...] = field(default=())
    input_size: Optional[int] = None
    logit_order: Optional[Tuple[int, ...]] = None
    pretrained: bool = False

    @property
    def display(self) -> str:
        return self.label or self.name

    @classmethod
    def parse(cls, text: str, source: str = "timm", option: str = "--models") -> "ModelSpec":
        """``name[:checkpoint][=label]``, e.g. ``replknet_31b:/ckpt/31b.pth=RepLKNet-31B``.

        After a checkpoint, the text after the last '=' is the label unless it holds a '/' or the
        checkpoint including it is an existing path: ``resnet50:/runs/optim.lr=0.1/model.pth`` is a
        checkpoint and no label (append ``=label`` to label it). Raises ValueError, naming ``option``, for an empty name or
        label, or a label starting with '_' (reserved)."""
        text = text.strip()
        head, label = text, None
        if "=" in text:
            before, after = text.rsplit("=", 1)
            checkpoint = text.partition(":")[2].strip()
            in_path = bool(checkpoint) and ("/" in after or os.sep in after or os.path.exists(checkpoint))
            if not in_path:  # Hydra-style run folders (lr=0.1/) put '=' in checkpoint paths
                head, label = before, after.strip()
                if not label or label.startswith("_"):
                    raise ValueError(f"{option}: the label after '=' must be non-empty and not start with '_', "
                                     f"got {label!r} in {text!r}")
        name, _, checkpoint = head.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"{option}: expected name[:checkpoint][=label], got {text!r}")
        return cls(name, checkpoint.strip() or None, label, source)

    def check_name(self) -> None:
        """ValueError, naming the closest names, when ``name`` is not a model of its source (timm's
        registry with lkfast's RepLKNet names, or torchvision's models), so that a typo is found before
        any model of the run is evaluated."""
        if self.source == "torchvision":
            import torchvision

            if self.name not in torchvision.models.list_models():
                import difflib

                close = difflib.get_close_matches(self.name, torchvision.models.list_models(), n=3, cutoff=0.75)
                raise ValueError(f"baseline model {self.name!r} is not a torchvision model"
                                 + (f"; did you mean {', '.join(close)}?" if close else
                                    " (torchvision.models.list_models() lists them)"))
            return
        from lkfast.models.factory import check_model_name

        check_model_name(self.name)

    @property
    def architecture(self) -> str:
        """The name without its pretrained tag (``convnext_tiny.fb_in1k`` -> ``convnext_tiny``)."""
        return self.name.split(".")[0]

    @property
    def hub_weights(self) -> bool:
        """Whether the model loads its published weights (``pretrained`` and no checkpoint)."""
        return self.pretrained and self.checkpoint is None

    def check_published_weights(self, num_classes: Optional[int] = None) -> None:
        """ValueError, saying what to pass instead, when ``hub_weights`` asks for weights nobody
        publishes where timm or torchvision look: RepLKNet's (the authors' files are on GitHub, not a
        hub), or a timm name without a pretrained tag (e.g. ``cspresnet50d``: untrained); with
        ``num_classes`` (the class space's), also for timm weights with another head (``convnext_tiny.fb_in22k``:
        21841 classes; ``vit_base_patch16_224.dino``: none), before anything is downloaded."""
        if not self.hub_weights or self.source == "torchvision":
            return
        from lkfast.models.factory import replknet_hub_message

        message = replknet_hub_message(self.name)
        if message:
            raise ValueError(f"--pretrained: model {self.display!r}: {message}; give it as "
                             f"{self.name}:PATH")
        from timm.models import get_pretrained_cfg

        try:
            cfg = get_pretrained_cfg(self.name)
        except RuntimeError as error:  # timm: "Invalid pretrained tag (x) for resnet50."
            raise ValueError(f"--pretrained: model {self.display!r}: {error}") from None
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise ValueError(f"--pretrained: model {self.display!r}: timm publishes no weights for {self.name!r} "
                             f"(timm.list_models(pretrained=True) lists those it does); give a local checkpoint as "
                             f"{self.name}:PATH")
        if num_classes is not None and cfg.num_classes is not None and cfg.num_classes != num_classes \
                and "num_classes" not in dict(self.kwargs):
            head = f"a {cfg.num_classes}-class head" if cfg.num_classes else "no classifier head"
            fitting = published_with_head(self.name, num_classes)
            raise ValueError(f"--pretrained: model {self.display!r}: timm's {self.architecture}.{cfg.tag} has "
                             f"{head}, the benchmarks are scored in {num_classes} classes: " +
                             (f"name published weights with a {num_classes}-class head ({', '.join(fitting)})"
                              if fitting else f"timm publishes none with a {num_classes}-class head for this "
                              f"architecture; give a fine-tuned checkpoint as {self.architecture}:PATH"))

    def published_weights(self) -> str:
        """Which published weights ``hub_weights`` loads, as the model card names them: timm's name with
        the pretrained tag timm resolves it to (``convnext_tiny`` -> ``timm convnext_tiny.in12k_ft_in1k``),
        or torchvision's weights (``torchvision AlexNet_Weights.IMAGENET1K_V1``)."""
        return f"{self.source} " + (f"{self.architecture}.{self._published_tag()}" if self.source == "timm"
                                    else self._published_tag(full=True))

    def _published_tag(self, full: bool = False) -> str:
        """The pretrained tag of the weights ``--pretrained`` loads: timm's for the name (its default tag
        for a name without one), torchvision's DEFAULT weights' (``full``: with the enum's name)."""
        if self.source == "torchvision":
            import torchvision

            weights = str(torchvision.models.get_model_weights(self.name).DEFAULT)
            return weights if full else weights.split(".")[-1]
        from timm.models import get_pretrained_cfg

        return str(getattr(get_pretrained_cfg(self.name), "tag", None) or "default")

    def _hub_key(self) -> str:
        """The cache key's word for published weights: with the pretrained tag timm resolves the name
        to (timm's default tag for a name can change between timm versions; the results must not)."""
        return "hub-" + self._published_tag()

    def require_checkpoint(self) -> None:
        """Raise FileNotFoundError, naming the model, if ``checkpoint`` is given but is not a file
        (a training folder must go through :func:`with_training_run` first)."""
        if self.checkpoint is None or os.path.isfile(self.checkpoint):
            return
        found = ("is a folder: give the weights file (or a python -m lkfast.train output folder, which "
                 "with_training_run resolves)") if os.path.isdir(self.checkpoint) else "not found"
        raise FileNotFoundError(f"model {self.display!r}: checkpoint {self.checkpoint!r} {found}")

    def key(self) -> str:
        """Cache key: the name, the checkpoint's content hash and the extra arguments. Raises
        FileNotFoundError (``require_checkpoint``) for a checkpoint that is not a file."""
        self.require_checkpoint()
        weights = file_hash(self.checkpoint) if self.checkpoint else self._hub_key() if self.pretrained else "random"
        extra = "" if not self.kwargs else "-" + stable_hash(list(self.kwargs), 8)
        extra += "" if self.input_size is None else f"-{self.input_size}px"
        extra += "" if self.logit_order is None else "-order" + stable_hash(list(self.logit_order), 8)
        name = self.architecture if self.hub_weights else self.name  # the tag is in hub-<tag>: one entry
        return safe_name(f"{self.source}-{name}-{weights}{extra}")       # for a name with and without its tag


def published_with_head(name: str, num_classes: int) -> List[str]:
    """timm's published weights (``arch.tag`` names) for ``name``'s architecture whose head has ``num_classes``
    outputs (for ImageNet-1k: ``convnext_tiny.fb_in1k``, ..., not ``.fb_in22k`` or the headless ``.dinov3_*``)."""
    import timm
    from timm.models import get_pretrained_cfg

    return [n for n in timm.list_pretrained(name.split(".")[0] + ".*")
            if getattr(get_pretrained_cfg(n), "num_classes", None) == num_classes]


def _logit_order(spec: ModelSpec, summary_path: str, classes: list, num_classes: Optional[int],
                 class_space) -> Optional[Tuple[int, ...]]:
    """``ModelSpec.logit_order`` of a model trained with ``num_classes`` outputs whose first ones are
    the class folders ``classes`` in that order (a training run's summary.json), scored in
    ``class_space``: None when they already line up, or when the class counts differ (the runner
    refuses that, naming both). Raises ValueError for a trained class outside the class space."""
    if not classes or num_classes != class_space.num_classes or len(classes) > num_classes:
        return None
    if tuple(classes) == tuple(class_space.class_names[:len(classes)]):
        return None
    index = class_space.folder_index()
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise ValueError(f"model {spec.display!r}: it was trained on class folders that are not {class_space.name} "
                         f"classes ({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}: the \"classes\" "
                         f"of {summary_path}), so its outputs cannot be matched to the benchmarks' classes; train it "
                         f"on class folders named as {class_space.name}'s (e.g. {class_space.class_names[0]})")
    order: list = [None] * class_space.num_classes
    for output, name in enumerate(classes):
        order[index[name]] = output
    untrained = iter(range(len(classes), num_classes))  # outputs no class folder trained: the other classes'
    return tuple(next(untrained) if output is None else output for output in order)


def with_training_run(spec: ModelSpec, class_space=None) -> ModelSpec:
    """``spec`` completed from a ``python -m lkfast.train`` output: a checkpoint that is a training
    folder becomes its ``model.safetensors``, and the ``summary.json`` beside the weights supplies how
    the model was built (``kernel_sizes``, ``num_classes``) unless ``spec.kwargs`` says otherwise, so
    ``--models convnext_tiny:runs/convnext_tiny_k31`` evaluates ConvNeXt-T at kernel 31, and the input
    size it was trained at (``--input-size`` of the training) unless ``spec.input_size`` is set (the
    eval's ``--input-size`` replaces it afterwards).

    The training gave its class folders the outputs 0, 1, ... in the order its summary records
    (``classes``); when that is not the order of ``class_space`` (a ``ClassSpace``; None:
    ImageNet-1k, as the CLI's ``--models`` are scored), ``logit_order`` reorders the outputs so each
    class reads its own (e.g. three ImageNet classes trained with ``--num-classes 1000``).

    Raises FileNotFoundError for a training folder without weights, ValueError when the summary names
    another architecture than ``spec.name`` or classes outside ``class_space``. Other checkpoints come
    back unchanged."""
    import dataclasses
    import json

    if spec.checkpoint is None or spec.source != "timm":
        return spec
    checkpoint = spec.checkpoint
    if os.path.isdir(checkpoint):
        weights = os.path.join(checkpoint, "model.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"model {spec.display!r}: {checkpoint!r} is a folder without model.safetensors "
                                    f"(a finished python -m lkfast.train run writes it; give the weights file itself "
                                    f"otherwise)")
        checkpoint = weights
    summary_path = os.path.join(os.path.dirname(checkpoint), "summary.json")
    kwargs, input_size, logit_order = dict(spec.kwargs), spec.input_size, spec.logit_order
    if os.path.basename(checkpoint) == "model.safetensors" and os.path.isfile(summary_path):
        try:
            summary = json.loads(open(summary_path).read())
            trained, recipe = summary["model"], summary.get("recipe", {})
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"model {spec.display!r}: {summary_path} is not a python -m lkfast.train summary "
                             f"({error}); remove it or give the weights without it") from None
        if trained.split(".")[0] != spec.architecture:
            raise ValueError(f"model {spec.display!r}: {checkpoint} was trained as {trained!r} ({summary_path}), "
                             f"but --models names {spec.name!r}; use {trained}:{spec.checkpoint}")
        built = {"kernel_sizes": recipe.get("kernel_sizes"),
                 "num_classes": recipe.get("num_classes") or len(summary.get("classes") or []) or None}
        for key, value in built.items():
            if value is not None:
                kwargs.setdefault(key, value)
        if input_size is None:  # trained at another size than the model's own: evaluated at the trained one
            input_size = recipe.get("input_size")
        if logit_order is None and summary.get("classes"):
            if class_space is None:
                from lkfast.eval.classes import imagenet_class_space

                class_space = imagenet_class_space()
            logit_order = _logit_order(spec, summary_path, list(summary["classes"]), kwargs.get("num_classes"),
                                       class_space)
    return dataclasses.replace(spec, checkpoint=checkpoint, kwargs=tuple(sorted(kwargs.items())),
                               input_size=input_size, logit_order=logit_order)


IMAGENET_CLASSES = 1000  # the logits the benchmarks are scored in (ImageNet-1k's classes)
# What a checkpoint of another architecture is told to do, for the option that gave it (CheckpointError.with_advice).
BUILD_THE_MODEL_IT_WAS_SAVED_FROM = "build the model the checkpoint was saved from (the name before ':' in --models)"


def _torchvision_model(spec: ModelSpec, trust_checkpoint: bool) -> Tuple[nn.Module, Dict[str, Any]]:
    import torchvision

    from lkfast.models import load_checkpoint

    try:
        model = torchvision.models.get_model(spec.name, weights="DEFAULT" if spec.hub_weights else None,
                                             **dict(spec.kwargs))
    except ValueError as error:
        raise ValueError(f"baseline model {spec.name!r} is not a torchvision model ({error})") from None
    except (OSError, RuntimeError) as error:  # offline and not in TORCH_HOME's cache (URLError is an OSError)
        raise WeightsUnavailable(hub_unavailable(
            f"baseline model {spec.name!r}: torchvision's published weights", error,
            f"download them elsewhere and pass --baseline-model {spec.name}:PATH (or --baseline-model none: no "
            f"normalised mFR / mT5D)", cache=os.path.join(torch.hub.get_dir(), "checkpoints"))) from error
    if spec.checkpoint is not None:
        from lkfast.models import CheckpointError

        try:
            load_checkpoint(model, spec.checkpoint, trust_checkpoint=trust_checkpoint)
        except CheckpointError as error:
            raise error.with_advice("architecture", "pass the torchvision model it was saved from as the name "
                                    "before ':' in --baseline-model (e.g. --baseline-model alexnet:PATH)") from None
    preset = torchvision.models.get_model_weights(spec.name).DEFAULT.transforms()
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    config = {"input_size": (3, crop, crop), "interpolation": preset.interpolation.value,
              "mean": tuple(preset.mean), "std": tuple(preset.std), "crop_pct": crop / resize, "crop_mode": "center"}
    return model.eval(), config


def load_model(spec: ModelSpec, device: str = "cpu", trust_checkpoint: bool = False,
               channels_last: bool = False) -> Tuple[Normalized, Dict[str, Any]]:
    """The model of ``spec`` in eval mode on ``device``, wrapped in ``Normalized``, and its data
    config (input_size, interpolation, mean, std, crop_pct, crop_mode).

    A model with neither a checkpoint nor published weights is the same random net on every call
    (built after ``torch.manual_seed(RANDOM_WEIGHTS_SEED)``, the caller's generator left as it was):
    its cache entries (``ModelSpec.key``: "random") then hold one net's results, whichever run
    computed them.

    Raises FileNotFoundError for a missing checkpoint, ``lkfast.models.CheckpointError`` for one that
    does not fit, ValueError for an unknown name."""
    spec.require_checkpoint()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        model, config = _build(spec, trust_checkpoint)
    if spec.input_size is not None:
        config["input_size"] = (3, spec.input_size, spec.input_size)
    wrapped = Normalized(model, config["mean"], config["std"], spec.logit_order).to(device).eval()
    if channels_last:
        wrapped = wrapped.to(memory_format=torch.channels_last)
    return wrapped, config


RANDOM_WEIGHTS_SEED = 0  # the seed a model without weights is built with (load_model)


def _build(spec: ModelSpec, trust_checkpoint: bool) -> Tuple[nn.Module, Dict[str, Any]]:
    import timm.data

    if spec.source == "torchvision":
        model, config = _torchvision_model(spec, trust_checkpoint)
    else:
        from lkfast.models import create_model

        from lkfast.models.factory import CheckpointError

        kwargs = dict(spec.kwargs)
        build = functools.partial(create_model, spec.name, checkpoint=spec.checkpoint, pretrained=spec.hub_weights,
                                  trust_checkpoint=trust_checkpoint)
        try:
            try:
                model = build(**kwargs)
            except CheckpointError as error:
                if error.classes != IMAGENET_CLASSES or "num_classes" in kwargs:
                    raise
                # a 1000-class checkpoint of a family whose default head is another size (the small
                # models', 10): the head the benchmarks are scored with, so build the model with it
                model = build(**kwargs, num_classes=IMAGENET_CLASSES)
        except CheckpointError as error:
            error = error.with_advice("architecture", BUILD_THE_MODEL_IT_WAS_SAVED_FROM).with_advice(
                "headless", "the benchmarks score a model's ImageNet-1k classifier: evaluate a checkpoint saved with it")
            if error.classes is not None and "num_classes" not in kwargs:
                # num_classes is create_model's; the eval scores the benchmarks in ImageNet-1k's classes
                error = error.with_advice("classes", (
                    f" The checkpoint's classifier has {error.classes} classes; the benchmarks are scored in "
                    f"ImageNet-1k's 1000: evaluate a checkpoint with a 1000-class head (python -m lkfast.train "
                    f"--num-classes 1000 trains one on wnid folders of some of the classes)."))
            raise error from None
        except RuntimeError as error:
            if not spec.hub_weights:
                raise
            raise WeightsUnavailable(hub_unavailable(
                f"model {spec.display!r}: timm's published weights for {spec.name!r}", error,
                f"download them elsewhere and give the file as {spec.name}:PATH")) from error
        config = dict(timm.data.resolve_data_config(model=model))
    return model, config


def output_classes(model: nn.Module, config: Dict[str, Any], device: str) -> int:
    """How many logits ``model`` outputs (``num_classes`` when it says, else one forward pass)."""
    inner = getattr(model, "model", model)
    n = getattr(inner, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    with torch.inference_mode():
        return int(model(torch.zeros(1, *config["input_size"], device=device)).shape[-1])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size, device: str) -> int:
    """Multiply-adds of one forward pass of ``model`` on one image of ``input_size`` (C, H, W), as
    torch.utils.flop_counter counts them (convolutions, lkfast's depthwise op, matrix products,
    attention; not norms, activations or biases), halved: the "FLOPs" of model cards such as
    RepLKNet's and timm's, which count a multiply-add once."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *input_size, device=device)
    # no_grad, not inference_mode: FlopCounterMode counted nothing under inference_mode on CUDA
    # (pytorch/pytorch#126268, torch 2.3)
    with torch.no_grad():
        model(x)  # a first call outside the counter: a backend calibration would be counted
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops() // 2
