"""Accuracy under attack over a data loader, as the paper's Figure 6 and Table 4 report it.

Loaders yield ``(images, labels, ...)`` batches with images in [0, 1]; batches are moved to the
model's device. Results are plain dicts of floats and lists (JSON-able), accuracies in percent.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from lkfast.attacks.core import Generators, check_budget
from lkfast.attacks.gradient import fgsm, pgd
from lkfast.attacks.taig import taig

FGSM_EPS = (0.1, 0.2, 0.3, 0.4)  # the paper's Fig. 6a, as it states it
PGD_EPS = (0.002, 0.004, 0.006, 0.008)  # Fig. 6b, 5 steps
PGD_STEPS = (1, 2, 3, 5, 7, 10)  # Fig. 6c, eps 0.006
TAIG_EPS = (0.03, 0.06, 0.1)  # Table 4
TAIG_STEPS, TAIG_PATH_STEPS, TAIG_ALPHA = 20, 20, 1 / 255  # TAIG-R's iterations, path points, step size

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


def attack_outcomes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Mapping[str, Attack]) -> dict:
    """Per-image outcomes of one batch: ``{"clean": bool (N,), "correct": bool (N, attacks)}``, the
    model's prediction right on the clean images and on each attack's output (in ``attacks`` order;
    x and y are moved to the model's device)."""
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    clean = _correct(model, x, y)
    correct = [_correct(model, attack(model, x, y), y) for attack in attacks.values()]
    return {"clean": clean, "correct": torch.stack(correct, 1) if correct else torch.zeros(len(y), 0, dtype=torch.bool)}


def _outcome_rows(model: nn.Module, loader: Iterable, outcomes: Callable, max_batches: Optional[int]) -> dict:
    """``outcomes(x, y)`` of every batch, each name's rows concatenated (on the CPU)."""
    rows = {}
    for x, y in batches(loader, model_device(model), max_batches):
        for name, value in outcomes(x, y).items():
            rows.setdefault(name, []).append(value.cpu())
    return {k: torch.cat(v) for k, v in rows.items()}


def _top1(correct: torch.Tensor, count: int) -> list:
    """Percent correct of each column of a bool (N, K) outcome tensor."""
    return [100.0 * c / count for c in correct.long().sum(0).tolist()]


def attack_accuracy(model: nn.Module, loader: Iterable, attacks: Mapping[str, Attack],
                    max_batches: Optional[int] = None) -> dict:
    """Top-1 (percent) of ``model`` on clean images and on each attack's output.

    attacks: name -> ``attack(model, x, y)`` returning adversarial images. Returns
    ``{"clean_top1": float, "top1": {name: float}, "images": int}``."""
    rows = _outcome_rows(model, loader, lambda x, y: attack_outcomes(model, x, y, attacks), max_batches)
    count = len(rows.get("clean", ()))
    if count == 0:
        raise ValueError("attack_accuracy: the loader yielded no images")
    return {"clean_top1": 100.0 * int(rows["clean"].sum()) / count,
            "top1": dict(zip(attacks, _top1(rows["correct"], count))), "images": count}


def fgsm_attacks(eps_values: Sequence[float] = FGSM_EPS) -> dict:
    """The attacks of Fig. 6a for ``attack_outcomes``: ``{"eps=E": FGSM at E}``."""
    for eps in eps_values:
        check_budget("fgsm_sweep", eps)
    return {f"eps={e}": (lambda m, x, y, e=e: fgsm(m, x, y, e)) for e in eps_values}


def fgsm_summary(records: dict, eps_values: Sequence[float] = FGSM_EPS) -> dict:
    """``fgsm_sweep``'s result from the ``attack_outcomes`` rows (of ``fgsm_attacks``) of every image."""
    count = len(records["clean"])
    if count == 0:
        raise ValueError("fgsm_sweep: the loader yielded no images")
    return {"eps": list(map(float, eps_values)), "top1": _top1(records["correct"], count),
            "clean_top1": 100.0 * int(records["clean"].sum()) / count, "images": count}


def fgsm_sweep(model: nn.Module, loader: Iterable, eps_values: Sequence[float] = FGSM_EPS,
               max_batches: Optional[int] = None) -> dict:
    """Top-1 under FGSM at each eps (Fig. 6a): ``{"eps": [...], "top1": [...], "clean_top1", "images"}``."""
    attacks = fgsm_attacks(eps_values)
    return fgsm_summary(_outcome_rows(model, loader, lambda x, y: attack_outcomes(model, x, y, attacks), max_batches)
                        or {"clean": ()}, eps_values)


def pgd_attacks(eps_values: Sequence[float] = PGD_EPS, steps: int = 5, steps_values: Sequence[int] = PGD_STEPS,
                steps_eps: float = 0.006, alpha_ratio: float = 0.25, generator: Generators = None) -> dict:
    """The attacks of Fig. 6b-c for ``attack_outcomes``: PGD (random start from ``generator``, on the
    images' device, one or one per image; alpha = alpha_ratio * eps) at each eps with ``steps`` steps, then at each number
    of steps with ``steps_eps``, in that order."""
    for eps in list(eps_values) + [steps_eps]:
        check_budget("pgd_sweep", eps, steps=steps, alpha=alpha_ratio)
    for s in steps_values:
        check_budget("pgd_sweep", steps_eps, steps=s)

    def attack(eps, n):
        return lambda m, x, y: pgd(m, x, y, eps, alpha_ratio * eps, n, random_start=True, generator=generator)

    attacks = {f"eps={e}": attack(e, steps) for e in eps_values}
    attacks.update({f"steps={n}": attack(steps_eps, n) for n in steps_values})
    return attacks


def pgd_summary(records: dict, eps_values: Sequence[float] = PGD_EPS, steps: int = 5,
                steps_values: Sequence[int] = PGD_STEPS, steps_eps: float = 0.006, alpha_ratio: float = 0.25) -> dict:
    """``pgd_sweep``'s result from the ``attack_outcomes`` rows (of ``pgd_attacks``) of every image."""
    count = len(records["clean"])
    if count == 0:
        raise ValueError("pgd_sweep: the loader yielded no images")
    top1 = _top1(records["correct"], count)
    return {"eps": list(map(float, eps_values)), "top1": top1[:len(eps_values)],
            "steps": list(map(int, steps_values)), "steps_top1": top1[len(eps_values):],
            "num_steps": steps, "steps_eps": float(steps_eps), "alpha_ratio": float(alpha_ratio),
            "clean_top1": 100.0 * int(records["clean"].sum()) / count, "images": count}


def pgd_sweep(model: nn.Module, loader: Iterable, eps_values: Sequence[float] = PGD_EPS, steps: int = 5,
              steps_values: Sequence[int] = PGD_STEPS, steps_eps: float = 0.006, alpha_ratio: float = 0.25,
              seed: int = 0, max_batches: Optional[int] = None) -> dict:
    """Top-1 under PGD (random start, alpha = alpha_ratio * eps) over eps at ``steps`` steps (Fig. 6b)
    and over ``steps_values`` at ``steps_eps`` (Fig. 6c). The random starts come from a generator
    seeded with ``seed`` (same draws for every model). Returns ``{"eps": [...], "top1": [...],
    "steps": [...], "steps_top1": [...], "steps_eps", "alpha_ratio", "clean_top1", "images"}``."""
    generator = torch.Generator(device=model_device(model)).manual_seed(seed)
    attacks = pgd_attacks(eps_values, steps, steps_values, steps_eps, alpha_ratio, generator)
    rows = _outcome_rows(model, loader, lambda x, y: attack_outcomes(model, x, y, attacks), max_batches)
    return pgd_summary(rows or {"clean": ()}, eps_values, steps, steps_values, steps_eps, alpha_ratio)


def _check_classes(surrogate: nn.Module, targets: Mapping[str, nn.Module], x: torch.Tensor) -> None:
    with torch.no_grad():
        classes = surrogate(x[:1]).shape[1]
        for name, target in targets.items():
            found = target(x[:1].to(model_device(target))).shape[1]
            if found != classes:
                raise ValueError(f"transfer_success: the surrogate predicts {classes} classes but target "
                                 f"{name!r} predicts {found}; a transfer attack needs both to share one label "
                                 f"space (evaluate models trained on the same classes)")


def transfer_adversarials(surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          eps_values: Sequence[float] = TAIG_EPS, steps: int = TAIG_STEPS,
                          path_steps: int = TAIG_PATH_STEPS, alpha: float = TAIG_ALPHA, random_path: bool = True,
                          generator: Generators = None) -> list:
    """The surrogate's TAIG images of one batch, one tensor per eps (eps by eps, path noise from
    ``generator`` as in ``transfer_outcomes``): what every target of the same surrogate is shown, so
    a run with several targets can compute them once (``transfer_outcomes(..., adversarials=)``)."""
    for eps in eps_values:
        check_budget("transfer_success", eps, steps=steps, alpha=alpha)
    x, y = x.to(model_device(surrogate)), y.to(model_device(surrogate))
    return [taig(surrogate, x, y, eps, steps=steps, path_steps=path_steps, alpha=alpha, random_path=random_path,
                 generator=generator) for eps in eps_values]


def transfer_outcomes(surrogate: nn.Module, targets: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                      eps_values: Sequence[float] = TAIG_EPS, steps: int = TAIG_STEPS, path_steps: int = TAIG_PATH_STEPS,
                      alpha: float = TAIG_ALPHA, random_path: bool = True, generator: Generators = None,
                      adversarials: Optional[Sequence[torch.Tensor]] = None) -> dict:
    """Per-image outcomes of one batch of the transfer attack: the surrogate generates TAIG images at
    each eps (path noise from ``generator``, on the surrogate's device, one or one per image, eps by
    eps), every target
    classifies them. Returns ``{"clean": bool (N, targets), "correct": bool (N, targets, eps)}``
    (targets in ``targets`` order). ``adversarials``: the batch's ``transfer_adversarials`` when
    already computed (for another target of the same surrogate), else they are computed here.
    Refuses targets whose number of classes differs from the surrogate's, and an empty ``targets``."""
    if not targets:
        raise ValueError("transfer_success: no target models given")
    for eps in eps_values:
        check_budget("transfer_success", eps, steps=steps, alpha=alpha)
    device = model_device(surrogate)
    x, y = x.to(device), y.to(device)
    _check_classes(surrogate, targets, x)
    clean = torch.stack([_correct(t, x.to(model_device(t)), y.to(model_device(t))).cpu() for t in targets.values()], 1)
    correct = torch.zeros(len(y), len(targets), len(eps_values), dtype=torch.bool)
    if adversarials is None:
        adversarials = transfer_adversarials(surrogate, x, y, eps_values, steps, path_steps, alpha, random_path,
                                             generator)
    elif len(adversarials) != len(eps_values) or any(a.shape != x.shape for a in adversarials):
        raise ValueError(f"transfer_outcomes: adversarials must hold one batch of shape {tuple(x.shape)} per eps "
                         f"({len(eps_values)}), got {[tuple(a.shape) for a in adversarials]}")
    for j, x_adv in enumerate(adversarials):
        for i, target in enumerate(targets.values()):
            d = model_device(target)
            correct[:, i, j] = _correct(target, x_adv.to(d), y.to(d)).cpu()
    return {"clean": clean, "correct": correct}


def transfer_summary(records: dict, names: Sequence[str], eps_values: Sequence[float] = TAIG_EPS,
                     steps: int = TAIG_STEPS, path_steps: int = TAIG_PATH_STEPS, alpha: float = TAIG_ALPHA,
                     random_path: bool = True) -> dict:
    """``transfer_success``'s result from the ``transfer_outcomes`` rows of every image (``names``:
    the targets, in the order the rows hold them).

    ``success_rate`` is the paper's Table 4 number as its script computes it (LKRobust
    ``adversarial_attack/TAIG/TAIG_test.py``: images with label != prediction over all attacked
    images): the target's error on the adversarial images, whatever it predicted on the clean ones.
    ``success_rate_clean_correct`` counts only the images the target classifies correctly when clean
    (None when it classifies none correctly)."""
    count = len(records["clean"])
    if count == 0:
        raise ValueError("transfer_success: the loader yielded no images")
    out = {}
    for i, name in enumerate(names):
        clean_ok, adv_ok = records["clean"][:, i, None], records["correct"][:, i]
        clean = int(clean_ok.sum())
        fooled = (clean_ok & ~adv_ok).long().sum(0).tolist()
        wrong = (~adv_ok).long().sum(0).tolist()
        out[name] = {"eps": list(map(float, eps_values)),
                     "success_rate": [100.0 * w / count for w in wrong],
                     "success_rate_clean_correct": [100.0 * f / clean if clean else None for f in fooled],
                     "clean_top1": 100.0 * clean / count, "images": count,
                     "steps": steps, "path_steps": path_steps, "alpha": alpha, "random_path": random_path}
    return out


def transfer_success(surrogate: nn.Module, targets: Mapping[str, nn.Module], loader: Iterable,
                     eps_values: Sequence[float] = TAIG_EPS, steps: int = TAIG_STEPS, path_steps: int = TAIG_PATH_STEPS,
                     alpha: float = TAIG_ALPHA, random_path: bool = True, seed: int = 0,
                     max_batches: Optional[int] = None) -> dict:
    """Transfer attack success of TAIG (TAIG-R by default, as the paper's script runs it): the
    surrogate generates adversarial images once per batch and eps, every target classifies them.

    Returns ``{target: {"eps": [...], "success_rate": [...], "success_rate_clean_correct": [...],
    "clean_top1", "images"}}``: ``success_rate`` (percent, Table 4, as the paper's script counts it)
    is the share of all attacked images the target misclassifies; ``success_rate_clean_correct`` the
    share of those it classifies correctly when clean that it misclassifies after the attack (None
    when it classifies none correctly). Refuses targets whose number of classes differs from the
    surrogate's.
    """
    if not targets:
        raise ValueError("transfer_success: no target models given")
    for eps in eps_values:
        check_budget("transfer_success", eps, steps=steps, alpha=alpha)
    settings = dict(eps_values=eps_values, steps=steps, path_steps=path_steps, alpha=alpha, random_path=random_path)
    generator = torch.Generator(device=model_device(surrogate)).manual_seed(seed)
    rows = _outcome_rows(surrogate, loader,
                         lambda x, y: transfer_outcomes(surrogate, targets, x, y, generator=generator, **settings),
                         max_batches)
    return transfer_summary(rows or {"clean": ()}, list(targets), **settings)
