"""DICOM SEG, SR and overlay built from one analysis (clients/dicom_results.py, dicom_report.py): aligned with and
referencing the source, the coded content the issue asks for, the cases a PACS sends (referred, no PixelSpacing,
MONOCHROME1, multi-frame), and `dciodvfy` (dicom3tools, the reference validator) finds no error in any of them.

The analysis here is made from known arrays (the builders' input is the SDK's Analysis, whichever service made it);
tests/e2e/test_pacs_orthanc.py builds the same objects from a real service's answers."""

from __future__ import annotations

import io

import numpy as np
import pytest

hd = pytest.importorskip("highdicom")
from PIL import Image  # noqa: E402

from braintumor.clients import dicom_codes as codes  # noqa: E402
from braintumor.clients.dicom_results import build_results  # noqa: E402
from braintumor.clients.dicom_study import StudyOptions, mr_slices, multiframe  # noqa: E402
from braintumor.clients.results import Analysis  # noqa: E402

YY, XX = np.mgrid[0:96, 0:80]
HEAD = (((YY - 48) / 40.0) ** 2 + ((XX - 40) / 34.0) ** 2) <= 1
BLOB = (((YY - 40) / 8.0) ** 2 + ((XX - 45) / 7.0) ** 2) <= 1
PIXELS = (HEAD * 90 + BLOB * 100).astype(np.uint8)
PROBS = {"glioma": 0.8, "meningioma": 0.1, "pituitary": 0.06, "no_tumor": 0.04}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def analysis(mask: np.ndarray = BLOB, **changes) -> Analysis:
    overlay = np.stack([PIXELS, PIXELS, np.maximum(PIXELS, mask.astype(np.uint8) * 255)], -1)
    fields = dict(label="glioma", probabilities=PROBS, refer=False, refer_reason=None,
                  tumor_area_px=int(mask.sum()), tumor_area_mm2=float(mask.sum()) * 0.25,
                  mask_png=_png(mask.astype(np.uint8) * 255), heatmap_png=b"", overlay_png=_png(overlay),
                  model_name="brain_tumor", model_version="7", image_height=96, image_width=80)
    return Analysis(**{**fields, **changes})


def _items(dataset):
    """Every content item of an SR tree, depth first."""
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _coded(sr) -> dict[str, str]:
    """concept name meaning -> coded value meaning, for the CODE items of an SR."""
    return {i.ConceptNameCodeSequence[0].CodeMeaning: i.ConceptCodeSequence[0].CodeValue
            for i in _items(sr) if i.ValueType == "CODE"}


def _numbers(sr) -> dict[tuple[str, str], float]:
    return {(i.ConceptNameCodeSequence[0].CodeMeaning,
             i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue):
            float(i.MeasuredValueSequence[0].NumericValue) for i in _items(sr) if i.ValueType == "NUM"}


def _valid(dciodvfy, results, tmp_path):
    for kind, ds in zip(("seg", "sr", "overlay"), results.datasets()):
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy(path) == [], f"{kind}: dciodvfy errors"


def test_seg_sr_and_overlay_of_one_analysis(tmp_path, dciodvfy):
    source = mr_slices([PIXELS])[0]
    results = build_results(source, analysis())
    seg, sr, overlay = results.seg, results.sr, results.overlay
    # the SEG: the mask on the source grid, referencing instance, series and frame of reference
    np.testing.assert_array_equal(np.asarray(seg.pixel_array).reshape(96, 80), BLOB.astype(np.uint8))
    assert seg.SegmentationType == "BINARY" and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    series = seg.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "tumour"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("brain_tumor", "7")
    # the SR: finding, probabilities, area in mm2 and pixels, refer No, and the SEG referenced
    assert _coded(sr)["Finding"] == "393564001" and _coded(sr)["Referred for human review"] == "373067005"
    numbers = _numbers(sr)
    assert numbers[("Area", "mm2")] == pytest.approx(BLOB.sum() * 0.25)
    assert numbers[("Area", "{pixels}")] == BLOB.sum()
    assert {label: numbers[(f"Probability of {label}", "1")] for label in PROBS} == pytest.approx(PROBS)
    referenced = {r.ReferencedSOPInstanceUID for i in _items(sr) for r in i.get("ReferencedSOPSequence", [])}
    assert {seg.SOPInstanceUID, source.SOPInstanceUID} <= referenced
    # the overlay: labelled as an explanation in its pixels' owner attributes
    assert "not a finding" in overlay.SeriesDescription and "NOT A FINDING" in overlay.ImageComments
    assert overlay.pixel_array.shape == (96, 80, 3) and overlay.LossyImageCompression == "01"
    assert overlay.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # patient and study are copied from the source into every object (that is how a PACS files them)
    for ds in results.datasets():
        assert (ds.PatientID, ds.PatientName, ds.StudyInstanceUID) == (source.PatientID, source.PatientName,
                                                                         source.StudyInstanceUID)
        assert ds.AccessionNumber == source.AccessionNumber
    _valid(dciodvfy, results, tmp_path)


def test_a_referred_slice_says_so_with_its_reasons(tmp_path, dciodvfy):
    source = mr_slices([PIXELS])[0]
    reasons = ("max probability 0.400 is under the model's refer threshold 0.600",
               "mask and label disagree: no_tumor with a predicted tumour mask of 90 model-input pixels")
    results = build_results(source, analysis(label="no_tumor", refer=True, refer_reason="; ".join(reasons),
                                             refer_reasons=reasons))
    items = [i for i in _items(results.sr) if i.ValueType == "CODE"]
    assert _coded(results.sr)["Referred for human review"] == "373066001"
    assert {i.ConceptCodeSequence[0].CodeValue for i in items
            if i.ConceptNameCodeSequence[0].CodeValue == "REFREASON"} == {"LOWCONF", "DISAGREE"}
    assert _coded(results.sr)["Finding"] == codes.FINDINGS["no_tumor"].value
    _valid(dciodvfy, results, tmp_path)


def test_a_slice_without_pixel_spacing(tmp_path, dciodvfy):
    source = mr_slices([PIXELS], StudyOptions(spacing_mm=None))[0]
    results = build_results(source, analysis(tumor_area_mm2=None))
    numbers = _numbers(results.sr)
    assert ("Area", "mm2") not in numbers and numbers[("Area", "{pixels}")] == BLOB.sum()
    np.testing.assert_array_equal(np.asarray(results.seg.pixel_array).reshape(96, 80), BLOB.astype(np.uint8))
    _valid(dciodvfy, results, tmp_path)


def test_monochrome1_source(tmp_path, dciodvfy):
    source = mr_slices([PIXELS], StudyOptions(monochrome1=True))[0]
    assert source.PhotometricInterpretation == "MONOCHROME1"
    results = build_results(source, analysis())
    np.testing.assert_array_equal(np.asarray(results.seg.pixel_array).reshape(96, 80), BLOB.astype(np.uint8))
    _valid(dciodvfy, results, tmp_path)


def test_multiframe_source_marks_the_middle_frame(tmp_path, dciodvfy):
    source = multiframe(mr_slices([PIXELS, PIXELS, PIXELS]))
    assert int(source.NumberOfFrames) == 3
    results = build_results(source, analysis())
    frames = np.asarray(results.seg.pixel_array)
    assert frames.shape == (3, 96, 80)
    np.testing.assert_array_equal(frames[1], BLOB.astype(np.uint8))
    assert not frames[0].any() and not frames[2].any()
    assert results.overlay.SourceImageSequence[0].ReferencedFrameNumber == 2
    _valid(dciodvfy, results, tmp_path)


def test_refusals_name_the_problem_without_patient_data():
    source = mr_slices([PIXELS])[0]
    with pytest.raises(ValueError, match="names no model"):
        build_results(source, analysis(model_version=None))
    with pytest.raises(ValueError, match="not of this dataset") as caught:
        build_results(source, analysis(mask_png=_png(np.full((10, 10), 255, np.uint8))))
    assert source.PatientID not in str(caught.value) and str(source.PatientName) not in str(caught.value)
    with pytest.raises(ValueError, match="overlay=True"):
        build_results(source, analysis(overlay_png=None))
    assert build_results(source, analysis(overlay_png=None), overlay=False).overlay is None


def test_the_validator_does_find_errors(tmp_path, dciodvfy):
    """The check above can fail: a SEG without its Segment Sequence is an error to dciodvfy."""
    seg = build_results(mr_slices([PIXELS])[0], analysis(), overlay=False).seg
    del seg.SegmentSequence
    seg.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    assert any("SegmentSequence" in line for line in dciodvfy(tmp_path / "broken.dcm"))


def test_result_uids_are_the_same_for_the_same_source_and_model():
    from braintumor.clients.dicom_results import result_uids

    first, second = mr_slices([PIXELS, PIXELS])
    uids = result_uids(first, "brain_tumor 7")
    assert uids == result_uids(first, "brain_tumor 7")
    assert uids != result_uids(first, "brain_tumor 8")
    other = result_uids(second, "brain_tumor 7")
    assert other["seg_series"] == uids["seg_series"] and other["seg_instance"] != uids["seg_instance"]
    assert len(set(uids.values())) == 6
    results = build_results(first, analysis(), uids=uids)
    assert (results.seg.SOPInstanceUID, results.sr.SOPInstanceUID, results.overlay.SeriesInstanceUID) == (
        uids["seg_instance"], uids["sr_instance"], uids["overlay_series"])


def test_preview_is_rendered_from_the_objects():
    import cv2

    from braintumor.clients.dicom_preview import render, seg_mask

    source = mr_slices([PIXELS])[0]
    results = build_results(source, analysis())
    np.testing.assert_array_equal(seg_mask(results.seg, source), BLOB)
    picture = np.asarray(Image.open(io.BytesIO(render(source, results.seg, results.overlay, height=96))))
    assert picture.shape == (96, 80 + 4 + 80, 3)
    left = picture[:, :80]
    red = (left[..., 0] > 200) & (left[..., 1] < 60)
    near = cv2.dilate(BLOB.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert red.any() and not red[~near].any()  # the outline is drawn on the SEG's boundary, nowhere else
