"""How fast `lcm-kit serve` answers: keystroke to image in a real browser, and the last request of 8 typing
clients. The server is the command itself (`python -m lcm_kit.cli serve --port 0`), in a process of its own.

* ``browser``: headless Chromium (system package, driven by Selenium through the system ChromeDriver) types prompts
  letter by letter with a pause after each letter long enough for its image, and reads the page's own figures:
  the time from each keystroke's input event to its decoded image (``window.lcmServe.latencies``) and the server's
  time per image. Median and 90th percentile.
* ``load``: 8 websocket clients on the loopback address type digit prompts letter by letter (30–150 ms between
  letters, a pause after each prompt) for 30 s; for every prompt the time from its last keystroke's request to
  that request's image. Median, 95th percentile, maximum, the share within 1 s, the server's memory.
* ``throughput``: one client asks for images back to back (each request after the previous image), new prompt
  every time: images per second through the whole stack (pipeline, PNG, websocket). For the GPU figure:

      python benchmarks/make_sd15_random.py --out WORK          # SD1.5-shaped random weights
      python benchmarks/bench_serve.py --parts throughput --model WORK/sd15 --device cuda --size 512

Usage (CPU, the shipped digits teacher, one torch thread for the server)::

    python benchmarks/bench_serve.py                                # browser + load
    python benchmarks/bench_serve.py --parts browser --screenshot docs/serve.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from machine import cpu_name

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
SETTLED = ("const s = window.lcmServe; return !!s && s.ready && s.lastSentId > 0 && s.shownId >= s.lastSentId "
           "&& document.getElementById('result').dataset.requestId == String(s.shownId);")
PROMPTS = [f"a handwritten {digit}" for digit in (7, 3, 0, 5, 9, 2)]


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """`lcm-kit serve` in a subprocess; ``url`` once it prints where it listens."""

    def __init__(self, serve_args: list[str]):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, "-m", "lcm_kit.cli", "serve", "--port", "0", *serve_args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines, found = [], []

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                match = re.search(r"open (http://\S+) ", line)
                if match:
                    found.append(match.group(1))

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 600  # a CUDA warm-up compiles
        while not found and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not found:
            self.close()
            raise SystemExit("the server did not start:\n" + "".join(self.lines))
        self.url = found[0]

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/healthz", timeout=10) as response:
            return json.load(response)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def open_browser(profile: str, width: int = 860, height: int = 700):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        raise SystemExit("needs the system Chromium and ChromeDriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


def run_browser(server: Server, pause: float, rounds: int, screenshot: str | None) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory() as profile:
        driver = open_browser(profile)
        try:
            def settle():
                WebDriverWait(driver, 60, poll_frequency=0.02).until(lambda d: d.execute_script(SETTLED))

            driver.get(server.url)
            settle()
            prompt = driver.find_element(By.ID, "prompt")
            driver.execute_script("window.lcmServe.latencies = []; window.lcmServe.serverMs = [];")
            for text in (PROMPTS * rounds)[: len(PROMPTS) * rounds]:
                prompt.send_keys(Keys.CONTROL, "a")
                prompt.send_keys(Keys.BACKSPACE)
                time.sleep(pause)
                for letter in text:
                    prompt.send_keys(letter)
                    time.sleep(pause)
                settle()
            latencies = driver.execute_script("return window.lcmServe.latencies")
            server_ms = driver.execute_script("return window.lcmServe.serverMs")
            if screenshot:
                prompt.send_keys(Keys.CONTROL, "a")
                prompt.send_keys("a handwritten 7")
                settle()
                time.sleep(0.3)
                driver.save_screenshot(screenshot)
        finally:
            driver.quit()
    return {"keystrokes": len(latencies), "keystroke_to_image_median_ms": statistics.median(latencies),
            "keystroke_to_image_p90_ms": percentile(latencies, 0.9),
            "server_ms_per_image_median": statistics.median(server_ms)}


def typing_client(url: str, index: int, stop_at: float, results: list) -> None:
    from websockets.sync.client import connect

    rng = random.Random(index)
    answers, cond = {}, threading.Condition()
    with connect(url.replace("http://", "ws://") + "/ws", open_timeout=60) as ws:
        def receive():
            try:
                for frame in ws:
                    message = json.loads(frame)
                    if message["type"] == "image":
                        with cond:
                            answers[message["id"]] = time.monotonic()
                            cond.notify_all()
            except Exception:  # noqa: BLE001, S110 - the connection closed: the missing answer is recorded below
                pass

        threading.Thread(target=receive, daemon=True).start()
        next_id = 1
        while time.monotonic() < stop_at:
            prompt = f"a handwritten {rng.randrange(10)}"
            steps, seed = 4, rng.randrange(1000)
            for length in range(1, len(prompt) + 1):
                ws.send(json.dumps({"type": "generate", "id": next_id, "prompt": prompt[:length], "steps": steps,
                                    "seed": seed}))
                sent, next_id = time.monotonic(), next_id + 1
                time.sleep(rng.uniform(0.03, 0.15))
            last = next_id - 1
            with cond:
                answered = cond.wait_for(lambda last=last: last in answers, 30)
            results.append((answers[last] - sent) if answered else float("inf"))
            time.sleep(rng.uniform(0.1, 0.5))


def run_load(server: Server, clients: int, duration: float) -> dict:
    results, threads = [], []
    rss_start = rss_mb(server.proc.pid)
    stop_at = time.monotonic() + duration
    for index in range(clients):
        thread = threading.Thread(target=typing_client, args=(server.url, index, stop_at, results), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(duration + 120)
    health = server.health()
    return {"clients": clients, "duration_s": duration, "prompts": len(results),
            "last_request_median_ms": statistics.median(results) * 1000,
            "last_request_p95_ms": percentile(results, 0.95) * 1000, "last_request_max_ms": max(results) * 1000,
            "within_1s": sum(r <= 1.0 for r in results) / len(results),
            "server_rss_mb": [round(rss_start), round(rss_mb(server.proc.pid))], "worker": health["worker"]}


def run_throughput(server: Server, images: int, size: int | None) -> dict:
    from websockets.sync.client import connect

    with connect(server.url.replace("http://", "ws://") + "/ws", open_timeout=60) as ws:
        def ask(i):
            request = {"type": "generate", "id": i + 1, "prompt": f"a photo number {i}", "steps": 4, "seed": i}
            if size:
                request.update(width=size, height=size)
            ws.send(json.dumps(request))
            while True:
                message = json.loads(ws.recv(timeout=600))  # a new size compiles on CUDA
                if message["type"] == "error":
                    raise SystemExit(f"the server refused the request: {message['message']}")
                if message["type"] == "image":
                    return

        for i in range(5):  # warm-up (a new size compiles on CUDA)
            ask(i)
        start = time.perf_counter()
        for i in range(images):
            ask(1000 + i)
        elapsed = time.perf_counter() - start
    return {"images": images, "size": size, "images_per_s": images / elapsed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("browser", "load", "throughput"), default=["browser", "load"])
    parser.add_argument("--model", default=None, help="lcm-kit serve --model (default: the shipped digits teacher)")
    parser.add_argument("--lora", default=None, help="lcm-kit serve --lora")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=None,
                        help="image side for throughput (default: the model's; at most twice the model's side)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (CPU)")
    parser.add_argument("--pause", type=float, default=0.25, help="seconds between keystrokes in the browser")
    parser.add_argument("--rounds", type=int, default=2, help="times the browser types the prompt list")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--images", type=int, default=100, help="images for throughput")
    parser.add_argument("--screenshot", default=None, help="save a screenshot of the page (browser part)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    serve_args = ["--threads", str(args.threads), "--device", args.device]
    serve_args += ["--model", args.model] if args.model else []
    serve_args += ["--lora", args.lora] if args.lora else []
    import torch

    on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    figures = {"machine": torch.cuda.get_device_name(0) if on_cuda else cpu_name(), "cores": os.cpu_count(),
               "date": datetime.date.today().isoformat(),
               "load_avg": os.getloadavg()[0], "model": args.model or "digits teacher", "lora": args.lora}
    server = Server(serve_args)
    try:
        if "browser" in args.parts:
            figures["browser"] = run_browser(server, args.pause, args.rounds, args.screenshot)
        if "load" in args.parts:
            figures["load"] = run_load(server, args.clients, args.duration)
        if "throughput" in args.parts:
            figures["throughput"] = run_throughput(server, args.images, args.size)
    finally:
        server.close()
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
