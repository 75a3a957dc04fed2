"""The DICOM-results stage of an analysis (``dicom`` option, /analyze and gRPC Analyze): the SDK's builders
(clients/dicom_results.py: SEG, TID 1500 SR, Grad-CAM Secondary Capture) applied to the sent DICOM file and the
postprocessed answer, each object returned as Part 10 bytes. The UIDs are derived from the source's UIDs and the model
version, so the same slice and model give the same objects on either door, and from the SDK.

This is the one place the server reads a whole DICOM header, patient module included: that is what the objects copy.
Nothing read here is logged: pydicom's value warnings (which quote values) are silenced for the read and the build,
under a lock, since pydicom's validation setting and Python's warning filters are process-wide.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from contextlib import contextmanager

from ..clients.results import Analysis
from .errors import BadInput
from .postprocess import AnalysisResult

_QUIET = threading.Lock()


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging's name
        return False


@contextmanager
def _quiet_pydicom():
    """No pydicom warning or log line while the block runs (values of patient attributes would be in them)."""
    import pydicom.config

    logger, drop = logging.getLogger("pydicom"), _DropAll()
    settings = pydicom.config.settings
    with _QUIET:
        modes = settings.reading_validation_mode, settings.writing_validation_mode
        # reading: values parsed from the file; writing: the values highdicom copies into the new objects
        settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
        logger.addFilter(drop)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            logger.removeFilter(drop)
            settings.reading_validation_mode, settings.writing_validation_mode = modes


def as_analysis(result: AnalysisResult) -> Analysis:
    """The SDK's view of a postprocessed answer, what the builders take (the mask as the PNG the wire would carry)."""
    from ..clients.masks import mask_png

    return Analysis(
        label=result.label, probabilities=dict(result.probabilities), refer=result.refer,
        refer_reason="; ".join(result.refer_reason) or None, tumor_area_px=result.tumor_area_px,
        tumor_area_mm2=result.tumor_area_mm2, mask_png=result.mask_png or mask_png(result.mask), heatmap_png=b"",
        overlay_png=result.overlay_png, model_name=result.model_name, model_version=result.model_version,
        refer_reasons=tuple(result.refer_reason), mask_label_disagree=result.mask_label_disagree,
        image_height=result.original_shape[0], image_width=result.original_shape[1])


def dicom_results(data: bytes, result: AnalysisResult) -> dict[str, bytes]:
    """SEG, SR and overlay of ``result`` for the DICOM file ``data``, as Part 10 bytes keyed seg / sr / overlay."""
    import pydicom

    from ..clients.dicom_codes import model_version_tag
    from ..clients.dicom_results import build_results, check_source, result_uids

    analysis = as_analysis(result)
    with _quiet_pydicom():
        try:
            source = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
            check_source(source)
            objects = build_results(source, analysis, uids=result_uids(source, model_version_tag(analysis)))
        except (ValueError, AttributeError, KeyError, TypeError) as exc:
            # the builders' and highdicom's refusals name attributes and UIDs, never patient values; pydicom's
            # parse errors are reported by type only
            detail = str(exc) if isinstance(exc, ValueError) and "dataset" in str(exc) else type(exc).__name__
            raise BadInput(f"cannot build DICOM results for this file ({detail}); it needs the identifiers of an "
                           "image object (SOP, study and series UIDs)") from exc
        out = {}
        for key, dataset in (("seg", objects.seg), ("sr", objects.sr), ("overlay", objects.overlay)):
            buf = io.BytesIO()
            dataset.save_as(buf, enforce_file_format=True)
            out[key] = buf.getvalue()
    return out
