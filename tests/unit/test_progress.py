"""Progress bars in a log are plain lines, a few of them; on a terminal, tqdm's own bar. The module exists twice
(train/ and clients/ may not import each other): the copies must be equal."""

import io
from pathlib import Path

import pytest

from braintumor.clients import progress as client_progress
from braintumor.train import progress

ROOT = Path(__file__).resolve().parents[2]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_two_copies_are_equal():
    assert (ROOT / "train" / "progress.py").read_bytes() == (ROOT / "clients" / "progress.py").read_bytes()


@pytest.mark.parametrize("module", [progress, client_progress])
def test_a_log_gets_plain_lines_and_few_of_them(module):
    log = io.StringIO()
    for _ in module.progress_bar(range(5000), file=log, desc="scoring"):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2  # the start and the end: updates come at most every PLAIN_INTERVAL_S seconds
    assert lines[0].startswith("scoring:   0%") and "5000/5000" in lines[-1]


def test_a_terminal_gets_tqdms_bar():
    screen = Terminal()
    for _ in progress.progress_bar(range(3), file=screen, desc="epoch 1"):
        pass
    assert screen.getvalue().startswith("\repoch 1:")
