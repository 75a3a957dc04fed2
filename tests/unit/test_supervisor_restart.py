"""`braintumor serve` restarts what dies (issue 13): backoff schedule, and the supervise loop on real child processes."""

import logging
import os
import signal
import sys
import threading
import time

import pytest

from braintumor.serving.serve_command import _supervise
from braintumor.serving.supervisor import Backoff, ChildProcess


def test_backoff_doubles_to_a_cap_and_resets_after_a_stable_run():
    b = Backoff(first=1, cap=8, stable=60)
    b.started(0)
    assert [b.failed(1), b.failed(2), b.failed(3), b.failed(4), b.failed(5)] == [1, 2, 4, 8, 8]
    b.started(10)
    assert b.failed(30) == 8  # ran 20 s: still a crash loop
    b.started(100)
    assert b.failed(200) == 1  # ran 100 s: a fresh failure


SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")
def test_a_killed_child_is_restarted_and_the_other_left_alone(caplog):
    children = [ChildProcess("HTTP gateway", SLEEPER).start(), ChildProcess("gRPC API", SLEEPER).start()]
    stop: list[int] = []
    loop = threading.Thread(target=_supervise, args=(None, children, stop, logging.getLogger("t"), 0.05))
    try:
        with caplog.at_level(logging.INFO):
            loop.start()
            first, other = children[0].pid, children[1].pid
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not (children[0].alive() and children[0].pid != first):
                assert time.monotonic() < deadline, "the killed child was not restarted"
                time.sleep(0.05)
            assert children[1].pid == other and children[1].alive()
            # a second death waits longer (backoff 1 s, then 2 s)
            second = children[0].pid
            killed = time.monotonic()
            os.kill(second, signal.SIGKILL)
            while not (children[0].alive() and children[0].pid != second):
                assert time.monotonic() - killed < 10
                time.sleep(0.05)
            assert time.monotonic() - killed >= 1.9
    finally:
        stop.append(signal.SIGTERM)
        loop.join(timeout=10)
        for child in children:
            child.stop(timeout=5)
    messages = [r.getMessage() for r in caplog.records]
    assert any("HTTP gateway exited (code -9); restarting it in 1 s" in m for m in messages), messages
    assert any("HTTP gateway exited (code -9); restarting it in 2 s" in m for m in messages), messages
    assert sum("HTTP gateway restarted" in m for m in messages) == 2
    assert not any("gRPC API" in m for m in messages)


def test_dead_children_lists_exited_unreaped_children_only():
    """What the embedded Triton's start watches for (a python stub that died); a live child is not listed."""
    import os
    import subprocess
    import sys
    import time

    from braintumor.serving.supervisor import dead_children

    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while gone.pid not in [pid for pid, _ in dead_children(os.getpid())]:
            assert time.monotonic() < deadline, "an exited child never showed as a zombie"
            time.sleep(0.05)
        assert alive.pid not in [pid for pid, _ in dead_children(os.getpid())]
    finally:
        alive.kill()
        alive.wait()
        gone.wait()
    assert gone.pid not in [pid for pid, _ in dead_children(os.getpid())]  # reaped: no longer a zombie
