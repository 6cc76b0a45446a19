"""`lcm-kit serve` without a browser: request and upload checks, the latest-wins worker, images equal to
LCMPipeline's for the same settings, the app over a real websocket (errors answered, the server goes on, only its
own page may connect), and the command line (safe defaults, a clear error without the serve extra)."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lcm_kit.argtypes import MAX_SEED
from lcm_kit.cli import build_parser, main
from lcm_kit.commands.serve_images import ImageRenderer, RenderJob, shrink_to_fit
from lcm_kit.commands.serve_requests import (
    GenerateRequest,
    RequestError,
    ServeLimits,
    decode_upload,
    limits_for,
    parse_generate_request,
    parse_message,
)
from lcm_kit.commands.serve_worker import LatestWinsWorker
from lcm_kit.digits.data import teacher_path
from lcm_kit.pipelines import LCMPipeline

pytest.importorskip("starlette", reason='the serve extra is not installed (pip install "lcm-kit[serve]")')
pytest.importorskip("uvicorn", reason='the serve extra is not installed (pip install "lcm-kit[serve]")')
websockets_client = pytest.importorskip("websockets.sync.client", reason="websockets is not installed")

from lcm_kit.commands.serve import prepare_pipeline
from lcm_kit.commands.serve_app import BackgroundServer, ServeApp

LIMITS = ServeLimits(default_guidance=1.0, default_side=32, max_side=64)


def png_bytes(image: Image.Image, format="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def gradient(width=48, height=40) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 90, np.float32)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8))


def noise(width, height, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def teacher():
    """The shipped digits teacher as `lcm-kit serve` prepares it (fast path on, LoRA unfused)."""
    pipe = LCMPipeline.from_pretrained(teacher_path(), safety_checker=None, requires_safety_checker=False)
    return prepare_pipeline(pipe)


@pytest.fixture(scope="module")
def reference():
    """A separate plain LCMPipeline of the same teacher, eager: what the served images must equal."""
    pipe = LCMPipeline.from_pretrained(teacher_path(), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# request checks
# ----------------------------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ({"steps": "12"}, "steps", "steps: got 12, allowed 1–8"),
    ({"steps": 0}, "steps", "steps: got 0, allowed 1–8"),
    ({"steps": "4.5"}, "steps", "steps: got 4.5, allowed 1–8"),
    ({"steps": ""}, "steps", "steps: got '', allowed 1–8"),
    ({"steps": True}, "steps", "steps: got True, allowed 1–8"),
    ({"guidance": "nan"}, "guidance", "guidance: got nan, allowed 0–15"),
    ({"guidance": float("inf")}, "guidance", "guidance: got inf, allowed 0–15"),
    ({"guidance": "15.5"}, "guidance", "guidance: got 15.5, allowed 0–15"),
    ({"guidance": "-1"}, "guidance", "guidance: got -1, allowed 0–15"),
    ({"guidance": "two"}, "guidance", "guidance: got two, allowed 0–15"),
    ({"seed": "-1"}, "seed", f"seed: got -1, allowed 0–{MAX_SEED}"),
    ({"seed": str(MAX_SEED + 1)}, "seed", f"seed: got {MAX_SEED + 1}, allowed 0–{MAX_SEED}"),
    ({"width": "33"}, "width", "width: got 33, allowed 8–64, a multiple of 8"),
    ({"height": 128}, "height", "height: got 128, allowed 8–64, a multiple of 8"),
    ({"width": 0}, "width", "width: got 0, allowed 8–64, a multiple of 8"),
    ({"strength": "0"}, "strength", "strength: got 0, allowed more than 0 and at most 1"),
    ({"strength": "1.5"}, "strength", "strength: got 1.5, allowed more than 0 and at most 1"),
    ({"prompt": "x" * 501}, "prompt", "prompt: got 501 characters, allowed up to 500"),
    ({"prompt": 7}, "prompt", "prompt: got int, allowed text"),
    ({"img2img": "yes"}, "img2img", "img2img: got yes, allowed true or false"),
    ({"path": "/etc/passwd"}, "path", "path: unknown field; allowed fields: type, id, prompt"),
    ({"model": "other/model"}, "model", "model: unknown field"),
    ({"type": "load"}, "type", "type: got load, allowed 'generate'"),
    ({"id": -1}, "id", "id: got -1, allowed 0–"),
]


@pytest.mark.parametrize("fields, field, message", BAD_REQUESTS, ids=[m for _, _, m in BAD_REQUESTS])
def test_bad_request_is_refused_naming_field_value_and_range(fields, field, message):
    with pytest.raises(RequestError) as caught:
        parse_generate_request({"type": "generate", "id": 1, **fields}, LIMITS)
    assert caught.value.field == field
    assert str(caught.value).startswith(message), str(caught.value)


def test_good_request_as_typed_in_the_page_and_as_json_numbers():
    typed = parse_generate_request({"type": "generate", "id": 3, "prompt": "a handwritten 7", "steps": "2",
                                    "guidance": "1.5", "seed": " 42 ", "width": "64", "height": "16",
                                    "img2img": True, "strength": "0.25"}, LIMITS)
    assert typed == GenerateRequest(id=3, prompt="a handwritten 7", steps=2, guidance=1.5, seed=42, width=64,
                                    height=16, img2img=True, strength=0.25)
    numbers = parse_generate_request({"id": 3, "prompt": "a handwritten 7", "steps": 2, "guidance": 1.5,
                                      "seed": 42, "width": 64, "height": 16, "img2img": True, "strength": 0.25},
                                     LIMITS)
    assert numbers == typed
    defaults = parse_generate_request({}, LIMITS)  # the model's defaults
    assert (defaults.steps, defaults.guidance, defaults.width, defaults.height, defaults.seed) == (4, 1.0, 32, 32, 0)
    assert parse_generate_request({"seed": MAX_SEED}, LIMITS).seed == MAX_SEED


@pytest.mark.parametrize("text, message", [("not json", "request: not JSON"),
                                           ("[1, 2]", "request: must be a JSON object, got list")])
def test_a_message_that_is_not_a_json_object_is_refused(text, message):
    with pytest.raises(RequestError, match=message):
        parse_message(text)


# ----------------------------------------------------------------------------------------------------------------
# uploads
# ----------------------------------------------------------------------------------------------------------------

def png_with_claimed_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: what a decompression bomb looks like before decoding."""
    data = bytearray(png_bytes(Image.new("RGB", (1, 1))))
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), then width, height
    data[ihdr + 8: ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4: ihdr + 4 + 4 + 13]))
    data[ihdr + 8 + 13: ihdr + 8 + 13 + 4] = struct.pack(">I", crc)
    return bytes(data)


BAD_UPLOADS = [
    (b"", "image: got an empty file"),
    (b"hello, this is text", "image: not a PNG, JPEG or WebP file (it starts with b'hello, t')"),
    (png_bytes(Image.new("RGB", (16, 16)), "GIF"), "image: not a PNG, JPEG or WebP file"),
    (png_bytes(Image.new("RGB", (16, 16)), "BMP"), "image: not a PNG, JPEG or WebP file"),
    (png_with_claimed_size(5_000, 4_000), "image: got 5000x4000 pixels, allowed up to 16,777,216 pixels"),
    (png_with_claimed_size(50_000, 50_000), "image: its header claims far more pixels than allowed (up to 16,777,216"),
    (png_bytes(Image.new("RGB", (4, 64))), "image: got 4x64 pixels, allowed at least 8 on each side"),
    (png_bytes(noise(64, 64))[:3000], "image: the PNG file is damaged"),
    (b"\0" * (LIMITS.max_upload_bytes + 1), "image: got 4,194,305 bytes, allowed up to 4 MiB"),
]


@pytest.mark.parametrize("data, message", BAD_UPLOADS, ids=[m for _, m in BAD_UPLOADS])
def test_bad_upload_is_refused_with_a_message(data, message):
    with pytest.raises(RequestError) as caught:
        decode_upload(data, LIMITS)
    assert caught.value.field == "image" and str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_uploads_decode_to_rgb(format):
    image = decode_upload(png_bytes(gradient(), format, **({"lossless": True} if format == "WEBP" else {})), LIMITS)
    assert image.mode == "RGB" and image.size == (48, 40)
    if format != "JPEG":  # lossless formats: the very pixels
        np.testing.assert_array_equal(np.asarray(image), np.asarray(gradient()))


def test_transparent_upload_is_composited_over_white_and_large_ones_shrink_to_fit():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    image = decode_upload(png_bytes(rgba), LIMITS)
    assert image.mode == "RGB" and image.getpixel((1, 1)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 0, 255)
    assert shrink_to_fit(gradient(200, 100), 64).size == (64, 32)
    small = gradient(48, 40)
    assert shrink_to_fit(small, 64) is small  # what fits is kept as it is


# ----------------------------------------------------------------------------------------------------------------
# the latest-wins worker
# ----------------------------------------------------------------------------------------------------------------

class SlowJob:
    """A stand-in for a slow pipeline: records which jobs ran, each taking ``seconds``."""

    def __init__(self, seconds=0.2):
        self.seconds, self.ran, self.started = seconds, [], threading.Event()

    def __call__(self, job):
        self.ran.append(job)
        self.started.set()
        time.sleep(self.seconds)
        return f"image of {job}"


def test_a_newer_request_replaces_the_waiting_ones_and_the_newest_is_answered():
    run = SlowJob()
    worker = LatestWinsWorker(run)
    try:
        first = worker.submit("page", "a")
        assert run.started.wait(5)  # "a" is running: it finishes
        older = [worker.submit("page", prompt) for prompt in ("a h", "a ha", "a han")]
        newest = worker.submit("page", "a hand")
        assert newest.result(5) == "image of a hand" and first.result(5) == "image of a"
        assert all(future.cancelled() for future in older)
        assert run.ran == ["a", "a hand"]  # a worker that ran every request would have run 5
        assert worker.stats["superseded"] == 3 and worker.stats["completed"] == 2
    finally:
        worker.close()


def test_every_page_gets_its_newest_request_answered_in_turn():
    run = SlowJob(seconds=0.05)
    worker = LatestWinsWorker(run)
    try:
        assert run.started.wait(5) if worker.submit("p0", "p0-0") else False
        futures = {}
        for round_ in range(1, 4):
            for page in ("p1", "p2", "p3"):
                futures[page] = worker.submit(page, f"{page}-{round_}")
        assert worker.waiting <= 3  # at most one waiting job per page: no backlog
        assert {page: f.result(5) for page, f in futures.items()} == {p: f"image of {p}-3" for p in futures}
        assert run.ran == ["p0-0", "p1-3", "p2-3", "p3-3"]  # queue order: when each page first waited
    finally:
        worker.close()


def test_a_failing_job_is_its_requests_error_and_the_worker_goes_on():
    def run(job):
        if job == "bad":
            raise ValueError("the pipeline refused")
        return job.upper()

    worker = LatestWinsWorker(run)
    try:
        with pytest.raises(ValueError, match="the pipeline refused"):
            worker.submit("page", "bad").result(5)
        assert worker.submit("page", "good").result(5) == "GOOD"
        assert worker.drop("nobody") is False
    finally:
        worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit("page", "late")


def test_the_worker_sets_torch_threads_on_its_own_thread():
    seen = []
    worker = LatestWinsWorker(lambda job: seen.append(torch.get_num_threads()),
                              initializer=lambda: torch.set_num_threads(1))
    try:
        worker.submit("page", "x").result(5)
    finally:
        worker.close()
    assert seen == [1]


# ----------------------------------------------------------------------------------------------------------------
# images equal LCMPipeline's
# ----------------------------------------------------------------------------------------------------------------

def test_rendered_images_equal_the_pipeline_for_the_same_settings(teacher, reference):
    renderer = ImageRenderer(teacher)
    cases = [GenerateRequest(id=1, prompt="a handwritten 7", steps=4, guidance=1.0, seed=0, width=32, height=32),
             GenerateRequest(id=2, prompt="a handwritten 3", steps=2, guidance=3.0, seed=123, width=48, height=32),
             GenerateRequest(id=3, prompt="a handwritten 0", steps=1, guidance=1.0, seed=MAX_SEED, width=32,
                             height=32)]
    for request in cases:
        expected = reference(request.prompt, num_inference_steps=request.steps, guidance_scale=request.guidance,
                             height=request.height, width=request.width,
                             generator=torch.Generator("cpu").manual_seed(request.seed)).images[0]
        rendered = renderer(RenderJob(request))
        assert (rendered.width, rendered.height) == expected.size and rendered.ms > 0
        np.testing.assert_array_equal(pixels(rendered.png), np.asarray(expected), err_msg=str(request))
    assert teacher.fast_inference_stats["fast_calls"] == len(cases)  # the fast path drew them
    # a different seed is a different image: the comparison above can fail
    other = renderer(RenderJob(GenerateRequest(id=4, prompt="a handwritten 7", steps=4, guidance=1.0, seed=1,
                                               width=32, height=32)))
    assert not np.array_equal(pixels(other.png), pixels(renderer(RenderJob(cases[0])).png))


def test_img2img_equals_the_pipeline_for_the_same_image_and_strength(teacher, reference):
    image = decode_upload(png_bytes(gradient(40, 40)), LIMITS)
    request = GenerateRequest(id=1, prompt="a handwritten 5", steps=4, guidance=1.0, seed=7, width=32, height=32,
                              img2img=True, strength=0.6)
    expected = reference("a handwritten 5", image=image, strength=0.6, num_inference_steps=4, guidance_scale=1.0,
                         height=32, width=32, generator=torch.Generator("cpu").manual_seed(7)).images[0]
    np.testing.assert_array_equal(pixels(ImageRenderer(teacher)(RenderJob(request, image)).png), np.asarray(expected))
    with pytest.raises(RequestError, match="image: none uploaded"):
        ImageRenderer(teacher)(RenderJob(request, None))


def test_with_a_quickstart_style_lora_images_equal_the_pipeline_with_that_lora(tmp_path):
    """`lcm-kit serve --lora FOLDER` on the shipped teacher: loaded as the command loads it, fast path on."""
    from lcm_kit.commands.generate import load_pipeline
    from lcm_kit.lora import add_lcm_lora, save_lora_weights

    unet = LCMPipeline.from_pretrained(teacher_path(), safety_checker=None, requires_safety_checker=False).unet
    add_lcm_lora(unet, 8, 8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in unet.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change the image
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
    folder = tmp_path / "lcm-lora"
    save_lora_weights(unet, folder)
    served = prepare_pipeline(load_pipeline(None, str(folder), "cpu"))
    reference = LCMPipeline.from_pretrained(teacher_path(), safety_checker=None, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    plain = np.asarray(reference("a handwritten 6", num_inference_steps=4, guidance_scale=1.0,
                                 generator=torch.Generator("cpu").manual_seed(5)).images[0])
    reference.load_lora_weights(str(folder))
    request = GenerateRequest(id=1, prompt="a handwritten 6", steps=4, guidance=1.0, seed=5, width=32, height=32)
    expected = reference("a handwritten 6", num_inference_steps=4, guidance_scale=1.0, height=32, width=32,
                         generator=torch.Generator("cpu").manual_seed(5)).images[0]
    rendered = pixels(ImageRenderer(served)(RenderJob(request)).png)
    np.testing.assert_array_equal(rendered, np.asarray(expected))
    assert not np.array_equal(rendered, plain)  # the LoRA is in the served image
    assert served.fast_inference_stats["fast_calls"] == 1 and not served.fast_inference_stats["lora_fused"]


# ----------------------------------------------------------------------------------------------------------------
# the app over a real websocket
# ----------------------------------------------------------------------------------------------------------------

def ws_url(server) -> str:
    return server.url.replace("http://", "ws://") + "/ws"


def receive(ws, kind: str, timeout=20.0) -> dict:
    """The next message of type ``kind`` (config messages and the like in between are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        message = json.loads(ws.recv(timeout=max(0.01, deadline - time.monotonic())))
        if message["type"] == kind:
            return message


@pytest.fixture(scope="module")
def served(teacher):
    app = ServeApp(teacher, ServeLimits(default_guidance=1.0, default_side=32, max_side=64), "digits", threads=1)
    with BackgroundServer(app) as server:
        yield server


def test_the_page_is_served_with_a_closed_content_policy_and_no_file_route(served):
    with urllib.request.urlopen(served.url + "/") as response:
        page = response.read().decode()
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert '<textarea id="prompt"' in page and "new WebSocket" in page
    for path in ("/assets/serve/index.html", "/../pyproject.toml", "/static/index.html"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(served.url + path)
        assert caught.value.code == 404, path


def test_bad_requests_are_answered_and_the_next_good_one_works(served, reference):
    with websockets_client.connect(ws_url(served)) as ws:
        config = receive(ws, "config")
        assert config["limits"]["max_steps"] == 8 and config["limits"]["default_side"] == 32
        for frame, expected in [
            (json.dumps({"type": "generate", "id": 1, "steps": "12"}), "steps: got 12, allowed 1–8"),
            ("{not json", "request: not JSON"),
            (json.dumps({"type": "generate", "id": 2, "img2img": True}), "image: none uploaded"),
            (b"GIF89a not really", "image: not a PNG, JPEG or WebP file"),
            (png_with_claimed_size(5_000, 4_000), "image: got 5000x4000 pixels"),
        ]:
            ws.send(frame)
            assert receive(ws, "error")["message"].startswith(expected)
        ws.send(json.dumps({"type": "generate", "id": 3, "prompt": "a handwritten 4", "seed": "9"}))
        answer = receive(ws, "image")
    assert answer["id"] == 3
    expected = reference("a handwritten 4", num_inference_steps=4, guidance_scale=1.0, height=32, width=32,
                         generator=torch.Generator("cpu").manual_seed(9)).images[0]
    np.testing.assert_array_equal(pixels(base64.b64decode(answer["png"])), np.asarray(expected))
    with urllib.request.urlopen(served.url + "/healthz") as response:
        assert json.load(response)["ok"] is True


def test_an_upload_is_kept_for_its_page_and_used_for_img2img(served, reference):
    image = gradient(128, 96)  # larger than max_side 64: kept shrunk to 64x48
    with websockets_client.connect(ws_url(served)) as ws:
        ws.send(png_bytes(image))
        upload = receive(ws, "upload")
        assert (upload["width"], upload["height"], upload["original_width"]) == (64, 48, 128)
        ws.send(json.dumps({"type": "generate", "id": 1, "prompt": "a handwritten 2", "img2img": True,
                            "strength": "0.7", "width": "32", "height": "32"}))
        answer = receive(ws, "image")
    expected = reference("a handwritten 2", image=shrink_to_fit(image, 64), strength=0.7, num_inference_steps=4,
                         guidance_scale=1.0, height=32, width=32,
                         generator=torch.Generator("cpu").manual_seed(0)).images[0]
    np.testing.assert_array_equal(pixels(base64.b64decode(answer["png"])), np.asarray(expected))


def test_another_sites_page_cannot_use_the_server(served):
    with pytest.raises(Exception) as caught:
        websockets_client.connect(ws_url(served), origin="http://evil.example").recv(timeout=5)
    assert "403" in str(caught.value)
    host = served.url.removeprefix("http://")
    with websockets_client.connect(ws_url(served), origin=f"http://{host}") as ws:  # its own page may
        assert receive(ws, "config")["type"] == "config"


class SlowPipeline:
    """Enough of a pipeline for ServeApp: 32x32 native, each image taking ``seconds``; records the prompts."""

    unet = SimpleNamespace(config=SimpleNamespace(sample_size=8))
    vae_scale_factor = 4
    default_guidance_scale = 1.0

    def __init__(self, seconds=0.15):
        self.seconds, self.prompts = seconds, []

    def __call__(self, prompt, height, width, **kwargs):
        self.prompts.append(prompt)
        time.sleep(self.seconds)
        return SimpleNamespace(images=[Image.new("RGB", (width, height), (len(prompt), 0, 0))])


def test_typing_faster_than_the_model_draws_answers_the_newest_request_without_a_backlog():
    pipe = SlowPipeline()
    app = ServeApp(pipe, ServeLimits(default_guidance=1.0, default_side=32, max_side=64))
    prompt = "a handwritten 8"
    with BackgroundServer(app) as server, websockets_client.connect(ws_url(server)) as ws:
        receive(ws, "config")
        for i in range(1, len(prompt) + 1):  # one request per keystroke, much faster than 0.15 s per image
            ws.send(json.dumps({"type": "generate", "id": i, "prompt": prompt[:i]}))
            time.sleep(0.01)
        answered = []
        while not answered or answered[-1] != len(prompt):
            answered.append(receive(ws, "image", timeout=10)["id"])
    assert answered == sorted(answered)
    assert len(pipe.prompts) == len(answered) <= 4, pipe.prompts  # drawn: the running one, then the newest
    assert pipe.prompts[-1] == prompt
    assert app.worker.stats["superseded"] >= len(prompt) - 4


def test_a_failing_pipeline_call_is_reported_and_the_server_goes_on():
    class Flaky(SlowPipeline):
        def __call__(self, prompt, **kwargs):
            if prompt == "boom":
                raise ValueError("`strength` too small for 1 step")
            return super().__call__(prompt, **kwargs)

    app = ServeApp(Flaky(seconds=0), ServeLimits(default_guidance=1.0, default_side=32, max_side=64))
    with BackgroundServer(app) as server, websockets_client.connect(ws_url(server)) as ws:
        ws.send(json.dumps({"type": "generate", "id": 1, "prompt": "boom"}))
        error = receive(ws, "error")
        assert error["id"] == 1 and error["message"] == "generation failed: ValueError: `strength` too small for 1 step"
        ws.send(json.dumps({"type": "generate", "id": 2, "prompt": "fine"}))
        assert receive(ws, "image")["id"] == 2


# ----------------------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------------------

def test_limits_follow_the_model():
    pipe = SlowPipeline()
    assert limits_for(pipe) == ServeLimits(default_guidance=1.0, default_side=32, max_side=64)
    assert limits_for(pipe, 48, 3.0).default_guidance == 3.0 and limits_for(pipe, 48).max_side == 48
    with pytest.raises(ValueError, match="at least the model's native size 32, got 16"):
        limits_for(pipe, 16)


def test_every_serve_flag_has_help_and_help_shows_the_defaults(capsys):
    (subparsers,) = [a for a in build_parser()._actions if a.dest == "command"]
    parser = subparsers.choices["serve"]
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert 'pip install "lcm-kit[serve]"' in text
    for action in parser._actions:
        assert action.help, action.option_strings
        if action.default not in (None, "==SUPPRESS==") and action.option_strings != ["-h", "--help"]:
            assert f"(default: {action.default})" in text, action.dest


def test_serve_defaults_are_safe():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model, args.lora, args.fast_inference) == ("127.0.0.1", 7860, None, None,
                                                                                 "auto")
    assert args.guidance_scale is None  # the model's own default


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port: must be an integer in [0, 65535], got '70000'"),
    (["--max_side", "30"], "--max_side: must be an integer in [8, 8192] that is a multiple of 8"),
    (["--fast_inference", "yes"], "--fast_inference: invalid choice"),
    (["--guidance_scale", "nan"], "--guidance_scale: must be a finite number >= 0 and <= 15, got 'nan'"),
    (["--hos", "0.0.0.0"], "unrecognized arguments: --hos (abbreviations are not accepted"),
])
def test_bad_serve_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *argv])
    assert message in capsys.readouterr().err


def test_a_busy_port_is_an_error_naming_it():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}"):
            main(["serve", "--port", str(port)])


def test_without_the_serve_extra_the_cli_works_and_serve_names_the_install_command():
    code = (
        "import sys\n"
        "for name in ('starlette', 'uvicorn', 'websockets'): sys.modules[name] = None  # not installed\n"
        "from lcm_kit.cli import main\n"
        "try:\n"
        "    main(['serve'])\n"
        "except SystemExit as err:\n"
        "    print(err)\n"
        "main(['--help'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert 'install it with: pip install "lcm-kit[serve]"' in out.stdout, out.stdout + out.stderr
    assert "serve" in out.stdout.split("install it with")[1]  # --help ran after and lists the command
