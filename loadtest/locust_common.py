"""What both locustfiles share: the pacing and cache-busting `braintumor loadtest` sets through the environment, and
one last CSV write at exit. It imports locust, so only locustfiles import it (locust gevent-patches the importing
process; tests import payloads.py and shapes.py, never this)."""

from __future__ import annotations

import os

import gevent
from locust import constant, constant_throughput, events

# 0: send identical bytes, so repeated explanations are cache hits (the soak); default 1: every request is new.
CACHE_BUST = os.environ.get("BRAINTUMOR_LOADTEST_CACHE_BUST", "1") != "0"
# Tasks per second per user (`--rate` / users); 0: closed loop, the next request when the previous is answered.
USER_RATE = float(os.environ.get("BRAINTUMOR_LOADTEST_USER_RATE") or 0)
# 1 (`--heatmap`): analyze asks for the Grad-CAM heatmap too; default 0, as most callers (explanations on demand).
HEATMAP = os.environ.get("BRAINTUMOR_LOADTEST_HEATMAP", "0") == "1"
# `--mask-format`: how analyze asks for the mask, "png" (default, the field not sent) or "rle" (COCO run-length).
MASK_FORMAT = os.environ.get("BRAINTUMOR_LOADTEST_MASK_FORMAT") or "png"


def pacing():
    """A User's ``wait_time``: constant throughput when USER_RATE is set, else none."""
    return constant_throughput(USER_RATE) if USER_RATE > 0 else constant(0)


@events.quitting.add_listener
def _final_csv_write(environment, **_kwargs) -> None:
    # locust rewrites its --csv files every second and not again at exit; by now every user has stopped, so one more
    # pass of its writer makes the CSV match the final summary (the last second is otherwise missing).
    gevent.sleep(1.2)
