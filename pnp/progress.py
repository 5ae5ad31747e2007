"""Progress of the step loops: a tqdm bar per phase on a terminal, as diffusers shows, else log lines.

Where stderr is not a terminal (Cog collects stdout and the logs as the prediction's logs, CI keeps
files), a bar's carriage returns would be noise, so every tenth step is logged instead.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

from tqdm import tqdm

logger = logging.getLogger(__name__)

LOG_EVERY = 10


def progress(total: int, phase: str) -> Iterator[int]:
    """Yield 0 .. total − 1, showing `phase` with the steps done and their rate."""
    if sys.stderr.isatty():
        yield from tqdm(range(total), desc=phase, unit="step")
        return
    for step in range(total):
        yield step
        # Reached when the loop comes back for the next step: the step's work is queued, and on a GPU may
        # still be running (a phase's seconds are taken after a synchronisation, these lines are not).
        if (step + 1) % LOG_EVERY == 0 or step + 1 == total:
            logger.info("%s step %d/%d", phase, step + 1, total)
