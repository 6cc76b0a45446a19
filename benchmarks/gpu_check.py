"""The one GPU check of lcm-kit: correctness of every trainer and pipeline on the accelerator, and the speed figures.

Run it through ``benchmarks/gpu_check.sh`` (its header has the usage, the wheels and the time budget). Stages:

* ``build``: SD1.5-shaped random-weight folders and small datasets (``make_sd15_random.py``);
* ``train``: every trainer (``train_lcm_lora``, ``train_lcm``, ``train_consistency --mode cd|ct|ict``) in every
  precision runs 5 steps with a checkpoint at step 3 (LCM trainers with ``--cache_latents --cache_text_embeddings``),
  then again from that checkpoint (``--resume_from_checkpoint latest``, in a fresh folder holding a hard-linked copy
  of it); the two final weights must agree: ``resume`` is ``||A - B|| / ||A - init||`` over the trained tensors;
* ``pipelines``: the saved LoRA loads in stock diffusers (every tensor applied, stock ``LCMScheduler`` generates),
  ``LCMPipeline`` (LoRA and the full LCM) and ``CMPipeline`` (1 and 2 steps) generate in the first precision;
* ``speed``: ``bench_train_step.py`` and, if present, ``bench_inference.py``; their figures go into the table.

Prints ONE table at the end and writes it, the figures (JSON) and the logs under ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CONFIGS = {
    # SD1.5 shapes at 512^2 and a CIFAR-sized pixel CM at 32^2, fp16 and bf16, on the GPU
    "gpu": dict(device="cuda", precisions=("fp16", "bf16"), lcm_resolution=512, lcm_batch=2, lora_rank=64,
                cm_batch=32, jobs=4, budget=480, bench_train=["--config", "gpu", "--warmup", "2", "--steps", "10"],
                bench_inference_config="gpu", resume_tolerance=0.05),
    # the tiny kit at 32^2, float32, on the CPU: the same code paths, for testing this script
    "tiny": dict(device="cpu", precisions=("no",), lcm_resolution=32, lcm_batch=2, lora_rank=8, cm_batch=8, jobs=2,
                 budget=900, bench_train=["--config", "cpu", "--warmup", "1", "--steps", "3", "--no_peak_memory",
                                          "--threads", "1"],
                 bench_inference_config="cpu", resume_tolerance=0.05),
}
# the wall-clock share of the budget each stage may use (what is left over passes on to the next)
STAGE_SHARE = {"build": 0.1, "train": 0.45, "pipelines": 0.12, "bench_train": 0.25, "bench_inference": 0.08}
STEPS, CHECKPOINT_STEP = 5, 3
PRECISION_NAMES = {"no": "fp32"}  # --mixed_precision no: float32
FINISHED = re.compile(r"Finished (\d+) steps in [\d.]+ s; last loss (\S+);")


class Clock:
    def __init__(self, budget: float):
        self.start = time.monotonic()
        self.deadline = self.start + budget

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def run_logged(argv, log: Path, timeout: float, env=None) -> tuple[int | str, float, str]:
    """Run ``argv`` (cwd: the repository) with its output in ``log``; ``(returncode or 'timeout', seconds, text)``."""
    start = time.monotonic()
    if timeout <= 5:
        return "skipped (budget spent)", 0.0, ""
    with open(log, "w") as f:
        try:
            rc = subprocess.run(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout:.0f} s"
    return rc, time.monotonic() - start, log.read_text(errors="replace")


def tail(text: str, lines: int = 6) -> str:
    keep = [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    return " | ".join(keep[-lines:])


# ----------------------------------------------------------------------------------------------------------------
# train: run, resume, compare
# ----------------------------------------------------------------------------------------------------------------


def training_jobs(cfg, work: Path) -> list[dict]:
    common = ["--max_train_steps", str(STEPS), "--checkpointing_steps", str(CHECKPOINT_STEP), "--validation_steps",
              "1000", "--report_to", "none", "--seed", "0", "--lr_warmup_steps", "0"]
    lcm = ["--pretrained_teacher_model", str(work / "sd15"), "--dataset_name", str(work / "images"),
           "--resolution", str(cfg["lcm_resolution"]), "--train_batch_size", str(cfg["lcm_batch"]),
           "--cache_latents", "--cache_text_embeddings"]
    cm = ["--dataset_name", str(work / "cm_images"), "--resolution", "32", "--train_batch_size", str(cfg["cm_batch"]),
          "--num_class_embeds", "10", "--pretrained_unet", str(work / "cm_teacher"), "--learning_rate", "1e-4"]
    jobs = []
    for precision in cfg["precisions"]:
        flags = ["--mixed_precision", precision]
        precision = PRECISION_NAMES.get(precision, precision)
        jobs.append(dict(name=f"train_lcm {precision}", module="lcm_kit.training.train_lcm", heavy=True,
                         argv=lcm + ["--unet_time_cond_proj_dim", "256", "--learning_rate", "1e-5"] + flags,
                         weights="unet", init=work / "sd15" / "unet", keys=None, precision=precision))
        jobs.append(dict(name=f"train_lcm_lora {precision}", module="lcm_kit.training.train_lcm_lora", heavy=False,
                         argv=lcm + ["--lora_rank", str(cfg["lora_rank"]), "--learning_rate", "1e-4"] + flags,
                         weights="pytorch_lora_weights.safetensors", init=None, keys="lora_B", precision=precision))
        for mode in ("cd", "ct", "ict"):
            teacher = ["--teacher", str(work / "cm_teacher")] if mode == "cd" else []
            jobs.append(dict(name=f"train_consistency --mode {mode} {precision}", heavy=False,
                             module="lcm_kit.training.train_consistency",
                             argv=["--mode", mode] + teacher + cm + flags, weights="unet_online",
                             init=work / "cm_teacher" / "unet", keys=None, precision=precision, mode=mode))
    for job in jobs:
        job["argv"] = job["argv"] + common + ["--validation_prompts"]  # empty: no validation images
        job["dir"] = work / "runs" / re.sub(r"[^A-Za-z0-9]+", "_", job["name"]).strip("_")
    return jobs


def load_weights(path: Path, device: str) -> dict:
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    tensors = {}
    for file in files:
        tensors.update(load_file(str(file), device=device))
    return tensors


def resume_difference(job, device: str) -> tuple[float, float]:
    """``(||A - B|| / ||A - init||, ||A - init||)`` over the trained tensors of the two runs' final weights."""
    import torch

    a = load_weights(job["dir"] / "A" / job["weights"], device)
    b = load_weights(job["dir"] / "B" / job["weights"], device)
    if set(a) != set(b):
        raise ValueError(f"the two runs saved different tensors: {sorted(set(a) ^ set(b))[:5]}")
    keys = [k for k in a if job["keys"] is None or job["keys"] in k]
    init = load_weights(job["init"], device) if job["init"] is not None else {}
    diff = update = 0.0
    with torch.no_grad():
        for key in keys:
            x, y = a[key].double(), b[key].double()
            start = init[key].double() if key in init else torch.zeros_like(x)  # lora_B / a new projection: 0
            diff += float((x - y).pow(2).sum())
            update += float((x - start).pow(2).sum())
    return (math.sqrt(diff) / math.sqrt(update) if update > 0 else float("nan")), math.sqrt(update)


def run_pair(job, cfg, stage_end: float, env, log_dir: Path) -> dict:
    row = {"part": "train", "check": job["name"], "status": "FAIL", "figures": "", "seconds": 0.0}
    start = time.monotonic()
    shutil.rmtree(job["dir"], ignore_errors=True)
    job["dir"].mkdir(parents=True)
    base = [sys.executable, "-m", job["module"]]
    rc, secs_a, log_a = run_logged(base + job["argv"] + ["--output_dir", str(job["dir"] / "A")],
                                   log_dir / f"{job['dir'].name}-A.log", stage_end - time.monotonic(), env)
    found_a = FINISHED.search(log_a)
    if rc != 0 or not found_a:
        if str(rc).startswith("skipped"):
            row["status"] = "skipped"
        row["figures"] = f"first run: rc {rc}; {tail(log_a)}"
        row["seconds"] = time.monotonic() - start
        return row
    checkpoint = job["dir"] / "A" / f"checkpoint-{CHECKPOINT_STEP}"
    if not checkpoint.is_dir():
        row["figures"] = f"no {checkpoint.name} written; folder holds {sorted(p.name for p in checkpoint.parent.iterdir())}"
        return row
    (job["dir"] / "B").mkdir()
    shutil.copytree(checkpoint, job["dir"] / "B" / checkpoint.name, copy_function=os.link)
    rc, secs_b, log_b = run_logged(base + job["argv"] + ["--output_dir", str(job["dir"] / "B"),
                                                         "--resume_from_checkpoint", "latest"],
                                   log_dir / f"{job['dir'].name}-B.log", stage_end - time.monotonic(), env)
    found_b = FINISHED.search(log_b)
    resumed = f"Resuming from {job['dir'] / 'B' / checkpoint.name}" in log_b
    if rc != 0 or not found_b or not resumed:
        row["figures"] = f"resumed run: rc {rc}, resumed={resumed}; {tail(log_b)}"
        row["seconds"] = time.monotonic() - start
        return row
    losses = [found_a.group(2), found_b.group(2)]
    try:
        rel, update = resume_difference(job, cfg["device"])
    except Exception as error:  # reported in the table, the other jobs go on
        row["figures"] = f"comparing the runs failed: {type(error).__name__}: {error}"
        row["seconds"] = time.monotonic() - start
        return row
    finite = all(_is_finite(loss) for loss in losses)
    problems = []
    if not finite:
        problems.append("non-finite loss")
    if not update > 0:
        problems.append("no trained tensor changed in 5 steps")
    elif not rel <= cfg["resume_tolerance"]:
        problems.append(f"resumed run differs by {rel:.3g} > {cfg['resume_tolerance']}")
    row["status"] = "ok" if not problems else "FAIL"
    row["figures"] = (f"{found_a.group(1)} steps; last loss {losses[0]} / resumed {losses[1]}; resume {rel:.2e} "
                      f"of the update ({update:.3g}); runs {secs_a:.0f} s + {secs_b:.0f} s"
                      + (f"; {', '.join(problems)}" if problems else ""))
    # keep the first run's outputs the pipeline stage loads; checkpoints and the resumed run go (disk)
    shutil.rmtree(job["dir"] / "B", ignore_errors=True)
    shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.rmtree(job["dir"] / "A" / "cache", ignore_errors=True)
    row["seconds"] = time.monotonic() - start
    row["output"] = str(job["dir"] / "A")
    return row


def _is_finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def run_chain(jobs, cfg, stage_end: float, env, log_dir: Path) -> list[dict]:
    rows = []
    for job in jobs:
        try:
            rows.append(run_pair(job, cfg, stage_end, env, log_dir))
        except Exception as error:  # reported in the table; the other runs go on
            rows.append({"part": "train", "check": job["name"], "status": "FAIL", "seconds": 0.0,
                         "figures": f"{type(error).__name__}: {error}"})
    return rows


def stage_train(cfg, work: Path, stage_end: float, log_dir: Path) -> list[dict]:
    """The pairs, ``jobs`` at a time; the full-UNet (heavy) pairs one after the other in one chain, started first
    (each writes a 14 GB checkpoint at SD1.5 size: disk and memory)."""
    jobs = training_jobs(cfg, work)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // cfg["jobs"])))
    chains = [[job for job in jobs if job["heavy"]]] + [[job] for job in jobs if not job["heavy"]]
    with concurrent.futures.ThreadPoolExecutor(cfg["jobs"]) as pool:
        futures = [pool.submit(run_chain, chain, cfg, stage_end, env, log_dir) for chain in chains if chain]
        rows = [row for future in futures for row in future.result()]
    order = {job["name"]: i for i, job in enumerate(jobs)}
    return sorted(rows, key=lambda r: order.get(r["check"], 0))


# ----------------------------------------------------------------------------------------------------------------
# pipelines (run in a child: ``gpu_check.py --stage pipelines``)
# ----------------------------------------------------------------------------------------------------------------


def pipeline_checks(cfg_name: str, work: Path) -> list[dict]:
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from lcm_kit.pipelines import LCMPipeline
    from lcm_kit.pipelines.pipeline_cm import CMPipeline
    from lcm_kit.utils import dtype_kwarg

    cfg = CONFIGS[cfg_name]
    device, precision = cfg["device"], PRECISION_NAMES.get(cfg["precisions"][0], cfg["precisions"][0])
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    dtype_arg = {dtype_kwarg(): dtype}
    size = cfg["lcm_resolution"]
    runs = work / "runs"
    lora_dir = runs / re.sub(r"[^A-Za-z0-9]+", "_", f"train_lcm_lora {precision}") / "A"
    full_dir = runs / re.sub(r"[^A-Za-z0-9]+", "_", f"train_lcm {precision}") / "A"
    cm_dir = runs / re.sub(r"[^A-Za-z0-9]+", "_", f"train_consistency --mode ict {precision}") / "A"
    label = f"({str(dtype).replace('torch.', '')}, {device})"
    rows = []

    def check(name, fn):
        start = time.monotonic()
        try:
            status, figures = fn()
        except Exception as error:
            status, figures = "FAIL", f"{type(error).__name__}: {error} @ {traceback.format_exc().splitlines()[-3].strip()}"
        rows.append({"part": "pipelines", "check": f"{name} {label}", "status": status, "figures": figures,
                     "seconds": time.monotonic() - start})
        if device == "cuda":
            torch.cuda.empty_cache()

    def finite_report(latents, images=None) -> tuple[str, str]:
        ok = bool(torch.isfinite(latents).all())
        text = f"latents {tuple(latents.shape)} finite={ok}, std {latents.float().std():.3g}"
        if images is not None:
            decoded_ok = bool(torch.isfinite(images).all())
            text += f"; decoded finite={decoded_ok}"
            if not decoded_ok:
                text += " (random-weight VAE in this precision)"
        return ("ok" if ok else "FAIL"), text

    def timed_generate(pipe, **kwargs):
        generator = torch.Generator(device).manual_seed(0)
        pipe(**kwargs, generator=generator, output_type="latent")  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        latents = pipe(**kwargs, generator=torch.Generator(device).manual_seed(0), output_type="latent").images
        if device == "cuda":
            torch.cuda.synchronize()
        return latents, 1000 * (time.perf_counter() - start)

    def decode(pipe, latents):
        with torch.no_grad():
            return pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample

    def stock_lora():
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file

        pipe = StableDiffusionPipeline.from_pretrained(str(work / "sd15"), safety_checker=None, **dtype_arg).to(device)
        pipe.load_lora_weights(str(lora_dir))
        saved = {k.removeprefix("unet."): v for k, v in load_file(str(lora_dir / "pytorch_lora_weights.safetensors")).items()}
        adapter = pipe.unet.active_adapters()[0] if hasattr(pipe.unet, "active_adapters") else "default_0"
        loaded = get_peft_model_state_dict(pipe.unet, adapter_name=adapter)
        missing = sorted(set(saved) - set(loaded))
        worst = max((float((loaded[k].float().cpu() - saved[k].float()).abs().max() /
                           (saved[k].float().abs().max() + 1e-12)) for k in saved if k in loaded), default=float("nan"))
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        latents, ms = timed_generate(pipe, prompt="a photo of a cat", num_inference_steps=4, guidance_scale=1.0,
                                     height=size, width=size)
        status, text = finite_report(latents)
        applied_ok = not missing and len(loaded) == len(saved) and worst < 1e-2
        return ("ok" if applied_ok and status == "ok" else "FAIL",
                f"{len(saved)} tensors saved, {len(loaded)} loaded, unmatched {missing[:3]}, worst relative value "
                f"error {worst:.1e}; stock LCMScheduler 4 steps: {text}; {ms:.0f} ms")

    def lcm_lora():
        pipe = LCMPipeline.from_pretrained(str(work / "sd15"), safety_checker=None, **dtype_arg).to(device)
        pipe.load_lora_weights(str(lora_dir))
        pipe.set_progress_bar_config(disable=True)
        latents, ms = timed_generate(pipe, prompt="a photo of a cat", num_inference_steps=4, guidance_scale=1.0,
                                     height=size, width=size)
        status, text = finite_report(latents, decode(pipe, latents))
        return status, f"4 steps, guidance 1: {text}; {ms:.0f} ms to latents"

    def lcm_full():
        pipe = LCMPipeline.from_pretrained(str(full_dir), **dtype_arg).to(device)
        pipe.set_progress_bar_config(disable=True)
        latents, ms = timed_generate(pipe, prompt="a photo of a cat", num_inference_steps=4, guidance_scale=8.0,
                                     height=size, width=size)
        status, text = finite_report(latents, decode(pipe, latents))
        return status, f"w-embedding UNet, 4 steps, guidance 8: {text}; {ms:.0f} ms to latents"

    def cm(steps_kwargs, what):
        def run():
            pipe = CMPipeline.from_pretrained(str(cm_dir), **dtype_arg).to(device)
            pipe.set_progress_bar_config(disable=True)
            latents, ms = timed_generate(pipe, batch_size=4, class_labels=[0, 1, 2, 3], **steps_kwargs)
            status, text = finite_report(latents)
            return status, f"{what}: {text}; {ms:.0f} ms"
        return run

    check("stock diffusers load_lora_weights + LCMScheduler", stock_lora)
    check("LCMPipeline + LCM-LoRA", lcm_lora)
    check("LCMPipeline full LCM", lcm_full)
    check("CMPipeline iCT 1 step", cm({"num_inference_steps": 1}, "1 step"))
    check("CMPipeline iCT 2 steps", cm({"sigmas": [80.0, 0.821]}, "sigmas [80, 0.821]"))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# speed
# ----------------------------------------------------------------------------------------------------------------


def stage_bench_train(cfg, timeout: float, out: Path, log_dir: Path) -> list[dict]:
    json_file = out / "bench_train_step.json"
    json_file.unlink(missing_ok=True)  # figures only from this call
    rc, secs, log = run_logged([sys.executable, str(HERE / "bench_train_step.py"), *cfg["bench_train"], "--json",
                                str(json_file)], log_dir / "bench_train_step.log", timeout)
    if rc != 0 or not json_file.exists():
        return [{"part": "speed", "check": "bench_train_step.py", "status": "FAIL", "seconds": secs,
                 "figures": f"rc {rc}; {tail(log)}"}]
    report = json.loads(json_file.read_text())
    rows = [{"part": "speed", "check": f"train step: {name}", "status": "ok", "seconds": 0.0,
             "figures": f"{fig['ms_median']:.1f} ms/step median (mean {fig['ms_mean']:.1f})"
                        + (f", peak {fig['peak_gib']:.2f} GiB" if "peak_gib" in fig else "")
                        + f", first step {fig['first_step_s']:.1f} s"}
            for name, fig in report["results"].items()]
    memory = report.get("memory_ratio")
    rows.append({"part": "speed", "check": "train step ratio lcm-kit / reference", "status": "ok", "seconds": secs,
                 "figures": f"time {report['time_ratio']:.2f}x" + (f", memory {memory:.2f}x" if memory else "")
                            + f" ({report['device_name']}, {report['resolution']}^2, batch {report['batch_size']}, "
                              f"r {report['rank']}, {report['mixed_precision']})"})
    return rows


def stage_bench_inference(cfg, timeout: float, out: Path, log_dir: Path) -> list[dict]:
    script = HERE / "bench_inference.py"
    if not script.exists():
        return [{"part": "speed", "check": "bench_inference.py", "status": "missing", "seconds": 0.0,
                 "figures": "benchmarks/bench_inference.py does not exist in this tree"}]
    # its flags are its own: pass --config / --json only if its --help names them
    _, _, help_text = run_logged([sys.executable, str(script), "--help"], log_dir / "bench_inference-help.log",
                                 min(60.0, timeout))
    argv = [sys.executable, str(script)]
    if "--config" in help_text:
        argv += ["--config", cfg["bench_inference_config"]]
    json_file = out / "bench_inference.json"
    json_file.unlink(missing_ok=True)
    if "--json" in help_text:
        argv += ["--json", str(json_file)]
    start = time.monotonic()
    rc, secs, log = run_logged(argv, log_dir / "bench_inference.log", timeout)
    if rc == 2 and "--config" in argv and "invalid choice" in log:  # its configs have other names: its default
        del argv[argv.index("--config"):argv.index("--config") + 2]
        rc, secs, log = run_logged(argv, log_dir / "bench_inference.log", timeout - (time.monotonic() - start))
    if rc != 0:
        return [{"part": "speed", "check": "bench_inference.py", "status": "FAIL", "seconds": secs,
                 "figures": f"rc {rc}; {tail(log)}"}]
    shown = [a for a in argv[2:] if a not in ("--json", str(json_file))]
    check = " ".join(["bench_inference.py", *shown])
    if not json_file.exists():
        return [{"part": "speed", "check": check, "status": "ok", "seconds": secs, "figures": tail(log, 12)}]
    rows = []
    for case in json.loads(json_file.read_text())["cases"]:  # one row per (model, batch): the PIL figures
        ms = {row["variant"]: row["ms_median"] for row in case["rows"].values() if row["output"] == "pil"}
        ratios = case.get("ratios", {})
        fast = ms.get("lcm fast")
        parts = [f"{name} {ms[name]:.1f} ms" for name in ("stock", "stock+compile", "lcm eager", "lcm fast")
                 if ms.get(name) is not None]
        if fast:
            parts.append(f"{1000.0 * case['batch'] / fast:.1f} img/s fast")
        parts += [f"{name} {ratios[name + '|pil']:.2f}x" for name in ("fast/stock", "fast/naive-compile",
                                                                       "eager/stock") if name + "|pil" in ratios]
        rows.append({"part": "speed", "check": f"{check}: {case['model']} batch {case['batch']} "
                     f"{case['resolution']}px, PIL", "status": "ok", "seconds": secs, "figures": "; ".join(parts)})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------------------


def environment(cfg) -> str:
    import torch

    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
    for name in ("diffusers", "transformers", "accelerate", "peft", "datasets"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except Exception as error:  # the table says what is missing
            parts.append(f"{name} MISSING ({type(error).__name__})")
    if cfg["device"] == "cuda" and torch.cuda.is_available():
        parts.append(f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
    else:
        parts.append(f"{cfg['device']} ({os.cpu_count()} cores)")
    return ", ".join(parts)


def render(rows, header: str) -> str:
    lines = [header, "", "| part | check | status | figures | s |", "|---|---|---|---|---:|"]
    for row in rows:
        figures = str(row.get("figures", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {row['part']} | {row['check']} | {row['status']} | {figures} | {row.get('seconds', 0):.0f} |")
    failed = sum(row["status"] not in ("ok", "missing") for row in rows)  # skipped counts as not ok
    lines += ["", f"{len(rows)} checks, {failed} not ok"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("LCM_GPU_CHECK_TINY") == "1",
                        help="The tiny kit at 32^2, fp32, on the CPU (also LCM_GPU_CHECK_TINY=1).")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/lcm-gpu-check-out",
                        help="Where the table, figures and logs go (default $OUT, else /tmp/lcm-gpu-check-out).")
    parser.add_argument("--work", default=None, help="Models, data and runs (default /tmp/lcm-gpu-check-<config>); "
                                                     "reused by a later call that skips 'build'.")
    parser.add_argument("--only", default="build,train,pipelines,bench_train,bench_inference",
                        help="Comma-separated stages to run (build is skipped when --work already holds its folders).")
    parser.add_argument("--budget", type=float, default=None, help="Seconds for everything (gpu 480, tiny 900).")
    parser.add_argument("--jobs", type=int, default=None, help="Training runs at a time (gpu 4, tiny 2).")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)  # internal: a child running one stage
    args = parser.parse_args(argv)
    cfg_name = "tiny" if args.tiny else "gpu"
    cfg = dict(CONFIGS[cfg_name])
    if args.jobs:
        cfg["jobs"] = args.jobs
    work = Path(args.work or f"/tmp/lcm-gpu-check-{cfg_name}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.stage == "pipelines":
        print(json.dumps(pipeline_checks(cfg_name, work)))
        return 0

    budget = args.budget or cfg["budget"]
    clock = Clock(budget)
    log_dir = work / "logs"
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGE_SHARE))
    if unknown:
        raise SystemExit(f"--only: unknown stage(s) {unknown}; allowed: {sorted(STAGE_SHARE)}")
    rows = []
    header = f"lcm-kit GPU check ({cfg_name}): {environment(cfg)}; {time.strftime('%Y-%m-%d %H:%M')}"
    print(header, flush=True)

    def stage_end(name):  # this stage's share of the budget, plus what earlier stages left
        later = sum(STAGE_SHARE[s] for s in STAGE_SHARE if s in stages and list(STAGE_SHARE).index(s) >
                    list(STAGE_SHARE).index(name))
        return time.monotonic() + max(0.0, clock.left() - later * budget)

    if not (work / "manifest.json").exists() or "build" in stages:
        if (work / "manifest.json").exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        rc, secs, log = run_logged([sys.executable, str(HERE / "make_sd15_random.py"), "--out", str(work),
                                    *(["--tiny"] if args.tiny else [])], log_dir / "build.log",
                                   stage_end("build") - time.monotonic())
        rows.append({"part": "build", "check": "random-weight folders + data (make_sd15_random.py)",
                     "status": "ok" if rc == 0 else "FAIL", "seconds": secs,
                     "figures": tail(log, 1) if rc == 0 else f"rc {rc}; {tail(log)}"})
        print(rows[-1], flush=True)
        if rc != 0:
            stages = []
    log_dir.mkdir(parents=True, exist_ok=True)

    if "train" in stages:
        rows += stage_train(cfg, work, stage_end("train"), log_dir)
        for row in rows[-5 * len(cfg["precisions"]):]:
            print(row, flush=True)
    if "pipelines" in stages:
        start = time.monotonic()
        rc, secs, log = run_logged([sys.executable, str(HERE / "gpu_check.py"), "--stage", "pipelines", "--work",
                                    str(work), "--out", str(out), *(["--tiny"] if args.tiny else [])],
                                   log_dir / "pipelines.log", stage_end("pipelines") - time.monotonic())
        found = [line for line in log.splitlines() if line.startswith("[{")]
        if rc == 0 and found:
            rows += json.loads(found[-1])
        else:
            rows.append({"part": "pipelines", "check": "pipeline stage", "status": "FAIL",
                         "seconds": time.monotonic() - start, "figures": f"rc {rc}; {tail(log)}"})
        print(rows[-1], flush=True)
    if "bench_train" in stages:
        rows += stage_bench_train(cfg, stage_end("bench_train") - time.monotonic(), out, log_dir)
        print(rows[-1], flush=True)
    if "bench_inference" in stages:
        rows += stage_bench_inference(cfg, stage_end("bench_inference") - time.monotonic(), out, log_dir)
        print(rows[-1], flush=True)

    table = render(rows, header + f"; wall {clock.elapsed():.0f} s")
    (out / "gpu_check_table.md").write_text(table + "\n")
    (out / "gpu_check.json").write_text(json.dumps({"config": cfg_name, "header": header, "rows": rows}, indent=1))
    with open(out / "gpu_check_logs.txt", "w") as f:  # every log, tail-limited (what comes back is size-limited)
        for log in sorted(log_dir.glob("*.log")):
            text = log.read_text(errors="replace").replace("\r", "\n")
            f.write(f"===== {log.name}\n{text[-200_000:]}\n")
    print("\n" + table, flush=True)
    return 0 if all(row["status"] in ("ok", "missing") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
