"""Explanation benchmark: LIME and SHAP through the serving pipeline (perturbed images sent to Triton in batches) vs
the libraries' defaults with a naive model function (one image per Triton request); same image, same budget, one run.

    python loadtest/bench_explain.py --model-repository model_repository \
        --data ../shared/data/brisc2025/classification_task/train/glioma

"ours" is ``Pipeline.explain`` as served (decode, preprocess, the full-model prediction, the explanation, PNGs;
cache off), with ``explain_batch_size`` images per classifier request. "naive" is what a first integration does:
``LimeImageExplainer.explain_instance`` (its default batch_size=10 and per-sample loop) and ``shap.Explainer``
(its default batch_size) around a function that sends each image in its own request. Both use the same superpixels,
blur masker and seed, so LIME draws the same perturbations on both sides; the heatmaps' correlation is printed as a
check that both explained the same thing. Triton is started embedded on free ports unless --triton-grpc is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from braintumor.export import contract
from braintumor.serving import explain
from braintumor.serving.pipeline import Pipeline
from braintumor.serving.request import ExplainOptions
from braintumor.serving.settings import ServeSettings

GOAL_SPEEDUP = 10.0
GOAL_SECONDS = 5.0


def pick_image(image: str | None, data: str) -> Path:
    if image:
        return Path(image)
    paths = sorted(Path(data).glob("*.jpg")) + sorted(Path(data).glob("*.png"))
    if not paths:
        raise SystemExit(f"no .jpg/.png image under {data}; pass --image or --data")
    return sorted(paths)[0]


# -- naive: the libraries' defaults, one image per Triton request ----------------------------------------------------
class OneAtATime:
    """A synchronous classify that sends each image in its own request, counting requests."""

    def __init__(self, url: str, model: str) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self.requests = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([self.request(image[None]) for image in images])

    def request(self, batch: np.ndarray) -> np.ndarray:
        tensor = self._grpc.InferInput(contract.INPUT_NAME, list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(batch))
        requested = [self._grpc.InferRequestedOutput(contract.CLASS_PROBS)]
        result = self.client.infer(self.model, [tensor], outputs=requested)
        self.requests += 1
        return result.as_numpy(contract.CLASS_PROBS)


def model_only(one: OneAtATime, image: np.ndarray, count: int, batch: int) -> tuple[float, float]:
    """Seconds for ``count`` images through the classifier alone: in requests of ``batch``, and one per request.
    Their ratio bounds the speed-up batching can give on this host (the rest of an explanation costs both alike)."""
    images = np.repeat(image[None, None], count, axis=0)
    times = []
    for size in (batch, 1):
        start = time.perf_counter()
        for first in range(0, count, size):
            one.request(images[first:first + size])
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def naive_lime(image: np.ndarray, classify, target: int, samples: int) -> np.ndarray:
    from lime.lime_image import LimeImageExplainer

    segments = explain.lime_segments(image)
    with contextlib.redirect_stderr(io.StringIO()):  # lime's tqdm bar
        result = LimeImageExplainer(feature_selection="none", random_state=explain.SEED).explain_instance(
            np.repeat(image[..., None], 3, axis=-1), lambda rgb: classify(explain.model_batch(rgb)),
            labels=(target,), top_labels=None, hide_color=0, num_samples=samples,
            segmentation_fn=lambda _rgb: segments, random_seed=explain.SEED)
    weights = np.zeros(int(segments.max()) + 1, np.float32)
    for segment, weight in result.local_exp[target]:
        weights[segment] = weight
    return weights[segments]


def naive_shap(image: np.ndarray, classify, target: int, evals: int) -> np.ndarray:
    import shap

    size = image.shape[0]
    kernel = max(3, round(size * explain.SHAP_BLUR_FRACTION))
    masker = shap.maskers.Image(f"blur({kernel},{kernel})", (size, size, 1))
    explainer = shap.Explainer(lambda x: classify(explain.model_batch(x)), masker, algorithm="partition")
    np.random.seed(explain.SEED)
    result = explainer(image[None, :, :, None].astype(np.float32), max_evals=evals, outputs=[target], silent=True)
    return np.asarray(result.values[0, :, :, :, 0], np.float32).sum(axis=-1)


NAIVE = {"lime": naive_lime, "shap": naive_shap}


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


async def run_ours(url: str, name: str, data: bytes, methods: list[str], samples: int, batch: int, warmup: int):
    """Each method once with a small budget (imports, numba compilation, Triton warm-up), then timed at ``samples``."""
    settings = ServeSettings(triton_url=url, model_name=name, explain_batch_size=batch, explain_cache_size=0,
                             lime_max_samples=max(samples, 2000), shap_max_max_evals=max(samples, 2000),
                             triton_timeout_s=120.0)
    pipe = Pipeline.from_settings(settings)
    calls: list[int] = []
    classify = pipe.model.classify

    async def counted(images, batch_size=None):
        calls.append(math.ceil(len(images) / min(batch_size or batch, batch)))
        return await classify(images, batch_size)

    pipe.model.classify = counted  # count Triton requests
    try:
        info = await pipe.info()
        prepared = pipe.prepare(data, info)
        for method in methods:
            await pipe.explain(data, ExplainOptions(method, num_samples=warmup, max_evals=warmup))
        rows = {}
        for method in methods:
            calls.clear()
            start = time.perf_counter()
            result = await pipe.explain(data, ExplainOptions(method, num_samples=samples, max_evals=samples))
            seconds = time.perf_counter() - start
            assert not result.cached
            rows[method] = {"seconds": seconds, "evals": result.num_samples, "requests": sum(calls) + 1,
                            "target": result.target_index, "label": result.label, "heatmap": result.heatmap}
        return info, prepared, rows
    finally:
        await pipe.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="repository from `braintumor export`")
    p.add_argument("--name", default=contract.DEFAULT_NAME, help="model name (its classifier is NAME_classifier)")
    p.add_argument("--image", help="image to explain (default: the first image under --data)")
    p.add_argument("--data", default="../shared/data/brisc2025/classification_task/train/glioma",
                   help="folder whose first image (sorted) is explained when --image is not given")
    p.add_argument("--methods", nargs="+", choices=sorted(explain.PERTURBATION_METHODS), default=["lime", "shap"])
    p.add_argument("--num-samples", type=int, default=300, help="LIME samples and SHAP max_evals, both sides")
    p.add_argument("--batch-size", type=int, default=ServeSettings.explain_batch_size,
                   help="ours: images per Triton request (explain_batch_size)")
    p.add_argument("--warmup", type=int, default=20, help="budget of the untimed first explanation per method")
    p.add_argument("--triton-grpc", help="host:port of a running Triton (default: start the embedded one)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    path = pick_image(args.image, args.data)
    data = path.read_bytes()
    print(f"image {path}; {args.num_samples} samples/evals; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    triton = None
    try:
        if args.triton_grpc:
            url = args.triton_grpc
        else:
            from braintumor.serving.triton_embedded import EmbeddedTriton, free_port

            triton = EmbeddedTriton(args.model_repository, free_port(), free_port(), free_port(), address="127.0.0.1",
                                    load_models=[args.name, contract.classifier_name(args.name)],
                                    startup_timeout=180).start()
            url = triton.grpc_url
        info, prepared, ours = asyncio.run(run_ours(url, args.name, data, args.methods, args.num_samples,
                                                    args.batch_size, args.warmup))
        print(f"model {info.name} v{info.version}: input {info.preprocess.image_size}x{info.preprocess.image_size}, "
              f"predicted {ours[args.methods[0]]['label']}", flush=True)
        naive = {}
        one = OneAtATime(url, contract.classifier_name(args.name))
        try:
            for method in args.methods:
                one.requests = 0
                start = time.perf_counter()
                weights = NAIVE[method](prepared.image, one, ours[method]["target"], args.num_samples)
                seconds = time.perf_counter() - start
                heat = explain.weights_to_heatmap(weights, prepared.geometry)
                naive[method] = {"seconds": seconds, "requests": one.requests,
                                 "agreement": correlation(heat, ours[method]["heatmap"])}
                print(f"  {method}: ours {ours[method]['seconds']:.2f} s, naive {seconds:.2f} s", flush=True)
            batch = min(args.batch_size, info.max_batch_size)
            batched_s, single_s = model_only(one, prepared.image, args.num_samples, batch)
        finally:
            one.client.close()
    finally:
        if triton is not None:
            triton.stop()

    print(f"\nours: Pipeline.explain, {args.batch_size} images per Triton request (requests include the prediction); "
          "naive: library defaults, one image per request\n")
    print("| method | budget | ours s | ours requests | naive s | naive requests | speed-up | heatmap corr. |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows, goals = [], []
    for method in args.methods:
        o, n = ours[method], naive[method]
        speedup = n["seconds"] / o["seconds"]
        rows.append({"method": method, "budget": args.num_samples, "ours_s": o["seconds"], "ours_evals": o["evals"],
                     "ours_requests": o["requests"], "naive_s": n["seconds"], "naive_requests": n["requests"],
                     "speedup": speedup, "heatmap_correlation": n["agreement"]})
        print(f"| {method} | {args.num_samples} | {o['seconds']:.2f} | {o['requests']} | {n['seconds']:.2f} | "
              f"{n['requests']} | {speedup:.1f}x | {n['agreement']:.3f} |")
        goals.append(f"{method}: >= {GOAL_SPEEDUP:g}x faster than naive: {_met(speedup >= GOAL_SPEEDUP)} "
                     f"({speedup:.1f}x); <= {GOAL_SECONDS:g} s per image: {_met(o['seconds'] <= GOAL_SECONDS)} "
                     f"({o['seconds']:.2f} s)")
    ceiling = single_s / batched_s
    print(f"| model only | {args.num_samples} | {batched_s:.2f} | {math.ceil(args.num_samples / batch)} | "
          f"{single_s:.2f} | {args.num_samples} | {ceiling:.1f}x | |")
    goals.append(f"model only: {1e3 * batched_s / args.num_samples:.1f} ms/image batched, "
                 f"{1e3 * single_s / args.num_samples:.1f} ms/image one per request; batching cannot beat "
                 f"{ceiling:.1f}x on this host unless the rest of the naive explanation costs more than the model")
    print("\n" + "\n".join(goals))
    if args.json:
        Path(args.json).write_text(json.dumps({"image": str(path), "model": info.to_dict(), "rows": rows,
                                               "model_only": {"batched_s": batched_s, "single_s": single_s}}, indent=2))
    return 0


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":
    sys.exit(main())
