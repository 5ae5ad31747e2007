"""The web page (pnp.app; `python -m pnp.app`): the editor's value as image and mask, the controls against the
public inputs, requests through Gradio's own client, and a person's use of it in a real browser.

The page runs as the command starts it, in a subprocess on 127.0.0.1 with the tiny model, its temporary
files in the test's tree. The browser test drives Debian's Chromium with its chromedriver through
Selenium; without them installed it skips, naming the packages (`.ci/run` installs them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import av
import gradio as gr
import numpy as np
import pytest
import requests
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from pnp import PnPEngine
from pnp.app import build_page, editor_to_image_and_mask, parse_seed
from pnp.app import main as app_main
from pnp.config import PUBLIC_INPUTS
from tests.helpers import HORSE, ROOT, free_port, horse_at, pixels, png_declaring, write_horse_video

FAST = {"image_size": 128, "num_inference_steps": 10, "ddim_inversion_steps": 10}
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


# --- the editor's value and the controls ----------------------------------------------------------------


def test_the_paint_of_any_layer_is_the_mask_at_the_images_size():
    background = Image.new("RGBA", (40, 30), (10, 20, 30, 255))
    stroke = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    stroke.paste((255, 255, 255, 128), (5, 5, 15, 10))  # half-transparent paint counts as paint
    other = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    other.paste((255, 255, 255, 255), (30, 20, 35, 25))
    image, mask = editor_to_image_and_mask({"background": background, "layers": [stroke, other], "composite": None})
    assert image.mode == "RGB" and image.size == (40, 30) and image.getpixel((0, 0)) == (10, 20, 30)
    expected = np.zeros((30, 40), dtype=np.uint8)
    expected[5:10, 5:15] = expected[20:25, 30:35] = 255
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), expected)


@pytest.mark.parametrize("layers", [[], [Image.new("RGBA", (40, 30), (255, 255, 255, 0))]], ids=["none", "unpainted"])
def test_nothing_painted_is_no_mask(layers):
    image, mask = editor_to_image_and_mask({"background": Image.new("RGBA", (40, 30)), "layers": layers})
    assert image is not None and mask is None


def test_no_image_is_none():
    assert editor_to_image_and_mask(None) == (None, None)
    assert editor_to_image_and_mask({"background": None, "layers": [], "composite": None}) == (None, None)


def test_the_seed_box_reads_empty_as_random():
    assert parse_seed("") is None and parse_seed("  ") is None and parse_seed(None) is None
    assert parse_seed(" 42 ") == 42
    assert parse_seed("4.5") == "4.5"  # passed on, for the config to refuse naming the seed


def test_every_public_input_has_exactly_one_control_with_its_default_and_bounds(engine: PnPEngine):
    page = build_page(engine)
    by_label: dict[str, list[Any]] = {}
    for block in page.blocks.values():
        label = getattr(block, "label", None)
        if label is not None:
            by_label.setdefault(label, []).append(block)
    (editor,) = by_label["input_image"]
    assert type(editor) is gr.ImageEditor
    (video,) = by_label["input_video"]
    assert type(video) is gr.Video and video.sources == ["upload"]
    assert [type(block).__name__ for block in by_label["output"]] == ["Gallery"]
    for name, spec in PUBLIC_INPUTS.items():
        (control,) = by_label[name]
        assert control.info == spec.description, name
        if spec.default is None:  # the seed: an empty box means a random seed
            assert control.value == "" and str(int(spec.maximum)) in control.placeholder
        else:
            assert control.value == spec.default, name
        if spec.minimum is not None and spec.default is not None:
            assert (control.minimum, control.maximum) == (spec.minimum, spec.maximum), name
        if spec.choices is not None:
            assert [choice for choice, _ in control.choices] == list(spec.choices), name


def test_an_unusable_model_is_refused_as_the_command_line_refuses_it(tmp_path: Path, capsys):
    assert app_main(["--model", str(tmp_path / "missing" / "model"), "--device", "cpu"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: PNP_MODEL:") and "neither a diffusers directory nor a hub id" in error


# --- the page as `python -m pnp.app` serves it --------------------------------------------------------


@pytest.fixture(scope="module")
def page(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """`python -m pnp.app` on a free port with the tiny model; its own temp tree; stopped at the end."""
    port, temp = free_port(), tmp_path_factory.mktemp("app-tmp")
    env = {
        **os.environ,
        "TMPDIR": str(temp),
        "GRADIO_TEMP_DIR": str(temp / "gradio"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "1",
    }
    log_path = tmp_path_factory.mktemp("app-log") / "app.log"
    command = [sys.executable, "-m", "pnp.app", "--model", str(tiny_model_dir), "--device", "cpu", "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"the page exited:\n{log_path.read_text()[-3000:]}"
            try:
                if requests.get(url, timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"the page did not come up:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.3)
        yield SimpleNamespace(url=url, log_path=log_path, temp=temp)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


def control_values(**inputs: Any) -> list[Any]:
    """Every control's value in the page's order: its default (the seed box empty), FAST, then `inputs`."""
    values = {name: spec.default for name, spec in PUBLIC_INPUTS.items()}
    values.update({"seed": "", **FAST, **inputs})
    return list(values.values())


def run_request(client: Client, editor: dict | None, video: Any = None, **inputs: Any) -> tuple[list, list, str]:
    """One "Run" through Gradio's client: the editor's value, the video, then every control."""
    return client.predict(editor, video, *control_values(**inputs), api_name="/run")


@pytest.fixture(scope="module")
def client(page: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    # gradio_client downloads each file through a directory of its own in the system's temp, which it
    # leaves behind: here the test's temp is the system's.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("client-tmp")))
        yield Client(page.url, verbose=False, download_files=str(tmp_path_factory.mktemp("client-downloads")))


def gallery_pixels(gallery: list[dict]) -> list[np.ndarray]:
    return [pixels(item["image"]) for item in gallery]


def test_a_real_image_request(client: Client):
    editor = {"background": handle_file(str(HORSE)), "layers": [], "composite": None}
    output, masks, status = run_request(
        client, editor, translation_prompts="a robot horse; a zebra", inversion_prompt="app"
    )
    assert [image.shape for image in gallery_pixels(output)] == [(128, 128, 3)] * 2 and masks == []
    assert "UNet evaluations" in status and "inversion computed" in status and "painted mask" not in status
    again = run_request(client, editor, translation_prompts="a cat", inversion_prompt="app")[2]
    assert "inversion from the cache" in again and " 20 UNet evaluations" in again


def test_the_api_takes_the_inputs_by_name(client: Client):
    api = client.view_api(print_info=False, return_format="dict")
    names = [parameter["parameter_name"] for parameter in api["named_endpoints"]["/run"]["parameters"]]
    assert names == ["input_image", "input_video", *PUBLIC_INPUTS]
    editor = {"background": handle_file(str(HORSE)), "layers": [], "composite": None}
    output, _, status = client.predict(
        input_image=editor,
        translation_prompts="a robot horse; a zebra",
        inversion_prompt="by name",
        **FAST,
        api_name="/run",
    )
    # Two prompts at 128 px, and FAST's steps: M + max(n_f, n_a) + 2 N P = 10 + 8 + 40.
    assert [image.shape for image in gallery_pixels(output)] == [(128, 128, 3)] * 2
    assert " 58 UNet evaluations" in status and "inversion computed" in status
    # input_image may be left out: a generated source.
    output, _, status = client.predict(
        generation_prompt="a horse", translation_prompts="a robot horse", seed="5", **FAST, api_name="/run"
    )
    assert len(output) == 2 and "generated source, seed 5" in status


def test_only_the_latest_requests_files_are_kept(client: Client, page: SimpleNamespace):
    run_request(client, None, generation_prompt="a horse", translation_prompts="a cat; a dog", seed="1")
    run_request(client, None, generation_prompt="a horse", translation_prompts="a cat", seed="1", output_format="jpg")
    (kept,) = [path for path in page.temp.iterdir() if path.name.startswith("pnp-app-")]
    assert sorted(path.name for path in kept.iterdir()) == ["out-0.jpg", "out-1.jpg"]


def test_a_masked_request_keeps_the_unpainted_image(client: Client, tmp_path: Path):
    layer = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 512, 192))  # the top 48 of 128 working rows
    layer.save(tmp_path / "layer.png")
    editor = {
        "background": handle_file(str(HORSE)),
        "layers": [handle_file(str(tmp_path / "layer.png"))],
        "composite": None,
    }
    output, _, status = run_request(client, editor, translation_prompts="a robot horse")
    assert "painted mask" in status
    (image,) = gallery_pixels(output)
    horse = horse_at(128)
    assert np.array_equal(image[72:], horse[72:])  # kept exactly (LANCZOS rings a few rows past the edge)
    assert not np.array_equal(image[:40], horse[:40])


def test_a_generation_request_with_auto_mask(client: Client):
    output, masks, status = run_request(
        client, None, generation_prompt="a horse", translation_prompts="a robot horse", seed="3", auto_mask=True
    )
    assert len(output) == 2 and len(masks) == 1  # the source, then the prompt's image; its mask beside it
    assert "generated source, seed 3" in status and "auto_mask coverage" in status


def test_a_video_request_gives_one_mp4_per_prompt(client: Client, tmp_path: Path):
    video = handle_file(str(write_horse_video(tmp_path / "clip.mp4", frames=4, fps=8)))
    output, masks, status = client.predict(
        input_video=video, translation_prompts="a robot horse; a zebra", keyframe_interval=2, **FAST, api_name="/run"
    )
    assert len(output) == 2 and masks == []
    for item in output:
        assert item["video"].endswith(".mp4")
        with av.open(item["video"]) as container:
            stream = container.streams.video[0]
            frames = list(container.decode(stream))
            assert stream.codec_context.name == "h264" and stream.average_rate == 8
        assert [(frame.width, frame.height) for frame in frames] == [(128, 128)] * 4
    assert "UNet evaluations" in status and "inversion computed" in status
    # With an image as well: the engine's refusal, naming input_video.
    editor = {"background": handle_file(str(HORSE)), "layers": [], "composite": None}
    with pytest.raises(AppError, match="input_video: cannot be used together with input_image"):
        run_request(client, editor, video)


def test_the_progress_follows_the_engines_phases(client: Client):
    # 50 steps, so that the request lasts long enough for the queue's status updates to be seen.
    values = control_values(num_inference_steps=50, ddim_inversion_steps=50, inversion_prompt="progress")
    editor = {"background": handle_file(str(HORSE)), "layers": [], "composite": None}
    job = client.submit(editor, None, *values, api_name="/run")
    phases = set()
    while not job.done():
        phases.update((p.desc, p.length) for p in job.status().progress_data or [])
        time.sleep(0.02)
    assert {("inversion", 50), ("translation", 50)} <= phases
    assert "190 UNet evaluations" in job.result()[2]


def test_bad_input_shows_the_engines_error_and_the_page_goes_on(client: Client):
    editor = {"background": handle_file(str(HORSE)), "layers": [], "composite": None}
    with pytest.raises(AppError, match="translation_prompts: give at least one non-empty prompt"):
        run_request(client, editor, translation_prompts=" ; ")
    with pytest.raises(AppError, match="input_image: give an image to edit"):
        run_request(client, None)
    with pytest.raises(AppError, match="seed: must be a number"):
        run_request(client, None, generation_prompt="a horse", seed="soon")
    output, _, _ = run_request(client, editor, translation_prompts="a zebra")
    assert len(output) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not an image", "input_image: could not be read: not a recognised image format"),
        (png_declaring(8000, 8000), "input_image: image is 8000x8000 = 64,000,000 pixels, more than the limit"),
    ],
    ids=["not-an-image", "too-large"],
)
def test_a_file_the_api_refuses_is_refused_with_its_message(client: Client, tmp_path: Path, content: bytes, message):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    with pytest.raises(AppError, match=message):
        run_request(client, {"background": handle_file(str(path)), "layers": [], "composite": None})


# --- in a real browser ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1700",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    # Chromium and its driver keep their other files in TMPDIR: the test's tree.
    service = Service(str(CHROMEDRIVER), env={**os.environ, "TMPDIR": str(tmp_path_factory.mktemp("chromium-tmp"))})
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_person_paints_a_mask_and_runs_it_in_a_browser(page: SimpleNamespace, browser: Any, tmp_path: Path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    def control_block(label: str) -> Any:
        """The block of the control labelled `label`, once shown (the advanced group renders as it opens)."""
        info = f"//*[@data-testid='block-info' and normalize-space(text())='{label}']"
        path = f"{info}/ancestor::div[contains(@class,'block')][1]"
        return WebDriverWait(browser, 30).until(lambda driver: driver.find_element(By.XPATH, path))

    def type_into(box: Any, text: str) -> None:
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        if text:
            box.send_keys(text)
        box.send_keys(Keys.TAB)

    def output_source() -> str | None:
        images = browser.find_elements(By.CSS_SELECTOR, "#output img")
        return images[0].get_attribute("src") if images else None

    def run_and_wait() -> str:
        """Click Run, wait for the gallery's new image, and return the status line."""
        previous = output_source()
        browser.find_element(By.ID, "run").click()
        WebDriverWait(browser, 180).until(lambda _: output_source() not in (None, previous))
        return browser.find_element(By.ID, "status").text

    browser.get(page.url)
    editor = WebDriverWait(browser, 60).until(lambda driver: driver.find_element(By.ID, "input_image"))
    editor.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(HORSE))
    WebDriverWait(browser, 30).until(lambda _: editor.find_elements(By.TAG_NAME, "canvas"))
    time.sleep(1)  # the upload is drawn on the canvas
    editor.find_element(By.CSS_SELECTOR, "button[aria-label=Brush]").click()
    canvas = editor.find_elements(By.TAG_NAME, "canvas")[-1]
    stroke = ActionChains(browser).move_to_element_with_offset(canvas, -60, -40).click_and_hold()
    stroke.move_by_offset(40, 10).move_by_offset(40, 10).release().perform()
    type_into(control_block("translation_prompts").find_element(By.TAG_NAME, "textarea"), "a robot horse")
    browser.find_element(By.XPATH, "//button[contains(., 'advanced')]").click()
    for name, value in FAST.items():
        type_into(control_block(name).find_element(By.CSS_SELECTOR, "input[type=number]"), str(value))
    browser.save_screenshot(str(tmp_path / "1-painted.png"))

    status = run_and_wait()
    assert "painted mask" in status and "UNet evaluations" in status  # the request ran with the mask
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(tmp_path / "2-output.png"))  # README.md's screenshot (docs/web-page.png)

    # An empty prompt: the engine's error, naming the input, on the page.
    type_into(control_block("translation_prompts").find_element(By.TAG_NAME, "textarea"), "")
    browser.find_element(By.ID, "run").click()
    error = WebDriverWait(browser, 60).until(
        lambda driver: [
            e for e in driver.find_elements(By.CSS_SELECTOR, ".toast-body") if "translation_prompts" in e.text
        ]
    )
    assert "give at least one non-empty prompt" in error[0].text
    browser.save_screenshot(str(tmp_path / "3-error.png"))

    # And the page goes on: the next good request works.
    type_into(control_block("translation_prompts").find_element(By.TAG_NAME, "textarea"), "a zebra")
    assert "UNet evaluations" in run_and_wait()
    browser.save_screenshot(str(tmp_path / "4-again.png"))
