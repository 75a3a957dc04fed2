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
