"""Progress of the step loops: a tqdm bar per phase on a terminal, as diffusers shows, else log lines; and,
inside `reporting_to(callback)`, the steps also reported to a caller (the web page's progress bar).

Where stderr is not a terminal (Cog collects stdout and the logs as the prediction's logs, CI keeps
files), a bar's carriage returns would be noise, so every tenth step is logged instead, with the time spent
and, as tqdm's bar estimates it, the time left (a minute-long video samples for many minutes). The reporter is
a context variable, set for the block of one request only: requests in other threads or contexts are not
reported to it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from tqdm import tqdm

format_interval = tqdm.format_interval

logger = logging.getLogger(__name__)

LOG_EVERY = 10

ProgressCallback = Callable[[str, int, int], None]
"""callback(phase, steps done, steps of the phase), after each step."""

_reporter: ContextVar[ProgressCallback | None] = ContextVar("pnp_progress_reporter", default=None)


@contextmanager
def reporting_to(callback: ProgressCallback) -> Iterator[None]:
    """Inside the block, every step loop of the engine also calls `callback` after each of its steps."""
    token = _reporter.set(callback)
    try:
        yield
    finally:
        _reporter.reset(token)


def progress(total: int, phase: str) -> Iterator[int]:
    """Yield 0 .. total − 1, showing `phase` with the steps done and their rate."""
    report = _reporter.get()
    bar = tqdm(total=total, desc=phase, unit="step") if sys.stderr.isatty() else None
    start = time.perf_counter()
    try:
        for step in range(total):
            yield step
            # Reached when the loop comes back for the next step: the step's work is queued, and on a GPU
            # may still be running (a phase's seconds are taken after a synchronisation, these are not).
            if bar is not None:
                bar.update()
            elif (step + 1) % LOG_EVERY == 0 or step + 1 == total:
                elapsed = time.perf_counter() - start
                left = elapsed / (step + 1) * (total - step - 1)
                logger.info(
                    "%s step %d/%d, %s, about %s left",
                    phase,
                    step + 1,
                    total,
                    format_interval(elapsed),
                    format_interval(left),
                )
            if report is not None:
                report(phase, step + 1, total)
    finally:
        if bar is not None:
            bar.close()
