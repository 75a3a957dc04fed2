"""braintumor.train.report renders one self-contained HTML page from small seeded inputs."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from braintumor.train.metrics import bootstrap_ci, classification_metrics, pointing_game, segmentation_metrics
from braintumor.train.naming import CLASSES, NO_TUMOR
from braintumor.train.report import SECTIONS, write_report

N, SIZE = 12, 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _inputs(seed: int = 0, *, all_correct: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    y_true = np.arange(N) % len(CLASSES)
    logits = rng.normal(0, 1, (N, len(CLASSES)))
    logits[np.arange(N), y_true] += 10.0 if all_correct else 1.0
    if not all_correct:
        logits[0, (y_true[0] + 1) % len(CLASSES)] += 6.0  # one confident mistake for sure
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    yy, xx = np.mgrid[:SIZE, :SIZE]
    masks = np.zeros((N, SIZE, SIZE), dtype=bool)
    for i in range(N):
        if CLASSES[y_true[i]] != NO_TUMOR:
            cy, cx, r = rng.integers(8, 24), rng.integers(8, 24), rng.integers(3, 7)
            masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    mask_probs = np.clip(masks * rng.uniform(0.3, 1.0, (N, 1, 1)) + rng.normal(0, 0.2, masks.shape), 0, 1)
    images = rng.integers(0, 120, (N, SIZE, SIZE)).astype(np.uint8)
    images[masks] = 220
    cams = rng.random((N, SIZE, SIZE)).astype(np.float32)
    keys = [f"brisc2025_test_{i:05d}" for i in range(N)]
    return dict(y_true=y_true, probs=probs, classes=CLASSES, masks_true=masks, mask_probs=mask_probs,
                images=images, cams=cams, keys=keys)


def _metrics(inp: dict) -> dict:
    seg = segmentation_metrics(inp["masks_true"], inp["mask_probs"])
    return {
        "classification": classification_metrics(inp["y_true"], inp["probs"]),
        "segmentation": seg,
        "pointing_game": pointing_game(inp["cams"], inp["masks_true"]),
        "accuracy_ci95": bootstrap_ci(lambda y, p: np.mean(y == p.argmax(1)), inp["y_true"], inp["probs"], n_boot=50),
    }


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_has_every_section_and_plot(tmp_path):
    inp = _inputs()
    path = write_report(tmp_path / "out", _metrics(inp), **inp)
    assert path == tmp_path / "out" / "report.html"
    page = path.read_text(encoding="utf-8")
    for heading in SECTIONS:
        assert f"<h2>{heading}</h2>" in page
    # confusion, ROC, PR, Dice/IoU vs threshold, reliability, best, worst, misclassified grids
    pngs = _embedded_pngs(page)
    assert len(pngs) == page.count("<img") == 8
    assert all(png.startswith(PNG_SIGNATURE) for png in pngs)
    assert "segmentation.dice" in page and "accuracy_ci95" in page and "pointing_game" in page
    assert "dice_per_slice" not in page  # per-slice arrays are not headline rows
    assert "meningioma" in page and "<script" not in page


def test_report_without_mistakes_or_cams(tmp_path):
    inp = _inputs(seed=1, all_correct=True)
    inp["cams"] = None
    page = write_report(tmp_path, {}, **inp).read_text(encoding="utf-8")
    assert "No misclassified slices." in page
    assert len(_embedded_pngs(page)) == 7
    assert "accuracy" in page  # headline falls back to recomputed classification metrics


def test_report_rejects_misaligned_inputs(tmp_path):
    inp = _inputs()
    inp["keys"] = inp["keys"][:-1]
    with pytest.raises(ValueError, match="keys"):
        write_report(tmp_path, {}, **inp)
