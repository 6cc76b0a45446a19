"""ms/step and peak memory of the LCM-LoRA distillation step: lcm-kit's trainer vs the reference formulation.

* **lcm-kit** (``LCMObjective``, the code ``train_lcm_lora`` runs): one UNet; the teacher is the same frozen
  base with the adapter disabled; teacher cond + uncond in ONE batched forward; frozen weights in the
  mixed-precision dtype, adapter fp32; the student and target forwards run each LoRA layer fused as ONE op with
  ``W + s·B·A`` (``lcm_kit.training.fused_lora``; the trainer's default whenever ``--lora_dropout`` is 0);
  latents and text embeddings from the encoded cache (``--cache_latents --cache_text_embeddings``: the batch holds
  the VAE posterior and the prompt embeddings). ``--torch_compile`` adds a third row: the same step with the
  trainer's ``--torch_compile`` (its first step, the compile, is reported apart).
* **reference** (diffusers' ``train_lcm_distill_lora_sd_wds.py`` formulation): a separate fp32 student base with
  the adapter, a separate teacher copy (in the mixed-precision dtype), two teacher forwards (cond, then uncond),
  and the VAE and the text encoder run on every step. Same math (``LCMDistillationLoss``), so only the
  formulation differs.

Both run in ONE process, interleaved step by step (A, B, A, B, ...) so machine noise hits both alike. Peak memory:
on CUDA ``torch.cuda.max_memory_allocated`` per variant (the other variant's models deleted first); on CPU the
peak resident set of a child process that builds and runs only that variant, minus the same child's RSS after
imports.

    python benchmarks/bench_train_step.py                 # CPU tiny config (tiny SD1-shaped kit, 32^2, batch 8, r 8)
    python benchmarks/bench_train_step.py --config cpu-digits   # the shipped digits teacher, 32^2, batch 32, r 16
    python benchmarks/bench_train_step.py --config gpu    # SD1.5-shaped random weights, 512^2, batch 8, fp16, r 64
    python benchmarks/bench_train_step.py --threads 1 --torch_compile --no_peak_memory   # + the compiled trainer
    python benchmarks/bench_train_step.py --config gpu-sdxl   # SDXL-shaped, 1024^2, batch 4, r 64, fp16, grad ckpt
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch
from machine import cpu_name

CONFIGS = {
    "cpu": dict(kind="tiny", resolution=32, batch_size=8, rank=8, mixed_precision="no", device="cpu"),
    # the shipped digits teacher with the flags of bench_train_script.py's end-to-end comparison
    "cpu-digits": dict(kind="digits", resolution=32, batch_size=32, rank=16, mixed_precision="no", device="cpu"),
    "gpu": dict(kind="sd15", resolution=512, batch_size=8, rank=64, mixed_precision="fp16", device="cuda"),
    # SDXL LCM-LoRA with gradient checkpointing: lcm-kit's step and peak memory only (no reference formulation)
    "cpu-sdxl": dict(kind="tiny-sdxl", resolution=32, batch_size=4, rank=8, mixed_precision="no", device="cpu",
                     gradient_checkpointing=True, variants=("lcm-kit",)),
    "gpu-sdxl": dict(kind="sdxl", resolution=1024, batch_size=4, rank=64, mixed_precision="fp16", device="cuda",
                     gradient_checkpointing=True, variants=("lcm-kit",)),
}


def sd15_shaped_components(seed: int = 0) -> dict:
    """Stable Diffusion 1.5-shaped components with random weights (nothing downloaded)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lcm_kit.testing import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                       max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), scheduler=scheduler)


def sdxl_shaped_components(seed: int = 0) -> dict:
    """Stable Diffusion XL-shaped components with random weights (nothing downloaded)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lcm_kit.testing import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
        block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=1024,
        scaling_factor=0.13025,
    )
    ids = dict(max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407,
               pad_token_id=49407)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                num_hidden_layers=12, hidden_act="quick_gelu", **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, hidden_act="gelu",
        projection_dim=1280, **ids))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(), scheduler=scheduler)


def build_components(cfg) -> dict:
    if cfg["kind"] in ("tiny", "tiny-sdxl"):
        from diffusers import DDPMScheduler

        from lcm_kit.testing import tiny_sd_components

        components = tiny_sd_components("sdxl" if cfg["kind"] == "tiny-sdxl" else "sd1")
        components["scheduler"] = DDPMScheduler.from_config(components["scheduler"].config)
        return components
    if cfg["kind"] == "digits":
        from types import SimpleNamespace

        from lcm_kit.digits.data import teacher_path
        from lcm_kit.training.teachers import load_teacher_components

        return load_teacher_components(SimpleNamespace(
            pretrained_teacher_model=str(teacher_path()), revision=None, cache_dir=None, variant=None,
            pretrained_vae_model_name_or_path=None))
    return sdxl_shaped_components() if cfg["kind"] == "sdxl" else sd15_shaped_components()


def make_args(cfg, torch_compile: bool = False):
    from lcm_kit.training.args import build_lcm_lora_parser

    return build_lcm_lora_parser().parse_args([
        "--pretrained_teacher_model", "random-weights", "--dataset_name", "unused", "--output_dir", "unused",
        "--resolution", str(cfg["resolution"]), "--train_batch_size", str(cfg["batch_size"]),
        "--lora_rank", str(cfg["rank"]), "--lora_alpha", str(cfg["rank"]), "--report_to", "none",
        "--mixed_precision", cfg["mixed_precision"], *(["--torch_compile"] if torch_compile else []),
        *(["--gradient_checkpointing"] if cfg.get("gradient_checkpointing") else []),
    ])


def make_batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, r = cfg["batch_size"], cfg["resolution"]
    if cfg["kind"] == "digits":
        import random

        from lcm_kit.digits.data import caption_for

        rng = random.Random(seed)
        captions = [caption_for(i % 10, rng) for i in range(n)]
    else:
        captions = [f"a photograph of object number {i} on a table, studio light" for i in range(n)]
    return {"pixel_values": torch.rand(n, 3, r, r, generator=g) * 2 - 1, "captions": captions}


class LcmKitStep:
    """The trainer's step exactly as ``run_training`` drives it (prepared module, accelerator.backward)."""

    name = "lcm-kit"
    torch_compile = False

    def __init__(self, cfg, accelerator):
        from lcm_kit.training.lcm_objective import LCMObjective

        self.accelerator = accelerator
        self.objective = LCMObjective(make_args(cfg, self.torch_compile), accelerator, "lora",
                                      components=build_components(cfg))
        # what the trainer decided (fused LoRA needs lora_dropout 0, the default; see lcm_kit.training.fused_lora)
        self.fused_lora = (self.objective.fuse_student_lora, self.objective.fuse_target_lora)
        params = [p for p in self.objective.unet.parameters() if p.requires_grad]
        self.optimizer = self.make_optimizer(params)
        self.model, self.optimizer = accelerator.prepare(self.objective.unet, self.optimizer)
        # --cache_latents --cache_text_embeddings: the batch arrives encoded
        raw = make_batch(cfg)
        self.batch = {"latents": self.objective.encode_images(raw["pixel_values"]).cpu(),
                      **{k: v.cpu() for k, v in self.objective.encode_prompts(raw["captions"]).items()}}
        if self.objective.family == "sdxl":  # the cache's micro-conditioning rows: square images, centre crops
            n, r = cfg["batch_size"], cfg["resolution"]
            self.batch.update(original_sizes=torch.full((n, 2), r), crop_top_lefts=torch.zeros(n, 2, dtype=torch.int64))

    def make_optimizer(self, params):
        from lcm_kit.training.loop import _optimizer  # the trainer's AdamW (fused kernel on CPU and CUDA)

        return _optimizer(self.objective.args, params, 1e-6)

    def step(self, i):
        batch = {k: v.to(self.accelerator.device) for k, v in self.batch.items()}
        generator = torch.Generator(self.accelerator.device).manual_seed(i)
        loss, _ = self.objective.compute_loss(self.model, batch, i, generator)
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class ReferenceStep:
    """diffusers' formulation: fp32 student base + LoRA, separate teacher copy, two teacher forwards, VAE and text
    encoder every step."""

    name = "reference"

    def __init__(self, cfg, accelerator):
        import copy

        from lcm_kit.lora import add_lcm_lora
        from lcm_kit.training.lcm_objective import config_from_args
        from lcm_kit.training.loop import weight_dtype_for

        args = make_args(cfg)
        components = build_components(cfg)
        device, self.dtype = accelerator.device, weight_dtype_for(accelerator)
        self.accelerator, self.device = accelerator, device
        self.tokenizer = components["tokenizer"]
        self.vae = components["vae"].requires_grad_(False).to(device)  # fp32, as the reference keeps it
        self.text_encoder = components["text_encoder"].requires_grad_(False).to(device, self.dtype)
        self.teacher = copy.deepcopy(components["unet"]).requires_grad_(False).to(device, self.dtype)
        student = components["unet"].requires_grad_(False).to(device)  # fp32 base
        self.unet = add_lcm_lora(student, args.lora_rank, args.lora_alpha, 0.0,
                                 [t for t in args.lora_target_modules.split(",")])
        self.scaling = self.vae.config.scaling_factor
        sched = components["scheduler"]
        self.config = config_from_args(args, sched.config.prediction_type, sched.config.num_train_timesteps)
        self.alphas = sched.alphas_cumprod.to(device, torch.float32)
        self.optimizer = torch.optim.AdamW([p for p in self.unet.parameters() if p.requires_grad], lr=1e-6)
        self.unet, self.optimizer = accelerator.prepare(self.unet, self.optimizer)
        self.raw = make_batch(cfg)
        with torch.no_grad():
            self.uncond = self._encode([""])

    def _encode(self, captions):
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def step(self, i):
        from lcm_kit.training.losses import LCMDistillationLoss

        generator = torch.Generator(self.device).manual_seed(i)
        pixel_values = self.raw["pixel_values"].to(self.device)
        with torch.no_grad():
            latents = self.vae.encode(pixel_values).latent_dist.sample(generator) * self.scaling
            embeds = self._encode(self.raw["captions"])
        uncond = self.uncond.expand(latents.shape[0], -1, -1)

        def student(x, t, w):
            with self.accelerator.autocast():
                return self.unet(x, t, encoder_hidden_states=embeds).sample

        def teacher(x, t):  # two forwards
            with self.accelerator.autocast():
                cond = self.teacher(x.to(self.dtype), t, encoder_hidden_states=embeds.to(self.dtype)).sample
                unc = self.teacher(x.to(self.dtype), t, encoder_hidden_states=uncond.to(self.dtype)).sample
            return cond.float(), unc.float()

        def target(x, t, w):
            with self.accelerator.autocast():
                return self.unet(x, t, encoder_hidden_states=embeds).sample.float()

        loss = LCMDistillationLoss(self.alphas, self.config)(student, teacher, target, latents, generator).loss.mean()
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class LcmKitCompiledStep(LcmKitStep):
    """The same trainer step with ``--torch_compile`` (opt-in; its first step, the compile, is reported apart)."""

    name = "lcm-kit --torch_compile"
    torch_compile = True


class LcmKitUnfusedStep(LcmKitStep):
    """The trainer step with peft's unfused LoRA forward everywhere (lcm-kit before the fused forward)."""

    name = "lcm-kit peft-unfused"
    fusion = (False, False)

    def __init__(self, cfg, accelerator):
        super().__init__(cfg, accelerator)
        self.objective.fuse_student_lora, self.objective.fuse_target_lora = self.fusion
        self.fused_lora = self.fusion


class LcmKitTargetFusedStep(LcmKitUnfusedStep):
    """Fused LoRA only in the no-grad target forward (the student keeps peft's forward: no fused weights saved for
    backward, the GPU memory-saving choice if the fused student costs too much memory)."""

    name = "lcm-kit fused-target-only"
    fusion = (False, True)


class LcmKitPerForwardSetupStep(LcmKitStep):
    """The fused step as the trainer ran it before ``FusedLoRA`` and the fused AdamW: each forward checks and patches
    the LoRA layers again (``fused_lora_forward``), the teacher switches the adapter with peft's
    ``disable_adapters()``, the target builds its own ``W + s·B·A``, and AdamW runs torch's default."""

    name = "lcm-kit per-forward setup"

    def __init__(self, cfg, accelerator):
        import contextlib

        from lcm_kit.training.fused_lora import adapter_disabled, fused_lora_forward

        super().__init__(cfg, accelerator)
        objective = self.objective
        objective._lora_forward = lambda fused, weights: (fused_lora_forward(objective.unet) if fused
                                                          else contextlib.nullcontext())
        objective._teacher_weights = adapter_disabled

    def make_optimizer(self, params):
        return torch.optim.AdamW(params, lr=1e-6)  # torch's default: a Python loop over CPU tensors


VARIANTS = {"lcm-kit": LcmKitStep, "reference": ReferenceStep}
FUSION_VARIANTS = {LcmKitUnfusedStep.name: LcmKitUnfusedStep, LcmKitTargetFusedStep.name: LcmKitTargetFusedStep,
                   LcmKitPerForwardSetupStep.name: LcmKitPerForwardSetupStep}


def make_accelerator(cfg):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=cfg["mixed_precision"], cpu=cfg["device"] == "cpu")


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(cfg, warmup: int, steps: int, variant_classes=None) -> dict:
    """Build the variants (for CUDA, one at a time for its memory), then time them interleaved. The first step of
    each variant is timed on its own (``first_step_s``: for ``--torch_compile`` the compile)."""
    variant_classes = variant_classes or VARIANTS
    accelerator = make_accelerator(cfg)
    device = cfg["device"]
    variants, memory, first_step = {}, {}, {}
    for name, cls in variant_classes.items():
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            variant = cls(cfg, accelerator)
            for i in range(2):
                variant.step(i)
            _sync(device)
            memory[name] = (torch.cuda.max_memory_allocated() - before) / 2**30
            # measured alone; freed before the other variant is built, rebuilt for timing below
            del variant
            gc.collect()
            torch.cuda.empty_cache()
    for name, cls in variant_classes.items():
        if device == "cuda":
            continue
        variants[name] = cls(cfg, accelerator)
        start = time.perf_counter()
        variants[name].step(0)
        first_step[name] = time.perf_counter() - start
    times = {name: [] for name in variant_classes}
    if device == "cuda":
        # GPU: each variant alone in memory (an 860M UNet pair does not leave room for both comfortably)
        for name, cls in variant_classes.items():
            variant = cls(cfg, accelerator)
            start = time.perf_counter()
            variant.step(0)
            _sync(device)
            first_step[name] = time.perf_counter() - start
            for i in range(1, warmup):
                variant.step(i)
            _sync(device)
            for i in range(steps):
                start = time.perf_counter()
                variant.step(warmup + i)
                _sync(device)
                times[name].append(time.perf_counter() - start)
            del variant
            gc.collect()
            torch.cuda.empty_cache()
    else:
        for i in range(1, warmup):
            for variant in variants.values():
                variant.step(i)
        for i in range(steps):
            for name, variant in variants.items():
                start = time.perf_counter()
                variant.step(warmup + i)
                times[name].append(time.perf_counter() - start)
    result = {}
    for name, values in times.items():
        values = sorted(values)
        result[name] = {"ms_median": 1000 * values[len(values) // 2], "ms_mean": 1000 * sum(values) / len(values),
                        "first_step_s": first_step[name]}
        if name in memory:
            result[name]["peak_gib"] = memory[name]
    return result


def child_peak_rss(cfg_name: str, variant: str, steps: int = 3) -> float:
    """Peak RSS (GiB) added by building and running one variant, in a fresh child process (RSS sampled every
    millisecond by a thread, minus the RSS after imports)."""
    code = (
        "import sys, threading, time, json, torch\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import bench_train_step as b\n"
        f"cfg = b.CONFIGS[{cfg_name!r}]\n"
        "torch.set_num_threads(1)\n"
        "acc = b.make_accelerator(cfg)\n"
        "import lcm_kit.training.lcm_objective, lcm_kit.lora, lcm_kit.testing, lcm_kit.pipelines\n"
        "page = __import__('os').sysconf('SC_PAGE_SIZE')\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * page\n"
        "base, peak, done = rss(), [0], []\n"
        "def sample():\n"
        "    while not done:\n"
        "        peak[0] = max(peak[0], rss()); time.sleep(0.001)\n"
        "t = threading.Thread(target=sample); t.start()\n"
        f"v = b.VARIANTS[{variant!r}](cfg, acc)\n"
        f"[v.step(i) for i in range({steps})]\n"
        "done.append(1); t.join(); peak[0] = max(peak[0], rss())\n"
        "print(json.dumps((peak[0] - base) / 2**30))\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=str, default=None, help="Also write the figures to this JSON file.")
    parser.add_argument("--torch_compile", action="store_true",
                        help="Also time lcm-kit with the trainer's --torch_compile (compile time reported apart).")
    parser.add_argument("--compare_fusion", action="store_true",
                        help="Also time lcm-kit with peft's unfused LoRA, and with only the target forward fused.")
    parser.add_argument("--no_peak_memory", action="store_true", help="Skip the CPU peak-RSS child processes.")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--config {args.config} needs a CUDA device.")
    variant_classes = {name: cls for name, cls in VARIANTS.items() if name in cfg.get("variants", VARIANTS)}
    if args.compare_fusion:
        variant_classes.update(FUSION_VARIANTS)
    if args.torch_compile:
        variant_classes[LcmKitCompiledStep.name] = LcmKitCompiledStep
    result = time_interleaved(cfg, args.warmup, args.steps, variant_classes)
    if cfg["device"] == "cpu" and not args.no_peak_memory:
        for name in VARIANTS:
            if name in result:
                result[name]["peak_gib"] = child_peak_rss(args.config, name)
    import accelerate
    import diffusers
    import peft

    card = torch.cuda.get_device_name() if cfg["device"] == "cuda" else f"{cpu_name()} " \
        f"({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    report = {
        "config": args.config, **cfg, "device_name": card, "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "accelerate": accelerate.__version__,
        "peft": peft.__version__, "steps": args.steps, "warmup": args.warmup, "results": result,
        "load_average": os.getloadavg(),
    }
    reference = result.get("reference")
    report["time_ratio"] = result["lcm-kit"]["ms_median"] / reference["ms_median"] if reference else None
    report["memory_ratio"] = (result["lcm-kit"]["peak_gib"] / reference["peak_gib"]
                              if reference and "peak_gib" in reference else None)
    report["time_ratios"] = {name: figures["ms_median"] / reference["ms_median"]
                             for name, figures in result.items() if reference and name != "reference"}
    print(f"{args.config}: {card}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    for name, figures in result.items():
        peak = f"   peak {figures['peak_gib'] * 1024:8.1f} MiB" if "peak_gib" in figures else ""
        print(f"  {name:24s} {figures['ms_median']:9.1f} ms/step (median; mean {figures['ms_mean']:.1f})"
              f"{peak}   first step {figures['first_step_s']:.1f} s")
    memory = f", peak memory {report['memory_ratio']:.2f}x" if report["memory_ratio"] is not None else ""
    if reference:
        print(f"  ratio lcm-kit / reference: time {report['time_ratio']:.2f}x{memory}")
    for name, ratio in report["time_ratios"].items():
        if name != "lcm-kit":
            print(f"  ratio {name} / reference: time {ratio:.2f}x")
    print(f"  load average {report['load_average']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
