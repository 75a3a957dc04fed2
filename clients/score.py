"""The batch-scoring engine behind `braintumor score`: find the slices under a folder, score them concurrently through
the SDK, append one durable row per slice (so a run killed by Ctrl-C or SIGKILL resumes without losing or
duplicating anything), record failures next to the results, and evaluate against a BRISC folder."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .brisc_layout import LAYOUT_HELP, BriscLayout, detect_layout

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm")
_DICOM_MAGIC_OFFSET, _DICOM_MAGIC = 128, b"DICM"
ERROR_COLUMNS = ("path", "kind", "detail")
# Exit codes: 0 every file scored, 1 some failed, 2 usage, 3 the service is unreachable or refused us, 130 Ctrl-C.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
BUSY_RETRIES, BUSY_BACKOFF_S = 4, 0.5  # RESOURCE_EXHAUSTED / 429: the server asks us to come back shortly


class UsageError(ValueError):
    """The command line or the files it names are wrong; the message says what to change (exit code 2)."""


# -- discovery ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One file to score: ``rel`` (posix path relative to INPUT) keys its row; ``mask_rel`` is its mask under --masks."""

    path: Path
    rel: str
    mask_rel: str


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == _DICOM_MAGIC


def discover(root: Path, exclude: Iterable[Path] = ()) -> list[Item]:
    """Every JPEG, PNG and DICOM file under ``root`` (recursive; hidden files and ``exclude`` folders skipped), sorted
    by relative path. Extension-less files count when they carry the DICOM preamble."""
    root = Path(root)
    if root.is_file():
        return [Item(root, root.name, _mask_name(root.name))]
    skip = {Path(os.path.abspath(p)) for p in exclude}
    found: list[tuple[str, Path]] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and Path(os.path.abspath(here / d)) not in skip]
        for name in files:
            path = here / name
            if name.startswith(".") or Path(os.path.abspath(path)) in skip:
                continue
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES or (suffix == "" and _is_dicom_file(path)):
                found.append((path.relative_to(root).as_posix(), path))
    found.sort()
    # A mask is the slice's path with .png; two slices that differ only by extension keep the extension instead.
    by_mask: dict[str, int] = {}
    for rel, _ in found:
        by_mask[_mask_name(rel)] = by_mask.get(_mask_name(rel), 0) + 1
    return [Item(path, rel, _mask_name(rel) if by_mask[_mask_name(rel)] == 1 else rel + ".png") for rel, path in found]


def _mask_name(rel: str) -> str:
    stem, dot, suffix = rel.rpartition(".")
    return (stem if dot and "/" not in suffix else rel) + ".png"


# -- results file -------------------------------------------------------------------------------------------------
def result_columns(classes: Iterable[str]) -> list[str]:
    return ["path", "label", *(f"prob_{c}" for c in classes), "refer", "refer_reason", "tumor_area_px",
            "tumor_area_mm2", "model_name", "model_version", "mask"]


def errors_path(out: Path) -> Path:
    """Where failures go: ``results.csv`` -> ``results.errors.csv``."""
    return out.with_name(out.stem + ".errors.csv")


def default_masks_dir(out: Path) -> Path:
    """Masks for --evaluate when --masks is not given: ``results.csv`` -> ``results.masks/``."""
    return out.with_name(out.stem + ".masks")


def _append_line(fd: int, line: str) -> None:
    data = line.encode("utf-8")
    while data:  # a regular file takes it in one write; loop anyway rather than assume
        data = data[os.write(fd, data):]
    os.fsync(fd)


class ResultsFile:
    """The results (CSV or JSON Lines), append-only: each row is written, flushed and fsync'd as it completes, so the
    file on disk is always whole rows plus at most one torn last line, which :meth:`open` cuts off."""

    def __init__(self, path: Path, fmt: str, columns: list[str] | None) -> None:
        if fmt not in ("csv", "jsonl"):
            raise UsageError(f"--format {fmt}: expected csv or jsonl")
        self.path, self.fmt, self.columns = Path(path), fmt, columns
        self._fd: int | None = None

    def read_done(self) -> list[dict]:
        """The whole rows already in the file (nothing is changed); a torn last line is ignored. A CSV whose header
        differs from ``columns`` (unless None) is another model's or another program's: UsageError."""
        if not self.path.exists():
            return []
        text = self.path.read_bytes()
        text = text[: text.rfind(b"\n") + 1].decode("utf-8", errors="replace")
        if not text:
            return []
        if self.fmt == "csv":
            reader = csv.DictReader(io.StringIO(text, newline=""))
            if self.columns is not None and reader.fieldnames != self.columns:
                raise UsageError(
                    f"{self.path} has the columns {','.join(reader.fieldnames or [])} but this model's results have "
                    f"{','.join(self.columns)}; rerun with a new --out (or delete {self.path})")
            return list(reader)
        rows = []
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is not a row end
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise UsageError(f"{self.path} line {number} is not JSON ({exc}); it is not a results file of "
                                 f"`braintumor score --format jsonl`: rerun with a new --out") from exc
        return rows

    def open(self) -> None:
        """Cut a torn last line (a run killed mid-write), then open for appending; a new CSV gets its header."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as f:
                data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep != size:
                os.ftruncate(self._fd, keep)
                size = keep
        if size == 0 and self.fmt == "csv":
            _append_line(self._fd, self._csv_line(self.columns))

    def append(self, row: dict) -> None:
        if self.fmt == "csv":
            line = self._csv_line([_csv_value(row[c]) for c in self.columns])
        else:
            line = json.dumps(row, ensure_ascii=False) + "\n"
        _append_line(self._fd, line)

    @staticmethod
    def _csv_line(values: list) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        return buf.getvalue()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value)  # as the SDK's Analysis.refer_reason
    return str(value)


class ErrorsFile:
    """Failures of this run (path, kind, detail), created on the first one. Each run starts it afresh: a file listed
    here is never in the results, so a rerun retries it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.count = 0

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)

    def add(self, rel: str, kind: str, detail: str) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            _append_line(self._fd, ResultsFile._csv_line(list(ERROR_COLUMNS)))
        _append_line(self._fd, ResultsFile._csv_line([rel, kind, " ".join(str(detail).split())]))
        self.count += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_TMP_NAME = re.compile(r"^\..+\.\d+\.tmp$")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: ``path`` is whole or absent, never torn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files :func:`write_atomic` left behind when a run was killed between write and rename."""
    removed = 0
    for here, _, files in os.walk(folder):
        for name in files:
            if _TMP_NAME.match(name):
                os.unlink(os.path.join(here, name))
                removed += 1
    return removed


def row_for(item: Item, analysis, classes: list[str], mask_rel: str) -> dict:
    probs = analysis.probabilities
    return {"path": item.rel, "label": analysis.label, **{f"prob_{c}": float(probs.get(c, 0.0)) for c in classes},
            "refer": bool(analysis.refer), "refer_reason": list(analysis.refer_reasons),
            "tumor_area_px": int(analysis.tumor_area_px), "tumor_area_mm2": analysis.tumor_area_mm2,
            "model_name": analysis.model_name, "model_version": analysis.model_version, "mask": mask_rel}


# -- the run ------------------------------------------------------------------------------------------------------
@dataclass
class ScoreSummary:
    total: int = 0  # files found
    already_done: int = 0  # rows from earlier runs
    scored: int = 0  # rows written by this run
    failed: int = 0  # files recorded in the errors file
    interrupted: bool = False
    fatal: Exception | None = None  # why the run stopped early (service unavailable, key refused)

    @property
    def remaining(self) -> int:
        return self.total - self.already_done - self.scored


@dataclass
class Scorer:
    """Scores ``items`` with at most ``concurrency`` requests in flight; ``stop`` ends submission (in-flight requests
    finish). Each success writes its mask (if ``masks_dir``) and then its row; each failure writes an errors line."""

    client: object
    results: ResultsFile
    errors: ErrorsFile
    classes: list[str]
    masks_dir: Path | None = None
    concurrency: int = 8
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    progress: object = None  # a tqdm bar, or None
    summary: ScoreSummary = field(default_factory=ScoreSummary)

    async def run(self, items: list[Item]) -> ScoreSummary:
        queue = iter(items)
        n = max(1, min(self.concurrency, len(items)))
        self._workers = [asyncio.create_task(self._worker(queue)) for _ in range(n)]
        try:
            done, _ = await asyncio.wait(self._workers)
        finally:
            self.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
        for worker in done:
            if not worker.cancelled() and worker.exception() is not None:
                raise worker.exception()
        return self.summary

    def cancel(self) -> None:
        """Cancel the requests in flight (their files are neither in the results nor in the errors: a rerun does them)."""
        self.stop.set()
        for worker in getattr(self, "_workers", []):
            worker.cancel()

    async def _worker(self, queue) -> None:
        while not self.stop.is_set():
            item = next(queue, None)
            if item is None:
                return
            await self._score_one(item)

    async def _score_one(self, item: Item) -> None:
        from .errors import BrainTumorError

        if "\n" in item.rel or "\r" in item.rel:
            return self._fail(item, "bad_name", "the file name contains a line break; rename it")
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            return self._fail(item, "unreadable", f"cannot read the file: {exc.strerror or exc}")
        try:
            analysis = await self._analyze(data)
        except BrainTumorError as exc:
            if _is_fatal(exc):
                # Not the file's fault: stop the run and leave the file to the rerun.
                if self.summary.fatal is None:
                    self.summary.fatal = exc
                self.stop.set()
                return None
            return self._fail(item, _kind(exc), f"{exc.code}: {exc.detail}" if exc.code else str(exc))
        except ValueError as exc:  # the SDK refuses the input before sending (e.g. an empty file)
            return self._fail(item, "invalid_input", str(exc))
        except Exception as exc:  # a client-side bug must cost one file, not the run; recorded with its type
            return self._fail(item, f"client_error:{type(exc).__name__}", str(exc))
        mask_rel = ""
        if self.masks_dir is not None:
            try:
                write_atomic(self.masks_dir / item.mask_rel, analysis.mask_png)
            except OSError as exc:
                return self._fail(item, "mask_write", f"cannot write {self.masks_dir / item.mask_rel}: {exc}")
            mask_rel = item.mask_rel
        # No await between the mask and the row: a cancellation cannot separate them.
        self.results.append(row_for(item, analysis, self.classes, mask_rel))
        self.summary.scored += 1
        self._tick()

    async def _analyze(self, data: bytes):
        """One analysis; a busy server (the SDK does not retry that) gets a few more tries with backoff."""
        from .errors import OverloadedError

        for attempt in range(BUSY_RETRIES + 1):
            try:
                return await self.client.analyze(data)
            except OverloadedError:
                if attempt == BUSY_RETRIES or self.stop.is_set():
                    raise
                await asyncio.sleep(min(BUSY_BACKOFF_S * 2 ** attempt, 8.0))

    def _fail(self, item: Item, kind: str, detail: str) -> None:
        self.errors.add(item.rel, kind, detail)
        self.summary.failed += 1
        self._tick()

    def _tick(self) -> None:
        if self.progress is not None:
            self.progress.update(1)
            if self.summary.failed:
                self.progress.set_postfix(failed=self.summary.failed, refresh=False)


def _is_fatal(exc) -> bool:
    from .errors import AuthenticationError, UnavailableError

    return isinstance(exc, (UnavailableError, AuthenticationError))


def _kind(exc) -> str:
    """The same kind whichever protocol failed: InvalidInputError -> invalid_input (the wire code goes in detail)."""
    name = type(exc).__name__.removesuffix("Error") or "BrainTumor"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass
class ScoreOptions:
    input: Path
    out: Path
    fmt: str | None = None  # None: from the --out extension (.jsonl -> jsonl, else csv)
    masks: Path | None = None
    concurrency: int = 8
    protocol: str = "grpc"
    url: str | None = None
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 3
    evaluate: bool = False
    progress: bool = True


def check_options(opts: ScoreOptions) -> tuple[list[Item], BriscLayout | None]:
    """Validate the command line and find the files; raises UsageError naming the problem and the fix."""
    root = Path(opts.input).expanduser()
    if not root.exists():
        raise UsageError(f"INPUT {root} does not exist; pass the folder that holds the JPEG/PNG/DICOM slices")
    if opts.concurrency < 1:
        raise UsageError(f"--concurrency {opts.concurrency}: must be at least 1")
    if opts.protocol not in ("grpc", "http"):
        raise UsageError(f"--protocol {opts.protocol}: expected grpc or http")
    if Path(opts.out).is_dir():
        raise UsageError(f"--out {opts.out} is a folder; pass a file name such as {Path(opts.out) / 'results.csv'}")
    layout = detect_layout(root) if root.is_dir() else None
    if opts.evaluate and layout is None:
        raise UsageError(f"INPUT {root}: {LAYOUT_HELP}")
    exclude = [opts.out, errors_path(Path(opts.out))] + ([opts.masks] if opts.masks else [])
    items = discover(root, [*(layout.exclude if layout else []), *exclude])
    if not items:
        raise UsageError(f"INPUT {root} holds no .jpg, .jpeg, .png or .dcm file (nor an extension-less DICOM); "
                         "pass the folder that holds the slices")
    return items, layout


def output_format(opts: ScoreOptions) -> str:
    return opts.fmt or ("jsonl" if Path(opts.out).suffix.lower() in (".jsonl", ".ndjson") else "csv")


def run_score(opts: ScoreOptions) -> int:
    """The whole command: returns the exit code (see EXIT_*); prints progress to stderr and the summary to stdout."""
    if opts.evaluate and opts.masks is None:
        opts.masks = default_masks_dir(Path(opts.out))
    items, layout = check_options(opts)
    code = asyncio.run(_run(opts, items))
    if opts.evaluate and code in (EXIT_OK, EXIT_FAILED):
        from .score_eval import evaluate_results, format_report

        report = evaluate_results(Path(opts.out), output_format(opts), Path(opts.input), layout, opts.masks)
        print(format_report(report))
        report_path = Path(opts.out).with_name(Path(opts.out).stem + ".eval.json")
        write_atomic(report_path, (json.dumps(report, indent=2) + "\n").encode())
        print(f"evaluation written to {report_path}")
    return code


async def _run(opts: ScoreOptions, items: list[Item]) -> int:
    from .aio import AsyncBrainTumorClient
    from .errors import BrainTumorError

    out = Path(opts.out)
    async with AsyncBrainTumorClient(opts.url, protocol=opts.protocol, api_key=opts.api_key, timeout=opts.timeout,
                                     retries=opts.retries) as client:
        url = client.url
        try:
            info = await client.model()
        except BrainTumorError as exc:
            return _fatal(exc, url, opts, f"{out} is untouched")
        classes = list(info["classes"])
        results = ResultsFile(out, output_format(opts), result_columns(classes))
        done_rows = results.read_done()
        done = {row["path"] for row in done_rows}
        if opts.masks is not None:
            missing = [r["path"] for r in done_rows if not r.get("mask") or not (opts.masks / r["mask"]).is_file()]
            if missing:
                raise UsageError(f"{len(missing)} rows of {out} have no mask in {opts.masks} (e.g. {missing[0]}): they "
                                 "were scored without --masks or the masks were moved; rerun with a new --out")
            remove_stale_temporaries(opts.masks)
        todo = [item for item in items if item.rel not in done]
        errors = ErrorsFile(errors_path(out))
        errors.reset()
        summary = ScoreSummary(total=len(items), already_done=len(items) - len(todo))
        if not todo:
            print(f"all {len(items)} files are already in {out}; nothing to do")
            return EXIT_OK
        results.open()
        scorer = Scorer(client, results, errors, classes, opts.masks, opts.concurrency, summary=summary)
        interrupted = _on_signals(scorer)
        try:
            scorer.progress = _progress(len(todo), summary.already_done, opts.progress)
            await scorer.run(todo)
        finally:
            if scorer.progress is not None:
                scorer.progress.close()
            results.close()
            errors.close()
            _remove_signal_handlers()
    return _report(summary, interrupted, opts, out, errors.path, url)


def _progress(total: int, already: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    desc = f"scoring ({already} done before)" if already else "scoring"
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _on_signals(scorer: Scorer) -> list[int]:
    """First Ctrl-C/SIGTERM: stop submitting, let requests in flight finish. Second: cancel them too."""
    received: list[int] = []
    loop = asyncio.get_running_loop()

    def handler(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            scorer.stop.set()
            print("\nstopping: finishing the requests in flight (Ctrl-C again to cancel them)", file=sys.stderr)
        else:
            scorer.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, handler, signum)
    return received


def _remove_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(signum)


RERUN_HINT = "rerun the same command to continue (files already in the results are skipped)"


def _fatal(exc, url: str, opts: ScoreOptions, state: str) -> int:
    """The message and exit code for a failure that is not one file's fault."""
    from .errors import AuthenticationError

    if isinstance(exc, AuthenticationError):
        print(f"braintumor score: error: {url} refused the API key ({exc.detail or exc}); set BRAINTUMOR_API_KEY "
              f"(or --api-key-env VAR) to the key the server was started with; {state}", file=sys.stderr)
        return EXIT_USAGE
    print(f"braintumor score: error: the service at {url} ({opts.protocol}) is not available: {exc.detail or exc}. "
          f"Start it (`braintumor serve`) or pass --url/--protocol; {state}", file=sys.stderr)
    return EXIT_UNAVAILABLE


def _report(summary: ScoreSummary, interrupted: list[int], opts: ScoreOptions, out: Path, errors: Path,
            url: str) -> int:
    done = summary.already_done + summary.scored
    line = (f"{done} of {summary.total} files in {out} ({summary.scored} scored now, {summary.already_done} before); "
            f"{summary.failed} failed")
    print(line + (f" (see {errors})" if summary.failed else ""))
    if summary.fatal is not None:
        return _fatal(summary.fatal, url, opts, f"stopped early with {summary.remaining} files left: {RERUN_HINT}")
    if interrupted:
        print(f"interrupted: {summary.remaining} files left; {RERUN_HINT}", file=sys.stderr)
        return EXIT_INTERRUPTED if interrupted[0] == signal.SIGINT else 128 + interrupted[0]
    if summary.failed:
        print(f"{summary.failed} files failed: they are listed in {errors} and are retried when you rerun the same "
              "command", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
