"""The scoring loop of `braintumor score`: at most ``concurrency`` SDK calls in flight; each success writes its mask and
then its durable row, each failure an errors line; an unavailable service or a refused key stops the run."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

from .score_discovery import Item
from .score_files import ErrorsFile, ResultsFile, write_atomic

BUSY_RETRIES, BUSY_BACKOFF_S = 4, 0.5  # RESOURCE_EXHAUSTED / 429: the server asks us to come back shortly
# score reads the mask only to write its PNG file (--masks) or not at all: as COCO RLE the server encodes no PNG and
# sends ~230 bytes instead of ~1.8 kB; the file is encoded here with the server's own settings (clients/masks.py), so
# it is the file the server's PNG would have been.
MASK_FORMAT = "rle"


def row_for(item: Item, analysis, classes: list[str], mask_rel: str) -> dict:
    probs = analysis.probabilities
    return {"path": item.rel, "label": analysis.label, **{f"prob_{c}": float(probs.get(c, 0.0)) for c in classes},
            "refer": bool(analysis.refer), "refer_reason": list(analysis.refer_reasons),
            "tumor_area_px": int(analysis.tumor_area_px), "tumor_area_mm2": analysis.tumor_area_mm2,
            "model_name": analysis.model_name, "model_version": analysis.model_version, "mask": mask_rel}



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
    finish). Each success writes its mask (if ``masks_dir``), its heatmap (if ``heatmaps_dir``) and then its row; each
    failure writes an errors line."""

    client: object
    results: ResultsFile
    errors: ErrorsFile
    classes: list[str]
    masks_dir: Path | None = None
    concurrency: int = 8
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    progress: object = None  # a tqdm bar, or None
    summary: ScoreSummary = field(default_factory=ScoreSummary)
    heatmaps_dir: Path | None = None  # set: each call asks for the Grad-CAM heatmap, written here before the row

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
                write_atomic(self.masks_dir / item.mask_rel, analysis.mask_png_bytes())
            except OSError as exc:
                return self._fail(item, "mask_write", f"cannot write {self.masks_dir / item.mask_rel}: {exc}")
            mask_rel = item.mask_rel
        if self.heatmaps_dir is not None:
            try:
                write_atomic(self.heatmaps_dir / item.mask_rel, analysis.heatmap_png)
            except OSError as exc:
                return self._fail(item, "heatmap_write", f"cannot write {self.heatmaps_dir / item.mask_rel}: {exc}")
        # No await between the mask and the row: a cancellation cannot separate them.
        self.results.append(row_for(item, analysis, self.classes, mask_rel))
        self.summary.scored += 1
        self._tick()

    async def _analyze(self, data: bytes):
        """One analysis; a busy server (the SDK does not retry that) gets a few more tries with backoff."""
        from .errors import OverloadedError

        for attempt in range(BUSY_RETRIES + 1):
            try:
                return await self.client.analyze(data, heatmap=self.heatmaps_dir is not None, mask_format=MASK_FORMAT)
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
