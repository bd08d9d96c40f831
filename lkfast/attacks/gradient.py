"""White-box L-inf attacks on the cross-entropy: FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018).

Images are in [0, 1] pixel space and the model normalises inside itself, so eps is in pixel units
(the paper's script reaches the same through torchattacks' ``set_normalization_used``).
"""
from __future__ import annotations


import torch
import torch.nn as nn

from lkfast.attacks.core import Generators, check_budget, check_images, frozen, loss_gradient, project, seeded, uniform


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: ``clamp(x + eps * sign(grad_x CE(model(x), y)), 0, 1)``.

    model: takes [0, 1] images and returns logits; its mode is left as is (put it in eval mode) and
        its parameters get no gradients. x: (N, C, H, W) in [0, 1]; y: N class indices.
    Returns the adversarial batch (detached, x's shape and dtype). Refuses eps < 0 and x outside [0, 1].
    """
    check_budget("fgsm", eps)
    check_images("fgsm", x, y)
    with frozen(model):
        grad = loss_gradient(model, x, y, "fgsm")
    return (x.detach() + eps * grad.sign()).clamp_(0.0, 1.0)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
        random_start: bool = True, generator: Generators = None) -> torch.Tensor:
    """Projected gradient descent on the cross-entropy (ascent), L-inf.

    Starts at x (or, with ``random_start``, at x plus uniform noise in [-eps, eps] drawn from
    ``generator``: a torch.Generator on x's device, an int seed, or one generator per image), then ``steps`` times: x_adv += alpha *
    sign(gradient), projected to the eps-ball around x and to [0, 1]. The paper uses alpha = eps / 4.
    Returns the adversarial batch (detached). Refuses eps < 0, alpha <= 0, steps < 1, x outside [0, 1].
    """
    check_budget("pgd", eps, steps=steps, alpha=alpha)
    check_images("pgd", x, y)
    generator = seeded(generator, x.device, "pgd")
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        noise = uniform(x.shape, generator, x.device, x.dtype)
        x_adv = (x_adv + (2 * noise - 1) * eps).clamp_(0.0, 1.0)
    with frozen(model):
        for _ in range(steps):
            grad = loss_gradient(model, x_adv, y, "pgd")
            x_adv = project(x_adv + alpha * grad.sign(), x, eps)
    return x_adv
