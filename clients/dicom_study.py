"""A DICOM MR study made from JPEG/PNG slices (e.g. BRISC's) with synthetic patient identifiers, for trying the PACS
round trip (`braintumor dicom-study`, the README's "Hospital integration") and for the tests. Each slice becomes one
MR Image Storage instance of one series, with a frame of reference, axial geometry and (unless told otherwise)
PixelSpacing; the identifiers are made up and say so.

Not a converter for real patients' images: it invents the patient, and the pixels keep only their grey levels.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SYNTHETIC_PATIENT = {"PatientName": "Synthetic^Brisc", "PatientID": "SYNTH-0001", "PatientBirthDate": "19700101",
                     "PatientSex": "O", "AccessionNumber": "SYNTHACC1", "StudyID": "SYNTH1",
                     "ReferringPhysicianName": "Synthetic^Referrer"}


@dataclass(frozen=True)
class StudyOptions:
    spacing_mm: float | None = 0.5  # None: no PixelSpacing (the SR then has no area in mm2)
    monochrome1: bool = False  # store inverted pixels as MONOCHROME1
    series_description: str = "T1 AX BRISC synthetic"
    patient: dict | None = None  # defaults to SYNTHETIC_PATIENT


def _grey(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as picture:
        return np.asarray(picture.convert("L"), dtype=np.uint8)


def mr_slices(pixels: list[np.ndarray], options: StudyOptions = StudyOptions()) -> list:
    """One MR Image Storage dataset per 2-D uint8 array, all in one new study and series (file meta included)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    now = dt.datetime.now()
    patient = dict(options.patient or SYNTHETIC_PATIENT)
    out = []
    for number, array in enumerate(pixels, start=1):
        array = np.ascontiguousarray(array, dtype=np.uint8)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        for key, value in patient.items():
            setattr(ds, key, value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "MR", "braintumor synthetic", 1, number
        ds.SeriesDescription = options.series_description
        ds.PositionReferenceIndicator = ""
        ds.BodyPartExamined = "HEAD"
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 15, 500, 1, 1.5
        ds.SliceThickness = 5.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * number]
        ds.PatientPosition = "HFS"
        if options.spacing_mm is not None:
            ds.PixelSpacing = [options.spacing_mm, options.spacing_mm]
        # MR Image Storage has 16 bits allocated; the 8-bit grey levels are stored as they are, windowed 0..255
        stored = (255 - array if options.monochrome1 else array).astype(np.uint16)
        ds.set_pixel_data(stored, "MONOCHROME1" if options.monochrome1 else "MONOCHROME2", 12)
        ds.WindowCenter, ds.WindowWidth = 128, 256
        out.append(ds)
    return out


def multiframe(slices: list):
    """The single-frame MR slices as one Legacy Converted Enhanced MR multi-frame instance (highdicom)."""
    from pydicom.uid import generate_uid

    from .dicom_codes import highdicom

    hd = highdicom()
    return hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=slices, series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1)


def write_study(images: list[Path], out_dir: Path, options: StudyOptions = StudyOptions()) -> list[Path]:
    """Write one MR instance per image under ``out_dir`` (``IM0001.dcm``...); returns the files."""
    if not images:
        raise ValueError("no images given; pass JPEG or PNG slices (e.g. a few BRISC test images)")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, ds in enumerate(mr_slices([_grey(p) for p in images], options), start=1):
        path = out_dir / f"IM{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
