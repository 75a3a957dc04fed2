"""Progress bars that suit where they print: tqdm's redrawn line on a terminal; in a log (CI, nohup, a file) one plain
line at most every ``PLAIN_INTERVAL_S`` seconds instead of hundreds of carriage-return updates on one line.

The training layer and the SDK may not import each other, so this file exists twice, byte for byte
(train/progress.py and clients/progress.py); tests/unit/test_progress.py proves they are equal.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0


class _Lines:
    """A stream for a bar that is not on a terminal: each status becomes its own line; tqdm's carriage returns,
    padding and the empty writes it uses to clear or close a bar are dropped."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable=None, *, file=None, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)`` on ``file`` (default stderr); in a non-terminal, plain lines every
    ``PLAIN_INTERVAL_S`` seconds (unless ``mininterval`` is given)."""
    stream = sys.stderr if file is None else file
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.setdefault("mininterval", PLAIN_INTERVAL_S)
    kwargs["dynamic_ncols"] = False  # no terminal to measure
    return tqdm(iterable, file=_Lines(stream), **kwargs)
