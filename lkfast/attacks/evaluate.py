"""Accuracy under attack over a data loader, as the paper's Figure 6 and Table 4 report it.

Loaders yield ``(images, labels, ...)`` batches with images in [0, 1]; batches are moved to the
model's device. Results are plain dicts of floats and lists (JSON-able), accuracies in percent.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from lkfast.attacks.core import check_budget
from lkfast.attacks.gradient import fgsm, pgd
from lkfast.attacks.taig import taig

FGSM_EPS = (0.1, 0.2, 0.3, 0.4)  # the paper's Fig. 6a, as it states it
PGD_EPS = (0.002, 0.004, 0.006, 0.008)  # Fig. 6b, 5 steps
PGD_STEPS = (1, 2, 3, 5, 7, 10)  # Fig. 6c, eps 0.006
TAIG_EPS = (0.03, 0.06, 0.1)  # Table 4

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def batches(loader: Iterable, device: torch.device, max_batches: Optional[int] = None):
    """(images, labels) pairs from ``loader`` on ``device``; refuses batches that are not (x, y, ...)."""
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"expected the loader to yield (images, labels, ...) batches, got {type(batch).__name__}")
        yield batch[0].to(device), batch[1].to(device)


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


def attack_accuracy(model: nn.Module, loader: Iterable, attacks: Mapping[str, Attack],
                    max_batches: Optional[int] = None) -> dict:
    """Top-1 (percent) of ``model`` on clean images and on each attack's output.

    attacks: name -> ``attack(model, x, y)`` returning adversarial images. Returns
    ``{"clean_top1": float, "top1": {name: float}, "images": int}``."""
    device = model_device(model)
    clean, correct, count = 0, {name: 0 for name in attacks}, 0
    for x, y in batches(loader, device, max_batches):
        clean += int(_correct(model, x, y).sum())
        for name, attack in attacks.items():
            correct[name] += int(_correct(model, attack(model, x, y), y).sum())
        count += len(y)
    if count == 0:
        raise ValueError("attack_accuracy: the loader yielded no images")
    return {"clean_top1": 100.0 * clean / count, "top1": {k: 100.0 * v / count for k, v in correct.items()},
            "images": count}


def fgsm_sweep(model: nn.Module, loader: Iterable, eps_values: Sequence[float] = FGSM_EPS,
               max_batches: Optional[int] = None) -> dict:
    """Top-1 under FGSM at each eps (Fig. 6a): ``{"eps": [...], "top1": [...], "clean_top1", "images"}``."""
    for eps in eps_values:
        check_budget("fgsm_sweep", eps)
    result = attack_accuracy(model, loader, {str(e): (lambda m, x, y, e=e: fgsm(m, x, y, e)) for e in eps_values},
                             max_batches)
    return {"eps": list(map(float, eps_values)), "top1": [result["top1"][str(e)] for e in eps_values],
            "clean_top1": result["clean_top1"], "images": result["images"]}


def pgd_sweep(model: nn.Module, loader: Iterable, eps_values: Sequence[float] = PGD_EPS, steps: int = 5,
              steps_values: Sequence[int] = PGD_STEPS, steps_eps: float = 0.006, alpha_ratio: float = 0.25,
              seed: int = 0, max_batches: Optional[int] = None) -> dict:
    """Top-1 under PGD (random start, alpha = alpha_ratio * eps) over eps at ``steps`` steps (Fig. 6b)
    and over ``steps_values`` at ``steps_eps`` (Fig. 6c). The random starts come from a generator
    seeded with ``seed`` (same draws for every model). Returns ``{"eps": [...], "top1": [...],
    "steps": [...], "steps_top1": [...], "steps_eps", "alpha_ratio", "clean_top1", "images"}``."""
    for eps in list(eps_values) + [steps_eps]:
        check_budget("pgd_sweep", eps, steps=steps, alpha=alpha_ratio)
    for s in steps_values:
        check_budget("pgd_sweep", steps_eps, steps=s)
    generator = torch.Generator(device=model_device(model)).manual_seed(seed)

    def attack(eps, n):
        return lambda m, x, y: pgd(m, x, y, eps, alpha_ratio * eps, n, random_start=True, generator=generator)

    attacks = {f"eps={e}": attack(e, steps) for e in eps_values}
    attacks.update({f"steps={n}": attack(steps_eps, n) for n in steps_values})
    result = attack_accuracy(model, loader, attacks, max_batches)
    return {"eps": list(map(float, eps_values)), "top1": [result["top1"][f"eps={e}"] for e in eps_values],
            "steps": list(map(int, steps_values)), "steps_top1": [result["top1"][f"steps={n}"] for n in steps_values],
            "num_steps": steps, "steps_eps": float(steps_eps), "alpha_ratio": float(alpha_ratio),
            "clean_top1": result["clean_top1"], "images": result["images"]}


def transfer_success(surrogate: nn.Module, targets: Mapping[str, nn.Module], loader: Iterable,
                     eps_values: Sequence[float] = TAIG_EPS, steps: int = 20, path_steps: int = 20,
                     alpha: float = 1 / 255, random_path: bool = True, seed: int = 0,
                     max_batches: Optional[int] = None) -> dict:
    """Transfer attack success of TAIG (TAIG-R by default, as the paper's script runs it): the
    surrogate generates adversarial images once per batch and eps, every target classifies them.

    Returns ``{target: {"eps": [...], "success_rate": [...], "adv_error": [...], "clean_top1",
    "images"}}``: ``success_rate`` (percent, Table 4) counts, among the images the target classifies
    correctly when clean, those it misclassifies after the attack (None when it classifies none
    correctly); ``adv_error`` is its error on all
    adversarial images. Refuses targets whose number of classes differs from the surrogate's.
    """
    if not targets:
        raise ValueError("transfer_success: no target models given")
    for eps in eps_values:
        check_budget("transfer_success", eps, steps=steps, alpha=alpha)
    device = model_device(surrogate)
    generator = torch.Generator(device=device).manual_seed(seed)
    stats = {name: {"clean": 0, "fooled": [0] * len(eps_values), "wrong": [0] * len(eps_values)} for name in targets}
    count, checked = 0, False
    for x, y in batches(loader, device, max_batches):
        if not checked:
            with torch.no_grad():
                classes = surrogate(x[:1]).shape[1]
                for name, target in targets.items():
                    found = target(x[:1].to(model_device(target))).shape[1]
                    if found != classes:
                        raise ValueError(f"transfer_success: the surrogate predicts {classes} classes but target "
                                         f"{name!r} predicts {found}; a transfer attack needs both to share one label "
                                         f"space (evaluate models trained on the same classes)")
            checked = True
        clean_ok = {name: _correct(t, x.to(model_device(t)), y.to(model_device(t))).cpu() for name, t in targets.items()}
        for j, eps in enumerate(eps_values):
            x_adv = taig(surrogate, x, y, eps, steps=steps, path_steps=path_steps, alpha=alpha,
                         random_path=random_path, generator=generator)
            for name, target in targets.items():
                d = model_device(target)
                adv_ok = _correct(target, x_adv.to(d), y.to(d)).cpu()
                stats[name]["fooled"][j] += int((clean_ok[name] & ~adv_ok).sum())
                stats[name]["wrong"][j] += int((~adv_ok).sum())
        for name in targets:
            stats[name]["clean"] += int(clean_ok[name].sum())
        count += len(y)
    if count == 0:
        raise ValueError("transfer_success: the loader yielded no images")
    out = {}
    for name, s in stats.items():
        out[name] = {"eps": list(map(float, eps_values)),
                     "success_rate": [100.0 * f / s["clean"] if s["clean"] else None for f in s["fooled"]],
                     "adv_error": [100.0 * w / count for w in s["wrong"]],
                     "clean_top1": 100.0 * s["clean"] / count, "images": count,
                     "steps": steps, "path_steps": path_steps, "alpha": alpha, "random_path": random_path}
    return out
