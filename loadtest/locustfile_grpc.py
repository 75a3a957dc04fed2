"""Locust load test of the gRPC API (``braintumor.v1.BrainTumor``): a weighted mix of Analyze and Explain.

    locust -f loadtest/locustfile_grpc.py --host localhost:50051                            (web UI on :8089)
    locust -f loadtest/locustfile_grpc.py --host localhost:50051 --headless -u 8 -r 2 -t 30s
    braintumor loadtest --target grpc --url localhost:50051 --users 8 --duration 30s --out runs/load

Mix per user (weights): Analyze 20, Explain gradcam 4, Explain lime 1 (small num_samples). Each call has a deadline
and is reported to locust as request type ``grpc`` under the RPC's name; a non-OK status is a failure carrying the
status code and the server's message. Same environment variables as locustfile_http.py (images, API key sent as
``x-api-key`` metadata, shape, user rate, cache bust, heatmap, mask format).

grpcio runs its own threads, which gevent (locust) does not see: ``init_gevent()`` below makes grpcio cooperate,
and must run before any channel exists. Each user closes its channel in ``on_stop``; a channel left open makes
locust hang after its summary and ignore SIGTERM (so run it under a timeout in CI, as ``braintumor loadtest`` does).
"""

from __future__ import annotations

import os
import random
import sys
import time

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, events, task
from locust_common import CACHE_BUST, HEATMAP, MASK_FORMAT, pacing
from payloads import PayloadError, load_payloads, unique_bytes
from shapes import SHAPE_ENV, locust_shape

grpc_gevent.init_gevent()

# After init_gevent, as grpc's gevent support asks (nothing of grpc may run before it).
from braintumor.clients.v1 import braintumor_pb2 as pb
from braintumor.clients.v1 import braintumor_pb2_grpc as pb_grpc

try:
    PAYLOADS = load_payloads()
except PayloadError as exc:
    sys.exit(f"locustfile_grpc: {exc}")

LIME_SAMPLES = 20
DEADLINE_S = {"Analyze": 30.0, "Explain gradcam": 30.0, "Explain lime": 120.0}
MAX_MESSAGE = 80 * 1024 * 1024  # responses carry PNGs; the proto asks clients for 4x the 20 MiB request limit

if os.environ.get(SHAPE_ENV):
    LoadShape = locust_shape(os.environ[SHAPE_ENV])


def grpc_target(host: str) -> str:
    """``host:port`` from locust's --host, which may carry a scheme (``grpc://``, ``http://``) or a trailing slash."""
    target = host.split("://", 1)[-1].rstrip("/")
    if not target:
        raise ValueError("no gRPC target: pass --host HOST:PORT (e.g. localhost:50051)")
    return target


class GrpcApiUser(User):
    wait_time = pacing()
    host = "localhost:50051"

    def on_start(self) -> None:
        self.rng = random.Random()
        self.channel = grpc.insecure_channel(grpc_target(self.host), options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)])
        self.stub = pb_grpc.BrainTumorStub(self.channel)
        key = os.environ.get("BRAINTUMOR_API_KEY")
        self.metadata = (("x-api-key", key),) if key else ()

    def on_stop(self) -> None:
        self.channel.close()

    def _call(self, name: str, method, request) -> None:
        start = time.perf_counter()
        length, error = 0, None
        try:
            response = method(request, timeout=DEADLINE_S[name], metadata=self.metadata)
            length = response.ByteSize()
        except grpc.RpcError as exc:
            error = RuntimeError(f"{exc.code().name}: {exc.details()}")  # the message locust groups failures by
        self.environment.events.request.fire(request_type="grpc", name=name,
                                             response_time=(time.perf_counter() - start) * 1e3,
                                             response_length=length, exception=error, context={})

    def _image(self, fresh: bool) -> bytes:
        payload = self.rng.choice(PAYLOADS)
        return unique_bytes(payload, self.rng) if fresh and CACHE_BUST else payload.data

    @task(20)
    def analyze(self) -> None:
        self._call("Analyze", self.stub.Analyze,
                   pb.AnalyzeRequest(image=self._image(False), id="load", heatmap=HEATMAP,
                                     mask_format="" if MASK_FORMAT == "png" else MASK_FORMAT))

    @task(4)
    def explain_gradcam(self) -> None:
        self._call("Explain gradcam", self.stub.Explain, pb.ExplainRequest(image=self._image(True), method="gradcam"))

    @task(1)
    def explain_lime(self) -> None:
        self._call("Explain lime", self.stub.Explain,
                   pb.ExplainRequest(image=self._image(True), method="lime", num_samples=LIME_SAMPLES))
