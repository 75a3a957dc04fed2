"""The CAM study (`braintumor cam-study`): on a split's tumour slices, how well each explanation of the **predicted**
class points at the tumour (pointing game, positive energy inside the dilated expert mask), and how faithful the
served CAM is (deletion curve, hottest pixels first, against the same order reversed and a random order).

Methods: the served CAM (``model.class_activation_maps`` through ``train/heatmap.cam_heatmap``, what /analyze shows),
and pytorch-grad-cam's GradCAM, HiResCAM and LayerCAM at the encoder's stride-8 and stride-16 features and at the fused
map the class head pools (``model.cam_layer``). Slices, preprocessing and the dilation are evaluate's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .cache import decode_samples
from .evaluate import cams_for_classes, split_samples
from .metrics import energy_in_mask, pointing_game_hits, to_jsonable
from .predict import predict_arrays
from .preprocess import PreprocessConfig
from .progress import progress_bar
from .trainer.checkpoint import load_model

METHODS = ("GradCAM", "HiResCAM", "LayerCAM")
SERVED = "served CAM"
DELETION_STEPS = 10  # remove 10% of the image's pixels per step
BACKGROUND = 0  # the value a deleted pixel gets: the preprocessed slice's background


class ClassLogits(nn.Module):
    """The model as pytorch-grad-cam expects it: image -> class logits (with ``class_pool`` "mask" the decoder runs
    too, as the decision needs its mask; its weights are detached, so gradients reach the layers through the class
    path only)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.classify(self.model.forward_features(x))


class _PerLayer:
    """pytorch-grad-cam's override point for combining target layers: keep each layer's map, (N, L, H, W), instead of
    their mean, so one forward and backward explains every layer."""

    def aggregate_multi_layers(self, cam_per_target_layer: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(cam_per_target_layer, axis=1)


def _per_layer_method(name: str) -> type:
    try:
        import pytorch_grad_cam
    except ImportError as exc:
        raise ImportError("cam-study needs pytorch-grad-cam: pip install 'grad-cam>=1.5' (it comes with braintumor[train])") from exc
    return type(f"{name}PerLayer", (_PerLayer, getattr(pytorch_grad_cam, name)), {})


def explained_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Target layers by name: the encoder's stride-8 and stride-16 features (those it has) and the fused CAM map."""
    layers = {f"stride {r}": model.encoder.feature_module(r) for r in (8, 16) if r in model.encoder.reductions}
    layers[f"cam_layer (fused, stride {model.cam_stride})"] = model.cam_layer
    return layers


def method_heatmaps(model: nn.Module, method: str, layers: list[nn.Module], images: np.ndarray, classes: np.ndarray,
                    device: str | torch.device = "cpu") -> np.ndarray:
    """(B, S, S) uint8 slices -> (B, L, S, S) heatmaps in [0, 1] of ``classes`` by one pytorch-grad-cam method, one
    per target layer (its rule: ReLU, resize, min-max). Hooks are released when the context manager exits."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)[:, None].float()
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    with _per_layer_method(method)(ClassLogits(model), list(layers)) as cam:
        return np.asarray(cam(x, targets=targets), np.float32)


def deletion_probabilities(model: nn.Module, images: np.ndarray, orders: list[np.ndarray], classes: np.ndarray, *,
                           temperature: float = 1.0, steps: int = DELETION_STEPS, batch_size: int = 32,
                           device: str | torch.device = "cpu") -> list[np.ndarray]:
    """For each deletion order (B, S*S) (pixel indices, first deleted first), the probability of ``classes`` after
    deleting 0, 1/steps, ..., all of the pixels (set to ``BACKGROUND``): one (B, steps + 1) curve per order. The
    untouched and the fully deleted image are the same for every order, so they run once."""
    count, side = images.shape[0], images.shape[-1]
    cuts = np.rint(np.linspace(0, side * side, steps + 1)).astype(int)
    variants = [images, np.full_like(images, BACKGROUND)]
    for order in orders:
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(order.shape[1])[None].repeat(count, 0), axis=1)
        rank = rank.reshape(images.shape)
        variants += [np.where(rank < cut, BACKGROUND, images).astype(images.dtype) for cut in cuts[1:-1]]
    probs = predict_arrays(model, np.concatenate(variants), batch_size=batch_size, device=device,
                           temperature=temperature, with_masks=False)["probs"]
    picked = probs.reshape(len(variants), count, -1)[:, np.arange(count), classes]  # (variants, B)
    inner = steps - 1
    return [np.concatenate([picked[:1], picked[2 + i * inner: 2 + (i + 1) * inner], picked[1:2]]).T
            for i in range(len(orders))]


def deletion_auc(curves: np.ndarray) -> np.ndarray:
    """(N, steps + 1) probabilities at evenly spaced deleted fractions 0..1 -> (N,) trapezoid area (lower: the
    heatmap's pixels mattered more to the decision)."""
    return (curves[:, 1:] + curves[:, :-1]).sum(axis=1) / (2 * (curves.shape[1] - 1))


def heat_order(heat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B, S, S) heatmaps -> (B, S*S) pixel indices, hottest first; ties (ReLU zeros) in random order, not raster."""
    flat = heat.reshape(len(heat), -1)
    return np.stack([np.lexsort((rng.random(flat.shape[1]), -h)) for h in flat])


def run_cam_study(checkpoint: str | Path, data: str | Path, out: str | Path, *, split: str = "val",
                  limit: int | None = None, batch_size: int = 32, device: str = "cpu", seed: int = 0,
                  progress: bool = True) -> dict:
    """Score every method on the tumour slices of ``split`` (the first ``limit`` of them) -> cam_study.json and
    cam_study.md in ``out``; returns the JSON's dict."""
    checkpoint = Path(checkpoint)
    model, state = load_model(checkpoint, device)
    preprocess = PreprocessConfig.from_dict(state["preprocess"])
    samples = [s for s in split_samples(checkpoint, state, data, split) if s.has_mask]
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise ValueError(f"{data}: the {split} split has no tumour slices (with a mask) to explain")
    images, masks, samples, _ = decode_samples(samples, preprocess, progress=progress, desc=f"decoding {split}")
    temperature = float(state.get("temperature") or 1.0)
    layers = explained_layers(model)
    names = [(SERVED, "cam_layer")] + [(m, layer) for m in METHODS for layer in layers]
    hits = {key: [] for key in names}
    energy = {key: [] for key in names}
    curves: dict[str, list[np.ndarray]] = {"served": [], "least": [], "random": []}
    rng = np.random.default_rng(seed)
    side = images.shape[-1]
    starts = range(0, len(images), batch_size)
    for start in progress_bar(starts, desc="explaining", unit="batch", disable=not progress):
        x, truth = images[start:start + batch_size], masks[start:start + batch_size].astype(bool)
        pred = predict_arrays(model, x, batch_size=batch_size, device=device, temperature=temperature,
                              with_cams=True, with_masks=False)
        classes = pred["probs"].argmax(axis=1)
        served = cams_for_classes(pred["cams"], classes, side)  # the served heatmap (the API's rule)
        maps = {(SERVED, "cam_layer"): served}
        for method in METHODS:
            per_layer = method_heatmaps(model, method, list(layers.values()), x, classes, device)
            maps.update({(method, layer): per_layer[:, j] for j, layer in enumerate(layers)})
        for key, heat in maps.items():
            hits[key].append(pointing_game_hits(heat, truth))
            energy[key].append(energy_in_mask(heat, truth))
        random_order = np.stack([rng.permutation(side * side) for _ in range(len(x))])
        hottest = heat_order(served, rng)
        # Most relevant first, least relevant first (the same order reversed) and random: a faithful map loses the
        # class fastest when its hottest pixels go and slowest when its coldest go; scattered random deletion is
        # a harsher, off-distribution perturbation, so "least first" is the like-for-like baseline.
        served_curve, least_curve, random_curve = deletion_probabilities(
            model, x, [hottest, hottest[:, ::-1], random_order], classes, temperature=temperature,
            batch_size=batch_size, device=device)
        curves["served"].append(served_curve)
        curves["least"].append(least_curve)
        curves["random"].append(random_curve)

    rows = []
    for method, layer in names:
        h, e = np.concatenate(hits[(method, layer)]), np.concatenate(energy[(method, layer)])
        scored = ~np.isnan(h)
        rows.append({"method": method, "layer": layer, "pointing_game": _mean(h[scored]),
                     "energy_in_mask": _mean(e[scored]), "n": int(scored.sum())})
    served_curves, random_curves = np.concatenate(curves["served"]), np.concatenate(curves["random"])
    least_curves = np.concatenate(curves["least"])
    served_auc, random_auc, least_auc = (deletion_auc(served_curves), deletion_auc(random_curves),
                                         deletion_auc(least_curves))
    result = {
        "checkpoint": str(checkpoint), "split": split, "n_tumour_slices": len(samples),
        "class_pool": model.config.get("class_pool", "mean"), "cam_stride": model.cam_stride,
        "temperature": temperature, "dilation_px": 8, "rows": rows,
        "deletion": {
            "method": SERVED, "steps": DELETION_STEPS, "background": BACKGROUND, "seed": seed,
            "fractions": np.linspace(0, 1, DELETION_STEPS + 1).tolist(),
            "served_auc": _mean(served_auc), "random_auc": _mean(random_auc),
            "served_below_random": _mean((served_auc < random_auc).astype(float)),
            "least_first_auc": _mean(least_auc), "served_below_least_first": _mean((served_auc < least_auc).astype(float)),
            "least_first_curve": least_curves.mean(axis=0).tolist(),
            "served_curve": served_curves.mean(axis=0).tolist(), "random_curve": random_curves.mean(axis=0).tolist(),
        },
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cam_study.json").write_text(json.dumps(to_jsonable(result), indent=2))
    (out / "cam_study.md").write_text(render_markdown(result))
    return result


def render_markdown(result: dict) -> str:
    """The study's two tables: localisation per method and layer, and the served CAM's deletion AUC."""
    lines = [f"# CAM study: {result['checkpoint']} ({result['split']}, {result['n_tumour_slices']} tumour slices, "
             f"class_pool {result['class_pool']})", "",
             f"Explanations of the predicted class; a hit when the peak lies in the expert mask dilated by "
             f"{result['dilation_px']} px; energy = share of the positive heatmap inside that mask.", "",
             "| method | layer | pointing game | energy in mask | n |", "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['layer']} | {r['pointing_game']:.3f} | {r['energy_in_mask']:.3f} | {r['n']} |"
              for r in result["rows"]]
    d = result["deletion"]
    lines += ["", f"Deletion (the served CAM's hottest pixels first, {100 // d['steps']}% of the image per step, set to "
                  f"{d['background']}; probability of the predicted class; lower AUC = more faithful):", "",
              "| order | deletion AUC |", "|---|---|",
              f"| served CAM, hottest first | {d['served_auc']:.3f} |",
              f"| served CAM, coldest first | {d['least_first_auc']:.3f} |", f"| random | {d['random_auc']:.3f} |", "",
              f"Hottest-first is below coldest-first on {100 * d['served_below_least_first']:.1f}% of slices and below "
              f"the random order on {100 * d['served_below_random']:.1f}%.", ""]
    return "\n".join(lines)


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")
