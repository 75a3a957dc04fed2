"""Load shapes for the locustfiles: step load (users added in equal steps) and soak (ramp, then hold).

Each shape is a plain function of the elapsed time, ``at(t) -> (users, spawn_rate) | None`` (None: stop), so it is
unit-tested without locust. :func:`locust_shape` wraps one into a ``LoadTestShape`` that reads locust's own
``--users``, ``--spawn-rate`` and ``--run-time`` (``use_common_options``); a locustfile defines that class only when
``BRAINTUMOR_LOADTEST_SHAPE`` names a shape, because locust uses any shape class it finds in the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

SHAPE_ENV = "BRAINTUMOR_LOADTEST_SHAPE"
STEPS_ENV = "BRAINTUMOR_LOADTEST_STEPS"


@dataclass(frozen=True)
class StepShape:
    """``steps`` equal steps of ``users / steps`` users (rounded up), each ``duration / steps`` seconds long."""

    users: int
    spawn_rate: float
    duration: float
    steps: int = 4

    def at(self, t: float) -> tuple[int, float] | None:
        if t >= self.duration:
            return None
        steps = max(1, min(self.steps, self.users))
        step = min(int(t // (self.duration / steps)), steps - 1)
        return min(self.users, math.ceil((step + 1) * self.users / steps)), self.spawn_rate


@dataclass(frozen=True)
class SoakShape:
    """All ``users`` from the start (spawned at ``spawn_rate``), held until ``duration``; the request rate is set by
    the users' constant-throughput wait time, so it stays flat however fast the server answers."""

    users: int
    spawn_rate: float
    duration: float

    def at(self, t: float) -> tuple[int, float] | None:
        return None if t >= self.duration else (self.users, self.spawn_rate)


SHAPES = {"step": StepShape, "soak": SoakShape}


def make_shape(name: str, users: int, spawn_rate: float, duration: float | None):
    if name not in SHAPES:
        raise ValueError(f"unknown load shape {name!r}; choose one of {', '.join(SHAPES)}")
    if not duration:
        raise ValueError(f"the {name} shape needs --run-time (its steps are fractions of it)")
    if name == "step":
        return StepShape(users, spawn_rate, duration, int(os.environ.get(STEPS_ENV) or 4))
    return SHAPES[name](users, spawn_rate, duration)


def locust_shape(name: str):
    """A ``LoadTestShape`` class running shape ``name`` with locust's --users/--spawn-rate/--run-time."""
    from locust import LoadTestShape

    class BrainTumorShape(LoadTestShape):
        use_common_options = True
        _shape = None

        def tick(self):
            if self._shape is None:
                options = self.runner.environment.parsed_options
                self._shape = make_shape(name, options.num_users or 1, options.spawn_rate or 1.0, options.run_time)
            return self._shape.at(self.get_run_time())

    BrainTumorShape.__name__ = BrainTumorShape.__qualname__ = f"{name.capitalize()}Shape"
    return BrainTumorShape
