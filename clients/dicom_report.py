"""The structured report of one analysis: a Comprehensive 3D SR holding a TID 1500 Imaging Measurement Report with one
TID 1410 planar ROI group that references the tumour segment of our SEG (clients/dicom_results.py) and carries

- the class as the group's coded finding type (SNOMED CT, clients/dicom_codes.py says which codes and from where),
- each class's calibrated probability (a measurement, UCUM "1"),
- the tumour area in mm² (SNOMED CT Area, UCUM mm2) when the source has PixelSpacing, and in pixels always,
- whether the slice is referred for human review (SNOMED CT Yes/No) and each reason, coded.

A referred slice's report says it was referred; the report names the model and its version as the observing device
and the algorithm. Patient and study attributes come from the source (evidence), copied by highdicom.
"""

from __future__ import annotations

from . import dicom_codes as c
from .dicom_codes import MANUFACTURER, SERIES_NUMBERS, SR_SERIES_DESCRIPTION, highdicom, model_version_tag


def _measurement(hd, name, value: float, unit):
    return hd.sr.Measurement(name=name, value=float(value), unit=unit)


def _frame(seg) -> int:
    """The SEG frame that holds the tumour segment of the analysed frame (our SEGs have one frame per source frame, and
    the analysed one is the middle: frame 1 of a single-frame source)."""
    frames = int(seg.get("NumberOfFrames", 1) or 1)
    return frames // 2 + 1


def _segment_reference(hd, source, seg):
    """Segment 1 of the SEG frame for the analysed source frame, and that source image (highdicom 0.28's
    ``ReferencedSegmentationFrame.from_segmentation`` looks for the segment number per frame, where a one-segment SEG
    keeps it in the shared functional groups)."""
    frames = int(source.get("NumberOfFrames", 1) or 1)
    source_frames = [frames // 2 + 1] if frames > 1 else None
    return hd.sr.ReferencedSegmentationFrame(
        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, frame_number=_frame(seg), segment_number=1,
        source_image=hd.sr.SourceImageForSegmentation(source.SOPClassUID, source.SOPInstanceUID, source_frames))


def report_content(source, analysis, seg):
    """The TID 1500 content tree of one analysis of ``source``, referencing ``seg``'s segment 1."""
    hd = highdicom()
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    model_version_tag(analysis)  # refuses an analysis that names no model
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=analysis.model_name, manufacturer_name=MANUFACTURER,
            model_name=f"{analysis.model_name} {analysis.model_version}"))
    measurements = [_measurement(hd, c.probability(label), p, c.NO_UNITS)
                    for label, p in sorted(analysis.probabilities.items())]
    if analysis.tumor_area_mm2 is not None:
        measurements.append(_measurement(hd, c.AREA, analysis.tumor_area_mm2, c.MM2))
    measurements.append(_measurement(hd, c.AREA, analysis.tumor_area_px, c.PIXELS))
    evaluations = [hd.sr.QualitativeEvaluation(c.REFERRED, c.YES if analysis.refer else c.NO)]
    evaluations += [hd.sr.QualitativeEvaluation(c.REFER_REASON, c.reason(r)) for r in analysis.refer_reasons]
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="tumour"),
        referenced_segment=_segment_reference(hd, source, seg),
        finding_type=c.finding(analysis.label),
        algorithm_id=hd.sr.AlgorithmIdentification(name=analysis.model_name, version=analysis.model_version),
        measurements=measurements, qualitative_evaluations=evaluations)
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=c.PROCEDURE, imaging_measurements=[group])


def build_report(source, analysis, seg, *, series_instance_uid: str | None = None,
                 sop_instance_uid: str | None = None):
    """The Comprehensive 3D SR of one analysis of ``source`` whose mask is ``seg``."""
    hd = highdicom()
    from pydicom.uid import generate_uid

    tag = model_version_tag(analysis)
    schemes = [hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=c.PRIVATE_SCHEME, name="braintumor result concepts", responsible_organization=MANUFACTURER)]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, seg], content=report_content(source, analysis, seg),
        series_instance_uid=series_instance_uid or generate_uid(), series_number=SERIES_NUMBERS["sr"],
        sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False, series_description=SR_SERIES_DESCRIPTION,
        coding_schemes=schemes, manufacturer_model_name=analysis.model_name, software_versions=tag,
        device_serial_number=analysis.model_version)
    _segment_by_number(sr, seg.SOPInstanceUID)
    return sr


def _segment_by_number(dataset, seg_uid: str) -> None:
    """An IMAGE item that references a SEG names the segment or frames, not both (PS3.3 C.18.4, Referenced Segment
    Number "shall not be present if Referenced Frame Number is present"; dciodvfy checks it): our SEG has one segment,
    so the segment number alone identifies it; the frame number is removed."""
    for item in dataset.get("ContentSequence", []):
        for ref in item.get("ReferencedSOPSequence", []):
            if ref.get("ReferencedSOPInstanceUID") == seg_uid and "ReferencedSegmentNumber" in ref:
                if "ReferencedFrameNumber" in ref:
                    del ref.ReferencedFrameNumber
        _segment_by_number(item, seg_uid)
