"""The wire: one pipeline result -> the HTTP JSON body (PNGs as base64) and the gRPC message (PNGs as bytes), side by
side, so a field added to one is visibly missing from the other. A mask asked as COCO RLE is ``mask_rle``
``{"size": [h, w], "counts": str}`` in JSON and the ``MaskRle`` message over gRPC, with no ``mask_png``. The SDK reads
both back into equal results (clients/results.py); tests/integration compare the two doors on the same image.
"""

from __future__ import annotations

import base64

from ..clients.v1 import braintumor_pb2 as pb
from .errors import ServingError
from .postprocess import AnalysisResult


def b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


# -- analysis ----------------------------------------------------------------------------------------------------

def analysis_to_dict(result: AnalysisResult, *, model: bool = True, images: bool = True) -> dict:
    """The JSON of one analysis; ``model=False`` inside a batch answer, which names the model once."""
    out = {
        "label": result.label,
        "probabilities": result.probabilities,
        "refer": result.refer,
        "refer_reason": list(result.refer_reason),
        "tumor_area_px": result.tumor_area_px,
        "tumor_area_mm2": result.tumor_area_mm2,
        "mask_label_disagree": result.mask_label_disagree,
        "image_height": result.original_shape[0],
        "image_width": result.original_shape[1],
    }
    if images:
        out["mask_png"] = b64(result.mask_png)
        out["mask_rle"] = result.mask_rle  # already plain JSON: {"size": [h, w], "counts": str}
        out["heatmap_png"] = b64(result.heatmap_png)
        out["overlay_png"] = b64(result.overlay_png)
        if result.dicom is not None:  # only when asked: {"seg": b64, "sr": b64, "overlay": b64} Part 10 files
            out["dicom"] = {key: b64(value) for key, value in result.dicom.items()}
    if model:
        out["model"] = model_to_dict(result)
    return out


def analysis_message(result: AnalysisResult, request: pb.AnalyzeRequest) -> pb.AnalyzeResponse:
    message = pb.AnalyzeResponse(
        id=request.id,
        label=result.label,
        probabilities=result.probabilities,
        refer=result.refer,
        refer_reason=result.refer_reason,
        tumor_area_px=result.tumor_area_px,
        tumor_area_mm2=result.tumor_area_mm2,  # None leaves the optional field unset
        mask_label_disagree=result.mask_label_disagree,
        image_height=result.original_shape[0],
        image_width=result.original_shape[1],
        model=model_ref(result),
    )
    if not request.skip_images:
        message.mask_png = result.mask_png or b""  # empty when the request asked for mask_format "rle"
        if result.mask_rle is not None:
            message.mask_rle.CopyFrom(mask_rle_message(result.mask_rle))
        message.heatmap_png = result.heatmap_png or b""  # only when the request asked for the heatmap
        message.overlay_png = result.overlay_png or b""
        if result.dicom is not None:
            message.dicom.CopyFrom(pb.DicomResults(**result.dicom))
    return message


def mask_rle_message(rle: dict) -> pb.MaskRle:
    return pb.MaskRle(size=rle["size"], counts=rle["counts"])


# -- errors: HTTP answers error.http_status with this body; gRPC aborts with error.grpc_code, or, for one image of a
# stream, answers error_message ----------------------------------------------------------------------------------

def error_to_dict(error: ServingError) -> dict:
    return {"error": error.kind, "detail": error.message}


def error_message(request: pb.AnalyzeRequest, error: ServingError) -> pb.AnalyzeResponse:
    return pb.AnalyzeResponse(id=request.id, error=pb.Error(code=error.grpc_code, message=error.message))


# -- explanation -------------------------------------------------------------------------------------------------

def explanation_to_dict(explanation) -> dict:
    out = {
        "method": explanation.method,
        "target": explanation.target,
        "label": explanation.label,
        "probabilities": explanation.probabilities,
        "num_samples": explanation.num_samples,
        "seconds": round(float(explanation.seconds), 4),
        "cached": explanation.cached,
        "image_height": explanation.original_shape[0],
        "image_width": explanation.original_shape[1],
        "heatmap_png": b64(explanation.heatmap_png),
        "overlay_png": b64(explanation.overlay_png),
        "model": model_to_dict(explanation),
    }
    return out


def explanation_message(explanation) -> pb.ExplainResponse:
    return pb.ExplainResponse(
        method=explanation.method,
        target=explanation.target,
        label=explanation.label,
        probabilities=explanation.probabilities,
        num_samples=explanation.num_samples or 0,
        seconds=float(explanation.seconds),
        cached=bool(explanation.cached),
        image_height=explanation.original_shape[0],
        image_width=explanation.original_shape[1],
        heatmap_png=explanation.heatmap_png,
        overlay_png=explanation.overlay_png,
        model=model_ref(explanation),
    )


# -- model -------------------------------------------------------------------------------------------------------

# Which model answered: stamped on every analysis and explanation by the pipeline.
def model_to_dict(answer) -> dict:
    return {"name": answer.model_name, "version": answer.model_version}


def model_ref(answer) -> pb.ModelRef:
    return pb.ModelRef(name=answer.model_name, version=answer.model_version)


# The HTTP body of GET /model is ModelInfo.to_dict(); the gRPC message carries the same fields.
def model_info_message(info) -> pb.ModelInfo:
    d = info.to_dict()
    return pb.ModelInfo(name=d["name"], version=d["version"], classes=d["classes"],
                        refer_threshold=d["refer_threshold"], disagree_min_area=d["disagree_min_area"],
                        ood_threshold=d["ood_threshold"], image_size=d["image_size"], geometry=d["geometry"])
