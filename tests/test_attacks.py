"""lkfast.attacks: FGSM against its definition, PGD's constraints and effect, TAIG's integrated
gradient (completeness), the sweeps over a loader, transfer success, RepLKNet folding, bad input."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lkfast.attacks import (fgsm, fgsm_sweep, frozen, integrated_gradients, pgd, pgd_sweep, reparameterized_for_attack,
                            taig, transfer_success)
from lkfast.nn import DepthwiseConv2d
from nets import trained_like_replknet

CLASSES = 5


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class Normalized(nn.Module):
    """[0, 1] images in, normalisation inside (as the attacks expect)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def small_net(seed=0, classes=CLASSES, act=nn.GELU):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act(), DepthwiseConv2d(8, 7), act(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))
    return Normalized(net).eval()


def images(n=6, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def assert_untouched(model, mode):
    assert all(p.grad is None for p in model.parameters()), "an attack left gradients on the parameters"
    assert all(p.requires_grad for p in model.parameters()), "requires_grad of the parameters was not restored"
    assert model.training == mode


def test_fgsm_is_its_definition():
    model, (x, y) = small_net(), images()
    eps = 0.03
    xr = x.clone().requires_grad_(True)
    reference = (x + eps * torch.autograd.grad(F.cross_entropy(model(xr), y), xr)[0].sign()).clamp(0, 1)
    model.zero_grad(set_to_none=True)
    adv = fgsm(model, x, y, eps)
    assert torch.equal(adv, reference)
    assert_untouched(model, mode=False)


def test_attacks_leave_train_mode_and_parameters_alone():
    model, (x, y) = small_net(), images()
    model.train()
    fgsm(model, x, y, 0.01)
    pgd(model, x, y, 0.01, 0.005, 2)
    taig(model, x, y, 0.01, steps=1, path_steps=2)
    assert_untouched(model, mode=True)


def test_attacks_compute_no_weight_gradients():
    # frozen parameters during the attack: the backward pass does no weight-gradient work
    model, (x, y) = small_net(), images(n=2)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(any(p.requires_grad for p in m.parameters())))
    fgsm(model, x, y, 0.01)
    pgd(model, x, y, 0.01, 0.005, 2)
    taig(model, x, y, 0.01, steps=1, path_steps=1)
    assert len(seen) == 1 + 2 + 2 and not any(seen)
    assert_untouched(model, mode=False)


def test_pgd_stays_in_the_ball_and_raises_the_loss():
    model, (x, y) = small_net(), images()
    eps = 0.02
    adv = pgd(model, x, y, eps, alpha=eps / 4, steps=5, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), y, reduction="none")
        adv_loss = F.cross_entropy(model(adv), y, reduction="none")
    assert (adv_loss > clean_loss).all(), (clean_loss, adv_loss)
    # seeded start: the same generator seed gives the same result
    again = pgd(model, x, y, eps, alpha=eps / 4, steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(adv, again)
    assert_untouched(model, mode=False)


def test_pgd_is_its_definition():
    # torchattacks' PGD, which the paper's script runs (engine.py: PGD(model, eps, alpha, steps,
    # random_start=True)): start at clamp(x + U(-eps, eps), 0, 1), then per step x_adv + alpha *
    # sign(grad of the mean CE at x_adv), clipped to [x - eps, x + eps] and to [0, 1], all in pixel space
    model, (x, y) = small_net(), images()
    eps, alpha, steps = 0.03, 0.03 / 4, 3
    adv = pgd(model, x, y, eps, alpha, steps, generator=torch.Generator().manual_seed(4))
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(4))
    reference = (x + (2 * start - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        r = reference.clone().requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(model(r), y), r)[0]
        reference = torch.min(torch.max(reference + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1).detach()
    torch.testing.assert_close(adv, reference, rtol=0, atol=1e-7)
    assert not torch.equal(adv, pgd(model, x, y, eps, alpha, 1, generator=torch.Generator().manual_seed(4)))


def test_pgd_without_random_start_from_the_image_edges():
    model = small_net()
    x = torch.zeros(2, 3, 16, 16)  # at the edge of [0, 1]: the projection must clip
    y = torch.tensor([0, 1])
    adv = pgd(model, x, y, 0.05, 0.02, 3, random_start=False)
    assert adv.min() >= 0 and adv.max() <= 0.05 + 1e-6


class NoGradient(nn.Module):
    """Logits that do not depend on the image (zero input gradient): PGD's steps move nothing, so
    its output minus x is the random start alone."""

    def forward(self, x):
        return x.mean((2, 3)) @ torch.zeros(3, CLASSES, dtype=x.dtype)


def test_pgd_random_start_is_uniform_in_the_whole_ball():
    # the random start is x + U(-eps, eps) (two-sided); with a zero gradient the steps add nothing
    x = torch.full((4, 3, 16, 16), 0.5)  # far from 0 and 1: no clipping
    y = torch.zeros(4, dtype=torch.long)
    eps = 0.1
    d = pgd(NoGradient(), x, y, eps, alpha=0.025, steps=1, generator=torch.Generator().manual_seed(0)) - x
    assert float(d.abs().max()) <= eps + 1e-6
    assert float(d.min()) < -eps / 2 and float(d.max()) > eps / 2, (float(d.min()), float(d.max()))
    assert abs(float(d.mean())) < eps / 10, float(d.mean())  # 3072 draws: the mean's sd is ~0.001
    assert (d < 0).float().mean().item() == pytest.approx(0.5, abs=0.05)


def test_integrated_gradients_is_the_mean_gradient_over_the_path_points_times_x():
    # DESIGN: gradients at the s + 1 points (i/s) x, i = 0..s, averaged, times x.
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, CLASSES)).double().eval()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2, 4])
    w = linear[1].weight[y].detach().view(3, 3, 8, 8)
    with torch.no_grad():
        logit_gap = (linear(x) - linear(torch.zeros_like(x))).gather(1, y[:, None])[:, 0]
    for s in (1, 2, 5):
        # linear logit: the gradient is w_y at every point, so IG = x * w_y and completeness is exact
        ig = integrated_gradients(linear, x, y, s)
        assert torch.allclose(ig, x * w, atol=1e-12), s
        assert torch.allclose(ig.flatten(1).sum(1), logit_gap, atol=1e-10), s
    # a cubic part: logit_y = <w_y, x> + sum(a_y * x^3) / 3 has gradient w_y + a_y * p^2 at p, and
    # mean_{i=0..s} (i/s)^2 = (2s + 1) / (6s) (the s + 1 points of the grid, i = 0 included)
    a = torch.randn(CLASSES, 3 * 8 * 8, dtype=torch.float64)

    class Cubic(nn.Module):
        def forward(self, p):
            return linear(p) + (p.flatten(1) ** 3) @ a.t() / 3

    av = a[y].view(3, 3, 8, 8)
    for s in (1, 2, 5):
        expected = x * (w + av * x ** 2 * (2 * s + 1) / (6 * s))
        assert torch.allclose(integrated_gradients(Cubic(), x, y, s), expected, atol=1e-12), s


def test_integrated_gradients_completeness_improves_with_path_steps():
    model, (x, y) = small_net(act=nn.Tanh), images(n=4)
    with torch.no_grad():
        expected = model(x).gather(1, y[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, y[:, None])[:, 0]
    errors = [float((integrated_gradients(model, x, y, s).flatten(1).sum(1) - expected).abs().max()) for s in (2, 6, 24)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.05 * float(expected.abs().max()), (errors, expected)


def test_taig_stays_in_the_ball_and_lowers_the_true_logit():
    model, (x, y) = small_net(), images()
    eps = 0.03
    for random_path in (False, True):
        adv = taig(model, x, y, eps, steps=4, path_steps=4, alpha=0.01, random_path=random_path,
                   generator=torch.Generator().manual_seed(0))
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            before, after = model(x).gather(1, y[:, None]), model(adv).gather(1, y[:, None])
        assert float((after - before).mean()) < 0
    assert_untouched(model, mode=False)


def test_taig_r_path_noise_has_amplitude_eps_and_taig_s_none(monkeypatch):
    """TAIG-R perturbs every path point with U(-eps, eps) noise (DESIGN; Huang & Kong's TAIG-R): each
    step's integrated gradient gets noise amplitude eps, not the step size alpha; TAIG-S gets none.

    A spy in place of integrated_gradients records the noise it is handed and returns ones (so each
    step moves every pixel by -alpha, a known path)."""
    import importlib

    module = importlib.import_module("lkfast.attacks.taig")
    seen = []

    def spy(model, x, y, path_steps=20, noise=0.0, generator=None):
        seen.append((noise, path_steps))
        return torch.ones_like(x)

    monkeypatch.setattr(module, "integrated_gradients", spy)
    model, (x, y) = small_net(), images(n=2)
    x = x.clamp(0.1, 0.9)
    adv = taig(model, x, y, eps=0.03, steps=2, path_steps=3, alpha=0.01, random_path=True)
    assert seen == [(0.03, 3), (0.03, 3)]
    torch.testing.assert_close(adv, x - 0.02)                  # two steps of -alpha, inside the ball
    seen.clear()
    taig(model, x, y, eps=0.03, steps=2, path_steps=3, alpha=0.01, random_path=False)
    assert seen == [(0.0, 3), (0.0, 3)]


def test_attack_settings_are_the_papers():
    """The attack sweeps' settings as the paper states them, and the eval tasks built from them.

    Paper Sec. 4.2 / Fig. 6: FGSM eps 0.1 to 0.4; PGD with 5 steps over eps 0.002 to 0.008; PGD at eps
    0.006 over growing steps. DESIGN: PGD's step alpha = eps/4 with a random start (the paper's code);
    TAIG: alpha = 1/255, 20 iterations, s = 20 path steps, TAIG-R, eps 0.03/0.06/0.1 (Table 4). The eval
    tasks read these dicts only: a wrong value there changes Fig. 6 / Table 4 with every other test
    passing (they compare the eval to the library with the same settings)."""
    from lkfast.attacks import evaluate
    from lkfast.eval import analysis_tasks

    assert evaluate.FGSM_EPS == pytest.approx((0.1, 0.2, 0.3, 0.4))
    assert evaluate.PGD_EPS == pytest.approx((0.002, 0.004, 0.006, 0.008))
    assert evaluate.TAIG_EPS == pytest.approx((0.03, 0.06, 0.1))
    assert (evaluate.TAIG_STEPS, evaluate.TAIG_PATH_STEPS) == (20, 20)
    assert evaluate.TAIG_ALPHA == pytest.approx(1 / 255)
    pgd_task = analysis_tasks.PGD
    assert pgd_task["eps_values"] == pytest.approx((0.002, 0.004, 0.006, 0.008)) and pgd_task["steps"] == 5
    assert pgd_task["steps_eps"] == pytest.approx(0.006) and pgd_task["alpha_ratio"] == pytest.approx(0.25)
    assert list(pgd_task["steps_values"]) == list(evaluate.PGD_STEPS)
    assert analysis_tasks.TAIG == {"eps_values": pytest.approx((0.03, 0.06, 0.1)), "steps": 20, "path_steps": 20,
                                   "alpha": pytest.approx(1 / 255), "random_path": True}


@pytest.mark.parametrize("call, message", [
    (lambda m, x, y: fgsm(m, x, y, -0.1), "eps"),
    (lambda m, x, y: pgd(m, x, y, -0.1, 0.01, 5), "eps"),
    (lambda m, x, y: pgd(m, x, y, 0.1, 0.01, 0), "steps"),
    (lambda m, x, y: pgd(m, x, y, 0.1, 0.0, 5), "alpha"),
    (lambda m, x, y: taig(m, x, y, 0.1, steps=0), "steps"),
    (lambda m, x, y: taig(m, x, y, 0.1, path_steps=0), "taig: path_steps must be an integer >= 1, got 0"),
    (lambda m, x, y: integrated_gradients(m, x, y, path_steps=0), "integrated_gradients: path_steps must be"),
    (lambda m, x, y: integrated_gradients(m, x, y, noise=-0.1), "integrated_gradients: noise is the path noise's"),
    (lambda m, x, y: integrated_gradients(m, x * 255, y), r"integrated_gradients: x must hold pixel values in \[0, 1\]"),
    (lambda m, x, y: integrated_gradients(m, x, y.float()), "integrated_gradients: y must be 6 integer class labels"),
    (lambda m, x, y: pgd(m, x[:0], y[:0], 0.1, 0.01, 1), r"pgd: x holds no pixels \(shape \(0, 3, 16, 16\)\)"),
    (lambda m, x, y: fgsm(m, x[:0], y[:0], 0.1), "fgsm: x holds no pixels"),
    (lambda m, x, y: pgd(m, torch.where(x > 0.5, torch.nan, x), y, 0.1, 0.01, 1), "pgd: x holds NaN pixel values"),
    (lambda m, x, y: taig(m, x.index_fill(0, torch.tensor([2]), torch.nan), y, 0.1, steps=1, path_steps=1), "NaN"),
    (lambda m, x, y: taig(m, x, y, -1.0), "eps"),
    (lambda m, x, y: fgsm(m, x * 255, y, 0.1), r"\[0, 1\]"),
    (lambda m, x, y: fgsm(m, x, y[:2], 0.1), "labels"),
    (lambda m, x, y: fgsm(m, x[0], y, 0.1), r"\(N, C, H, W\)"),
    # labels outside the model's outputs: PyTorch's refusal came from inside the loss (a device-side
    # assert on CUDA, which stops every later CUDA call), and TAIG's gather named no label
    (lambda m, x, y: fgsm(m, x, y + 1000, 0.1), "fgsm: labels must be class indices 0..4 of the model's 5 outputs"),
    (lambda m, x, y: pgd(m, x, torch.arange(6) - 10, 0.1, 0.01, 1), r"pgd: labels .*; got -10, -9, -8, -7, -6 \(lab"),
    (lambda m, x, y: taig(m, x, y.index_fill(0, torch.tensor([4]), 10), 0.1, steps=1, path_steps=1),
     r"integrated_gradients \(TAIG's direction\): labels .* got 10 "),
    (lambda m, x, y: fgsm(nn.Sequential(m, nn.Unflatten(1, (5, 1))), x, y, 0.1),
     r"fgsm: the model must return \(N, classes\) logits for the 6 images; it returned shape \(6, 5, 1\)"),
])
def test_bad_input_is_refused(call, message):
    model, (x, y) = small_net(), images()
    with pytest.raises(ValueError, match=message):
        call(model, x, y)


@pytest.mark.parametrize("eps, says", [(8, "8 grey levels is 8/255 = 0.03137"), (1.5, "1.5/255")])
def test_an_eps_in_grey_levels_is_refused_saying_so(eps, says):
    """eps=8 (a budget thought of in /255 units) was taken as 8 in [0, 1] pixel space: every pixel
    free to move anywhere, silently."""
    model, (x, y) = small_net(), images()
    for call in (lambda: pgd(model, x, y, eps, 0.01, 1), lambda: fgsm(model, x, y, eps),
                 lambda: taig(model, x, y, eps, steps=1, path_steps=1)):
        with pytest.raises(ValueError, match=r"eps is the L-inf budget in \[0, 1\] pixel units.*" + re.escape(says)):
            call()
    assert (pgd(model, x, y, 1.0, 0.25, 1, generator=0) - x).abs().max() <= 1.0  # 1 is the whole range: allowed


def test_attacks_work_under_inference_mode_and_on_inference_tensors():
    """Under torch.inference_mode() every attack failed with "element 0 of tensors does not require
    grad", and images (or labels) made under it failed outside it with "Setting requires_grad=True on
    inference tensor outside InferenceMode is not allowed". Both give the attack's usual result now."""
    model, (x, y) = small_net(), images(n=3)
    calls = {"fgsm": lambda x, y: fgsm(model, x, y, 0.03),
             "pgd": lambda x, y: pgd(model, x, y, 0.03, 0.01, 2, generator=0),
             "taig": lambda x, y: taig(model, x, y, 0.03, steps=2, path_steps=2, random_path=True, generator=0),
             "integrated_gradients": lambda x, y: integrated_gradients(model, x, y, path_steps=2)}
    for name, call in calls.items():
        expected = call(x, y)
        with torch.inference_mode():
            inside = call(x, y)
            xi, yi = x.clone(), y.clone()  # inference tensors
            assert xi.is_inference()
        with torch.no_grad():
            under_no_grad = call(x, y)
        for got in (inside, call(xi, yi), under_no_grad):
            assert torch.equal(got, expected), name
        assert_untouched(model, mode=False)


def test_int_and_numpy_seeds_and_numbers_work_as_their_torch_and_python_equals():
    """generator=0 (an int seed, as lkfast.corrupt takes it) raised "object of type 'int' has no len()"
    in pgd and taig; np.float32 eps and np.int64 steps were refused as not numbers."""
    np = pytest.importorskip("numpy")
    model, (x, y) = small_net(), images()
    expected = pgd(model, x, y, 0.05, 0.01, 2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(pgd(model, x, y, 0.05, 0.01, 2, generator=7), expected)
    assert torch.equal(pgd(model, x, y, np.float64(0.05), 0.01, np.int64(2), generator=np.int64(7)), expected)
    assert (pgd(model, x, y, np.float32(0.05), 0.01, 2, generator=7) - x).abs().max() <= 0.05 + 1e-6
    expected = taig(model, x, y, 0.05, steps=2, path_steps=2, random_path=True,
                    generator=torch.Generator().manual_seed(7))
    assert torch.equal(taig(model, x, y, 0.05, steps=2, path_steps=2, random_path=True, generator=7), expected)
    # one stream per call: an int seed is made a generator once, not once per path point
    assert not torch.equal(integrated_gradients(model, x, y, 2, noise=0.1, generator=3),
                           integrated_gradients(model, x, y, 2, noise=0.1, generator=3 + 1))
    assert torch.equal(integrated_gradients(model, x, y, 3, noise=0.1, generator=3),
                       integrated_gradients(model, x, y, 3, noise=0.1, generator=torch.Generator().manual_seed(3)))
    for bad in ("7", 7.0, True, [torch.Generator(), 3]):
        with pytest.raises(ValueError, match="pgd: generator must be a torch.Generator, an int seed, a list of one "
                                             "generator per image or None"):
            pgd(model, x, y, 0.05, 0.01, 1, generator=bad)


def test_frozen_restores_requires_grad_after_an_error():
    model = small_net()
    model.net[0].weight.requires_grad_(False)  # a partly frozen model stays partly frozen
    with pytest.raises(RuntimeError):
        with frozen(model):
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")
    assert [p.requires_grad for p in model.parameters()] == [False] + [True] * (len(list(model.parameters())) - 1)


def loader(n_batches=2, seed=3):
    return [images(n=4, seed=seed + i) for i in range(n_batches)]


def test_sweeps_match_direct_evaluation():
    model, data = small_net(), loader()
    result = fgsm_sweep(model, data, eps_values=(0.0, 0.1))
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    with torch.no_grad():
        clean = 100.0 * float((model(x).argmax(1) == y).float().mean())
        attacked = 100.0 * float((model(fgsm(model, x, y, 0.1)).argmax(1) == y).float().mean())
    assert result["images"] == 8 and result["clean_top1"] == pytest.approx(clean)
    assert result["top1"] == [pytest.approx(clean), pytest.approx(attacked)]
    pgd_result = pgd_sweep(model, data, eps_values=(0.01,), steps=2, steps_values=(1, 2), steps_eps=0.01)
    assert pgd_result["steps"] == [1, 2] and len(pgd_result["steps_top1"]) == 2
    assert pgd_result["top1"][0] == pytest.approx(pgd_result["steps_top1"][1])  # same attack, same seed
    with pytest.raises(ValueError, match="eps"):
        fgsm_sweep(model, data, eps_values=(-0.1,))


def test_pgd_attacks_step_size_is_alpha_ratio_times_eps(monkeypatch):
    import lkfast.attacks.evaluate as evaluate

    calls = []

    def spy(model, x, y, eps, alpha, steps, random_start=True, generator=None):
        calls.append((eps, alpha, steps, random_start))
        return x

    monkeypatch.setattr(evaluate, "pgd", spy)
    attacks = evaluate.pgd_attacks(eps_values=(0.01,), steps_values=(2,), steps_eps=0.006, alpha_ratio=0.25)
    assert list(attacks) == ["eps=0.01", "steps=2"]
    x, y = images(n=2)
    for attack in attacks.values():
        attack(None, x, y)
    assert calls == [(0.01, pytest.approx(0.0025), 5, True), (0.006, pytest.approx(0.0015), 2, True)]


def test_transfer_success_rate_is_the_error_on_all_attacked_images():
    # The paper's Table 4 number is what its script TAIG_test.py prints (LKRobust,
    # adversarial_attack/TAIG/TAIG_test.py): count(label != pred) / img_num over every attacked image,
    # with no filter on the target's clean prediction. Hand-made outcomes of 4 images, one target, one
    # eps: clean right on images 0-2; after the attack right on 0 and 2 only.
    from lkfast.attacks.evaluate import transfer_summary

    records = {"clean": torch.tensor([[True], [True], [True], [False]]),
               "correct": torch.tensor([[[True]], [[False]], [[True]], [[False]]])}
    r = transfer_summary(records, ["t"], eps_values=(0.03,))["t"]
    assert r["success_rate"] == [50.0]  # images 1 and 3 misclassified after the attack, of 4
    assert r["success_rate_clean_correct"] == [pytest.approx(100.0 / 3)]  # image 1, of the 3 right when clean
    assert r["clean_top1"] == 75.0 and r["images"] == 4
    none_right = transfer_summary({"clean": torch.zeros(2, 1, dtype=torch.bool),
                                   "correct": torch.zeros(2, 1, 1, dtype=torch.bool)}, ["t"], eps_values=(0.03,))["t"]
    assert none_right["success_rate"] == [100.0] and none_right["success_rate_clean_correct"] == [None]


def test_transfer_summary_reads_each_targets_own_column():
    # transfer_outcomes' rows hold one column per target (and per eps): each target's numbers come from
    # its own. Hand-made outcomes of 4 images, two targets, two eps, every column different.
    from lkfast.attacks.evaluate import transfer_summary

    clean = torch.tensor([[True, False], [True, True], [True, True], [False, True]])  # a: 0-2 right, b: 1-3
    correct = torch.zeros(4, 2, 2, dtype=torch.bool)
    correct[:, 0, 0] = torch.tensor([True, True, True, False])    # a, eps 0.03: wrong on 3
    correct[:, 0, 1] = torch.tensor([True, False, False, False])  # a, eps 0.06: wrong on 1-3
    correct[:, 1, 0] = torch.tensor([False, False, True, True])   # b, eps 0.03: wrong on 0-1
    correct[:, 1, 1] = torch.tensor([False, False, False, False])  # b, eps 0.06: wrong on all
    r = transfer_summary({"clean": clean, "correct": correct}, ["a", "b"], eps_values=(0.03, 0.06))
    assert r["a"]["success_rate"] == [25.0, 75.0] and r["b"]["success_rate"] == [50.0, 100.0]
    assert r["a"]["success_rate_clean_correct"] == [0.0, pytest.approx(200.0 / 3)]  # 1-2 of a's clean-right 0-2
    assert r["b"]["success_rate_clean_correct"] == [pytest.approx(100.0 / 3), 100.0]  # 1 / 1-3 of b's 1-3
    assert r["a"]["clean_top1"] == r["b"]["clean_top1"] == 75.0 and r["a"]["eps"] == [0.03, 0.06]


def test_transfer_success_matches_direct_evaluation():
    surrogate, target, data = small_net(seed=0), small_net(seed=1), loader()
    result = transfer_success(surrogate, {"t": target}, data, eps_values=(0.05,), steps=2, path_steps=2, alpha=0.02)["t"]
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    generator = torch.Generator().manual_seed(0)
    adv = torch.cat([taig(surrogate, bx, by, 0.05, steps=2, path_steps=2, alpha=0.02, random_path=True,
                          generator=generator) for bx, by in data])
    with torch.no_grad():
        clean_ok, adv_ok = target(x).argmax(1) == y, target(adv).argmax(1) == y
    assert result["success_rate"][0] == pytest.approx(100.0 * float((~adv_ok).float().mean()))
    expected = 100.0 * float((clean_ok & ~adv_ok).sum()) / max(1, int(clean_ok.sum()))
    assert result["success_rate_clean_correct"][0] == pytest.approx(expected)


def test_transfer_refuses_a_target_with_other_classes():
    with pytest.raises(ValueError, match="classes"):
        transfer_success(small_net(), {"t": small_net(classes=7)}, loader(1), eps_values=(0.03,), steps=1, path_steps=1)


TINY = dict(large_kernel_sizes=[7, 5, 5, 3], layers=[1, 1, 1, 1], channels=[8, 8, 16, 16], small_kernel=3,
            num_classes=CLASSES)


def tiny_replknet():
    return Normalized(trained_like_replknet(TINY)).eval()


def test_reparameterized_copy_attacks_alike_and_leaves_the_original():
    model = tiny_replknet()
    x, y = images(n=2, size=32)
    fused = reparameterized_for_attack(model, x)
    assert fused is not model
    assert hasattr(model.net.stages[0].blocks[0].large_kernel, "lkb_origin")  # original unmerged
    assert not hasattr(fused.net.stages[0].blocks[0].large_kernel, "lkb_origin")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.net.stem.modules())  # conv-BN folded
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    a, b = fgsm(model, x, y, 0.01), fgsm(fused, x, y, 0.01)
    assert float((a != b).float().mean()) < 0.01  # sign flips only where the gradient is ~0
    assert_untouched(model, mode=False)
    plain = small_net()
    assert reparameterized_for_attack(plain, x) is plain
    with pytest.raises(ValueError, match="eval"):
        reparameterized_for_attack(model.train(), x)


# --- the attack tasks of python -m lkfast.eval through ctx.records ------------------------------------------

from test_analysis import (analysis_data, analysis_options, eval_inputs, image_generators, interrupted_and_resumed,  # noqa: E402,F401
                           top1_columns, without_timing)


def small_budgets(monkeypatch):
    """(PGD, TAIG settings of the eval tasks) made quick and weak enough that some attacks fail, so
    the random starts and path noise change outcomes: TAIG with 2 steps of 3 path points (not the
    paper's 20 x 21 passes per step) and smaller eps, PGD with steps of 5% of eps."""
    import lkfast.eval.analysis_tasks as analysis_tasks

    monkeypatch.setitem(analysis_tasks.TAIG, "steps", 2)
    monkeypatch.setitem(analysis_tasks.TAIG, "path_steps", 2)
    monkeypatch.setitem(analysis_tasks.TAIG, "eps_values", (0.001, 0.002, 0.004))
    monkeypatch.setitem(analysis_tasks.PGD, "eps_values", (0.001, 0.002, 0.004, 0.008))
    monkeypatch.setitem(analysis_tasks.PGD, "alpha_ratio", 0.05)  # short steps: the random start matters
    return analysis_tasks.PGD, analysis_tasks.TAIG


def test_eval_attacks_do_not_depend_on_the_sharding_and_match_the_library(tmp_path, analysis_data, monkeypatch):
    from lkfast.attacks import attack_outcomes, pgd_attacks, transfer_outcomes, transfer_summary
    from lkfast.eval import run_evaluation

    pgd_settings, taig_settings = small_budgets(monkeypatch)
    root, spec = analysis_data
    tasks = ["fgsm", "pgd", "taig"]
    own = {"taig_surrogate": "tiny"}  # the model is its own surrogate here
    small = run_evaluation([spec], tasks, analysis_options(root, tmp_path / "small", 2, analysis=own))["tiny"]
    large = run_evaluation([spec], tasks, analysis_options(root, tmp_path / "large", 100, analysis=own))["tiny"]
    assert without_timing(small) == without_timing(large)
    model, x, y, _ = eval_inputs(root, spec)
    # FGSM draws nothing: everything as the library sweep
    reference = fgsm_sweep(model, [(x, y)])
    assert {k: small["fgsm"][k] for k in reference} == reference and 0 < reference["clean_top1"] < 100
    # PGD: clean and settings as the library sweep, the attacked top-1 as the core with the evaluation's
    # per-image generators (random starts)
    reference = pgd_sweep(model, [(x, y)], **pgd_settings)
    for key in ("eps", "steps", "num_steps", "steps_eps", "alpha_ratio", "clean_top1", "images"):
        assert small["pgd"][key] == reference[key], key
    rows = attack_outcomes(model, x, y, pgd_attacks(**pgd_settings, generator=image_generators(len(y))))
    assert small["pgd"]["top1"] + small["pgd"]["steps_top1"] == pytest.approx(top1_columns(rows["correct"]), abs=1e-9)
    assert len(set(small["pgd"]["top1"])) > 1
    # TAIG-R: the target's correct-before/after rows as the core with the per-image generators
    rows = transfer_outcomes(model, {"tiny": model}, x, y, generator=image_generators(len(y)), **taig_settings)
    expected = transfer_summary(rows, ["tiny"], **taig_settings)["tiny"]
    assert {k: small["taig"][k] for k in expected} == expected and small["taig"]["surrogate"] == "tiny"
    assert small["taig"]["clean_top1"] == small["fgsm"]["clean_top1"] and len(set(small["taig"]["success_rate"])) > 1


def test_eval_pgd_resumes_after_an_interruption(tmp_path, analysis_data, monkeypatch):
    import lkfast.attacks

    root, spec = analysis_data
    seen, images, resumed, uninterrupted = interrupted_and_resumed(monkeypatch, lkfast.attacks, "attack_outcomes", "pgd",
                                                                   root, spec, tmp_path)
    # the interrupted run's first shard (images 0-1), then the resumed run's: shards 2-3 and 4 only
    assert [len(x) for x in seen] == [2, 2, 1] and torch.equal(seen[1], images[2:4]) and torch.equal(seen[2], images[4:])
    assert without_timing(resumed) == without_timing(uninterrupted)
