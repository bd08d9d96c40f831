"""Adversarial attacks in [0, 1] pixel space (normalisation inside the model), and their evaluation.

    fgsm(model, x, y, eps)
    pgd(model, x, y, eps, alpha, steps, random_start=True, generator=None)
    taig(surrogate, x, y, eps, steps=20, path_steps=20, alpha=1/255, random_path=False, generator=None)
    integrated_gradients(model, x, y, path_steps=20)
    fgsm_sweep / pgd_sweep / transfer_success      accuracy under attack over a loader (Fig. 6, Table 4)
    attack_outcomes / transfer_outcomes            the same per batch, one row per image (for sharded runs),
    fgsm_/pgd_attacks, *_summary                   and the attacks they run and the sweeps' results from the rows
    reparameterized_for_attack(model, sample)      RepLKNet folded for faster attacks, checked

Every attack takes gradients with respect to the input only: the model's parameters are frozen for
the attack (their ``requires_grad`` restored afterwards, ``.grad`` untouched) and its train/eval
mode is left as it is. They take their input gradients also when called under ``torch.no_grad()`` or
``torch.inference_mode()`` (and on tensors made under it). Images must be a non-empty float batch in
[0, 1] without NaN.
"""
from lkfast.attacks.core import frozen
from lkfast.attacks.evaluate import (FGSM_EPS, PGD_EPS, PGD_STEPS, TAIG_ALPHA, TAIG_EPS, TAIG_PATH_STEPS, TAIG_STEPS,
                                     attack_accuracy, attack_outcomes, fgsm_attacks, fgsm_summary, fgsm_sweep,
                                     pgd_attacks, pgd_summary, pgd_sweep, transfer_adversarials, transfer_outcomes,
                                     transfer_success,
                                     transfer_summary)
from lkfast.attacks.gradient import fgsm, pgd
from lkfast.attacks.reparam import reparameterized_for_attack
from lkfast.attacks.taig import integrated_gradients, taig

__all__ = ["fgsm", "pgd", "taig", "integrated_gradients", "frozen", "attack_accuracy", "fgsm_sweep", "pgd_sweep",
           "transfer_success", "reparameterized_for_attack", "FGSM_EPS", "PGD_EPS", "PGD_STEPS", "TAIG_EPS",
           "TAIG_STEPS", "TAIG_PATH_STEPS", "TAIG_ALPHA", "attack_outcomes", "fgsm_attacks", "fgsm_summary",
           "pgd_attacks", "pgd_summary", "transfer_adversarials", "transfer_outcomes", "transfer_summary"]
