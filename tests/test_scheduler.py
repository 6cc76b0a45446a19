"""ConsistencyScheduler: exact parity with diffusers' LCMScheduler, gamma (TCD-style) behaviour, input checks;
TrajectoryConsistencyScheduler: exact parity with diffusers' TCDScheduler; both on a non-CPU (meta) device."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, PNDMScheduler, TCDScheduler

from lcm_kit.consistency import dynamic_threshold
from lcm_kit.schedulers import (
    ConsistencyScheduler,
    ConsistencySchedulerOutput,
    TrajectoryConsistencyScheduler,
    TrajectoryConsistencySchedulerOutput,
)
from lcm_kit.testing import HostTraffic, tiny_pipeline

SHAPE = (2, 4, 8, 8)
ATOL = 1e-6


def _rollout(scheduler, set_timesteps_kwargs, seed=0, gamma=None):
    """Runs a full sampling loop with a fake model (fixed random outputs that also depend on the sample).

    Returns (timesteps, [(prev_sample, denoised), ...]). The same seed gives both schedulers identical inputs.
    """
    scheduler.set_timesteps(**set_timesteps_kwargs)
    data_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1000)
    sample = torch.randn(SHAPE, generator=data_gen)
    outputs = []
    for t in scheduler.timesteps:
        model_output = 0.3 * sample + torch.randn(SHAPE, generator=data_gen)
        kwargs = {} if gamma is None else {"gamma": gamma}
        out = scheduler.step(model_output, t, sample, generator=noise_gen, **kwargs)
        outputs.append((out.prev_sample, out.denoised))
        sample = out.prev_sample
    return scheduler.timesteps.clone(), outputs


def _assert_close(actual, expected):
    assert actual.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def _assert_parity(config, set_timesteps_kwargs, skip_last_prev_sample=False):
    ours_t, ours = _rollout(ConsistencyScheduler(**config), set_timesteps_kwargs)
    ref_t, ref = _rollout(LCMScheduler(**config), set_timesteps_kwargs)
    assert torch.equal(ours_t, ref_t), (ours_t, ref_t)
    assert len(ours) == len(ref) > 0
    for i, ((prev, den), (ref_prev, ref_den)) in enumerate(zip(ours, ref)):
        _assert_close(den, ref_den)
        if not (skip_last_prev_sample and i == len(ours) - 1):
            _assert_close(prev, ref_prev)


PARITY_CONFIGS = {
    "default": {},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"trained_betas": np.linspace(1e-4, 2e-2, 1000).tolist()},
    "v_prediction": {"prediction_type": "v_prediction"},
    "sample": {"prediction_type": "sample"},
    "clip_sample": {"clip_sample": True, "clip_sample_range": 0.5},
    "thresholding": {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
    "thresholding_sample": {"thresholding": True, "prediction_type": "sample", "sample_max_value": 3.0},
    "set_alpha_to_one_false": {"set_alpha_to_one": False},
    "steps_offset": {"steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
    "linspace": {"timestep_spacing": "linspace"},
    "zero_snr_v": {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    "zero_snr_sample": {"rescale_betas_zero_snr": True, "prediction_type": "sample"},
    "original_25": {"original_inference_steps": 25},
    "original_100": {"original_inference_steps": 100},
    "train_500_cosine_v": {"num_train_timesteps": 500, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
    "timestep_scaling_5": {"timestep_scaling": 5.0},
    "sd1_pndm_config": dict(PNDMScheduler(beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1).config),
}


@pytest.mark.parametrize("name", sorted(PARITY_CONFIGS))
def test_parity_with_lcm_scheduler_1_to_8_steps(name):
    config = PARITY_CONFIGS[name]
    if name == "sd1_pndm_config":  # an SD pipeline's scheduler config, loaded both ways
        ours, ref = ConsistencyScheduler.from_config(config), LCMScheduler.from_config(config)
        lcm_keys = [k for k in inspect.signature(LCMScheduler.__init__).parameters if k != "self"]
        assert set(lcm_keys) < set(ours.config) and ours.config.steps_offset == 1
        config = {k: ours.config[k] for k in lcm_keys}
        assert config == {k: ref.config[k] for k in lcm_keys}
    for steps in range(1, 9):
        _assert_parity(config, {"num_inference_steps": steps})


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.75, 0.99])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_parity_with_strength(strength, steps):
    _assert_parity({}, {"num_inference_steps": steps, "strength": strength})


def test_parity_original_inference_steps_argument():
    for original in (10, 20, 50, 200):
        for steps in (1, 3, 8):
            _assert_parity({}, {"num_inference_steps": steps, "original_inference_steps": original})


CUSTOM_SCHEDULES = [
    [999],
    [999, 499],
    [999, 759, 499, 259],
    [999, 879, 759, 639, 499, 379, 259, 139],
    [999, 500, 20],  # off the grid (warned, as LCMScheduler does)
    [800, 400, 100, 0],  # ends at 0 and does not start at 999
]


@pytest.mark.parametrize("timesteps", CUSTOM_SCHEDULES, ids=str)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_parity_custom_timesteps(timesteps, prediction_type):
    config = {"prediction_type": prediction_type}
    _assert_parity(config, {"timesteps": timesteps})
    _assert_parity(config, {"timesteps": torch.tensor(timesteps)})
    _assert_parity(config, {"timesteps": np.array(timesteps)})


@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_custom_timesteps_with_strength(strength):
    """Same timesteps, noises and estimates as LCMScheduler; the last step returns `denoised`.

    LCMScheduler keeps `num_inference_steps` at the untruncated length, so on the last of the truncated custom
    timesteps it re-noises the estimate instead of returning it (its own "TODO"); we end as every schedule ends.
    """
    timesteps = [999, 879, 759, 639, 499, 379, 259, 139]
    _assert_parity({}, {"timesteps": timesteps, "strength": strength}, skip_last_prev_sample=True)
    _, ours = _rollout(ConsistencyScheduler(), {"timesteps": timesteps, "strength": strength})
    assert len(ours) == int(len(timesteps) * strength)
    assert torch.equal(ours[-1][0], ours[-1][1])


def test_timesteps_device_and_bookkeeping():
    ours, ref = ConsistencyScheduler(), LCMScheduler()
    for s in (ours, ref):
        s.set_timesteps(4, device="cpu")
    assert ours.timesteps.dtype == torch.long and ours.num_inference_steps == 4
    assert len(ours) == 1000 and ours.init_noise_sigma == 1.0 and ours.order == 1
    assert ours.step_index is None and ours.begin_index is None
    for t in ours.timesteps:
        assert int(ours.previous_timestep(t)) == int(ref.previous_timestep(t))
    assert int(ours.previous_timestep(ours.timesteps[-1])) == -1
    x = torch.randn(SHAPE)
    assert ours.scale_model_input(x, ours.timesteps[0]) is x
    ours.step(torch.randn(SHAPE), ours.timesteps[0], x)
    assert ours.step_index == 1
    # set_begin_index starts the loop at that index whatever the first timestep passed.
    ours.set_timesteps(4)
    ours.set_begin_index(2)
    assert ours.begin_index == 2
    out = ours.step(torch.randn(SHAPE), ours.timesteps[2], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2 and ours.step_index == 3


def test_step_accepts_python_int_timestep():
    ours, ref = ConsistencyScheduler(), LCMScheduler()
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    results = []
    for s in (ours, ref):
        s.set_timesteps(2)
        results.append(s.step(eps, int(s.timesteps[0]), x, generator=torch.Generator().manual_seed(3)))
    _assert_close(results[0].prev_sample, results[1].prev_sample)
    _assert_close(results[0].denoised, results[1].denoised)
    assert isinstance(results[0], ConsistencySchedulerOutput)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_lcm_and_keeps_dtype(dtype):
    x, eps = torch.randn(SHAPE).to(dtype), torch.randn(SHAPE).to(dtype)
    results = []
    for s in (ConsistencyScheduler(), LCMScheduler()):
        s.set_timesteps(4)
        results.append(s.step(eps, s.timesteps[1], x, generator=torch.Generator().manual_seed(3)))
    assert results[0].prev_sample.dtype == results[0].denoised.dtype == dtype
    assert torch.equal(results[0].prev_sample, results[1].prev_sample)
    assert torch.equal(results[0].denoised, results[1].denoised)
    gamma_half = ConsistencyScheduler(gamma=0.5)
    gamma_half.set_timesteps(4)
    assert gamma_half.step(eps, gamma_half.timesteps[1], x).prev_sample.dtype == dtype


def test_add_noise_get_velocity_and_boundary_scalings_match_lcm():
    ours, ref = ConsistencyScheduler(prediction_type="v_prediction"), LCMScheduler(prediction_type="v_prediction")
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = torch.tensor([999, 3])
    _assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    _assert_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t))
    for timestep in (0, 1, 19, 999, torch.tensor(259)):
        c_skip, c_out = ours.get_scalings_for_boundary_condition_discrete(timestep)
        ref_skip, ref_out = ref.get_scalings_for_boundary_condition_discrete(timestep)
        assert float(c_skip) == float(ref_skip) and float(c_out) == float(ref_out)
    assert ours.get_scalings_for_boundary_condition_discrete(0) == (1.0, 0.0)


def test_dynamic_threshold_matches_diffusers():
    x = 3 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ref = LCMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    out = dynamic_threshold(x, 0.9, 2.0)
    assert torch.equal(out, ref._threshold_sample(x))
    assert out.abs().max() <= 1.0 and not torch.equal(out, x.clamp(-1, 1))
    half = dynamic_threshold(x.half(), 0.9, 2.0)
    assert half.dtype == torch.float16


def test_config_round_trips(tmp_path):
    ours = ConsistencyScheduler(prediction_type="v_prediction", gamma=0.3, original_inference_steps=25)
    lcm = LCMScheduler.from_config(ours.config)
    assert lcm.config.prediction_type == "v_prediction" and lcm.config.original_inference_steps == 25
    back = ConsistencyScheduler.from_config(lcm.config)
    assert back.config.prediction_type == "v_prediction" and back.config.original_inference_steps == 25
    assert ConsistencyScheduler.from_config(LCMScheduler().config).config.gamma == 1.0
    ours.save_pretrained(tmp_path)
    loaded = ConsistencyScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert loaded.config.gamma == 0.3 and public(loaded.config) == public(ours.config)
    # Every SD-family scheduler config loads, and ours is listed as compatible with theirs.
    for cls in (DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, LCMScheduler):
        assert isinstance(ConsistencyScheduler.from_config(cls().config), ConsistencyScheduler)
        assert cls.__name__ in ConsistencyScheduler._compatibles
    assert LCMScheduler in ours.compatibles and DDIMScheduler in ours.compatibles


# ----------------------------------------------------------------------------------------------------------------
# gamma
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_gamma_one_is_lcm(steps):
    """gamma=1 passed in the config or per step is exactly LCMScheduler."""
    _, ref = _rollout(LCMScheduler(), {"num_inference_steps": steps})
    _, from_config = _rollout(ConsistencyScheduler(gamma=1.0), {"num_inference_steps": steps})
    _, per_step = _rollout(ConsistencyScheduler(gamma=0.0), {"num_inference_steps": steps}, gamma=1.0)
    for ours in (from_config, per_step):
        assert len(ours) == len(ref) == steps
        for (prev, den), (ref_prev, ref_den) in zip(ours, ref):
            _assert_close(prev, ref_prev)
            _assert_close(den, ref_den)


def _hand_ddim_step(scheduler, model_output, sample, t, t_prev):
    """The gamma=0 step computed from the formulas (epsilon prediction, no clipping)."""
    a_t = scheduler.alphas_cumprod[t].double()
    a_prev = scheduler.alphas_cumprod[t_prev].double()
    scaled = 10.0 * t
    c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / math.sqrt(scaled**2 + 0.25)
    x, e = sample.double(), model_output.double()
    x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
    denoised = c_skip * x + c_out * x0
    eps = (x - a_t.sqrt() * denoised) / (1 - a_t).sqrt()
    return a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * eps, denoised


def test_gamma_zero_is_deterministic_ddim():
    scheduler = ConsistencyScheduler(gamma=0.0)
    scheduler.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(SHAPE, generator=gen)
    ts = scheduler.timesteps.tolist()
    for i, t in enumerate(ts):
        model_output = torch.randn(SHAPE, generator=gen)
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        state = g1.get_state()
        scheduler._step_index = i
        out1 = scheduler.step(model_output, t, sample, generator=g1)
        scheduler._step_index = i
        out2 = scheduler.step(model_output, t, sample, generator=g2)
        assert torch.equal(g1.get_state(), state), "gamma=0 must not draw noise"
        assert torch.equal(out1.prev_sample, out2.prev_sample)
        if i + 1 < len(ts):
            expected_prev, expected_denoised = _hand_ddim_step(scheduler, model_output, sample, t, ts[i + 1])
            torch.testing.assert_close(out1.prev_sample.double(), expected_prev, atol=1e-5, rtol=0)
        else:
            assert torch.equal(out1.prev_sample, out1.denoised)
            _, expected_denoised = _hand_ddim_step(scheduler, model_output, sample, t, t)
        torch.testing.assert_close(out1.denoised.double(), expected_denoised, atol=1e-5, rtol=0)
        sample = out1.prev_sample
    # A whole gamma=0 rollout does not depend on the generator.
    _, a = _rollout(ConsistencyScheduler(gamma=0.0), {"num_inference_steps": 4}, seed=5)
    scheduler = ConsistencyScheduler(gamma=0.0)
    scheduler.set_timesteps(4)
    gen = torch.Generator().manual_seed(5)
    sample = torch.randn(SHAPE, generator=gen)
    for t, (prev, _) in zip(scheduler.timesteps, a):
        model_output = 0.3 * sample + torch.randn(SHAPE, generator=gen)
        sample = scheduler.step(model_output, t, sample, generator=None).prev_sample
        assert torch.equal(sample, prev)


def test_gamma_zero_keeps_the_predicted_noise():
    """Without boundary scaling an epsilon model's gamma=0 step is textbook DDIM: x0 from e, then e re-used."""
    scheduler = ConsistencyScheduler(gamma=0.0, timestep_scaling=1e4)  # c_skip ~ 1e-15, c_out = 1: denoised = x0
    scheduler.set_timesteps(timesteps=[999, 999 - 1])
    x, e = torch.randn(SHAPE), torch.randn(SHAPE)
    out = scheduler.step(e, 999, x)
    a_t, a_prev = scheduler.alphas_cumprod[999], scheduler.alphas_cumprod[998]
    # For an epsilon model without boundary scaling, DDIM keeps the predicted noise: eps stays e.
    expected = a_prev.sqrt() * (x - (1 - a_t).sqrt() * e) / a_t.sqrt() + (1 - a_prev).sqrt() * e
    torch.testing.assert_close(out.prev_sample, expected, atol=1e-5, rtol=0)


def test_intermediate_gamma_is_between_ddim_and_lcm():
    """prev = sqrt(a_prev) denoised + B eps + C z with B^2 + C^2 = 1 - a_prev; B falls and C rises with gamma."""
    gen = torch.Generator().manual_seed(0)
    sample, model_output = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    coefficients = []
    for gamma in (0.0, 0.2, 0.5, 0.8, 0.97, 1.0):
        scheduler = ConsistencyScheduler(gamma=gamma)
        scheduler.set_timesteps(4)
        t, t_prev = scheduler.timesteps[:2].tolist()
        out = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(7))
        assert torch.isfinite(out.prev_sample).all()
        a_t, a_prev = scheduler.alphas_cumprod[t].double(), scheduler.alphas_cumprod[t_prev].double()
        denoised = out.denoised.double()
        eps = (sample.double() - a_t.sqrt() * denoised) / (1 - a_t).sqrt()
        residual = (out.prev_sample.double() - a_prev.sqrt() * denoised).flatten()
        basis = torch.stack([eps.flatten(), z.double().flatten()], dim=1)
        b, c = torch.linalg.lstsq(basis, residual[:, None]).solution[:, 0]
        fit = basis @ torch.stack([b, c])
        assert (fit - residual).abs().max() < 1e-5
        # The TCD coefficients at s = floor((1 - gamma) t_prev) (s = 0 counts as clean).
        s = math.floor((1 - gamma) * t_prev)
        a_s = 1.0 if s == 0 else scheduler.alphas_cumprod[s].double()
        expected_b = (a_prev / a_s).sqrt() * (1 - a_s) ** 0.5 if s < t_prev else (1 - a_prev).sqrt()
        expected_c = (1 - a_prev / a_s).sqrt() if s < t_prev else 0.0
        assert abs(float(b) - float(expected_b)) < 1e-4 and abs(float(c) - float(expected_c)) < 1e-4
        assert abs(float(b) ** 2 + float(c) ** 2 - float(1 - a_prev)) < 1e-4
        coefficients.append((float(b), float(c)))
    bs, cs = zip(*coefficients)
    assert all(x > y for x, y in zip(bs, bs[1:])) and all(x < y for x, y in zip(cs, cs[1:]))
    assert cs[0] == pytest.approx(0, abs=1e-6) and bs[-1] == pytest.approx(0, abs=1e-6)


def test_intermediate_gamma_rollout_is_finite_and_seeded():
    for gamma in (0.1, 0.5, 0.9):
        _, a = _rollout(ConsistencyScheduler(gamma=gamma), {"num_inference_steps": 8}, seed=3)
        _, b = _rollout(ConsistencyScheduler(gamma=gamma), {"num_inference_steps": 8}, seed=3)
        for (pa, da), (pb, db) in zip(a, b):
            assert torch.isfinite(pa).all() and torch.isfinite(da).all()
            assert torch.equal(pa, pb) and torch.equal(da, db)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_inference_steps": 0}, r"num_inference_steps.*\[1, 50\]"),
        ({"num_inference_steps": 51}, r"num_inference_steps.*\[1, 50\]"),
        ({"num_inference_steps": 9, "original_inference_steps": 8}, r"num_inference_steps.*\[1, 8\]"),
        ({"num_inference_steps": 4, "original_inference_steps": 0}, r"original_inference_steps.*\[1, 1000\]"),
        ({"num_inference_steps": 4, "original_inference_steps": 1001}, r"original_inference_steps.*\[1, 1000\]"),
        ({"num_inference_steps": 4, "timesteps": [999, 499]}, r"exactly one of `num_inference_steps` or `timesteps`"),
        ({}, r"exactly one of `num_inference_steps` or `timesteps`; got neither"),
        ({"timesteps": [499, 999]}, r"`timesteps` must be strictly descending"),
        ({"timesteps": [999, 499, 499]}, r"`timesteps` must be strictly descending"),
        ({"timesteps": [1000, 499]}, r"`timesteps` must lie in \[0, num_train_timesteps=1000\)"),
        ({"timesteps": [999, -1]}, r"`timesteps` must lie in \[0, num_train_timesteps=1000\)"),
        ({"timesteps": []}, r"`timesteps` must be a non-empty"),
        ({"timesteps": [999.5, 10]}, r"`timesteps` must be integers"),
        ({"num_inference_steps": 4, "strength": 0.0}, r"`strength` must be in \(0, 1\]"),
        ({"num_inference_steps": 4, "strength": 1.5}, r"`strength` must be in \(0, 1\]"),
        ({"num_inference_steps": 4, "strength": -0.1}, r"`strength` must be in \(0, 1\]"),
        ({"num_inference_steps": 4, "strength": 0.05}, r"`strength`=0.05 leaves .* use strength >= 0.08"),
        ({"num_inference_steps": 1, "strength": 0.01}, r"`strength`=0.01 leaves int\(50 \* 0.01\) = 0"),
        ({"timesteps": [999, 499], "strength": 0.4}, r"`strength`=0.4 keeps .* = 0 .* strength >= 0.5"),
    ],
)
def test_set_timesteps_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsistencyScheduler().set_timesteps(**kwargs)


def test_set_timesteps_rejects_non_int_steps():
    with pytest.raises(TypeError, match=r"num_inference_steps.*int"):
        ConsistencyScheduler().set_timesteps(4.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gamma": 1.5}, r"`gamma` must be a number in \[0, 1\]"),
        ({"gamma": -0.1}, r"`gamma` must be a number in \[0, 1\]"),
        ({"prediction_type": "x0"}, r"`prediction_type` must be one of \['epsilon', 'v_prediction', 'sample'\]"),
        ({"beta_schedule": "cosine"}, r"`beta_schedule` must be one of \['linear', 'scaled_linear', 'squaredcos_cap_v2'\]"),
        ({"timestep_spacing": "uniform"}, r"`timestep_spacing` must be one of \['leading', 'trailing', 'linspace'\]"),
        ({"original_inference_steps": 0}, r"`original_inference_steps` must be in \[1, 1000\]"),
    ],
)
def test_constructor_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsistencyScheduler(**kwargs)


def test_step_rejects_bad_use():
    scheduler = ConsistencyScheduler()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"`step\(\)` was called before `set_timesteps\(\)`"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match=r"`gamma` must be a number in \[0, 1\]"):
        scheduler.step(x, 999, x, gamma=2.0)
    with pytest.raises(ValueError, match=r"`timestep` 998 is not in the current schedule \[999, 499\]"):
        scheduler.step(x, 998, x)
    scheduler.step(x, 999, x)
    scheduler.step(x, 499, x)
    with pytest.raises(ValueError, match=r"schedule has 2 timesteps; call `set_timesteps"):
        scheduler.step(x, 499, x)


# ----------------------------------------------------------------------------------------------------------------
# trained_betas of any length (as LCMScheduler / TCDScheduler accept them)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ConsistencyScheduler, TrajectoryConsistencyScheduler])
def test_trained_betas_of_any_length_are_accepted_and_checked_where_used(cls, tmp_path):
    short = cls(trained_betas=np.array([0.1, 0.3]))
    assert short.betas.tolist() == LCMScheduler(trained_betas=np.array([0.1, 0.3])).betas.tolist()
    short.save_pretrained(tmp_path)
    assert cls.from_pretrained(tmp_path).betas.tolist() == short.betas.tolist()
    # 2 betas cannot serve timestep 999: said at set_timesteps, not as an IndexError part-way through sampling.
    with pytest.raises(ValueError, match=r"`trained_betas` holds 2 betas, but the schedule .* timesteps up to 999"):
        short.set_timesteps(4)
    with pytest.raises(ValueError, match=r"`trained_betas` holds 2 betas"):
        short.set_timesteps(timesteps=[5, 1])
    # Shorter and longer than num_train_timesteps, every sample equals the diffusers scheduler's.
    reference = LCMScheduler if cls is ConsistencyScheduler else TCDScheduler
    for config, kwargs in [
        ({"num_train_timesteps": 2, "original_inference_steps": 2, "trained_betas": [0.1, 0.3]},
         {"num_inference_steps": 2}),
        ({"trained_betas": np.linspace(1e-4, 2e-2, 1200)}, {"num_inference_steps": 4}),
        ({"trained_betas": np.linspace(1e-4, 2e-2, 400)}, {"timesteps": [399, 199, 99]}),
    ]:
        ours_t, ours = _rollout(cls(**config), kwargs)
        ref_t, ref = _rollout(reference(**config), kwargs) if cls is ConsistencyScheduler else _tcd_rollout(
            reference(**config), kwargs, 0.3)
        assert torch.equal(ours_t, ref_t) and len(ours) == len(ref)
        for (prev, den), (ref_prev, ref_den) in zip(ours, ref):
            _assert_close(prev, ref_prev)
            _assert_close(den, ref_den)


# ----------------------------------------------------------------------------------------------------------------
# TrajectoryConsistencyScheduler: exactly TCDScheduler
# ----------------------------------------------------------------------------------------------------------------


def _tcd_rollout(scheduler, set_timesteps_kwargs, eta, seed=0):
    """`_rollout` through TCDScheduler's step signature (`eta` 4th); the noise generator's final state is left in
    `scheduler._test_noise_state` for the random-draw check."""
    scheduler.set_timesteps(**set_timesteps_kwargs)
    data_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1000)
    sample = torch.randn(SHAPE, generator=data_gen)
    outputs = []
    for t in scheduler.timesteps:
        model_output = 0.3 * sample + torch.randn(SHAPE, generator=data_gen)
        out = scheduler.step(model_output, t, sample, eta, noise_gen)  # positional, as TCDScheduler's tests call it
        outputs.append((out.prev_sample, out.pred_noised_sample))
        sample = out.prev_sample
    scheduler._test_noise_state = noise_gen.get_state()
    return scheduler.timesteps.clone(), outputs


TCD_CONFIGS = {
    "default": {},
    "v_prediction": {"prediction_type": "v_prediction"},
    "sample": {"prediction_type": "sample"},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "zero_snr_v": {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    "original_25": {"original_inference_steps": 25},
    "train_500_cosine": {"num_train_timesteps": 500, "beta_schedule": "squaredcos_cap_v2"},
    "sdxl_euler_config": dict(EulerDiscreteScheduler(beta_schedule="scaled_linear", steps_offset=1).config),
}
TCD_SCHEDULES = (
    [{"num_inference_steps": n} for n in range(1, 9)]
    + [{"num_inference_steps": n, "strength": s} for n in (1, 2, 4) for s in (0.3, 0.5, 0.99)]
    + [{"timesteps": ts} for ts in ([999], [999, 499], [999, 759, 499, 259], [999, 500, 20], [100, 87, 50, 1, 0])]
    # t_prev where float32 (TCDScheduler's tensor math) and float64 floor((1 - 0.3) t_prev) differ: 700, 340, 90.
    + [{"timesteps": [999, 700, 340, 90, 0]}]
    + [{"timesteps": [999, 879, 759, 639, 499, 379, 259, 139], "strength": s} for s in (0.5, 0.75)]
    # An explicit original_inference_steps argument: TCDScheduler then picks from every training timestep.
    + [{"num_inference_steps": 4, "original_inference_steps": 50},
       {"num_inference_steps": 3, "original_inference_steps": 20, "strength": 0.6}]
)


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("name", sorted(TCD_CONFIGS))
def test_parity_with_tcd_scheduler(name, eta):
    config = TCD_CONFIGS[name]
    if name == "sdxl_euler_config":  # a pipeline's scheduler config, switched to TCD both ways
        ref_scheduler = TCDScheduler.from_config(config)
        ours = TrajectoryConsistencyScheduler.from_config(config)
        config = {k: v for k, v in ours.config.items() if not k.startswith("_")}
        config.pop("gamma")
        assert all(ref_scheduler.config[k] == v for k, v in config.items())
    for kwargs in TCD_SCHEDULES:
        if config.get("num_train_timesteps", 1000) == 500 and "timesteps" in kwargs and kwargs["timesteps"][0] >= 500:
            continue
        ours_scheduler, ref_scheduler = TrajectoryConsistencyScheduler(**config), TCDScheduler(**config)
        ours_t, ours = _tcd_rollout(ours_scheduler, kwargs, eta)
        ref_t, ref = _tcd_rollout(ref_scheduler, kwargs, eta)
        assert torch.equal(ours_t, ref_t), (kwargs, ours_t, ref_t)
        assert len(ours) == len(ref) > 0
        for (prev, den), (ref_prev, ref_den) in zip(ours, ref):
            _assert_close(prev, ref_prev)
            _assert_close(den, ref_den)
        # The same random draws: the generator ends in the same state (a second loop would match too).
        assert torch.equal(ours_scheduler._test_noise_state, ref_scheduler._test_noise_state), kwargs


def test_tcd_mode_is_not_the_lcm_gamma_mix():
    """What the exact mode fixes: lcm-kit's LCM-mode gamma ends at the clean x0 (and applies LCM's boundary
    conditions); TCD ends at timestep 0 (alphas_cumprod[0]), so the two differ and only the TCD class matches."""
    for eta in (0.0, 0.3, 1.0):
        _, mix = _rollout(ConsistencyScheduler(gamma=eta), {"num_inference_steps": 4})
        _, tcd = _tcd_rollout(TrajectoryConsistencyScheduler(), {"num_inference_steps": 4}, eta)
        _, ref = _tcd_rollout(TCDScheduler(), {"num_inference_steps": 4}, eta)
        assert (mix[-1][0] - ref[-1][0]).abs().max() > 1e-3
        assert torch.equal(tcd[-1][0], ref[-1][0])


@pytest.mark.parametrize("kind", ["sdxl", "sd1"])
def test_tcd_drop_in_in_a_stock_pipeline_keeps_the_images(kind):
    """A TCD user swaps TCDScheduler for ours (from_config) and keeps calling the pipeline with `eta=`."""
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config
    images = []
    for scheduler in (TCDScheduler.from_config(base_config), TrajectoryConsistencyScheduler.from_config(base_config)):
        pipe.scheduler = scheduler
        for eta in (0.3, 1.0):
            out = pipe("a digit", num_inference_steps=4, guidance_scale=1.0, eta=eta, height=32, width=32,
                       generator=torch.Generator().manual_seed(0), output_type="pt")
            images.append(out.images)
    for ref, ours in zip(images[:2], images[2:]):
        assert torch.equal(ours, ref)
    assert (images[0] - images[1]).abs().max() > 1e-3  # eta reached the scheduler


def test_tcd_config_round_trips_and_output(tmp_path):
    ref = TCDScheduler(prediction_type="v_prediction", original_inference_steps=25, timestep_scaling=5.0)
    ours = TrajectoryConsistencyScheduler.from_config(ref.config)
    assert isinstance(ours, TrajectoryConsistencyScheduler) and ours.config.gamma == 0.3  # TCDScheduler.step's eta
    tcd_keys = [k for k in inspect.signature(TCDScheduler.__init__).parameters if k != "self"]
    assert {k: ours.config[k] for k in tcd_keys} == {k: ref.config[k] for k in tcd_keys}
    back = TCDScheduler.from_config(TrajectoryConsistencyScheduler(gamma=0.7, prediction_type="sample").config)
    assert isinstance(back, TCDScheduler) and back.config.prediction_type == "sample"
    assert "TCDScheduler" in TrajectoryConsistencyScheduler._compatibles
    ours = TrajectoryConsistencyScheduler(gamma=0.7)
    ours.save_pretrained(tmp_path)
    assert TrajectoryConsistencyScheduler.from_pretrained(tmp_path).config.gamma == 0.7
    # The output has TCD's fields; `denoised` (ConsistencySchedulerOutput's name) is the same tensor.
    ours.set_timesteps(2)
    x = torch.randn(SHAPE)
    out = ours.step(torch.randn(SHAPE), ours.timesteps[0], x)
    assert isinstance(out, TrajectoryConsistencySchedulerOutput) and out.denoised is out.pred_noised_sample
    # gamma (lcm-kit's name, what LCMPipeline passes) is eta.
    results = []
    for kwargs in ({"eta": 0.5}, {"gamma": 0.5}):
        ours.set_timesteps(2)
        results.append(ours.step(torch.ones(SHAPE), 999, x, generator=torch.Generator().manual_seed(0), **kwargs))
    assert torch.equal(results[0].prev_sample, results[1].prev_sample)


@pytest.mark.parametrize("kwargs, match", [
    ({"eta": 1.5}, r"`eta` must be a number in \[0, 1\]"),
    ({"eta": -0.1}, r"`eta` must be a number in \[0, 1\]"),
    ({"eta": float("nan")}, r"`eta` must be a number in \[0, 1\] .*, got nan"),
    ({"gamma": 2.0}, r"`gamma` must be a number in \[0, 1\]"),
    ({"eta": 0.3, "gamma": 0.3}, r"Pass `eta` or `gamma` \(the same thing\), not both"),
])
def test_tcd_eta_out_of_range_is_a_clear_error(kwargs, match):
    """TCDScheduler asserts (an AssertionError without the value); here a ValueError names the argument."""
    scheduler = TrajectoryConsistencyScheduler()
    scheduler.set_timesteps(2)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match=match):
        scheduler.step(x, 999, x, **kwargs)
    with pytest.raises(ValueError, match=r"`gamma` must be a number in \[0, 1\]"):
        TrajectoryConsistencyScheduler(gamma=1.01)


# ----------------------------------------------------------------------------------------------------------------
# Every tensor on a non-CPU device (meta): no host sync, no host tensor copied in
# ----------------------------------------------------------------------------------------------------------------


def _meta_loop(scheduler, timesteps, step_kwargs):
    sample = torch.empty(SHAPE, device="meta")
    outs = []
    for t in timesteps:
        model_output = torch.empty(SHAPE, device="meta")
        with HostTraffic() as traffic:
            out = scheduler.step(model_output, t, sample, **step_kwargs)
        assert traffic.violations == [], traffic.violations
        assert out.prev_sample.device.type == "meta" and out.prev_sample.shape == SHAPE
        outs.append(out)
        sample = out.prev_sample
    return outs


@pytest.mark.parametrize("how", ["elements", "python_ints", "begin_index"])
@pytest.mark.parametrize("make, step_kwargs", [
    (lambda: ConsistencyScheduler(), {}),
    (lambda: ConsistencyScheduler(gamma=0.5, prediction_type="v_prediction", thresholding=True), {}),
    (lambda: ConsistencyScheduler(), {"gamma": 0.0}),
    (lambda: TrajectoryConsistencyScheduler(), {}),
    (lambda: TrajectoryConsistencyScheduler(prediction_type="sample"), {"eta": 1.0}),
], ids=["lcm", "gamma_mix_v_threshold", "gamma_0", "tcd", "tcd_sample_eta1"])
def test_step_runs_on_a_non_cpu_device_without_host_syncs(make, step_kwargs, how):
    scheduler = make()
    schedules = ({"num_inference_steps": 4}, {"timesteps": [999, 500, 20]}, {"num_inference_steps": 2, "strength": 0.5})
    for set_kwargs in schedules:
        scheduler.set_timesteps(device="meta", **set_kwargs)
        assert scheduler.timesteps.device.type == "meta"
        if how == "elements":  # a pipeline's `for t in scheduler.timesteps`
            timesteps = list(scheduler.timesteps)
        elif how == "python_ints":
            timesteps = [int(t) for t in scheduler._host_timesteps]
        else:  # a meta tensor that is not an element of the schedule: the pipeline sets the begin index
            scheduler.set_begin_index(0)
            timesteps = [torch.tensor(t, device="meta") for t in scheduler._host_timesteps]
        outs = _meta_loop(scheduler, timesteps, step_kwargs)
        assert len(outs) == len(scheduler.timesteps) and scheduler.step_index == len(outs)
    # A meta timestep that is not an element of the schedule, without a begin index, has no value to look up.
    scheduler.set_timesteps(device="meta", num_inference_steps=4)
    other = torch.tensor(999, device="meta")
    with pytest.raises(ValueError, match=r"`timestep` is a meta tensor .* call `set_begin_index` first"):
        scheduler.step(torch.empty(SHAPE, device="meta"), other, torch.empty(SHAPE, device="meta"), **step_kwargs)


def test_a_pipeline_style_loop_reads_no_device_value_on_cpu_either():
    """The view lookup is exact: elements of `scheduler.timesteps` give the same steps as their values."""
    for scheduler_cls, kwargs in ((ConsistencyScheduler, {}), (TrajectoryConsistencyScheduler, {"eta": 0.3})):
        results = []
        for as_ints in (False, True):
            scheduler = scheduler_cls()
            scheduler.set_timesteps(timesteps=[999, 759, 499, 259])
            gen, sample, outs = torch.Generator().manual_seed(0), torch.ones(SHAPE), []
            for i, t in enumerate(scheduler.timesteps):
                assert scheduler.index_for_timestep(t) == i
                timestep = int(t) if as_ints else t
                with HostTraffic() as traffic:
                    out = scheduler.step(torch.full(SHAPE, 0.1 * i), timestep, sample, generator=gen, **kwargs)
                assert not any("reads a tensor value" in v for v in traffic.violations)
                outs.append(out.prev_sample)
                sample = out.prev_sample
            results.append(outs)
        for a, b in zip(*results):
            assert torch.equal(a, b)
