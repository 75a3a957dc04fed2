"""`braintumor pacs` as a run: find MR series in a DICOMweb PACS, fetch each instance, score it through a running
service (the SDK, gRPC or HTTP), build SEG + SR (+ the Grad-CAM overlay) and store them back with STOW-RS.

Like `braintumor score`: at most ``concurrency`` slices in flight, one durable JSON line per finished slice in ``out``
(a rerun skips them: resume), failures in ``OUT.errors.csv`` (retried by a rerun), a progress bar, the same exit codes.
Idempotent against the PACS too: our objects' UIDs are derived from the source's UIDs and the model version
(:func:`~.dicom_results.result_uids`), so a slice whose SEG is already stored is skipped, and a series that has our SEG
for every slice is skipped whole. A slice that failed, or that the service referred as out of distribution, gets
nothing stored; a slice referred for another reason is stored with an SR that says it was referred and why.

Nothing here prints or writes patient or study attributes: the results file holds SOP instance UIDs, the model and
the outcome; errors hold the HTTP status or the service's error code.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .score import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from .score_files import ErrorsFile, ResultsFile, UsageError, errors_path

BUSY_RETRIES, BUSY_BACKOFF_S = 4, 0.5


@dataclass
class PacsOptions:
    dicomweb: str
    out: Path
    url: str | None = None
    protocol: str = "grpc"
    api_key: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    modality: str = "MR"
    study_date: str | None = None
    series_description: str | None = None
    study: str | None = None
    overlay: bool = True
    concurrency: int = 4
    timeout: float = 60.0
    retries: int = 3
    progress: bool = True


@dataclass
class PacsSummary:
    series: int = 0
    series_skipped: int = 0  # every slice already has our SEG in the PACS
    instances: int = 0
    done_before: int = 0  # rows of earlier runs in the results file
    stored: int = 0
    already_stored: int = 0
    referred_ood: int = 0
    failed: int = 0
    fatal: Exception | None = None
    counts: dict = field(default_factory=dict)


def check_options(opts: PacsOptions) -> None:
    if opts.concurrency < 1:
        raise UsageError(f"--concurrency {opts.concurrency}: must be at least 1")
    if opts.protocol not in ("grpc", "http"):
        raise UsageError(f"--protocol {opts.protocol}: expected grpc or http")
    if Path(opts.out).is_dir():
        raise UsageError(f"--out {opts.out} is a folder; pass a file name such as {Path(opts.out) / 'pacs.jsonl'}")
    if opts.study_date and not all(part.isdigit() and len(part) == 8 for part in opts.study_date.split("-") if part):
        raise UsageError(f"--study-date {opts.study_date}: expected YYYYMMDD or YYYYMMDD-YYYYMMDD")


def run_pacs(opts: PacsOptions) -> int:
    check_options(opts)
    return asyncio.run(_run(opts))


async def _run(opts: PacsOptions) -> int:
    from .aio import AsyncBrainTumorClient
    from .errors import BrainTumorError
    from .pacs_dicomweb import DicomWeb, PacsError

    pacs = DicomWeb(opts.dicomweb, user=opts.user, password=opts.password, token=opts.token, timeout=opts.timeout,
                    retries=opts.retries)
    async with AsyncBrainTumorClient(opts.url, protocol=opts.protocol, api_key=opts.api_key, timeout=opts.timeout,
                                     retries=opts.retries) as client:
        try:
            info = await client.model()
        except BrainTumorError as exc:
            return _fatal(f"the service at {client.url} ({opts.protocol}) is not available: {exc.detail or exc}. "
                          "Start it (`braintumor serve`) or pass --url/--protocol", EXIT_UNAVAILABLE)
        tag = f"{info['name']} {info['version']}"
        try:
            series = await asyncio.to_thread(pacs.find_series, modality=opts.modality, study_date=opts.study_date,
                                             series_description=opts.series_description, study_uid=opts.study)
        except PacsError as exc:
            return _fatal(f"{exc}; check --dicomweb and the credentials", EXIT_UNAVAILABLE)
        results = ResultsFile(Path(opts.out), "jsonl", None)
        done = {row["instance"] for row in results.read_done() if row.get("model") == tag}
        errors = ErrorsFile(errors_path(Path(opts.out)))
        errors.reset()
        summary = PacsSummary(series=len(series))
        results.open()
        runner = _Runner(opts, pacs, client, tag, results, errors, summary, done)
        try:
            await runner.run(series)
        finally:
            runner.close()
            results.close()
            errors.close()
    return _report(summary, opts, tag)


@dataclass
class _Runner:
    opts: PacsOptions
    pacs: object
    client: object
    tag: str
    results: ResultsFile
    errors: ErrorsFile
    summary: PacsSummary
    done: set
    progress: object = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, series_list) -> None:
        from .dicom_results import result_uids  # noqa: F401 - fail early without the dicom extra

        work = []
        for series in series_list:
            instances = await asyncio.to_thread(self.pacs.instances, series.study_uid, series.series_uid)
            self.summary.instances += len(instances)
            todo = [sop for sop in instances if sop not in self.done]
            self.summary.done_before += len(instances) - len(todo)
            stored = await asyncio.to_thread(self.pacs.stored, series.study_uid, _seg_series(series, self.tag))
            if todo and stored and all(_seg_instance(series, sop, self.tag) in stored for sop in instances):
                self.summary.series_skipped += 1
                for sop in todo:
                    self._row(sop, "already_stored")
                self.summary.already_stored += len(todo)
                continue
            work += [(series, sop, stored) for sop in todo]
        if self.opts.progress and work:
            from .progress import progress_bar

            self.progress = progress_bar(total=len(work), desc="pacs", unit="img", file=sys.stderr, dynamic_ncols=True)
        queue = iter(work)
        count = max(1, min(self.opts.concurrency, len(work)))
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(count)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()

    async def _worker(self, queue) -> None:
        while not self.stop.is_set():
            item = next(queue, None)
            if item is None:
                return
            await self._one(*item)
            if self.progress is not None:
                self.progress.update(1)

    async def _one(self, series, sop: str, stored: set) -> None:
        from .dicom_codes import out_of_distribution
        from .dicom_results import build_results, result_uids
        from .errors import AuthenticationError, BrainTumorError, UnavailableError
        from .pacs_dicomweb import PacsError

        if _seg_instance(series, sop, self.tag) in stored:
            self.summary.already_stored += 1
            return self._row(sop, "already_stored")
        try:
            source, data = await asyncio.to_thread(self.pacs.fetch, series.study_uid, series.series_uid, sop)
            analysis = await self._analyze(data)
            if analysis.refer and out_of_distribution(analysis.refer_reasons):
                self.summary.referred_ood += 1
                return self._row(sop, "referred_out_of_distribution", analysis)
            objects = await asyncio.to_thread(build_results, source, analysis, overlay=self.opts.overlay,
                                              uids=result_uids(source, self.tag))
            await asyncio.to_thread(self.pacs.store, objects.datasets(), series.study_uid)
        except (UnavailableError, AuthenticationError) as exc:
            if self.summary.fatal is None:
                self.summary.fatal = exc
            self.stop.set()  # not this slice's fault: stop, the rerun does the rest
            return None
        except BrainTumorError as exc:
            return self._fail(sop, "service", f"{exc.code}: {exc.detail}" if exc.code else str(exc))
        except PacsError as exc:
            return self._fail(sop, "pacs", str(exc))
        except ValueError as exc:  # the builders refuse (a source the analysis does not fit)
            return self._fail(sop, "dicom_results", str(exc))
        self.summary.stored += 1
        self._row(sop, "stored", analysis, [d.SOPInstanceUID for d in objects.datasets()])

    async def _analyze(self, data: bytes):
        from .errors import OverloadedError

        for attempt in range(BUSY_RETRIES + 1):
            try:
                return await self.client.analyze(data, overlay=self.opts.overlay, mask_format="rle")
            except OverloadedError:
                if attempt == BUSY_RETRIES or self.stop.is_set():
                    raise
                await asyncio.sleep(min(BUSY_BACKOFF_S * 2 ** attempt, 8.0))

    def _row(self, sop: str, outcome: str, analysis=None, stored: list | None = None) -> None:
        row = {"instance": sop, "model": self.tag, "outcome": outcome, "stored": stored or []}
        if analysis is not None:
            row.update(label=analysis.label, refer=bool(analysis.refer), refer_reason=list(analysis.refer_reasons),
                       tumor_area_mm2=analysis.tumor_area_mm2)
        self.results.append(row)

    def _fail(self, sop: str, kind: str, detail: str) -> None:
        self.summary.failed += 1
        self.errors.add(sop, kind, detail)


def _seg_series(series, tag: str) -> str:
    from .dicom_results import uids_for

    return uids_for(series.series_uid, "", tag)["seg_series"]


def _seg_instance(series, sop: str, tag: str) -> str:
    from .dicom_results import uids_for

    return uids_for(series.series_uid, sop, tag)["seg_instance"]


def _fatal(message: str, code: int) -> int:
    print(f"braintumor pacs: error: {message}", file=sys.stderr)
    return code


def _report(s: PacsSummary, opts: PacsOptions, tag: str) -> int:
    print(f"{s.series} series, {s.instances} instances ({tag}): {s.stored} stored now, {s.already_stored} already in "
          f"the PACS ({s.series_skipped} series skipped whole), {s.done_before} done by earlier runs, "
          f"{s.referred_ood} referred as out of distribution (nothing stored), {s.failed} failed"
          + (f" (see {errors_path(Path(opts.out))})" if s.failed else ""))
    if s.fatal is not None:
        from .errors import AuthenticationError

        code = EXIT_USAGE if isinstance(s.fatal, AuthenticationError) else EXIT_UNAVAILABLE
        return _fatal(f"stopped early: {s.fatal}; rerun the same command to continue", code)
    return EXIT_FAILED if s.failed else EXIT_OK


__all__ = ["EXIT_INTERRUPTED", "PacsOptions", "PacsSummary", "run_pacs"]
