"""The Cog service through Cog's own HTTP server (coglet), as Replicate and `docker run` serve it: only what
needs HTTP (the schema's 422s, the health check, webhooks, cancel, how results and failures reach the
client, a masked request and a video request end to end). What the predictor does in-process is in
tests/test_service.py.

A module fixture starts `python -m cog.server.http` on 127.0.0.1 with the tiny random model on the
CPU, once .cog/openapi_schema.json is written by script/openapi-schema (the server validates inputs
only with that file; conftest.py's `openapi_schema`), and always stops it. Webhooks go to a small HTTP
sink in a thread.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import requests
from PIL import Image

from tests.helpers import FAST, HORSE, ROOT, free_port, horse_at, write_horse_video
from tests.test_video_audio import audio_packets, span_packets, tone, with_sound

TERMINAL = {"succeeded", "failed", "canceled"}
# Where coglet, the server of the cog SDK, keeps prediction files (fixed in its binary; a container's /tmp).
COGLET_DIR = Path("/tmp/coglet")


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _decode(uri: str) -> Image.Image:
    header, _, payload = uri.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64"), header
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    image.load()
    return image


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log_path: Path):
        self.url, self.process, self.log_path = url, process, log_path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def health(self) -> str:
        return requests.get(f"{self.url}/health-check", timeout=10).json()["status"]

    def wait_for(self, status: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited:\n{self.log_tail()}"
            try:
                last = self.health()
            except requests.ConnectionError:
                last = "unreachable"
            if last == status:
                return
            time.sleep(0.2)
        raise AssertionError(f"health-check stayed {last!r}, not {status!r}, for {timeout} s:\n{self.log_tail()}")

    def post_prediction(
        self, body: dict[str, Any], asynchronous: bool = False, prediction_id: str | None = None
    ) -> requests.Response:
        """POST /predictions (PUT /predictions/ID with an id); a 409 "At capacity" is retried for a while.

        Cog's server answers a synchronous prediction before it hands its one slot back, so a request
        sent right after another can meet a busy server for a moment (a CI run did).
        """
        headers = {"Prefer": "respond-async"} if asynchronous else {}
        deadline = time.monotonic() + 30
        while True:
            if prediction_id is None:
                response = requests.post(f"{self.url}/predictions", json=body, headers=headers, timeout=300)
            else:
                url = f"{self.url}/predictions/{prediction_id}"
                response = requests.put(url, json={**body, "id": prediction_id}, headers=headers, timeout=300)
            if response.status_code != 409 or time.monotonic() > deadline:
                return response
            time.sleep(0.1)

    def predict(self, **inputs) -> requests.Response:
        return self.post_prediction({"input": inputs})


class WebhookSink:
    """Collects the JSON bodies POSTed to http://127.0.0.1:<port>/<path>, by path."""

    def __init__(self) -> None:
        self.events: dict[str, list[dict]] = {}
        self.changed = threading.Condition()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with sink.changed:
                    sink.events.setdefault(self.path, []).append(body)
                    sink.changed.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def wait(self, path: str, predicate, timeout: float) -> list[dict]:
        with self.changed:
            if not self.changed.wait_for(lambda: any(predicate(e) for e in self.events.get(path, [])), timeout):
                raise AssertionError(f"no matching webhook on {path} in {timeout} s; got {self.events.get(path)}")
            return list(self.events[path])

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def cog_server(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory, predictor: str = "predict.py:Predictor", **env_vars: str
) -> Iterator[Server]:
    """Cog's HTTP server on a free port of 127.0.0.1 with `predictor` on the tiny model, until the block ends."""
    port = free_port()
    env = dict(os.environ)
    # coglet starts its worker with the `python` on PATH: it must be this environment's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        COG_PREDICT_TYPE_STUB=predictor,
        PORT=str(port),
        PNP_MODEL=str(model_dir),
        PNP_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
        # One torch thread, as in the test process (conftest.py): oversubscribed OpenMP threads on a
        # small shared machine make each UNet call many times slower.
        OMP_NUM_THREADS="1",
        # The predictor's output directories and Cog's downloaded inputs stay in the test's temp tree.
        TMPDIR=str(tmp_path_factory.mktemp("cog-tmp")),
        **env_vars,
    )
    env.pop("PNP_DTYPE", None)
    log_path = tmp_path_factory.mktemp("cog-server") / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the server and its worker stop together
        )
    srv = Server(f"http://127.0.0.1:{port}", process, log_path)
    coglet_existed, predictions_before = COGLET_DIR.exists(), _coglet_predictions()
    try:
        srv.wait_for("READY", timeout=120)
        yield srv
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # the worker, if it outlived the server
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        # coglet keeps each prediction's files under a fixed /tmp/coglet, whatever TMPDIR says: remove ours.
        if coglet_existed:
            for path in _coglet_predictions() - predictions_before:
                shutil.rmtree(path, ignore_errors=True)
        else:
            shutil.rmtree(COGLET_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, openapi_schema: dict[str, Any]
) -> Iterator[Server]:
    with cog_server(tiny_model_dir, tmp_path_factory) as srv:
        yield srv


def _coglet_predictions() -> set[Path]:
    predictions = COGLET_DIR / "predictions"
    return set(predictions.iterdir()) if predictions.is_dir() else set()


@pytest.fixture(scope="module")
def sink() -> Iterator[WebhookSink]:
    webhook_sink = WebhookSink()
    yield webhook_sink
    webhook_sink.close()


@pytest.fixture(scope="module")
def horse_uri() -> str:
    return _data_uri(HORSE.read_bytes(), "image/jpeg")


def test_health_check_is_ready_with_the_schema(server: Server, openapi_schema: dict[str, Any]) -> None:
    body = requests.get(f"{server.url}/health-check", timeout=10).json()
    assert body["status"] == "READY"
    assert body["setup"]["status"] == "succeeded"
    # The server serves the schema that script/openapi-schema wrote.
    served = requests.get(f"{server.url}/openapi.json", timeout=10).json()
    assert served["components"]["schemas"]["Input"] == openapi_schema["components"]["schemas"]["Input"]


def test_real_image_prediction(server: Server, horse_uri: str) -> None:
    # Its own inversion prompt: a new inversion whatever ran before on this server.
    response = server.predict(
        input_image=horse_uri, translation_prompts="a robot horse", inversion_prompt="metrics", **FAST
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    assert len(body["output"]) == 1
    image = _decode(body["output"][0])
    assert image.format == "PNG" and image.size == (128, 128)
    assert np.asarray(image.convert("RGB")).std() > 0  # not a blank image
    # Every prediction logs its phases with seconds and UNet evals.
    for phase in ("load", "inversion", "extraction", "translation", "decode"):
        assert phase in body["logs"]
    assert "UNet evals" in body["logs"]
    # The engine's figures are the prediction's metrics too.
    metrics = body["metrics"]
    assert metrics["unet_evals"] == 10 + 8 + 20 and metrics["cache_hit"] is False and metrics["float32_retry"] is False
    assert metrics["memory_retries"] == 0 and metrics["cache"] == "new"
    # By the memory model: the extraction's 8 steps in one UNet call, the one image in one VAE call.
    assert metrics["memory"]["unet_batch"] == 8 and metrics["memory"]["vae_batch"] == 1
    assert metrics["memory"]["modelled_mib"] > 0
    assert {name: phase["unet_evals"] for name, phase in metrics["phases"].items()} == {
        "load": 0,
        "inversion": 10,
        "extraction": 8,
        "generation": 0,
        "mask": 0,
        "translation": 20,
        "decode": 0,
    }
    assert all(phase["seconds"] >= 0 for phase in metrics["phases"].values())


def test_masked_prediction_keeps_the_input_outside_the_mask(server: Server, horse_uri: str) -> None:
    # A transparent PNG with a white stroke on its top half, as a brush tool leaves it.
    mask = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    mask.paste((255, 255, 255, 255), (0, 0, 40, 20))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    body = server.predict(input_image=horse_uri, mask=_data_uri(buffer.getvalue(), "image/png"), **FAST).json()
    assert body["status"] == "succeeded", body.get("error")
    output = np.asarray(_decode(body["output"][0]).convert("RGB")).astype(int)
    horse = horse_at(128)
    assert np.array_equal(output[72:], horse[72:])  # kept exactly (LANCZOS rings a few rows past the edge)
    assert not np.array_equal(output[:56], horse[:56])  # edited


def test_generation_mode_returns_source_then_one_image_per_prompt(server: Server) -> None:
    response = server.predict(
        generation_prompt="a horse in a field",
        translation_prompts="a robot horse; a zebra;;",
        seed=7,
        output_format="webp",
        **FAST,
    )
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    images = [_decode(uri) for uri in body["output"]]
    assert len(images) == 3  # the generated source, then the two non-empty prompts
    assert all(image.format == "WEBP" and image.size == (128, 128) for image in images)
    assert "seed: 7" in body["logs"]
    # A generated source uses no cache: Cog records no null, so the metric is left out.
    assert "cache" not in body["metrics"] and body["metrics"]["cache_hit"] is False
    # The source's guided sampling is its own phase: 2N evaluations, no inversion or extraction.
    phases = body["metrics"]["phases"]
    assert {name: phases[name]["unet_evals"] for name in ("inversion", "extraction", "generation")} == {
        "inversion": 0,
        "extraction": 0,
        "generation": 20,
    }
    assert "generation done" in body["logs"]


def test_auto_mask_prediction_reports_each_prompts_coverage(server: Server, horse_uri: str) -> None:
    response = server.predict(
        input_image=horse_uri,
        translation_prompts="a robot horse; a zebra",
        inversion_prompt="a horse",
        auto_mask=True,
        **FAST,
    )
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    assert len(body["output"]) == 2
    metrics = body["metrics"]
    coverage = metrics["mask_coverage"]
    assert len(coverage) == 2 and all(0 <= fraction <= 1 for fraction in coverage)
    assert metrics["phases"]["mask"]["unet_evals"] == 10 * (1 + 2)  # K (1 + P)
    assert "auto_mask: 'a robot horse' edits" in body["logs"] and "mask coverage" in body["logs"]
    # With a painted mask it is refused, naming both.
    refused = server.predict(input_image=horse_uri, mask=horse_uri, auto_mask=True, **FAST).json()
    assert refused["status"] == "failed" and "auto_mask: cannot be used together with mask" in refused["error"]


def test_video_prediction_returns_one_mp4_per_prompt(server: Server, tmp_path: Path) -> None:
    """Each MP4 carries the input's AAC sound for its frames' span (4 frames at 8 fps: 0.5 s), copied."""
    picture = write_horse_video(tmp_path / "picture.mp4", frames=4, fps=8)
    video = with_sound(tmp_path / "input.mp4", picture, "aac", tone(2.0))
    expected_sound = [bytes(packet) for packet in span_packets(video, Fraction(0), Fraction(1, 2))]
    response = server.predict(
        input_video=_data_uri(video.read_bytes(), "video/mp4"), translation_prompts="a; b", keyframe_interval=2, **FAST
    )
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    assert len(body["output"]) == 2
    for uri in body["output"]:
        header, _, payload = uri.partition(",")
        assert header == "data:video/mp4;base64", header
        with av.open(io.BytesIO(base64.b64decode(payload))) as container:
            stream = container.streams.video[0]
            frames = list(container.decode(stream))
            assert stream.codec_context.name == "h264" and stream.average_rate == 8
        assert [(frame.width, frame.height) for frame in frames] == [(128, 128)] * 4
        output = tmp_path / "output.mp4"
        output.write_bytes(base64.b64decode(payload))
        assert [bytes(packet) for packet in audio_packets(output)[1]] == expected_sound
    # The MP4s' writing is a phase of its own, in the logs' summary and the metrics.
    phases = body["metrics"]["phases"]
    assert set(phases) == {"load", "inversion", "anchors", "keyframes", "groups", "decode", "encode"}
    assert phases["encode"]["seconds"] > 0 and phases["encode"]["unet_evals"] == 0
    assert phases["inversion"]["unet_evals"] == 4 * 10 and body["metrics"]["cache"] == "new"
    assert "encode done" in body["logs"] and "\nencode " in body["logs"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("feature_injection_threshold", 1.5),
        ("negative_prompt_schedule", "bogus"),
        ("num_inference_steps", 5),
        ("ddim_inversion_steps", 1000),
    ],
)
def test_out_of_schema_inputs_get_422(server: Server, name: str, value: object) -> None:
    response = server.predict(generation_prompt="a horse", **{**FAST, name: value})
    assert response.status_code == 422, response.text
    assert name in response.text


def test_a_request_the_schema_allows_but_the_engine_refuses_fails_clearly(server: Server, horse_uri: str) -> None:
    # 1000 // 10 is not a multiple of 1000 // 30: the schema cannot say so, the engine does
    # (tests/test_schedules.py); here its error reaches the client as a failed prediction.
    response = server.predict(input_image=horse_uri, **{**FAST, "ddim_inversion_steps": 30})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "failed"
    assert "ddim_inversion_steps: " in body["error"] and "nearest valid values" in body["error"]
    server.wait_for("READY", timeout=10)  # the service stays up


def test_async_prediction_posts_webhook_events(server: Server, sink: WebhookSink, horse_uri: str) -> None:
    response = server.post_prediction(
        {
            "input": {"input_image": horse_uri, "translation_prompts": "a; b", **FAST},
            "webhook": sink.url("/async"),
            "webhook_events_filter": ["start", "output", "logs", "completed"],
        },
        asynchronous=True,
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] in ("starting", "processing")
    prediction_id = response.json()["id"]

    events = sink.wait("/async", lambda e: e.get("status") in TERMINAL, timeout=300)
    assert all(e["id"] == prediction_id for e in events)
    # The sink serves each POST in a thread of its own: the events need not be stored in the order sent.
    (final,) = [e for e in events if e["status"] in TERMINAL]
    assert final["status"] == "succeeded", final.get("error")
    assert [_decode(uri).size for uri in final["output"]] == [(128, 128), (128, 128)]
    assert events[0]["status"] in ("starting", "processing")


def test_cancel_a_long_prediction(server: Server, sink: WebhookSink, horse_uri: str) -> None:
    # On the tiny model on two CPU cores one UNet evaluation at 1024x1024 takes seconds, so 999
    # inversion steps and 200 sampling steps would take hours: the prediction is surely running
    # when it is canceled (a finished one would end "succeeded", not "canceled").
    prediction_id = f"cancel-{uuid.uuid4().hex[:8]}"
    response = server.post_prediction(
        {
            "input": {
                "input_image": horse_uri,
                "image_size": 1024,
                "num_inference_steps": 200,
                "ddim_inversion_steps": 999,
            },
            "webhook": sink.url("/cancel"),
            "webhook_events_filter": ["start", "completed"],
        },
        asynchronous=True,
        prediction_id=prediction_id,
    )
    assert response.status_code == 202, response.text
    server.wait_for("BUSY", timeout=30)
    time.sleep(2.0)  # well into the inversion
    assert server.health() == "BUSY"

    started = time.monotonic()
    cancel = requests.post(f"{server.url}/predictions/{prediction_id}/cancel", timeout=30)
    assert cancel.status_code == 200, cancel.text
    events = sink.wait("/cancel", lambda e: e.get("status") in TERMINAL, timeout=60)
    (final,) = [e for e in events if e["status"] in TERMINAL]
    assert final["id"] == prediction_id and final["status"] == "canceled"
    server.wait_for("READY", timeout=60)
    assert time.monotonic() - started < 60

    # The worker survived the cancel: the next prediction runs normally.
    body = server.predict(input_image=horse_uri, **FAST).json()
    assert body["status"] == "succeeded", body.get("error")
    assert _decode(body["output"][0]).size == (128, 128)


def test_a_cancel_of_an_unknown_prediction_is_404(server: Server) -> None:
    response = requests.post(f"{server.url}/predictions/no-such-prediction/cancel", timeout=10)
    assert response.status_code == 404


def test_out_of_memory_over_http_leaves_the_service_ready(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, openapi_schema: dict[str, Any], horse_uri: str
) -> None:
    """The service's predictor on a GPU that holds at most the latents per UNet call that a file names
    (tests/small_gpu_predict.py): none, then 2, then no limit."""
    limit = tmp_path_factory.mktemp("small-gpu") / "latent-limit"
    limit.write_text("0")
    predictor = "tests/small_gpu_predict.py:Predictor"
    with cog_server(tiny_model_dir, tmp_path_factory, predictor, PNP_TEST_LATENT_LIMIT=str(limit)) as srv:
        request = {"input_image": horse_uri, "translation_prompts": "a cat; a dog", "inversion_prompt": "oom", **FAST}
        failed = srv.predict(**request).json()
        assert failed["status"] == "failed"
        assert "image_size: a 128x128 working size with 2 translation_prompts does not fit" in failed["error"]
        # The service stays up: READY once Cog has handed the slot back (a moment after its answer).
        srv.wait_for("READY", timeout=30)
        limit.write_text("2")
        body = srv.predict(**request).json()
        assert body["status"] == "succeeded", body.get("error")
        assert len(body["output"]) == 2 and body["metrics"]["memory_retries"] == 2  # extraction: 8, then 4, then 2
        limit.write_text("none")
        again = srv.predict(**{**request, "translation_prompts": "a zebra"}).json()
        assert again["status"] == "succeeded" and again["metrics"]["cache_hit"] is True  # the entry was whole
        assert again["metrics"]["cache"] == "hit"
        assert again["metrics"]["memory_retries"] == 0
