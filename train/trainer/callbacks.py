"""Epoch-end callbacks: metric history as CSV and last/best checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable


class HistoryCSV:
    """Appends one row per epoch to history.csv; on resume, rows past the resumed epoch are dropped."""

    def __init__(self, path: str | Path, resume_epoch: int = 0):
        self.path = Path(path)
        if self.path.exists():
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) <= resume_epoch]
            self._write(rows)

    def _write(self, rows: list[dict]) -> None:
        if not rows:
            self.path.unlink(missing_ok=True)
            return
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    def __call__(self, trainer, epoch: int, logs: dict) -> None:
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        rows.append({"epoch": epoch, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in logs.items()}})
        self._write(rows)


class Checkpointer:
    """Saves RUN/last.pt every epoch and RUN/best.pt whenever ``logs[score_key]`` improves."""

    def __init__(self, out_dir: str | Path, save: Callable[..., None], score_key: str = "val_score"):
        self.out_dir, self.save, self.score_key = Path(out_dir), save, score_key

    def __call__(self, trainer, epoch: int, logs: dict) -> None:
        score = logs.get(self.score_key)
        improved = score is not None and (trainer.best_score is None or score > trainer.best_score)
        if improved:
            trainer.best_score = score
        self.save(self.out_dir / "last.pt", epoch, trainer.best_score)
        if improved:
            self.save(self.out_dir / "best.pt", epoch, trainer.best_score)
