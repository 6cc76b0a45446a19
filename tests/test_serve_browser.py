"""`lcm-kit serve` in a real browser: headless Chromium from the system packages, driven by Selenium through the
system ChromeDriver (nothing is downloaded). A prompt typed letter by letter redraws the image, and the pixels the
page decodes equal LCMPipeline's for that prompt and seed; a bad value shows its message and the next good value
works; an uploaded image drives img2img, and a file that is not an image is refused on the page."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("no system Chromium / ChromeDriver (apt-get install chromium chromium-driver); the browser test "
                "never downloads a browser", allow_module_level=True)
pytest.importorskip("starlette", reason='the serve extra is not installed (pip install "lcm-kit[serve]")')
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra has it)")

from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from lcm_kit.commands.serve import prepare_pipeline
from lcm_kit.commands.serve_app import BackgroundServer, ServeApp
from lcm_kit.commands.serve_requests import limits_for
from lcm_kit.digits.data import teacher_path
from lcm_kit.pipelines import LCMPipeline

# Flags for a closed network: without the background-networking ones Chromium's own connections are refused.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=900,640"]

SETTLED = ("const s = window.lcmServe; return !!s && s.ready && s.lastSentId > 0 && s.shownId >= s.lastSentId "
           "&& document.getElementById('result').dataset.requestId == String(s.shownId);")
PIXELS = """
const img = document.getElementById('result');
const canvas = document.createElement('canvas');
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
const context = canvas.getContext('2d');
context.drawImage(img, 0, 0);
return [canvas.width, canvas.height, Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data)];
"""


def pipe_of_teacher():
    pipe = LCMPipeline.from_pretrained(teacher_path(), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference():
    return pipe_of_teacher()


@pytest.fixture(scope="module")
def server():
    pipe = prepare_pipeline(pipe_of_teacher())
    # guidance 3: what `lcm-kit serve` starts the page with for the plain teacher (real CFG, two UNet passes)
    app = ServeApp(pipe, limits_for(pipe, default_guidance=3.0), "the shipped digits teacher", threads=1)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver, script: str, timeout=30.0):
    WebDriverWait(driver, timeout, poll_frequency=0.02).until(lambda d: d.execute_script(script))


def page_pixels(driver) -> np.ndarray:
    width, height, rgba = driver.execute_script(PIXELS)
    return np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)


def expected(pipe, prompt, steps=4, seed=0, guidance=3.0, **kwargs) -> np.ndarray:
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                 generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images[0]
    return np.asarray(image)


def assert_page_shows(driver, image: np.ndarray) -> None:
    shown = page_pixels(driver)
    assert (shown[..., 3] == 255).all()  # opaque: nothing blended
    np.testing.assert_array_equal(shown[..., :3], image)


def retype(element, text: str, pause: float = 0.0) -> None:
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.BACKSPACE)
    for letter in text:
        element.send_keys(letter)
        time.sleep(pause)


def test_typing_redraws_and_the_page_shows_the_pipelines_pixels(server, browser, reference):
    browser.get(server.url)
    wait(browser, SETTLED)  # the default prompt's image
    assert browser.find_element(By.ID, "guidance").get_attribute("value") == "3"
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys(Keys.CONTROL, "a")
    prompt.send_keys(Keys.BACKSPACE)
    shown = []
    for letter in "a handwritten 7":
        prompt.send_keys(letter)
        time.sleep(0.12)  # about a fast typist
        shown.append(browser.execute_script("return document.getElementById('result').src"))
    wait(browser, SETTLED)
    assert len(set(shown)) >= 5, "the image did not follow the typing"
    assert_page_shows(browser, expected(reference, "a handwritten 7"))
    timing = browser.find_element(By.ID, "timing").text
    assert "ms per image" in timing and "keystroke to image" in timing, timing
    assert browser.execute_script("return window.lcmServe.latencies.length") >= 5
    assert browser.find_element(By.ID, "error").text == ""


def test_a_bad_value_shows_its_message_and_the_next_good_one_works(server, browser, reference):
    browser.get(server.url)
    wait(browser, SETTLED)
    retype(browser.find_element(By.ID, "prompt"), "a handwritten 3")
    steps = browser.find_element(By.ID, "steps")
    retype(steps, "12")
    wait(browser, "return document.getElementById('error').textContent === 'steps: got 12, allowed 1–8'")
    assert "invalid" in steps.get_attribute("class")
    retype(steps, "2")
    wait(browser, SETTLED)
    wait(browser, "return document.getElementById('error').textContent === ''")
    assert "invalid" not in steps.get_attribute("class")
    assert_page_shows(browser, expected(reference, "a handwritten 3", steps=2))
    seed = browser.find_element(By.ID, "seed")
    retype(seed, "-5")
    wait(browser, "return document.getElementById('error').textContent.startsWith('seed: got -5, allowed 0–')")
    retype(seed, "11")
    wait(browser, SETTLED)
    wait(browser, "return document.getElementById('error').textContent === ''")
    assert_page_shows(browser, expected(reference, "a handwritten 3", steps=2, seed=11))


def test_an_uploaded_image_drives_img2img_and_a_non_image_is_refused(server, browser, reference, tmp_path):
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    picture.save(tmp_path / "start.png")
    (tmp_path / "notes.png").write_text("these are notes, not a picture")
    browser.get(server.url)
    wait(browser, SETTLED)
    retype(browser.find_element(By.ID, "prompt"), "a handwritten 5")
    file_input = browser.find_element(By.ID, "image-file")
    file_input.send_keys(str(tmp_path / "start.png"))  # the browser uploads the bytes; the server sees no path
    wait(browser, "return document.getElementById('upload-text').textContent === 'image 40×40'")
    assert browser.find_element(By.ID, "img2img").is_selected()
    wait(browser, SETTLED)
    wait(browser, "return window.lcmServe.shownId > 0 && document.getElementById('error').textContent === ''")
    strength = float(browser.find_element(By.ID, "strength").get_attribute("value"))
    assert_page_shows(browser, expected(reference, "a handwritten 5", image=picture, strength=strength))

    file_input.send_keys(str(tmp_path / "notes.png"))
    wait(browser, "return document.getElementById('error').textContent.startsWith("
                  "'image: not a PNG, JPEG or WebP file')")
    retype(browser.find_element(By.ID, "seed"), "4")  # the server kept the last good image
    wait(browser, SETTLED)
    wait(browser, "return document.getElementById('error').textContent === ''")
    assert_page_shows(browser, expected(reference, "a handwritten 5", seed=4, image=picture, strength=strength))
