"""PCM and TCD distillation: the target-time rules against closed forms, and short runs whose adapters sample in stock
diffusers' ``TCDScheduler`` exactly as in lcm-kit.

Closed form (as in tests/test_lcm_distill.py): for data x0 ~ N(mu, s^2) per element the probability-flow ODE map
x_t -> x_{t'} is exact, so the ideal model of each rule (the network output whose DDIM map to s is the exact flow to
s) and each rule's target are known. The formulas are written out here independently of lcm_kit.consistency.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, TCDScheduler

from lcm_kit.consistency import lower_phase_edge, phase_edge_timesteps, target_timesteps, trajectory_map
from lcm_kit.training.losses import LCMDistillationConfig, LCMDistillationLoss, sample_skip_timesteps

MU, S = 0.3, 0.6
ALPHAS = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()


def _a(t):
    return ALPHAS[t].reshape(-1, 1, 1, 1)


def exact_x0(x, t):
    a = _a(t)
    return MU + a.sqrt() * S**2 / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)


def eps_output(x, t, x0):
    a = _a(t)
    return (x - a.sqrt() * x0) / (1 - a).sqrt()


def ode_flow(x, t, t_to):
    a, a_to = _a(t), _a(t_to)
    sig2, sig2_to = (1 - a) / a, (1 - a_to) / a_to
    return a_to.sqrt() * (MU + (x / a.sqrt() - MU) * ((S**2 + sig2_to) / (S**2 + sig2)).sqrt())


def ideal_output(x, t, s):
    """The epsilon output whose DDIM move x_t -> x_s (x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps(x0)) is the exact flow.

    x_s is affine in x0: x_s = x0 (sqrt(a_s) - sqrt(1 - a_s) sqrt(a_t) / sqrt(1 - a_t)) + sqrt((1 - a_s) / (1 - a_t)) x;
    where the x0 coefficient vanishes (s = t) any output maps x to itself and the exact denoiser is used."""
    a, a_s = _a(t), _a(s)
    coefficient = a_s.sqrt() - (1 - a_s).sqrt() * a.sqrt() / (1 - a).sqrt()
    rest = ((1 - a_s) / (1 - a)).sqrt() * x
    flow = ode_flow(x, t, s)
    safe = coefficient.abs() > 1e-9
    x0 = torch.where(safe, (flow - rest) / torch.where(safe, coefficient, torch.ones_like(coefficient)),
                     exact_x0(x, t))
    return eps_output(x, t, x0)


def exact_teacher(x, t):
    out = eps_output(x.double(), t, exact_x0(x.double(), t)).float()
    return out, out


def gaussian_latents(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (MU + S * torch.randn(n, 4, 2, 2, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("num_ddim_timesteps,num_phases", [(50, 4), (50, 1), (10, 4), (10, 2), (20, 3), (8, 8)])
def test_phase_edges_are_the_timesteps_of_a_stock_tcd_schedule(num_ddim_timesteps, num_phases):
    """The edges above 0 are exactly what stock TCDScheduler samples at num_phases steps on the same grid, so a PCM
    adapter walks its edges in diffusers with no custom timesteps."""
    edges = phase_edge_timesteps(num_phases, num_ddim_timesteps)
    stock = TCDScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         original_inference_steps=num_ddim_timesteps)
    stock.set_timesteps(num_phases)
    assert edges[0] == 0 and len(edges) == num_phases + 1 and edges == sorted(set(edges))
    assert edges[1:] == sorted(stock.timesteps.tolist())
    with pytest.raises(ValueError, match="num_phases"):
        phase_edge_timesteps(num_ddim_timesteps + 1, num_ddim_timesteps)


def test_pcm_rule_maps_each_pair_to_its_phase_and_never_crosses_an_edge():
    config = LCMDistillationConfig(num_ddim_timesteps=10, target_rule="pcm", num_phases=4)
    edges = torch.tensor(config.phase_edges)
    assert edges.tolist() == [0, 299, 499, 799, 999]
    start, prev = sample_skip_timesteps(5000, config, torch.Generator().manual_seed(0))
    clamped, s = target_timesteps("pcm", start, prev, config.skip, edges)
    for t, p, target in zip(start.tolist(), clamped.tolist(), s.tolist()):
        lower = max(e for e in edges.tolist() if e < t)
        assert target == lower and p == max(t - 100, lower)
    assert lower_phase_edge(torch.tensor([999, 800, 799, 400, 299, 99, 0]), edges).tolist() == [799, 799, 499, 299,
                                                                                                  0, 0, 0]


def test_tcd_rule_draws_s_uniformly_over_the_grid_points_at_or_below_the_target():
    """s ~ U{0, k - 1, 2k - 1, ..., t_n} (TCD's m ~ U[0, n]): every admissible value, each about equally often."""
    config = LCMDistillationConfig(num_ddim_timesteps=10)
    start = torch.full((40000,), 699)  # index 6: t_n = 599, seven choices
    prev = start - 100
    _, s = target_timesteps("tcd", start, prev, config.skip, generator=torch.Generator().manual_seed(0))
    values, counts = torch.unique(s, return_counts=True)
    assert values.tolist() == [0, 99, 199, 299, 399, 499, 599]
    assert (counts.double() / len(s) - 1 / 7).abs().max() < 0.01
    lowest = target_timesteps("tcd", torch.full((100,), 99), torch.zeros(100, dtype=torch.long), 100,
                              generator=torch.Generator().manual_seed(1))[1]
    assert lowest.eq(0).all()


def test_trajectory_map_is_the_identity_at_s_equal_t_and_the_tcd_schedulers_move():
    from lcm_kit.schedulers import TrajectoryConsistencyScheduler

    x, out = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    a = _a(torch.tensor([500, 500, 500]))
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        torch.testing.assert_close(trajectory_map(out, x, a, a, prediction_type), x)
    scheduler = TrajectoryConsistencyScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                               gamma=0.0)
    scheduler.set_timesteps(2)
    t, t_next = scheduler.timesteps.tolist()
    step = scheduler.step(out.float(), t, x.float()).prev_sample
    mapped = trajectory_map(out.float(), x.float(), scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t_next])
    torch.testing.assert_close(step, mapped, atol=0, rtol=0)


def _rule_loss(rule, seed, **config):
    config = LCMDistillationConfig(num_ddim_timesteps=10, solver="heun", loss_type="l2", target_rule=rule, **config)
    x0 = gaussian_latents(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    start, prev = sample_skip_timesteps(x0.shape[0], config, g)
    edges = torch.tensor(config.phase_edges) if rule == "pcm" else None
    prev, s = target_timesteps(rule, start, prev, config.skip, edges, g)
    noise = torch.randn(x0.shape, generator=g)
    w = torch.zeros(x0.shape[0])  # cond == uncond: the guided teacher is the exact one

    def ideal(x, t, w_):
        # both calls are batch-aligned: sample i maps to its own s (for PCM a function of t alone, the phase's edge)
        return ideal_output(x.double(), t, s).float()

    loss = LCMDistillationLoss(ALPHAS.float(), config)
    return loss(ideal, exact_teacher, ideal, x0, timesteps=(start, prev, s), noise=noise, w=w), (start, prev, s), \
        loss, x0, noise, w


@pytest.mark.parametrize("rule", ["pcm", "tcd"])
def test_training_target_is_the_exact_flow_to_s(rule):
    """With the exact teacher and the ideal model, the student side is the exact flow x_{t_{n+k}} -> x_s, the target
    is the exact flow x_hat_{t_n} -> x_s (x_hat itself where t_n = s), hence the exact flow from x_{t_{n+k}} up to the
    Heun step's error, and the ideal student's loss is far below that of a student mapping to the origin (LCM's s)."""
    out, (start, prev, s), loss, x0, noise, w = _rule_loss(rule, seed=2, num_phases=4)
    noisy = out.noisy_latents.double()
    torch.testing.assert_close(out.prediction.double(), ode_flow(noisy, start, s), atol=2e-4, rtol=0)
    torch.testing.assert_close(out.target.double(), ode_flow(out.solver_latents.double(), prev, s), atol=2e-4, rtol=0)
    at_s = prev == s
    assert at_s.any() and (~at_s).any()
    assert torch.equal(out.target[at_s], out.solver_latents[at_s])
    exact = ode_flow(noisy, start, s)
    assert (out.target.double() - exact).abs().mean() < 0.05 * (exact - noisy).abs().mean()  # Heun, k = 100

    def to_origin(x, t, w_):  # maps to s = 0 whatever the rule says: LCM's target time
        return ideal_output(x.double(), t, torch.zeros_like(t)).float()

    wrong = loss(to_origin, exact_teacher, to_origin, x0, timesteps=(start, prev, s), noise=noise, w=w)
    assert out.loss.mean() < 0.02 * wrong.loss.mean(), (out.loss.mean(), wrong.loss.mean())


def test_pcm_teacher_step_stops_at_the_edge():
    """A pair given across an edge (t_{n+k} = 549, t_n = 449 around the edge 499; on the skip grid the edges are grid
    points and only the last pair, 99 -> 0, touches one) is cut at the edge: the teacher step ends at 499."""
    config = LCMDistillationConfig(num_ddim_timesteps=10, solver="heun", target_rule="pcm", num_phases=4)
    x0 = gaussian_latents(64)
    start, prev = torch.full((64,), 549), torch.full((64,), 449)
    out = LCMDistillationLoss(ALPHAS.float(), config)(
        lambda x, t, w: exact_teacher(x, t)[0], exact_teacher, lambda x, t, w: exact_teacher(x, t)[0], x0,
        torch.Generator().manual_seed(0), timesteps=(start, prev), w=torch.zeros(64))
    assert out.timesteps[1].eq(499).all() and out.timesteps[2].eq(499).all()
    noisy = out.noisy_latents.double()
    to_edge = (out.solver_latents.double() - ode_flow(noisy, start, torch.full((64,), 499))).abs().mean()
    moved = (ode_flow(noisy, start, torch.full((64,), 499)) - noisy).abs().mean()
    assert to_edge < 0.02 * moved, (to_edge, moved)  # (stepping on to 449 would be off by about `moved`)
    torch.testing.assert_close(out.target, out.solver_latents, atol=0, rtol=0)  # t_n = s: the target is x_hat


@pytest.mark.parametrize("rule", ["pcm", "tcd"])
def test_the_target_carries_no_gradient_and_the_student_does(rule):
    config = LCMDistillationConfig(num_ddim_timesteps=10, target_rule=rule, num_phases=2)
    weight = torch.nn.Parameter(torch.tensor(0.9))
    loss = LCMDistillationLoss(ALPHAS.float(), config)
    x0 = gaussian_latents(32)
    out = loss(lambda x, t, w: weight * x, lambda x, t: (0.8 * x, 0.7 * x), lambda x, t, w: weight * x, x0,
               torch.Generator().manual_seed(0))
    assert out.prediction.requires_grad and not out.target.requires_grad
    out.loss.mean().backward()
    assert weight.grad is not None and weight.grad != 0


def test_lcm_rule_draws_and_losses_are_unchanged_by_the_rule_argument():
    """The default rule is LCM's, with the same random draws as before the rules existed."""
    x0 = gaussian_latents(16)
    fns = (lambda x, t, w: 0.9 * x, lambda x, t: (0.8 * x, 0.7 * x), lambda x, t, w: 0.85 * x)
    a = LCMDistillationLoss(ALPHAS.float(), LCMDistillationConfig())(*fns, x0, torch.Generator().manual_seed(0))
    b = LCMDistillationLoss(ALPHAS.float(), LCMDistillationConfig(target_rule="lcm"))(
        *fns, x0, torch.Generator().manual_seed(0))
    assert torch.equal(a.loss, b.loss) and a.timesteps[2].eq(0).all()


def test_config_rejects_bad_rules_and_phases():
    with pytest.raises(ValueError, match="target_rule"):
        LCMDistillationConfig(target_rule="dmd")
    with pytest.raises(ValueError, match="num_phases"):
        LCMDistillationConfig(num_ddim_timesteps=10, target_rule="pcm", num_phases=11)


# ---------------------------------------------------------------------------------------------------------------
# Short runs on the tiny kit: the adapters in stock diffusers
# ---------------------------------------------------------------------------------------------------------------


def _images(pipe, steps, **kwargs):
    return pipe(["a red square", "a blue circle"], num_inference_steps=steps, guidance_scale=1.0, height=32,
                width=32, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


@pytest.mark.parametrize("method,steps,eta", [("pcm", 2, 0.0), ("tcd", 4, 0.3)])
def test_pcm_and_tcd_adapters_sample_the_same_in_stock_tcd_scheduler(kit, tmp_path, train_argv, reset_accelerate,
                                                                     method, steps, eta):
    """A 4-step run with --method pcm (2 phases) or tcd: the adapter loads in stock StableDiffusionPipeline +
    TCDScheduler and gives the images LCMPipeline gives with the trained objective's own scheduler (PCM: gamma 0 over
    its phase edges, which are the stock scheduler's timesteps)."""
    from diffusers import StableDiffusionPipeline

    from lcm_kit.pipelines import LCMPipeline
    from lcm_kit.schedulers import TrajectoryConsistencyScheduler
    from lcm_kit.training.train_lcm_lora import main as train_lcm_lora

    out = tmp_path / method
    argv = train_argv(out, steps=4)[:-1] + ["--validation_prompts", "--learning_rate", "1e-3", "--lora_rank", "4",
                                            "--num_ddim_timesteps", "10", "--method", method]
    if method == "pcm":
        argv += ["--num_phases", "2"]
    reset_accelerate()
    result = train_lcm_lora(argv)
    scheduler = result.objective.inference_scheduler()
    assert type(scheduler) is TrajectoryConsistencyScheduler and scheduler.config.gamma == eta
    assert result.objective.args.validation_num_inference_steps == (2 if method == "pcm" else 4)  # PCM: its phases

    stock = StableDiffusionPipeline.from_pretrained(kit["sd1"], safety_checker=None, requires_safety_checker=False)
    stock.scheduler = TCDScheduler.from_config(stock.scheduler.config, original_inference_steps=10)
    stock.set_progress_bar_config(disable=True)
    without = _images(stock, steps, eta=eta)
    stock.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    stock_images = _images(stock, steps, eta=eta)
    if method == "pcm":
        stock.scheduler.set_timesteps(steps)
        assert sorted(stock.scheduler.timesteps.tolist()) == result.objective.config.phase_edges[1:]

    ours = LCMPipeline.from_pretrained(kit["sd1"], safety_checker=None, requires_safety_checker=False)
    ours.scheduler = scheduler
    ours.set_progress_bar_config(disable=True)
    ours.load_lora_weights(out / "pytorch_lora_weights.safetensors")
    np.testing.assert_allclose(_images(ours, steps), stock_images, atol=1e-5)
    assert np.abs(stock_images - without).max() > 1e-3


def test_bad_method_flags_are_refused(train_argv, tmp_path):
    from lcm_kit.training.train_lcm_lora import main as train_lcm_lora

    base = train_argv(tmp_path / "x")
    with pytest.raises(ValueError, match="--num_phases only applies to --method pcm"):
        train_lcm_lora(base + ["--num_phases", "2"])
    with pytest.raises(ValueError, match="--num_phases 60"):
        train_lcm_lora(base + ["--method", "pcm", "--num_phases", "60"])
    with pytest.raises(SystemExit):
        train_lcm_lora(base + ["--method", "dmd"])


def test_full_weight_pcm_folder_loads_in_stock_diffusers_with_tcd_scheduler(kit, tmp_path, train_argv,
                                                                              reset_accelerate):
    """--method pcm in full-weight mode: the saved folder names StableDiffusionPipeline (which feeds the w-embedding
    and passes eta to TCDScheduler) and TCDScheduler; stock DiffusionPipeline loads it and gives LCMPipeline's images
    (gamma 0 / eta 0 over the 2 phase edges, w = guidance - 1 through the embedding in both)."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from lcm_kit.pipelines import LCMPipeline
    from lcm_kit.schedulers import TrajectoryConsistencyScheduler
    from lcm_kit.training.train_lcm import main as train_lcm

    out = tmp_path / "full-pcm"
    argv = train_argv(out, steps=2)[:-1] + ["--validation_prompts", "--learning_rate", "1e-4", "--ema_decay", "0.5",
                                            "--unet_time_cond_proj_dim", "32", "--num_ddim_timesteps", "10",
                                            "--method", "pcm", "--num_phases", "2"]
    reset_accelerate()
    train_lcm(argv)
    stock = DiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert type(stock) is StableDiffusionPipeline and type(stock.scheduler) is TCDScheduler
    assert stock.unet.config.time_cond_proj_dim == 32
    stock.set_progress_bar_config(disable=True)
    ours = LCMPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert type(ours.scheduler) is TrajectoryConsistencyScheduler
    ours.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=["a red square"], num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
                  output_type="np")
    stock_images = stock(**kwargs, eta=0.0, generator=torch.Generator().manual_seed(0)).images
    ours_images = ours(**kwargs, gamma=0.0, generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(ours_images, stock_images, atol=1e-5)
    assert np.isfinite(stock_images).all()


@pytest.mark.parametrize("method", ["pcm", "tcd"])
def test_cards_of_pcm_and_tcd_models_show_the_tcd_scheduler(method):
    from lcm_kit.training.hub import render_model_card

    card = render_model_card("someone/base", "someone/adapter", True, ["train_lcm_lora.py", "--method", method],
                             method=method, num_phases=2 if method == "pcm" else None, num_ddim_timesteps=10)
    assert "TCDScheduler.from_config(pipe.scheduler.config, original_inference_steps=10)" in card
    assert "LCMScheduler" not in card and f"- {method}" in card
    assert ("num_inference_steps=2" in card and "eta=0.0" in card) if method == "pcm" else "eta=0.3" in card
    with pytest.raises(ValueError, match="method"):
        render_model_card("someone/base", "x", True, ["x"], method="dmd")


@pytest.mark.parametrize("gamma", ["0", "0.3"])
def test_generate_samples_pcm_and_tcd_models_with_the_tcd_scheduler(tmp_path, gamma):
    """`lcm-kit generate --scheduler tcd --gamma G --original_inference_steps 10` draws what LCMPipeline draws with
    TrajectoryConsistencyScheduler on that grid (the digits teacher, 2 steps)."""
    from PIL import Image

    from lcm_kit import digits
    from lcm_kit.cli import main
    from lcm_kit.pipelines import LCMPipeline
    from lcm_kit.schedulers import TrajectoryConsistencyScheduler

    out = tmp_path / "tcd.png"
    assert main(["generate", "--prompt", "a handwritten 7", "--scheduler", "tcd", "--gamma", gamma,
                 "--original_inference_steps", "10", "--num_inference_steps", "2", "--guidance_scale", "3",
                 "--device", "cpu", "--output", str(out)]) == 0
    pipe = LCMPipeline.from_pretrained(str(digits.teacher_path()))
    pipe.scheduler = TrajectoryConsistencyScheduler.from_config(pipe.scheduler.config, original_inference_steps=10)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a handwritten 7", num_inference_steps=2, guidance_scale=3.0, gamma=float(gamma),
                    generator=torch.Generator("cpu").manual_seed(0)).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
