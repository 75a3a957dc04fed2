"""The PACS round trip against a real PACS: Debian's Orthanc with its DICOMweb plugin on loopback (config, storage and
index in a temp dir, killed in `finally`), a BRISC-derived MR study with synthetic patient identifiers uploaded, then
`braintumor pacs` against `braintumor serve` on the tiny model: Orthanc holds one SEG + one SR + one overlay per slice,
each SEG's mask is the service's mask for that slice, `dciodvfy` finds no error in any stored object, a second run
stores nothing, and no patient identifier appears in the service's log or metrics, nor in the command's output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from braintumor.serving.supervisor import stop_group

pytest.importorskip("highdicom")
pytest.importorskip("dicomweb_client")
httpx = pytest.importorskip("httpx")

# In the default suite: ~20 s of its own (3 pacs runs, Orthanc's start), the served model is the e2e session's.
pytestmark = [pytest.mark.e2e, pytest.mark.integration]

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
SLICES = 3
REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "brisc2025"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc on 127.0.0.1 with DICOMweb at /dicom-web; yields its base URL."""
    if ORTHANC is None or not DICOMWEB_PLUGIN.is_file():
        pytest.skip("Debian's orthanc and orthanc-dicomweb are not installed (.ci/run installs them where apt-get "
                    "and root are)")
    from braintumor.serving.triton_embedded import free_port

    home = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {
        "Name": "braintumor-test", "StorageDirectory": str(home / "storage"), "IndexDirectory": str(home / "index"),
        "HttpPort": port, "HttpServerEnabled": True,
        # No DICOM (DIMSE) port: the round trip is DICOMweb only. Orthanc 1.10 cannot bind HTTP to one address;
        # RemoteAccessAllowed false makes it answer loopback peers only (test_orthanc_refuses_remote_peers).
        "DicomServerEnabled": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StorageCompression": False, "ConcurrentJobs": 1,
    }
    (home / "orthanc.json").write_text(json.dumps(config))
    log = open(home / "orthanc.log", "wb")
    proc = subprocess.Popen([ORTHANC, str(home / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/system", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("Orthanc did not start:\n" + (home / "orthanc.log").read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        yield url
    finally:
        stop_group(proc, 20, "Orthanc")
        log.close()


@pytest.fixture(scope="module")
def study(orthanc, tmp_path_factory):
    """A 3-slice MR study from real BRISC slices with tumour masks (one glioma, meningioma and pituitary axial T1),
    a synthetic patient, uploaded to Orthanc through its REST API. Yields the written files."""
    from braintumor.clients.dicom_study import write_study

    images = REAL_DATA / "segmentation_task" / "train" / "images"
    if not images.is_dir():
        pytest.skip(f"real BRISC 2025 data not found at {REAL_DATA}")
    picked = [sorted(images.glob(f"*_{code}_ax_t1.jpg"))[0] for code in ("gl", "me", "pi")]
    files = write_study(picked, tmp_path_factory.mktemp("study"))
    for path in files:
        answer = httpx.post(orthanc + "/instances", content=path.read_bytes(), timeout=30)
        assert answer.status_code == 200, answer.text
    return files


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "braintumor.serving.cli", *args]


def _pacs(orthanc: str, served, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cli("pacs", "--dicomweb", orthanc + "/dicom-web", "--url", served.grpc_target,
                               "--out", str(out), "--no-progress", *extra),
                          capture_output=True, text=True, timeout=600)


def _series(orthanc: str) -> dict[str, list[dict]]:
    """Orthanc's series by modality, each with its instances' tags (REST API)."""
    out: dict[str, list[dict]] = {}
    for series_id in httpx.get(orthanc + "/series", timeout=30).json():
        series = httpx.get(f"{orthanc}/series/{series_id}", timeout=30).json()
        modality = series["MainDicomTags"].get("Modality", "")
        out.setdefault(modality, []).extend(series["Instances"])
    return out


def _file(orthanc: str, instance_id: str) -> bytes:
    return httpx.get(f"{orthanc}/instances/{instance_id}/file", timeout=30).content


def _instance(orthanc: str, instance_id: str):
    import io

    import pydicom

    return pydicom.dcmread(io.BytesIO(_file(orthanc, instance_id)))


def test_round_trip_stores_seg_sr_overlay_per_slice_and_reruns_store_nothing(orthanc, study, served, tmp_path,
                                                                              dciodvfy):
    from braintumor.clients import BrainTumorClient
    from braintumor.clients.dicom_study import SYNTHETIC_PATIENT

    out = tmp_path / "pacs.jsonl"
    first = _pacs(orthanc, served, out)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"{SLICES} stored now" in first.stdout, first.stdout
    by_modality = _series(orthanc)
    assert len(by_modality["MR"]) == SLICES
    assert len(by_modality["SEG"]) == SLICES and len(by_modality["SR"]) == SLICES
    assert len(by_modality["OT"]) == SLICES  # the Grad-CAM Secondary Captures
    sources = {_instance(orthanc, i).SOPInstanceUID: _file(orthanc, i) for i in by_modality["MR"]}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["instance"] for r in rows) == sorted(sources) and {r["outcome"] for r in rows} == {"stored"}
    with BrainTumorClient(served.grpc_target, protocol="grpc", timeout=60) as client:
        for instance_id in by_modality["SEG"]:
            seg = _instance(orthanc, instance_id)
            source_uid = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
            service_mask = client.analyze(sources[source_uid], mask_format="rle").mask_array() > 0
            np.testing.assert_array_equal(np.asarray(seg.pixel_array).reshape(service_mask.shape), service_mask)
            assert seg.PatientID == SYNTHETIC_PATIENT["PatientID"]
    for modality in ("SEG", "SR", "OT"):
        for instance_id in by_modality[modality]:
            path = tmp_path / f"{instance_id}.dcm"
            path.write_bytes(_file(orthanc, instance_id))
            assert dciodvfy(path) == [], f"{modality} {instance_id}"
    # a second run: the results file says every slice is done; with a new results file, the PACS says so
    again = _pacs(orthanc, served, out)
    assert again.returncode == 0 and "0 stored now" in again.stdout and f"{SLICES} done by earlier runs" in again.stdout
    fresh = _pacs(orthanc, served, tmp_path / "fresh.jsonl")
    assert fresh.returncode == 0 and "0 stored now" in fresh.stdout and "1 series skipped whole" in fresh.stdout
    assert {k: len(v) for k, v in _series(orthanc).items()} == {"MR": SLICES, "SEG": SLICES, "SR": SLICES,
                                                                "OT": SLICES}
    # no patient identifier in the service's log or metrics, nor in what the command printed or wrote
    metrics = (httpx.get(served.http_url + "/metrics", timeout=30).text
               + httpx.get(f"http://127.0.0.1:{served.ports['grpc_metrics']}/metrics", timeout=30).text)
    written = out.read_text() + (tmp_path / "fresh.jsonl").read_text()
    for text in ("".join(served.lines), metrics, first.stdout + first.stderr, written):
        for key in ("PatientName", "PatientID", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
            assert SYNTHETIC_PATIENT[key] not in text, key
        assert "Synthetic" not in text


def test_orthanc_refuses_remote_peers(orthanc):
    """Orthanc answers loopback only: a request from this host's own non-loopback address is refused."""
    import socket

    port = int(orthanc.rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))  # UDP: sends nothing, only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if address.startswith("127."):
        pytest.skip("this host has no non-loopback address to test from")
    answer = httpx.get(f"http://{address}:{port}/system", timeout=5)
    assert answer.status_code in (401, 403)
