"""Progress of the step loops (pnp.progress): tqdm bars on a terminal, log lines where output is collected,
for every phase of a request."""

from __future__ import annotations

import io
import logging

import pytest

from pnp import PnPEngine
from pnp import progress as progress_module
from pnp.progress import progress, reporting_to
from tests.helpers import HORSE, config


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_every_tenth_step_and_the_last_are_logged(monkeypatch, caplog):
    """With the time spent and the time left as tqdm estimates it: the mean step's seconds times the steps left
    (here the clock advances 2 s a step)."""
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())
    clock = iter([0, 20, 40, 50])  # the start, then each logged step
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="pnp.progress"):
        assert list(progress(25, "translation")) == list(range(25))
    assert [r.getMessage() for r in caplog.records if r.name == "pnp.progress"] == [
        "translation step 10/25, 00:20, about 00:30 left",
        "translation step 20/25, 00:40, about 00:10 left",
        "translation step 25/25, 00:50, about 00:00 left",
    ]


def test_on_a_terminal_a_bar_shows_the_phase_steps_and_rate(monkeypatch, caplog):
    terminal = Terminal()
    monkeypatch.setattr(progress_module.sys, "stderr", terminal)
    with caplog.at_level(logging.INFO, logger="pnp.progress"):
        assert list(progress(12, "inversion")) == list(range(12))
    shown = terminal.getvalue()
    assert "inversion" in shown and "12/12" in shown and "step/s" in shown
    assert not [r for r in caplog.records if r.name == "pnp.progress"]  # the bar replaces the log lines


@pytest.mark.parametrize("generation", [False, True])
def test_every_phase_of_a_request_reports_its_progress(engine: PnPEngine, monkeypatch, caplog, generation):
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())
    # A new image (an inversion prompt of its own), so that the inversion runs.
    request = config(generation_prompt="a horse", seed=1) if generation else config(inversion_prompt="progress")
    with caplog.at_level(logging.INFO, logger="pnp.progress"):
        engine(request, HORSE)
    phases = ["generation", "translation"] if generation else ["inversion", "translation"]
    steps = [r.getMessage() for r in caplog.records if r.name == "pnp.progress"]
    assert [step.split(",")[0] for step in steps] == [f"{phase} step 10/10" for phase in phases]


def test_a_reporter_hears_every_step_of_every_phase(engine: PnPEngine, monkeypatch):
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())
    heard: list[tuple[str, int, int]] = []
    with reporting_to(lambda phase, done, total: heard.append((phase, done, total))):
        engine(config(inversion_prompt="reported", auto_mask=True, translation_prompts="a cat; a dog"), HORSE)
    engine(config(inversion_prompt="not reported"), HORSE)  # outside the block: nothing more
    # 10 inversion steps, the mask's 30 latents in one UNet call (256 fit one at 128 px), then 10
    # translation steps, in order.
    expected = [("inversion", i, 10) for i in range(1, 11)] + [("mask", 1, 1)]
    assert heard == expected + [("translation", i, 10) for i in range(1, 11)]
