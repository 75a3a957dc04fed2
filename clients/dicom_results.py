"""DICOM results of one analysis, built client-side from the source dataset and the service's answer: a binary DICOM
SEG (one segment "tumour"), a TID 1500 structured report (clients/dicom_report.py) and a Secondary Capture of the
Grad-CAM overlay labelled as a model explanation. Needs the ``dicom`` extra (highdicom); no server, no torch.

Patient and study identifiers are copied from the source into these objects by highdicom (that is how a PACS files
them); nothing here logs, prints or returns them anywhere else. Error messages name UIDs and tags, never values of
patient attributes.

    from braintumor.clients.dicom_results import build_results
    results = build_results(pydicom.dcmread("slice.dcm"), client.analyze("slice.dcm", overlay=True))
    results.seg.save_as("seg.dcm"); results.sr.save_as("sr.dcm"); results.overlay.save_as("overlay.dcm")
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from . import dicom_codes as c
from .dicom_codes import MANUFACTURER, SERIES_NUMBERS, highdicom, model_version_tag
from .dicom_report import build_report


@dataclass(frozen=True)
class DicomResults:
    """The three objects of one analysis, as pydicom datasets (``save_as`` writes a Part 10 file)."""

    seg: object  # highdicom.seg.Segmentation
    sr: object  # highdicom.sr.Comprehensive3DSR
    overlay: object | None  # highdicom.sc.SCImage; None when the analysis had no overlay

    def datasets(self) -> list:
        return [d for d in (self.seg, self.sr, self.overlay) if d is not None]


def check_source(source) -> None:
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")
               if k not in source]
    if missing:
        raise ValueError(f"the source dataset lacks {', '.join(missing)}; pass the DICOM slice that was analysed")


_DATE_TIME = {"DA": "DA", "TM": "TM", "DT": "DT"}
# Type 2 attributes of the patient and study modules our objects copy (present, possibly empty, in every image object
# that follows the standard; a sloppy file may lack some, and highdicom reads them all).
_TYPE2 = {"PatientName": "PN", "PatientID": "LO", "PatientBirthDate": "DA", "PatientSex": "CS", "StudyDate": "DA",
          "StudyTime": "TM", "ReferringPhysicianName": "PN", "StudyID": "SH", "AccessionNumber": "SH"}


def readable(source):
    """``source``, or a copy whose malformed dates and times (e.g. a DA written 1971-02-03, which highdicom cannot
    copy) are emptied and whose missing Type 2 patient/study attributes are added empty: a PACS holds such files, and
    their results must still be filed with the study. Values are never quoted in errors."""
    from pydicom import valuerep
    from pydicom.datadict import tag_for_keyword

    missing = [keyword for keyword in _TYPE2 if keyword not in source]
    bad = []
    for element in source:
        if element.VR in _DATE_TIME and element.value not in (None, ""):
            try:
                getattr(valuerep, _DATE_TIME[element.VR])(element.value)
            except (ValueError, TypeError):
                bad.append(element.tag)
    if not bad and not missing:
        return source
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset

    fixed = Dataset()  # the same elements (pixel data shared, not copied), the bad ones replaced by empty ones
    for element in source:
        fixed.add(DataElement(element.tag, element.VR, "") if element.tag in bad else element)
    for keyword in missing:
        fixed.add(DataElement(tag_for_keyword(keyword), _TYPE2[keyword], ""))
    if getattr(source, "file_meta", None) is not None:
        fixed.file_meta = source.file_meta
    return fixed


def _frames(source) -> int:
    return max(1, int(source.get("NumberOfFrames", 1) or 1))


def source_mask(source, analysis) -> np.ndarray:
    """The analysis mask (0/1) on the source's pixel grid; for a multi-frame source, (frames, rows, cols) with the
    mask on the middle frame (the one the service decodes) and empty frames elsewhere."""
    mask = (np.asarray(analysis.mask_array()) > 0).astype(np.uint8)
    rows, cols = int(source.Rows), int(source.Columns)
    if mask.shape != (rows, cols):
        raise ValueError(f"the mask is {mask.shape[1]}x{mask.shape[0]} but the source is {cols}x{rows}: the analysis "
                         "is not of this dataset")
    frames = _frames(source)
    if frames == 1:
        return mask
    stack = np.zeros((frames, rows, cols), np.uint8)
    stack[frames // 2] = mask
    return stack


def build_seg(source, analysis, *, series_instance_uid: str | None = None, sop_instance_uid: str | None = None):
    """A binary DICOM SEG of the analysis mask: one segment "tumour" (SNOMED CT Morphologically Abnormal Structure /
    Neoplasm), the algorithm named with the model version, aligned to the source's pixel grid and referencing the
    source instance, series and frame of reference (highdicom copies the references and patient/study modules)."""
    hd = highdicom()
    from pydicom.uid import generate_uid

    check_source(source)
    tag = model_version_tag(analysis)
    algorithm = hd.AlgorithmIdentificationSequence(name=analysis.model_name, family=c.ALGORITHM_FAMILY,
                                                   version=analysis.model_version)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="tumour", segmented_property_category=c.SEGMENT_CATEGORY,
        segmented_property_type=c.SEGMENT_TYPE, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_uid=generate_uid(), tracking_id="tumour")
    seg = hd.seg.Segmentation(
        source_images=[_grid_source(source)], pixel_array=source_mask(source, analysis),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=series_instance_uid or generate_uid(), series_number=SERIES_NUMBERS["seg"],
        sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=analysis.model_name, software_versions=tag, device_serial_number=analysis.model_version,
        series_description=c.SEG_SERIES_DESCRIPTION, content_label="TUMOUR", content_description=f"{tag} tumour mask",
        omit_empty_frames=False)
    if "PatientOrientation" not in seg and "ImageOrientationPatient" not in seg:
        seg.PatientOrientation = list(_patient_orientation(source))  # Type 2C without patient-frame geometry
    return seg


# Without PixelSpacing a slice has no physical geometry, so its SEG lives in the pixel matrix (the frame of reference
# is still referenced): highdicom places a SEG in the patient frame only from position, orientation and spacing.
_PATIENT_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient")


def _grid_source(source):
    if "PixelSpacing" in source or "SharedFunctionalGroupsSequence" in source:
        return source
    from pydicom.dataset import Dataset

    bare = Dataset()
    for element in source:
        if element.keyword not in _PATIENT_GEOMETRY and element.keyword != "PixelData":
            bare.add(element)
    bare.file_meta = getattr(source, "file_meta", None)
    return bare


def overlay_pixels(analysis) -> np.ndarray:
    """The service's overlay (slice + Grad-CAM + mask outline, RGB) with :data:`c.EXPLANATION_LABEL` burned in at the
    top left, so a viewer that shows only pixels still says what it is."""
    from PIL import Image, ImageDraw

    if not analysis.overlay_png:
        raise ValueError("this analysis has no overlay: call analyze(..., overlay=True) to build the explanation image")
    with Image.open(io.BytesIO(analysis.overlay_png)) as picture:
        image = picture.convert("RGB")
    draw = ImageDraw.Draw(image)
    size = max(8, image.height // 32)
    try:
        from PIL import ImageFont

        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        font = None
    box = draw.textbbox((2, 2), c.EXPLANATION_LABEL, font=font)
    draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((2, 2), c.EXPLANATION_LABEL, fill=(255, 255, 0), font=font)
    return np.asarray(image, dtype=np.uint8)


def build_overlay(source, analysis, *, series_instance_uid: str | None = None, sop_instance_uid: str | None = None):
    """A Secondary Capture of the Grad-CAM overlay on the slice, labelled in its pixels, series description and
    comments as a model explanation, not a finding. Patient and study are copied from the source."""
    hd = highdicom()
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    check_source(source)
    tag = model_version_tag(analysis)
    pixels = overlay_pixels(analysis)
    if pixels.shape[:2] != (int(source.Rows), int(source.Columns)):
        raise ValueError("the overlay's size differs from the source's: the analysis is not of this dataset")
    spacing = _pixel_spacing(source)
    # JPEG baseline (lossy, marked so by highdicom): an explanation picture, not diagnostic pixels; ~50 kB instead of
    # ~790 kB uncompressed (RLE: ~460 kB) for a 512 px slice.
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="YBR_FULL_422", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_instance_uid or generate_uid(),
        series_number=SERIES_NUMBERS["overlay"], sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1, manufacturer=MANUFACTURER, pixel_spacing=spacing,
        patient_orientation=_patient_orientation(source), transfer_syntax_uid=JPEGBaseline8Bit)
    sc.LossyImageCompression, sc.LossyImageCompressionMethod = "01", "ISO_10918_1"
    sc.LossyImageCompressionRatio = round(pixels.nbytes / max(1, len(sc.PixelData)), 1)
    sc.SeriesDescription = c.OVERLAY_SERIES_DESCRIPTION
    sc.ImageComments = f"{c.EXPLANATION_LABEL}. Grad-CAM of the class {analysis.label!r} by {tag}; not a diagnosis."
    sc.DerivationDescription = f"Grad-CAM heatmap of {tag} blended on the source slice"
    if "Laterality" not in sc:
        sc.Laterality = ""  # Type 2C in General Series; the head is not a paired structure, so empty
    sc.BurnedInAnnotation = "NO"  # the burned-in label identifies no patient
    sc.SourceImageSequence = _source_reference(source)
    return sc


def _pixel_spacing(source) -> tuple[float, float] | None:
    value = source.get("PixelSpacing")
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def _patient_orientation(source) -> tuple[str, str]:
    """PatientOrientation (required in an SC without a frame of reference): the source's, else from its
    ImageOrientationPatient, else ("", "") is not allowed, so the most common axial convention (L, P)."""
    value = source.get("PatientOrientation")
    if value and len(value) == 2:
        return tuple(str(v) for v in value)
    iop = source.get("ImageOrientationPatient")
    if iop and len(iop) == 6:
        return _direction(iop[:3]), _direction(iop[3:])
    return ("L", "P")


def _direction(vector) -> str:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    axis = int(np.argmax(np.abs(np.asarray(vector, float))))
    return letters[axis][0 if float(vector[axis]) > 0 else 1]


def _source_reference(source):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if _frames(source) > 1:
        item.ReferencedFrameNumber = _frames(source) // 2 + 1
    return Sequence([item])


def result_uids(source, model_tag: str) -> dict[str, str]:
    """Series and instance UIDs of our three objects for ``source`` and one model version, the same on every run (a
    hash of the source's UIDs and the model tag, under pydicom's UID root): the same results stored twice are the
    same instances, and a PACS that has them can be asked (`braintumor pacs` skips what is already stored)."""
    return uids_for(str(source.SeriesInstanceUID), str(source.SOPInstanceUID), model_tag)


def uids_for(series: str, instance: str, model_tag: str) -> dict[str, str]:
    """:func:`result_uids` from the source's series and instance UIDs."""
    from pydicom.uid import generate_uid

    out = {}
    for kind in SERIES_NUMBERS:
        out[f"{kind}_series"] = generate_uid(entropy_srcs=["braintumor", model_tag, kind, series])
        out[f"{kind}_instance"] = generate_uid(entropy_srcs=["braintumor", model_tag, kind, series, instance])
    return out


def build_results(source, analysis, *, overlay: bool = True, uids: dict[str, str] | None = None) -> DicomResults:
    """SEG, SR (referencing the SEG) and, with ``overlay``, the explanation image of one analysis of ``source``.
    ``uids`` (:func:`result_uids`) fixes the objects' series and instance UIDs; by default they are new."""
    uids = uids or {}
    source = readable(source)
    seg = build_seg(source, analysis, series_instance_uid=uids.get("seg_series"),
                    sop_instance_uid=uids.get("seg_instance"))
    ov = (build_overlay(source, analysis, series_instance_uid=uids.get("overlay_series"),
                        sop_instance_uid=uids.get("overlay_instance")) if overlay else None)
    sr = build_report(source, analysis, seg, series_instance_uid=uids.get("sr_series"),
                      sop_instance_uid=uids.get("sr_instance"))
    return DicomResults(seg=seg, sr=sr, overlay=ov)
