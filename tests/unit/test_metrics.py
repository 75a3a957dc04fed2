"""Hand-computed cases for braintumor.train.metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from braintumor.train.metrics import (
    bootstrap_ci,
    classification_metrics,
    dice_iou_vs_threshold,
    expected_calibration_error,
    fit_temperature,
    multiclass_brier,
    pointing_game,
    pointing_game_hits,
    reliability_curve,
    segmentation_metrics,
    softmax,
    to_jsonable,
)
from braintumor.train.naming import CLASSES


def _probs_for(pred: list[int], n_classes: int = 4, top: float = 0.7) -> np.ndarray:
    rest = (1 - top) / (n_classes - 1)
    probs = np.full((len(pred), n_classes), rest)
    probs[np.arange(len(pred)), pred] = top
    return probs


# --------------------------------------------------------------------------- classification

Y_TOY = np.array([0, 0, 1, 1, 2, 2])
PRED_TOY = [0, 1, 1, 1, 2, 0]


def test_classification_toy_by_hand():
    m = classification_metrics(Y_TOY, _probs_for(PRED_TOY))
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # glioma P=R=1/2; meningioma P=2/3 R=1 F1=0.8; pituitary P=1 R=1/2 F1=2/3; no_tumor absent from both sides
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    expected = {
        "glioma": (0.5, 0.5, 0.5, 2),
        "meningioma": (2 / 3, 1.0, 0.8, 2),
        "pituitary": (1.0, 0.5, 2 / 3, 2),
        "no_tumor": (0.0, 0.0, 0.0, 0),
    }
    assert list(m["per_class"]) == list(CLASSES)
    for name, (p, r, f, s) in expected.items():
        got = m["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx((p, r, f, s))
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    # every prediction has confidence 0.7 and 4/6 are right: one filled bin, gap |4/6 - 0.7|
    assert m["ece"] == pytest.approx(abs(4 / 6 - 0.7))
    p_true = np.where(np.array(PRED_TOY) == Y_TOY, 0.7, 0.1)
    assert m["nll"] == pytest.approx(-np.mean(np.log(p_true)))


def test_missing_class_auc_uses_present_classes():
    probs = _probs_for(PRED_TOY)
    m = classification_metrics(Y_TOY, probs)
    per_class = [roc_auc_score(Y_TOY == k, probs[:, k]) for k in range(3)]
    assert m["roc_auc_ovr"] == pytest.approx(np.mean(per_class))
    assert m["roc_auc_classes"] == ["glioma", "meningioma", "pituitary"]
    assert m["per_class"]["no_tumor"]["roc_auc"] is None


def test_single_class_auc_is_nan_and_json_null():
    y = np.zeros(5, dtype=int)
    m = classification_metrics(y, _probs_for([0, 0, 1, 0, 2]))
    assert math.isnan(m["roc_auc_ovr"])
    assert m["roc_auc_classes"] == []
    assert json.loads(json.dumps(to_jsonable(m), allow_nan=False))["roc_auc_ovr"] is None


def test_brier_matches_definition_and_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 40)
    probs = rng.dirichlet(np.ones(4), 40)
    manual = np.mean([np.sum((probs[i] - np.eye(4)[y[i]]) ** 2) for i in range(40)])
    assert multiclass_brier(y, probs) == pytest.approx(manual)
    assert multiclass_brier([0, 1], [[1.0, 0.0], [0.0, 1.0]]) == 0.0
    assert multiclass_brier([0], [[0.0, 1.0]]) == 2.0


@pytest.mark.parametrize(
    ("y", "probs"),
    [
        (np.array([0, 1]), np.ones((3, 2)) / 2),  # rows mismatch
        (np.array([0, 1, 2]), np.ones((3, 2)) / 2),  # label out of range
    ],
)
def test_classification_rejects_bad_shapes(y, probs):
    with pytest.raises(ValueError):
        classification_metrics(y, probs, classes=("a", "b"))


def test_classification_rejects_class_count_mismatch():
    with pytest.raises(ValueError, match="class names"):
        classification_metrics(Y_TOY, _probs_for(PRED_TOY, n_classes=3), classes=CLASSES)


# --------------------------------------------------------------------------- calibration


def _binary(conf: float, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every sample predicts class 0 with confidence ``conf``."""
    probs = np.tile([conf, 1 - conf], (len(labels), 1))
    return probs, np.array(labels)


@pytest.mark.parametrize(
    ("conf", "labels", "ece"),
    [
        (0.8, [0] * 8 + [1] * 2, 0.0),  # 80% confident, 80% right
        (1.0, [0] * 5 + [1] * 5, 0.5),  # certain, half right
        (0.6, [0] * 10, 0.4),  # under-confident
        (0.9, [1] * 4, 0.9),  # confidently wrong every time
    ],
)
def test_ece_constructed(conf, labels, ece):
    probs, y = _binary(conf, labels)
    assert expected_calibration_error(probs, y) == pytest.approx(ece, abs=1e-12)


def test_ece_weights_bins_by_count():
    # bin of 0.95: 4 samples, 3 right (gap 0.2); bin of 0.55: 6 samples, all right (gap 0.45)
    p_hi, y_hi = _binary(0.95, [0, 0, 0, 1])
    p_lo, y_lo = _binary(0.55, [0] * 6)
    probs, y = np.vstack([p_hi, p_lo]), np.concatenate([y_hi, y_lo])
    assert expected_calibration_error(probs, y) == pytest.approx(0.4 * 0.2 + 0.6 * 0.45)
    curve = reliability_curve(probs, y)
    assert curve["count"].sum() == 10
    assert curve["count"][14] == 4 and curve["count"][8] == 6  # (14/15, 1] and (8/15, 9/15]
    assert curve["accuracy"][14] == pytest.approx(0.75)
    assert curve["confidence"][8] == pytest.approx(0.55)
    assert np.isnan(curve["accuracy"][0])


def test_reliability_bins_are_right_closed():
    # with 4 bins the edges are exact binary fractions: 0.5 falls in (0.25, 0.5], 0.75 in (0.5, 0.75]
    probs = np.array([[0.5, 0.5], [0.75, 0.25], [1.0, 0.0]])
    np.testing.assert_array_equal(reliability_curve(probs, np.zeros(3), n_bins=4)["count"], [0, 1, 1, 1])


def test_fit_temperature_recovers_two():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 4))
    # labels drawn from softmax(logits / 2): the logits are over-confident by a factor 2
    p = softmax(logits, 2.0)
    y = (rng.random(4000)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    assert fit_temperature(logits, y) == pytest.approx(2.0, rel=0.08)
    assert fit_temperature(logits / 2.0, y) == pytest.approx(1.0, rel=0.08)


# --------------------------------------------------------------------------- segmentation

TRUTH = np.array(
    [
        [[1, 1], [0, 0]],
        [[0, 1], [0, 1]],
        [[0, 0], [0, 0]],  # no tumour: not scored
    ],
    dtype=np.uint8,
)
MASK_PROBS = np.array(
    [
        [[0.9, 0.1], [0.8, 0.0]],
        [[0.0, 1.0], [0.0, 1.0]],
        [[0.0, 0.5], [0.0, 0.0]],  # 0.5 >= threshold: a false positive pixel
    ]
)


def test_segmentation_by_hand():
    m = segmentation_metrics(TRUTH, MASK_PROBS, threshold=0.5)
    # slice 0: pred {(0,0),(1,0)} vs truth {(0,0),(0,1)} -> overlap 1, Dice 2/4, IoU 1/3; slice 1 perfect
    np.testing.assert_allclose(m["dice_per_slice"], [0.5, 1.0, np.nan])
    np.testing.assert_allclose(m["iou_per_slice"], [1 / 3, 1.0, np.nan])
    assert m["dice"] == pytest.approx(0.75)
    assert m["iou"] == pytest.approx(2 / 3)
    assert m["n_tumour_slices"] == 2
    assert m["empty_fp_rate"] == 1.0


def test_dice_iou_vs_threshold_by_hand():
    curve = dice_iou_vs_threshold(TRUTH, MASK_PROBS, thresholds=[0.05, 0.85, 0.95])
    # slice 0 at 0.05: pred 3 px, overlap 2 -> Dice 0.8, IoU 2/3; at 0.85: 1 px -> 2/3, 1/2; at 0.95: empty -> 0
    np.testing.assert_allclose(curve["dice"], [(0.8 + 1) / 2, (2 / 3 + 1) / 2, 0.5])
    np.testing.assert_allclose(curve["iou"], [(2 / 3 + 1) / 2, 0.75, 0.5])
    for t, d in zip(curve["thresholds"], curve["dice"]):
        assert segmentation_metrics(TRUTH, MASK_PROBS, t)["dice"] == pytest.approx(d)


def test_segmentation_without_tumour_slices_is_nan():
    m = segmentation_metrics(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))
    assert math.isnan(m["dice"]) and m["empty_fp_rate"] == 0.0
    assert np.isnan(dice_iou_vs_threshold(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))["dice"]).all()


def test_segmentation_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="N, H, W"):
        segmentation_metrics(np.zeros((2, 3, 3)), np.zeros((2, 3, 4)))


# --------------------------------------------------------------------------- pointing game


def _cam_peak(cell: tuple[int, int], size: int = 4) -> np.ndarray:
    cam = np.zeros((size, size), dtype=np.float32)
    cam[cell] = 1.0
    return cam


def test_pointing_game_toy():
    masks = np.zeros((3, 8, 8), dtype=bool)
    masks[0, :3, :3] = True  # top-left tumour
    masks[1, :3, :3] = True
    cams = np.stack([_cam_peak((0, 0)), _cam_peak((3, 3)), _cam_peak((1, 1))])  # 4x4 maps, upsampled to 8x8
    np.testing.assert_array_equal(pointing_game_hits(cams, masks, dilation_px=0), [1.0, 0.0, np.nan])
    assert pointing_game(cams, masks, dilation_px=0) == 0.5
    # cell (3, 3) peaks at pixel (7, 7), city-block distance 10 from the block's corner (2, 2)
    assert pointing_game(cams, masks, dilation_px=9) == 0.5
    assert pointing_game(cams, masks, dilation_px=10) == 1.0


def test_pointing_game_same_size_and_no_tumour():
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 2, 2] = True
    assert pointing_game(_cam_peak((2, 2), 5)[None], masks, dilation_px=0) == 1.0
    assert math.isnan(pointing_game(np.ones((1, 5, 5)), np.zeros((1, 5, 5)), dilation_px=0))


# --------------------------------------------------------------------------- bootstrap and JSON


def _accuracy(y, pred):
    return float(np.mean(y == pred))


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    pred = np.where(rng.random(200) < 0.8, y, rng.integers(0, 4, 200))
    low, high = bootstrap_ci(_accuracy, y, pred, n_boot=500, seed=3)
    assert low < _accuracy(y, pred) < high
    assert high - low < 0.2
    assert bootstrap_ci(_accuracy, y, pred, n_boot=500, seed=3) == (low, high)
    assert bootstrap_ci(_accuracy, y, pred, n_boot=500, seed=4) != (low, high)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_bootstrap_skips_undefined_resamples():
    # resamples without the single positive make sklearn's AUC undefined (NaN or ValueError by version)
    y = np.array([0] * 19 + [1])
    score = np.linspace(0, 1, 20)
    low, high = bootstrap_ci(lambda a, b: roc_auc_score(a, b), y, score, n_boot=200, seed=0)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)


def test_bootstrap_rejects_misaligned_arrays():
    with pytest.raises(ValueError, match="first dimension"):
        bootstrap_ci(_accuracy, np.zeros(3), np.zeros(4))


def test_to_jsonable():
    obj = {
        "a": np.float32(0.5),
        "b": np.int64(3),
        "c": np.array([1.0, np.nan, np.inf]),
        "d": (np.bool_(True), float("nan")),
        1: {"e": [np.float64(-np.inf)]},
    }
    assert json.loads(json.dumps(to_jsonable(obj), allow_nan=False)) == {
        "a": 0.5,
        "b": 3,
        "c": [1.0, None, None],
        "d": [True, None],
        "1": {"e": [None]},
    }


def test_metrics_and_report_import_without_torch():
    code = "import sys, braintumor.train.metrics, braintumor.train.report; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
