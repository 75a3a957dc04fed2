"""The gRPC front door: ``braintumor.v1.BrainTumor`` (clients/proto) over the one :class:`Pipeline`, plus the standard
health service, server reflection, optional API-key auth and Prometheus metrics on their own HTTP port.

    braintumor grpc-server --port 50051 --metrics-port 50052 --triton-url HOST:PORT

Statuses come from :class:`~.errors.ServingError.grpc_code` (the mapping the HTTP gateway uses too); a deadline
set by the caller bounds the pipeline call; anything unexpected is logged and answered INTERNAL, and the server
keeps running. AnalyzeStream runs up to ``max_batch_images`` images of one stream concurrently and writes each
answer when it is ready (see :meth:`BrainTumorServicer.AnalyzeStream`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..clients.v1 import braintumor_pb2 as pb
from ..clients.v1 import braintumor_pb2_grpc as pb_grpc
from .errors import DeadlineExceeded, ServingError, Unauthenticated
from .metrics import Metrics
from .pipeline import ExplainOptions, Pipeline
from .postprocess import AnalysisResult
from .settings import ServeSettings

log = logging.getLogger("braintumor.serving.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BrainTumor"].full_name  # "braintumor.v1.BrainTumor"
OPEN_SERVICES = (health.SERVICE_NAME, reflection.SERVICE_NAME)  # reachable without the API key
MESSAGE_MARGIN = 64 * 1024  # bytes allowed on top of max_body_bytes for the other fields of a request
RESPONSE_FACTOR = 4  # three PNGs of a JPEG-compressed slice can outweigh the request (documented in the proto)
HEALTH_INTERVAL_S = 1.0
STOP_GRACE_S = 10.0
AUTH_HELP = "missing or wrong API key: send it as metadata `x-api-key: KEY` or `authorization: Bearer KEY`"
INTERNAL_HELP = "internal error; the server logged it (no image data); please report it with the time of the call"


class BrainTumorServicer(pb_grpc.BrainTumorServicer):
    """Thin adapter: request message -> pipeline call (within the caller's deadline) -> response message."""

    def __init__(self, pipeline: Pipeline, metrics: Metrics) -> None:
        self.pipeline = pipeline
        self.metrics = metrics

    async def Analyze(self, request: pb.AnalyzeRequest, context) -> pb.AnalyzeResponse:
        async def work():
            result = await self.pipeline.analyze(request.image, overlay=_wants_overlay(request))
            return _analysis_message(result, await self.pipeline.info(), request)

        return await self._unary("Analyze", context, work)

    async def AnalyzeStream(self, requests: AsyncIterator[pb.AnalyzeRequest], context):
        """Up to ``max_batch_images`` images in flight; each response is written as soon as it is ready.

        Why not group the requests into analyze_many calls: a group answers only when its slowest image is done,
        and the requests of a stream arrive one by one, so grouping would add waiting; concurrent calls reach Triton
        at the same time and its dynamic batcher groups them anyway. When the window is full the server stops
        reading, so HTTP/2 flow control slows the sender down instead of the server queueing without bound.
        A failed image becomes that image's response with ``error`` set; the stream carries on.
        """
        start = time.perf_counter()
        status = "CANCELLED"
        window = asyncio.Semaphore(self.pipeline.settings.max_batch_images)
        answers: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(self._read_stream(requests, context, window, answers))
        try:
            while (answer := await answers.get()) is not _END:
                await context.write(answer)
            await reader  # a read failure surfaces here
            status = "OK"
        except Exception:  # noqa: BLE001 - logged, answered INTERNAL, the server keeps running
            log.exception("AnalyzeStream failed")
            status = "INTERNAL"
        finally:
            reader.cancel()
            self.metrics.observe_request("AnalyzeStream", _gone(context) if status == "CANCELLED" else status,
                                         time.perf_counter() - start)
        if status == "INTERNAL":
            await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_HELP)

    async def Explain(self, request: pb.ExplainRequest, context) -> pb.ExplainResponse:
        options = ExplainOptions(method=request.method or "gradcam", target=request.target or None,
                                 num_samples=request.num_samples or None, max_evals=request.max_evals or None)

        async def work():
            explanation = await self.pipeline.explain(request.image, options)
            return _explanation_message(explanation, await self.pipeline.info())

        return await self._unary("Explain", context, work)

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfo:
        async def work():
            return _model_info_message(await self.pipeline.info())

        return await self._unary("GetModelInfo", context, work)

    # -- plumbing ------------------------------------------------------------------------------------------------

    async def _unary(self, rpc: str, context, work: Callable[[], Awaitable]):
        """Run ``work`` within the deadline; count it; abort with the error's status if it failed."""
        start = time.perf_counter()
        status = "CANCELLED"  # stays so only if the caller went away (the task is cancelled)
        error = None
        try:
            response = await _within_deadline(context, work())
            status = "OK"
            return response
        except ServingError as exc:
            if exc.http_status == 500:  # an upstream bug (UpstreamError): its traceback, Triton's error chained
                log.exception("%s: %s", rpc, exc.message)
            error = exc
        except Exception:  # noqa: BLE001 - logged, answered INTERNAL, the server keeps running
            log.exception("%s failed", rpc)
            error = ServingError(INTERNAL_HELP)
        finally:
            if error is not None:
                status = error.grpc_code
                self.metrics.observe_error(error)
            elif status == "CANCELLED":
                status = _gone(context)
            self.metrics.observe_request(rpc, status, time.perf_counter() - start)
        await context.abort(grpc.StatusCode[error.grpc_code], error.message)

    async def _read_stream(self, requests, context, window: asyncio.Semaphore, answers: asyncio.Queue) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            async for request in requests:
                await window.acquire()
                task = asyncio.create_task(self._stream_item(request, context, window, answers))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks))
        finally:
            for task in list(tasks):  # only on failure or cancellation: the stream is over, drop its work
                task.cancel()
            answers.put_nowait(_END)

    async def _stream_item(self, request: pb.AnalyzeRequest, context, window: asyncio.Semaphore,
                           answers: asyncio.Queue) -> None:
        try:
            try:
                result = await _within_deadline(
                    context, self.pipeline.analyze(request.image, overlay=_wants_overlay(request)))
                answer = _analysis_message(result, await self.pipeline.info(), request)
            except ServingError as exc:
                if exc.http_status == 500:
                    log.exception("AnalyzeStream item: %s", exc.message)
                self.metrics.observe_error(exc)
                answer = _error_message(request, exc.grpc_code, exc.message)
            except Exception:  # noqa: BLE001 - one image's bug must not end the others' stream
                log.exception("AnalyzeStream item failed")
                self.metrics.observe_error(ServingError(INTERNAL_HELP))
                answer = _error_message(request, "INTERNAL", INTERNAL_HELP)
        finally:
            window.release()
        answers.put_nowait(answer)


_END = object()  # end-of-stream marker in the answers queue


async def _within_deadline(context, awaitable: Awaitable):
    """Await ``awaitable``, cancelling it when the caller's deadline passes (DeadlineExceeded)."""
    remaining = context.time_remaining()
    if remaining is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, timeout=max(float(remaining), 0.0))
    except asyncio.TimeoutError as exc:
        raise DeadlineExceeded("the call's deadline passed before the answer was ready; set a longer deadline "
                               "(LIME and SHAP explanations can take minutes on a CPU host)") from exc


def _gone(context) -> str:
    """Status of a call whose task was cancelled: its deadline passed, or the caller cancelled it."""
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


# -- messages ------------------------------------------------------------------------------------------------------

def _wants_overlay(request: pb.AnalyzeRequest) -> bool:
    return request.overlay and not request.skip_images


def _model_ref(info) -> pb.ModelRef:
    return pb.ModelRef(name=info.name, version=info.version)


def _analysis_message(result: AnalysisResult, info, request: pb.AnalyzeRequest) -> pb.AnalyzeResponse:
    message = pb.AnalyzeResponse(
        id=request.id,
        label=result.label,
        probabilities=result.probabilities,
        refer=result.refer,
        refer_reason=result.refer_reason,
        tumor_area_px=result.tumor_area_px,
        tumor_area_mm2=result.tumor_area_mm2,  # None leaves the optional field unset
        mask_label_disagree=result.mask_label_disagree,
        image_height=result.original_shape[0],
        image_width=result.original_shape[1],
        model=_model_ref(info),
    )
    if not request.skip_images:
        message.mask_png = result.mask_png
        message.heatmap_png = result.heatmap_png
        message.overlay_png = result.overlay_png or b""
    return message


def _error_message(request: pb.AnalyzeRequest, code: str, text: str) -> pb.AnalyzeResponse:
    return pb.AnalyzeResponse(id=request.id, error=pb.Error(code=code, message=text))


def _explanation_message(explanation, info) -> pb.ExplainResponse:
    return pb.ExplainResponse(
        method=explanation.method,
        target=explanation.target,
        label=explanation.label,
        probabilities=explanation.probabilities,
        num_samples=explanation.num_samples or 0,
        seconds=float(explanation.seconds),
        cached=bool(explanation.cached),
        image_height=explanation.original_shape[0],
        image_width=explanation.original_shape[1],
        heatmap_png=explanation.heatmap_png,
        overlay_png=explanation.overlay_png,
        model=_model_ref(info),
    )


def _model_info_message(info) -> pb.ModelInfo:
    d = info.to_dict()
    return pb.ModelInfo(name=d["name"], version=d["version"], classes=d["classes"],
                        refer_threshold=d["refer_threshold"], image_size=d["image_size"], geometry=d["geometry"])


# -- authentication ------------------------------------------------------------------------------------------------

class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Every method except health and reflection needs the key (``x-api-key`` or ``authorization: Bearer``)."""

    def __init__(self, key: str, metrics: Metrics | None = None) -> None:
        self._key = key.encode()
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method  # "/package.Service/Method"
        if handler is None or method.split("/")[1] in OPEN_SERVICES:
            return handler
        if self._authorised(handler_call_details.invocation_metadata):
            return handler
        return _refusing(handler, method.rsplit("/", 1)[-1], self._metrics)

    def _authorised(self, metadata) -> bool:
        given = ""
        for key, value in metadata or ():
            if isinstance(value, bytes):  # only "-bin" keys carry bytes
                continue
            if key == "x-api-key":
                given = value
                break
            if key == "authorization" and value[:7].lower() == "bearer ":
                given = value[7:].strip()
        return bool(given) and hmac.compare_digest(given.encode(), self._key)


def _refusing(handler: grpc.RpcMethodHandler, rpc: str, metrics: Metrics | None) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED without running it."""

    async def refuse(_request, context):
        if metrics is not None:
            metrics.observe_error(Unauthenticated(AUTH_HELP))
            metrics.observe_request(rpc, "UNAUTHENTICATED", 0.0)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_HELP)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


# -- the server ----------------------------------------------------------------------------------------------------

def message_limits(settings: ServeSettings) -> tuple[int, int]:
    """(receive, send) message size limits in bytes."""
    receive = settings.max_body_bytes + MESSAGE_MARGIN
    return receive, RESPONSE_FACTOR * receive


@dataclass
class GrpcServer:
    """The running server, its pipeline, health updater and metrics endpoint. Build with :meth:`start`."""

    server: grpc.aio.Server
    pipeline: Pipeline
    health_servicer: health.aio.HealthServicer
    port: int
    metrics_port: int | None
    _health_task: asyncio.Task
    _metrics_http: object | None

    @classmethod
    async def start(cls, settings: ServeSettings, port: int, host: str = "0.0.0.0",
                    metrics_port: int | None = 50052, pipeline: Pipeline | None = None) -> GrpcServer:
        """Bind and start; ``port=0`` picks a free port (see ``.port``); ``metrics_port=None`` serves no metrics.

        ``pipeline`` replaces the one built from ``settings`` (tests script it); the server closes it on stop.
        """
        import prometheus_client

        registry = _registry()
        metrics = Metrics(prometheus_client, "grpc", registry=registry)
        pipeline = pipeline or Pipeline.from_settings(settings, metrics)
        receive, send = message_limits(settings)
        interceptors = [ApiKeyInterceptor(settings.api_key, metrics)] if settings.api_key else []
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", receive),
            ("grpc.max_send_message_length", send),
            ("grpc.so_reuseport", 0),  # a port already taken fails loudly instead of being shared
        ])
        pb_grpc.add_BrainTumorServicer_to_server(BrainTumorServicer(pipeline, metrics), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((SERVICE_NAME, *OPEN_SERVICES), server)
        for service in ("", SERVICE_NAME):  # the servicer starts "" as SERVING; not before Triton says so
            await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {host}:{port} ({exc}); is the port in use?") from exc
        if not bound:
            raise OSError(f"cannot listen on {host}:{port}; is the port in use?")
        metrics_http = None
        if metrics_port is not None:
            metrics_http, _thread = prometheus_client.start_http_server(metrics_port, addr=host, registry=registry)
        await server.start()
        task = asyncio.create_task(_update_health(pipeline, health_servicer), name="grpc-health")
        log.info("gRPC API listening on %s:%d (%s, health, reflection%s); metrics on port %s", host, bound,
                 SERVICE_NAME, ", API key required" if settings.api_key else "", metrics_port)
        return cls(server, pipeline, health_servicer, bound, metrics_port, task, metrics_http)

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        """NOT_SERVING first (balancers drain), then up to ``grace`` s for calls in flight, then release all."""
        self._health_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._health_task
        await self.health_servicer.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.pipeline.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


async def _update_health(pipeline: Pipeline, servicer, interval: float = HEALTH_INTERVAL_S) -> None:
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    last = None
    while True:
        try:
            ready = await pipeline.ready()
        except Exception:  # noqa: BLE001 - a failing check means "not ready", and the loop goes on
            log.exception("readiness check failed")
            ready = False
        if ready != last:
            log.info("Triton %s: health %s", "ready" if ready else "not ready", "SERVING" if ready else "NOT_SERVING")
            last = ready
        for service in ("", SERVICE_NAME):
            await servicer.set(service, serving if ready else not_serving)
        await asyncio.sleep(interval)


def _registry():
    """A registry per server (tests start several in one process) with the default process/platform/GC metrics."""
    from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


async def serve_grpc(settings: ServeSettings, port: int, host: str = "0.0.0.0", metrics_port: int | None = 50052,
                     ready_event=None, stop_event: asyncio.Event | None = None, grace: float = STOP_GRACE_S) -> None:
    """Serve until SIGTERM/SIGINT (main thread) or ``stop_event``; then stop gracefully.

    ``ready_event`` (a threading.Event or asyncio.Event) is set once the server listens; it does not wait for
    Triton (the health service says when the model is ready).
    """
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    running = None
    try:
        if threading.current_thread() is threading.main_thread():  # signal handlers only work there
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        running = await GrpcServer.start(settings, port, host=host, metrics_port=metrics_port)
        if ready_event is not None:
            ready_event.set()
        await stop.wait()
        log.info("stopping the gRPC API (up to %.0f s for calls in flight)", grace)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if running is not None:
            await running.stop(grace)
