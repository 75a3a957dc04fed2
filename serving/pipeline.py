"""The one serving pipeline both front doors call: decode -> preprocess -> Triton -> postprocess (-> explanation).

Decoding, preprocessing and postprocessing are CPU work and run in a thread so the event loop keeps serving;
Triton calls go through the one reused :class:`TritonModel`. Admission is bounded: beyond ``max_in_flight``
calls a request gets :class:`Busy` at once instead of queueing without limit.
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

from ..clients import masks
from ..train.decode import DecodedImage, DicomInfo, ImageDecodeError, UnsupportedFormatError, decode_any
from ..train.preprocess import Geometry, preprocess
from .errors import BadInput, Busy, ServingError, UnsupportedMediaType
from .explain import Explainer
from .postprocess import AnalysisResult, postprocess
from .settings import ServeSettings
from .triton_client import ModelInfo, TritonModel

log = logging.getLogger("braintumor.serving")

EXPLAIN_METHODS = ("gradcam", "lime", "shap")


@dataclass(frozen=True, eq=False)
class Prepared:
    """One decoded and preprocessed request image."""

    decoded: DecodedImage
    dicom: DicomInfo | None
    image: np.ndarray  # (S, S) uint8 model input
    geometry: Geometry
    sha256: str  # of the request bytes: the explanation cache key; never logged with patient data


@dataclass(frozen=True)
class ExplainOptions:
    method: str
    target: str | None = None  # class name; None = the predicted class
    num_samples: int | None = None  # LIME perturbations
    max_evals: int | None = None  # SHAP model evaluations


@dataclass(frozen=True)
class CheckedExplainOptions(ExplainOptions):
    """Options that passed :meth:`Pipeline.check_explain` (defaults filled in): validated once per request, so
    :meth:`Pipeline.explain` takes them as they are (the HTTP door checks before it reads the image)."""


def check_mask_format(value: str | None) -> str:
    """The requested mask format ("" or None: the default, png); BadInput naming the accepted ones."""
    try:
        return masks.check_mask_format(value)
    except ValueError as exc:
        raise BadInput(f"{exc} (png: a greyscale PNG in mask_png, the default; rle: COCO run-length encoding in "
                       "mask_rle)") from exc


class Pipeline:
    def __init__(self, model: TritonModel, settings: ServeSettings | None = None, metrics=None, *,
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

    def prepare(self, data: bytes, info: ModelInfo) -> Prepared:
        """Decode and preprocess one image; BadInput with the reason when it cannot be used."""
        if not data:
            raise BadInput("empty image: send the bytes of one JPEG, PNG or DICOM file")
        if len(data) > self.settings.max_body_bytes:
            raise BadInput(f"image of {len(data)} bytes is over the {self.settings.max_body_bytes}-byte limit")
        try:
            decoded, dicom = decode_any(data)
            image, geometry = preprocess(decoded.pixels, info.preprocess)
        except UnsupportedFormatError as exc:
            raise UnsupportedMediaType(str(exc)) from exc
        except ImageDecodeError as exc:
            raise BadInput(str(exc)) from exc
        return Prepared(decoded, dicom, image, geometry, hashlib.sha256(data).hexdigest())

    def _finish(self, prepared: Prepared, outputs: dict[str, np.ndarray], info: ModelInfo,
                overlay: bool, heatmap: bool = False, mask_format: str = "png") -> AnalysisResult:
        dicom = prepared.dicom
        result = postprocess(
            outputs, prepared.geometry, prepared.decoded, classes=info.classes,
            refer_threshold=info.refer_threshold,
            disagree_min_area=info.disagree_min_area,
            ood_threshold=info.ood_threshold,
            pixel_spacing_mm=dicom.pixel_spacing_mm if dicom else None,
            modality=dicom.modality if dicom else None,
            want_overlay=overlay,
            want_heatmap=heatmap,
            mask_format=mask_format,
            foreground_threshold=info.preprocess.foreground_threshold,
        )
        return replace(result, model_name=info.name, model_version=info.version)

    async def analyze(self, data: bytes, *, overlay: bool = False, heatmap: bool = False,
                      mask_format: str = "png") -> AnalysisResult:
        return (await self.analyze_many([data], overlay=overlay, heatmap=heatmap, mask_format=mask_format,
                                        raise_single=True))[0]

    async def analyze_many(self, items: Sequence[bytes | ServingError], *, overlay: bool = False,
                           heatmap: bool = False, mask_format: str = "png",
                           raise_single: bool = False) -> list[AnalysisResult | ServingError]:
        """Analyze several images with ONE Triton request for all that decode; a bad image fails alone.

        Each entry of the result is an AnalysisResult or the BadInput that image raised; an item that is already a
        ServingError (a part the front door could not read) keeps its place. The batch limit is checked here, the
        one place, on every item. Triton failures (Unavailable, DeadlineExceeded) fail the whole call. The Grad-CAM
        heatmap PNG is made only with ``heatmap`` (explanations on demand). ``mask_format``: "png" (default) or "rle"
        (COCO run-length encoding, made instead of the PNG); checked here, before any image work, for both doors.
        """
        mask_format = check_mask_format(mask_format)
        if len(items) > self.settings.max_batch_images:
            raise BadInput(f"{len(items)} images in one batch; at most {self.settings.max_batch_images} are accepted")
        async with self._admitted():
            info = await self.info()
            prepared: list[Prepared | ServingError] = await asyncio.to_thread(self._prepare_all, items, info)
            good = [p for p in prepared if isinstance(p, Prepared)]
            if raise_single and not good:
                raise prepared[0]
            outputs = await self.model.infer(np.stack([p.image[None] for p in good]), info) if good else {}
            results: list[AnalysisResult | ServingError] = await asyncio.to_thread(
                self._finish_all, prepared, outputs, info, overlay, heatmap, mask_format)
            if self.metrics is not None:
                self.metrics.observe_results(results)
            return results

    def _prepare_all(self, items: Sequence[bytes | ServingError], info: ModelInfo) -> list[Prepared | ServingError]:
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

    def _finish_all(self, prepared, outputs, info, overlay, heatmap=False,
                    mask_format="png") -> list[AnalysisResult | ServingError]:
        results, row = [], 0
        for item in prepared:
            if isinstance(item, ServingError):
                results.append(item)
                continue
            one = {name: value[row:row + 1] for name, value in outputs.items()}
            results.append(self._finish(item, one, info, overlay, heatmap, mask_format))
            row += 1
        return results

    # -- explanations --------------------------------------------------------------------------------------

    def check_explain(self, options: ExplainOptions, info: ModelInfo) -> CheckedExplainOptions:
        """Validate explanation options against the documented bounds; fill the defaults."""
        s = self.settings
        if options.method not in EXPLAIN_METHODS:
            raise BadInput(f"unknown explanation method {options.method!r}; use one of {', '.join(EXPLAIN_METHODS)}")
        if options.target is not None and options.target not in info.classes:
            raise BadInput(f"unknown target class {options.target!r}; use one of {', '.join(info.classes)} "
                           "or leave it empty for the predicted class")
        num_samples = s.lime_num_samples if options.num_samples is None else int(options.num_samples)
        if not 10 <= num_samples <= s.lime_max_samples:
            raise BadInput(f"num_samples={num_samples} is outside 10..{s.lime_max_samples}")
        max_evals = s.shap_max_evals if options.max_evals is None else int(options.max_evals)
        if not 10 <= max_evals <= s.shap_max_max_evals:
            raise BadInput(f"max_evals={max_evals} is outside 10..{s.shap_max_max_evals}")
        return CheckedExplainOptions(options.method, options.target, num_samples, max_evals)

    async def explain(self, data: bytes, options: ExplainOptions):
        """Explain one image's prediction (or ``options.target``): an :class:`~.explain.Explanation`."""
        info = await self.info()
        if not isinstance(options, CheckedExplainOptions):
            options = self.check_explain(options, info)
        start = time.perf_counter()
        # A repeated request is answered from the cache before any decoding or inference.
        hit = self._explainer.lookup(hashlib.sha256(data).hexdigest(), info, options)
        if hit is not None:
            if self.metrics is not None:
                self.metrics.observe_explanation(options.method, time.perf_counter() - start, True)
            return hit
        async with self._admitted():
            prepared = await asyncio.to_thread(self.prepare, data, info)
            outputs = await self.model.infer(prepared.image[None, None], info)
            result = await self._explainer.explain(prepared, outputs, info, options)
            if self.metrics is not None:
                self.metrics.observe_explanation(options.method, time.perf_counter() - start, result.cached)
            return result
