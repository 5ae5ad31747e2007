"""What the front ends share (pnp.frontend): the one output directory at a time that the Cog predictor and
the web page keep. The model options and the engine's loading are tested through the command line and the page.
"""

from __future__ import annotations

import tempfile

from pnp.frontend import LatestOutputs


def test_each_request_gets_an_empty_directory_and_the_previous_one_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    outputs = LatestOutputs(prefix="pnp-test-")
    first = outputs.fresh()
    (first / "out-0.png").write_bytes(b"served")
    second = outputs.fresh()
    assert not first.exists()
    assert second.parent == tmp_path and second.name.startswith("pnp-test-") and list(second.iterdir()) == []
    assert outputs.latest == second and list(tmp_path.iterdir()) == [second]


def test_close_removes_the_latest_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    outputs = LatestOutputs(prefix="pnp-test-")
    outputs.close()  # before any request: nothing to remove
    (outputs.fresh() / "out-0.png").write_bytes(b"served")
    outputs.close()
    assert list(tmp_path.iterdir()) == [] and outputs.latest is None
