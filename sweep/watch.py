"""Trials that run too long or go quiet: the driver's watch over running trials.

A hung trial reports nothing, so nothing of Tune's (stoppers, schedulers: they act on results)
ever looks at it again; the driver watches wall time itself (driver.TrialWatch calls this every
loop step). Plain Python with an injectable clock, so tests drive it by hand.

- Timeout (`budget.trial_timeout`): an attempt running longer than that is overdue.
- Stall: a trial quiet for STALL_FACTOR x the sweep's typical epoch time (the median gap
  between two reports of any trial), and at least MIN_STALL_S, is named once per quiet spell.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

STALL_FACTOR = 5.0
MIN_STALL_S = 60.0


@dataclass
class _Running:
    started: float
    last: float  # last report, or the start
    reports: int = 0
    named: bool = False  # already named as stalled in this quiet spell


class Watch:
    """Start, report and end times of running trials (by Tune id)."""

    def __init__(
        self,
        timeout_s: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        stall_factor: float = STALL_FACTOR,
        min_stall_s: float = MIN_STALL_S,
    ) -> None:
        self.timeout_s, self.clock = timeout_s, clock
        self.stall_factor, self.min_stall_s = stall_factor, min_stall_s
        self.running: dict[str, _Running] = {}
        self.gaps: list[float] = []  # seconds between two reports of one trial

    def started(self, tid: str) -> None:
        now = self.clock()
        self.running[tid] = _Running(now, now)

    def reported(self, tid: str) -> None:
        now = self.clock()
        r = self.running.setdefault(tid, _Running(now, now))
        if r.reports:  # the first report also carries the trial's setup (teachers, data)
            self.gaps.append(now - r.last)
        r.last, r.reports, r.named = now, r.reports + 1, False

    def ended(self, tid: str) -> None:
        self.running.pop(tid, None)

    def overdue(self) -> list[tuple[str, float]]:
        """(trial, seconds it has run) of each attempt past the timeout."""
        if self.timeout_s is None:
            return []
        now = self.clock()
        return [
            (tid, now - r.started)
            for tid, r in self.running.items()
            if now - r.started > self.timeout_s
        ]

    def typical_epoch(self) -> float | None:
        return statistics.median(self.gaps) if self.gaps else None

    def stalled(self) -> list[tuple[str, float, float]]:
        """(trial, seconds quiet, typical epoch seconds) of each trial newly found quiet for
        too long; a trial is named again only after it reports once more."""
        typical = self.typical_epoch()
        if typical is None:
            return []
        limit = max(self.min_stall_s, self.stall_factor * typical)
        now, out = self.clock(), []
        for tid, r in self.running.items():
            if not r.named and now - r.last > limit:
                r.named = True
                out.append((tid, now - r.last, typical))
        return out
