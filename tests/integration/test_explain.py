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
from braintumor.serving.pipeline import Pipeline  # noqa: E402
from braintumor.serving.request import ExplainOptions  # noqa: E402
from braintumor.serving.postprocess import gradcam_heatmap  # noqa: E402
from braintumor.serving.settings import ServeSettings  # noqa: E402

pytestmark = pytest.mark.integration

BUDGET = 60


def _pipeline(triton, shap_max_evals: int = BUDGET) -> Pipeline:
    return Pipeline.from_settings(ServeSettings(triton_url=triton.grpc_url, triton_key=triton.client_key,
                                                lime_num_samples=BUDGET, shap_max_evals=shap_max_evals,
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


def test_options_and_model_info_are_read_once_per_request(tiny_triton, slice_jpeg, monkeypatch):
    """An explanation checks its options once and asks the model for its info once (the door asks neither), and
    the second, cached answer costs the same: one check, one info. The check fills in both defaults (LIME's and
    SHAP's, set apart so that one cannot stand in for the other)."""
    checks, infos = [], []
    real_checked = ExplainOptions.checked
    monkeypatch.setattr(ExplainOptions, "checked",
                        lambda self, *a: checks.append((self, real_checked(self, *a))) or checks[-1][1])

    async def go():
        pipe = _pipeline(tiny_triton, shap_max_evals=BUDGET // 2)
        real_info = pipe.model.info
        monkeypatch.setattr(pipe.model, "info", lambda: infos.append(1) or real_info())
        try:
            first = await pipe.explain(slice_jpeg, ExplainOptions("gradcam"))
            second = await pipe.explain(slice_jpeg, ExplainOptions("gradcam"))
            return first, second
        finally:
            await pipe.close()

    first, second = asyncio.run(go())
    assert first.method == second.method == "gradcam" and second.cached and not first.cached
    assert len(checks) == 2 and len(infos) == 2
    assert [(done.num_samples, done.max_evals) for _, done in checks] == [(BUDGET, BUDGET // 2)] * 2
