import io

import numpy as np
import pytest
from PIL import Image

from braintumor.serving.postprocess import (
    JET, colourise, gradcam_heatmap, mask_outline, out_of_distribution, overlay, postprocess,
)
from braintumor.serving.request import AnalyzeOptions
from braintumor.train.naming import CLASSES
from braintumor.train.refer import ReferRules
from braintumor.train.decode import DecodedImage
from braintumor.train.preprocess import MASK_THRESHOLD, PreprocessConfig, preprocess

NO_TUMOR_INDEX = CLASSES.index("no_tumor")


def _slice(h=40, w=80) -> DecodedImage:
    """A wide 'head' filling the frame, so pad geometry keeps it whole."""
    rng = np.random.default_rng(0)
    return DecodedImage(rng.integers(30, 200, (h, w), dtype=np.uint8), "L", False)


def _outputs(size, probs=(0.9, 0.05, 0.03, 0.02), block=None, cam_peak=None, batch=True):
    mask = np.zeros((size, size), np.float32)
    if block is not None:
        mask[block] = 1.0
    cam = np.zeros((len(CLASSES), 8, 8), np.float32)
    if cam_peak is not None:
        cls, y, x = cam_peak
        cam[cls, y, x] = 3.0
        cam[cls, 0, 0] = -2.0  # negative evidence is cut by the ReLU
        cam[(cls + 1) % len(CLASSES), 7 - y, 7 - x] = 9.0  # another class peaks elsewhere
    out = {"class_probs": np.asarray(probs, np.float32), "mask_prob": mask, "cam": cam}
    if batch:
        out = {"class_probs": out["class_probs"][None], "mask_prob": mask[None, None], "cam": cam[None]}
    return out


def _run(decoded, outputs, geometry, *, refer_threshold=0.8, disagree_min_area=None, ood_threshold=None,
         want_heatmap=False, want_overlay=False, mask_format="png", **kw):
    rules = ReferRules(refer_threshold, disagree_min_area, ood_threshold)
    options = AnalyzeOptions(heatmap=want_heatmap, overlay=want_overlay, mask_format=mask_format)
    return postprocess(outputs, geometry, decoded, classes=CLASSES, rules=rules, options=options, **kw)


def _png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# pad geometry on a 40x80 slice at size 40: the 80x80 square (20 rows of padding above and below) is
# halved, so model rows [14:18] are square rows [28:36] = original rows [8:16], model cols [10:20] = [20:40].
PAD = PreprocessConfig(image_size=40, geometry="pad")


def test_mask_maps_back_to_the_original_geometry_with_exact_area():
    decoded = _slice()
    _, geom = preprocess(decoded.pixels, PAD)
    assert geom.pad[:2] == (20, 20) and geom.size == 40
    result = _run(decoded, _outputs(40, block=(slice(14, 18), slice(10, 20))), geom)
    expected = np.zeros((40, 80), np.uint8)
    expected[8:16, 20:40] = 1
    np.testing.assert_array_equal(result.mask, expected)
    assert result.tumor_area_px == 160 and result.tumor_area_mm2 is None
    assert result.original_shape == (40, 80)
    np.testing.assert_array_equal(np.asarray(_png(result.mask_png)), expected * 255)


def test_area_in_mm2_from_pixel_spacing():
    decoded = _slice()
    _, geom = preprocess(decoded.pixels, PAD)
    result = _run(decoded, _outputs(40, block=(slice(14, 18), slice(10, 20))), geom, pixel_spacing_mm=(0.5, 0.8))
    assert result.tumor_area_px == 160
    assert result.tumor_area_mm2 == pytest.approx(64.0)


def test_mask_threshold_applies_to_probabilities():
    decoded = _slice(32, 32)
    _, geom = preprocess(decoded.pixels, PreprocessConfig(image_size=32, geometry="resize"))
    outputs = _outputs(32)
    outputs["mask_prob"][0, 0, 4:8, 4:8] = MASK_THRESHOLD
    outputs["mask_prob"][0, 0, 20:24, 20:24] = np.nextafter(np.float32(MASK_THRESHOLD), np.float32(0))
    assert _run(decoded, outputs, geom).tumor_area_px == 16  # at the threshold is tumour, just under is not


@pytest.mark.parametrize(
    "probs, threshold, refer, reason",
    [
        ((0.61, 0.2, 0.1, 0.09), 0.83, True, "max probability 0.610 is under the model's refer threshold 0.830"),
        ((0.9, 0.05, 0.03, 0.02), 0.83, False, None),
        ((0.83, 0.07, 0.05, 0.05), 0.83, False, None),  # at the threshold is confident enough
        ((0.4, 0.3, 0.2, 0.1), None, False, None),  # no threshold in the metadata: only OOD refers
    ],
)
def test_refer_by_threshold(probs, threshold, refer, reason):
    decoded = _slice(32, 32)
    _, geom = preprocess(decoded.pixels, PreprocessConfig(image_size=32, geometry="resize"))
    result = _run(decoded, _outputs(32, probs=probs), geom, refer_threshold=threshold)
    assert result.refer is refer
    assert result.refer_reason == ([reason] if reason else [])
    assert result.label == CLASSES[int(np.argmax(probs))]
    assert result.probabilities == pytest.approx(dict(zip(CLASSES, probs)))


def _blank_with_specks():
    pixels = np.zeros((64, 64), np.uint8)
    pixels[0, :10] = 200  # 10 / 4096 = 0.24% foreground, std well above 2
    return pixels


@pytest.mark.parametrize(
    "decoded, modality, fragments",
    [
        (DecodedImage(np.full((32, 32), 90, np.uint8), "RGB", True), None,
         ["colour photograph, not an MRI slice", "blank or near-constant image"]),
        (DecodedImage(np.full((32, 32), 90, np.uint8), "L", False), None, ["blank or near-constant image"]),
        (DecodedImage(np.zeros((32, 32), np.uint8), "L", False), None, ["blank or near-constant image"]),
        (DecodedImage(_blank_with_specks(), "L", False), None, ["mostly blank image: 0.24% of pixels"]),
        (_slice(32, 32), "CT", ["DICOM modality CT, not MR"]),
        (_slice(32, 32), "MR", []),
        (_slice(32, 32), None, []),
    ],
)
def test_out_of_distribution_reasons_and_refer(decoded, modality, fragments):
    reasons = out_of_distribution(decoded, modality=modality)
    assert len(reasons) == len(fragments)
    for reason, fragment in zip(reasons, fragments):
        assert reason.startswith(fragment)
    _, geom = preprocess(decoded.pixels, PreprocessConfig(image_size=32, geometry="resize"))
    result = _run(decoded, _outputs(32, probs=(0.97, 0.01, 0.01, 0.01)), geom, modality=modality)
    assert result.refer is bool(fragments) and result.refer_reason == reasons


def test_pngs_decode_to_the_original_size_and_modes():
    decoded = _slice()
    _, geom = preprocess(decoded.pixels, PAD)
    outputs = _outputs(40, block=(slice(14, 18), slice(10, 20)), cam_peak=(0, 3, 3))
    result = _run(decoded, outputs, geom, want_overlay=True, want_heatmap=True)
    for data, mode in ((result.mask_png, "L"), (result.heatmap_png, "RGB"), (result.overlay_png, "RGB")):
        img = _png(data)
        assert img.format == "PNG" and img.mode == mode and img.size == (80, 40)
    assert set(np.unique(np.asarray(_png(result.mask_png)))) <= {0, 255}
    np.testing.assert_array_equal(np.asarray(_png(result.heatmap_png)), JET[result.heatmap])
    assert _run(decoded, _outputs(40), geom).overlay_png is None


def test_heatmap_only_on_demand():
    """Without want_heatmap the answer has the mask but no heatmap (neither mapped nor encoded); an overlay still
    blends the same heatmap in, without returning its PNG."""
    decoded = _slice()
    _, geom = preprocess(decoded.pixels, PAD)
    outputs = _outputs(40, block=(slice(14, 18), slice(10, 20)), cam_peak=(0, 3, 3))
    plain = _run(decoded, outputs, geom)
    asked = _run(decoded, outputs, geom, want_heatmap=True)
    overlaid = _run(decoded, outputs, geom, want_overlay=True)
    assert plain.heatmap_png is None and plain.heatmap is None and plain.overlay_png is None
    assert plain.mask_png == asked.mask_png and plain.probabilities == asked.probabilities
    assert asked.heatmap.max() > 0
    np.testing.assert_array_equal(np.asarray(_png(asked.heatmap_png)), JET[asked.heatmap])
    assert overlaid.heatmap_png is None and overlaid.overlay_png == _run(
        decoded, outputs, geom, want_overlay=True, want_heatmap=True).overlay_png


def test_heatmap_peak_lands_where_the_cam_peak_was():
    # resize geometry 64x64 -> 32: CAM cell (y, x) of the 8x8 grid covers original pixels [8y:8y+8, 8x:8x+8].
    decoded = _slice(64, 64)
    _, geom = preprocess(decoded.pixels, PreprocessConfig(image_size=32, geometry="resize"))
    probs = np.full(len(CLASSES), 0.05)
    probs[2] = 0.85
    result = _run(decoded, _outputs(32, probs=probs, cam_peak=(2, 2, 5)), geom, want_heatmap=True)
    assert result.label == CLASSES[2]
    heat = result.heatmap
    assert heat.shape == (64, 64) and heat.max() == 255 and heat.min() == 0
    peak_y, peak_x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 16 <= peak_y < 24 and 40 <= peak_x < 48
    hot = np.argwhere(heat == 255)
    assert hot.min(0).tolist() >= [16, 40] and hot.max(0).tolist() < [24, 48]
    assert tuple(np.asarray(_png(result.heatmap_png))[peak_y, peak_x]) == tuple(JET[255])
    assert heat[:8, :8].max() == 0  # the negative cell is cut to zero, not a cold spot below zero


def test_heatmap_of_a_chosen_class_and_of_no_evidence():
    decoded = _slice(64, 64)
    _, geom = preprocess(decoded.pixels, PreprocessConfig(image_size=32, geometry="resize"))
    cam = _outputs(32, cam_peak=(2, 2, 5), batch=False)["cam"]
    other = gradcam_heatmap(cam, 3, geom)  # class 3 peaks at the mirrored cell (5, 2)
    y, x = np.unravel_index(np.argmax(other), other.shape)
    assert 40 <= y < 48 and 16 <= x < 24
    np.testing.assert_array_equal(gradcam_heatmap(-np.ones((4, 8, 8), np.float32), 0, geom), 0)


def test_heatmap_follows_the_crop_of_crop_pad():
    pixels = np.zeros((64, 96), np.uint8)
    pixels[16:48, 32:64] = 120  # head box 32x32 at rows 16..48, cols 32..64
    cfg = PreprocessConfig(image_size=32, geometry="crop_pad", crop_margin=0)
    _, geom = preprocess(pixels, cfg)
    assert geom.crop == (16, 48, 32, 64) and geom.pad == (0, 0, 0, 0)
    heat = gradcam_heatmap(_outputs(32, cam_peak=(0, 0, 7), batch=False)["cam"], 0, geom)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 16 <= y < 20 and 60 <= x < 64  # top-right cell of the head box, not of the whole image
    assert heat[:16].max() == 0 and heat[:, :32].max() == 0  # outside the crop the model saw nothing


@pytest.mark.parametrize(
    "label_index, block, area, min_area, disagree",
    [
        (NO_TUMOR_INDEX, (slice(4, 8), slice(4, 8)), 64, 10.0, True),  # 16 model-input px > 10: kept, flagged
        (NO_TUMOR_INDEX, (slice(4, 8), slice(4, 8)), 64, 16.0, False),  # at the fitted area: allowed
        # A model without a fitted area never flags no_tumor for its mask (train/refer.py's rule, as the card)
        (NO_TUMOR_INDEX, (slice(4, 8), slice(4, 8)), 64, None, False),
        (NO_TUMOR_INDEX, None, 0, None, False),
        (0, (slice(4, 8), slice(4, 8)), 64, None, False),
        (0, None, 0, None, True),  # a tumour label without a mask disagrees too
        (0, None, 0, 10.0, True),
    ],
)
def test_mask_label_disagreement(label_index, block, area, min_area, disagree):
    decoded = _slice(64, 64)
    _, geom = preprocess(decoded.pixels, PreprocessConfig(image_size=32, geometry="resize"))
    probs = np.full(len(CLASSES), 0.02)
    probs[label_index] = 0.94
    result = _run(decoded, _outputs(32, probs=probs, block=block), geom, disagree_min_area=min_area)
    assert result.label == CLASSES[label_index]
    assert result.tumor_area_px == area and result.mask_label_disagree is disagree
    assert result.refer is (disagree and min_area is not None)  # disagreement refers only with a fitted area
    assert int(np.asarray(_png(result.mask_png)).astype(bool).sum()) == area


def test_batch_dimension_is_optional():
    decoded = _slice()
    _, geom = preprocess(decoded.pixels, PAD)
    kw = dict(block=(slice(14, 18), slice(10, 20)), cam_peak=(0, 3, 3))
    a = _run(decoded, _outputs(40, batch=True, **kw), geom, want_heatmap=True)
    b = _run(decoded, _outputs(40, batch=False, **kw), geom, want_heatmap=True)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.heatmap, b.heatmap)
    assert a.mask_png == b.mask_png and a.heatmap_png == b.heatmap_png


def test_contract_mismatches_raise():
    decoded = _slice()
    _, geom = preprocess(decoded.pixels, PAD)
    outputs = _outputs(40)
    with pytest.raises(ValueError, match="3 classes"):
        _run(decoded, {**outputs, "class_probs": np.ones((1, 3), np.float32) / 3}, geom)
    with pytest.raises(KeyError, match="'cam' is missing"):
        _run(decoded, {k: v for k, v in outputs.items() if k != "cam"}, geom)
    with pytest.raises(ValueError, match="model input size 40"):
        _run(decoded, {**outputs, "mask_prob": np.zeros((1, 1, 32, 32), np.float32)}, geom)
    with pytest.raises(ValueError, match="expected one image"):
        _run(decoded, {**outputs, "cam": np.zeros((2, 4, 8, 8), np.float32)}, geom)
    with pytest.raises(ValueError, match="NaN"):
        _run(decoded, {**outputs, "class_probs": np.array([np.nan, 0, 0, 1], np.float32)}, geom)


def test_mask_outline_and_overlay():
    mask = np.zeros((7, 7), np.uint8)
    mask[1:6, 1:6] = 1
    ring = mask_outline(mask)
    assert ring.sum() == 16 and not ring[2:5, 2:5].any() and ring[1, 1:6].all()
    edge = np.zeros((7, 7), np.uint8)
    edge[:3, :3] = 1  # touches the border: the border closes it
    assert mask_outline(edge).sum() == 8
    pixels = np.full((7, 7), 100, np.uint8)
    heat = np.zeros((7, 7), np.uint8)
    heat[3, 3] = 255
    out = overlay(pixels, mask, heat)
    assert out.shape == (7, 7, 3) and out.dtype == np.uint8
    assert (out[ring] == (255, 0, 0)).all()
    assert tuple(out[0, 0]) == (100, 100, 100)  # no heat, no mask: the slice as it is
    assert tuple(out[3, 3]) == tuple(np.rint(0.5 * 100 + 0.5 * JET[255].astype(float)).astype(int))


def test_jet_table_runs_blue_to_red():
    assert JET.shape == (256, 3) and JET.dtype == np.uint8
    assert tuple(JET[0]) == (0, 0, 128) and tuple(JET[255]) == (128, 0, 0)
    assert colourise(np.array([[0, 255]], np.uint8)).shape == (1, 2, 3)


@pytest.mark.parametrize("probs, block, min_area, reason", [
    # no_tumor, but 4x10 = 40 model-input mask pixels, above the fitted 20: referred with the reason
    ((0.02, 0.03, 0.05, 0.9), (slice(14, 18), slice(10, 20)), 20.0,
     "mask and label disagree: no_tumor with a predicted tumour mask of 40 model-input pixels"),
    ((0.02, 0.03, 0.05, 0.9), (slice(14, 18), slice(10, 20)), 40.0, None),  # at the fitted area: accepted
    ((0.9, 0.05, 0.03, 0.02), None, 20.0, "mask and label disagree: glioma with a predicted tumour mask of 0"),
    ((0.9, 0.05, 0.03, 0.02), (slice(14, 18), slice(10, 20)), 20.0, None),
])
def test_mask_label_disagreement_refers_with_the_fitted_area(probs, block, min_area, reason):
    order = [CLASSES.index(c) for c in ("glioma", "meningioma", "pituitary", "no_tumor")]
    probs = tuple(np.asarray(probs)[np.argsort(order)])
    decoded = _slice()
    _, geom = preprocess(decoded.pixels, PAD)
    result = _run(decoded, _outputs(40, probs=probs, block=block), geom, refer_threshold=0.5,
                  disagree_min_area=min_area)
    assert result.mask_label_disagree is (reason is not None)
    assert result.refer is (reason is not None)
    if reason:
        assert len(result.refer_reason) == 1 and result.refer_reason[0].startswith(reason)


def test_report_and_api_heatmaps_are_the_same_rule():
    """train/evaluate (the report), train/gradcam (the torch explainer) and the API's gradcam_heatmap agree exactly
    on one CAM: they all call train/heatmap.cam_heatmap."""
    torch = pytest.importorskip("torch")
    from braintumor.train.evaluate import cams_for_classes
    from braintumor.train.heatmap import cam_heatmap, heatmap_levels

    rng = np.random.default_rng(3)
    cams = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    size = 32
    square = np.full((size, size), 100, np.uint8)
    geom = preprocess(square, PreprocessConfig(image_size=size, geometry="resize"))[1]  # the identity geometry
    report = cams_for_classes(cams, np.array([1, 2]), size)
    for i, c in enumerate((1, 2)):
        np.testing.assert_array_equal(report[i], cam_heatmap(cams[i, c], size))
        np.testing.assert_array_equal(gradcam_heatmap(cams[i], c, geom), heatmap_levels(report[i]))

    class CamModel(torch.nn.Module):  # serves fixed CAMs through the interface train/gradcam.py reads
        def forward_features(self, x):
            return x

        def class_activation_maps(self, features):
            return torch.from_numpy(cams)

    from braintumor.train.gradcam import grad_cam

    maps = grad_cam(CamModel(), torch.zeros(2, 1, size, size), [1, 2]).numpy()
    np.testing.assert_array_equal(maps, report)


@pytest.mark.parametrize(("score", "threshold", "refer"), [
    (500.0, 120.0, True),  # far from the training slices
    (80.0, 120.0, False),
    (120.0, 120.0, False),  # referred only above the threshold
    (500.0, None, False),  # a model without a fitted OOD threshold: only the heuristics
])
def test_learned_ood_score_refers_above_the_threshold(score, threshold, refer):
    decoded = _slice()
    _, geom = preprocess(decoded.pixels, PAD)
    outputs = {**_outputs(40, probs=(0.97, 0.01, 0.01, 0.01)), "ood_score": np.array([[score]], np.float32)}
    result = _run(decoded, outputs, geom, ood_threshold=threshold)
    assert result.refer is refer
    ood = [r for r in result.refer_reason if r.startswith("out_of_distribution:")]
    assert len(ood) == int(refer) and len(result.refer_reason) == int(refer)
    if refer:
        assert f"{score:.1f}" in ood[0] and f"{threshold:.1f}" in ood[0]


def test_learned_ood_score_joins_the_heuristic_reasons():
    blank = DecodedImage(np.zeros((40, 80), np.uint8), "L", False)
    _, geom = preprocess(blank.pixels, PAD)
    outputs = {**_outputs(40, probs=(0.97, 0.01, 0.01, 0.01)), "ood_score": np.array([[900.0]], np.float32)}
    reasons = _run(blank, outputs, geom, ood_threshold=100.0).refer_reason
    assert reasons[0].startswith("out_of_distribution:") and reasons[1].startswith("blank or near-constant")


def test_a_model_with_an_ood_threshold_must_send_the_score():
    decoded = _slice()
    _, geom = preprocess(decoded.pixels, PAD)
    with pytest.raises(KeyError, match="ood_score"):
        _run(decoded, _outputs(40), geom, ood_threshold=100.0)
    with pytest.raises(ValueError, match="ood_score"):
        _run(decoded, {**_outputs(40), "ood_score": np.array([[np.nan]], np.float32)}, geom, ood_threshold=1.0)
