"""`braintumor score` as a run: check the options, find the files, resume from the results file, score, handle
Ctrl-C/SIGTERM, report and pick the exit code; ``--evaluate`` scores the results against a BRISC folder. The jobs
it assembles live in score_discovery (files to send), score_files (resumable files), scorer (the loop) and
score_eval (metrics)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from .brisc_layout import LAYOUT_HELP, BriscLayout, detect_layout
from .score_discovery import Item, discover
from .score_eval import evaluate_results, format_report
from .score_files import (ErrorsFile, ResultsFile, UsageError, default_masks_dir, errors_path, remove_stale_temporaries,
                          result_columns, write_atomic)
from .scorer import Scorer, ScoreSummary

# Exit codes: 0 every file scored, 1 some failed, 2 usage, 3 the service is unreachable or refused us, 130 Ctrl-C.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


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
    heatmaps: Path | None = None  # also ask for each Grad-CAM heatmap (explanations are on demand) and write it here


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
    exclude = [opts.out, errors_path(Path(opts.out))] + [d for d in (opts.masks, opts.heatmaps) if d]
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
        if opts.heatmaps is not None:
            png_of = {item.rel: item.mask_rel for item in items}  # a heatmap is named as the mask would be
            missing = [r["path"] for r in done_rows
                       if r["path"] in png_of and not (opts.heatmaps / png_of[r["path"]]).is_file()]
            if missing:
                raise UsageError(f"{len(missing)} rows of {out} have no heatmap in {opts.heatmaps} (e.g. {missing[0]}): "
                                 "they were scored without --heatmaps or the heatmaps were moved; rerun with a new --out")
            remove_stale_temporaries(opts.heatmaps)
        todo = [item for item in items if item.rel not in done]
        errors = ErrorsFile(errors_path(out))
        errors.reset()
        summary = ScoreSummary(total=len(items), already_done=len(items) - len(todo))
        if not todo:
            print(f"all {len(items)} files are already in {out}; nothing to do")
            return EXIT_OK
        results.open()
        scorer = Scorer(client, results, errors, classes, opts.masks, opts.concurrency, summary=summary,
                        heatmaps_dir=opts.heatmaps)
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
    from .progress import progress_bar

    desc = f"scoring ({already} done before)" if already else "scoring"
    return progress_bar(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


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
