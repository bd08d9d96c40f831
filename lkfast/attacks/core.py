"""What every attack shares: input checks, frozen parameters, the loss gradient, the projection."""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lkfast.corrupt.utils import Generators, is_integer, seeded  # noqa: F401 (one rule for seeds and integers, shared with corrupt)


def check_images(name: str, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> None:
    """Refuse inputs an attack or analysis cannot work on: x must be a non-empty float (N, C, H, W)
    batch in [0, 1] (no NaN) and y (if given) N integer labels."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        found = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: x must be a float image batch (N, C, H, W) in [0, 1], got {found}")
    if x.numel() == 0:
        raise ValueError(f"{name}: x holds no pixels (shape {tuple(x.shape)}): give at least one image")
    lo, hi = torch.aminmax(x.detach())
    lo, hi = float(lo), float(hi)
    if not (lo >= 0.0 and hi <= 1.0):  # NaN compares False: refused too
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"{name}: x holds NaN pixel values")
        raise ValueError(f"{name}: x must hold pixel values in [0, 1] (normalisation belongs inside the model), "
                         f"found values in [{lo:.3g}, {hi:.3g}]")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            found = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"{name}: y must be {x.shape[0]} integer class labels (one per image), got {found}")


def check_logits(name: str, logits: torch.Tensor, y: torch.Tensor) -> None:
    """Refuse a model output that is not (N, classes) logits for the N images, or labels outside
    0..classes-1: PyTorch's own refusal comes from deep inside the loss (and on CUDA as a device-side
    assert that stops every later CUDA call of the process)."""
    if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: the model must return (N, classes) logits for the {y.shape[0]} images; it returned "
                         f"shape {tuple(logits.shape)}")
    classes = logits.shape[1]
    bad = y[(y < 0) | (y >= classes)]
    if bad.numel():
        shown = ", ".join(str(v) for v in bad.unique()[:5].tolist())
        raise ValueError(f"{name}: labels must be class indices 0..{classes - 1} of the model's {classes} outputs; got "
                         f"{shown} (labels in another class space, e.g. ImageNet indices for a model with fewer "
                         f"outputs?)")


def check_budget(name: str, eps: float, steps: Optional[int] = None, alpha: Optional[float] = None, *,
                 eps_name: str = "eps", what: str = "the L-inf budget", steps_name: str = "steps") -> None:
    """Refuse eps outside [0, 1] (or not a number: Python and NumPy numbers are), steps < 1 and
    alpha <= 0, saying what was given; an eps above 1 is a budget in grey levels (8 for 8/255).
    ``eps_name``/``what``/``steps_name``: how the caller's parameters are called in the messages."""
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{name}: {eps_name} is {what} in [0, 1] pixel units and must be >= 0, got {eps!r}")
    if eps > 1:
        raise ValueError(f"{name}: {eps_name} is {what} in [0, 1] pixel units, got {eps!r}: a budget of "
                         f"{eps:g} grey levels is {eps:g}/255 = {eps / 255:.4g}")
    if steps is not None and (not is_integer(steps) or steps < 1):
        raise ValueError(f"{name}: {steps_name} must be an integer >= 1, got {steps!r}")
    if alpha is not None and (not isinstance(alpha, numbers.Real) or not alpha > 0):
        raise ValueError(f"{name}: alpha (the step size) must be > 0, got {alpha!r}")


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block no parameter of ``model`` requires grad, so an attack's backward pass
    computes input gradients only (no weight-gradient work, nothing accumulates in ``.grad``).
    Each parameter's ``requires_grad`` is restored on exit, also after an error. The train/eval
    mode is left as it is."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Autograd on within the block, also inside ``torch.no_grad()`` or ``torch.inference_mode()``
    (an attack needs its input gradient wherever it is called)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def recordable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it where it is an inference tensor (made under ``torch.inference_mode()``),
    which autograd can neither record nor save for the backward pass. Call within ``recording()``."""
    return t.clone() if t.is_inference() else t


def loss_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, name: str = "loss_gradient") -> torch.Tensor:
    """Gradient of the summed cross-entropy of ``model(x)`` against ``y`` with respect to x (the
    model's parameters must already be frozen). Summed, so each image's gradient is its own.
    ``name``: the attack, as its refusal of a bad label names it."""
    with recording():
        x = recordable(x.detach()).requires_grad_(True)
        logits = model(x).float()
        check_logits(name, logits, y)
        loss = F.cross_entropy(logits, recordable(y), reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x])
    return grad


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x_adv`` clipped to the L-inf ball of radius eps around x, then to [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)




def generator_device(generator: Generators) -> Optional[torch.device]:
    """The device random draws from ``generator`` (one, or one per image) land on; None for None."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        return generator.device
    return generator[0].device if len(generator) else None


def uniform(shape, generator: Generators = None, device=None, dtype=None) -> torch.Tensor:
    """Uniform [0, 1) draws of ``shape`` from ``generator``; given one generator per image (a
    sequence as long as ``shape[0]``), each image's row is drawn from its own, so an image gets the
    same draws whatever batch it is in (how sharded evaluations stay independent of the sharding)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"random draws for {shape[0]} images need one generator per image, got {len(generator)}")
    if not len(generator):
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.stack([torch.rand(tuple(shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
