"""The stages of an analysis or explanation, one after another, for both front doors: (model info, once) -> decode ->
preprocess -> infer -> postprocess, each stage one call here; parsing the request (:mod:`.request`) and encoding the
answer (:mod:`.wire`) are the front doors' (ARCHITECTURE.md, "The request path").

Decoding, preprocessing and postprocessing are CPU work and run in a thread so the event loop keeps serving; the
model is called through the one :class:`~.backend.ModelBackend` (Triton, or ONNX Runtime in this process). Admission
is bounded: beyond ``max_in_flight`` calls a request gets :class:`Busy` at once instead of queueing without limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import numpy as np

from ..train.decode import DecodedImage, DicomInfo, ImageDecodeError, UnsupportedFormatError, decode_any
from ..train.preprocess import Geometry, preprocess
from .backend import ModelBackend, ModelInfo
from .errors import BadInput, Busy, ServingError, UnsupportedMediaType
from .explain import Explainer
from .postprocess import AnalysisResult, postprocess
from .request import AnalyzeOptions, ExplainOptions
from .settings import ServeSettings

log = logging.getLogger("braintumor.serving")

DEFAULT_OPTIONS = AnalyzeOptions()


@dataclass(frozen=True, eq=False)
class Prepared:
    """One decoded and preprocessed request image."""

    decoded: DecodedImage
    dicom: DicomInfo | None
    image: np.ndarray  # (S, S) uint8 model input
    geometry: Geometry
    data: bytes = b""  # the file as sent: the DICOM-results stage copies its header


@dataclass(frozen=True, eq=False)
class Analysed:
    """A batch's answers, in request order (an AnalysisResult, or the ServingError of that image), and the model
    that gave them (a batch answer names it once, also when no image could be used)."""

    model: ModelInfo
    results: list[AnalysisResult | ServingError]


class Pipeline:
    def __init__(self, model: ModelBackend, settings: ServeSettings | None = None, metrics=None, *,
                 warm_explainers: bool = True) -> None:
        self.model = model
        self.settings = settings or ServeSettings()
        self.metrics = metrics
        self._in_flight = 0
        # Created with the pipeline (a lifecycle object, not per request); warming imports lime/shap off the loop.
        self._explainer = Explainer(model, self.settings, warm=warm_explainers)

    @classmethod
    def from_settings(cls, settings: ServeSettings, metrics=None) -> Pipeline:
        if settings.backend == "onnxruntime":  # the model in this process (single-host installs)
            from .local_model import LocalModel

            model = LocalModel(settings.model_repository, settings.model_name, settings.model_version,
                               timeout_s=settings.triton_timeout_s, layout=settings.layout)
        else:
            from .triton_client import TritonModel

            model = TritonModel(settings.triton_url, settings.model_name, settings.model_version,
                                timeout_s=settings.triton_timeout_s, key=settings.triton_client_key())
        return cls(model, settings, metrics)

    async def close(self) -> None:
        self._explainer.close()
        await self.model.close()

    async def ready(self) -> bool:
        ok = await self.model.ready()
        if not ok:
            self.model.forget_info()  # Triton may come back with another version
        return ok

    async def info(self) -> ModelInfo:
        return await self.model.info()

    # -- admission ---------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _admitted(self):
        if self._in_flight >= self.settings.max_in_flight:
            raise Busy(f"{self._in_flight} requests are already in flight (limit {self.settings.max_in_flight}); "
                       "retry after a short wait")
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- analysis ----------------------------------------------------------------------------------------

    async def analyze(self, data: bytes, options: AnalyzeOptions = DEFAULT_OPTIONS) -> AnalysisResult:
        """One image; its BadInput is raised."""
        analysed = await self.analyze_many([data], options, raise_single=True)
        if isinstance(analysed.results[0], ServingError):
            raise analysed.results[0]
        return analysed.results[0]

    async def analyze_many(self, items: Sequence[bytes | ServingError], options: AnalyzeOptions = DEFAULT_OPTIONS,
                           *, raise_single: bool = False) -> Analysed:
        """Analyze several images with ONE model call for all that decode; a bad image fails alone.

        Each result is an AnalysisResult or the BadInput that image raised; an item that is already a ServingError
        (a part the front door could not read) keeps its place. The batch limit is checked here, the one place, on
        every item. Model failures (Unavailable, DeadlineExceeded) fail the whole call. ``options`` were checked when
        the front door built them.
        """
        if len(items) > self.settings.max_batch_images:
            raise BadInput(f"{len(items)} images in one batch; at most {self.settings.max_batch_images} are accepted")
        async with self._admitted():
            info = await self.model.info()  # once per request, handed down the stages
            prepared = await asyncio.to_thread(self._decode_and_preprocess, items, info)
            good = [p for p in prepared if isinstance(p, Prepared)]
            if raise_single and not good:
                raise prepared[0]
            outputs = await self.model.infer(np.stack([p.image[None] for p in good]), info) if good else {}
            results = await asyncio.to_thread(self._postprocess_all, prepared, outputs, info, options)
            if self.metrics is not None:
                self.metrics.observe_results(results)
            return Analysed(info, results)

    # -- the stages of one image ---------------------------------------------------------------------------

    def decode(self, data: bytes) -> tuple[DecodedImage, DicomInfo | None]:
        """Bytes -> greyscale pixels (+ DICOM spacing and modality); BadInput / UnsupportedMediaType with the reason."""
        if not data:
            raise BadInput("empty image: send the bytes of one JPEG, PNG or DICOM file")
        if len(data) > self.settings.max_body_bytes:
            raise BadInput(f"image of {len(data)} bytes is over the {self.settings.max_body_bytes}-byte limit")
        try:
            return decode_any(data)
        except UnsupportedFormatError as exc:
            raise UnsupportedMediaType(str(exc)) from exc
        except ImageDecodeError as exc:
            raise BadInput(str(exc)) from exc

    def prepare(self, data: bytes, info: ModelInfo) -> Prepared:
        """Decode, then preprocess (the model's square uint8 input + the geometry to map answers back)."""
        decoded, dicom = self.decode(data)
        image, geometry = preprocess(decoded.pixels, info.preprocess)
        return Prepared(decoded, dicom, image, geometry, data)

    @staticmethod
    def finish(prepared: Prepared, outputs: dict[str, np.ndarray], info: ModelInfo,
               options: AnalyzeOptions) -> AnalysisResult:
        """Postprocess one image's outputs and stamp the answering model on the result."""
        dicom = prepared.dicom
        result = postprocess(
            outputs, prepared.geometry, prepared.decoded, classes=info.classes, rules=info.refer_rules,
            pixel_spacing_mm=dicom.pixel_spacing_mm if dicom else None,
            modality=dicom.modality if dicom else None,
            foreground_threshold=info.preprocess.foreground_threshold,
            options=options,
        )
        result = replace(result, model_name=info.name, model_version=info.version)
        if options.dicom:  # the DICOM-results stage: SEG, SR and overlay from this answer and the file's header
            if dicom is None:
                raise BadInput("DICOM results (dicom=true) need a DICOM image; this one is not DICOM")
            from .dicom_answer import dicom_results  # highdicom: imported by the first request that asks

            result = replace(result, dicom=dicom_results(prepared.data, result),
                             overlay_png=result.overlay_png if options.overlay else None)
        return result

    def _decode_and_preprocess(self, items: Sequence[bytes | ServingError],
                               info: ModelInfo) -> list[Prepared | ServingError]:
        out: list[Prepared | ServingError] = []
        for data in items:
            if isinstance(data, ServingError):
                out.append(data)
                continue
            try:
                out.append(self.prepare(data, info))
            except BadInput as exc:
                out.append(exc)
        return out

    def _postprocess_all(self, prepared, outputs, info, options) -> list[AnalysisResult | ServingError]:
        results, row = [], 0
        for item in prepared:
            if isinstance(item, ServingError):
                results.append(item)
                continue
            one = {name: value[row:row + 1] for name, value in outputs.items()}
            try:
                results.append(self.finish(item, one, info, options))
            except BadInput as exc:  # the DICOM-results stage refused this image; the others are answered
                results.append(exc)
            row += 1
        return results

    # -- explanations --------------------------------------------------------------------------------------

    async def explain(self, data: bytes, options: ExplainOptions):
        """Explain one image's prediction (or ``options.target``): an :class:`~.explain.Explanation`. The options are
        checked first (a bad method or bound is a 400 before any image work); the image's sha256, the cache key, is
        computed once, here: a repeated request is answered from the cache before any decoding or inference."""
        info = await self.model.info()
        checked = options.checked(self.settings, info.classes)
        start = time.perf_counter()
        digest = hashlib.sha256(data).hexdigest()
        hit = self._explainer.lookup(digest, info, checked)
        if hit is not None:
            if self.metrics is not None:
                self.metrics.observe_explanation(checked.method, time.perf_counter() - start, True)
            return hit
        async with self._admitted():
            prepared = await asyncio.to_thread(self.prepare, data, info)
            outputs = await self.model.infer(prepared.image[None, None], info)
            result = await self._explainer.explain(prepared, digest, outputs, info, checked)
            if self.metrics is not None:
                self.metrics.observe_explanation(checked.method, time.perf_counter() - start, result.cached)
            return result
