"""Explanations on a toy classifier written in numpy whose glioma probability is the mean brightness of one known
square: LIME and SHAP must find that square, call the model in batches within the budget, repeat themselves
exactly, and the Explainer must map heatmaps back to the original image and cache them in a bounded LRU."""

import asyncio
import hashlib
import io
import math

import numpy as np
import pytest
from PIL import Image

from braintumor.serving.errors import Unavailable
from braintumor.serving.explain import (
    LIME_SEGMENTS,
    PERTURBATION_METHODS,
    CountingClassify,
    Explainer,
    _lime_data_labels,
    lime_segments,
    model_batch,
    weights_to_heatmap,
)
from braintumor.serving.pipeline import Prepared
from braintumor.serving.request import ExplainOptions
from braintumor.serving.postprocess import gradcam_heatmap
from braintumor.serving.settings import ServeSettings
from braintumor.export.model_contract import ModelContract
from braintumor.serving.backend import ModelInfo
from braintumor.train.naming import CLASSES
from braintumor.train.decode import DecodedImage
from braintumor.train.preprocess import PreprocessConfig, preprocess

pytest.importorskip("lime")
pytest.importorskip("shap")

S = 64
# The square the toy model reads, aligned with shap's binary split of a 64x64 image so no block straddles it.
REGION = (slice(16, 32), slice(32, 48))
INSIDE = np.zeros((S, S), bool)
INSIDE[REGION] = True
# Pad geometry: a 32x64 slice becomes the 64x64 input with 16 black rows above and below, without resizing.
CFG = PreprocessConfig(image_size=S, geometry="pad")
INFO = ModelInfo("toy", "1", ModelContract(CLASSES, CFG, cam_size=4), max_batch_size=32)


def toy_probs(batch: np.ndarray) -> np.ndarray:
    """(n, 1, S, S) uint8 -> (n, 4): glioma = mean brightness of REGION, the rest shared equally."""
    assert batch.dtype == np.uint8 and batch.shape[1:] == (1, S, S)
    glioma = batch[:, 0][:, REGION[0], REGION[1]].astype(np.float64).mean(axis=(1, 2)) / 255.0
    rest = (1.0 - glioma) / 3.0
    return np.stack([glioma, rest, rest, rest], axis=1).astype(np.float32)


def toy_slice(seed: int = 0) -> np.ndarray:
    """(32, 64) original slice: textured grey 'head', a bright square where the model looks, a bright distractor."""
    pixels = 60 + np.random.default_rng(seed).integers(0, 10, (32, 64)).astype(np.uint8)
    pixels[0:16, 32:48] = 200  # model rows 16:32 after 16 rows of padding: REGION
    pixels[20:30, 4:20] = 200  # the same brightness where the model does not look
    return pixels


def toy_image() -> np.ndarray:
    image, geometry = preprocess(toy_slice(), CFG)
    assert geometry.pad[:2] == (16, 16) and image.shape == (S, S)
    return image


@pytest.mark.parametrize("method", ["lime", "shap"])
def test_heatmap_peaks_where_the_model_looks(method):
    weights = PERTURBATION_METHODS[method](toy_image(), toy_probs, 0, 120, 32)
    assert weights.shape == (S, S) and weights.dtype == np.float32
    positive = np.maximum(weights, 0)
    assert INSIDE[np.unravel_index(np.argmax(weights), weights.shape)]
    assert positive[INSIDE].mean() > 10 * positive[~INSIDE].mean()


@pytest.mark.parametrize("method, budget, batch", [("lime", 60, 32), ("lime", 100, 16), ("shap", 60, 32),
                                                   ("shap", 200, 16)])
def test_model_called_in_batches_within_the_budget(method, budget, batch):
    counted = CountingClassify(toy_probs)
    PERTURBATION_METHODS[method](toy_image(), counted, 0, budget, batch)
    assert max(counted.sizes) <= batch and counted.images == sum(counted.sizes)
    if method == "lime":  # every sample is evaluated, in full batches but the last
        assert counted.images == budget and counted.calls == math.ceil(budget / batch)
        assert set(counted.sizes[:-1]) == {batch}
    else:  # shap's first rounds are small (the root, then its children); after that batches are full
        assert counted.images <= budget
        assert counted.calls <= budget / batch + 5
        assert sum(size for size in counted.sizes if size == batch) >= budget - 3 * batch


@pytest.mark.parametrize("method", ["lime", "shap"])
def test_same_request_same_weights(method):
    fn = PERTURBATION_METHODS[method]
    np.testing.assert_array_equal(fn(toy_image(), toy_probs, 0, 60, 32), fn(toy_image(), toy_probs, 0, 60, 32))


def test_lime_perturbations_equal_lime_own_data_labels():
    """Our vectorised batch builder draws the same on/off matrix and builds the same images as lime's loop."""
    from lime.lime_image import LimeImageExplainer

    image = np.repeat(toy_image()[..., None], 3, axis=-1)
    segments = lime_segments(toy_image())
    seen = {"ours": [], "lime": []}

    def recorder(name):
        def classify(images):
            seen[name].append(images.copy())
            return toy_probs(model_batch(images))
        return classify

    ours = _lime_data_labels(LimeImageExplainer(random_state=3), image, np.zeros_like(image), segments,
                             recorder("ours"), 50, batch_size=16)
    lime = LimeImageExplainer(random_state=3).data_labels(image, np.zeros_like(image), segments, recorder("lime"),
                                                          50, batch_size=16)
    np.testing.assert_array_equal(ours[0], lime[0])
    np.testing.assert_array_equal(ours[1], lime[1])
    np.testing.assert_array_equal(np.concatenate(seen["ours"]), np.concatenate(seen["lime"]))


def test_lime_segments_are_contiguous_labels_inside_the_head():
    segments = lime_segments(toy_image())
    labels = np.unique(segments)
    np.testing.assert_array_equal(labels, np.arange(len(labels)))
    assert LIME_SEGMENTS // 2 <= len(labels) <= 2 * LIME_SEGMENTS
    assert len(np.unique(segments[:16])) == 1  # the black padding is one segment, not many


def test_lime_head_is_the_models_foreground():
    """The head LIME segments inside is drawn at the model's PreprocessConfig.foreground_threshold, not a copy: above
    every grey level nothing is head, and the padding is split like the rest of the image."""
    image = toy_image()
    assert len(np.unique(lime_segments(image, CFG.foreground_threshold)[:16])) == 1
    assert len(np.unique(lime_segments(image, 255)[:16])) > 1


def test_model_batch_rounds_clips_and_takes_one_channel():
    floats = np.array([[[[-3.0], [1.4]], [[254.6], [300.0]]]], np.float32)  # (1, 2, 2, 1)
    out = model_batch(floats)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 2, 2)
    np.testing.assert_array_equal(out[0, 0], [[0, 1], [255, 255]])
    rgb = np.repeat(np.arange(4, dtype=np.uint8).reshape(1, 2, 2, 1), 3, axis=-1)
    np.testing.assert_array_equal(model_batch(rgb)[0, 0], [[0, 1], [2, 3]])


def test_weights_to_heatmap_keeps_positive_evidence_on_the_original_geometry():
    _, geometry = preprocess(toy_slice(), CFG)
    weights = np.full((S, S), -1.0, np.float32)
    weights[REGION] = 0.5
    weights[40:44, 0:4] = 0.25
    heat = weights_to_heatmap(weights, geometry)
    assert heat.shape == (32, 64) and heat.dtype == np.uint8
    assert (heat[0:16, 32:48] == 255).all()  # the strongest evidence is 255
    assert (heat[24:28, 0:4] == 128).all()  # half as strong: half the scale (model rows 40:44 - 16 padding)
    assert heat.sum() == 255 * 256 + 128 * 16  # negative evidence is dropped
    assert not weights_to_heatmap(-np.ones((S, S)), geometry).any()  # no positive evidence: all zeros


# -- the Explainer ---------------------------------------------------------------------------------------------------
class ToyModel:
    """Stands in for TritonModel.classify: the numpy toy, recording each call's size."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.sizes: list[int] = []
        self.fail = fail

    async def classify(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        assert batch_size == 16
        if self.fail is not None:
            raise self.fail
        self.sizes.append(len(images))
        return toy_probs(images)


def prepared(seed: int = 0) -> Prepared:
    pixels = toy_slice(seed)
    image, geometry = preprocess(pixels, CFG)
    return Prepared(DecodedImage(pixels, "L", False), None, image, geometry)


def digest(item: Prepared) -> str:
    """The cache key the pipeline computes from the request bytes (here: from the pixels)."""
    return hashlib.sha256(item.image.tobytes()).hexdigest()


def outputs_for(item: Prepared) -> dict[str, np.ndarray]:
    cam = np.zeros((1, len(CLASSES), 4, 4), np.float32)
    cam[0, 0, 1, 2] = 1.0  # model rows 16:32, cols 32:48
    return {"class_probs": toy_probs(item.image[None, None]), "mask_prob": np.zeros((1, 1, S, S), np.float32),
            "cam": cam}


def explainer(model, **settings) -> Explainer:
    settings = {"explain_batch_size": 16, **settings}
    return Explainer(model, ServeSettings(**settings), warm=False)


def _png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


@pytest.mark.parametrize("method", ["gradcam", "lime", "shap"])
def test_explanation_on_the_original_image_then_cached(method):
    model = ToyModel()
    ex = explainer(model)
    item = prepared()
    options = ExplainOptions(method, None, num_samples=40, max_evals=40)

    async def go():
        try:
            before = ex.lookup(digest(item), INFO, options)
            first = await ex.explain(item, digest(item), outputs_for(item), INFO, options)
            return before, first, await ex.explain(item, digest(item), outputs_for(item), INFO, options)
        finally:
            ex.close()

    before, first, again = asyncio.run(go())
    assert (first.method, first.target, first.target_index, first.label) == (method, "glioma", 0, "glioma")
    assert first.probabilities["glioma"] == pytest.approx(toy_probs(item.image[None, None])[0, 0], abs=1e-6)
    assert first.original_shape == (32, 64) and first.heatmap.shape == (32, 64)
    assert _png(first.heatmap_png).shape == (32, 64, 3) and _png(first.overlay_png).shape == (32, 64, 3)
    assert first.heatmap[0:16, 32:48].mean() > 4 * first.heatmap[16:].mean() + 1
    assert before is None and not first.cached and again.cached
    assert again.heatmap is first.heatmap and again.num_samples == first.num_samples
    assert ex.lookup(digest(item), INFO, options).cached  # the pipeline can skip decoding and inference on a hit
    if method == "gradcam":
        assert first.num_samples is None and model.sizes == []
        np.testing.assert_array_equal(first.heatmap, gradcam_heatmap(outputs_for(item)["cam"][0], 0, item.geometry))
    else:  # every Triton request carries up to explain_batch_size images, and the cache hits made none
        assert sum(model.sizes) == first.num_samples <= 40 and max(model.sizes) <= 16
        assert len(model.sizes) <= (3 if method == "lime" else 6)


def test_cache_is_a_bounded_lru():
    ex = explainer(ToyModel(), explain_cache_size=2)
    options = ExplainOptions("gradcam")

    async def go():
        try:
            hits = []
            for seed in (0, 1, 0, 2, 1, 0):  # 0 is used again before 2 arrives, so 1 is the one evicted
                item = prepared(seed)
                hits.append((await ex.explain(item, digest(item), outputs_for(item), INFO, options)).cached)
                assert len(ex) <= 2
            return hits
        finally:
            ex.close()

    assert asyncio.run(go()) == [False, False, True, False, False, False]


def test_other_target_or_budget_is_another_entry():
    ex = explainer(ToyModel())
    item = prepared()
    # Keyed by the requested target, so a hit is found before inference: "glioma" named is not the None entry.
    requests = [("lime", None, 30), ("lime", "no_tumor", 30), ("lime", None, 40), ("lime", "glioma", 30),
                ("shap", None, 30), ("lime", None, 30), ("lime", "glioma", 30)]

    async def go():
        try:
            return [(await ex.explain(item, digest(item), outputs_for(item), INFO, ExplainOptions(m, target, n, n))).cached
                    for m, target, n in requests]
        finally:
            ex.close()

    assert asyncio.run(go()) == [False, False, False, False, False, True, True]


def test_triton_failure_reaches_the_caller():
    ex = explainer(ToyModel(fail=Unavailable("Triton is not reachable")))
    item = prepared()

    async def go():
        try:
            await ex.explain(item, digest(item), outputs_for(item), INFO, ExplainOptions("lime", None, 30, 30))
        finally:
            ex.close()

    with pytest.raises(Unavailable, match="not reachable"):
        asyncio.run(go())
    assert len(ex) == 0
