"""One table: Triton's status -> HTTP status -> gRPC code -> SDK exception, through both front doors, and whether the
SDK retried it.

A real embedded Triton serves a python-backend model that answers each inference with the error the table names
(chosen by the grey level of the uploaded image; a long sleep for the deadline row). The HTTP gateway runs as
`bentoml serve`, the gRPC API in this process; the SDK calls both. Nothing between Triton and the SDK is replaced.
"""

from __future__ import annotations

import asyncio
import io
import logging
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="the embedded Triton needs the nvidia-pytriton wheel")
pytest.importorskip("bentoml")
pytest.importorskip("tritonclient.grpc.aio")

from PIL import Image  # noqa: E402

from braintumor.clients import AsyncBrainTumorClient  # noqa: E402
from braintumor.clients.errors import (  # noqa: E402
    DeadlineExceededError,
    InvalidInputError,
    ServerError,
    UnavailableError,
)
from braintumor.export.contract import CONFIG_FILE, DEFAULT_NAME, PYTHON_FILE  # noqa: E402
from braintumor.export.model_contract import ModelContract  # noqa: E402
from braintumor.export.triton_config import TritonOptions, model_config  # noqa: E402
from braintumor.serving.grpc_server import GrpcServer  # noqa: E402
from braintumor.serving.settings import ServeSettings  # noqa: E402
from braintumor.serving.triton_embedded import EmbeddedTriton, free_port  # noqa: E402
from braintumor.train.preprocess import PreprocessConfig  # noqa: E402

pytestmark = pytest.mark.e2e

SIZE = 32
CLASSES = ("glioma", "meningioma", "pituitary", "no_tumor")
RETRIES = 2
TRITON_TIMEOUT_S = 1.0
SLEEP_LEVEL = 250  # the model sleeps longer than the gateway's Triton timeout

# The model answers an image of grey level L with the TritonError code named here (python backend's codes).
MODEL = textwrap.dedent(f'''
    import os
    import time

    import triton_python_backend_utils as pb_utils

    CODES = {{60: "UNAVAILABLE", 100: "INVALID_ARG", 140: "INTERNAL", 180: "UNKNOWN", 220: "NOT_FOUND",
             {SLEEP_LEVEL}: "INTERNAL"}}


    class TritonPythonModel:
        def initialize(self, args):
            self.calls = os.environ["BRAINTUMOR_TEST_CALLS"]

        def execute(self, requests):
            responses, levels = [], []
            for request in requests:
                image = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
                level = int(image[0, 0, image.shape[2] // 2, image.shape[3] // 2])  # the centre pixel
                levels.append(level)
                with open(self.calls, "a") as out:
                    out.write(f"{{level}}\\n")
                if level == {SLEEP_LEVEL}:
                    time.sleep({TRITON_TIMEOUT_S * 3})
                code = getattr(pb_utils.TritonError, CODES.get(level, "INTERNAL"))
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"scripted {{level}}", code)))
            with open(self.calls, "a") as out:  # the instance is free again: the test waits on this, not a sleep
                out.write("".join(f"done{{level}}\\n" for level in levels))
            return responses
''')

# Triton status seen by tritonclient, grey level that produces it, HTTP status, gRPC code, SDK class, SDK calls.
TABLE = [
    ("UNAVAILABLE", 60, 503, "UNAVAILABLE", UnavailableError, 1 + RETRIES),
    ("NOT_FOUND", 220, 503, "UNAVAILABLE", UnavailableError, 1 + RETRIES),
    ("INVALID_ARGUMENT", 100, 400, "INVALID_ARGUMENT", InvalidInputError, 1),
    ("INTERNAL", 140, 500, "INTERNAL", ServerError, 1),
    ("UNKNOWN", 180, 500, "INTERNAL", ServerError, 1),
    ("DEADLINE_EXCEEDED", SLEEP_LEVEL, 504, "DEADLINE_EXCEEDED", DeadlineExceededError, 1),
]


def _png(level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 40), level, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def scripted_triton(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("scripted_triton")
    calls = root / "calls.log"
    calls.touch()
    monkeypatch_module.setenv("BRAINTUMOR_TEST_CALLS", str(calls))  # inherited by Triton's python stub
    model = root / "repo" / DEFAULT_NAME
    (model / "1").mkdir(parents=True)
    (model / "1" / PYTHON_FILE).write_text(MODEL)
    params = ModelContract(CLASSES, PreprocessConfig(image_size=SIZE), cam_size=SIZE // 4).to_parameters()
    (model / CONFIG_FILE).write_text(model_config(DEFAULT_NAME, "python", SIZE, len(CLASSES), SIZE // 4,
                                                  options=TritonOptions(warmup="none"), parameters=params))
    triton = EmbeddedTriton(root / "repo", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                            address="127.0.0.1", startup_timeout=120)
    triton.start()
    try:
        yield triton, calls
    finally:
        triton.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def http_gateway(scripted_triton, tmp_path_factory, running_gateway):
    triton, _ = scripted_triton
    env = {"BRAINTUMOR_TRITON_TIMEOUT_S": str(TRITON_TIMEOUT_S)}
    with running_gateway(tmp_path_factory.mktemp("gateway"), triton, ready=False, **env) as gateway:
        yield gateway


async def _call_grpc(triton: EmbeddedTriton, image: bytes, caplog) -> Exception:
    settings = ServeSettings(triton_url=triton.grpc_url, triton_key=triton.client_key,
                             triton_timeout_s=TRITON_TIMEOUT_S)
    server = await GrpcServer.start(settings, 0, host="127.0.0.1", metrics_port=None)
    try:
        async with AsyncBrainTumorClient(f"127.0.0.1:{server.port}", "grpc", retries=RETRIES, timeout=30) as client:
            with caplog.at_level(logging.ERROR, logger="braintumor.serving.grpc"):
                with pytest.raises(Exception) as raised:
                    await client.analyze(image)
    finally:
        await server.stop(0)
    return raised.value


async def _call_http(url: str, image: bytes) -> Exception:
    async with AsyncBrainTumorClient(url, "http", retries=RETRIES, timeout=30) as client:
        with pytest.raises(Exception) as raised:
            await client.analyze(image)
    return raised.value


@pytest.mark.parametrize("triton_status, level, http_status, grpc_code, sdk_error, upstream_calls", TABLE,
                         ids=[row[0] for row in TABLE])
def test_triton_status_maps_to_one_error_on_both_doors(scripted_triton, http_gateway, caplog, triton_status, level,
                                                        http_status, grpc_code, sdk_error, upstream_calls):
    triton, calls = scripted_triton
    image = _png(level)

    def calls_now() -> int:
        return calls.read_text().split().count(str(level))

    def settle() -> None:
        """Until every call the model started has finished (the deadline row's outlives the caller's wait), so that
        the next call does not queue behind it."""
        deadline = time.monotonic() + 60
        while (words := calls.read_text().split()).count(f"done{level}") < words.count(str(level)):
            assert time.monotonic() < deadline, "the scripted model did not finish its calls"
            time.sleep(0.05)

    def tracebacks() -> int:
        return http_gateway.log.read_text(errors="replace").count("Traceback")

    before, logged_before = calls_now(), tracebacks()
    error = asyncio.run(_call_http(http_gateway.url, image))
    settle()
    assert type(error) is sdk_error, f"{error!r}"
    assert error.status == http_status
    assert calls_now() - before == upstream_calls  # retried only when unavailable
    assert (tracebacks() > logged_before) == (http_status == 500), "only a 500 is logged with its traceback"

    before = calls_now()
    caplog.clear()
    error = asyncio.run(_call_grpc(triton, image, caplog))
    settle()
    assert type(error) is sdk_error, f"{error!r}"
    assert error.code == grpc_code
    assert calls_now() - before == upstream_calls
    logged = [r for r in caplog.records if r.exc_info and r.name == "braintumor.serving.grpc"]
    assert bool(logged) == (http_status == 500), "only a 500 is logged with its traceback"
