"""Progress of a long job, logged at a steady pace with an ETA.

A paper-scale search or generation runs for hours inside one SLURM job; its log is the only
thing a user watching `tail -f` sees. One line at most every `every_seconds` (a minute), or
sooner when another `every_fraction` of the work is done, and always the last one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Count units of work done out of `total`; log `what: done/total (pct), elapsed, ETA`."""

    def __init__(
        self,
        what: str,
        total: int,
        log: logging.Logger,
        unit: str = "",
        every_seconds: float = 60.0,
        every_fraction: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.log, self.unit = what, total, log, unit
        self.every_seconds, self.every_fraction, self.clock = every_seconds, every_fraction, clock
        self.done = 0
        self.began = clock()
        self._last_time = self.began
        self._last_done = 0

    def eta_seconds(self) -> float | None:
        """Seconds left at the mean pace so far; None before any work is done."""
        if self.done == 0:
            return None
        elapsed = self.clock() - self.began
        return elapsed / self.done * max(0, self.total - self.done)

    def line(self) -> str:
        elapsed = self.clock() - self.began
        eta = self.eta_seconds()
        unit = f" {self.unit}" if self.unit else ""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.what}: {self.done}/{self.total}{unit} ({pct:.0f}%), "
            f"{format_duration(elapsed)} elapsed, ETA "
            + ("?" if eta is None else format_duration(eta))
        )

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        finished = self.done >= self.total
        step = self.every_fraction * self.total
        due = now - self._last_time >= self.every_seconds or (
            step > 0 and self.done - self._last_done >= step
        )
        if finished or due:
            self.log.info("%s", self.line())
            self._last_time, self._last_done = now, self.done
