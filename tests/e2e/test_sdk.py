"""The SDK against a real `braintumor serve` (Triton + gateway + gRPC as subprocesses) on the tiny model: both
protocols agree, analyze_many keeps order and isolates a bad image, Grad-CAM over both, LIME as an HTTP task,
health, and the context manager closes what it opened."""

import asyncio

import grpc
import pytest

from braintumor.clients import AsyncBrainTumorClient, BrainTumorClient, InvalidInputError

pytestmark = pytest.mark.e2e

CLASSES = {"glioma", "meningioma", "pituitary", "no_tumor"}


@pytest.fixture(scope="module")
def clients(served):
    with BrainTumorClient(served.grpc_target) as over_grpc, \
            BrainTumorClient(served.http_url, protocol="http") as over_http:
        yield {"grpc": over_grpc, "http": over_http}


def test_grpc_and_http_give_the_same_answer(clients, slice_jpeg):
    a, b = clients["grpc"].analyze(slice_jpeg), clients["http"].analyze(slice_jpeg)
    assert a.label == b.label and a.label in CLASSES
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
    assert a.mask_png == b.mask_png and a.tumor_area_px == b.tumor_area_px
    assert (a.model_name, a.model_version) == (b.model_name, b.model_version) == ("brain_tumor", "1")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_analyze_many_keeps_order_and_isolates_a_bad_image(clients, protocol, slice_jpeg):
    images = [slice_jpeg, slice_jpeg, b"GIF89a this is not a slice", slice_jpeg, slice_jpeg]
    answers = list(clients[protocol].analyze_many(images, concurrency=3))
    assert len(answers) == 5
    assert isinstance(answers[2], InvalidInputError) and "JPEG, PNG or DICOM" in answers[2].detail
    good = [answers[i] for i in (0, 1, 3, 4)]
    assert all(a.label == good[0].label and a.mask_png == good[0].mask_png for a in good)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_gradcam(clients, protocol, slice_jpeg):
    explanation = clients[protocol].explain(slice_jpeg, method="gradcam")
    assert explanation.method == "gradcam" and explanation.target in CLASSES
    assert explanation.heatmap_png.startswith(b"\x89PNG")


def test_lime_as_an_http_task(clients, slice_jpeg):
    job = clients["http"].submit_explain(slice_jpeg, method="lime", target="glioma", num_samples=20)
    assert job.status() in ("in_progress", "completed")
    explanation = job.result(timeout=120)
    assert (explanation.method, explanation.target) == ("lime", "glioma") and explanation.num_samples > 0
    assert job.status() == "completed"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_health(clients, protocol):
    health = clients[protocol].health()
    assert health.live and health.ready
    assert health.model["name"] == "brain_tumor" and set(health.model["classes"]) == CLASSES


def test_context_manager_closes(served, slice_jpeg):
    with BrainTumorClient(served.grpc_target) as client:
        assert client.analyze(slice_jpeg).label in CLASSES
        channel, thread = client._async._transport._channel, client._loop.thread
    assert channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN and not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        client.analyze(slice_jpeg)


def test_async_client_over_both(served, slice_jpeg):
    async def main():
        async with AsyncBrainTumorClient(served.grpc_target) as a, \
                AsyncBrainTumorClient(served.http_url, protocol="http") as b:
            return await asyncio.gather(a.analyze(slice_jpeg), b.analyze(slice_jpeg))

    a, b = asyncio.run(main())
    assert a.label == b.label and a.mask_png == b.mask_png
