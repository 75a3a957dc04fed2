"""The gRPC servicer of ``braintumor.v1.BrainTumor``: request message -> pipeline call within the caller's deadline ->
response message (built in :mod:`.wire`). Statuses come from :class:`~.errors.ServingError.grpc_code`; anything
unexpected is logged and answered INTERNAL, and the server keeps running."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from ..clients.v1 import braintumor_pb2 as pb
from ..clients.v1 import braintumor_pb2_grpc as pb_grpc
from .errors import DeadlineExceeded, ServingError
from .metrics import Metrics
from .pipeline import Pipeline
from .request import AnalyzeOptions, ExplainOptions
from .wire import analysis_message, error_message, explanation_message, model_info_message

log = logging.getLogger("braintumor.serving.grpc")

INTERNAL_HELP = "internal error; the server logged it (no image data); please report it with the time of the call"


class BrainTumorServicer(pb_grpc.BrainTumorServicer):
    """Thin adapter: request message -> pipeline call (within the caller's deadline) -> response message."""

    def __init__(self, pipeline: Pipeline, metrics: Metrics) -> None:
        self.pipeline = pipeline
        self.metrics = metrics

    async def Analyze(self, request: pb.AnalyzeRequest, context) -> pb.AnalyzeResponse:
        async def work():
            result = await self.pipeline.analyze(request.image, analyze_options(request))
            return analysis_message(result, request)

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
            return explanation_message(explanation)

        return await self._unary("Explain", context, work)

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfo:
        async def work():
            return model_info_message(await self.pipeline.info())

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
        if error.retry_after_s:  # as HTTP's Retry-After; grpc-retry-pushback-ms is what gRPC retries read
            context.set_trailing_metadata((("retry-after", str(error.retry_after_s)),
                                           ("grpc-retry-pushback-ms", str(1000 * error.retry_after_s))))
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
                    context, self.pipeline.analyze(request.image, analyze_options(request)))
                answer = analysis_message(result, request)
            except ServingError as exc:
                if exc.http_status == 500:
                    log.exception("AnalyzeStream item: %s", exc.message)
                self.metrics.observe_error(exc)
                answer = error_message(request, exc)
            except Exception:  # noqa: BLE001 - one image's bug must not end the others' stream
                log.exception("AnalyzeStream item failed")
                error = ServingError(INTERNAL_HELP)
                self.metrics.observe_error(error)
                answer = error_message(request, error)
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


def analyze_options(request: pb.AnalyzeRequest) -> AnalyzeOptions:
    """The request's options, checked once (BadInput for an unknown mask format): no PNG with ``skip_images``, which
    the answer would leave out anyway, and the mask then as RLE, the cheaper of the two to make."""
    options = AnalyzeOptions(request.heatmap, request.overlay, request.mask_format, request.dicom)
    if request.skip_images:
        return AnalyzeOptions(heatmap=False, overlay=False, mask_format="rle")
    return options
