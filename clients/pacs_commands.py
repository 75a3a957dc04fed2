"""CLI subcommands `braintumor pacs` (score a DICOMweb PACS's MR series and store SEG + SR + overlay back) and
`braintumor dicom-study` (write a synthetic-identifier MR study from JPEG/PNG slices to try it with). The engines are
clients/pacs.py and clients/dicom_study.py, imported only when a command runs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .score_commands import API_KEY_ENV

PASSWORD_ENV, TOKEN_ENV = "BRAINTUMOR_PACS_PASSWORD", "BRAINTUMOR_PACS_TOKEN"


def _pacs(args: argparse.Namespace) -> int:
    from .pacs import PacsOptions, run_pacs
    from .score_files import UsageError

    opts = PacsOptions(dicomweb=args.dicomweb, out=args.out, url=args.url, protocol=args.protocol,
                       api_key=os.environ.get(args.api_key_env) or None, user=args.user,
                       password=os.environ.get(PASSWORD_ENV) or None, token=os.environ.get(TOKEN_ENV) or None,
                       modality=args.modality, study_date=args.study_date, series_description=args.series_description,
                       study=args.study, overlay=not args.no_overlay, concurrency=args.concurrency,
                       timeout=args.timeout, retries=args.retries, progress=not args.no_progress)
    try:
        return run_pacs(opts)
    except UsageError as exc:
        print(f"braintumor pacs: error: {exc}", file=sys.stderr)
        return 2


def _dicom_study(args: argparse.Namespace) -> int:
    from .dicom_study import StudyOptions, write_study

    images = sorted(p for source in args.images for p in ([source] if source.is_file() else
                    [q for q in source.rglob("*") if q.suffix.lower() in (".jpg", ".jpeg", ".png")]))[: args.count]
    paths = write_study(images, args.out, StudyOptions(spacing_mm=args.spacing or None))
    print(f"{len(paths)} MR instances (one study, one series, synthetic patient) written to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pacs", help="score MR series of a DICOMweb PACS and store DICOM SEG + SR + Grad-CAM overlay back",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Find MR series in a DICOMweb PACS (QIDO-RS: modality, study date range, series description), "
                    "fetch each instance (WADO-RS), score it through a running `braintumor serve` (gRPC or HTTP) and "
                    "store a DICOM SEG (the tumour mask), a TID 1500 structured report (finding, probabilities, refer "
                    "flag, area) and a Secondary Capture of the Grad-CAM overlay, labelled as an explanation, back "
                    "(STOW-RS). Idempotent: results already stored for the same model version are skipped, and every "
                    "finished slice is a durable line in --out, so a rerun resumes. Nothing is stored for a slice that "
                    "failed (listed in OUT.errors.csv, retried by a rerun) or that the model referred as out of "
                    "distribution. Exit codes: 0 all done, 1 some slices failed, 2 usage, 3 service or PACS "
                    "unavailable, 130 Ctrl-C.")
    p.add_argument("--dicomweb", required=True, metavar="URL",
                   help="DICOMweb base URL of the PACS (Orthanc: http://127.0.0.1:8042/dicom-web)")
    p.add_argument("--url", default=None,
                   help="service address (default: localhost:50051 for grpc, http://localhost:3000 for http)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="which front door to call")
    p.add_argument("--out", type=Path, default=Path("pacs-results.jsonl"),
                   help="one JSON line per finished slice (SOP instance UID, outcome, label, stored UIDs); resumed")
    p.add_argument("--user", default=None,
                   help=f"PACS user for HTTP basic auth; the password is read from ${PASSWORD_ENV} "
                        f"(a bearer token from ${TOKEN_ENV} instead)")
    p.add_argument("--modality", default="MR", help="QIDO Modality filter")
    p.add_argument("--study-date", default=None, metavar="YYYYMMDD[-YYYYMMDD]", help="QIDO StudyDate (range)")
    p.add_argument("--series-description", default=None, metavar="PATTERN",
                   help="QIDO SeriesDescription filter (* and ? wildcards, e.g. '*T1*')")
    p.add_argument("--study", default=None, metavar="STUDY_UID", help="only this study")
    p.add_argument("--no-overlay", action="store_true", help="store SEG and SR only (no Grad-CAM Secondary Capture)")
    p.add_argument("--concurrency", type=int, default=4, help="slices in flight at a time")
    p.add_argument("--api-key-env", default=API_KEY_ENV, metavar="VAR",
                   help="environment variable holding the service's API key; unset: no key is sent")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per service or PACS request")
    p.add_argument("--retries", type=int, default=3, help="retries after the service or the PACS was unavailable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_pacs)

    s = sub.add_parser(
        "dicom-study", help="write a synthetic-identifier MR study from JPEG/PNG slices (to try `braintumor pacs`)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="One MR Image Storage instance per JPEG/PNG slice, all in one new study and series, with a made-up "
                    "patient (Synthetic^Brisc) and axial geometry. For demos and tests, not for real patients' images.")
    s.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="slices, or folders searched for them")
    s.add_argument("--out", type=Path, required=True, help="folder for IM0001.dcm, ...")
    s.add_argument("--count", type=int, default=4, help="at most this many slices (sorted by path)")
    s.add_argument("--spacing", type=float, default=0.5, help="PixelSpacing in mm (0: none)")
    s.set_defaults(func=_dicom_study)
