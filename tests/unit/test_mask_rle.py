"""mask_format="rle": the mask as COCO run-length encoding instead of a PNG. The RLE decodes to the PNG path's mask
(real BRISC masks, empty and non-square masks), postprocess makes no PNG for it, the wire carries it in JSON and
protobuf, and the SDK reads and saves the same mask whichever format came."""

import asyncio
import io
import json

import numpy as np
import pytest
from PIL import Image

from braintumor.clients.masks import MASK_FORMATS, check_mask_format, decode_rle, encode_rle, mask_png
from braintumor.clients.results import Analysis
from braintumor.clients.v1 import braintumor_pb2 as pb
from braintumor.serving import postprocess as postprocess_module
from braintumor.serving.errors import BadInput
from braintumor.serving.request import AnalyzeOptions
from braintumor.train.refer import ReferRules
from braintumor.serving.postprocess import encode_png, postprocess
from braintumor.serving.wire import analysis_message, analysis_to_dict
from braintumor.train.decode import DecodedImage
from braintumor.train.naming import CLASSES
from braintumor.train.preprocess import PreprocessConfig, preprocess

coco = pytest.importorskip("pycocotools.mask")

MASKS_PER_SPLIT = 12


def _png_mask(data: bytes) -> np.ndarray:
    """How the SDK reads a PNG mask (grey levels, > 127)."""
    with Image.open(io.BytesIO(data)) as picture:
        return np.asarray(picture.convert("L")) > 127


@pytest.fixture
def brisc_masks(real_data):
    """Real BRISC masks (thresholded at 128, as score's evaluation reads them), spread over the train split."""
    folder = real_data / "segmentation_task" / "train" / "masks"
    paths = sorted(folder.glob("*.png"))
    if not paths:
        pytest.skip(f"real BRISC 2025 masks not found under {folder}")
    picked = paths[:: max(1, len(paths) // MASKS_PER_SPLIT)][:MASKS_PER_SPLIT]
    return [np.asarray(Image.open(p).convert("L")) >= 128 for p in picked]


# -- the encoding itself ---------------------------------------------------------------------------------------

def test_real_masks_round_trip_and_equal_the_png_path(brisc_masks):
    for mask in brisc_masks:
        assert mask.any()
        rle = json.loads(json.dumps(encode_rle(mask)))  # as it travels in JSON
        assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(decode_rle(rle), mask)
        np.testing.assert_array_equal(decode_rle(rle), _png_mask(mask_png(mask)))
        # The standard COCO reader takes the JSON form as it is (counts as str).
        np.testing.assert_array_equal(coco.decode(rle).astype(bool), mask)
        assert coco.area(rle) == mask.sum()
        assert len(rle["counts"]) < len(mask_png(mask))


@pytest.mark.parametrize("shape", [(8, 8), (7, 13), (13, 7), (1, 300), (300, 1), (512, 384)])
@pytest.mark.parametrize("fill", ["empty", "full", "random", "blob"])
def test_round_trip_of_empty_full_and_non_square_masks(shape, fill):
    rng = np.random.default_rng(sum(shape))
    mask = {"empty": lambda: np.zeros(shape, bool), "full": lambda: np.ones(shape, bool),
            "random": lambda: rng.random(shape) > 0.5,
            "blob": lambda: np.pad(np.ones((shape[0] // 2, shape[1] // 2), bool),
                                   ((shape[0] // 4, shape[0] - shape[0] // 4 - shape[0] // 2),
                                    (0, shape[1] - shape[1] // 2)))}[fill]()
    rle = encode_rle(mask.astype(np.uint8))
    assert rle["size"] == list(shape)
    decoded = decode_rle(rle)
    assert decoded.dtype == bool and decoded.shape == shape
    np.testing.assert_array_equal(decoded, mask)
    np.testing.assert_array_equal(_png_mask(mask_png(decoded)), mask)


def test_mask_png_is_the_bytes_serving_sent_before_mask_format():
    """The one mask PNG rule (clients/masks.py) gives the very bytes of the former ``encode_png(mask * 255)``."""
    rng = np.random.default_rng(1)
    for mask in (rng.random((37, 53)) > 0.7, np.zeros((20, 9), bool)):
        assert mask_png(mask) == mask_png(mask.astype(np.uint8)) == encode_png(mask.astype(np.uint8) * np.uint8(255))


@pytest.mark.parametrize("rle, fragment", [
    ({"size": [4], "counts": "0"}, "size="),
    ({"size": [4, 0], "counts": "0"}, "size="),
    ({"size": [4, 4]}, "counts"),
    ({"size": [4, 4], "counts": ""}, "counts"),
    ({"counts": "0"}, "size="),
])
def test_decode_refuses_what_is_not_an_rle(rle, fragment):
    with pytest.raises(ValueError, match=fragment):
        decode_rle(rle)


def test_mask_format_check():
    assert MASK_FORMATS == ("png", "rle")
    assert [check_mask_format(v) for v in (None, "", "png", "rle")] == ["png", "png", "png", "rle"]
    with pytest.raises(ValueError, match="unknown mask_format 'jpeg'; use one of png, rle"):
        check_mask_format("jpeg")
    with pytest.raises(BadInput, match="unknown mask_format 'RLE'; use one of png, rle") as info:
        AnalyzeOptions(mask_format="RLE")
    assert (info.value.http_status, info.value.grpc_code) == (400, "INVALID_ARGUMENT")


def test_the_request_object_is_checked_when_built_and_normalised():
    """Both front doors build AnalyzeOptions before any image work; no later stage checks the format again."""
    assert AnalyzeOptions(mask_format="").mask_format == AnalyzeOptions(mask_format=None).mask_format == "png"
    assert AnalyzeOptions(1, 0, "rle") == AnalyzeOptions(heatmap=True, overlay=False, mask_format="rle")
    with pytest.raises(BadInput, match="use one of png, rle"):
        AnalyzeOptions(mask_format="zip")


# -- postprocess -----------------------------------------------------------------------------------------------

PAD = PreprocessConfig(image_size=40, geometry="pad")


def _case(block=(slice(14, 18), slice(10, 20))):
    rng = np.random.default_rng(0)
    decoded = DecodedImage(rng.integers(30, 200, (40, 80), dtype=np.uint8), "L", False)  # non-square
    _, geometry = preprocess(decoded.pixels, PAD)
    mask = np.zeros((40, 40), np.float32)
    if block is not None:
        mask[block] = 1.0
    outputs = {"class_probs": np.asarray([[0.9, 0.05, 0.03, 0.02]], np.float32), "mask_prob": mask[None, None],
               "cam": np.zeros((1, len(CLASSES), 8, 8), np.float32)}
    return decoded, geometry, outputs


def _run(mask_format, block=(slice(14, 18), slice(10, 20)), **kw):
    decoded, geometry, outputs = _case(block)
    options = AnalyzeOptions(overlay=kw.pop("want_overlay", False), mask_format=mask_format)
    return postprocess(outputs, geometry, decoded, classes=CLASSES, rules=ReferRules(0.8), options=options, **kw)


@pytest.mark.parametrize("block", [(slice(14, 18), slice(10, 20)), None], ids=["tumour", "empty"])
def test_postprocess_rle_gives_the_png_mask_and_encodes_no_png(block, monkeypatch):
    as_png = _run("png", block)
    assert as_png.mask_rle is None and as_png.mask_png.startswith(b"\x89PNG")

    def no_png(*args, **kw):
        raise AssertionError("a PNG was encoded for mask_format='rle'")

    monkeypatch.setattr(postprocess_module, "mask_png", no_png)
    monkeypatch.setattr(postprocess_module, "encode_png", no_png)
    as_rle = _run("rle", block)
    assert as_rle.mask_png is None and as_rle.mask_rle["size"] == [40, 80]
    np.testing.assert_array_equal(decode_rle(as_rle.mask_rle), _png_mask(as_png.mask_png))
    np.testing.assert_array_equal(decode_rle(as_rle.mask_rle), as_png.mask.astype(bool))
    assert as_rle.tumor_area_px == as_png.tumor_area_px == (160 if block else 0)
    assert (as_rle.label, as_rle.refer, as_rle.mask_label_disagree) == (
        as_png.label, as_png.refer, as_png.mask_label_disagree)


def test_overlay_outlines_the_mask_with_rle_too():
    with_png = _run("png", want_overlay=True)
    with_rle = _run("rle", want_overlay=True)
    assert with_rle.overlay_png == with_png.overlay_png
    red = np.all(np.asarray(Image.open(io.BytesIO(with_rle.overlay_png))) == (255, 0, 0), axis=-1)
    assert red.any() and not red[~with_png.mask.astype(bool)].any()


# -- the wire and the SDK ----------------------------------------------------------------------------------------

def _stamped(result):
    from dataclasses import replace

    return replace(result, model_name="brain_tumor", model_version="3")


def _both_doors(result) -> tuple[Analysis, Analysis]:
    """The result as the SDK gets it over HTTP (JSON text) and over gRPC (serialised message)."""
    body = json.loads(json.dumps(analysis_to_dict(result)))
    message = pb.AnalyzeResponse.FromString(analysis_message(result, pb.AnalyzeRequest(id="7")).SerializeToString())
    return Analysis.from_json(body), Analysis.from_message(message)


def test_wire_carries_the_rle_in_json_and_protobuf():
    result = _stamped(_run("rle"))
    body = analysis_to_dict(result)
    assert body["mask_png"] is None and body["mask_rle"] == result.mask_rle
    assert json.loads(json.dumps(body))["mask_rle"] == {"size": [40, 80], "counts": result.mask_rle["counts"]}
    message = pb.AnalyzeResponse.FromString(analysis_message(result, pb.AnalyzeRequest()).SerializeToString())
    assert message.mask_png == b"" and message.HasField("mask_rle")
    assert (list(message.mask_rle.size), message.mask_rle.counts) == ([40, 80], result.mask_rle["counts"])
    skipped = analysis_message(result, pb.AnalyzeRequest(skip_images=True))
    assert not skipped.HasField("mask_rle") and skipped.mask_png == b""

    png_body = analysis_to_dict(_stamped(_run("png")))
    assert png_body["mask_rle"] is None and png_body["mask_png"]
    assert not analysis_message(_stamped(_run("png")), pb.AnalyzeRequest()).HasField("mask_rle")


@pytest.mark.parametrize("block", [(slice(14, 18), slice(10, 20)), None], ids=["tumour", "empty"])
def test_sdk_reads_and_saves_the_same_mask_whichever_format_came(block, tmp_path):
    png_http, png_grpc = _both_doors(_stamped(_run("png", block)))
    rle_http, rle_grpc = _both_doors(_stamped(_run("rle", block)))
    assert rle_http == rle_grpc and png_http == png_grpc
    expected = png_http.mask_array()
    assert expected.shape == (40, 80) and expected.sum() == (160 if block else 0)
    for i, analysis in enumerate((png_http, png_grpc, rle_http, rle_grpc)):
        np.testing.assert_array_equal(analysis.mask_array(), expected)
        assert analysis.mask_png_bytes() == png_http.mask_png  # the server's own PNG, byte for byte
        path = analysis.save_mask(tmp_path / f"mask{i}.png")
        assert path.read_bytes() == png_http.mask_png
    assert rle_http.mask_png == b"" and png_http.mask_rle is None
    row = rle_http.to_dict(images=True)
    assert json.loads(json.dumps(row))["mask_rle"] == rle_http.mask_rle and row["mask_png"] is None
    assert "mask_rle" not in rle_http.to_dict() and png_http.to_dict(images=True)["mask_rle"] is None


def test_sdk_result_without_any_mask_says_so():
    bare = Analysis.from_message(pb.AnalyzeResponse(label="glioma", image_height=4, image_width=4))
    with pytest.raises(ValueError, match="no mask PNG"):
        bare.mask_array()
    with pytest.raises(ValueError, match="no mask PNG"):
        bare.save_mask("unused.png")
