"""The blocking client: :class:`BrainTumorClient`, the asyncio client (:mod:`.aio`) run on a private event loop in
a daemon thread, so both clients share one implementation and a blocking caller (scripts, notebooks, threads)
never needs asyncio."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Iterable, Iterator

import httpx

from ._images import Image
from .aio import AsyncBrainTumorClient, AsyncExplainJob
from .errors import BrainTumorError
from .results import Analysis, Explanation, Health

__all__ = ["BrainTumorClient", "ExplainJob", "Image"]


class _LoopThread:
    """An event loop running in its own daemon thread; :meth:`run` waits for a coroutine from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="braintumor-client", daemon=True)
        self.thread.start()

    def run(self, coroutine):
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:  # KeyboardInterrupt included: stop the work we were waiting for
            future.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def _stop_loop(loop: asyncio.AbstractEventLoop) -> None:
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)


class BrainTumorClient:
    """Talks to a braintumor server (``braintumor serve``) over gRPC (default) or HTTP; blocking calls.

    ``url``: ``host:port`` or ``http://host:port`` for either protocol (default ``localhost:50051`` for gRPC,
    ``http://localhost:3000`` for HTTP); ``api_key``: sent as ``x-api-key``; ``timeout``: seconds a call may take in
    all, retries included; ``retries``: how many times a call is repeated after UNAVAILABLE / 502 / 503 / connection
    refused (never after any other error). One gRPC channel or HTTP connection pool per client; use it as a context
    manager or call :meth:`close`. Safe to share between threads.

    Errors are :mod:`braintumor.clients.errors` exceptions carrying the server's message. Bad local input raises
    before anything is sent: ``FileNotFoundError`` naming a missing path, ``ValueError`` for an unusable array.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", api_key: str | None = None,
                 timeout: float = 60.0, retries: int = 3, *,
                 http_transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._async = AsyncBrainTumorClient(url, protocol, api_key, timeout, retries, http_transport=http_transport)
        self._loop = _LoopThread()
        self._finalizer = weakref.finalize(self, _stop_loop, self._loop.loop)  # a client dropped without close()
        self._closed = False

    protocol = property(lambda self: self._async.protocol)
    url = property(lambda self: self._async.url)
    timeout = property(lambda self: self._async.timeout)
    retries = property(lambda self: self._async.retries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, protocol={self.protocol!r})"

    def _run(self, coroutine):
        if self._closed:
            coroutine.close()
            raise RuntimeError("this BrainTumorClient is closed; make a new one")
        return self._loop.run(coroutine)

    def analyze(self, image: Image, *, overlay: bool = False, heatmap: bool = False,
                mask_format: str = "png", dicom: bool = False) -> Analysis:
        """Class, probabilities, refer flag and tumour mask of one slice (JPEG, PNG, DICOM file, its bytes, or a numpy
        array); its Grad-CAM heatmap with ``heatmap=True`` (computed on the server only then). ``mask_format``: how
        the mask travels, "png" (default) or "rle" (COCO run-length encoding: smaller, and the server encodes no
        PNG); ``mask_array()`` and ``save_mask()`` give the same mask either way. ``dicom=True`` (a DICOM slice only)
        also answers the DICOM SEG, SR and Grad-CAM overlay: ``Analysis.dicom_datasets()``."""
        return self._run(self._async.analyze(image, overlay=overlay, heatmap=heatmap, mask_format=mask_format,
                                             dicom=dicom))

    def analyze_many(self, images: Iterable[Image], *, overlay: bool = False, heatmap: bool = False,
                     concurrency: int = 8, mask_format: str = "png") -> Iterator[Analysis | BrainTumorError]:
        """One answer per image, in input order, with up to ``concurrency`` images in flight; a failed image yields
        its :class:`BrainTumorError` instead of raising (an unreadable local file: InvalidInputError with code
        ``local_input``). gRPC sends all images over one AnalyzeStream; HTTP makes concurrent /analyze calls.
        ``mask_format`` as in :meth:`analyze`."""
        answers = self._async.analyze_many(images, overlay=overlay, heatmap=heatmap, concurrency=concurrency,
                                           mask_format=mask_format)
        try:
            while True:
                try:
                    answer = self._run(answers.__anext__())
                except StopAsyncIteration:
                    return
                yield answer
        finally:
            if not self._closed:
                self._loop.run(answers.aclose())

    def explain(self, image: Image, *, method: str = "gradcam", target: str | None = None,
                num_samples: int | None = None, max_evals: int | None = None,
                timeout: float | None = None) -> Explanation:
        """An explanation heatmap of the predicted class (or ``target``): ``gradcam`` (fast), ``lime``
        (``num_samples``) or ``shap`` (``max_evals``), which take seconds to minutes on a CPU host: pass a
        ``timeout`` that allows for it. Over HTTP, LIME and SHAP run as a server task that is polled."""
        return self._run(self._async.explain(image, method=method, target=target, num_samples=num_samples,
                                             max_evals=max_evals, timeout=timeout))

    def submit_explain(self, image: Image, *, method: str, target: str | None = None,
                       num_samples: int | None = None, max_evals: int | None = None) -> ExplainJob:
        """Start an explanation and return at once. HTTP: a server task whose id outlives this client. gRPC has no
        task API: the Explain call runs in this client's background and is lost when the client closes."""
        job = self._run(self._async.submit_explain(image, method=method, target=target, num_samples=num_samples,
                                                   max_evals=max_evals))
        return ExplainJob(self, job)

    def health(self) -> Health:
        """Liveness, readiness (Triton up, model loaded) and the model's info when ready; an unreachable server
        is ``live=False``, not an exception."""
        return self._run(self._async.health())

    def model(self) -> dict:
        """The deployed model: name, version, classes, refer_threshold, image_size, geometry."""
        return self._run(self._async.model())

    def close(self) -> None:
        """Close the channel / connections and stop the client's thread; idempotent."""
        if self._closed:
            return
        try:
            self._loop.run(self._async.aclose())
        finally:
            self._closed = True
            self._finalizer.detach()
            self._loop.stop()

    def __enter__(self) -> BrainTumorClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ExplainJob:
    """A submitted explanation: ``id``, :meth:`status` (``in_progress``, ``completed``, ``failed``) and
    :meth:`result`, which waits for it (polling with backoff over HTTP) and raises a failed job's error."""

    def __init__(self, client: BrainTumorClient, job: AsyncExplainJob) -> None:
        self._client = client
        self._job = job

    @property
    def id(self) -> str:
        return self._job.id

    def __repr__(self) -> str:
        return f"ExplainJob(id={self.id!r})"

    def status(self) -> str:
        return self._client._run(self._job.status())

    def result(self, timeout: float | None = None) -> Explanation:
        """The explanation; ``timeout`` seconds (default the client's), past which DeadlineExceededError."""
        return self._client._run(self._job.result(timeout))
