"""The gRPC side of the SDK: one ``grpc.aio`` channel per client object, the ``braintumor.v1`` calls, the standard
health check, and :class:`AnalyzeStream`, which feeds one bidirectional stream and hands each answer back by id."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from .errors import BrainTumorError, ServerError, UnavailableError, grpc_error
from .masks import requested
from .results import Analysis, Explanation, Health
from .v1 import braintumor_pb2 as pb
from .v1 import braintumor_pb2_grpc as pb_grpc

API_KEY_METADATA = "x-api-key"  # serving/grpc_server.py also accepts `authorization: Bearer KEY`
DEFAULT_PORT = 50051
# Three PNGs of a large slice can outweigh the 20 MiB request limit; the proto asks for at least 4x that.
MAX_RECEIVE_BYTES = 128 * 1024 * 1024
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = 1  # grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING
PROBE_TIMEOUT_S = 5.0
CLOSE_GRACE_S = 5.0  # how long a finished stream may take to close before it is cancelled
LOST_STATUS = "Internal error from Core"  # grpc.aio's message when a write fails after the server ended the call


def normalise_target(url: str) -> tuple[str, bool]:
    """``(host:port, secure)`` from ``host:port``, ``host`` or a URL (``grpc://``, ``http://``; ``grpcs://``,
    ``https://`` mean TLS)."""
    url = url.strip().rstrip("/")
    secure = url.startswith(("grpcs://", "https://"))
    target = url.split("://", 1)[1] if "://" in url else url
    target = target.split("/", 1)[0]
    if not target.rsplit("]", 1)[-1].count(":"):  # no port (an IPv6 literal is bracketed)
        target = f"{target}:{443 if secure else DEFAULT_PORT}"
    return target, secure


def rpc_error(exc: grpc.RpcError) -> BrainTumorError:
    code = exc.code()
    return grpc_error(code.name if code is not None else "UNKNOWN", exc.details() or "")


def _health_status(data: bytes) -> int:
    """The ``status`` field (1, varint) of a serialised ``HealthCheckResponse``; 0 (UNKNOWN) when absent.

    Decoded by hand so the client needs no grpcio-health-checking: the message has this one small field."""
    if len(data) >= 2 and data[0] == 0x08 and data[1] < 0x80:
        return data[1]
    return 0


class GrpcTransport:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.target, self.secure = normalise_target(url)
        self.metadata = ((API_KEY_METADATA, api_key),) if api_key else ()
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.BrainTumorStub | None = None

    @property
    def stub(self) -> pb_grpc.BrainTumorStub:
        # Made on first use, inside the running event loop (a grpc.aio channel belongs to the loop that made it).
        if self._stub is None:
            options = [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                       # Reconnect about as fast as the SDK retries (gRPC's default waits 1 s, then 1.6x more).
                       ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                       ("grpc.max_reconnect_backoff_ms", 5000)]
            if self.secure:
                self._channel = grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials(), options=options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options=options)
            self._stub = pb_grpc.BrainTumorStub(self._channel)
        return self._stub

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def _call(self, method, request, timeout: float):
        try:
            return await method(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from None

    async def analyze(self, data: bytes, overlay: bool, timeout: float, heatmap: bool = False,
                      mask_format: str = "png", dicom: bool = False) -> Analysis:
        request = pb.AnalyzeRequest(image=data, overlay=overlay, heatmap=heatmap, mask_format=requested(mask_format),
                                    dicom=dicom)
        response = await self._call(self.stub.Analyze, request, timeout)
        return Analysis.from_message(response)

    async def explain(self, data: bytes, timeout: float, method: str, target: str | None = None,
                      num_samples: int | None = None, max_evals: int | None = None) -> Explanation:
        request = pb.ExplainRequest(image=data, method=method, target=target or "", num_samples=num_samples or 0,
                                    max_evals=max_evals or 0)
        return Explanation.from_message(await self._call(self.stub.Explain, request, timeout))

    async def model(self, timeout: float) -> dict:
        info = await self._call(self.stub.GetModelInfo, pb.ModelInfoRequest(), timeout)
        return {"name": info.name, "version": info.version, "classes": list(info.classes),
                "refer_threshold": info.refer_threshold if info.HasField("refer_threshold") else None,
                "disagree_min_area": info.disagree_min_area if info.HasField("disagree_min_area") else None,
                "ood_threshold": info.ood_threshold if info.HasField("ood_threshold") else None,
                "image_size": info.image_size, "geometry": info.geometry}

    async def health(self, timeout: float) -> Health:
        timeout = min(timeout, PROBE_TIMEOUT_S)
        self.stub  # noqa: B018 - makes the channel
        check = self._channel.unary_unary(HEALTH_CHECK, request_serializer=None, response_deserializer=None)
        try:
            status = _health_status(await check(b"", timeout=timeout))  # service "" = the whole server
        except grpc.RpcError as exc:  # unreachable: not live; any other answer (no health service): live
            live = exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            return Health(live=live, ready=False)
        if status != SERVING:
            return Health(live=True, ready=False)
        try:
            model = await self.model(timeout)
        except BrainTumorError:  # e.g. an API key the health service did not need
            model = None
        return Health(live=True, ready=True, model=model)

    def stream(self, overlay: bool, retries: int, backoff: Callable[[int], float], *,
               heatmap: bool = False, mask_format: str = "png") -> AnalyzeStream:
        return AnalyzeStream(self, overlay, retries, backoff, heatmap=heatmap, mask_format=mask_format)


_CLOSE = object()  # ends the request side of a stream


class AnalyzeStream:
    """One ``AnalyzeStream`` call shared by many images: :meth:`submit` returns a future for the image's answer
    (an :class:`Analysis` or a :class:`BrainTumorError`, never raised). Answers come back in any order and are
    matched by id. An image answered UNAVAILABLE is sent again after a backoff (at most ``retries`` times); a
    stream that breaks with UNAVAILABLE is reopened and its unanswered images resent; any other stream failure
    becomes every unanswered image's error."""

    def __init__(self, transport: GrpcTransport, overlay: bool, retries: int,
                 backoff: Callable[[int], float], *, heatmap: bool = False, mask_format: str = "png") -> None:
        self._transport = transport
        self._overlay = overlay
        self._heatmap = heatmap
        self._mask_format = requested(mask_format)
        self._retries = retries
        self._backoff = backoff
        self._queue: asyncio.Queue = asyncio.Queue()
        self._waiting: dict[str, list] = {}  # id -> [future, request, tries]
        self._next_id = 0
        self._input_closed = False
        self._failed: BrainTumorError | None = None
        self._runner: asyncio.Task | None = None

    def submit(self, data: bytes) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if self._failed is not None:
            future.set_result(self._failed)
            return future
        key = str(self._next_id)
        self._next_id += 1
        request = pb.AnalyzeRequest(image=data, overlay=self._overlay, heatmap=self._heatmap,
                                    mask_format=self._mask_format, id=key)
        self._waiting[key] = [future, request, 0]
        self._queue.put_nowait(key)
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="braintumor-analyze-stream")
        return future

    def close_input(self) -> None:
        """No more images: the request side closes once every submitted image has its answer."""
        self._input_closed = True
        self._close_if_done()

    async def aclose(self) -> None:
        """End the stream: gracefully when every image was answered (the server closes its side right after ours),
        else by cancelling it (the caller stopped early)."""
        if self._runner is not None and self._input_closed and not self._waiting:
            try:
                await asyncio.wait_for(asyncio.shield(self._runner), CLOSE_GRACE_S)
            except (asyncio.TimeoutError, grpc.RpcError):
                pass
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
        self._fail_all(ServerError("the stream was closed before this image was answered", code="CANCELLED"))

    def _close_if_done(self) -> None:
        if self._input_closed and not self._waiting:
            self._queue.put_nowait(_CLOSE)

    async def _requests(self, queue: asyncio.Queue):
        while (key := await queue.get()) is not _CLOSE:
            entry = self._waiting.get(key)
            if entry is not None:  # a resent image may have been answered in the meantime
                yield entry[1]

    async def _run(self) -> None:
        reopened = 0
        while True:
            call = self._transport.stub.AnalyzeStream(self._requests(self._queue), metadata=self._transport.metadata)
            try:
                async for response in call:
                    reopened = 0
                    self._answer(response)
            except grpc.RpcError as exc:
                error = await self._status_of(exc)
            except asyncio.CancelledError:
                call.cancel()
                raise
            else:
                if self._waiting or not self._input_closed:
                    self._failed = ServerError("the server closed the stream before answering every image",
                                               code="INTERNAL")
                    self._fail_all(self._failed)
                return
            if isinstance(error, UnavailableError) and reopened < self._retries:
                reopened += 1
                await asyncio.sleep(self._backoff(reopened))
                self._requeue_all()
                continue
            self._failed = error
            self._fail_all(error)
            return

    async def _status_of(self, exc: grpc.RpcError) -> BrainTumorError:
        """The stream's error. grpc.aio loses the server's status when the server ends the stream while the client
        is still writing (grpc/grpc#36066: INTERNAL "Internal error from Core" instead of, say, UNAUTHENTICATED), so
        then a unary call with the same metadata asks again; if that succeeds the break is treated as transient."""
        error = rpc_error(exc)
        if error.code != "INTERNAL" or error.detail != LOST_STATUS:
            return error
        try:
            await self._transport.model(PROBE_TIMEOUT_S)
        except BrainTumorError as probed:
            return probed
        return UnavailableError(f"the stream broke ({error.detail}); the server answers again", code="UNAVAILABLE")

    def _answer(self, response: pb.AnalyzeResponse) -> None:
        entry = self._waiting.get(response.id)
        if entry is None:
            return  # an answer to a resent copy that was already answered
        if not response.HasField("error"):
            self._finish(response.id, Analysis.from_message(response))
            return
        error = grpc_error(response.error.code, response.error.message)
        if isinstance(error, UnavailableError) and entry[2] < self._retries:
            entry[2] += 1
            asyncio.get_running_loop().call_later(self._backoff(entry[2]), self._resend, response.id)
            return
        self._finish(response.id, error)

    def _finish(self, key: str, result) -> None:
        future = self._waiting.pop(key)[0]
        if not future.done():
            future.set_result(result)
        self._close_if_done()

    def _resend(self, key: str) -> None:
        self._queue.put_nowait(key)  # the queue of the stream open now

    def _requeue_all(self) -> None:
        """A fresh queue for the next stream, holding every unanswered image; the old stream's reader ends."""
        old, self._queue = self._queue, asyncio.Queue()
        old.put_nowait(_CLOSE)
        for key in sorted(self._waiting, key=int):
            self._queue.put_nowait(key)
        self._close_if_done()

    def _fail_all(self, error: BrainTumorError) -> None:
        for key in list(self._waiting):
            self._finish(key, error)
