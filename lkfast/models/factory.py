"""``create_model``: RepLKNet or any timm model, weights from a local checkpoint, fast layers swapped in.

Checkpoints are untrusted input. They are read with ``torch.load(weights_only=True)`` (tensors,
containers and a short allow-list of harmless types that training scripts store beside the weights,
such as ``argparse.Namespace``) or with safetensors; arbitrary pickled objects are refused unless the
caller passes ``trust_checkpoint=True`` (the eval CLI's ``--trust-checkpoint``).
"""
from __future__ import annotations

import argparse
import warnings
import errno
import os
import pickle
import re
import struct
import sys
from pathlib import Path
from collections.abc import Mapping
from typing import Optional

import timm
import torch
import torch.nn as nn

import lkfast.models.replknet  # noqa: F401  (registers the RepLKNet names with timm)
from lkfast.nn import patch_model

# Wrappers training scripts put around the weights, tried in this order (plain weights before EMA);
# "module": RepLKNet-pytorch's fine-tuning loader reads --model_key model|module.
CHECKPOINT_KEYS = ("model", "state_dict", "module", "state_dict_ema", "model_ema")
EMA_KEYS = ("state_dict_ema", "model_ema")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 5  # how many keys of each kind a mismatch error lists


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says why. ``classes``: the
    checkpoint classifier's outputs where they are what does not fit (else None).

    The message is a sequence of parts, some of them advice of a kind ("classes": the classifier's size,
    "architecture": the weights of another model) that a caller who knows better words for its own
    users replaces with ``with_advice`` (``python -m lkfast.eval`` names its options there)."""

    classes = None

    def __init__(self, *parts, classes=None):
        """``parts``: strings, or (kind, advice) pairs; the message is their texts joined."""
        self.parts = tuple(p if isinstance(p, tuple) else (None, p) for p in parts)
        self.classes = classes
        super().__init__("".join(text for _, text in self.parts))

    def with_advice(self, kind: str, advice: str) -> "CheckpointError":
        """This error with its advice of ``kind`` (where it has one) in the words ``advice``."""
        if all(k != kind for k, _ in self.parts):
            return self
        return CheckpointError(*((k, advice if k == kind else text) for k, text in self.parts), classes=self.classes)




def _safe_globals() -> list:
    allowed = [argparse.Namespace]
    try:  # numpy scalars and dtypes (e.g. a best metric stored as np.float64)
        import numpy as np

        try:
            from numpy._core.multiarray import scalar
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import scalar
        allowed += [scalar, np.dtype] + [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    except ImportError:
        pass
    return allowed


# How the files torch.load reads begin: a zip archive (torch.save since 1.6) or a pickle of protocol 2+ (older).
_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")
# Reasons of the weights-only unpickler that mean it met a Python object it does not allow (an unsupported
# global, a call, an object of another type), as opposed to bytes that are no pickle at all.
_REFUSED_OBJECT_MARKS = ("GLOBAL", "Can only", "Trying to call")


def _file_start(path: str, size: int = 64) -> bytes:
    with open(path, "rb") as file:
        return file.read(size)


def _unreadable(path: str, reason: str) -> CheckpointError:
    """The error for a file that is no checkpoint, or a damaged one: names it, its first bytes and why."""
    start = _file_start(path)
    html = b"<html" in start.lower() or start.lstrip().lower().startswith(b"<!doctype")
    hint = (" It is an HTML page, not weights: the download link returned a web page (Google Drive does for large "
            "files, asking to confirm); download the file itself." if html else
            " Download or save it again." if start else " The file is empty.")
    return CheckpointError(f"{path!r} is not a readable checkpoint: it is corrupt, truncated or another kind of file "
                           f"({reason}); its first bytes: {start[:32]!r}.{hint}")


def _unpickler_reason(error: Exception) -> str:
    """The weights-only unpickler's own reason, from torch's longer message around it."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1].strip()
    return text.splitlines()[0].split(" Please use ")[0].strip() if text else type(error).__name__


def _missing_class(error: Exception) -> str:
    """What unpickling could not import, from its AttributeError ("Can't get attribute 'Foo' on <module
    '__main__'...>") or ImportError: "class Foo of __main__ (...)", "module trainer"."""
    found = re.match(r"Can't get attribute '([^']+)' on <module '([^']+)'", str(error))
    if found:
        name, module = found.groups()
        if module == "__main__" or module.endswith(".__main__"):  # here __main__ is this command's own module
            return f"class {name} of __main__ (a class of the script that saved it)"
        return f"class {name} of module {module}"
    name = getattr(error, "name", None)
    return f"module {name}" if name else "a class"


def _check_records(path: str) -> None:
    """CheckpointError where a record of the zip archive ``path`` fails its CRC-32: bytes damaged after
    torch.save wrote them (a bad disk or copy) load without any error from torch.load, which does not
    check (one pass over the file, ~0.1 s for 256 MB from the page cache). Records stored without a
    checksum (CRC 0) are passed over."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:
                    continue
                with archive.open(info) as record:  # raises BadZipFile at the end of a record whose CRC differs
                    while record.read(1 << 20):  # (16 MiB chunks stayed in the heap after the read)
                        pass
    except zipfile.BadZipFile as error:
        raise _unreadable(path, f"the zip archive's check: {error}; the file was damaged after it was "
                                f"written") from None


def read_checkpoint(path: str, trust_checkpoint: bool = False) -> object:
    """The object stored in ``path`` (.safetensors, or a torch .pth/.pt/.bin file), loaded on the CPU.

    Raises FileNotFoundError for a missing file and ``CheckpointError`` for a directory, a file that is
    not a checkpoint or is damaged (naming its first bytes; damage inside a zip archive is found by
    its records' CRC-32s, which torch.load does not check; .safetensors and pre-1.6 pickles carry none)
    and for a pickle holding Python objects beyond tensors and plain containers unless
    ``trust_checkpoint``.

    The tensors of a zip archive (what ``torch.save`` writes) are mapped from the file, copy-on-write:
    writing to them never changes the file, but truncating or rewriting the file in place while they
    are alive does change them (or ends the process with SIGBUS); clone what you keep."""
    if os.path.isdir(path):
        inside = sorted(p.name for p in Path(path).iterdir() if p.suffix in (".pth", ".pt", ".bin", ".safetensors"))
        raise CheckpointError(f"checkpoint {path!r} is a folder, not a weights file: pass the file itself"
                              + (f" (it holds {', '.join(inside[:5])})" if inside else ""))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}")
    if str(path).endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except SafetensorError as error:
            raise _unreadable(path, f"safetensors: {error}") from None
    start = _file_start(path)
    if not start.startswith(_TORCH_FILE_STARTS):
        raise _unreadable(path, "neither the zip archive torch.save writes nor a pickle")
    # A zip archive is mapped, not read: its tensors stay in the file (copy-on-write) until used, so
    # loading them into a model holds the weights once in memory, not twice. Older pickles cannot be.
    mmap = start.startswith(_TORCH_FILE_STARTS[0])
    try:
        if trust_checkpoint:
            loaded = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        else:
            with torch.serialization.safe_globals(_safe_globals()):
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if mmap:
            _check_records(path)
        return loaded
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(error)
        if trust_checkpoint or not any(mark in reason for mark in _REFUSED_OBJECT_MARKS):
            raise _unreadable(path, f"unpickling: {reason}") from None
        raise CheckpointError(
            f"refusing to unpickle {path!r}: it stores Python objects beyond tensors and plain containers, and "
            f"unpickling can run arbitrary code ({reason}). Convert it to a plain state_dict or .safetensors, or, "
            f"if you trust where the file came from, pass trust_checkpoint=True (--trust-checkpoint on the "
            f"command line)."
        ) from None
    except (AttributeError, ImportError) as error:
        # unpickling a trusted file imports the classes of the objects it holds: one not importable here (a
        # class of the training script, pickled as __main__.Foo; a module of another code base) cannot be built
        if not trust_checkpoint:
            raise
        raise CheckpointError(
            f"{path!r} cannot be unpickled here: it holds an object of {_missing_class(error)}, which this Python "
            f"cannot import ({type(error).__name__}: {error}). Save a plain state_dict (torch.save(model.state_dict(), "
            f"path)) or .safetensors from where it was made, or make that class importable here (its module on "
            f"PYTHONPATH)."
        ) from None
    except EOFError:
        raise _unreadable(path, "it ends early") from None
    except (struct.error, IndexError) as error:  # the weights-only unpickler reading past the end of a cut pickle
        raise _unreadable(path, f"unpickling: {type(error).__name__}: {error}") from None
    except OSError as error:  # torch's zip reader seeking before the start of an archive cut short
        if error.errno != errno.EINVAL:
            raise
        raise _unreadable(path, f"reading the zip archive: {error}") from None
    except RuntimeError as error:  # torch's zip reader and legacy loader report damage as RuntimeError
        first_line = str(error).splitlines()[0] if str(error) else ""
        if "zip archive" in first_line or "EOF" in first_line or "corrupt" in first_line:
            raise _unreadable(path, first_line.split(". This is an internal")[0]) from None
        raise


def _without_wrapper_prefixes(key: str) -> str:
    """``key`` without the ``module.`` / ``_orig_mod.`` prefixes wrappers nest in any order
    (``_orig_mod.module.x``: torch.compile of a DDP model; ``module._orig_mod.x``: DDP of a compiled one)."""
    while True:
        prefix = next((p for p in _STRIPPED_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            return key
        key = key[len(prefix):]


def extract_state_dict(checkpoint: object, checkpoint_key: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: unwrapped from ``model``/``state_dict``/``state_dict_ema``/
    ``model_ema`` (or ``checkpoint_key``), with ``module.`` / ``_orig_mod.`` prefixes removed. A whole
    pickled model (``torch.save(model)``, read with ``trust_checkpoint``), there or at the top,
    gives its ``state_dict()``."""
    if isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint.state_dict()
    elif isinstance(checkpoint, Mapping):
        checkpoint = {k: v.state_dict() if isinstance(v, nn.Module) else v for k, v in checkpoint.items()}
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"expected a checkpoint holding a dict of tensors, found {type(checkpoint).__name__}")
    state = checkpoint
    if checkpoint_key is not None:
        if checkpoint_key not in checkpoint:
            raise CheckpointError(f"checkpoint has no key {checkpoint_key!r}; its top-level keys: {sorted(checkpoint)[:10]}")
        state = checkpoint[checkpoint_key]
    else:
        for key in CHECKPOINT_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                state = checkpoint[key]
                ema = [k for k in EMA_KEYS if k != key and isinstance(checkpoint.get(k), Mapping)]
                if ema and key not in EMA_KEYS:  # which weights are evaluated matters: say it
                    warnings.warn(f"the checkpoint holds both {key!r} and {ema[0]!r} weights: loading {key!r} "
                                  f"(checkpoint_key={ema[0]!r} loads the EMA weights; for python -m lkfast.eval, "
                                  f"save them to a file of their own)", stacklevel=3)
                break
    if not isinstance(state, Mapping):
        raise CheckpointError(f"expected a dict of tensors under the checkpoint key, found {type(state).__name__}")
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        tensors[_without_wrapper_prefixes(key)] = value
    if not tensors:
        raise CheckpointError(
            f"no tensors found in the checkpoint (top-level keys: {sorted(map(str, checkpoint))[:10]}); "
            f"name the entry holding the weights with checkpoint_key=..."
        )
    return tensors


def _listing(kind: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN]) + (", ..." if len(items) > _SHOWN else "")
    return f"{len(items)} {kind}: {shown}"


def _load_remapped(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Load ``state`` through the renaming timm applies to the original checkpoints of the model's
    family (the ``checkpoint_filter_fn`` of its timm module: e.g. facebookresearch/ConvNeXt's
    ``downsample_layers.*`` / ``stages.i.j.dwconv`` -> timm's ``stem.*`` / ``stages.i.blocks.j.conv_dw``).
    Only for a checkpoint whose key names differ from the model's (a file with the model's own
    names but other shapes is not adapted: that would hide a wrong model or size). True if the
    renamed weights load strictly."""
    remap = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if not callable(remap) or set(state) == set(model.state_dict()):
        return False
    try:
        model.load_state_dict(remap(dict(state), model), strict=True)
        return True
    except Exception:  # noqa: BLE001 (a filter meeting a layout it does not know may fail in any way)
        return False


def load_checkpoint(model: nn.Module, path: str, trust_checkpoint: bool = False,
                    checkpoint_key: Optional[str] = None) -> nn.Module:
    """Load a local checkpoint into ``model`` with strict key and shape checking. A timm model also
    takes its family's original checkpoint layout, renamed as timm renames it (e.g. the ConvNeXt
    authors' files).

    Raises ``CheckpointError`` listing the missing keys, unexpected keys and shape mismatches (the
    first few of each, with counts) when the checkpoint does not fit.
    """
    state = extract_state_dict(read_checkpoint(path, trust_checkpoint), checkpoint_key)
    try:
        model.load_state_dict(state, strict=True)
        return model
    except RuntimeError:
        pass
    if _load_remapped(model, state):
        return model
    # RepLKNet switches to the checkpoint's (merged or unmerged) form inside load_state_dict, so the
    # model's keys are read after the failed attempt.
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [_listing(kind, items) for kind, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
    parts, classes = [f"checkpoint {path!r} does not fit {type(model).__name__}: " + "; ".join(problems) + "."], None
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    if f"{classifier}.weight" in state and f"{classifier}.weight" in expected \
            and state[f"{classifier}.weight"].shape[0] != expected[f"{classifier}.weight"].shape[0]:
        classes = int(state[f"{classifier}.weight"].shape[0])
        parts.append(("classes", f" The checkpoint's classifier has {classes} classes: pass num_classes={classes}."))
    shared = len(expected) - len(missing)
    if missing and not unexpected and not shapes and all(k.startswith(classifier + ".") for k in missing):
        parts += [f" The checkpoint has no classifier (no {classifier}.* weights): it holds the features alone (saved "
                  f"without the head, or from pre-training); ",
                  ("headless", "load one saved with its classifier, or build the model with num_classes=0 for "
                               "its features")]
    elif missing and unexpected and all(".bn." in k for k in missing) and all(k.endswith(".conv.bias") for k in unexpected) \
            and hasattr(model, "structural_reparam"):  # conv biases where the BNs were: conv-BN pairs folded
        parts.append(f" The checkpoint has conv biases where the model has {len(missing)} BatchNorm entries: it looks "
                     f"like one saved after structural_reparam(fuse_conv_bn=True); build the model, call "
                     f"model.structural_reparam(fuse_conv_bn=True), then load_checkpoint(model, path)")
    elif shared < len(expected) / 2:  # not a few renamed layers: the weights of another model
        parts += [f" Only {shared} of the model's {len(expected)} keys are in the checkpoint: it looks like the weights "
                  f"of another architecture; ", ("architecture", "build the model the checkpoint was saved from")]
    raise CheckpointError(*parts, classes=classes)


def check_model_name(name: str) -> None:
    """ValueError for a ``name`` that is neither a RepLKNet name nor in timm's registry (``replknet_31b``,
    ``convnext_tiny``, ``vit_base_patch16_224.augreg_in21k``: the part before the first '.' counts),
    naming the closest registered names."""
    import difflib

    architecture = name.split(".")[0]
    if timm.is_model(architecture):
        return
    close = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(close)}?" if close else ":"
    raise ValueError(f"create_model: unknown model {name!r} (not a RepLKNet name and not in timm's registry){hint} "
                     "timm.list_models('PATTERN*') lists the names")


def replknet_hub_message(name: str) -> Optional[str]:
    """Why ``name``, a RepLKNet name, has no weights timm could fetch, naming the official files to
    download (None for other names)."""
    architecture = name.split(".")[0]
    if not architecture.startswith("replknet_"):
        return None
    from lkfast.models.replknet import OFFICIAL_CHECKPOINTS

    files = ", ".join(v for k, v in OFFICIAL_CHECKPOINTS.items() if k.startswith(architecture + "."))
    return (f"the official RepLKNet weights are not on a hub timm can reach; download them from "
            f"github.com/DingXiaoH/RepLKNet-pytorch ({files or 'no official weights for this model'})")


def create_model(name: str, checkpoint: Optional[str] = None, pretrained: bool = False, fast: bool = True,
                 trust_checkpoint: bool = False, checkpoint_key: Optional[str] = None, **kwargs) -> nn.Module:
    """Build ``name`` (a RepLKNet name such as ``replknet_31b`` or ``replknet_31b.in22k_ft_in1k_384``,
    or any timm name, e.g. ``convnext_tiny`` with ``kernel_sizes=31``), in eval mode.

    checkpoint: local .pth/.pt/.safetensors file, wrapped in ``model``/``state_dict``/``state_dict_ema``
        or not, with or without a ``module.`` prefix; RepLKNet accepts training-time and
        re-parameterised weights. Loaded strictly (see ``load_checkpoint``).
    pretrained: fetch weights through timm's hub loading (needs network; not available for RepLKNet).
    fast: run large depthwise convs through the fast op (``lkfast.nn.patch_model``).
    trust_checkpoint: allow arbitrary pickled objects in the checkpoint (only for files you trust).
    kwargs: passed to the model constructor (``num_classes``, ``drop_path_rate``, ...).
    The model carries its preprocessing in ``model.pretrained_cfg`` (input_size, mean, std, ...).
    """
    if checkpoint is not None and pretrained:
        raise ValueError("create_model: pass either checkpoint=PATH or pretrained=True, not both")
    architecture = name.split(".")[0]
    is_replknet = architecture.startswith("replknet_")
    if is_replknet:
        if pretrained:
            raise ValueError(f"create_model: {name}: {replknet_hub_message(name)} and pass checkpoint=PATH")
        kwargs["fast"] = fast
        if "small_kernel" in kwargs and kwargs["small_kernel"] is None:
            kwargs["small_kernel"] = 0  # "no small kernel": timm.create_model drops arguments that are None
    check_model_name(name)
    sizes = kwargs.get("kernel_sizes")  # timm's ConvNeXt: one size, or one per stage
    even = [k for k in (sizes if isinstance(sizes, (tuple, list)) else [sizes]) if isinstance(k, int) and k % 2 == 0]
    if even:  # built, it failed at the first forward (k // 2 padding keeps the map size for odd k only)
        raise ValueError(f"create_model: {name}: kernel_sizes must be odd (3, 5, 7, ...), got {sizes}")
    if checkpoint is not None and kwargs.get("features_only"):
        # timm wraps a features_only model (head dropped, modules renamed or nested), so no checkpoint
        # fits the wrapper: load it into the plain model, then let timm's own loading pass its weights
        # on before it wraps the model.
        return _features_from_checkpoint(name, checkpoint, fast, trust_checkpoint, checkpoint_key, kwargs)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as error:
        if not pretrained:
            raise
        raise RuntimeError(
            f"create_model: could not fetch pretrained weights for {name!r} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Without network access, download the weights "
            f"elsewhere and pass a local checkpoint: create_model({name!r}, checkpoint='PATH')"
        ) from error
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, trust_checkpoint=trust_checkpoint, checkpoint_key=checkpoint_key)
    if fast:
        patch_model(model)
    return model.eval()


# The arguments timm's builder takes for the features_only wrapper, not for the model itself.
_FEATURE_ARGS = ("features_only", "out_indices", "feature_cls", "feature_cfg")


def _features_from_checkpoint(name: str, checkpoint: str, fast: bool, trust_checkpoint: bool,
                              checkpoint_key: Optional[str], kwargs: dict) -> nn.Module:
    plain = timm.create_model(name, **{k: v for k, v in kwargs.items() if k not in _FEATURE_ARGS})
    load_checkpoint(plain, checkpoint, trust_checkpoint=trust_checkpoint, checkpoint_key=checkpoint_key)
    # timm hands a pretrained_cfg's state_dict to the model before wrapping it (dropping the classifier,
    # which the wrapper prunes). first_conv=None: the stem already has the model's in_chans, and timm
    # (some versions) would adapt it again from 3 channels.
    first_conv = plain.pretrained_cfg.get("first_conv")
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, state_dict=plain.state_dict(), first_conv=None)
    del plain
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    del overlay
    for module in model.modules():  # the wrapper and the model keep their cfg: without the weights' copy
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict) and "state_dict" in cfg:
            module.pretrained_cfg = {k: v for k, v in cfg.items() if k != "state_dict"} | {"first_conv": first_conv}
            if isinstance(getattr(module, "default_cfg", None), dict):
                module.default_cfg = module.pretrained_cfg
    if fast:
        patch_model(model)
    return model.eval()

