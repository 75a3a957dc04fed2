"""Explanations through the serving pipeline and a real embedded Triton with the tiny model: each method gives PNGs
of the original image size, a repeated request is served from the cache, Grad-CAM is the model's own CAM, and bad
options are refused with a message."""

import asyncio
import io
import math

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tritonclient.grpc.aio")
pytest.importorskip("lime")
pytest.importorskip("shap")

from braintumor.serving.errors import BadInput  # noqa: E402
from braintumor.serving.pipeline import ExplainOptions, Pipeline  # noqa: E402
from braintumor.serving.postprocess import gradcam_heatmap  # noqa: E402
from braintumor.serving.settings import ServeSettings  # noqa: E402

pytestmark = pytest.mark.integration

BUDGET = 60


def _pipeline(triton) -> Pipeline:
    return Pipeline.from_settings(ServeSettings(triton_url=triton.grpc_url, triton_key=triton.client_key, lime_num_samples=BUDGET, shap_max_evals=BUDGET,
                                                explain_batch_size=16))


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "RGB"
        return img.height, img.width


def test_each_method_on_the_original_image_then_cached(tiny_triton, slice_jpeg):
    async def go():
        pipe = _pipeline(tiny_triton)
        try:
            info = await pipe.info()
            results = {m: await pipe.explain(slice_jpeg, ExplainOptions(m)) for m in ("gradcam", "lime", "shap")}
            again = await pipe.explain(slice_jpeg, ExplainOptions("lime"))
            other_budget = await pipe.explain(slice_jpeg, ExplainOptions("lime", num_samples=BUDGET // 2))
            prepared = pipe.prepare(slice_jpeg, info)
            outputs = await pipe.model.infer(prepared.image[None, None])
            return info, results, again, other_budget, prepared, outputs
        finally:
            await pipe.close()

    info, results, again, other_budget, prepared, outputs = asyncio.run(go())
    shape = prepared.decoded.pixels.shape
    assert shape == (64, 56)
    for method, result in results.items():
        assert result.method == method and not result.cached
        assert result.label == info.classes[int(np.argmax(outputs["class_probs"][0]))] == result.target
        assert set(result.probabilities) == set(info.classes)
        assert result.original_shape == shape and result.heatmap.shape == shape
        assert _png_size(result.heatmap_png) == shape and _png_size(result.overlay_png) == shape
    assert results["gradcam"].num_samples is None
    assert results["lime"].num_samples == BUDGET
    assert math.ceil(BUDGET / 2) <= results["shap"].num_samples <= BUDGET
    np.testing.assert_array_equal(results["gradcam"].heatmap,
                                  gradcam_heatmap(outputs["cam"][0], results["gradcam"].target_index,
                                                  prepared.geometry))
    assert again.cached and again.heatmap_png == results["lime"].heatmap_png
    assert not other_budget.cached and other_budget.num_samples == BUDGET // 2


@pytest.mark.parametrize("options, message", [
    (ExplainOptions("integrated_gradients"), "unknown explanation method"),
    (ExplainOptions("lime", num_samples=10**6), "num_samples=1000000 is outside"),
    (ExplainOptions("shap", max_evals=1), "max_evals=1 is outside"),
    (ExplainOptions("lime", target="astrocytoma"), "unknown target class"),
])
def test_bad_options_are_refused(tiny_triton, slice_jpeg, options, message):
    async def go():
        pipe = _pipeline(tiny_triton)
        try:
            await pipe.explain(slice_jpeg, options)
        finally:
            await pipe.close()

    with pytest.raises(BadInput, match=message):
        asyncio.run(go())


def test_options_are_checked_once(tiny_triton, slice_jpeg, monkeypatch):
    """The HTTP door checks the options before it reads the image; the pipeline does not check them again."""
    async def go():
        pipe = _pipeline(tiny_triton)
        try:
            checked = pipe.check_explain(ExplainOptions("gradcam"), await pipe.info())
            calls = []
            monkeypatch.setattr(pipe, "check_explain", lambda *a: calls.append(a) or checked)
            first = await pipe.explain(slice_jpeg, checked)
            second = await pipe.explain(slice_jpeg, ExplainOptions("gradcam"))  # unchecked: checked here, once
            return checked, first, second, calls
        finally:
            await pipe.close()

    checked, first, second, calls = asyncio.run(go())
    assert (checked.num_samples, checked.max_evals) != (None, None)  # the defaults were filled in
    assert first.method == second.method == "gradcam" and len(calls) == 1
