"""The serving pipeline against a real embedded Triton with the tiny model: results equal ONNX Runtime run on the
same preprocessed input, a batch with a bad image fails only that image, and a stopped Triton gives Unavailable."""

import asyncio

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.aio")
ort = pytest.importorskip("onnxruntime")

from braintumor.export import contract  # noqa: E402
from braintumor.serving.errors import BadInput, Busy, Unavailable  # noqa: E402
from braintumor.serving.pipeline import Pipeline  # noqa: E402
from braintumor.serving.postprocess import postprocess  # noqa: E402
from braintumor.serving.request import AnalyzeOptions  # noqa: E402
from braintumor.serving.settings import ServeSettings  # noqa: E402
from braintumor.train.decode import decode_image  # noqa: E402
from braintumor.train.preprocess import preprocess  # noqa: E402

pytestmark = pytest.mark.integration


def _run(coro):
    return asyncio.run(coro)


def _pipeline(triton, **kw) -> Pipeline:
    """A pipeline on ``triton``: a running EmbeddedTriton (with the key its inference API needs) or a bare URL."""
    url, key = (triton, "") if isinstance(triton, str) else (triton.grpc_url, triton.client_key)
    return Pipeline.from_settings(ServeSettings(triton_url=url, triton_key=key, **kw))


def test_analyze_equals_onnxruntime(tiny_triton, tiny_repository, slice_jpeg):
    async def go():
        pipe = _pipeline(tiny_triton)
        try:
            assert await pipe.ready()
            info = await pipe.info()
            return info, await pipe.analyze(slice_jpeg, AnalyzeOptions(overlay=True))
        finally:
            await pipe.close()

    info, result = _run(go())
    assert info.version == "1" and info.classes == ("glioma", "meningioma", "pituitary", "no_tumor")
    decoded = decode_image(slice_jpeg)
    image, geometry = preprocess(decoded.pixels, info.preprocess)
    session = ort.InferenceSession(str(tiny_repository / contract.DEFAULT_NAME / "1" / contract.ONNX_FILE),
                                   providers=["CPUExecutionProvider"])
    # the tiny model has no fitted OOD score: served with the three base outputs, no learned check
    outputs = dict(zip(contract.BASE_OUTPUTS, session.run(list(contract.BASE_OUTPUTS), {contract.INPUT_NAME: image[None, None]})))
    expected = postprocess(outputs, geometry, decoded, classes=info.classes, rules=info.refer_rules)
    assert result.label == expected.label
    assert result.probabilities == pytest.approx(expected.probabilities, abs=1e-5)
    assert result.tumor_area_px == expected.tumor_area_px
    np.testing.assert_array_equal(result.mask, expected.mask)
    assert result.original_shape == decoded.pixels.shape
    assert result.overlay_png is not None and result.overlay_png.startswith(b"\x89PNG")


def test_batch_fails_only_the_bad_image(tiny_triton, slice_jpeg):
    async def go():
        pipe = _pipeline(tiny_triton)
        try:
            unreadable = BadInput("images_base64[3] is not valid base64")  # failed at the front door
            return await pipe.analyze_many([slice_jpeg, b"not an image", slice_jpeg, unreadable])
        finally:
            await pipe.close()

    analysed = _run(go())
    assert analysed.model.version == "1" and all(r.model_version == "1" for r in analysed.results[::2])
    good, bad, again, unreadable = analysed.results
    assert isinstance(bad, BadInput) and "JPEG, PNG or DICOM" in bad.message
    assert good.probabilities == again.probabilities
    assert isinstance(unreadable, BadInput) and unreadable.message == "images_base64[3] is not valid base64"


def test_bad_single_image_and_limits(tiny_triton, slice_jpeg):
    async def go():
        pipe = _pipeline(tiny_triton, max_in_flight=1)
        try:
            with pytest.raises(BadInput, match="empty image"):
                await pipe.analyze(b"")
            with pytest.raises(BadInput, match="at most"):
                await pipe.analyze_many([slice_jpeg] * (pipe.settings.max_batch_images + 1))
            # One call in flight fills the only slot: a second is refused at once, not queued.
            first = asyncio.create_task(pipe.analyze(slice_jpeg))
            await asyncio.sleep(0)
            with pytest.raises(Busy):
                await pipe.analyze(slice_jpeg)
            await first
        finally:
            await pipe.close()

    _run(go())


def test_unreachable_triton_is_unavailable(slice_jpeg):
    from braintumor.serving.triton_embedded import free_port

    async def go():
        pipe = _pipeline(f"127.0.0.1:{free_port()}", triton_timeout_s=2.0)
        try:
            assert not await pipe.ready()
            with pytest.raises(Unavailable, match="retry"):
                await pipe.analyze(slice_jpeg)
        finally:
            await pipe.close()

    _run(go())
