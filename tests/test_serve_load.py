"""`lcm-kit serve` under load: the command itself in a process of its own, 8 websocket clients on the loopback
address typing prompts letter by letter for 30 seconds (now and then a bad value), bounded and self-stopping.
The server stays up, every burst's last request is answered, no generation fails and its memory stays flat.
Timing figures come from benchmarks/bench_serve.py, not from here."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

pytest.importorskip("starlette", reason='the serve extra is not installed (pip install "lcm-kit[serve]")')
pytest.importorskip("uvicorn", reason='the serve extra is not installed (pip install "lcm-kit[serve]")')
from websockets.sync.client import connect

CLIENTS = 8
DURATION_S = 30.0
ANSWER_BOUND_S = 15.0  # a bound for the test to stop at, far above the benchmark's figures; not a target
RSS_GROWTH_BOUND_MB = 60.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def server_process():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "lcm_kit.cli", "serve", "--port", "0", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, found = [], []

    def read():
        for line in proc.stdout:
            lines.append(line)
            match = re.search(r"open (http://\S+) ", line)
            if match:
                found.append(match.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 180
    while not found and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert found, "the server did not start:\n" + "".join(lines)
        yield proc, found[0], lines
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def typing_client(url: str, index: int, stop_at: float, report: dict) -> None:
    """Types digit prompts letter by letter with human pauses; after each burst waits for the answer to its last
    request. Records every burst's last id and whether (and when) it was answered."""
    rng = random.Random(index)
    answers, errors, cond = {}, {}, threading.Condition()
    bursts = []
    with connect(url.replace("http://", "ws://") + "/ws", open_timeout=30) as ws:

        def receive():
            try:
                for frame in ws:
                    message = json.loads(frame)
                    with cond:
                        if message["type"] == "image":
                            answers[message["id"]] = time.monotonic()
                        elif message["type"] == "error":
                            errors[message["id"]] = message["message"]
                        cond.notify_all()
            except Exception:  # noqa: BLE001, S110 - the connection closed: the sender sees the missing answers
                pass

        threading.Thread(target=receive, daemon=True).start()
        next_id = 1
        while time.monotonic() < stop_at:
            prompt = f"a handwritten {rng.randrange(10)}"
            steps, seed = rng.choice((1, 2, 4)), rng.randrange(1000)
            if rng.random() < 0.1:  # a bad value in the middle of a burst: answered with a message
                ws.send(json.dumps({"type": "generate", "id": next_id, "steps": "9"}))
                bad_id, next_id = next_id, next_id + 1
                with cond:
                    assert cond.wait_for(lambda bad_id=bad_id: bad_id in errors, ANSWER_BOUND_S), "no answer to a bad value"
            for length in range(1, len(prompt) + 1):
                ws.send(json.dumps({"type": "generate", "id": next_id, "prompt": prompt[:length], "steps": steps,
                                    "seed": seed}))
                sent = time.monotonic()
                next_id += 1
                time.sleep(rng.uniform(0.03, 0.15))
            last = next_id - 1
            with cond:
                answered = cond.wait_for(lambda last=last: last in answers, ANSWER_BOUND_S)
            bursts.append((last, answered, (answers[last] - sent) if answered else None))
            time.sleep(rng.uniform(0.1, 0.5))
    report[index] = {"bursts": bursts, "requests": next_id - 1, "images": len(answers),
                     "bad_values": sum("steps: got 9, allowed 1–8" in m for m in errors.values())}


def test_eight_typing_clients_for_thirty_seconds(server_process):
    proc, url, lines = server_process
    pid = proc.pid
    rss_start = rss_mb(pid)
    report, threads = {}, []
    start = time.monotonic()
    for index in range(CLIENTS):
        thread = threading.Thread(target=typing_client, args=(url, index, start + DURATION_S, report), daemon=True)
        thread.start()
        threads.append(thread)
    time.sleep(DURATION_S / 3)
    rss_warm = rss_mb(pid)  # after the first third: allocator and caches warmed up under this load
    for thread in threads:
        thread.join(DURATION_S + 2 * ANSWER_BOUND_S + 30)  # self-stopping: bounded even if the server hangs
    rss_end = rss_mb(pid)

    assert proc.poll() is None, "the server stopped:\n" + "".join(lines[-20:])
    assert sorted(report) == list(range(CLIENTS)), f"clients that did not finish: {set(range(CLIENTS)) - set(report)}"
    unanswered = {i: [b for b in r["bursts"] if not b[1]] for i, r in report.items()}
    assert not any(unanswered.values()), f"bursts whose last request was not answered: {unanswered}"
    assert all(len(r["bursts"]) >= 5 for r in report.values()), report
    with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
        health = json.load(response)
    assert health["ok"] and health["worker"]["failed"] == 0, health
    requests = sum(r["requests"] for r in report.values())
    images = sum(r["images"] for r in report.values())
    assert images <= requests
    assert rss_end - rss_warm < RSS_GROWTH_BOUND_MB, (rss_start, rss_warm, rss_end)
    latencies = sorted(b[2] for r in report.values() for b in r["bursts"])
    print(f"\n{CLIENTS} clients, {DURATION_S:.0f} s: {requests} requests, {images} images, "
          f"{health['worker']['superseded'] + health['worker']['dropped']} dropped; last-request latency median "
          f"{latencies[len(latencies) // 2] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms; RSS "
          f"{rss_start:.0f} -> {rss_warm:.0f} -> {rss_end:.0f} MB")
