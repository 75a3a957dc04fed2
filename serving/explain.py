"""Explanations of one prediction as heatmaps on the original image: Grad-CAM from the model's own CAM output, LIME
and SHAP by perturbing the model input and calling the classifier-only Triton model in batches; cached (LRU).

Each perturbation method is one function with the same signature, ``(image, classify, target_index, budget,
batch_size) -> (S, S) float32 weights``, where ``classify`` is a synchronous ``(n, 1, S, S) uint8 -> (n, C)``
function; :class:`Explainer` gives it one that forwards to the async :class:`~.backend.ModelBackend`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from ..export.contract import CAM, CLASS_PROBS
from ..train.preprocess import Geometry, PreprocessConfig, invert_geometry
from .errors import DeadlineExceeded, Unavailable
from .postprocess import colourise, encode_png, gradcam_heatmap, overlay

log = logging.getLogger("braintumor.serving")

Classify = Callable[[np.ndarray], np.ndarray]  # (n, 1, S, S) uint8 -> (n, num_classes) probabilities

SEED = 0  # the same request gives the same heatmap
# LIME superpixels: SLIC on the grey levels, inside the head only. quickshift (lime's default) works on colour
# distances and gives few, ragged segments on a greyscale slice. ~50 segments of ~300 model pixels at S=128 are
# small enough to outline a tumour and few enough for a ridge fit on a few hundred samples.
LIME_SEGMENTS = 50
LIME_COMPACTNESS = 0.1  # for grey levels in 0..1 (skimage's 10 is for Lab's 0..100): follows edges, stays compact
# SHAP hides a region by blurring it with a box this fraction of the image side: a tumour is smeared into its
# surroundings, which stays closer to a real slice than a black hole (and needs no per-sample inpainting).
SHAP_BLUR_FRACTION = 0.25


# -- the perturbation methods --------------------------------------------------------------------------------------
def lime_weights(image: np.ndarray, classify: Classify, target_index: int, budget: int, batch_size: int,
                 *, seed: int = SEED, foreground_threshold: int = PreprocessConfig.foreground_threshold) -> np.ndarray:
    """LIME: ``budget`` perturbed copies (random superpixels set to black), a weighted ridge fit per superpixel;
    each pixel gets its superpixel's weight for the target class."""
    from lime.lime_image import LimeImageExplainer

    class BatchedLime(LimeImageExplainer):
        data_labels = _lime_data_labels  # vectorised, no tqdm bar; same random draws as lime's own

    segments = lime_segments(image, foreground_threshold)
    explanation = BatchedLime(feature_selection="none", random_state=seed).explain_instance(
        np.repeat(image[..., None], 3, axis=-1), lambda rgb: classify(model_batch(rgb)),
        labels=(target_index,), top_labels=None, hide_color=0, num_samples=budget, batch_size=batch_size,
        segmentation_fn=lambda _rgb: segments, random_seed=seed)
    per_segment = np.zeros(int(segments.max()) + 1, np.float32)
    for segment, weight in explanation.local_exp[target_index]:
        per_segment[segment] = weight
    return per_segment[segments]


def lime_segments(image: np.ndarray, foreground_threshold: int = PreprocessConfig.foreground_threshold) -> np.ndarray:
    """(S, S) uint8 -> (S, S) superpixel labels 0..n-1; the background (outside the head: not above the model's
    ``PreprocessConfig.foreground_threshold``) is one of them."""
    from skimage.segmentation import slic

    head = image > foreground_threshold
    segments = slic(image.astype(np.float32) / 255.0, n_segments=LIME_SEGMENTS, compactness=LIME_COMPACTNESS,
                    channel_axis=None, start_label=0, mask=head if head.mean() >= 0.05 else None)
    return np.unique(segments, return_inverse=True)[1].reshape(image.shape)  # contiguous labels, as lime expects


def _lime_data_labels(self, image, fudged_image, segments, classifier_fn, num_samples, batch_size=10):
    """lime 0.2's ``LimeImageExplainer.data_labels`` built a batch at a time with numpy: the same random on/off
    matrix (first row all on) and the same images, without a per-sample copy loop and its progress bar."""
    n_features = np.unique(segments).shape[0]
    data = self.random_state.randint(0, 2, num_samples * n_features).reshape((num_samples, n_features))
    data[0, :] = 1
    labels = []
    for start in range(0, num_samples, batch_size):
        hidden = data[start:start + batch_size][:, segments] == 0  # (b, S, S)
        labels.extend(classifier_fn(np.where(hidden[..., None], fudged_image, image)))
    return data, np.array(labels)


def shap_weights(image: np.ndarray, classify: Classify, target_index: int, budget: int, batch_size: int,
                 *, seed: int = SEED) -> np.ndarray:
    """SHAP: Owen values of the target class over shap's hierarchical split of the image (Partition explainer),
    at most ``budget`` model evaluations; regions are hidden by blurring."""
    import shap

    size = image.shape[0]
    kernel = max(3, round(size * SHAP_BLUR_FRACTION))
    masker = shap.maskers.Image(f"blur({kernel},{kernel})", (size, size, 1))
    explainer = shap.Explainer(lambda x: classify(model_batch(x)), masker, algorithm="partition")
    with _seeded_global_rng(seed):
        result = explainer(image[None, :, :, None].astype(np.float32), max_evals=budget, batch_size=batch_size,
                           outputs=[target_index], silent=True)
    return np.asarray(result.values[0, :, :, :, 0], np.float32).sum(axis=-1)  # (S, S, channel, output)


PERTURBATION_METHODS: dict[str, Callable[..., np.ndarray]] = {"lime": lime_weights, "shap": shap_weights}

_GLOBAL_RNG = threading.Lock()


@contextmanager
def _seeded_global_rng(seed: int):
    """shap's Partition explainer breaks ties between equally important regions with ``np.random.randn``, the
    process-wide RNG. Seeding it makes SHAP reproducible at the price of one SHAP run at a time per process
    (LIME has its own RandomState); the previous state is restored for everyone else."""
    with _GLOBAL_RNG:
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


def model_batch(images: np.ndarray) -> np.ndarray:
    """The libraries' (n, S, S, channels) images, uint8 or float -> the model's (n, 1, S, S) uint8 (first channel:
    the channels are copies of the grey slice)."""
    grey = np.asarray(images)[..., 0]
    if grey.dtype != np.uint8:
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(grey[:, None])


def weights_to_heatmap(weights: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(S, S) attributions -> (H, W) uint8 heatmap on the original image: positive evidence only, scaled so the
    strongest is 255 (no positive evidence: all zeros), then back through the geometry bilinearly, as Grad-CAM."""
    positive = np.maximum(np.asarray(weights, np.float32), 0.0)
    top = float(positive.max(initial=0.0))
    square = np.zeros(positive.shape, np.uint8) if top <= 0 else np.rint(positive * (255.0 / top)).astype(np.uint8)
    return invert_geometry(square, geometry)


def warm_up() -> None:
    """Import lime and shap and compile shap's numba kernels on a tiny image (several seconds the first time in a
    process, which would otherwise land on the first SHAP request)."""
    image = np.full((8, 8), 100, np.uint8)
    shap_weights(image, lambda batch: np.full((len(batch), 2), 0.5, np.float32), 0, 10, 8)
    lime_segments(image)


# -- the serving side ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Explanation:
    """One explanation. ``heatmap`` and the PNGs are in the original image geometry (``original_shape`` = H, W)."""

    method: str
    target: str  # the explained class
    target_index: int
    label: str  # the predicted class
    probabilities: dict[str, float]
    num_samples: int | None  # model evaluations made (LIME samples, SHAP evaluations); None for Grad-CAM
    seconds: float  # time the explanation took to compute (the first computation's, when cached)
    original_shape: tuple[int, int]
    heatmap: np.ndarray = field(repr=False)  # (H, W) uint8 0..255
    heatmap_png: bytes = field(repr=False)  # RGB, jet-coloured
    overlay_png: bytes = field(repr=False)  # RGB, the slice with the heatmap blended in
    cached: bool = False
    model_name: str = ""  # the model that was explained
    model_version: str = ""


class Explainer:
    """Computes explanations for the pipeline: LIME/SHAP in a small thread pool (the libraries are synchronous),
    each calling Triton through the event loop in batches of ``explain_batch_size``; results in an LRU cache."""

    def __init__(self, model, settings, *, warm: bool = True) -> None:
        self.model = model  # a ModelBackend: async classify(images, batch_size) -> probabilities
        self.settings = settings
        self._pool = concurrent.futures.ThreadPoolExecutor(settings.explain_workers, thread_name_prefix="explain")
        self._cache: OrderedDict[tuple, Explanation] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if warm:  # a daemon thread, not the pool: a process stopping during warm-up must not wait for it
            threading.Thread(target=_warm_up_logged, name="explain-warm-up", daemon=True).start()

    def close(self) -> None:
        self._closed.set()  # running computations stop at their next model call
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __len__(self) -> int:
        return len(self._cache)

    @staticmethod
    def _key(sha256: str, info, options) -> tuple:
        # The requested target (None: the predicted class), so a hit is found before any inference.
        return sha256, options.method, options.target, _budget(options), info.name, info.version

    def lookup(self, sha256: str, info, options) -> Explanation | None:
        """The cached explanation of these image bytes and (validated) options, marked ``cached``; else None."""
        key = self._key(sha256, info, options)
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                return None
            self._cache.move_to_end(key)
        return replace(hit, cached=True)

    async def explain(self, prepared, sha256: str, outputs: dict[str, np.ndarray], info, options) -> Explanation:
        """Explain ``options.target`` (None: the predicted class) for one prepared image (``sha256``: of its bytes, the
        cache key) and its full-model outputs."""
        hit = self.lookup(sha256, info, options)  # another request may have computed it while this one waited
        if hit is not None:
            return hit
        probs = np.asarray(outputs[CLASS_PROBS], np.float64).reshape(-1)
        predicted = int(np.argmax(probs))
        target = predicted if options.target is None else info.classes.index(options.target)
        budget = _budget(options)
        start = time.perf_counter()
        if options.method == "gradcam":  # no model call: the CAM came with the prediction
            cam = np.asarray(outputs[CAM])
            heat = await asyncio.to_thread(gradcam_heatmap, cam.reshape(cam.shape[-3:]), target, prepared.geometry)
            used = None
        else:
            method = PERTURBATION_METHODS[options.method]
            if method is lime_weights:  # superpixels inside the head, as this model's preprocessing draws it
                method = functools.partial(method, foreground_threshold=info.preprocess.foreground_threshold)
            heat, used = await self._perturb(method, prepared, target, budget)
        heatmap_png, overlay_png = await asyncio.to_thread(_render, prepared.decoded.pixels, heat)
        explanation = Explanation(
            method=options.method, target=info.classes[target], target_index=target, label=info.classes[predicted],
            probabilities={c: round(float(p), 6) for c, p in zip(info.classes, probs)},
            num_samples=used, seconds=time.perf_counter() - start, original_shape=prepared.geometry.original_shape,
            heatmap=heat, heatmap_png=heatmap_png, overlay_png=overlay_png,
            model_name=info.name, model_version=info.version)
        key = self._key(sha256, info, options)
        with self._lock:
            self._cache[key] = explanation
            self._cache.move_to_end(key)
            while len(self._cache) > self.settings.explain_cache_size:
                self._cache.popitem(last=False)
        return explanation

    async def _perturb(self, method, prepared, target: int, budget: int) -> tuple[np.ndarray, int]:
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()
        counted = CountingClassify(self._bridge(loop, cancelled))
        batch = self.settings.explain_batch_size

        def compute() -> np.ndarray:
            weights = method(prepared.image, counted, target, budget, batch)
            return weights_to_heatmap(weights, prepared.geometry)

        try:
            heat = await loop.run_in_executor(self._pool, compute)
        except asyncio.CancelledError:
            cancelled.set()  # the caller went away: stop sending perturbations to Triton
            raise
        except _Stopped as exc:
            raise Unavailable("the service is shutting down; retry the explanation") from exc
        return heat, counted.images

    def _bridge(self, loop: asyncio.AbstractEventLoop, cancelled: threading.Event) -> Classify:
        """A synchronous classify for the worker threads, run on the event loop that owns the Triton client."""
        batch_size = self.settings.explain_batch_size
        timeout = 2 * self.settings.triton_timeout_s  # each Triton request has its own deadline; this is a backstop

        def classify(images: np.ndarray) -> np.ndarray:
            if cancelled.is_set() or self._closed.is_set():
                raise _Stopped("explanation cancelled")
            future = asyncio.run_coroutine_threadsafe(self.model.classify(images, batch_size), loop)
            try:
                return future.result(timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise DeadlineExceeded(f"Triton did not classify {len(images)} perturbed images within "
                                       f"{timeout:g} s") from None

        return classify


def _budget(options) -> int | None:
    return {"lime": options.num_samples, "shap": options.max_evals}.get(options.method)


class _Stopped(RuntimeError):
    """Raised in a worker thread when its explanation was cancelled or the explainer closed."""


def _warm_up_logged() -> None:
    try:
        warm_up()
    except Exception:  # noqa: BLE001 - logged; the first LIME/SHAP request will raise it again where it is seen
        log.exception("explainer warm-up failed; the first LIME/SHAP request will show the error")


class CountingClassify:
    """Wraps a classify function and counts calls and images (the budget actually spent)."""

    def __init__(self, classify: Classify) -> None:
        self._classify = classify
        self.sizes: list[int] = []  # images per call

    def __call__(self, images: np.ndarray) -> np.ndarray:
        probs = self._classify(images)
        self.sizes.append(len(images))
        return probs

    @property
    def calls(self) -> int:
        return len(self.sizes)

    @property
    def images(self) -> int:
        return sum(self.sizes)


def _render(pixels: np.ndarray, heat: np.ndarray) -> tuple[bytes, bytes]:
    """Heatmap PNG (jet) and overlay PNG (slice + heatmap; an empty mask, so no outline)."""
    return encode_png(colourise(heat)), encode_png(overlay(pixels, np.zeros_like(heat), heat))
