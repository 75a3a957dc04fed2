"""Which task each optimisation step trains: the alternation order of classification and segmentation batches."""

from __future__ import annotations

from dataclasses import dataclass

CLS, SEG = "cls", "seg"


@dataclass(frozen=True)
class TaskSchedule:
    """One segmentation step after every ``seg_every`` classification steps (none when segmentation is off)."""

    seg_every: int = 2
    segmentation: bool = True

    def epoch(self, cls_steps: int) -> list[str]:
        tasks: list[str] = []
        for i in range(cls_steps):
            tasks.append(CLS)
            if self.segmentation and (i + 1) % self.seg_every == 0:
                tasks.append(SEG)
        return tasks
