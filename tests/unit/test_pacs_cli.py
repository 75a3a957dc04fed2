"""`braintumor pacs` without a PACS: its options are checked with clear messages, an unreachable PACS or service is
exit code 3 with a message that quotes no URL path (study UIDs live there), and the command is registered. The round
trip against a real PACS is tests/e2e/test_pacs_orthanc.py."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("dicomweb_client")

from braintumor.clients.pacs import PacsOptions, check_options, run_pacs  # noqa: E402
from braintumor.clients.pacs_dicomweb import DicomWeb, PacsError  # noqa: E402
from braintumor.clients.score_files import UsageError  # noqa: E402
from braintumor.serving.cli import build_parser  # noqa: E402


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("change, fragment", [
    ({"concurrency": 0}, "--concurrency 0"),
    ({"protocol": "ftp"}, "expected grpc or http"),
    ({"study_date": "2024-01-01"}, "YYYYMMDD"),
])
def test_bad_options_are_usage_errors(tmp_path, change, fragment):
    opts = PacsOptions(dicomweb="http://127.0.0.1:1/dicom-web", out=tmp_path / "p.jsonl", **change)
    with pytest.raises(UsageError, match=fragment):
        check_options(opts)
    check_options(PacsOptions(dicomweb="x", out=tmp_path / "p.jsonl", study_date="20240101-20241231"))


def test_dicomweb_url_must_be_http():
    with pytest.raises(ValueError, match="http:// or https://"):
        DicomWeb("127.0.0.1:8042/dicom-web")


def test_an_unreachable_pacs_is_named_without_its_url():
    study = "1.2.826.0.1.3680043.8.498.1234567890"
    pacs = DicomWeb(f"http://127.0.0.1:{_closed_port()}/dicom-web", timeout=5, retries=0)
    with pytest.raises(PacsError) as caught:
        pacs.instances(study, study + ".1")
    assert caught.value.operation == "search for instances" and caught.value.status is None
    assert study not in str(caught.value) and "127.0.0.1" not in str(caught.value)


def test_an_unreachable_service_is_exit_3(tmp_path, capsys):
    opts = PacsOptions(dicomweb=f"http://127.0.0.1:{_closed_port()}/dicom-web", out=tmp_path / "p.jsonl",
                       url=f"127.0.0.1:{_closed_port()}", retries=0, timeout=5, progress=False)
    assert run_pacs(opts) == 3
    assert "is not available" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_pacs_and_dicom_study_are_commands():
    parser = build_parser()
    args = parser.parse_args(["pacs", "--dicomweb", "http://127.0.0.1:8042/dicom-web", "--protocol", "http"])
    assert args.protocol == "http" and args.modality == "MR" and args.concurrency == 4
    assert parser.parse_args(["dicom-study", "a.jpg", "--out", "x"]).count == 4
