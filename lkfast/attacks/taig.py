"""TAIG: transferable adversarial attack based on integrated gradients (Huang & Kong, ICLR 2022).

The surrogate's integrated gradient of the true-class logit, along the straight path from a black
image to the current adversarial image, gives the direction: each step moves against its sign.
TAIG-R (``random_path=True``) perturbs every path point with uniform noise in [-eps, eps].
"""
from __future__ import annotations


import torch
import torch.nn as nn

from lkfast.attacks.core import (Generators, check_budget, check_images, check_logits, frozen, project, recordable,
                                 recording, seeded, uniform)


def integrated_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, path_steps: int = 20,
                         noise: float = 0.0, generator: Generators = None) -> torch.Tensor:
    """Integrated gradient of the logit of class ``y`` along the straight path from black (zeros) to x.

    The gradient is taken at the ``path_steps + 1`` points (i / path_steps) * x, i = 0..path_steps
    (each plus uniform noise in [-noise, noise] when ``noise > 0``, drawn from ``generator``), averaged,
    and multiplied by x. Without noise its sum per image approaches logit(x) - logit(0) as
    ``path_steps`` grows (completeness). The model's parameters get no gradients; it is evaluated in
    the mode it is in. Returns a tensor of x's shape.
    """
    check_budget("integrated_gradients", noise, steps=path_steps, eps_name="noise", what="the path noise's amplitude",
                 steps_name="path_steps")
    check_images("integrated_gradients", x, y)
    generator = seeded(generator, x.device, "integrated_gradients")
    with frozen(model), recording():
        x, y = recordable(x.detach()), recordable(y)
        total = torch.zeros_like(x)
        for i in range(path_steps + 1):
            point = x * (i / path_steps)
            if noise > 0:
                point = point + (2 * uniform(x.shape, generator, x.device, x.dtype) - 1) * noise
            point = point.requires_grad_(True)
            logits = model(point).float()
            if i == 0:
                check_logits("integrated_gradients (TAIG's direction)", logits, y)
            chosen = logits.gather(1, y[:, None]).sum()  # each image's gradient is its own
            (grad,) = torch.autograd.grad(chosen, [point])
            total += grad
    return x * total / (path_steps + 1)


def taig(surrogate: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 20, path_steps: int = 20,
         alpha: float = 1 / 255, random_path: bool = False, generator: Generators = None) -> torch.Tensor:
    """TAIG (``random_path=False``, TAIG-S) or TAIG-R: ``steps`` iterations of
    x_adv <- clip(x_adv - alpha * sign(IG(x_adv))), clipped to the eps-ball around x and to [0, 1],
    where IG is ``integrated_gradients(surrogate, x_adv, y, path_steps)`` (TAIG-R: with path noise eps).

    surrogate: the model the attack is computed on (takes [0, 1] images; mode left as is, no
    parameter gradients). x: (N, C, H, W) in [0, 1]; y: N true labels. generator: for TAIG-R's noise
    (one, an int seed, or one per image).
    Returns the adversarial batch, to be evaluated on other (target) models. Refuses eps < 0,
    steps < 1, path_steps < 1, alpha <= 0 and x outside [0, 1].
    """
    check_budget("taig", eps, steps=steps, alpha=alpha)
    check_budget("taig", eps, steps=path_steps, steps_name="path_steps")
    check_images("taig", x, y)
    generator = seeded(generator, x.device, "taig")
    x = x.detach()
    x_adv = x.clone()
    for _ in range(steps):
        ig = integrated_gradients(surrogate, x_adv, y, path_steps, noise=eps if random_path else 0.0,
                                  generator=generator)
        x_adv = project(x_adv - alpha * ig.sign(), x, eps)
    return x_adv
