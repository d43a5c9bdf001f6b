"""Python's cyclic garbage collector, paused while the runner catches up.

A batch allocates tens of thousands of objects (decoded events, rows) that all live until it
ends, while the next batch is decoded beside it. The collector, triggered by allocations, would
run over and over, find next to nothing to free, and scan everything still alive each time:
a third of the CPU of a catch-up (measured with ``bench/projections.py``). So the runner pauses
it for a batch, and keeps it paused from one batch to the next while they come back full, but
lets it run once every ``every`` batches. Reference counting frees memory as usual meanwhile;
only objects in reference cycles wait, for at most ``every`` batches.

The collector is process-wide: a pause that this module did not make (the collector was
already off) is left alone, and ``resume`` only undoes this module's own.
"""

from __future__ import annotations

import gc

__all__ = ["CollectorPause"]


class CollectorPause:
    """Used from one thread (the runner's): ``pause`` before a batch, ``batch_done`` after
    it, ``resume`` when the runner stops or fails."""

    def __init__(self, every: int = 10) -> None:
        self.every = every
        self._paused = False
        self._batches = 0

    def pause(self) -> None:
        if not self._paused and gc.isenabled():
            gc.disable()
            self._paused = True

    def batch_done(self, *, behind: bool) -> None:
        """Resume unless more full batches follow and the periodic collection is not due."""
        self._batches += 1
        if not behind or self._batches % self.every == 0:
            self.resume()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            gc.enable()  # the next allocation collects: everything young is due by now
