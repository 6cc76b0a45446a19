"""Device sweep: every public computation run with all its modules and inputs on the ``meta`` device.

CI has no GPU, so a tensor created on the CPU in the middle of a step (a bare ``torch.arange``, ``torch.tensor``
without ``device=``, a ``.cpu()`` round trip) would only fail on the user's accelerator. ``meta`` stands in for it:
elementwise ops refuse a CPU operand exactly as CUDA does (0-dim CPU tensors are allowed on both), data-dependent
host reads (``.item()``, ``bool(tensor)``, ``nonzero``) fail, and nothing is computed, so the sweep is fast.

``meta`` is laxer than CUDA in one place: indexing a CPU tensor with meta indices returns a CPU tensor where CUDA
raises. :class:`DeviceAudit` closes that gap (any op mixing a meta tensor with a CPU tensor of one or more
dimensions is an error) and records host-to-device copies (``.to`` / ``copy_`` from the CPU, ``torch.tensor(...,
device=...)``): on CUDA each blocking one waits for the GPU to drain its queue. The training losses must make none.
Every output is also checked to be on meta, not silently on the CPU.

``torch.Generator(device="meta")`` does not exist (torch raises "META device type not an accelerator"), so the
sweep passes ``generator=None``: the ops then draw on the tensors' device, which is the training case (the loop's
``step_generator`` lives on the accelerator).
"""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from lcm_kit.consistency import (
    ddim_timestep_grid,
    dynamic_threshold,
    edm_solver_step,
    guidance_scale_embedding,
    karras_sigmas,
    lcm_consistency_function,
    vp_solver_step,
)
from lcm_kit.lora import add_lcm_lora
from lcm_kit.pipelines import LCMPipeline
from lcm_kit.pipelines.pipeline_cm import CMPipeline
from lcm_kit.precond import ConsistencyModel, EDMDenoiser, VPDenoiser, batch_sigma
from lcm_kit.sampling import consistency_sample, edm_sample
from lcm_kit.schedulers import ConsistencyScheduler
from lcm_kit.schedulers.scheduling_cm import CMMultistepScheduler
from lcm_kit.testing import tiny_sd_components, tiny_unet
from lcm_kit.training.discriminator import TrainableDiscriminator
from lcm_kit.training.fused_lora import fused_lora_forward
from lcm_kit.training.losses import (
    ConsistencyLoss,
    EDMDenoisingLoss,
    LCMDistillationConfig,
    LCMDistillationLoss,
    sample_skip_timesteps,
)
from lcm_kit.utils import ema_update_

META = torch.device("meta")

# ----------------------------------------------------------------------------------------------------------------
# The audit
# ----------------------------------------------------------------------------------------------------------------

_MOVES = {torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.__setitem__}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray}


class DeviceMismatch(RuntimeError):
    pass


def _where() -> str:
    """The innermost lcm_kit frame of the current call (where a hazard comes from)."""
    frames = [f for f in traceback.extract_stack() if "/lcm_kit/" in f.filename.replace("\\", "/")]
    if not frames:
        return "<outside lcm_kit>"
    frame = frames[-1]
    return f"{frame.filename.split('lcm_kit')[-1].lstrip('/')}:{frame.lineno} in {frame.name}: {frame.line}"


class DeviceAudit(TorchFunctionMode):
    """Raises :class:`DeviceMismatch` on any op that mixes a meta tensor with a CPU tensor of ndim >= 1 (CUDA's
    device check, which meta skips for indexing) and records every host-to-device copy in ``host_to_device``."""

    def __init__(self):
        super().__init__()
        self.host_to_device: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        name = getattr(func, "__qualname__", repr(func))
        if func in _FACTORIES and torch.device(kwargs.get("device") or "cpu").type == "meta":
            self.host_to_device.append(f"{name} -> meta at {_where()}")
            return func(*args, **kwargs)
        if func in _MOVES or func in _INDEXING:
            out = func(*args, **kwargs)
            target = args[0] if func in (torch.Tensor.copy_, torch.Tensor.__setitem__) else out
            sources = tensors[1:] if func is not torch.Tensor.to else tensors[:1]
            if isinstance(target, torch.Tensor) and target.device.type == "meta":
                if any(t.device.type == "cpu" for t in sources):
                    self.host_to_device.append(f"{name} cpu -> meta at {_where()}")
            elif func is torch.Tensor.__getitem__ and any(t.device.type == "meta" for t in tensors[1:]):
                raise DeviceMismatch(f"{name}: a CPU tensor indexed with meta indices at {_where()}")
            return out
        devices = {t.device.type for t in tensors}
        if "meta" in devices:
            cpu = [tuple(t.shape) for t in tensors if t.device.type == "cpu" and t.ndim > 0]
            if cpu:
                raise DeviceMismatch(f"{name}: meta tensors mixed with CPU tensors of shapes {cpu} at {_where()}")
        return func(*args, **kwargs)


def assert_on_meta(*tensors):
    for tensor in tensors:
        assert isinstance(tensor, torch.Tensor) and tensor.device.type == "meta", (
            f"expected a meta tensor, got {type(tensor).__name__} on {getattr(tensor, 'device', None)}"
        )


def meta_randn(*shape):
    return torch.randn(*shape, device=META)


def small_unet2d(num_class_embeds=None, channels=3):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, layers_per_block=1,
                       norm_num_groups=8, num_class_embeds=num_class_embeds)


def test_the_audit_catches_what_cuda_would_refuse():
    """The tool itself can fail: a CPU table indexed by meta indices (meta returns a CPU tensor, CUDA raises), a CPU
    operand in an elementwise op, and a CPU -> meta copy are each caught; 0-dim CPU scalars pass as on CUDA."""
    table, index = torch.arange(10.0), torch.tensor([1, 2], device=META)
    with DeviceAudit(), pytest.raises(DeviceMismatch, match="indexed with meta"):
        table[index]
    assert table[index].device.type == "cpu"  # what the audit exists for: meta alone lets this through
    with DeviceAudit(), pytest.raises(DeviceMismatch, match="mixed with CPU"):
        meta_randn(2, 1) * torch.ones(1, 3)
    with DeviceAudit() as audit:
        meta_randn(2) * torch.tensor(3.0)
        torch.ones(2).to(META)
        torch.tensor([1.0], device=META)
    assert len(audit.host_to_device) == 2


def test_no_meta_generator_in_this_torch():
    """Why the sweep passes generator=None on meta. If torch grows meta generators, use them in the sweep."""
    with pytest.raises(RuntimeError):
        torch.Generator(device="meta")


# ----------------------------------------------------------------------------------------------------------------
# Math layer
# ----------------------------------------------------------------------------------------------------------------


def test_guidance_scale_embedding_stays_on_the_device_of_w():
    """The full-LCM student's w-embedding: its frequency table is built on w's device (a bare CPU arange times a
    (B, 1) CUDA tensor was a device error at the first step of train_lcm)."""
    for dim in (32, 33):
        with DeviceAudit() as audit:
            emb = guidance_scale_embedding(torch.rand(3, device=META) * 10, dim)
        assert_on_meta(emb)
        assert emb.shape == (3, dim) and emb.dtype == torch.float32
        assert not audit.host_to_device, audit.host_to_device


@pytest.mark.parametrize("solver", ["ddim", "euler", "heun"])
def test_vp_solver_step_on_meta(solver):
    alphas = DDPMScheduler().alphas_cumprod.to(META)
    x = meta_randn(2, 4, 8, 8)
    start, prev = torch.tensor([999, 500]).to(META), torch.tensor([979, 0]).to(META)
    with DeviceAudit() as audit:
        out = vp_solver_step(lambda sample, t: 0.5 * sample, x, start, prev, alphas, solver)
        boundary = lcm_consistency_function(x, out, prev, alphas)
    assert_on_meta(out, boundary)
    assert not audit.host_to_device, audit.host_to_device


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_edm_solver_step_and_thresholding_on_meta(solver):
    x = meta_randn(2, 3, 8, 8)
    sigma, sigma_next = torch.full((2,), 2.0, device=META), torch.full((2,), 1.0, device=META)
    with DeviceAudit() as audit:
        out = edm_solver_step(lambda sample, s: 0.5 * sample, x, sigma, sigma_next, solver)
        clipped = dynamic_threshold(out)
        grid = karras_sigmas(18, device=META)
    assert_on_meta(out, clipped, grid)
    assert not audit.host_to_device, audit.host_to_device


def test_preconditioning_and_denoisers_on_meta():
    x, labels = meta_randn(2, 3, 8, 8), torch.tensor([1, 2]).to(META)
    cm = ConsistencyModel(small_unet2d(10)).to(META)
    edm = EDMDenoiser(small_unet2d(10)).to(META)
    vp = VPDenoiser(small_unet2d(10), DDPMScheduler().alphas_cumprod).to(META)
    with DeviceAudit() as audit:
        outs = [m(x, sigma, labels) for m in (cm, edm, vp) for sigma in (3.0, torch.full((2,), 0.5, device=META))]
        per_sample = batch_sigma(2.5, x)
    assert_on_meta(*outs, per_sample)
    assert not audit.host_to_device, audit.host_to_device


# ----------------------------------------------------------------------------------------------------------------
# Training objectives (one batch: loss, backward, the target EMA)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, teacher, solver",
    [("cd", "vp", "heun"), ("cd", "edm", "euler"), ("ct", None, None), ("ict", None, None)],
)
def test_consistency_loss_on_meta(mode, teacher, solver):
    model = ConsistencyModel(small_unet2d(10)).to(META).train()
    denoiser = None
    if teacher == "vp":
        denoiser = VPDenoiser(small_unet2d(10), DDPMScheduler().alphas_cumprod).to(META)
    elif teacher == "edm":
        denoiser = EDMDenoiser(small_unet2d(10)).to(META)
    loss_fn = ConsistencyLoss(mode, 1000, teacher=denoiser, solver=solver)
    target = copy.deepcopy(model).requires_grad_(False) if loss_fn.uses_target_network else None
    clean, labels = meta_randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]).to(META)
    with DeviceAudit() as audit:
        out = loss_fn(model, clean, 600, target_model=target, class_labels=labels, generator=None)
        out.loss.mean().backward()
        if target is not None:
            ema_update_(target, model, loss_fn.target_ema_decay(600))
    assert_on_meta(out.loss, out.sigma, out.sigma_next)
    assert out.loss.shape == (4,)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
    assert not audit.host_to_device, audit.host_to_device


def test_consistency_loss_sigma_pairs_drawn_on_the_data_device():
    """The index draw happens on the generator's / data's device: no CPU round trip in the step."""
    for mode in ("cd", "ct", "ict"):
        loss_fn = ConsistencyLoss(mode, 1000, teacher=(lambda x, s, c=None: x) if mode == "cd" else None)
        with DeviceAudit() as audit:
            sigma, sigma_next = loss_fn.sample_sigma_pairs(500, 8, None, META)
        assert_on_meta(sigma, sigma_next)
        assert not audit.host_to_device, audit.host_to_device


def test_edm_denoising_loss_on_meta():
    denoiser = EDMDenoiser(small_unet2d()).to(META)
    with DeviceAudit() as audit:
        loss = EDMDenoisingLoss()(denoiser, meta_randn(2, 3, 8, 8))
        loss.mean().backward()
    assert_on_meta(loss)
    assert not audit.host_to_device, audit.host_to_device


@pytest.mark.parametrize("num_ddim_timesteps", [50, 10, 7])
def test_skip_timesteps_are_drawn_on_the_device_and_are_the_ddim_grid_points(num_ddim_timesteps):
    """The start timestep is computed from the drawn index where it was drawn ((i + 1) k - 1, no host grid copied
    per step) and is the same grid point, from the same draw, as indexing :func:`ddim_timestep_grid`."""
    config = LCMDistillationConfig(num_ddim_timesteps=num_ddim_timesteps)
    start, prev = sample_skip_timesteps(4000, config, torch.Generator().manual_seed(0))
    index = torch.randint(0, num_ddim_timesteps, (4000,), generator=torch.Generator().manual_seed(0))
    grid = torch.from_numpy(ddim_timestep_grid(1000, num_ddim_timesteps))
    assert torch.equal(start, grid[index]) and start.dtype == torch.int64
    assert set(start.tolist()) == set(grid.tolist())  # every grid point is drawn
    assert torch.equal(prev, (grid[index] - config.skip).clamp(min=0))
    with DeviceAudit() as audit:
        on_meta = sample_skip_timesteps(4, config, None, META)
    assert_on_meta(*on_meta)
    assert not audit.host_to_device, audit.host_to_device


@pytest.mark.parametrize("solver,rule", [("ddim", "lcm"), ("heun", "lcm"), ("heun", "pcm"), ("heun", "tcd")])
def test_lcm_distillation_loss_with_a_host_noise_schedule_and_device_latents(solver, rule):
    """The loss holds alphas_cumprod as built (on the CPU); indexing it with device timesteps is a device error on
    CUDA, so it moves the table (and PCM's phase edges) to the latents' device once. TCD's s is drawn there."""
    alphas = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    loss_fn = LCMDistillationLoss(alphas, LCMDistillationConfig(solver=solver, target_rule=rule, num_ddim_timesteps=10))

    def student(x, t, w):
        return 0.9 * x

    def teacher(x, t):
        return 0.8 * x, 0.7 * x

    with DeviceAudit() as audit:
        out = loss_fn(student, teacher, student, meta_randn(3, 4, 8, 8))
        again = loss_fn(student, teacher, student, meta_randn(3, 4, 8, 8))
    assert_on_meta(out.loss, out.prediction, out.target, out.w, again.loss, *out.timesteps)
    assert len(audit.host_to_device) == (2 if rule == "pcm" else 1), audit.host_to_device  # the tables, once


def objective_to_meta(objective):
    """Move every network and tensor the LCM objective holds to meta, as the trainer holds them on its device."""
    objective.uncond_embeds  # computed on the CPU first, as the trainer computes it on its device
    for module in (objective.unet, objective.vae, objective.text_encoder, objective.text_encoder_2,
                   objective.teacher_unet, objective.target_unet):
        if module is not None:
            module.to(META)
    objective.loss.alphas_cumprod = objective.loss.alphas_cumprod.to(META)
    if objective.loss.phase_edges is not None:
        objective.loss.phase_edges = objective.loss.phase_edges.to(META)
    if objective.scd_loss is not None:
        objective.scd_loss.alphas_cumprod = objective.scd_loss.alphas_cumprod.to(META)
    objective.prompts.to(META)
    objective.device = META
    return objective


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("cached", [True, False])
def test_lcm_objective_on_meta(lcm_objective, mode, cached, method="lcm"):
    """LCM-LoRA (fused adapter, teacher = the same UNet with the adapter off) and full LCM (w-embedding student,
    EMA target): one batch's loss, its backward and the EMA on meta. With cached latents and text embeddings the
    step makes no host-to-device copy; uncached, only the tokenizer's ids travel."""
    objective, _ = lcm_objective(mode, method=method, num_phases=2 if method == "pcm" else None)
    objective_to_meta(objective)
    if cached:  # what --cache_latents / --cache_text_embeddings batches hold: VAE posterior parameters, embeddings
        batch = {"latents": meta_randn(2, 8, 4, 4), "prompt_embeds": meta_randn(2, 77, 32)}
    else:
        batch = {"pixel_values": meta_randn(2, 3, 32, 32), "captions": ["a red cube", "a cat"]}
    model = objective.trainable_model()
    with DeviceAudit() as audit:
        loss, _ = objective.compute_loss(model, batch, 0, None)
        loss.backward()
        for module, decay in objective.averaged_models().values():
            ema_update_(module, model, decay(0))
    assert_on_meta(loss)
    assert loss.ndim == 0
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.device.type == "meta" for p in trained)
    if cached:
        assert not audit.host_to_device, audit.host_to_device
    else:
        assert audit.host_to_device and all(" in encode:" in h for h in audit.host_to_device), (
            audit.host_to_device)


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("method", ["pcm", "tcd"])
def test_pcm_and_tcd_objectives_on_meta(lcm_objective, mode, method):
    """The PCM and TCD target rules in both modes, cached batch: no host-to-device copy in the step."""
    test_lcm_objective_on_meta(lcm_objective, mode, True, method)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_scd_objective_on_meta(lcm_objective, mode):
    """sCD on the latent teacher (times snapped to its levels, guided teacher velocity, the JVP through the UNet at
    the fractional timestep), cached batch: no host-to-device copy in the step."""
    test_lcm_objective_on_meta(lcm_objective, mode, True, "scd")


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_pcm_objective_with_the_adversarial_loss_on_meta(lcm_objective, mode):
    """PCM's adversarial consistency loss (discriminator heads on the teacher's features, their own AdamW step inside
    compute_loss): cached batch, no host-to-device copy; the heads' new weights and the student's gradients on meta,
    the heads without a gradient from the student's loss."""
    objective, _ = lcm_objective(mode, method="pcm", num_phases=2, adversarial_weight=0.1,
                                 adversarial_learning_rate=1e-3)
    objective_to_meta(objective)
    # as the objective builds it: the heads moved to the device first, then their optimiser
    objective.discriminator = TrainableDiscriminator(objective.discriminator.heads.to(META), 1e-3, max_grad_norm=1.0)
    batch = {"latents": meta_randn(2, 8, 4, 4), "prompt_embeds": meta_randn(2, 77, 32)}
    model = objective.trainable_model()
    with DeviceAudit() as audit:
        loss, logs = objective.compute_loss(model, batch, 0, None)
        loss.backward()
    assert_on_meta(loss, logs["adversarial_d_loss"], logs["adversarial_g_loss"], *objective.discriminator.params)
    assert objective.discriminator.optimizer.state  # the heads stepped
    assert all(p.grad is None for p in objective.discriminator.params)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.device.type == "meta" for p in trained)
    assert not audit.host_to_device, audit.host_to_device


def test_full_lcm_objective_under_bf16_mixed_precision(lcm_objective, lcm_batch):
    """What meta cannot show: dtypes under autocast. Frozen teacher and text encoder in bf16, fp32 student with its
    w-embedding and EMA target, CPU bf16 autocast (the GPU check runs fp16 and bf16 on CUDA): a finite fp32 loss and
    finite fp32 gradients."""
    objective, _ = lcm_objective("full", mixed_precision="bf16")
    assert next(objective.teacher_unet.parameters()).dtype == torch.bfloat16
    model = objective.trainable_model()
    loss, _ = objective.compute_loss(model, lcm_batch(), 0, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("mode", ["cd", "ict"])
def test_consistency_loss_under_bf16_autocast_with_a_bf16_teacher(mode):
    """CMObjective's mixed-precision layout: fp32 online model, teacher network in bf16 (its noise schedule fp32),
    the loss under autocast."""
    model = ConsistencyModel(small_unet2d(10)).train()
    teacher = None
    if mode == "cd":
        teacher = VPDenoiser(small_unet2d(10), DDPMScheduler().alphas_cumprod)
        teacher.unet.to(torch.bfloat16)
    loss_fn = ConsistencyLoss(mode, 1000, teacher=teacher)
    target = copy.deepcopy(model).requires_grad_(False) if loss_fn.uses_target_network else None
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(model, clean, 600, target_model=target, class_labels=torch.tensor([0, 1, 2, 3]), generator=g)
    out.loss.mean().backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_fused_lora_forward_on_meta():
    unet = add_lcm_lora(tiny_unet("sd1"), 4, 8).to(META).train()
    x, t, embeds = meta_randn(2, 4, 16, 16), torch.tensor([999, 421]).to(META), meta_randn(2, 77, 32)
    with DeviceAudit() as audit, fused_lora_forward(unet):
        out = unet(x, t, encoder_hidden_states=embeds).sample
    out.sum().backward()
    assert_on_meta(out)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in unet.parameters() if p.requires_grad)
    assert not audit.host_to_device, audit.host_to_device


# ----------------------------------------------------------------------------------------------------------------
# Samplers, schedulers, pipelines
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps, solver", [(1, "heun"), (3, "heun"), (3, "euler")])
def test_edm_sample_on_meta(num_steps, solver):
    denoiser = EDMDenoiser(small_unet2d(10)).to(META)
    with DeviceAudit():
        out = edm_sample(denoiser, meta_randn(2, 3, 8, 8), num_steps, solver, class_labels=torch.tensor([1, 2]).to(META))
    assert_on_meta(out)


def test_consistency_sample_over_a_sigma_list_on_meta():
    unet = small_unet2d(10).to(META)
    with DeviceAudit() as audit:
        out = consistency_sample(unet, CMMultistepScheduler(), meta_randn(2, 3, 8, 8), sigmas=[80.0, 0.821],
                                 class_labels=torch.tensor([1, 2]).to(META))
    assert_on_meta(out)
    assert not [h for h in audit.host_to_device if "sampling.py" in h], audit.host_to_device


@pytest.mark.parametrize("num_inference_steps", [1, 2])
def test_consistency_sample_over_the_karras_grid_on_meta(num_inference_steps):
    unet = small_unet2d(10).to(META)
    with DeviceAudit() as audit:
        out = consistency_sample(unet, CMMultistepScheduler(), meta_randn(2, 3, 8, 8), num_inference_steps,
                                 class_labels=torch.tensor([1, 2]).to(META))
    assert_on_meta(out)
    assert not [h for h in audit.host_to_device if "sampling.py" in h], audit.host_to_device


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_consistency_scheduler_on_meta(gamma):
    scheduler = ConsistencyScheduler(gamma=gamma)
    scheduler.set_timesteps(4, device=META)
    assert_on_meta(scheduler.timesteps)
    sample = meta_randn(2, 4, 8, 8)
    with DeviceAudit():
        for t in scheduler.timesteps:
            out = scheduler.step(meta_randn(2, 4, 8, 8), t, sample)
            sample = out.prev_sample
    assert_on_meta(out.prev_sample, out.denoised)


@pytest.mark.parametrize("how", [{"num_inference_steps": 2}, {"sigmas": [80.0, 0.821]}])
def test_cm_multistep_scheduler_on_meta(how):
    scheduler = CMMultistepScheduler()
    scheduler.set_timesteps(device=META, **how)
    sample = meta_randn(2, 3, 8, 8)
    with DeviceAudit():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, t)
            out = scheduler.step(model_input, t, sample)
            sample = out.prev_sample
    assert_on_meta(out.prev_sample, out.denoised)


@pytest.mark.parametrize("distilled", [False, True])
def test_lcm_pipeline_to_latents_on_meta(distilled):
    components = tiny_sd_components("sd1", time_cond_proj_dim=32 if distilled else None)
    components["scheduler"] = ConsistencyScheduler.from_config(components["scheduler"].config)
    pipe = LCMPipeline(**components, requires_safety_checker=False).to(META)
    pipe.set_progress_bar_config(disable=True)
    with DeviceAudit():
        latents = pipe("a cat", num_inference_steps=2, guidance_scale=8.0 if distilled else 1.5, height=32,
                       width=32, output_type="latent").images
    assert_on_meta(latents)
    assert latents.shape == (1, 4, 16, 16)  # the tiny VAE downsamples by 2


def test_cm_pipeline_over_a_sigma_list_to_latents_on_meta():
    pipe = CMPipeline(unet=small_unet2d(10), scheduler=CMMultistepScheduler()).to(META)
    pipe.set_progress_bar_config(disable=True)
    with DeviceAudit():
        samples = pipe(batch_size=2, class_labels=[1, 2], sigmas=[80.0, 0.821], output_type="latent").images
    assert_on_meta(samples)
    assert samples.shape == (2, 3, 8, 8)


def test_cm_pipeline_to_latents_on_meta():
    pipe = CMPipeline(unet=small_unet2d(10), scheduler=CMMultistepScheduler()).to(META)
    pipe.set_progress_bar_config(disable=True)
    with DeviceAudit():
        samples = pipe(batch_size=2, class_labels=[1, 2], num_inference_steps=1, output_type="latent").images
    assert_on_meta(samples)
    assert samples.shape == (2, 3, 8, 8)


@pytest.mark.parametrize("mode", ["sct", "scd", "ect"])
def test_continuous_and_ect_losses_on_meta(mode):
    """sCT / sCD (the JVP through the UNet, the learned weighting) and ECT run with every tensor on the device."""
    from lcm_kit.precond import AdaptiveLossWeighting, TrigFlowConsistencyModel
    from lcm_kit.training.losses import ECTLoss, SCMLoss

    if mode == "ect":
        model, loss_fn = ConsistencyModel(small_unet2d(10)).to(META).train(), ECTLoss(1000)
    else:
        model = TrigFlowConsistencyModel(small_unet2d(10), loss_weighting=AdaptiveLossWeighting()).to(META).train()
        teacher = VPDenoiser(small_unet2d(10), DDPMScheduler().alphas_cumprod).to(META) if mode == "scd" else None
        loss_fn = SCMLoss(mode, teacher=teacher, tangent_warmup_steps=100)
    clean, labels = meta_randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]).to(META)
    with DeviceAudit() as audit:
        out = loss_fn(model, clean, 600, class_labels=labels, generator=None)
        out.loss.mean().backward()
    assert_on_meta(out.loss)
    assert out.loss.shape == (4,)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
    assert not audit.host_to_device, audit.host_to_device
