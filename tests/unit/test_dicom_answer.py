"""The server's DICOM-results stage (serving/dicom_answer.py): Part 10 objects from the sent file and the answer, and
no patient value in any log record or warning while it reads the whole header, even a malformed one that pydicom
warns about quoting the value (the control case shows pydicom does quote it)."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pytest

pytest.importorskip("highdicom")
import pydicom  # noqa: E402
import pydicom.config  # noqa: E402

from braintumor.clients.dicom_study import StudyOptions, mr_slices  # noqa: E402
from braintumor.serving.dicom_answer import dicom_results  # noqa: E402
from braintumor.serving.errors import BadInput  # noqa: E402
from braintumor.serving.postprocess import AnalysisResult  # noqa: E402

BIRTH = "1971-02-03"  # a DA written with dashes: malformed, and pydicom's warning quotes it
PATIENT = {"PatientName": "Roe^Richard", "PatientID": "PID-31337", "PatientBirthDate": BIRTH}


def _file(**patient) -> bytes:
    pixels = np.zeros((40, 32), np.uint8)
    pixels[8:32, 6:26] = 120
    with pydicom.config.disable_value_validation():
        ds = mr_slices([pixels], StudyOptions(patient={**PATIENT, **patient}))[0]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _result() -> AnalysisResult:
    from braintumor.clients.masks import mask_png
    from braintumor.serving.postprocess import encode_png

    mask = np.zeros((40, 32), np.uint8)
    mask[12:20, 10:18] = 1
    return AnalysisResult(label="meningioma", probabilities={"glioma": 0.1, "meningioma": 0.8, "pituitary": 0.05,
                                                             "no_tumor": 0.05},
                          refer=False, refer_reason=[], tumor_area_px=64, tumor_area_mm2=16.0,
                          mask_label_disagree=False, original_shape=(40, 32), mask_png=mask_png(mask),
                          overlay_png=encode_png(np.zeros((40, 32, 3), np.uint8)), mask=mask, model_name="brain_tumor",
                          model_version="3")


def test_objects_without_a_patient_value_in_logs_or_warnings(caplog):
    data = _file()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parts = dicom_results(data, _result())
    assert set(parts) == {"seg", "sr", "overlay"}
    seg = pydicom.dcmread(io.BytesIO(parts["seg"]))
    assert seg.PatientID == PATIENT["PatientID"] and seg.PatientBirthDate == ""  # the malformed date emptied
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert not [line for line in said for value in PATIENT.values() if value in line]


def test_control_pydicom_quotes_the_malformed_value(caplog):
    """Copying the value into a new object, as the builders do, makes pydicom warn quoting it unless the stage's quiet
    mode is on: the check above can fail."""
    from pydicom.dataset import Dataset

    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Dataset().PatientBirthDate = pydicom.dcmread(io.BytesIO(_file()), force=True).PatientBirthDate
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    assert any(BIRTH in line for line in said)


def test_a_file_without_image_identifiers_is_bad_input_without_values():
    ds = pydicom.dcmread(io.BytesIO(_file()))
    del ds.SeriesInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(BadInput, match="SeriesInstanceUID") as caught:
        dicom_results(buf.getvalue(), _result())
    assert not any(value in str(caught.value) for value in PATIENT.values())
