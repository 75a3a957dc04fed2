"""Data audit of a BRISC 2025 folder: counts, duplicates, masks, shortcuts and geometry leakage -> audit.json + audit.md."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .naming import CLASSES
from .decode import ImageDecodeError, decode_image
from .preprocess import GEOMETRIES, PreprocessConfig, preprocess
from .progress import progress_bar
from .samples import Sample, build_index
from .splits import duplicate_groups

LEAKAGE_IMAGE_SIZE = 64
LEAKAGE_FEATURE_SIZE = 16  # the preprocessed image is block-averaged to this many pixels a side
LEAKAGE_FOLDS = 5
LEAKAGE_SEED = 0
MASK_THRESHOLD = 128
PERCENTILES = (0, 5, 25, 50, 75, 95, 100)


@dataclass
class _Record:
    """What the audit keeps of one readable sample (never the full-size pixels)."""

    sample: Sample
    group: str
    mode: str
    width: int
    height: int
    is_colour: bool
    features: dict[str, np.ndarray] = field(default_factory=dict)  # geometry -> (16*16,) float32 in 0..1
    mask: dict | None = None

    @property
    def non_square(self) -> bool:
        return self.width != self.height


def run_audit(
    root: str | Path,
    out_dir: str | Path,
    *,
    skip_bad: bool = False,
    leakage_sample: int | None = None,
) -> dict:
    """Audit the dataset at ``root`` and write ``out_dir/audit.json`` and ``out_dir/audit.md``.

    An unreadable image or mask raises (its message names the file) unless ``skip_bad``, in which case
    it is listed under ``problems`` and left out of every statistic. ``leakage_sample`` caps how many
    images the geometry-leakage probe fits on (all non-square images first); None uses all of them.
    """
    index = build_index(root, skip_bad=skip_bad)
    problems = [dict(p, stage="index") for p in index.skipped]
    groups = duplicate_groups(index.samples, progress=True)
    records = _read_samples(index.samples, groups, problems, skip_bad)
    report = {
        "root": str(Path(root).expanduser()),
        "counts": _counts(records),
        "duplicates": _duplicates(records),
        "masks": _mask_stats(records),
        "shortcuts": _shortcuts(records),
        "problems": {"count": len(problems), "items": problems},
        "geometry_leakage": _geometry_leakage(records, leakage_sample),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "audit.md").write_text(render_markdown(report))
    return report


def _read_samples(samples: list[Sample], groups: dict[str, str], problems: list[dict], skip_bad: bool) -> list[_Record]:
    configs = {g: PreprocessConfig(image_size=LEAKAGE_IMAGE_SIZE, geometry=g) for g in GEOMETRIES}
    records = []
    for sample in progress_bar(samples, desc="audit: reading images", unit="img"):
        try:
            decoded = decode_image(sample.image_path)
            with Image.open(sample.image_path) as img:  # header only: the file's own mode and size
                mode, (width, height) = img.mode, img.size
            mask = _read_mask(sample.mask_path, decoded.pixels.shape) if sample.mask_path else None
        except ImageDecodeError as exc:
            if not skip_bad:
                raise
            problems.append({"path": _failed_path(exc, sample), "reason": str(exc), "stage": "decode"})
            continue
        record = _Record(sample, groups[sample.key], mode, width, height, decoded.is_colour, mask=mask)
        for name, cfg in configs.items():
            square, _ = preprocess(decoded.pixels, cfg)
            record.features[name] = _block_mean(square, LEAKAGE_FEATURE_SIZE)
        records.append(record)
    return records


def _failed_path(exc: ImageDecodeError, sample: Sample) -> str:
    if sample.mask_path and str(exc).startswith(sample.mask_path):
        return sample.mask_path
    return sample.image_path


def _read_mask(path: str, image_shape: tuple[int, int]) -> dict:
    pixels = decode_image(path).pixels
    nonzero = int(np.count_nonzero(pixels))
    soft = int(np.count_nonzero((pixels > 0) & (pixels < 255)))
    return {
        "area_fraction": float((pixels >= MASK_THRESHOLD).mean()),
        "nonzero": nonzero,
        "soft": soft,
        "shape": tuple(pixels.shape),
        "size_mismatch": tuple(pixels.shape) != tuple(image_shape),
    }


def _block_mean(square: np.ndarray, side: int) -> np.ndarray:
    k = square.shape[0] // side
    blocks = square[: k * side, : k * side].reshape(side, k, side, k).astype(np.float32)
    return (blocks.mean(axis=(1, 3)) / 255.0).ravel()


def _summary(values) -> dict:
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        return {"n": 0}
    out = {"n": int(arr.size), "mean": float(arr.mean())}
    out.update({f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(arr, PERCENTILES))})
    return out


def _counts(records: list[_Record]) -> dict:
    images: dict = {}
    masks: dict = {}
    for r in records:
        s = r.sample
        split = images.setdefault(s.split, {"total": 0, "classes": {}})
        split["total"] += 1
        cls = split["classes"].setdefault(s.label, {"total": 0, "planes": {}})
        cls["total"] += 1
        cls["planes"][s.plane] = cls["planes"].get(s.plane, 0) + 1
        if s.has_mask:
            m = masks.setdefault(s.split, {"total": 0, "classes": {}})
            m["total"] += 1
            m["classes"][s.label] = m["classes"].get(s.label, 0) + 1
    return {"images": images, "masks": masks}


def _duplicates(records: list[_Record]) -> dict:
    members: dict[str, list[Sample]] = defaultdict(list)
    for r in records:
        members[r.group].append(r.sample)
    listed = []
    for gid, group in sorted(members.items()):
        if len(group) < 2:
            continue
        labels, splits = sorted({s.label for s in group}), sorted({s.split for s in group})
        listed.append({
            "sha256": gid,
            "keys": [s.key for s in group],
            "labels": labels,
            "planes": sorted({s.plane for s in group}),
            "splits": splits,
            "mixed_class": len(labels) > 1,
            "cross_split": len(splits) > 1,
        })
    files = sum(len(g["keys"]) for g in listed)
    return {
        "groups": len(listed),
        "files": files,
        "extra_copies": files - len(listed),
        "within_split_groups": sum(not g["cross_split"] for g in listed),
        "cross_split_groups": sum(g["cross_split"] for g in listed),
        "mixed_class_groups": sum(g["mixed_class"] for g in listed),
        "any_mixed_class": any(g["mixed_class"] for g in listed),
        "list": listed,
    }


def _mask_stats(records: list[_Record]) -> dict:
    with_mask = [r for r in records if r.mask is not None]
    nonzero = sum(r.mask["nonzero"] for r in with_mask)
    soft = sum(r.mask["soft"] for r in with_mask)
    mismatches = [
        {"key": r.sample.key, "image": [r.height, r.width], "mask": list(r.mask["shape"])}
        for r in with_mask
        if r.mask["size_mismatch"]
    ]
    return {
        "count": len(with_mask),
        "threshold": MASK_THRESHOLD,
        "area_fraction": _summary(r.mask["area_fraction"] for r in with_mask),
        "area_fraction_by_class": {
            label: _summary(r.mask["area_fraction"] for r in with_mask if r.sample.label == label)
            for label in CLASSES
            if any(r.sample.label == label for r in with_mask)
        },
        "empty_after_threshold": sum(r.mask["area_fraction"] == 0.0 for r in with_mask),
        # Share of the non-zero mask pixels that are neither 0 nor 255: the soft edge that needs the threshold.
        "soft_edge_fraction": soft / nonzero if nonzero else 0.0,
        "masks_with_soft_pixels": sum(r.mask["soft"] > 0 for r in with_mask),
        "size_mismatches": len(mismatches),
        "size_mismatch_list": mismatches,
    }


def _shortcuts(records: list[_Record]) -> dict:
    out = {}
    labels = [c for c in CLASSES if any(r.sample.label == c for r in records)]
    for label in labels + ["all"]:
        rs = [r for r in records if label == "all" or r.sample.label == label]
        sizes = Counter(f"{r.width}x{r.height}" for r in rs)
        non_square = sum(r.non_square for r in rs)
        out[label] = {
            "n": len(rs),
            "modes": dict(sorted(Counter(r.mode for r in rs).items())),
            "colour_images": sum(r.is_colour for r in rs),
            "non_square": non_square,
            "non_square_share": non_square / len(rs),
            "aspect_ratio": _summary(r.width / r.height for r in rs),
            "width": _summary(r.width for r in rs),
            "height": _summary(r.height for r in rs),
            "distinct_sizes": len(sizes),
            "top_sizes": dict(sizes.most_common(5)),
        }
    return out


def _leakage_subset(records: list[_Record], limit: int | None) -> list[_Record]:
    """All records, or ``limit`` of them: every non-square one (up to half) and square ones drawn with a fixed seed."""
    if limit is None or limit >= len(records):
        return records
    rng = np.random.default_rng(LEAKAGE_SEED)
    pos = [r for r in records if r.non_square]
    neg = [r for r in records if not r.non_square]
    if len(pos) > limit // 2:
        pos = [pos[i] for i in sorted(rng.choice(len(pos), limit // 2, replace=False))]
    n_neg = min(len(neg), limit - len(pos))
    neg = [neg[i] for i in sorted(rng.choice(len(neg), n_neg, replace=False))]
    return pos + neg


def _probe_auc(records: list[_Record], geometry: str) -> dict:
    """Cross-validated ROC AUC of a linear probe predicting "original was non-square" from 16x16 input pixels."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    y = np.array([r.non_square for r in records], dtype=int)
    n_pos = int(y.sum())
    result = {"n": len(records), "n_non_square": n_pos}
    if min(n_pos, len(y) - n_pos) < LEAKAGE_FOLDS:
        return dict(result, auc=None, reason=f"needs at least {LEAKAGE_FOLDS} square and non-square images")
    x = np.stack([r.features[geometry] for r in records])
    # Folds are grouped by duplicate group so that byte-identical copies never sit on both sides.
    folds = StratifiedGroupKFold(n_splits=LEAKAGE_FOLDS, shuffle=True, random_state=LEAKAGE_SEED)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    # Small fits are dominated by BLAS thread hand-offs (10x slower on 2 cores); one thread is faster here.
    with threadpool_limits(limits=1):
        scores = cross_val_score(probe, x, y, groups=[r.group for r in records], cv=folds, scoring="roc_auc")
    return dict(result, auc=float(scores.mean()), auc_std=float(scores.std()), fold_aucs=[float(s) for s in scores])


def _padded_to(pixels: np.ndarray, aspect: float) -> np.ndarray:
    """Zero-pad a square slice to width/height ``aspect``, as a non-square canvas around the same head."""
    h, w = pixels.shape
    if aspect >= 1.0:
        extra = int(round(h * aspect)) - w
        return np.pad(pixels, ((0, 0), (extra // 2, extra - extra // 2)))
    extra = int(round(w / aspect)) - h
    return np.pad(pixels, ((extra // 2, extra - extra // 2), (0, 0)))


def _canvas_probe(records: list[_Record], limit: int | None) -> dict:
    """The same probe on square slices shown twice, as they are and zero-padded to a real non-square aspect.

    Content, class and source are identical between the two versions, so the AUC measures only what
    each geometry reveals of the canvas shape.
    """
    square = [r for r in records if not r.non_square]
    aspects = [r.width / r.height for r in records if r.non_square]
    if not square or not aspects:
        return {g: {"auc": None, "reason": "needs square and non-square images"} for g in GEOMETRIES}
    rng = np.random.default_rng(LEAKAGE_SEED)
    n = min(len(square), (limit or 1000) // 2)
    chosen = [square[i] for i in sorted(rng.choice(len(square), n, replace=False))]
    configs = {g: PreprocessConfig(image_size=LEAKAGE_IMAGE_SIZE, geometry=g) for g in GEOMETRIES}
    pairs = []
    for r in progress_bar(chosen, desc="audit: canvas probe", unit="img"):
        pixels = decode_image(r.sample.image_path).pixels
        padded = _padded_to(pixels, float(rng.choice(aspects)))
        for version in (pixels, padded):
            features = {g: _block_mean(preprocess(version, cfg)[0], LEAKAGE_FEATURE_SIZE) for g, cfg in configs.items()}
            # Both versions share the sample key as group, so a fold never holds one version of a slice.
            pairs.append(_Record(r.sample, r.sample.key, r.mode, *version.shape[::-1], r.is_colour, features))
    return {g: _probe_auc(pairs, g) for g in GEOMETRIES}


def _geometry_leakage(records: list[_Record], limit: int | None) -> dict:
    subset = _leakage_subset(records, limit)
    # Non-square images are mostly no_tumor and come from other sources, so the probe on real images
    # also sees class and source; the no_tumor-only and canvas probes take those away step by step.
    no_tumor = [r for r in subset if r.sample.label == "no_tumor"]
    canvas = _canvas_probe(records, limit)
    per_geometry = {
        g: {"all": _probe_auc(subset, g), "no_tumor_only": _probe_auc(no_tumor, g), "canvas_only": canvas[g]}
        for g in GEOMETRIES
    }
    aucs = {g: v["canvas_only"]["auc"] for g, v in per_geometry.items() if v["canvas_only"]["auc"] is not None}
    return {
        "image_size": LEAKAGE_IMAGE_SIZE,
        "feature_size": LEAKAGE_FEATURE_SIZE,
        "folds": LEAKAGE_FOLDS,
        "sample_limit": limit,
        "geometries": per_geometry,
        "least_leaking": min(aucs, key=aucs.get) if aucs else None,
    }


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(report: dict) -> str:
    """A readable summary of an audit report (the JSON holds everything)."""
    lines = [f"# Data audit: `{report['root']}`", ""]

    lines += ["## Counts", "", "| split | class | images | axial | coronal | sagittal | masks |", "|---|---|---|---|---|---|---|"]
    masks = report["counts"]["masks"]
    for split, info in sorted(report["counts"]["images"].items()):
        for label, cls in info["classes"].items():
            planes = cls["planes"]
            n_masks = masks.get(split, {}).get("classes", {}).get(label, 0)
            lines.append(f"| {split} | {label} | {cls['total']} | {planes.get('axial', 0)} | {planes.get('coronal', 0)} "
                         f"| {planes.get('sagittal', 0)} | {n_masks} |")
        lines.append(f"| {split} | **all** | {info['total']} | | | | {masks.get(split, {}).get('total', 0)} |")

    d = report["duplicates"]
    lines += ["", "## Byte-identical images", "",
              "| groups | files | extra copies | within split | across splits | mixing classes |", "|---|---|---|---|---|---|",
              f"| {d['groups']} | {d['files']} | {d['extra_copies']} | {d['within_split_groups']} | {d['cross_split_groups']} "
              f"| {d['mixed_class_groups']} |", "",
              "Duplicate groups are kept on one side of the validation split (`splits.make_validation_split`)."]

    lines += ["", "## Shortcuts per class", "",
              "| class | n | Pillow modes | colour | non-square | aspect p5 / p50 / p95 | distinct sizes | top size |",
              "|---|---|---|---|---|---|---|---|"]
    for label, s in report["shortcuts"].items():
        modes = ", ".join(f"{m} {n}" for m, n in s["modes"].items())
        ar = s["aspect_ratio"]
        top = next(iter(s["top_sizes"].items()), ("", 0))
        lines.append(f"| {label} | {s['n']} | {modes} | {s['colour_images']} | {s['non_square']} ({s['non_square_share']:.1%}) "
                     f"| {_fmt(ar.get('p5'), 2)} / {_fmt(ar.get('p50'), 2)} / {_fmt(ar.get('p95'), 2)} "
                     f"| {s['distinct_sizes']} | {top[0]} ({top[1]}) |")

    m = report["masks"]
    af = m["area_fraction"]
    lines += ["", f"## Masks (threshold {m['threshold']})", "",
              "| masks | area p5 / p50 / p95 | empty after threshold | soft-edge share of non-zero pixels | size mismatches |",
              "|---|---|---|---|---|",
              f"| {m['count']} | {_fmt(af.get('p5'), 4)} / {_fmt(af.get('p50'), 4)} / {_fmt(af.get('p95'), 4)} "
              f"| {m['empty_after_threshold']} | {m['soft_edge_fraction']:.1%} | {m['size_mismatches']} |"]

    p = report["problems"]
    lines += ["", "## Problems", "", f"{p['count']} file(s) skipped."]
    lines += [f"- `{item['path']}`: {item['reason']}" for item in p["items"][:20]]

    g = report["geometry_leakage"]
    lines += ["", "## Geometry leakage", "",
              f"Linear probe (logistic regression, {g['folds']}-fold stratified, grouped by duplicate group) predicting "
              f"\"original image was non-square\" from the {g['image_size']}px preprocessed input block-averaged to "
              f"{g['feature_size']}x{g['feature_size']}. AUC 0.5 means the geometry hides the canvas shape.", "",
              "| geometry | real images: AUC all classes (n, non-square) | real: AUC no_tumor only | canvas only: AUC (n) |",
              "|---|---|---|---|"]
    for name, res in g["geometries"].items():
        a, nt, cv = res["all"], res["no_tumor_only"], res["canvas_only"]
        lines.append(f"| {name} | {_fmt(a.get('auc'))} ± {_fmt(a.get('auc_std'))} ({a['n']}, {a['n_non_square']}) "
                     f"| {_fmt(nt.get('auc'))} | {_fmt(cv.get('auc'))} ({cv.get('n', 0)}) |")
    lines += ["", "*Canvas only*: the same square slices, as they are and zero-padded to a real non-square aspect ratio, "
              "so only the canvas differs. On real images the probe also sees class and source differences that no "
              "geometry removes."]
    if g["least_leaking"]:
        best = g["least_leaking"]
        lines += ["", f"Conclusion: **{best}** reveals the canvas shape least "
                  f"(canvas-only AUC {g['geometries'][best]['canvas_only']['auc']:.3f}; 0.5 = hidden)."]
    return "\n".join(lines) + "\n"
