"""/analyze and gRPC Analyze answer the DICOM results with dicom=true (serving/dicom_answer.py), and the SDK returns
them as pydicom datasets: the same objects (same UIDs, the service's mask in the SEG) through both doors, patient and
study copied into them and into nothing else (not the gateway's log, not this process's log records), and a clear
400 / INVALID_ARGUMENT for a JPEG. The tiny model on the embedded Triton; the gateway as `bentoml serve`."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest

pytest.importorskip("highdicom")
pytest.importorskip("tritonclient.grpc.aio")
pytest.importorskip("bentoml")

from braintumor.clients import BrainTumorClient, InvalidInputError  # noqa: E402
from braintumor.clients.dicom_study import StudyOptions, mr_slices  # noqa: E402

pytestmark = pytest.mark.integration

# Patient data, one value deliberately malformed (a DA with dashes): pydicom warns about it quoting the value.
PATIENT = {"PatientName": "Doe^Janet", "PatientID": "PID-55511", "PatientBirthDate": "1971-02-03",
           "PatientSex": "F", "AccessionNumber": "ACC-77731", "StudyID": "STUDY-919",
           "ReferringPhysicianName": "Quinn^Harold"}


@pytest.fixture(scope="module")
def doors(tiny_triton, tmp_path_factory, running_gateway, grpc_in_thread):
    from braintumor.serving.settings import ServeSettings

    with grpc_in_thread(ServeSettings(triton_url=tiny_triton.grpc_url, triton_key=tiny_triton.client_key)) as target:
        with running_gateway(tmp_path_factory.mktemp("dicom_gateway"), tiny_triton) as gateway:
            yield {"grpc": target, "http": gateway.url, "log": gateway.log}


def _slice() -> bytes:
    yy, xx = np.mgrid[0:72, 0:64]
    head = (((yy - 36) / 30.0) ** 2 + ((xx - 32) / 26.0) ** 2) <= 1
    blob = (((yy - 30) / 7.0) ** 2 + ((xx - 36) / 6.0) ** 2) <= 1
    pixels = (head * 90 + blob * 110).astype(np.uint8)
    import pydicom.config

    with pydicom.config.disable_value_validation():  # this test writes the malformed date, quietly: the logs
        ds = mr_slices([pixels], StudyOptions(patient=PATIENT))[0]  # checked below are the server's
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_both_doors_answer_the_same_dicom_objects(doors, slice_jpeg, caplog):
    data = _slice()
    caplog.clear()
    answers = {}
    with caplog.at_level(logging.DEBUG):
        for protocol in ("grpc", "http"):
            with BrainTumorClient(doors[protocol], protocol=protocol, timeout=120) as client:
                analysis = client.analyze(data, dicom=True)
                answers[protocol] = (analysis, analysis.dicom_datasets())
                assert analysis.overlay_png is None  # the overlay PNG only when asked; it is in the objects
                with pytest.raises(InvalidInputError, match="need a DICOM image"):
                    client.analyze(slice_jpeg, dicom=True)
    (g_analysis, g_objects), (h_analysis, h_objects) = answers["grpc"], answers["http"]
    assert {k: d.SOPInstanceUID for k, d in g_objects.items()} == {k: d.SOPInstanceUID for k, d in h_objects.items()}
    for analysis, objects in answers.values():
        seg, sr, overlay = objects["seg"], objects["sr"], objects["overlay"]
        assert (seg.Modality, sr.Modality, overlay.Modality) == ("SEG", "SR", "OT")
        np.testing.assert_array_equal(np.asarray(seg.pixel_array).reshape(72, 64), analysis.mask_array())
        for ds in objects.values():
            assert ds.PatientID == PATIENT["PatientID"] and ds.AccessionNumber == PATIENT["AccessionNumber"]
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmVersion == analysis.model_version
    # patient data went into the objects and nowhere else
    logs = {"gateway": doors["log"].read_text(errors="replace"),
            "this process (in-process gRPC server)": "\n".join(r.getMessage() for r in caplog.records)}
    for where, text in logs.items():
        for value in PATIENT.values():
            if len(value) > 1:
                assert value not in text, (where, value, [line for line in text.splitlines() if value in line][:3])


def test_the_sdk_says_when_no_dicom_objects_came(doors):
    with BrainTumorClient(doors["grpc"], protocol="grpc", timeout=120) as client:
        analysis = client.analyze(_slice())
    assert analysis.dicom is None
    with pytest.raises(ValueError, match="dicom=True"):
        analysis.dicom_datasets()
