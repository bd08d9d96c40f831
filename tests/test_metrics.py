"""lkfast.metrics against hand-computed cases and independent computations (scikit-learn, scipy,
and the ImageNet-P release's loop written out plainly)."""
import numpy as np
import pytest
import torch

from lkfast import metrics as M


def test_constants():
    assert len(M.IMAGENET_C_COMMON) == 15 and len(M.IMAGENET_C_EXTRA) == 4 and len(M.IMAGENET_P) == 10
    assert M.IMAGENET_P_EXTRA == ("speckle_noise", "gaussian_blur", "spatter", "shear")
    assert M.IMAGENET_P_ALL == M.IMAGENET_P + M.IMAGENET_P_EXTRA and M.IMAGENET_P[-1] == "scale"
    assert set(M.ALEXNET_ERRORS) == set(M.IMAGENET_C_ALL)
    assert M.NOISE_PERTURBATIONS == ("gaussian_noise", "shot_noise", "speckle_noise")
    assert M.ALEXNET_ERRORS["brightness"] == pytest.approx(0.564592)
    assert M.ALEXNET_CLEAN_ERROR == pytest.approx(0.4348, abs=1e-4)


# AlexNet's per-severity ImageNet-C errors (severities 1..5) as the ImageNet-C release's README
# (hendrycks/robustness, table "AlexNet ImageNet-C Error") lists them; ALEXNET_ERRORS holds their
# means, which the README lists beside them. Checking the means against the per-severity values
# catches a mistyped digit in either.
_ALEXNET_BY_SEVERITY = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.94870, 0.98720, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.58430, 0.70048, 0.82108, 0.89750, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.91870, 0.94952),
    "frost": (0.61390, 0.79734, 0.88790, 0.89942, 0.93430),
    "fog": (0.67474, 0.76050, 0.84378, 0.87260, 0.94500),
    "brightness": (0.45140, 0.48502, 0.54048, 0.62166, 0.72440),
    "contrast": (0.64548, 0.76150, 0.88874, 0.97760, 0.99270),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.54620, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
    "speckle_noise": (0.66192, 0.74440, 0.90246, 0.94548, 0.97268),
    "gaussian_blur": (0.54732, 0.70444, 0.82574, 0.89864, 0.95940),
    "spatter": (0.47196, 0.62194, 0.75052, 0.84132, 0.90182),
    "saturate": (0.59342, 0.65514, 0.51174, 0.70834, 0.82260),
}


@pytest.mark.parametrize("name", sorted(_ALEXNET_BY_SEVERITY))
def test_alexnet_errors_are_the_release_means(name):
    assert M.ALEXNET_ERRORS[name] == pytest.approx(sum(_ALEXNET_BY_SEVERITY[name]) / 5, abs=5e-7)


# ----------------------------------------------------------------------------- accuracy

def test_accuracy_hand_case():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    targets = torch.tensor([1, 0, 1, 2])
    assert M.accuracy(logits, targets) == pytest.approx(50.0)


def test_accuracy_class_subset_maps_full_space_targets():
    # 5 classes; the subset is columns [1, 3]. Row 0: best overall is column 0, best in subset is 3.
    logits = torch.tensor([[9.0, 1.0, 0.0, 2.0, 0.0],
                           [9.0, 5.0, 0.0, 2.0, 0.0],
                           [0.0, 1.0, 9.0, 0.5, 0.0]])
    targets = torch.tensor([3, 1, 3])
    assert M.accuracy(logits, targets) == pytest.approx(0.0)
    assert M.accuracy(logits, targets, class_subset=[1, 3]) == pytest.approx(200 / 3)
    assert M.accuracy(logits, targets, class_subset=torch.tensor([3, 1])) == pytest.approx(200 / 3)


def test_accuracy_refuses_bad_input():
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="not in class_subset"):
        M.accuracy(logits, torch.tensor([0, 2]), class_subset=[0, 1])
    with pytest.raises(ValueError, match="one class index per row"):
        M.accuracy(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="0..3"):
        M.accuracy(logits, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="empty"):
        M.accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))


def test_imagenet9_accuracy_unmapped_prediction_is_wrong():
    class_map = torch.full((6,), -1)
    class_map[0], class_map[1], class_map[2] = 0, 0, 1
    logits = torch.tensor([[0, 5.0, 0, 0, 0, 0],     # -> class 1 -> in9 0: right
                           [0, 0, 5.0, 0, 0, 0],     # -> class 2 -> in9 1: wrong (target 0)
                           [0, 0, 0, 0, 5.0, 0],     # -> class 4 -> unmapped: wrong (even for target 0)
                           [0, 0, 5.0, 0, 0, 0]])    # -> in9 1: right
    targets = torch.tensor([0, 0, 0, 1])
    assert M.imagenet9_accuracy(logits, targets, class_map) == pytest.approx(50.0)
    nine = torch.eye(9)[[0, 3, 8]]
    assert M.imagenet9_accuracy(nine, torch.tensor([0, 3, 7]), class_map) == pytest.approx(200 / 3)


# ----------------------------------------------------------------------------- ImageNet-C

def test_corruption_errors_hand_case():
    err = {"snow": {1: .5, 2: .6, 3: .7, 4: .8, 5: .9},             # mean .7
           "fog": {s: .4 for s in range(1, 6)},                      # mean .4
           "saturate": {"1": .2, "5": .3},                           # extra, partial severities
           "contrast": {5: .6}}                                      # partial: no CE
    out = M.corruption_errors(err, clean_error=0.2)
    assert out["ce"] == pytest.approx({"snow": 100 * .7 / .866816, "fog": 100 * .4 / .819324})
    assert set(out["ce_skipped"]) == {"saturate", "contrast"}
    assert out["mce_over"] == ["snow", "fog"] and out["mce_complete"] is False
    assert out["mce"] == pytest.approx((100 * .7 / .866816 + 100 * .4 / .819324) / 2)
    rel_snow = 100 * (.7 - .2) / (.866816 - M.ALEXNET_CLEAN_ERROR)
    rel_fog = 100 * (.4 - .2) / (.819324 - M.ALEXNET_CLEAN_ERROR)
    assert out["relative_mce"] == pytest.approx((rel_snow + rel_fog) / 2)
    assert out["sev5_top1"] == pytest.approx(100 * ((1 - .9) + (1 - .4) + (1 - .3) + (1 - .6)) / 4)
    assert sorted(out["sev5_over"]) == ["contrast", "fog", "saturate", "snow"]
    cells = [.5, .6, .7, .8, .9] + [.4] * 5 + [.2, .3] + [.6]
    assert out["mean_top1"] == pytest.approx(100 * np.mean([1 - c for c in cells]))


def test_corruption_errors_alexnet_itself_scores_100():
    err = {name: {s: value for s in range(1, 6)} for name, value in M.ALEXNET_ERRORS.items()}
    out = M.corruption_errors(err, clean_error=M.ALEXNET_CLEAN_ERROR)
    assert out["mce_complete"] and out["mce"] == pytest.approx(100.0)
    assert out["relative_mce"] == pytest.approx(100.0)
    assert len(out["ce"]) == 19 and len(out["sev5_over"]) == 19
    assert "relative_mce" not in M.corruption_errors(err)


# The 15 corruptions of the ImageNet-C benchmark (Hendrycks & Dietterich, 2019; the release's
# "common" set), the ones mCE averages; the release's 4 extra corruptions are held out of it.
_COMMON_15 = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
              "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
              "jpeg_compression")
_EXTRA_4 = ("speckle_noise", "gaussian_blur", "spatter", "saturate")


def test_corruption_errors_mce_averages_only_the_15_common_corruptions():
    """mCE and relative mCE (Table 1) average the 15 benchmark corruptions, never the 4 extra ones.

    With all 19 corruptions scored (a real run), every common corruption at half AlexNet's error (CE 50)
    and every extra one at AlexNet's error (CE 100): mCE must be 50; an average over all 19 gives
    (15*50 + 4*100)/19 = 60.53. AlexNet's errors here are the README's per-severity values above,
    not the module's constants. The relative case: corrupted error E_c = E_clean + (A_c - A_clean)/2 on
    the common ones gives relative CE 50 each (and 100 on the extras at A_c), relative mCE 50."""
    alexnet = {c: sum(v) / 5 for c, v in _ALEXNET_BY_SEVERITY.items()}
    err = {c: {s: 0.5 * alexnet[c] for s in range(1, 6)} for c in _COMMON_15}
    err.update({c: {s: alexnet[c] for s in range(1, 6)} for c in _EXTRA_4})
    out = M.corruption_errors(err)
    assert len(out["ce"]) == 19                                    # precondition: the extras have a CE of 100
    assert out["ce"]["saturate"] == pytest.approx(100.0, abs=1e-3)
    assert sorted(out["mce_over"]) == sorted(_COMMON_15) and out["mce_complete"] is True
    assert out["mce"] == pytest.approx(50.0, abs=1e-3)

    clean = 1 - 0.56522                                            # torchvision's AlexNet: acc@1 56.522
    err = {c: {s: clean + 0.5 * (alexnet[c] - clean) for s in range(1, 6)} for c in _COMMON_15}
    err.update({c: {s: alexnet[c] for s in range(1, 6)} for c in _EXTRA_4})
    out = M.corruption_errors(err, clean_error=clean)
    assert len(out["relative_ce"]) == 19 and out["relative_ce"]["spatter"] == pytest.approx(100.0, abs=1e-3)
    assert sorted(out["relative_mce_over"]) == sorted(_COMMON_15)
    assert out["relative_mce"] == pytest.approx(50.0, abs=1e-3)


def test_corruption_errors_names_a_corruption_the_baseline_is_not_hurt_by():
    # a measured baseline (another class space) can be as good or better on a corruption than clean: that
    # corruption has no relative CE; its CE, the mCE and the other relative CEs stay (it raised, losing all)
    err = {"brightness": {s: .25 for s in range(1, 6)}, "snow": {s: .5 for s in range(1, 6)}}
    out = M.corruption_errors(err, clean_error=.2, baseline={"brightness": .2, "snow": .6}, baseline_clean_error=.3)
    assert out["ce"] == pytest.approx({"brightness": 125.0, "snow": 100 * .5 / .6})
    assert out["mce"] == pytest.approx((125.0 + 100 * .5 / .6) / 2) and out["mce_over"] == ["snow", "brightness"]
    assert out["relative_ce"] == pytest.approx({"snow": 100 * (.5 - .2) / (.6 - .3)})
    assert out["relative_mce"] == pytest.approx(100 * (.5 - .2) / (.6 - .3)) and out["relative_mce_over"] == ["snow"]
    assert out["relative_ce_skipped"] == {"brightness": "undefined: the baseline's corruption error (0.2) is not "
                                                        "above its clean error (0.3)"}
    assert M.corruption_errors(err, clean_error=.2)["relative_ce_skipped"] == {}  # AlexNet's: every one defined


def test_corruption_errors_refuses_bad_input():
    with pytest.raises(ValueError, match="fraction"):
        M.corruption_errors({"snow": {1: 45.0}})
    with pytest.raises(ValueError, match="severities are 1..5"):
        M.corruption_errors({"snow": {6: .5}})
    with pytest.raises(ValueError, match="baseline_clean_error"):
        M.corruption_errors({"snow": {1: .5}}, clean_error=.2, baseline={"snow": .8})
    with pytest.raises(ValueError, match="non-empty"):
        M.corruption_errors({})


# ----------------------------------------------------------------------------- ImageNet-P

def release_flip_prob(predictions, noise, difficulty):
    # the ImageNet-P release's flip_prob loop, written out
    step = 1 if noise else difficulty
    total = 0.0
    for video in predictions:
        flips = []
        for i in range(step):
            previous = video[i]
            for p in video[i::step][1:]:
                flips.append(int(previous != p))
                if not noise:
                    previous = p
        total += np.mean(flips) / len(predictions)
    return total


def release_top5_distance(logits, noise, difficulty):
    # the release's ranking_dist(mode='top5') on rankdata(-scores, 'ordinal') ranks
    from scipy.stats import rankdata

    cum_sum_top5 = np.cumsum(np.asarray([0] + [1] * 5 + [0] * (logits.shape[-1] - 6)))

    def dist(sigma):
        return np.sum(np.abs(cum_sum_top5[:5] - cum_sum_top5[sigma - 1][:5]))

    step = 1 if noise else difficulty
    total = 0.0
    for video in logits:
        ranks = [rankdata(-frame, method="ordinal").astype(int) for frame in video]  # newer scipy: float ranks
        values = []
        for i in range(step):
            perm1 = ranks[i]
            perm1_inv = np.argsort(perm1)
            for perm2 in ranks[i::step][1:]:
                values.append(dist(perm2[perm1_inv]))
                if not noise:
                    perm1 = perm2
                    perm1_inv = np.argsort(perm1)
        total += np.mean(values) / len(logits)
    return total


def test_flip_probability_hand_case():
    p = torch.tensor([[0, 0, 1, 1, 0]])
    assert M.flip_probability(p, noise=False) == pytest.approx(2 / 4)     # 0-0, 0-1, 1-1, 1-0
    assert M.flip_probability(p, noise=True) == pytest.approx(2 / 4)      # vs frame 0: 0, 1, 1, 0
    assert M.flip_probability(p, noise=False, stride=2) == pytest.approx(1.0)    # (0,2) 0-1, (1,3) 0-1, (2,4) 1-0
    q = torch.tensor([[0, 1, 0, 0, 1]])
    assert M.flip_probability(q, noise=False, stride=2) == pytest.approx(2 / 3)  # 0-0, 1-0, 0-1
    assert M.flip_probability(torch.tensor([[3, 3, 3], [3, 4, 4]]), noise=True) == pytest.approx(0.5)
    per = M.flip_probability(torch.tensor([[3, 3, 3], [3, 4, 4]]), noise=False, per_sequence=True)
    assert per.tolist() == pytest.approx([0.0, 0.5])


@pytest.mark.parametrize("noise,stride", [(True, 1), (False, 1), (False, 2), (False, 3)])
def test_flip_probability_matches_release_loop(noise, stride):
    g = torch.Generator().manual_seed(1)
    p = torch.randint(0, 3, (6, 31), generator=g)
    assert M.flip_probability(p, noise, stride) == pytest.approx(release_flip_prob(p.numpy(), noise, stride))


def test_top5_distance_hand_case():
    base = torch.tensor([10.0, 9, 8, 7, 6, 5, 4])
    swapped = torch.tensor([9.0, 10, 8, 7, 6, 5, 4])       # top-2 swapped: |0-1| + |1-0| = 2
    dropped = torch.tensor([0.0, 9, 8, 7, 6, 5, 4])        # best falls out of the top 5: |0-5| = 5, others move up
    seq = torch.stack([base, swapped, dropped])[None]
    # consecutive: (base, swapped) = 2; (swapped, dropped): swapped's top5 = [1,0,2,3,4]; in dropped
    # class 1 is rank 0, class 0 is rank 6 -> 5, 2 -> 1, 3 -> 2, 4 -> 3: |0-0|+|1-5|+|2-1|+|3-2|+|4-3| = 7
    assert M.top5_distance(seq, noise=False) == pytest.approx((2 + 7) / 2)
    # noise: both against base; (base, dropped): j=0 class 0 -> rank 6, clipped 5: |0-5| = 5; j=1..4
    # classes 1..4 -> ranks 0..3: 1 each; total 9
    assert M.top5_distance(seq, noise=True) == pytest.approx((2 + 9) / 2)
    ties = torch.zeros(1, 2, 7)                               # all equal: ranks by class index, no move
    assert M.top5_distance(ties, noise=False) == 0.0


@pytest.mark.parametrize("noise,stride", [(True, 1), (False, 1), (False, 2), (False, 3)])
def test_top5_distance_matches_release(noise, stride):
    g = torch.Generator().manual_seed(2)
    # small integer scores so that ties happen and their ordering is exercised
    logits = torch.randint(0, 6, (4, 13, 20), generator=g).float()
    got = M.top5_distance(logits, noise, stride)
    assert got == pytest.approx(release_top5_distance(logits.numpy(), noise, stride))


def test_imagenet_p_refuses_bad_input():
    with pytest.raises(ValueError, match="stride"):
        M.flip_probability(torch.zeros(2, 5, dtype=torch.long), noise=False, stride=0)
    with pytest.raises(ValueError, match="no frame pairs"):
        M.flip_probability(torch.zeros(2, 3, dtype=torch.long), noise=False, stride=3)
    with pytest.raises(ValueError, match="sequences, frames, classes"):
        M.top5_distance(torch.zeros(2, 5), noise=False)


def test_mfr_and_mt5d_normalise_by_baseline():
    fp = {"rotate": 0.02, "gaussian_noise": 0.05}
    base = {"rotate": 0.04, "gaussian_noise": 0.10, "tilt": 0.3}
    assert M.flip_rates(fp, base) == pytest.approx({"rotate": 50.0, "gaussian_noise": 50.0})
    assert M.mfr({"rotate": 0.02, "gaussian_noise": 0.1}, base) == pytest.approx((50 + 100) / 2)
    assert M.mt5d({"rotate": 1.0}, {"rotate": 4.0}) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="baseline has no"):
        M.mfr({"scale": 0.1}, base)
    with pytest.raises(ValueError, match="zero baseline"):
        M.mt5d({"rotate": 1.0}, {"rotate": 0.0})


# ----------------------------------------------------------------------------- ImageNet-O

def test_ood_scores_hand_cases():
    perfect = M.ood_scores(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.8, 0.9]))
    assert perfect == pytest.approx({"aupr": 100.0, "auroc": 100.0, "fpr95": 0.0})
    # in [0.1, 0.6], out [0.5, 0.9]: descending 0.9+ 0.6- 0.5+ 0.1-
    # AP = 1/2 * 1 + 1/2 * 2/3; AUROC: pairs out>in: (0.9>both, 0.5>0.1) = 3 of 4
    r = M.ood_scores(torch.tensor([0.1, 0.6]), torch.tensor([0.5, 0.9]))
    assert r["aupr"] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))
    assert r["auroc"] == pytest.approx(75.0)
    assert r["fpr95"] == pytest.approx(50.0)                 # TPR reaches 100 % at threshold 0.5, one of two negatives above


def test_ood_scores_match_scikit_learn():
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    g = torch.Generator().manual_seed(3)
    inside = torch.randn(400, generator=g)
    outside = torch.randn(150, generator=g) + 0.8
    inside[:40] = torch.round(inside[:40])                   # ties, inside and across the two sets
    outside[:30] = torch.round(outside[:30])
    got = M.ood_scores(inside, outside)
    y = np.r_[np.zeros(400), np.ones(150)]
    s = torch.cat([inside, outside]).numpy()
    assert got["aupr"] == pytest.approx(100 * average_precision_score(y, s), abs=1e-9)
    assert got["auroc"] == pytest.approx(100 * roc_auc_score(y, s), abs=1e-9)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert got["fpr95"] == pytest.approx(100 * fpr[np.searchsorted(tpr, 0.95)], abs=1e-9)


def test_ood_scores_fpr95_counts_a_tpr_of_exactly_95_percent():
    # 20 positives: TPR is exactly 19/20 = 0.95 once the 19th-highest positive is reached, so that
    # threshold (not the next one, TPR 100 %) is FPR95's; sklearn's roc_curve + searchsorted agrees.
    # hand case: positives 0.5, 1.5, ..., 19.5; the 19th-highest is 1.5; negatives at or above it: 2.0
    hand = M.ood_scores(torch.tensor([2.0, 1.0, 0.0, -1.0]), torch.arange(20, dtype=torch.float64) + 0.5)
    assert hand["fpr95"] == pytest.approx(25.0)              # at TPR 100 % (threshold 0.5) it would be 50.0
    from sklearn.metrics import roc_curve

    g = torch.Generator().manual_seed(0)
    inside = torch.randn(40, generator=g)
    outside = torch.randn(20, generator=g) + 0.8
    threshold = outside.sort(descending=True).values[18]     # the 19th of 20 positives
    expected = 100.0 * float((inside >= threshold).double().mean())
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(40), np.ones(20)], torch.cat([inside, outside]).numpy(),
                            drop_intermediate=False)
    assert expected == pytest.approx(100 * fpr[np.searchsorted(tpr, 0.95)]) == pytest.approx(65.0)
    assert M.ood_scores(inside, outside)["fpr95"] == pytest.approx(expected, abs=1e-9)


def test_ood_scores_auroc_starts_the_curve_at_the_origin_when_the_top_score_is_tied():
    """AUROC's ROC curve starts at (FPR 0, TPR 0) even when the highest score is shared by a negative
    (a tie at the top: likely under --amp, which quantises the softmax).

    in [1.0, 0.0], out [1.0, 0.5]. By pairs (out vs in; a tie counts one half): (1.0, 1.0) 1/2,
    (1.0, 0.0) 1, (0.5, 1.0) 0, (0.5, 0.0) 1: AUROC = 2.5/4 = 62.5 %. A curve that starts at its first
    threshold's point (1/2, 1/2) instead of the origin loses the first triangle: 50 %. AP by hand:
    threshold 1.0 has precision 1/2 at recall 1/2, threshold 0.5 precision 2/3 at recall 1: 1/4 + 1/3.
    FPR95: TPR reaches 100 % at 0.5, where one of the two negatives is above: 50 %. scikit-learn agrees:
    roc_auc_score([0, 0, 1, 1], [1, 0, 1, .5]) = 0.625, average_precision_score(...) = 0.5833."""
    got = M.ood_scores(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.5]))
    assert got["auroc"] == pytest.approx(62.5)
    assert got["aupr"] == pytest.approx(100 * (1 / 4 + 1 / 3))
    assert got["fpr95"] == pytest.approx(50.0)


def test_ood_scores_refuses_empty_or_nan():
    with pytest.raises(ValueError, match="empty"):
        M.ood_scores(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        M.ood_scores(torch.tensor([0.1, float("nan")]), torch.tensor([1.0]))


# ----------------------------------------------------------------------------- ImageNet-9

def test_background_gap():
    out = M.background_gap({"original": 95.6, "mixed_same": 86.2, "mixed_rand": 78.9, "only_fg": 80.0})
    assert out == pytest.approx({"original": 95.6, "mixed_same": 86.2, "mixed_rand": 78.9, "bg_gap": 7.3})
    assert M.background_gap({"mixed_same": 50.0, "mixed_rand": 60.0})["original"] is None
    assert M.background_gap({"original": None, "mixed_same": 50.0, "mixed_rand": 60.0})["bg_gap"] == -10.0
    with pytest.raises(ValueError, match="mixed_same"):
        M.background_gap({"mixed_same": None, "mixed_rand": 60.0})
    with pytest.raises(ValueError, match="mixed_rand"):
        M.background_gap({"original": 90.0, "mixed_same": 80.0})
    with pytest.raises(ValueError, match="unknown ImageNet-9 variant"):
        M.background_gap({"mixed_same": 80.0, "mixed_rand": 70.0, "mixed-rand": 1.0})
    with pytest.raises(ValueError, match="percent"):
        M.background_gap({"mixed_same": 0.8, "mixed_rand": 170.0})


def _release_fpr95(negatives: np.ndarray, positives: np.ndarray) -> float:
    """FPR at 95 % TPR by the ImageNet-O release's rule (calibration_tools.fpr_and_fdr_at_recall, as
    the natural-adv-examples / outlier-exposure code computes it; transcribed from its steps): the
    distinct-score thresholds from the highest down to the first that reaches every positive, walked
    from that one back up, a final (recall 1, 0 false positives) point appended, and the threshold
    whose recall is nearest 0.95 taken (the first of a tie in that walk: the lower threshold)."""
    scores = np.r_[positives, negatives]
    labels = np.r_[np.ones(len(positives), bool), np.zeros(len(negatives), bool)]
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, labels = scores[order], labels[order]
    cut = np.r_[np.where(np.diff(scores))[0], labels.size - 1]
    tps = np.cumsum(labels, dtype=np.float64)[cut]
    fps = 1 + cut - tps
    last = tps.searchsorted(tps[-1])
    recall = np.r_[(tps / tps[-1])[last::-1], 1]
    fps = np.r_[fps[last::-1], 0]
    return 100.0 * fps[np.argmin(np.abs(recall - 0.95))] / len(negatives)


def test_ood_fpr95_and_the_releases_nearest_recall_rule_differ_by_one_positive_gap():
    """README (ImageNet-O's FPR95): lkfast takes the highest threshold whose TPR reaches 0.95 (as
    scikit-learn's roc_curve read at 0.95); the release's calibration_tools the threshold whose TPR
    is nearest 0.95, and of thresholds exactly at 0.95 the lowest. With ImageNet-O's 2,000 positives
    TPR is exactly 0.95 from the 1,900th-highest positive down to just above the 1,901st, so the two
    differ by the negatives scored between those two positives: on 20 draws of 10,000 N(0, 1)
    negatives and 2,000 N(1.5, 1) positives, up to 0.76 points (the figure the README gives)."""
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(20):
        negatives, positives = rng.standard_normal(10_000), rng.standard_normal(2_000) + 1.5
        ours = M.ood_scores(torch.from_numpy(negatives), torch.from_numpy(positives))["fpr95"]
        release = _release_fpr95(negatives, positives)
        top = np.sort(positives)[::-1]
        between = int(((negatives > top[1900]) & (negatives < top[1899])).sum())
        assert ours == pytest.approx(100.0 * float((negatives > top[1899]).mean()), abs=1e-9)
        assert release - ours == pytest.approx(100.0 * between / 10_000, abs=1e-9)
        gaps.append(release - ours)
    assert max(gaps) == pytest.approx(0.76, abs=1e-9)
    # the transcription against a hand case: TPRs 0.5, 0.9, 1.0 at thresholds 3, 2, 1: the nearest
    # to 0.95 is a tie of 0.9 and 1.0, and the walk up from TPR 1.0 meets 1.0 first
    hand = _release_fpr95(np.array([2.5, 1.5, 0.0, 0.0]), np.array([3.0] * 5 + [2.0] * 4 + [1.0]))
    assert hand == pytest.approx(50.0)
    assert M.ood_scores(torch.tensor([2.5, 1.5, 0.0, 0.0]), torch.tensor([3.0] * 5 + [2.0] * 4 + [1.0]))["fpr95"] == 50.0
