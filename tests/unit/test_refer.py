"""Refer rules shared by calibration, the model card and serving: mask/label disagreement with a fitted area."""

from __future__ import annotations

import numpy as np
import pytest

from braintumor.train.naming import CLASSES
from braintumor.train.refer import fit_disagree_min_area, heads_disagree, mask_area, refer_policy_stats

NT = CLASSES.index("no_tumor")
GL = CLASSES.index("glioma")


def test_mask_area_counts_pixels_at_the_threshold():
    probs = np.zeros((2, 8, 8), np.float32)
    probs[0, :2, :3] = 0.5
    probs[1, 0, 0] = 0.49
    np.testing.assert_array_equal(mask_area(probs), [6, 0])
    assert mask_area(probs[0]) == 6


@pytest.mark.parametrize("label, area, min_area, disagree", [
    (GL, 0, 10.0, True),  # tumour class, empty mask
    (GL, 1, 10.0, False),
    (NT, 10, 10.0, False),  # at the fitted area: allowed
    (NT, 11, 10.0, True),  # above it: the mask head saw a tumour
    (NT, 500, None, False),  # a model without the fitted area never refers no_tumor for its mask
    (GL, 0, None, True),
])
def test_heads_disagree(label, area, min_area, disagree):
    assert heads_disagree(np.array([label]), np.array([area]), min_area)[0] == disagree


def test_fitted_area_leaves_at_most_the_budget_of_healthy_slices_above_it():
    areas = np.arange(200)  # 200 correctly classified no_tumor slices with areas 0..199
    labels = np.full(200, NT)
    min_area = fit_disagree_min_area(labels, labels, areas, false_refer=0.01)
    assert min_area == 197.0 and (areas > min_area).sum() == 2  # 1% of 200
    # Misclassified or tumour slices do not move the cut; no healthy slice at all -> 0.
    assert fit_disagree_min_area(np.r_[labels, GL], np.r_[labels, NT], np.r_[areas, 10_000]) == 197.0
    assert fit_disagree_min_area(np.array([GL]), np.array([GL]), np.array([5])) == 0.0


def test_policy_stats_count_missed_tumours_among_accepted():
    y = np.array([GL, GL, NT, NT])
    probs = np.array([[0.05, 0.05, 0.0, 0.9],  # glioma called no_tumor, confident: accepted by the threshold
                      [0.9, 0.05, 0.05, 0.0],
                      [0.0, 0.0, 0.05, 0.95],
                      [0.3, 0.2, 0.1, 0.4]])  # unsure: referred by the threshold
    order = [CLASSES.index(c) for c in ("glioma", "meningioma", "pituitary", "no_tumor")]
    probs = probs[:, np.argsort(order)]
    threshold_only = refer_policy_stats(y, probs, 0.8, None)
    assert threshold_only == {"refer_rate": 0.25, "n_referred": 1, "accepted_accuracy": 2 / 3, "n_accepted": 3,
                              "missed_tumours_accepted": 1, "missed_tumours_all": 1}
    both = refer_policy_stats(y, probs, 0.8, np.array([True, False, False, False]))
    assert both["missed_tumours_accepted"] == 0 and both["accepted_accuracy"] == 1.0 and both["refer_rate"] == 0.5


def test_serving_refers_exactly_the_slices_the_model_card_refers():
    """The same model outputs through serving's postprocess (one image at a time) and through the card's metrics
    (the whole split at once) give the same refer decision and the same disagreement flag, ties included."""
    from braintumor.serving.postprocess import postprocess
    from braintumor.train.card_metrics import card_metrics
    from braintumor.train.decode import DecodedImage
    from braintumor.train.preprocess import PreprocessConfig, preprocess
    from braintumor.train.refer import ReferRules, decide, ood_flags

    rng = np.random.default_rng(7)
    n, size = 60, 16
    rules = ReferRules(threshold=0.8, disagree_min_area=6.0, ood_threshold=100.0)
    logits = rng.normal(size=(n, len(CLASSES))) * 3
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    probs[0] = [0.8, 0.1, 0.05, 0.05]  # at the threshold in float32: not referred
    mask_probs = np.zeros((n, size, size), np.float32)
    for i in range(n):
        side = int(rng.integers(0, 5))
        mask_probs[i, 2:2 + side, 3:3 + side] = rng.uniform(0.4, 1.0)
    mask_probs[0, 8:10, 8:10] = 0.9  # glioma with a mask: only the threshold could refer it
    mask_probs[1] = 0.0
    mask_probs[1, :2, :3] = 1.0  # exactly the fitted area (6 px)
    probs[1] = [0.01, 0.01, 0.01, 0.97]
    scores = rng.uniform(50, 150, n).astype(np.float32)
    scores[:2] = 60.0
    scores[2] = 100.0  # at the OOD threshold: not referred
    probs[2] = [0.97, 0.01, 0.01, 0.01]
    mask_probs[2, 8:10, 8:10] = 0.9

    pixels = rng.integers(30, 200, (size, size), dtype=np.uint8)  # a slice no pixel heuristic refers
    decoded = DecodedImage(pixels, "L", False)
    _, geometry = preprocess(pixels, PreprocessConfig(image_size=size, geometry="resize"))
    served = [postprocess({"class_probs": probs[i][None], "mask_prob": mask_probs[i][None, None],
                           "cam": np.zeros((1, len(CLASSES), 4, 4), np.float32), "ood_score": scores[i].reshape(1, 1)},
                          geometry, decoded, classes=CLASSES, rules=rules)
              for i in range(n)]

    flags = decide(probs, mask_probs, scores, rules)
    y_true = rng.integers(0, len(CLASSES), n)
    card = card_metrics(y_true, probs, mask_probs > 0.5, mask_probs, None, np.zeros(n, bool),
                        refer_threshold=rules.threshold, n_boot=5, disagree=flags.disagree,
                        ood=ood_flags(scores, rules.ood_threshold))
    assert [r.refer for r in served] == flags.refer.tolist()
    assert [r.mask_label_disagree for r in served] == flags.disagree.tolist()
    assert card["refer"]["policies"]["threshold+disagreement+ood"]["n_referred"] == sum(r.refer for r in served)
    assert not served[0].refer and not served[1].refer and not served[2].refer  # the ties
    assert 0 < sum(r.refer for r in served) < n
