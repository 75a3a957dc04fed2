"""The gRPC adapter against a scripted pipeline (no Triton): status mapping, deadlines, the stream window, auth and
health. The real pipeline behind the same server is covered in tests/integration/test_grpc_server.py."""

import asyncio
import logging

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_health.v1")

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from braintumor.clients.v1 import braintumor_pb2 as pb  # noqa: E402
from braintumor.clients.v1 import braintumor_pb2_grpc as pb_grpc  # noqa: E402
from braintumor.serving.errors import BadInput, Busy, Unavailable  # noqa: E402
from braintumor.serving.grpc_server import GrpcServer, message_limits  # noqa: E402
from braintumor.serving.postprocess import AnalysisResult  # noqa: E402
from braintumor.serving.settings import ServeSettings  # noqa: E402
from braintumor.serving.backend import ModelInfo  # noqa: E402
from braintumor.serving.request import AnalyzeOptions  # noqa: E402
from braintumor.export.model_contract import ModelContract  # noqa: E402
from braintumor.train.preprocess import PreprocessConfig  # noqa: E402

INFO = ModelInfo("toy", "3", ModelContract(("glioma", "meningioma", "pituitary", "no_tumor"),
                                           PreprocessConfig(image_size=32), cam_size=4), max_batch_size=8)


class ScriptedPipeline:
    """Image bytes are a script: b"sleep:S" waits S seconds, b"bug" raises a plain error, b"bad" / b"busy" /
    b"down" raise the matching ServingError; anything else answers label glioma."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.is_ready = False
        self.running = 0
        self.most_running = 0
        self.cancelled = 0
        self.mask_formats: list[str] = []  # what each analyze call was asked for

    async def ready(self) -> bool:
        return self.is_ready

    async def info(self) -> ModelInfo:
        return INFO

    async def analyze(self, data: bytes, options: AnalyzeOptions = AnalyzeOptions()) -> AnalysisResult:
        overlay, heatmap, mask_format = options.overlay, options.heatmap, options.mask_format
        self.mask_formats.append(mask_format)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if data.startswith(b"sleep:"):
                await asyncio.sleep(float(data[6:]))
            errors = {b"bad": BadInput("not a readable image; send a JPEG, PNG or DICOM slice"),
                      b"busy": Busy("too many"), b"down": Unavailable("Triton is not reachable")}
            if data in errors:
                raise errors[data]
            if data == b"bug":
                raise RuntimeError("a bug")
            rle = mask_format == "rle"
            return AnalysisResult("glioma", {c: 0.25 for c in INFO.classes}, False, [], 7, None, False, (5, 6),
                                  None if rle else b"mask", b"heat" if heatmap else None,
                                  b"overlay" if overlay else None, mask_rle={"size": [5, 6], "counts": "07"} if rle
                                  else None,
                                  model_name=INFO.name, model_version=INFO.version)  # stamped, as the pipeline does
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    async def close(self) -> None:
        pass


def _serve(test, **settings):
    """Run ``test(stub, channel, pipeline)`` against a server on a free port; the server is stopped afterwards."""
    settings = ServeSettings(**settings)
    pipeline = ScriptedPipeline(settings)

    async def go():
        server = await GrpcServer.start(settings, 0, host="127.0.0.1", metrics_port=None, pipeline=pipeline)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                return await test(pb_grpc.BrainTumorStub(channel), channel, pipeline)
        finally:
            await server.stop(0)

    return asyncio.run(go())


@pytest.mark.parametrize("image, code", [(b"bad", "INVALID_ARGUMENT"), (b"busy", "RESOURCE_EXHAUSTED"),
                                         (b"down", "UNAVAILABLE")])
def test_serving_errors_map_to_their_status(image, code):
    async def test(stub, _channel, _pipeline):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Analyze(pb.AnalyzeRequest(image=image), timeout=5)
        return info.value

    error = _serve(test)
    assert error.code() == grpc.StatusCode[code]


def test_unexpected_error_is_internal_and_the_server_keeps_running(caplog):
    async def test(stub, _channel, _pipeline):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Analyze(pb.AnalyzeRequest(image=b"bug", id="patient-file.dcm"), timeout=5)
        return info.value, await stub.Analyze(pb.AnalyzeRequest(image=b"ok", id="x"), timeout=5)

    with caplog.at_level(logging.ERROR, logger="braintumor.serving.grpc"):
        error, after = _serve(test)
    assert error.code() == grpc.StatusCode.INTERNAL and "a bug" not in error.details()
    assert after.label == "glioma" and after.id == "x"
    assert "Analyze failed" in caplog.text and "patient-file" not in caplog.text


def test_server_side_deadline_cancels_the_work():
    async def test(stub, _channel, pipeline):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Analyze(pb.AnalyzeRequest(image=b"sleep:30"), timeout=0.3)
        await asyncio.sleep(0.2)
        return info.value, pipeline.cancelled, pipeline.running

    error, cancelled, running = _serve(test)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cancelled == 1 and running == 0


def test_analyze_message_fields():
    async def test(stub, _channel, _pipeline):
        full = await stub.Analyze(pb.AnalyzeRequest(image=b"ok", overlay=True, heatmap=True, id="a"), timeout=5)
        plain = await stub.Analyze(pb.AnalyzeRequest(image=b"ok"), timeout=5)
        bare = await stub.Analyze(pb.AnalyzeRequest(image=b"ok", overlay=True, heatmap=True, skip_images=True),
                                  timeout=5)
        return full, plain, bare

    full, plain, bare = _serve(test)
    assert (full.id, full.label, full.tumor_area_px, full.image_height, full.image_width) == ("a", "glioma", 7, 5, 6)
    assert (full.mask_png, full.heatmap_png, full.overlay_png) == (b"mask", b"heat", b"overlay")
    assert not full.HasField("tumor_area_mm2") and not full.HasField("error")
    assert (full.model.name, full.model.version) == ("toy", "3")
    assert dict(full.probabilities) == {c: 0.25 for c in INFO.classes}
    assert (plain.mask_png, plain.heatmap_png, plain.overlay_png) == (b"mask", b"", b"")  # heatmap on demand
    assert (bare.mask_png, bare.heatmap_png, bare.overlay_png) == (b"", b"", b"")


def test_mask_format_reaches_the_pipeline_and_the_message():
    async def test(stub, _channel, pipeline):
        rle = await stub.Analyze(pb.AnalyzeRequest(image=b"ok", mask_format="rle"), timeout=5)
        png = await stub.Analyze(pb.AnalyzeRequest(image=b"ok", mask_format="png"), timeout=5)
        bare = await stub.Analyze(pb.AnalyzeRequest(image=b"ok", skip_images=True), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Analyze(pb.AnalyzeRequest(image=b"ok", mask_format="jpeg"), timeout=5)
        stream = [r async for r in stub.AnalyzeStream(iter([pb.AnalyzeRequest(image=b"ok", id="r", mask_format="rle"),
                                                             pb.AnalyzeRequest(image=b"ok", id="x", mask_format="x")]),
                                                       timeout=5)]
        return rle, png, bare, info.value, {r.id: r for r in stream}, pipeline.mask_formats

    rle, png, bare, error, stream, asked = _serve(test)
    assert rle.mask_png == b"" and (list(rle.mask_rle.size), rle.mask_rle.counts) == ([5, 6], "07")
    assert png.mask_png == b"mask" and not png.HasField("mask_rle")
    assert bare.mask_png == b"" and not bare.HasField("mask_rle")  # skip_images: the cheaper mask, not sent
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown mask_format 'jpeg'; use one of png, rle" in error.details()
    assert stream["r"].mask_rle.counts == "07" and not stream["r"].HasField("error")
    assert stream["x"].error.code == "INVALID_ARGUMENT" and "use one of png, rle" in stream["x"].error.message
    assert asked == ["rle", "png", "rle", "rle"]  # the refused ones never reached the pipeline


def test_stream_window_order_and_item_errors():
    requests = [pb.AnalyzeRequest(image=b"sleep:0.3", id="slow"), pb.AnalyzeRequest(image=b"bad", id="bad"),
                pb.AnalyzeRequest(image=b"bug", id="bug"), pb.AnalyzeRequest(image=b"sleep:0.05", id="a"),
                pb.AnalyzeRequest(image=b"sleep:0.05", id="b"), pb.AnalyzeRequest(image=b"ok", id="c")]

    async def test(stub, _channel, pipeline):
        return [r async for r in stub.AnalyzeStream(iter(requests), timeout=10)], pipeline.most_running

    responses, most_running = _serve(test, max_batch_images=2)
    by_id = {r.id: r for r in responses}
    assert len(responses) == 6 and set(by_id) == {r.id for r in requests}
    assert by_id["bad"].error.code == "INVALID_ARGUMENT" and "JPEG" in by_id["bad"].error.message
    assert by_id["bug"].error.code == "INTERNAL" and not by_id["bug"].label
    assert all(by_id[i].label == "glioma" and not by_id[i].HasField("error") for i in ("slow", "a", "b", "c"))
    assert most_running == 2  # concurrent, never over the window
    order = [r.id for r in responses]
    assert order.index("slow") > order.index("bad")  # written as they complete, not in request order


@pytest.mark.parametrize("metadata, ok", [
    ((), False), ((("x-api-key", "wrong"),), False), ((("authorization", "Basic s3cret"),), False),
    ((("x-api-key", "s3cret"),), True), ((("authorization", "Bearer s3cret"),), True)])
def test_api_key(metadata, ok):
    async def test(stub, channel, _pipeline):
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        try:
            await stub.Analyze(pb.AnalyzeRequest(image=b"ok"), metadata=metadata, timeout=5)
            unary = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            unary = exc.code()
        try:
            [r async for r in stub.AnalyzeStream(iter([pb.AnalyzeRequest(image=b"ok")]), metadata=metadata,
                                                 timeout=5)]
            stream = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            stream = exc.code()
        return health, unary, stream

    health, unary, stream = _serve(test, api_key="s3cret")
    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING  # open without the key
    expected = grpc.StatusCode.OK if ok else grpc.StatusCode.UNAUTHENTICATED
    assert unary == stream == expected


def test_every_configured_key_is_accepted(tmp_path):
    """BRAINTUMOR_API_KEY and each key of BRAINTUMOR_API_KEYS_FILE open the API; nothing else does."""
    keys = tmp_path / "keys"
    keys.write_text("alice:alice-key-0123456789\nbob:bob-key-0123456789ab\n")
    tried = [(("x-api-key", "s3cret"),), (("x-api-key", "alice-key-0123456789"),),
             (("authorization", "Bearer bob-key-0123456789ab"),), (("x-api-key", "alice-key-012345678"),),
             (("x-api-key", "alice"),), ()]

    async def test(stub, _channel, _pipeline):
        codes = []
        for metadata in tried:
            try:
                await stub.Analyze(pb.AnalyzeRequest(image=b"ok"), metadata=metadata, timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
        return codes

    ok, refused = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED
    assert _serve(test, api_key="s3cret", api_keys_file=str(keys)) == [ok, ok, ok, refused, refused, refused]
    assert _serve(test, api_keys_file=str(keys)) == [refused, ok, ok, refused, refused, refused]


def test_health_follows_pipeline_readiness():
    async def test(_stub, channel, pipeline):
        health = health_pb2_grpc.HealthStub(channel)

        async def status(service):
            return (await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status

        before = [await status(s) for s in ("", "braintumor.v1.BrainTumor")]
        pipeline.is_ready = True
        for _ in range(40):
            if await status("") == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.1)
        return before, [await status(s) for s in ("", "braintumor.v1.BrainTumor")]

    before, after = _serve(test)
    assert before == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
    assert after == [health_pb2.HealthCheckResponse.SERVING] * 2


def test_a_taken_port_fails_loudly():
    settings = ServeSettings()

    async def go():
        first = await GrpcServer.start(settings, 0, host="127.0.0.1", metrics_port=None,
                                       pipeline=ScriptedPipeline(settings))
        try:
            with pytest.raises(OSError, match="in use"):
                await GrpcServer.start(settings, first.port, host="127.0.0.1", metrics_port=None,
                                       pipeline=ScriptedPipeline(settings))
        finally:
            await first.stop(0)

    asyncio.run(go())


def test_message_limits_follow_the_body_limit():
    receive, send = message_limits(ServeSettings(max_body_bytes=1000))
    assert 1000 < receive <= 1000 + 64 * 1024 and send >= 4 * receive


def test_cli_options_have_help_and_key_env_is_checked(capsys, monkeypatch):
    from braintumor.serving.cli import build_parser, main

    sub = build_parser()._subparsers._group_actions[0].choices["grpc-server"]
    for action in sub._actions:
        assert action.dest == "help" or action.help, f"{action.option_strings} has no help"
    monkeypatch.delenv("NO_SUCH_KEY_VARIABLE", raising=False)
    assert main(["grpc-server", "--api-key-env", "NO_SUCH_KEY_VARIABLE"]) == 2
    assert "NO_SUCH_KEY_VARIABLE" in capsys.readouterr().err


def test_model_info_message_carries_the_fields_of_the_http_body():
    """serving/wire.py builds both: a field added to GET /model must reach GetModelInfo too (temperature is folded
    into the served model's probabilities and is HTTP-only, for information)."""
    from braintumor.serving.wire import model_info_message

    http = INFO.to_dict()
    message = model_info_message(INFO)
    assert set(http) - {"temperature"} == {f.name for f in pb.ModelInfo.DESCRIPTOR.fields}
    for name in set(http) - {"temperature"}:
        value = getattr(message, name)
        assert (list(value) if name == "classes" else value) == http[name] or (
            http[name] is None and not message.HasField(name)), name
