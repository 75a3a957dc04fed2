"""The asyncio client: :class:`AsyncBrainTumorClient` over gRPC or HTTP, with bounded retries on UNAVAILABLE / 503 /
connection refused only, ordered ``analyze_many`` and explanation jobs. :class:`~.client.BrainTumorClient` is this
client run on a private event loop."""

from __future__ import annotations

import asyncio
import collections
import random
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, stop_before_delay

from ._grpc import GrpcTransport
from ._http import HttpTransport
from ._images import Image, image_bytes
from .errors import BrainTumorError, DeadlineExceededError, InvalidInputError, UnavailableError
from .masks import check_mask_format
from .results import Analysis, Explanation, Health

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:50051", "http": "http://localhost:3000"}
ONE_REQUEST_METHODS = ("gradcam",)  # over HTTP one POST /explain; lime and shap go through submit + poll
BACKOFF_INITIAL_S = 0.2  # first retry wait; doubles each time, with jitter
BACKOFF_MAX_S = 5.0
POLL_INITIAL_S = 0.1  # explain task polling: starts fast (cached results are instant), slows down to POLL_MAX_S
POLL_MAX_S = 0.5  # a status poll costs ~20 ms on the server; a coarser cap added up to 1.7 s to a 3 s LIME
PENDING_STATES = ("in_progress", "pending")
LOCAL_JOB_BUDGET_S = 24 * 3600.0  # a gRPC explain job has no deadline of its own; result(timeout) bounds waits


class AsyncBrainTumorClient:
    """Talks to a braintumor server (``braintumor serve``) over gRPC (default) or HTTP.

    ``url``: ``host:port`` or ``http://host:port`` for either protocol (default ``localhost:50051`` for gRPC,
    ``http://localhost:3000`` for HTTP); ``api_key``: sent as ``x-api-key``; ``timeout``: seconds a call may take in
    all, retries included; ``retries``: how many times a call is repeated after UNAVAILABLE / 502 / 503 / connection
    refused (never after any other error). ``http_transport``: an httpx transport to use (proxies, tests).

    Errors are :mod:`braintumor.clients.errors` exceptions carrying the server's message. Bad local input raises
    before anything is sent: ``FileNotFoundError`` naming a missing path, ``ValueError`` for an unusable array.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 3, *,
                 http_transport: httpx.AsyncBaseTransport | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
        if timeout <= 0 or retries < 0:
            raise ValueError(f"timeout must be > 0 and retries >= 0; got timeout={timeout}, retries={retries}")
        self.protocol = protocol
        self.timeout = float(timeout)
        self.retries = int(retries)
        url = url or DEFAULT_URLS[protocol]
        self._transport = (GrpcTransport(url, api_key) if protocol == "grpc"
                           else HttpTransport(url, api_key, transport=http_transport))
        self.url = self._transport.target if protocol == "grpc" else self._transport.url
        self._jobs: set[asyncio.Future] = set()  # gRPC explain jobs running in the background

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, protocol={self.protocol!r})"

    # -- calls ---------------------------------------------------------------------------------------------------

    async def analyze(self, image: Image, *, overlay: bool = False, heatmap: bool = False,
                      mask_format: str = "png", dicom: bool = False) -> Analysis:
        """Class, probabilities, refer flag and tumour mask of one slice (JPEG, PNG, DICOM file, its bytes, or a numpy
        array); its Grad-CAM heatmap with ``heatmap=True`` (computed on the server only then). ``mask_format``: how
        the mask travels, "png" (default) or "rle" (COCO run-length encoding: smaller, and the server encodes no
        PNG); ``mask_array()`` and ``save_mask()`` give the same mask either way. ``dicom=True`` (a DICOM slice only)
        also answers the DICOM SEG, SR and Grad-CAM overlay: ``Analysis.dicom_datasets()``."""
        mask_format = check_mask_format(mask_format)
        data = await _load(image)
        return await self._retrying(lambda t: self._transport.analyze(data, overlay, t, heatmap=heatmap,
                                                                      mask_format=mask_format, dicom=dicom))

    async def analyze_many(self, images: Iterable[Image] | AsyncIterable[Image], *, overlay: bool = False,
                           heatmap: bool = False, concurrency: int = 8,
                           mask_format: str = "png") -> AsyncIterator[Analysis | BrainTumorError]:
        """One answer per image, in input order, with up to ``concurrency`` images in flight. A failed image yields
        its :class:`BrainTumorError` (a local file that cannot be read or an unusable array: InvalidInputError with
        code ``local_input``) and the rest carry on. gRPC sends all images over one AnalyzeStream; HTTP makes
        concurrent /analyze calls. ``images`` is read lazily. ``mask_format`` as in :meth:`analyze`."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1; got {concurrency}")
        mask_format = check_mask_format(mask_format)
        stream = (self._transport.stream(overlay, self.retries, self._backoff, heatmap=heatmap,
                                         mask_format=mask_format)
                  if self.protocol == "grpc" else None)
        pending: collections.deque[asyncio.Future] = collections.deque()
        try:
            async for image in _aiter(images):
                try:
                    data = await _load(image)
                except (OSError, ValueError, TypeError) as exc:
                    pending.append(_done(InvalidInputError(str(exc), code="local_input")))
                else:
                    pending.append(stream.submit(data) if stream is not None
                                   else asyncio.ensure_future(
                                       self._analyze_or_error(data, overlay, heatmap, mask_format)))
                while len(pending) >= concurrency:
                    yield await pending.popleft()
            if stream is not None:
                stream.close_input()
            while pending:
                yield await pending.popleft()
        finally:
            for future in pending:
                future.cancel()
            if stream is not None:
                await stream.aclose()

    async def explain(self, image: Image, *, method: str = "gradcam", target: str | None = None,
                      num_samples: int | None = None, max_evals: int | None = None,
                      timeout: float | None = None) -> Explanation:
        """An explanation heatmap of the predicted class (or ``target``): ``gradcam`` (fast), ``lime``
        (``num_samples``) or ``shap`` (``max_evals``), which take seconds to minutes on a CPU host: pass a
        ``timeout`` (seconds, default the client's) that allows for it. Over HTTP, LIME and SHAP run as a server
        task that is polled, so no request stays open for minutes."""
        options = dict(method=method, target=target, num_samples=num_samples, max_evals=max_evals)
        budget = self.timeout if timeout is None else float(timeout)
        if self.protocol == "http" and method not in ONE_REQUEST_METHODS:
            job = await self.submit_explain(image, **options)
            return await job.result(timeout=budget)
        data = await _load(image)
        return await self._retrying(lambda t: self._transport.explain(data, t, **options), budget)

    async def submit_explain(self, image: Image, *, method: str, target: str | None = None,
                             num_samples: int | None = None, max_evals: int | None = None) -> AsyncExplainJob:
        """Start an explanation and return at once. HTTP: a server task (``/explain/submit``) whose id outlives this
        client. gRPC has no task API: the Explain call runs in the background of this client (no deadline but
        ``result(timeout)``) and is lost when the client closes."""
        data = await _load(image)
        options = dict(method=method, target=target, num_samples=num_samples, max_evals=max_evals)
        if self.protocol == "http":
            task_id = await self._retrying(lambda t: self._transport.submit_explain(data, t, **options))
            return AsyncExplainJob(self, task_id)
        call = self._retrying(lambda t: self._transport.explain(data, t, **options), budget=LOCAL_JOB_BUDGET_S)
        task = asyncio.ensure_future(call)
        self._jobs.add(task)
        task.add_done_callback(_forget(self._jobs))
        return AsyncExplainJob(self, f"local-{uuid.uuid4().hex}", task)

    async def health(self) -> Health:
        """Liveness and readiness (Triton up, model loaded), and the model's info when ready. Never raises for an
        unreachable server: that is ``live=False``."""
        return await self._transport.health(self.timeout)

    async def model(self) -> dict:
        """The deployed model: name, version, classes, refer_threshold, image_size, geometry."""
        return await self._retrying(self._transport.model)

    async def aclose(self) -> None:
        for task in list(self._jobs):
            task.cancel()
        await self._transport.aclose()

    async def __aenter__(self) -> AsyncBrainTumorClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    # -- plumbing ------------------------------------------------------------------------------------------------

    async def _analyze_or_error(self, data: bytes, overlay: bool, heatmap: bool,
                                mask_format: str = "png") -> Analysis | BrainTumorError:
        try:
            return await self._retrying(lambda t: self._transport.analyze(data, overlay, t, heatmap=heatmap,
                                                                          mask_format=mask_format))
        except BrainTumorError as exc:
            return exc

    @staticmethod
    def _backoff(attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...): exponential with jitter."""
        return min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (attempt - 1)) + random.uniform(0, BACKOFF_INITIAL_S)

    async def _retrying(self, call, budget: float | None = None):
        """``call(seconds_left)``, repeated on UnavailableError with backoff while attempts and time are left."""
        budget = self.timeout if budget is None else budget
        deadline = time.monotonic() + budget
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(UnavailableError),
            stop=stop_after_attempt(self.retries + 1) | stop_before_delay(budget),
            wait=lambda state: self._backoff(state.attempt_number), reraise=True)
        async for attempt in retrying:
            with attempt:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceededError(f"no answer within {budget:.1f} s", code="client_timeout")
                return await call(left)


class AsyncExplainJob:
    """A submitted explanation: ``id``, :meth:`status` and :meth:`result`."""

    def __init__(self, client: AsyncBrainTumorClient, job_id: str, local: asyncio.Future | None = None) -> None:
        self.id = job_id
        self._client = client
        self._local = local
        # The gateway deletes a task once its result has been fetched (it keeps no image longer than needed), so the
        # job keeps what it fetched: status() and result() keep answering from it.
        self._fetched: Explanation | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r})"

    async def status(self) -> str:
        """``in_progress``, ``completed``, ``failed`` (or ``canceled``)."""
        if self._fetched is not None:
            return "completed"
        if self._local is not None:
            if not self._local.done():
                return "in_progress"
            return "completed" if not self._local.cancelled() and self._local.exception() is None else "failed"
        transport = self._client._transport
        return await self._client._retrying(lambda t: transport.task_status(self.id, t))

    async def result(self, timeout: float | None = None) -> Explanation:
        """Wait (polling with backoff over HTTP) for the explanation; a failed job raises its error. ``timeout``:
        seconds to wait, default the client's; past it DeadlineExceededError (the job carries on)."""
        budget = self._client.timeout if timeout is None else float(timeout)
        if self._fetched is not None:
            return self._fetched
        if self._local is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(self._local), budget)
            except asyncio.TimeoutError:
                raise DeadlineExceededError(f"explanation {self.id} not done within {budget:.1f} s",
                                            code="client_timeout") from None
        deadline = time.monotonic() + budget
        delay = POLL_INITIAL_S
        while (state := await self.status()) in PENDING_STATES:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceededError(f"explanation task {self.id} still {state} after {budget:.1f} s; call "
                                            "result() again to keep waiting", code="client_timeout")
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 1.5, POLL_MAX_S)
        transport = self._client._transport
        # A failed task's /explain/get answers its error (e.g. 400 for a bad option), raised here.
        self._fetched = await self._client._retrying(lambda t: transport.task_result(self.id, t))
        return self._fetched


async def _load(image: Image) -> bytes:
    """The bytes to send; files and arrays are read/encoded off the event loop."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return image_bytes(image)
    return await asyncio.to_thread(image_bytes, image)


async def _aiter(items):
    if hasattr(items, "__aiter__"):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def _forget(jobs: set):
    def done(task: asyncio.Future) -> None:
        jobs.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a job nobody asked about must not log "exception was never retrieved"

    return done


def _done(value) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future
