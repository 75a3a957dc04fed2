"""The HTTP gateway: a BentoML service over the one serving :class:`Pipeline`.

    bentoml serve braintumor.serving.service:BrainTumorGateway --port 3000     (Triton at BRAINTUMOR_TRITON_URL, or
    the model in this process: BRAINTUMOR_BACKEND=onnxruntime BRAINTUMOR_MODEL_REPOSITORY=DIR)

POST /analyze, /analyze_batch, /explain (also a BentoML task: /explain/submit, /explain/status, /explain/get);
GET /model; /healthz (liveness), /readyz (Triton ready and the model loaded), /metrics, Swagger UI at / and
OpenAPI at /docs.json. Auth, body limits and the error shape live in :mod:`.http_middleware`.

Imports are absolute so that ``bentoml serve serving.service:BrainTumorGateway`` also works from the repo root.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import typing
from pathlib import Path

import bentoml
from pydantic import ConfigDict, Field, field_validator
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from braintumor.clients.masks import MASK_FORMATS
from braintumor.serving import logsafe
from braintumor.serving.errors import BadInput, ServingError
from braintumor.serving.http_middleware import BodyRoute, GatewayMiddleware
from braintumor.serving.metrics import Metrics
from braintumor.serving.multipart import SCOPE_KEY
from braintumor.serving.pipeline import Pipeline
from braintumor.serving.request import EXPLAIN_METHODS, AnalyzeOptions, ExplainOptions
from braintumor.serving.wire import analysis_to_dict, error_to_dict, explanation_to_dict
from braintumor.serving.settings import ServeSettings

log = logging.getLogger("braintumor.serving.http")

FORMATS = "a JPEG, PNG or DICOM slice"
MASK_FORMAT_CHOICES = "|".join(MASK_FORMATS)
ANALYZE_USAGE = ('send multipart/form-data with the file in field "image" (optional fields "heatmap", "overlay" and '
                 f'"dicom": true|false, "mask_format": {MASK_FORMAT_CHOICES}), or JSON '
                 '{"image_base64": "<base64 of the file>", '
                 f'"heatmap": false, "overlay": false, "mask_format": "png"}}; the file is {FORMATS}')
BATCH_USAGE = ('send multipart/form-data with one file field "images" per image (optional "heatmap", "overlay", '
               f'"mask_format": {MASK_FORMAT_CHOICES}), or JSON {{"images_base64": ["<base64>", ...], "heatmap": false, '
               '"overlay": false, "mask_format": "png"}; at most '
               f"BRAINTUMOR_MAX_BATCH_IMAGES images (default 64), each {FORMATS}")
MASK_FORMAT_HELP = ('how the mask comes back: "png" (default) a greyscale PNG in mask_png (base64); "rle" COCO '
                    'run-length encoding in mask_rle, {"size": [height, width], "counts": "..."} as '
                    'pycocotools.mask.decode reads it (smaller and cheaper to make; mask_png is then null)')
EXPLAIN_USAGE = ('send multipart/form-data with the file in field "image" and the fields "method" '
                 f'({"|".join(EXPLAIN_METHODS)}), optional "target" (a class name), "num_samples" (LIME), '
                 '"max_evals" (SHAP); or the same as JSON with the file base64-encoded in "image_base64"')
TIMEOUT_S = 600  # a synchronous LIME/SHAP call may take minutes on a CPU host; /explain/submit holds nothing open


class _Input(bentoml.IODescriptor):
    # File fields are typed `Path = None`, not `Path | None`: BentoML 1.4 turns only a bare Path (or list[Path]) into
    # an upload (`X | None` is not patched; `Optional[Path]` fails to build, FileSchema being unhashable).
    # Unknown fields are refused by name; inputs are never echoed in validation errors or logs (patient data).
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    @classmethod
    async def from_http_request(cls, request, serde):
        """The input from the multipart parts the front guard already parsed and checked (:mod:`.multipart`): file
        fields become the parts' bytes, no temporary files; text fields are validated as BentoML would. A JSON
        body (or a request that did not pass the guard) is BentoML's to parse."""
        parts = request.scope.get(SCOPE_KEY)
        if parts is None:
            return await super().from_http_request(request, serde)
        files: dict[str, list[bytes]] = {}
        values: dict[str, str] = {}
        for part in parts:
            if part.name in cls.multipart_fields:
                files.setdefault(part.name, []).append(bytes(part.data))
            else:
                values[part.name] = part.data.decode("utf-8", "replace")
        model = cls.model_validate(values)
        return model.model_copy(update={name: items if _several(cls.model_fields[name].annotation) else items[0]
                                        for name, items in files.items()})

    @field_validator("image", "images", mode="before", check_fields=False)
    @classmethod
    def _file_not_text(cls, value):
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) for v in values):
            raise ValueError('a file field takes a multipart file; in JSON send the bytes base64-encoded in '
                             '"image_base64" / "images_base64"')
        return value


class AnalyzeInput(_Input):
    image: Path = Field(None, description=f"{FORMATS} (multipart file)")
    image_base64: str | None = Field(None, description="the same file base64-encoded (JSON)")
    heatmap: bool = Field(False, description="also return heatmap_png: the Grad-CAM of the label (computed only then)")
    overlay: bool = Field(False, description="also return overlay_png: the slice with heatmap and mask outline")
    mask_format: str = Field("png", description=MASK_FORMAT_HELP)
    dicom: bool = Field(False, description="also return `dicom`: the DICOM SEG, TID 1500 SR and Grad-CAM overlay "
                                           "(Part 10 files in base64) of a DICOM image, ready for a PACS")


class AnalyzeBatchInput(_Input):
    images: list[Path] = Field(None, description=f"one multipart file per image, each {FORMATS}")
    images_base64: list[str] | None = Field(None, description="the same files base64-encoded (JSON)")
    heatmap: bool = Field(False, description="also return heatmap_png for each image")
    overlay: bool = Field(False, description="also return overlay_png for each image")
    mask_format: str = Field("png", description=MASK_FORMAT_HELP + "; the same for every image")


class ExplainInput(_Input):
    image: Path = Field(None, description=f"{FORMATS} (multipart file)")
    image_base64: str | None = Field(None, description="the same file base64-encoded (JSON)")
    method: str = Field("gradcam", description=f"one of {', '.join(EXPLAIN_METHODS)}")
    target: str | None = Field(None, description="class to explain; empty: the predicted class")
    num_samples: int | None = Field(None, description="LIME perturbations (BRAINTUMOR_LIME_MAX_SAMPLES bounds it)")
    max_evals: int | None = Field(None, description="SHAP evaluations (BRAINTUMOR_SHAP_MAX_MAX_EVALS bounds it)")


def _several(annotation) -> bool:
    """A file field that takes several files (``list[Path]``)."""
    return any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation)))


def _body_route(endpoint: str, spec: type[_Input], usage: str) -> BodyRoute:
    files = {name: _several(spec.model_fields[name].annotation) for name in spec.multipart_fields}
    return BodyRoute(endpoint, files, frozenset(spec.model_fields) - set(files), usage)


BODY_ROUTES = {
    "/analyze": _body_route("analyze", AnalyzeInput, ANALYZE_USAGE),
    "/analyze_batch": _body_route("analyze_batch", AnalyzeBatchInput, BATCH_USAGE),
    "/explain": _body_route("explain", ExplainInput, EXPLAIN_USAGE),
    "/explain/submit": _body_route("explain_submit", ExplainInput, EXPLAIN_USAGE),
}
OTHER_ENDPOINTS = {"/explain/status": "explain_status", "/explain/get": "explain_get",
                   "/explain/retry": "explain_retry", "/explain/cancel": "explain_cancel", "/model": "model"}

_metrics: Metrics | None = None


def gateway_metrics() -> Metrics:
    """One set per worker process, made on first use: BentoML sets PROMETHEUS_MULTIPROC_DIR in the worker after
    importing this module, and prometheus_client must be imported after that (bentoml.metrics only defers it,
    and is deprecated in 1.4)."""
    global _metrics
    if _metrics is None:
        import prometheus_client

        _metrics = Metrics(prometheus_client, "http")
    return _metrics


def error_response(error: ServingError) -> JSONResponse:
    headers = {"retry-after": str(error.retry_after_s)} if error.retry_after_s else None
    return JSONResponse(error_to_dict(error), status_code=error.http_status, headers=headers)


def decode_base64(text: str, field: str) -> bytes:
    """Bytes of a base64 field; a ``data:...;base64,`` prefix and line breaks are accepted."""
    if text.startswith("data:") and "," in text[:200]:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f"{field} is not valid base64 ({exc}); send the file's bytes base64-encoded "
                       "(standard alphabet, with padding)") from exc


async def _file_bytes(item: Path | bytes) -> bytes:
    """A file field's bytes: the parsed part (the usual case, see ``_Input.from_http_request``) or BentoML's file."""
    return item if isinstance(item, bytes) else await asyncio.to_thread(item.read_bytes)


async def _one_image(image: Path | bytes | None, image_base64: str | None, usage: str) -> bytes:
    if image is not None and image_base64 is not None:
        raise BadInput('send the image once: either the multipart file "image" or JSON "image_base64"')
    if image is not None:
        return await _file_bytes(image)
    if image_base64 is not None:
        return decode_base64(image_base64, "image_base64")
    raise BadInput(f"no image in the request; {usage}")


async def _model(request) -> JSONResponse:
    gateway = bentoml.get_current_service()
    try:
        info = await gateway.pipeline.info()
    except ServingError as exc:
        return error_response(exc)
    return JSONResponse(info.to_dict())


async def _metrics_view(request) -> Response:
    """Prometheus text of every worker (the multiprocess directory BentoML sets), in place of BentoML's /metrics,
    which is off with its request metrics: those label requests by raw path, so random paths grew the series."""
    import prometheus_client
    from prometheus_client import multiprocess

    gateway_metrics()  # defined before the first scrape, so every braintumor_* family is listed
    registry = prometheus_client.REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    body = await asyncio.to_thread(prometheus_client.generate_latest, registry)
    return Response(body, media_type=prometheus_client.CONTENT_TYPE_LATEST)


# GET routes: BentoML API routes are POST only. Mounted at "/" as a passive mount: only these paths match here.
extra_routes = Starlette(routes=[Route("/model", _model, methods=["GET"]),
                                 Route("/metrics", _metrics_view, methods=["GET"])])


@bentoml.asgi_app(extra_routes, path="/")
@bentoml.service(name="braintumor", workers=int(os.environ.get("BRAINTUMOR_HTTP_WORKERS", "1")),
                 traffic={"timeout": TIMEOUT_S},
                 # Both label or log the raw request path (forged log lines, one metric series per random path);
                 # GatewayMiddleware writes the access log and counts requests by route instead.
                 metrics={"enabled": False}, logging={"access": {"enabled": False}})
class BrainTumorGateway:
    """Brain MRI tumour classification, segmentation and explanation (BRISC 2025) over NVIDIA Triton."""

    def __init__(self) -> None:
        # Runs once per worker; connects lazily, so the gateway starts (not ready) while Triton is still down.
        logsafe.install()
        logsafe.quiet_client_errors()
        self.settings = ServeSettings.from_env()
        self.metrics = gateway_metrics()
        self.pipeline = Pipeline.from_settings(self.settings, self.metrics)

    async def __is_ready__(self) -> bool:
        """Readiness (/readyz): Triton answers, both models are loaded and their braintumor metadata is readable."""
        if not await self.pipeline.ready():
            return False
        try:
            await self.pipeline.info()
        except ServingError as exc:
            log.warning("not ready: %s", exc.message)
            return False
        return True

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        await self.pipeline.close()

    @bentoml.api(route="/analyze", input_spec=AnalyzeInput)
    async def analyze(self, image: Path | None = None, image_base64: str | None = None,
                      overlay: bool = False, heatmap: bool = False, mask_format: str = "png",
                      dicom: bool = False) -> dict:
        """Classify one slice and segment the tumour; explain the label with Grad-CAM when asked (`heatmap`).

        Multipart (field `image`) or JSON (`image_base64`). Answers label, probabilities, refer (+ reasons),
        tumour area, the mask (a PNG in base64; with `mask_format=rle` COCO RLE in `mask_rle` instead), the heatmap
        PNG only with `heatmap=true` (null otherwise), the overlay PNG only with `overlay=true`, the DICOM SEG, SR and
        overlay (`dicom`: Part 10 files in base64) only with `dicom=true` for a DICOM image, and the model version.
        Errors: 400/413/415 with a message saying what to fix, 429 when busy, 503 while Triton is down (retry when
        /readyz is ready).
        """

        async def work():
            options = AnalyzeOptions(heatmap, overlay, mask_format, dicom)  # checked once, here
            data = await _one_image(image, image_base64, ANALYZE_USAGE)
            result = await self.pipeline.analyze(data, options)
            return JSONResponse(analysis_to_dict(result))  # BentoML's output serde, skipped: the dict is plain JSON

        return await self._answer("analyze", work())

    @bentoml.api(route="/analyze_batch", input_spec=AnalyzeBatchInput)
    async def analyze_batch(self, images: list[Path] | None = None, images_base64: list[str] | None = None,
                            overlay: bool = False, heatmap: bool = False, mask_format: str = "png") -> dict:
        """Analyze several slices in one Triton request. `results` has one entry per image, in order: the
        /analyze answer, or `{"error": kind, "detail": message}` for an image that cannot be used."""

        async def work():
            options = AnalyzeOptions(heatmap, overlay, mask_format)  # checked once, here
            if images is not None and images_base64 is not None:
                raise BadInput('send the images once: either multipart files "images" or JSON "images_base64"')
            if not images and not images_base64:
                raise BadInput(f"no images in the request; {BATCH_USAGE}")
            items: list[bytes | ServingError] = []
            for k, item in enumerate(images or images_base64):
                try:
                    items.append(decode_base64(item, f"images_base64[{k}]") if isinstance(item, str)
                                 else await _file_bytes(item))
                except BadInput as exc:
                    items.append(exc)  # keeps its place; the pipeline checks the batch limit and counts errors
            analysed = await self.pipeline.analyze_many(items, options)
            results = [error_to_dict(r) if isinstance(r, ServingError) else analysis_to_dict(r, model=False)
                       for r in analysed.results]
            model = analysed.model  # the model that answered: no second look
            return JSONResponse({"model": {"name": model.name, "version": model.version}, "results": results})

        return await self._answer("analyze_batch", work())

    @bentoml.task(route="/explain", input_spec=ExplainInput)
    async def explain(self, image: Path | None = None, image_base64: str | None = None, method: str = "gradcam",
                      target: str | None = None, num_samples: int | None = None,
                      max_evals: int | None = None) -> dict:
        """Explain one slice's prediction (or `target`) with gradcam (fast), lime or shap (seconds).

        POST /explain answers when done; POST /explain/submit answers a task_id at once, then
        GET /explain/status?task_id= and GET /explain/get?task_id= give the state and the result.
        Results are cached by image and options, so a repeated request is instant.
        """

        async def work():
            # Checked by the pipeline against the model's classes before any image work (a task fails at once).
            options = ExplainOptions(method, target or None, num_samples, max_evals)
            data = await _one_image(image, image_base64, EXPLAIN_USAGE)
            explanation = await self.pipeline.explain(data, options)
            return explanation_to_dict(explanation)

        return await self._answer("explain", work())

    async def _answer(self, endpoint: str, work) -> dict | JSONResponse:
        """The endpoint's answer, or its error as ``{"error": kind, "detail": message}`` with the error's status.

        Returned, not raised: BentoML hides the message of any exception with a 5xx status, and a 503 must say
        that Triton is down. Nothing about the image (name, bytes) is logged.
        """
        try:
            return await work
        except ServingError as exc:
            self.metrics.observe_error(exc)
            if exc.http_status == 500:  # an upstream bug (UpstreamError): its traceback, Triton's error chained
                log.exception("%s: %s", endpoint, exc.message)
            elif exc.http_status >= 500:
                log.warning("%s: %s", endpoint, exc.message)
            return error_response(exc)
        except Exception:
            log.exception("%s failed unexpectedly", endpoint)
            error = ServingError("an unexpected error occurred; it is logged on the server")
            self.metrics.observe_error(error)
            return error_response(error)


BrainTumorGateway.add_asgi_middleware(GatewayMiddleware, routes=BODY_ROUTES, endpoints=OTHER_ENDPOINTS,
                                      metrics=gateway_metrics)
