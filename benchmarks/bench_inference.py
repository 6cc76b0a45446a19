"""Text-to-image latency of few-step LCM inference: stock diffusers vs LCMPipeline eager vs its fast path.

Variants, all with the same weights (an LCM-LoRA, randomised, on the same base) in ONE process, timed interleaved
(A, B, C, ... repeated) so machine noise hits them alike; median over the repeats after warm-up, synchronised on CUDA:

* ``stock``: diffusers' ``StableDiffusionPipeline`` with ``LCMScheduler``, LoRA fused with ``pipe.fuse_lora()``
  (diffusers' LCM-LoRA recipe), ``guidance_scale=1``;
* ``stock+compile``: the same with ``torch.compile`` of the UNet and of ``vae.decode`` (mode "reduce-overhead",
  i.e. CUDA graphs, on CUDA; the default mode on CPU);
* ``lcm eager``: ``LCMPipeline``, LoRA fused with ``pipe.fuse_lora()``;
* ``lcm fast``: ``LCMPipeline`` with ``pipe.enable_fast_inference()`` at its defaults for the device (on CUDA: fp16,
  channels_last, CUDA-graph compile; on CPU: fused LoRA, cached prompt / schedule, no compile);
* ``lcm fast+compile`` (CPU only; on CUDA the default already compiles): ``enable_fast_inference(compile=True)``;
* ``lcm fast new-prompt``: the ``lcm fast`` pipeline with a different prompt every call (no prompt-cache hit);
* ``lcm eager diffusers-device`` (``--diffusers_device``): ``lcm eager`` with diffusers' own ``pipe.device`` and
  ``pipe._execution_device``, which walk every submodule (:mod:`lcm_kit.pipelines.execution_device`).

Each variant runs with ``output_type="pil"`` and ``"latent"``. The first call of a compiled variant compiles; it is
reported apart ("first call"). Configs:

    python benchmarks/bench_inference.py                  # CPU: shipped digits teacher (32², batch 20 and 1), tiny kit
    python benchmarks/bench_inference.py --config gpu     # SD1.5-shaped random weights, 512², fp16, batch 1 and 8
    python benchmarks/bench_inference.py --smoke          # tiny kit, batch 1, 3 repeats, backend "eager" (< 1 min)
    python benchmarks/bench_inference.py --config cpu --models digits --batch_sizes 20 --no_compile --repeats 30 \
        --diffusers_device                                # the eager comparison alone, per-repeat quartiles

On CPU the benchmark runs one torch thread unless ``--threads`` says otherwise: on 2 shared cores two threads were
many times slower than one whenever anything else ran.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch
from machine import cpu_name

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS = 4
CONFIGS = {
    "cpu": dict(device="cpu", dtype=torch.float32, cases=[("digits", 20, 32), ("digits", 1, 32), ("tiny", 1, 32)],
                lora_rank=16),
    "gpu": dict(device="cuda", dtype=torch.float16, cases=[("sd15", 1, 512), ("sd15", 8, 512)], lora_rank=64),
    "smoke": dict(device="cpu", dtype=torch.float32, cases=[("tiny", 1, 32)], lora_rank=4),
}
OUTPUTS = ("pil", "latent")


_BASE = {}


def build_components(model: str, lora_rank: int, device: str, dtype: torch.dtype) -> dict:
    """Fresh components with a randomised LCM-LoRA: copies of one seeded build, so every variant has the same
    weights and nothing is shared between pipelines."""
    if (model, lora_rank) not in _BASE:
        _BASE.clear()
        _BASE[model, lora_rank] = _seeded_components(model, lora_rank)
    components = copy.deepcopy(_BASE[model, lora_rank])
    for name in ("unet", "vae", "text_encoder"):
        module = components[name].eval().to(device=device)
        if module.dtype != dtype:
            module.to(dtype=dtype)
    return components


def _seeded_components(model: str, lora_rank: int) -> dict:
    from lcm_kit.lora import add_lcm_lora

    if model == "digits":
        from diffusers import StableDiffusionPipeline

        from lcm_kit.digits.data import teacher_path

        components = dict(StableDiffusionPipeline.from_pretrained(
            teacher_path(), safety_checker=None, requires_safety_checker=False).components)
    elif model == "tiny":
        from lcm_kit.testing import tiny_sd_components

        components = tiny_sd_components("sd1")
    else:
        from bench_train_step import sd15_shaped_components

        components = sd15_shaped_components()
    components["safety_checker"], components["feature_extractor"] = None, None
    components.setdefault("image_encoder", None)
    add_lcm_lora(components["unet"], lora_rank, lora_rank)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in components["unet"].named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return components


def compile_options(device: str, backend: str) -> dict:
    options = dict(backend=backend)
    if backend == "inductor":
        options["mode"] = "reduce-overhead" if device == "cuda" else "default"
    return options


def build_variants(model: str, cfg: dict, backend: str, with_compile: bool, fast_kwargs: dict,
                   tiny_vae: bool, diffusers_device: bool = False) -> dict:
    from diffusers import LCMScheduler, StableDiffusionPipeline

    device, dtype, rank = cfg["device"], cfg["dtype"], cfg["lora_rank"]
    from lcm_kit.pipelines import LCMPipeline
    variants = {}

    def stock():
        components = build_components(model, rank, device, dtype)
        components["scheduler"] = LCMScheduler.from_config(components["scheduler"].config)
        pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
        pipe.fuse_lora(components=["unet"])
        return pipe

    variants["stock"] = stock()
    if with_compile:
        pipe = stock()
        options = compile_options(device, backend)
        pipe.unet = torch.compile(pipe.unet, **options)
        pipe.vae.decode = torch.compile(pipe.vae.decode, **options)
        variants["stock+compile"] = pipe
    eager = LCMPipeline(**build_components(model, rank, device, dtype), requires_safety_checker=False)
    eager.fuse_lora(components=["unet"])
    variants["lcm eager"] = eager
    if diffusers_device:
        from diffusers.pipelines.pipeline_utils import DiffusionPipeline

        class WithDiffusersDevice(LCMPipeline):
            device = DiffusionPipeline.device
            _execution_device = DiffusionPipeline._execution_device

        walking = WithDiffusersDevice(**build_components(model, rank, device, dtype), requires_safety_checker=False)
        walking.fuse_lora(components=["unet"])
        variants["lcm eager diffusers-device"] = walking
    fast = LCMPipeline(**build_components(model, rank, device, dtype), requires_safety_checker=False)
    backend_kwargs = {} if backend == "inductor" else {"backend": backend}
    fast.enable_fast_inference(**{**backend_kwargs, **({} if with_compile else {"compile": False}), **fast_kwargs})
    variants["lcm fast"] = fast
    if device != "cuda" and with_compile:
        compiled = LCMPipeline(**build_components(model, rank, device, dtype), requires_safety_checker=False)
        compiled.enable_fast_inference(**{**backend_kwargs, **fast_kwargs, "compile": True})
        variants["lcm fast+compile"] = compiled
    if tiny_vae:
        from diffusers import AutoencoderTiny

        # TAESD's architecture with random weights: what a tiny decoder costs, not what it looks like
        tiny = LCMPipeline(**build_components(model, rank, device, dtype), requires_safety_checker=False)
        tiny.enable_fast_inference(**{**backend_kwargs, **fast_kwargs},
                                   vae=AutoencoderTiny().eval().to(device=device, dtype=dtype))
        variants["lcm fast tiny-vae"] = tiny
    variants["lcm fast new-prompt"] = fast
    for pipe in variants.values():
        pipe.set_progress_bar_config(disable=True)
    return variants


def prompts_for(model: str, batch: int, salt: int | None = None) -> list[str]:
    if model == "digits":
        from lcm_kit.digits.data import eval_prompt

        prompts = [eval_prompt(i % 10) for i in range(batch)]
        # the digits tokenizer knows only caption words: vary the digit, not the wording
        return prompts if salt is None else [eval_prompt((i + salt) % 10) for i in range(batch)]
    words = "a photograph of object number {} on a table, studio light"
    return [words.format(i if salt is None else f"{i} {salt}") for i in range(batch)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(model: str, batch: int, resolution: int, cfg: dict, args) -> dict:
    device = cfg["device"]
    variants = build_variants(model, cfg, args.compile_backend, not args.no_compile, args.fast_kwargs, args.tiny_vae,
                              args.diffusers_device)
    jobs = [(name, output) for name in variants for output in OUTPUTS]
    salt = [0]

    def call(name, output, seed):
        if name.endswith("new-prompt"):
            salt[0] += 1
            prompts = prompts_for(model, batch, salt[0])
        else:
            prompts = prompts_for(model, batch)
        generator = torch.Generator(device=device).manual_seed(seed)
        _sync(device)
        start = time.perf_counter()
        result = variants[name](prompts, height=resolution, width=resolution, num_inference_steps=STEPS,
                                guidance_scale=1.0, generator=generator, output_type=output).images
        _sync(device)
        return time.perf_counter() - start, result

    first, times = {}, {job: [] for job in jobs}
    for job in jobs:
        first[job] = call(*job, seed=0)[0]
        for _ in range(args.warmup - 1):
            call(*job, seed=0)
    for rep in range(args.repeats):
        for job in jobs:
            times[job].append(call(*job, seed=rep)[0])
    # Agreement of the latents (same seed, same weights): the fast path and the stock pipeline vs LCMPipeline eager.
    reference = call("lcm eager", "latent", seed=0)[1].float()
    agreement = {name: (call(name, "latent", seed=0)[1].float() - reference).abs().max().item()
                 for name in variants if name not in ("lcm eager", "lcm fast new-prompt")}
    syncs = {name: sync_check(variants[name], model, batch, resolution) for name in ("stock", "lcm fast")
             if args.check_syncs}
    rows = {}
    for (name, output), samples in times.items():
        median = statistics.median(samples)
        rows[f"{name}|{output}"] = dict(variant=name, output=output, ms_median=median * 1e3,
                                        ms_min=min(samples) * 1e3, images_per_s=batch / median,
                                        first_call_s=first[(name, output)], ms_samples=[x * 1e3 for x in samples])
    variants.clear()  # free the models before the next case
    torch._dynamo.reset()
    return dict(model=model, batch=batch, resolution=resolution, rows=rows, max_abs_diff_vs_eager=agreement,
                host_device_syncs=syncs)


def sync_check(pipe, model: str, batch: int, resolution: int) -> str:
    """One warm latent-output call under ``torch.cuda.set_sync_debug_mode("error")``: "none", or the first op that
    synchronised (a CUDA generator, so drawing noise is not one)."""

    def call():
        return pipe(prompts_for(model, batch), height=resolution, width=resolution, num_inference_steps=STEPS,
                    guidance_scale=1.0, generator=torch.Generator("cuda").manual_seed(0), output_type="latent")

    call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
        return "none"
    except RuntimeError as error:
        return str(error).strip().splitlines()[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode("default")


RATIO_PAIRS = [("fast/stock", "lcm fast", "stock"), ("fast/naive-compile", "lcm fast", "stock+compile"),
               ("eager/stock", "lcm eager", "stock"), ("fast+compile/stock", "lcm fast+compile", "stock"),
               ("fast+compile/naive-compile", "lcm fast+compile", "stock+compile"),
               ("eager-diffusers-device/stock", "lcm eager diffusers-device", "stock")]


def ratios(case: dict) -> dict:
    """Each pair's ratio of medians."""
    rows, out = case["rows"], {}
    for output in OUTPUTS:
        for label, a, b in RATIO_PAIRS:
            row_a, row_b = rows.get(f"{a}|{output}"), rows.get(f"{b}|{output}")
            if row_a and row_b:
                out[f"{label}|{output}"] = row_a["ms_median"] / row_b["ms_median"]
    return out


def paired_ratios(case: dict) -> dict:
    """Each pair's ratio within a repeat (the variants of one repeat run back to back, so they share the machine's
    state): median and quartiles over the repeats, steadier than a ratio of medians when the load drifts."""
    rows, out = case["rows"], {}
    for output in OUTPUTS:
        for label, a, b in RATIO_PAIRS:
            row_a, row_b = rows.get(f"{a}|{output}"), rows.get(f"{b}|{output}")
            if row_a and row_b:
                per_repeat = [x / y for x, y in zip(row_a["ms_samples"], row_b["ms_samples"])]
                quartiles = statistics.quantiles(per_repeat, n=4) if len(per_repeat) > 1 else per_repeat * 3
                out[f"{label}|{output}"] = dict(median=statistics.median(per_repeat), q25=quartiles[0],
                                                q75=quartiles[2])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("cpu", "gpu"), default=None,
                        help="default: gpu when CUDA is available, else cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny kit, batch 1, 3 repeats, compile backend 'eager'")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default 10; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per variant first (default 3; smoke 1)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=None, help="only these cases' batch sizes")
    parser.add_argument("--models", nargs="+", default=None, help="only these cases' models (digits, tiny, sd15)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU default 1: see below)")
    parser.add_argument("--compile_backend", default=None, help="torch.compile backend (default inductor; smoke eager)")
    parser.add_argument("--no_compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--fast_kwargs", type=json.loads, default={},
                        help='JSON object of enable_fast_inference arguments, e.g. \'{"compile_mode": "max-autotune"}\' '
                             '(dtype as a string: "float16")')
    parser.add_argument("--tiny_vae", action="store_true",
                        help="also time the fast path decoding with a TAESD-shaped AutoencoderTiny (sd15 cases only)")
    parser.add_argument("--diffusers_device", action="store_true",
                        help="also time LCMPipeline eager with diffusers' own pipe.device / pipe._execution_device "
                             "(what lcm-kit's one-walk version saves)")
    parser.add_argument("--check_syncs", action=argparse.BooleanOptionalAction, default=None,
                        help="CUDA: run one warm call of stock and lcm fast under sync debug mode 'error' (default on)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name = "smoke" if args.smoke else (args.config or ("gpu" if torch.cuda.is_available() else "cpu"))
    cfg = CONFIGS[name]
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--config gpu needs a CUDA device.")
    if args.repeats is None:
        args.repeats = 3 if args.smoke else 10
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 3
    args.compile_backend = args.compile_backend or ("eager" if args.smoke else "inductor")
    if not isinstance(args.fast_kwargs, dict):
        raise SystemExit(f"--fast_kwargs must be a JSON object, got {args.fast_kwargs!r}.")
    if isinstance(args.fast_kwargs.get("dtype"), str):
        args.fast_kwargs["dtype"] = getattr(torch, args.fast_kwargs["dtype"])
    if args.tiny_vae and name != "gpu":
        raise SystemExit("--tiny_vae needs --config gpu (TAESD's 8x decoder does not fit the CPU models' latents).")
    if args.check_syncs is None:
        args.check_syncs = cfg["device"] == "cuda"
    elif args.check_syncs and cfg["device"] != "cuda":
        raise SystemExit("--check_syncs needs --config gpu.")
    if args.warmup < 1 or args.repeats < 1:
        raise SystemExit(f"--warmup and --repeats must be >= 1, got {args.warmup} and {args.repeats}.")
    if cfg["device"] == "cpu":
        # Two threads on 2 shared cores, with anything else running, are many times slower than one.
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in cfg["cases"] if (args.batch_sizes is None or c[1] in args.batch_sizes)
             and (args.models is None or c[0] in args.models)]
    if not cases:
        raise SystemExit(f"no case of config {name} matches --batch_sizes / --models; cases: {cfg['cases']}")

    import diffusers

    card = torch.cuda.get_device_name() if cfg["device"] == "cuda" else (
        f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    load_before = os.getloadavg()
    results = [run_case(model, batch, resolution, cfg, args) for model, batch, resolution in cases]
    report = dict(config=name, device_name=card, date=time.strftime("%Y-%m-%d %H:%M"), torch=torch.__version__,
                  diffusers=diffusers.__version__, steps=STEPS, repeats=args.repeats, warmup=args.warmup,
                  compile_backend=args.compile_backend, dtype=str(cfg["dtype"]), load_average_before=load_before,
                  load_average_after=os.getloadavg(), cases=results)
    print(f"{name}: {card}; torch {torch.__version__}, diffusers {diffusers.__version__}; {report['date']}; "
          f"{STEPS} steps, {cfg['dtype']}, median of {args.repeats} after {args.warmup} warm-up calls, "
          f"compile backend {args.compile_backend}")
    print(f"{'case':<14} {'variant':<22} {'output':<7} {'median ms':>10} {'min ms':>9} {'images/s':>9} "
          f"{'vs stock':>9} {'first call s':>13}")
    for case in results:
        label = f"{case['model']} b{case['batch']}"
        for row in case["rows"].values():
            stock = case["rows"][f"stock|{row['output']}"]["ms_median"]
            print(f"{label:<14} {row['variant']:<22} {row['output']:<7} {row['ms_median']:>10.2f} "
                  f"{row['ms_min']:>9.2f} {row['images_per_s']:>9.1f} {row['ms_median'] / stock:>8.3f}x "
                  f"{row['first_call_s']:>13.2f}")
        case["ratios"], case["paired_ratios"] = ratios(case), paired_ratios(case)
        for key, value in case["ratios"].items():
            paired = case["paired_ratios"][key]
            print(f"ratio {label:<14} {key:<34} {value:.3f}x  (per repeat: median {paired['median']:.3f}x, "
                  f"quartiles {paired['q25']:.3f}-{paired['q75']:.3f})")
        for key, value in case["max_abs_diff_vs_eager"].items():
            print(f"agreement {label:<10} {key:<22} max |latent - lcm eager| {value:.3g}")
        for key, value in case["host_device_syncs"].items():
            print(f"syncs {label:<14} {key:<22} host-device syncs in a warm latent call: {value}")
    print(f"load average before {tuple(round(x, 2) for x in load_before)}, after "
          f"{tuple(round(x, 2) for x in report['load_average_after'])}")
    bad = [r for c in results for r in c["rows"].values() if not math.isfinite(r["ms_median"])]
    if bad:
        raise SystemExit(f"non-finite timings: {bad}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return report


if __name__ == "__main__":
    main()
