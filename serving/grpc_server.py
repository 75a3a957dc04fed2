"""The gRPC front door's lifecycle: ``braintumor.v1.BrainTumor`` (:mod:`.grpc_servicer`) over the one
:class:`Pipeline`, plus the standard health service (following Triton's readiness), server reflection, optional
API-key auth (:mod:`.grpc_auth`), message size limits, Prometheus metrics on their own HTTP port, graceful stop.

    braintumor grpc-server --port 50051 --metrics-port 50052 --triton-url HOST:PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..clients.v1 import braintumor_pb2 as pb
from ..clients.v1 import braintumor_pb2_grpc as pb_grpc
from .grpc_auth import OPEN_SERVICES, ApiKeyInterceptor
from .grpc_servicer import BrainTumorServicer
from .metrics import Metrics
from .pipeline import Pipeline
from .settings import ServeSettings

log = logging.getLogger("braintumor.serving.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BrainTumor"].full_name  # "braintumor.v1.BrainTumor"
MESSAGE_MARGIN = 64 * 1024  # bytes allowed on top of max_body_bytes for the other fields of a request
RESPONSE_FACTOR = 4  # three PNGs of a JPEG-compressed slice can outweigh the request (documented in the proto)
HEALTH_INTERVAL_S = 1.0
STOP_GRACE_S = 10.0


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
        keys = settings.api_keys()
        interceptors = [ApiKeyInterceptor(keys, metrics)] if keys else []
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
                 SERVICE_NAME, f", {len(keys)} API key(s)" if keys else "", metrics_port)
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
            log.info("model %s: health %s", "ready" if ready else "not ready", "SERVING" if ready else "NOT_SERVING")
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
