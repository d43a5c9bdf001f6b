"""Graceful stop for the long-running processes (relay, engine worker, timers).

The first SIGTERM or SIGINT asks the process to finish the work in hand and return; a second
one, while it is still stopping, exits at once (status 128 + signal number).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["stop_on_signals"]


@contextmanager
def stop_on_signals(
    stop: Callable[[], None],
    *,
    stopping: Callable[[], bool],
    log: logging.Logger,
    graceful: str,
    abrupt: str,
) -> Iterator[None]:
    """While inside, SIGTERM/SIGINT call ``stop`` (logging ``"<SIGNAL>: <graceful>"``); one
    that comes while ``stopping()`` logs ``"<SIGNAL> again: <abrupt>"`` and exits. The
    previous handlers are restored on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may install handlers; the caller stops the work itself
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stopping():
            log.warning("%s again: %s", name, abrupt)
            raise SystemExit(128 + signum)
        log.info("%s: %s", name, graceful)
        stop()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
