"""`braintumor serve` with its defaults serves the bundled release model: the answers equal ONNX Runtime on the
shipped files, the served calibration and OOD constants are the card's, a slice under the refer threshold is referred
through Triton with the threshold as its reason and a confident one is not, and a noise image is referred as out of
distribution, each through both doors (HTTP and gRPC), which report the served version."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("bentoml")

from braintumor.export import contract  # noqa: E402
from braintumor.export.triton_config import latest_version  # noqa: E402
from braintumor.serving.triton_embedded import free_port  # noqa: E402
from braintumor.train.decode import decode_image  # noqa: E402
from braintumor.train.preprocess import PreprocessConfig, preprocess  # noqa: E402
from braintumor.train.samples import build_index  # noqa: E402

grpc = pytest.importorskip("grpc")
from braintumor.clients.v1 import braintumor_pb2 as pb  # noqa: E402
from braintumor.clients.v1 import braintumor_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
VERSION = latest_version(ROOT / "model_repository" / contract.DEFAULT_NAME)
META = json.loads((VERSION / contract.METADATA_FILE).read_text())
CARD = json.loads((ROOT / "MODEL_CARD.json").read_text())


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _val_slices(real_data: Path) -> list[Path]:
    keys = set(META["validation_keys"])
    return [Path(s.image_path) for s in build_index(real_data).samples if s.key in keys]


def _onnx_probs(session, path: Path) -> np.ndarray:
    decoded = decode_image(path)
    image, _ = preprocess(decoded.pixels, PreprocessConfig.from_dict(META["preprocess"]))
    return session.run([contract.CLASS_PROBS], {contract.INPUT_NAME: image[None, None]})[0][0]


def test_default_serve_runs_the_bundled_model_and_refers_through_triton(real_data, serve_factory):
    session = ort.InferenceSession(str(VERSION / contract.ONNX_FILE), providers=["CPUExecutionProvider"])
    threshold = META["refer_threshold"]
    probs, unsure, confident = {}, None, None
    for path in _val_slices(real_data):  # scored until one of each is found (the card's refer rate is ~1%)
        probs[path] = _onnx_probs(session, path)
        if probs[path].max() < threshold:
            unsure = unsure or path
        else:
            confident = confident or path
        if unsure and confident:
            break
    assert unsure and confident, "no validation slice under the refer threshold: the card's refer rate says otherwise"

    served = serve_factory("--triton-http-port", str(free_port()), "--triton-grpc-port", str(free_port()),
                         "--triton-metrics-port", str(free_port()))  # no --model-repository: the bundled one
    try:
        model = httpx.get(f"{served.http_url}/model", timeout=30).json()
        assert model["version"] == str(META["version"]), model  # the version Triton serves, never left empty
        assert model["temperature"] == pytest.approx(META["temperature"])
        assert model["refer_threshold"] == pytest.approx(threshold)
        assert model["disagree_min_area"] == pytest.approx(META["disagree_min_area"])
        assert model["ood_threshold"] == META["ood_threshold"] == CARD["metrics"]["ood"]["threshold"]
        assert model["image_size"] == META["image_size"]

        # Grey noise got "pituitary, 0.876" and no reason before the learned OOD check (issue 13 finding 8).
        noise = _png(np.random.default_rng(7).integers(0, 256, (256, 256), dtype=np.uint8))
        body = httpx.post(f"{served.http_url}/analyze", timeout=60, files={"image": ("noise.png", noise, "image/png")})
        assert body.status_code == 200, body.text
        body = body.json()
        assert body["refer"] is True and any(r.startswith("out_of_distribution:") for r in body["refer_reason"]), body
        with grpc.insecure_channel(served.grpc_target) as channel:
            stub = pb_grpc.BrainTumorStub(channel)
            info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
            assert info.ood_threshold == META["ood_threshold"] and info.version == str(META["version"]), info
            reply = stub.Analyze(pb.AnalyzeRequest(image=noise, skip_images=True), timeout=60)
            assert reply.refer and list(reply.refer_reason) == body["refer_reason"]

            for path, expect_refer in ((unsure, True), (confident, False)):
                body = httpx.post(f"{served.http_url}/analyze", timeout=60,
                                  files={"image": (path.name, path.read_bytes(), "image/jpeg")}).json()
                reply = stub.Analyze(pb.AnalyzeRequest(image=path.read_bytes(), skip_images=True), timeout=60)
                for door, answer in (("HTTP", body), ("gRPC", {"probabilities": dict(reply.probabilities),
                                                               "refer": reply.refer,
                                                               "refer_reason": list(reply.refer_reason)})):
                    for name, p in zip(META["classes"], probs[path]):
                        assert answer["probabilities"][name] == pytest.approx(float(p), abs=1e-5), (door, name)
                    threshold_reason = any("refer threshold" in r for r in answer["refer_reason"])
                    if expect_refer:
                        assert answer["refer"] and threshold_reason, (door, answer["refer_reason"])
                    else:
                        assert not threshold_reason, (door, answer["refer_reason"])
                assert list(reply.refer_reason) == body["refer_reason"] and reply.refer == body["refer"]
    finally:
        code = served.stop()
    assert code == 0, "".join(served.lines[-40:])
