"""The resumable files of `braintumor score`: the append-only results file (each row fsync'd as it completes, a torn
last line cut off on reopen), the errors file, and atomic writes for masks; plus the command's UsageError."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

ERROR_COLUMNS = ("path", "kind", "detail")


class UsageError(ValueError):
    """The command line or the files it names are wrong; the message says what to change (exit code 2)."""


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
