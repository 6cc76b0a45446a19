"""Latent consistency distillation: the step against closed forms, and the objective on the tiny kit (in process).

Closed form used throughout: for data x0 ~ N(mu, s^2) (per element) and x_t = sqrt(a) x0 + sqrt(1 - a) eps,

* the exact denoiser is E[x0 | x_t] = mu + sqrt(a) s^2 / (a s^2 + 1 - a) (x_t - sqrt(a) mu);
* the probability-flow ODE keeps (x_t / sqrt(a) - mu) / sqrt(s^2 + sigma^2) constant (sigma^2 = (1 - a) / a),
  so the trajectory from t to t' and hence the ideal consistency function f(x_t, t) = Phi(x_t; t -> 0) are exact.

The formulas are written out here independently of lcm_kit.consistency.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lcm_kit.consistency import lcm_consistency_function as consistency_function
from lcm_kit.training.losses import LCMDistillationConfig, LCMDistillationLoss, sample_skip_timesteps
from lcm_kit.utils import ema_update_

MU, S = 0.3, 0.6
ALPHAS = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()


def lcm_distillation_loss(latents, noise, start, prev, w, student, teacher, target, alphas, config):
    """One LCD step with every draw given: ``student(x, t)`` / ``target(x, t)`` take no guidance weight here."""
    loss = LCMDistillationLoss(alphas, config)
    return loss(lambda x, t, w: student(x, t), teacher, lambda x, t, w: target(x, t), latents,
                timesteps=(start, prev), noise=noise, w=w)


def _a(t):
    return ALPHAS[t].reshape(-1, *([1] * 3))


def exact_x0(x, t):
    a = _a(t)
    return MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)


def exact_output(x, t, prediction_type, x0=None):
    """The model output of the exact teacher (or of any x0 prediction) under a prediction type."""
    a = _a(t)
    x0 = exact_x0(x, t) if x0 is None else x0
    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    return eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0


def ode_flow(x, t, t_to):
    """Exact PF-ODE map x_t -> x_{t_to} for Gaussian data."""
    a, a_to = _a(t), _a(t_to)
    sig2, sig2_to = (1 - a) / a, (1 - a_to) / a_to
    return a_to.sqrt() * (MU + (x / a.sqrt() - MU) * ((S**2 + sig2_to) / (S**2 + sig2)).sqrt())


def ideal_consistency_output(x, t, prediction_type, scaling=10.0):
    """The model output whose LCM-parameterised consistency function is the exact ODE endpoint Phi(x; t -> 0)."""
    target = ode_flow(x, t, torch.zeros_like(t))
    tt = (t.double() * scaling).reshape(-1, 1, 1, 1)
    c_skip, c_out = 0.25 / (tt**2 + 0.25), tt / (tt**2 + 0.25).sqrt()
    x0 = torch.where(c_out > 0, (target - c_skip * x) / c_out.clamp(min=1e-30), exact_x0(x, t))
    return exact_output(x, t, prediction_type, x0=x0)


def gaussian_latents(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (MU + S * torch.randn(n, 4, 2, 2, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_solver_step_converges_to_the_exact_ode_at_its_order(prediction_type):
    """The guided-teacher skip step vs the closed-form trajectory, for step sizes k = 40, 20, 10: DDIM == Euler (the
    same move for VP models) with local error O(k^2) (halving k divides it by ~4), Heun O(k^3) (~8)."""
    x0 = gaussian_latents()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    w = torch.full((x0.shape[0],), 3.0)

    def teacher(x, t):  # cond == uncond (both exact): the guidance weight leaves x0 unchanged
        out = exact_output(x.double(), t, prediction_type).float()
        return out, out

    def student(x, t):
        return teacher(x, t)[0]

    errors = {}
    for skip in (40, 20, 10):
        start = torch.full((x0.shape[0],), 499)
        for solver in ("ddim", "euler", "heun"):
            config = LCMDistillationConfig(prediction_type=prediction_type, solver=solver)
            out = lcm_distillation_loss(x0, noise, start, start - skip, w, student, teacher, student, ALPHAS.float(),
                                        config)
            exact = ode_flow(out.noisy_latents.double(), start, start - skip)
            errors[skip, solver] = (out.solver_latents.double() - exact).abs().mean().item()
            errors[skip, solver, "moved"] = (exact - out.noisy_latents.double()).abs().mean().item()
    for skip in (40, 20, 10):
        assert errors[skip, "euler"] == pytest.approx(errors[skip, "ddim"], rel=1e-2)
        assert errors[skip, "ddim"] < 0.05 * errors[skip, "ddim", "moved"]
        assert errors[skip, "heun"] < 0.2 * errors[skip, "ddim"]
    for big, small in ((40, 20), (20, 10)):
        assert 3.0 < errors[big, "ddim"] / errors[small, "ddim"] < 5.5, errors
        assert 6.0 < errors[big, "heun"] / errors[small, "heun"] < 12.0, errors


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("solver", ["ddim", "heun"])
def test_training_target_is_the_exact_consistency_function(prediction_type, solver):
    """With the exact teacher and the ideal consistency model as target network, the training target
    f_target(x_hat_{t_n}, t_n) equals the exact ODE endpoint Phi(x_{t_{n+k}}; -> 0) up to solver error; the ideal
    student's loss is ~0 while the teacher used as student (not a consistency function) has a large loss."""
    config = LCMDistillationConfig(prediction_type=prediction_type, solver=solver, loss_type="l2")
    x0 = gaussian_latents(seed=2)
    g = torch.Generator().manual_seed(3)
    start, prev = sample_skip_timesteps(x0.shape[0], config, g)
    assert set(prev.tolist()) <= set((start - 20).clamp(min=0).tolist())
    noise = torch.randn(x0.shape, generator=g)
    w = torch.rand(x0.shape[0], generator=g) * 10 + 5
    alphas = ALPHAS.float()

    def teacher(x, t):
        out = exact_output(x.double(), t, prediction_type).float()
        return out, out

    def ideal(x, t):
        return ideal_consistency_output(x.double(), t, prediction_type).float()

    out = lcm_distillation_loss(x0, noise, start, prev, w, ideal, teacher, ideal, alphas, config)
    endpoint = ode_flow(out.noisy_latents.double(), start, torch.zeros_like(start))
    torch.testing.assert_close(out.prediction.double(), endpoint, atol=2e-4, rtol=0)  # the parameterisation
    # The target is the ideal consistency function at the solver's point (exactly, up to float32)...
    at_solver_point = ode_flow(out.solver_latents.double(), prev, torch.zeros_like(prev))
    torch.testing.assert_close(out.target.double(), at_solver_point, atol=2e-4, rtol=0)
    # ...hence the exact endpoint up to the solver's error, far below the teacher-as-student error.
    wrong = lcm_distillation_loss(x0, noise, start, prev, w, lambda x, t: teacher(x, t)[0], teacher, ideal,
                                  alphas, config)
    target_error = (out.target.double() - endpoint).abs().mean()
    wrong_error = (wrong.prediction.double() - endpoint).abs().mean()
    assert target_error < (0.05 if solver == "ddim" else 0.005) * wrong_error, (target_error, wrong_error)
    assert out.loss.mean() < 1e-2 * wrong.loss.mean(), (out.loss, wrong.loss)


def test_guidance_uses_lcm_convention_in_x0_space():
    """x0 = cond + w (cond - uncond) with distinct cond/uncond teachers (checked through one DDIM step)."""
    config = LCMDistillationConfig(prediction_type="epsilon", solver="ddim")
    x0 = gaussian_latents(8, seed=4)
    start = torch.full((8,), 499)
    prev = start - 20
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    w = torch.linspace(5, 15, 8)
    shift = 0.2

    def teacher(x, t):
        cond = exact_output(x.double(), t, "epsilon").float()
        uncond = exact_output(x.double(), t, "epsilon", x0=exact_x0(x.double(), t) + shift).float()
        return cond, uncond

    out = lcm_distillation_loss(x0, noise, start, prev, w, lambda x, t: teacher(x, t)[0], teacher,
                                lambda x, t: teacher(x, t)[0], ALPHAS.float(), config)
    noisy = out.noisy_latents.double()
    guided_x0 = exact_x0(noisy, start) - w.double().reshape(-1, 1, 1, 1) * shift  # c + w (c - (c + shift))
    a_t, a_p = _a(start), _a(prev)
    eps = (noisy - a_t.sqrt() * guided_x0) / (1 - a_t).sqrt()
    torch.testing.assert_close(out.solver_latents.double(), a_p.sqrt() * guided_x0 + (1 - a_p).sqrt() * eps,
                               atol=1e-4, rtol=0)


def test_consistency_function_is_identity_at_zero_and_matches_the_scheduler():
    from lcm_kit.schedulers import ConsistencyScheduler

    sched = ConsistencyScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    alphas = sched.alphas_cumprod.float()
    x = torch.randn(3, 4, 2, 2)
    out = torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 0, 0])
    torch.testing.assert_close(consistency_function(out, x, t, alphas, "epsilon"), x)
    sched.set_timesteps(4)
    t = sched.timesteps[:1]
    ours = consistency_function(out[:1], x[:1], t.repeat(1), alphas, "epsilon")
    ref = sched.step(out[:1], t[0], x[:1]).denoised
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="solver"):
        LCMDistillationConfig(solver="rk4")
    with pytest.raises(ValueError, match="w_min"):
        LCMDistillationConfig(w_min=9, w_max=3)
    with pytest.raises(ValueError, match="prediction_type"):
        LCMDistillationConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="num_ddim_timesteps"):
        LCMDistillationConfig(num_ddim_timesteps=0)


# ---------------------------------------------------------------------------------------------------------------
# The objective on the tiny kit
# ---------------------------------------------------------------------------------------------------------------


def test_lora_teacher_is_the_base_with_the_adapter_disabled_in_one_batched_forward(lcm_objective, lcm_batch,
                                                                                   randomize_lora):
    """The LoRA objective keeps ONE UNet; the teacher's cond+uncond run as one forward of 2B through the base
    weights (== the original teacher, adapter off), and a DDIM step costs exactly 3 UNet calls."""
    from diffusers import UNet2DConditionModel

    from lcm_kit.testing import tiny_unet

    objective, _ = lcm_objective("lora")
    reference_teacher = tiny_unet("sd1")  # same seed as tiny_sd_components: the untouched teacher
    randomize_lora(objective.unet)
    unets = {id(m) for m in vars(objective).values() if isinstance(m, UNet2DConditionModel)}
    assert unets == {id(objective.unet)} and objective.teacher_unet is None

    calls = []
    original_forward = objective.unet.forward

    def spy(sample, timestep, encoder_hidden_states, **kwargs):
        out = original_forward(sample, timestep, encoder_hidden_states, **kwargs)
        calls.append((sample.detach().clone(), timestep.clone(), encoder_hidden_states.detach().clone(),
                      out.sample.detach().clone()))
        return out

    objective.unet.forward = spy
    batch = lcm_batch()
    loss, _ = objective.compute_loss(objective.unet, batch, 0, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert [c[0].shape[0] for c in calls] == [2, 4, 2]
    # which calls are the original teacher: only the batched one (adapter off); student and target run the adapter
    teacher_calls = []
    for x, t, embeds, out in calls:
        with torch.no_grad():
            expected = reference_teacher(x, t, encoder_hidden_states=embeds).sample
        teacher_calls.append(bool(torch.allclose(out, expected, atol=1e-5, rtol=1e-5)))
    assert teacher_calls == [False, True, False]
    torch.testing.assert_close(calls[1][2][2:], objective.uncond_embeds.expand(2, -1, -1))  # empty-prompt uncond half


def test_heun_costs_one_more_teacher_call(lcm_objective, lcm_batch):
    objective, _ = lcm_objective("lora", solver="heun")
    count = []
    forward = objective.unet.forward
    objective.unet.forward = lambda *a, **k: count.append(a[0].shape[0]) or forward(*a, **k)
    objective.compute_loss(objective.unet, lcm_batch(), 0, torch.Generator().manual_seed(0))
    assert count == [2, 4, 4, 2]


def test_lora_mixed_precision_keeps_frozen_base_low_precision_and_adapter_fp32(lcm_objective, lcm_batch):
    objective, _ = lcm_objective("lora", mixed_precision="bf16")
    dtypes = {(("lora_" in n), p.dtype) for n, p in objective.unet.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    assert all(p.requires_grad == ("lora_" in n) for n, p in objective.unet.named_parameters())
    assert next(objective.text_encoder.parameters()).dtype == torch.bfloat16
    loss, _ = objective.compute_loss(objective.unet, lcm_batch(), 0, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for n, p in objective.unet.named_parameters() if "lora_" in n]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_loss_decreases_on_a_fixed_batch(lcm_objective, lcm_batch):
    objective, _ = lcm_objective("lora", lora_rank=8)
    optimizer = torch.optim.AdamW([p for p in objective.unet.parameters() if p.requires_grad], lr=3e-3)
    batch = lcm_batch()
    losses = []
    for _ in range(25):
        loss, _ = objective.compute_loss(objective.unet, batch, 0, torch.Generator().manual_seed(0))  # same draws
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_full_student_starts_as_the_teacher_and_ema_target_follows(kind, lcm_objective, lcm_batch):
    """Full mode: the student has the w-embedding input, is initialised to the teacher exactly (zero guidance
    projection) and the EMA target moves by (1 - decay) toward it after each optimiser step."""
    objective, components = lcm_objective("full", kind=kind, ema_decay=0.9)
    assert objective.config.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    assert objective.unet.config.time_cond_proj_dim == 32 and objective.teacher_unet.config.time_cond_proj_dim is None
    g = torch.Generator().manual_seed(0)
    x, t, e = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999, 259]), torch.randn(2, 77, 32, generator=g)
    w_emb = torch.randn(2, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(objective.unet(x, t, e, timestep_cond=w_emb).sample,
                                   objective.teacher_unet(x, t, e).sample, atol=1e-5, rtol=1e-5)
    before = [p.detach().clone() for p in objective.target_unet.parameters()]
    optimizer = torch.optim.SGD(objective.unet.parameters(), lr=1e-2)
    loss, _ = objective.compute_loss(objective.unet, lcm_batch(), 0, torch.Generator().manual_seed(0))
    loss.backward()
    optimizer.step()
    (target, decay), = objective.averaged_models().values()  # what the loop updates after each optimiser step
    assert target is objective.target_unet and decay(0) == 0.9
    ema_update_(target, objective.unet, decay(0))
    for old, new, student in zip(before, objective.target_unet.parameters(), objective.unet.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * student.detach(), atol=1e-6, rtol=1e-6)
    assert any(not torch.equal(o, n) for o, n in zip(before, objective.target_unet.parameters()))


def test_checkpoint_state_round_trip_holds_only_what_is_trained(lcm_objective, randomize_lora):
    from lcm_kit.training.checkpoints import load_objective_state, objective_state

    objective, _ = lcm_objective("lora")
    randomize_lora(objective.unet, seed=1)
    state = {k: v.clone() for k, v in objective_state(objective, objective.unet).items()}
    assert state and all("lora_" in k for k in state)
    other, _ = lcm_objective("lora")
    load_objective_state(other, other.unet, state)
    for k, v in objective_state(other, other.unet).items():
        torch.testing.assert_close(v, state[k], atol=0, rtol=0)
    with pytest.raises(ValueError, match="missing"):
        load_objective_state(other, other.unet, {k: v for k, v in list(state.items())[1:]})


def test_cached_posterior_gives_the_same_loss_as_pixels(lcm_objective, lcm_batch):
    """``--cache_latents`` stores the VAE posterior; sampling it with the step generator reproduces the uncached
    step's latents, so cached and uncached training see the same data."""
    objective, _ = lcm_objective("lora")
    batch = lcm_batch()
    direct, _ = objective.compute_loss(objective.unet, batch, 0, torch.Generator().manual_seed(7))
    cached_batch = {"latents": objective.encode_images(batch["pixel_values"]),
                    **objective.encode_prompts(batch["captions"])}
    cached, _ = objective.compute_loss(objective.unet, cached_batch, 0, torch.Generator().manual_seed(7))
    torch.testing.assert_close(cached, direct, atol=1e-6, rtol=1e-5)


def test_cache_fingerprint_changes_with_the_encoders(lcm_objective):
    objective, _ = lcm_objective("lora")
    first = objective.cache_fingerprint()
    assert first == objective.cache_fingerprint()
    with torch.no_grad():
        next(objective.vae.parameters()).add_(1e-3)
    assert objective.cache_fingerprint() != first


def test_proportion_empty_prompts_replaces_captions_with_the_unconditional_embedding(lcm_objective, lcm_batch):
    objective, _ = lcm_objective("lora", proportion_empty_prompts=1.0)
    seen = []
    forward = objective.unet.forward
    objective.unet.forward = lambda s, t, **k: seen.append(k["encoder_hidden_states"].clone()) or forward(s, t, **k)
    objective.compute_loss(objective.unet, lcm_batch(), 0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen[0], objective.uncond_embeds.expand(2, -1, -1))


def test_the_distillation_target_carries_no_gradient():
    """The loss differentiates the student's side only: with student and target sharing a parameter, the gradient
    equals that of the distance to the *detached* target (computing the target with gradients would add the target
    branch's derivative and fail here)."""
    config = LCMDistillationConfig(prediction_type="epsilon", solver="ddim", loss_type="l2")
    x0 = gaussian_latents(16, seed=6)
    theta = torch.tensor(1.3, requires_grad=True)

    def teacher(x, t):
        out = exact_output(x.double(), t, "epsilon").float()
        return out, out

    def network(x, t, w):  # student and target: one shared parameter, not yet the ideal consistency model
        return theta * ideal_consistency_output(x.double(), t, "epsilon").float()

    out = LCMDistillationLoss(ALPHAS.float(), config)(network, teacher, network, x0, torch.Generator().manual_seed(7))
    assert not out.target.requires_grad and out.prediction.requires_grad
    from lcm_kit.consistency import consistency_distance

    reference = consistency_distance(out.prediction, out.target.detach(), "l2")
    (expected,) = torch.autograd.grad(reference, theta, retain_graph=True)
    (got,) = torch.autograd.grad(out.loss.mean(), theta)
    assert expected.abs() > 1e-4
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-6)


def test_lora_objective_runs_teacher_and_target_without_gradients(lcm_objective, lcm_batch, randomize_lora):
    objective, _ = lcm_objective("lora")
    randomize_lora(objective.unet)
    graphs = []
    forward = objective.unet.forward
    objective.unet.forward = lambda *a, **k: (lambda out: graphs.append(out.sample.requires_grad) or out)(forward(*a, **k))
    objective.compute_loss(objective.unet, lcm_batch(), 0, torch.Generator().manual_seed(0))
    assert graphs == [True, False, False]  # student, teacher (cond + uncond), target


def test_full_student_and_target_get_the_guidance_embedding_of_the_drawn_w(lcm_objective, lcm_batch):
    """The fully distilled LCM is conditioned on w through its embedding input, in the student and the target pass
    alike (the teacher has no such input): with w fixed to 7 both see guidance_scale_embedding(7)."""
    from lcm_kit.consistency import guidance_scale_embedding

    objective, _ = lcm_objective("full", w_min=7.0, w_max=7.0)
    seen = {}
    for name in ("unet", "target_unet", "teacher_unet"):
        module = getattr(objective, name)
        forward = module.forward
        module.forward = (lambda f, n: lambda *a, **k: (seen.__setitem__(n, k.get("timestep_cond")), f(*a, **k))[1])(
            forward, name)
    objective.compute_loss(objective.unet, lcm_batch(), 0, torch.Generator().manual_seed(0))
    expected = guidance_scale_embedding(torch.full((2,), 7.0), 32)
    for name in ("unet", "target_unet"):
        assert seen[name] is not None, f"the {name} pass got no guidance embedding"
        torch.testing.assert_close(seen[name], expected)
    assert seen["teacher_unet"] is None


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_says_it_is_emulated(native, tmp_path, caplog, monkeypatch,
                                                                reset_accelerate):
    from lcm_kit.training import loop
    from lcm_kit.training.args import build_lcm_lora_parser

    args = build_lcm_lora_parser().parse_args(["--pretrained_teacher_model", "tiny", "--dataset_name", "unused",
                                               "--output_dir", str(tmp_path), "--report_to", "none",
                                               "--mixed_precision", "bf16"])
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level("WARNING", logger="lcm_kit.training.loop"):
        loop.create_accelerator(args, cpu=True)
    assert ("emulated bf16 kernels" in caplog.text) is not native

