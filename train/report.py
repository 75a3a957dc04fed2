"""One self-contained HTML evaluation report: metric tables, diagnostic plots and best/worst case overlays.

Torch-free (numpy/sklearn/matplotlib), so PyTorch and ONNX evaluations render the same report. Figures are
built with ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state), embedded as base64 PNG and dropped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from .preprocess import MASK_THRESHOLD
from .metrics import (
    DEFAULT_THRESHOLDS,
    classification_metrics,
    dice_iou_vs_threshold,
    reliability_curve,
    segmentation_metrics,
)

# Section headings, in page order; tests check that each one is rendered.
SECTIONS: tuple[str, ...] = (
    "Headline metrics",
    "Per-class metrics",
    "Confusion matrix",
    "ROC curves",
    "Precision-recall curves",
    "Dice and IoU versus threshold",
    "Reliability diagram",
    "Best segmentations",
    "Worst segmentations",
    "Most confident misclassifications",
)

N_CASES = 4  # rows per case grid
_DPI = 90
_RED = ListedColormap(["red"])
_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .5em 0; font-size: 0.95em; }
th, td { border: 1px solid #ccc; padding: .25em .7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
img { max-width: 100%; height: auto; display: block; margin: .5em 0; }
.note { color: #666; font-size: 0.9em; }
"""


# --------------------------------------------------------------------------- helpers


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    fig.clear()
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Figure, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png(fig)}">'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return html.escape(str(value))


def _is_short_numeric(value: Any) -> bool:
    """A confidence interval or similar pair: shown in the headline table; longer arrays are not."""
    return (
        isinstance(value, (list, tuple))
        and 0 < len(value) <= 2
        and all(v is None or isinstance(v, (int, float, np.number)) for v in value)
    )


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if key in ("per_class", "confusion_matrix") or str(key).endswith("_per_slice"):
            continue
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, f"{name}."))
        elif isinstance(value, np.ndarray) and value.ndim == 0:
            rows.append((name, value.item()))
        elif isinstance(value, (str, int, float, bool, np.number, np.bool_)) or value is None or _is_short_numeric(value):
            rows.append((name, value))
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if i == 0 else _fmt(c)}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --------------------------------------------------------------------------- plots


def _confusion_plot(cm: np.ndarray, classes: Sequence[str]) -> str:
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax_counts, ax_norm = fig.subplots(1, 2)
    ConfusionMatrixDisplay(cm, display_labels=list(classes)).plot(ax=ax_counts, colorbar=False, cmap="Blues")
    ax_counts.set_title("counts")
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    ConfusionMatrixDisplay(normalised, display_labels=list(classes)).plot(
        ax=ax_norm, colorbar=False, cmap="Blues", values_format=".2f"
    )
    ax_norm.set_title("normalised by true class (recall on the diagonal)")
    for ax in (ax_counts, ax_norm):
        ax.tick_params(axis="x", labelrotation=30)
    return _img(fig, "confusion matrix")


def _curves_plot(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], kind: str) -> tuple[str, list[str]]:
    """One-vs-rest ROC or PR curves; returns the image and the classes skipped for lack of positives/negatives."""
    fig = Figure(figsize=(6.5, 5.2), layout="constrained")
    ax = fig.subplots()
    skipped = []
    for k, name in enumerate(classes):
        positives = y_true == k
        if positives.all() or not positives.any():
            skipped.append(name)
            continue
        if kind == "roc":
            fpr, tpr, _ = roc_curve(positives, probs[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positives, probs[:, k]):.3f})")
        else:
            precision, recall, _ = precision_recall_curve(positives, probs[:, k])
            ap = average_precision_score(positives, probs[:, k])
            ax.step(recall, precision, where="post", label=f"{name} (AP {ap:.3f}, prevalence {positives.mean():.2f})")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="chance")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, one vs rest")
    else:
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall, one vs rest")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=8)
    return _img(fig, f"{kind} curves"), skipped


def _threshold_plot(curve: Mapping[str, np.ndarray], threshold: float) -> str:
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.plot(curve["thresholds"], curve["dice"], marker="o", ms=3, label="Dice")
    ax.plot(curve["thresholds"], curve["iou"], marker="s", ms=3, label="IoU")
    ax.axvline(threshold, ls="--", c="grey", lw=0.8, label=f"threshold used ({threshold:.2f})")
    ax.set(xlabel="mask probability threshold", ylabel="mean over tumour slices", ylim=(0, 1), title="Dice / IoU vs threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _img(fig, "dice and iou versus threshold")


def _reliability_plot(probs: np.ndarray, y_true: np.ndarray, ece: float) -> str:
    curve = reliability_curve(probs, y_true)
    edges, count = curve["bin_edges"], curve["count"]
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    filled = count > 0
    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax, ax_hist = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    ax.bar(centres[filled], curve["accuracy"][filled], width=width[filled], edgecolor="k", alpha=0.8, label="accuracy")
    ax.bar(
        centres[filled], curve["confidence"][filled] - curve["accuracy"][filled], bottom=curve["accuracy"][filled],
        width=width[filled], color="red", alpha=0.3, edgecolor="r", hatch="//", label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"Reliability (top label), ECE = {ece:.4f}")
    ax.legend(loc="upper left", fontsize=8)
    ax_hist.bar(centres, count, width=width, edgecolor="k", color="grey")
    ax_hist.set(xlabel="confidence (max probability)", ylabel="slices")
    return _img(fig, "reliability diagram")


def _case_grid(
    rows: Sequence[int],
    *,
    images: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    cams: np.ndarray | None,
    keys: Sequence[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    dice: np.ndarray,
    classes: Sequence[str],
    alt: str,
) -> str:
    n_cols = 3 if cams is None else 4
    # fixed spacing: constrained layout costs seconds on a 16-panel grid of axis-less images
    fig = Figure(figsize=(2.6 * n_cols, 2.8 * len(rows)))
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.45 / (2.8 * len(rows)), wspace=0.05, hspace=0.3)
    axes = np.asarray(fig.subplots(len(rows), n_cols, squeeze=False))
    for r, i in enumerate(rows):
        image = images[i]
        h, w = image.shape[:2]
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)  # stretch a map of another size onto the image
        grey = {"cmap": "gray", "vmin": 0, "vmax": 255} if image.dtype == np.uint8 else {"cmap": "gray"}
        p = int(probs[i].argmax())
        d = "n/a" if math.isnan(dice[i]) else f"{dice[i]:.3f}"
        titles = (
            f"{keys[i]}\ntrue {classes[int(y_true[i])]} | pred {classes[p]} ({probs[i, p]:.2f})",
            "ground truth",
            f"prediction (Dice {d})",
            "Grad-CAM",
        )
        for c, ax in enumerate(axes[r]):
            ax.imshow(image, **grey)
            ax.set_title(titles[c], fontsize=7)
            ax.set_axis_off()
        for ax, m in ((axes[r, 1], truth[i]), (axes[r, 2], pred[i])):
            ax.imshow(np.ma.masked_where(~m, m), cmap=_RED, alpha=0.45, extent=extent, interpolation="nearest")
        if truth[i].any():  # outline the truth on the prediction so misses are visible
            # contour() uses (column, row) pixel coordinates, which match imshow's default axes here
            axes[r, 2].contour(truth[i].astype(np.uint8), levels=[0.5], colors="lime", linewidths=0.8)
            axes[r, 2].set(xlim=extent[:2], ylim=extent[2:])
        if cams is not None:
            axes[r, 3].imshow(cams[i], cmap="jet", vmin=0, vmax=1, alpha=0.45, extent=extent)
    return _img(fig, alt)


# --------------------------------------------------------------------------- page


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, Any],
    *,
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    masks_true: np.ndarray,
    mask_probs: np.ndarray,
    images: np.ndarray,
    cams: np.ndarray | None,
    keys: Sequence[str],
    threshold: float = MASK_THRESHOLD,
    title: str = "braintumor evaluation report",
) -> Path:
    """Write ``out_dir/report.html`` and return its path.

    ``metrics`` fills the headline table: every scalar (and every 1-2 number list, e.g. a bootstrap CI) in it,
    nested dicts flattened to dotted names; ``per_class``/``confusion_matrix``/``*_per_slice`` entries are not
    listed there. The per-class table and confusion matrix come from ``metrics["classification"]`` when it holds
    ``classification_metrics`` output, else they are recomputed. Plots and case grids are computed from the
    arrays: labels (N,), probabilities (N, C) in ``classes`` order, masks (N, H, W) (non-zero = tumour, all zero
    for no_tumor), mask probabilities (N, H, W), uint8 images (N, H, W), CAMs in [0, 1] (N, h, w) or None, and
    ``keys`` (N,) naming each slice. ``threshold`` binarises the predicted masks.
    """
    classes = tuple(classes)
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    truth = np.asarray(masks_true) != 0
    mask_probs = np.asarray(mask_probs)
    images = np.asarray(images)
    cams = None if cams is None else np.asarray(cams, dtype=np.float32)
    keys = [str(k) for k in keys]
    n = y_true.size
    for name, arr in (("probs", probs), ("masks_true", truth), ("mask_probs", mask_probs), ("images", images), ("cams", cams)):
        if arr is not None and arr.shape[0] != n:
            raise ValueError(f"{name} has {arr.shape[0]} rows but y_true has {n}; all inputs must be aligned")
    if len(keys) != n:
        raise ValueError(f"keys has {len(keys)} entries but y_true has {n}")

    cls = metrics.get("classification")
    if not (isinstance(cls, Mapping) and "per_class" in cls and "confusion_matrix" in cls):
        cls = classification_metrics(y_true, probs, classes)
    seg = segmentation_metrics(truth, mask_probs, threshold)
    dice = seg["dice_per_slice"]
    pred_masks = mask_probs >= threshold
    grid = dict(images=images, truth=truth, pred=pred_masks, cams=cams, keys=keys, y_true=y_true, probs=probs,
                dice=dice, classes=classes)

    parts: list[str] = [f"<h1>{html.escape(title)}</h1>",
                        _note(f"{n} slices, {seg['n_tumour_slices']} with a tumour mask; mask threshold {threshold:.2f}.")]

    headline = _flatten(metrics) or _flatten(cls)
    parts += [f"<h2>{SECTIONS[0]}</h2>", _table(("metric", "value"), [(html.escape(k), v) for k, v in headline])]

    per_class_rows = [
        (html.escape(name), m.get("precision"), m.get("recall"), m.get("f1"), m.get("support"), m.get("roc_auc"))
        for name, m in cls["per_class"].items()
    ]
    parts += [f"<h2>{SECTIONS[1]}</h2>",
              _table(("class", "precision", "recall", "F1", "support", "ROC AUC (OvR)"), per_class_rows)]

    parts += [f"<h2>{SECTIONS[2]}</h2>", _confusion_plot(np.asarray(cls["confusion_matrix"]), classes)]

    for heading, kind in ((SECTIONS[3], "roc"), (SECTIONS[4], "pr")):
        img, skipped = _curves_plot(y_true, probs, classes, kind)
        parts += [f"<h2>{heading}</h2>", img]
        if skipped:
            parts.append(_note(f"Not drawn (class absent from, or the only class in, the labels): {', '.join(skipped)}."))

    parts.append(f"<h2>{SECTIONS[5]}</h2>")
    if seg["n_tumour_slices"]:
        parts += [_threshold_plot(dice_iou_vs_threshold(truth, mask_probs, DEFAULT_THRESHOLDS), threshold),
                  _note("For inspection only: choose the threshold on the validation split, not here.")]
    else:
        parts.append(_note("No slice has a tumour mask; Dice and IoU are undefined."))

    ece = cls.get("ece")
    parts += [f"<h2>{SECTIONS[6]}</h2>",
              _reliability_plot(probs, y_true, math.nan if ece is None else float(ece))]

    tumour = np.flatnonzero(~np.isnan(dice))
    ranked = tumour[np.argsort(-dice[tumour], kind="stable")]
    best = ranked[:N_CASES]
    worst = [i for i in ranked[::-1][:N_CASES] if i not in best]  # no slice shown twice
    for heading, rows, empty in (
        (SECTIONS[7], best, "No tumour slices."),
        (SECTIONS[8], worst, "Too few tumour slices to show worst cases apart from the best ones."),
    ):
        parts.append(f"<h2>{heading}</h2>")
        parts.append(_case_grid(rows, alt=heading, **grid) if len(rows) else _note(empty))

    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    confident_wrong = wrong[np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")][:N_CASES]
    parts.append(f"<h2>{SECTIONS[9]}</h2>")
    parts.append(_case_grid(confident_wrong, alt=SECTIONS[9], **grid) if len(confident_wrong) else _note("No misclassified slices."))
    parts.append(_note("Columns: input, ground-truth mask (red), predicted mask (red, truth outlined in green), "
                       "Grad-CAM of the predicted class."))

    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
