"""`braintumor score --evaluate`: accuracy, per-class recall, confusion matrix and mean Dice computed from a results
file and the predicted masks against a BRISC folder (numpy only: the client install has no scikit-learn).

It reads the results file, not the run's memory, so it gives the same answer after a resumed run."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np

from .brisc_layout import CLASSES, BriscLayout, true_label
from .score_files import ResultsFile

MASK_THRESHOLD = 128  # BRISC masks have soft edges; the service's masks are 0/255


def confusion(truths: list[str], preds: list[str], classes: list[str]) -> np.ndarray:
    """Counts[i, j]: slices of true class ``classes[i]`` predicted as ``classes[j]``."""
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(truths, preds):
        matrix[index[t], index[p]] += 1
    return matrix


def classification_report(truths: list[str], preds: list[str], classes: list[str]) -> dict:
    """Accuracy, per-class recall (None for a class with no slices) and the confusion matrix."""
    matrix = confusion(truths, preds, classes)
    support = matrix.sum(axis=1)
    total = int(matrix.sum())
    recall = {c: (float(matrix[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    return {"n": total, "accuracy": float(np.trace(matrix) / total) if total else None, "recall": recall,
            "support": {c: int(s) for c, s in zip(classes, support)}, "classes": list(classes),
            "confusion": matrix.tolist()}


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|A∩B| / (|A|+|B|) of two boolean masks; two empty masks agree perfectly (1.0)."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"mask shapes differ: predicted {pred.shape}, ground truth {truth.shape}")
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


def load_mask(path: Path) -> np.ndarray:
    """A mask PNG/JPEG as booleans (grey >= 128)."""
    from PIL import Image

    with Image.open(path) as picture:
        return np.asarray(picture.convert("L")) >= MASK_THRESHOLD


def evaluate_results(results: Path, fmt: str, root: Path, layout: BriscLayout, masks_dir: Path | None) -> dict:
    """Metrics of the rows in ``results`` against the true classes and ground-truth masks of the BRISC ``layout``.

    The class of a slice is its nearest class-named folder, else its file name's code; Dice is averaged over the
    slices that have a ground-truth mask (the tumour slices), using the predicted masks in ``masks_dir``."""
    rows = ResultsFile(results, fmt, None).read_done()
    truths, preds, unlabelled = [], [], 0
    for row in rows:
        truth = true_label(row["path"])
        if truth is None:
            unlabelled += 1
            continue
        truths.append(truth)
        preds.append(row["label"])
    classes = list(CLASSES) + sorted({*truths, *preds} - set(CLASSES))
    report = {"results": str(results), "rows": len(rows), "without_true_class": unlabelled,
              "classification": classification_report(truths, preds, classes)}

    gt_masks = layout.mask_index() if layout is not None else {}
    scores, problems = [], []
    empty_fp = empty_n = 0
    for row in rows:
        if true_label(row["path"]) == "no_tumor":
            empty_n += 1
            empty_fp += int(float(row["tumor_area_px"] or 0) > 0)
        gt = gt_masks.get(PurePosixPath(row["path"]).stem)
        if gt is None or masks_dir is None:
            continue
        if not row.get("mask"):
            problems.append(f"{row['path']}: no predicted mask (scored without --masks)")
            continue
        try:
            scores.append(dice(load_mask(masks_dir / row["mask"]), load_mask(gt)))
        except (OSError, ValueError) as exc:
            problems.append(f"{row['path']}: {exc}")
    report["segmentation"] = {
        "n": len(scores), "mean_dice": float(np.mean(scores)) if scores else None,
        "median_dice": float(np.median(scores)) if scores else None,
        "ground_truth_masks": len(gt_masks), "problems": problems,
        # The decoder should stay silent on healthy slices: how often it did not.
        "no_tumor_with_mask": {"n": empty_n, "rate": empty_fp / empty_n if empty_n else None},
    }
    return report


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_report(report: dict) -> str:
    """A short text summary: accuracy, recall per class, the confusion matrix and Dice."""
    cls, seg = report["classification"], report["segmentation"]
    lines = [f"evaluation of {report['rows']} rows ({cls['n']} with a true class)",
             f"accuracy: {_pct(cls['accuracy'])}"]
    width = max(len(c) for c in cls["classes"]) + 2
    lines.append("recall:   " + "  ".join(f"{c} {_pct(r)} (n={cls['support'][c]})" for c, r in cls["recall"].items()))
    lines.append("confusion (rows: true class, columns: predicted):")
    lines.append(" " * width + "".join(f"{c[:10]:>12}" for c in cls["classes"]))
    for c, counts in zip(cls["classes"], cls["confusion"]):
        lines.append(f"{c:<{width}}" + "".join(f"{v:>12}" for v in counts))
    if seg["n"]:
        lines.append(f"mean Dice: {seg['mean_dice']:.3f} (median {seg['median_dice']:.3f}) over {seg['n']} slices "
                     "with a ground-truth mask")
    else:
        lines.append(f"mean Dice: n/a (no scored slice has a ground-truth mask; {seg['ground_truth_masks']} masks found)")
    empty = seg["no_tumor_with_mask"]
    if empty["n"]:
        lines.append(f"no_tumor slices with a predicted mask: {_pct(empty['rate'])} of {empty['n']}")
    if seg["problems"]:
        lines.append(f"{len(seg['problems'])} masks could not be compared, e.g. {seg['problems'][0]}")
    return "\n".join(lines)
