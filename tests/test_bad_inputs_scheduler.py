"""Bad scheduler arguments (ConsistencyScheduler, TrajectoryConsistencyScheduler, CMMultistepScheduler): each is
refused with the exception type and a message that names the argument; none is accepted silently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcm_kit.schedulers import CMMultistepScheduler, ConsistencyScheduler, TrajectoryConsistencyScheduler

NAN, INF = float("nan"), float("inf")
SHAPE = (2, 4, 8, 8)


def _lcm_step(scheduler_cls=ConsistencyScheduler, *, model_output=None, timestep=None, **step_kwargs):
    """A call of `step` on a 2-step schedule with the given arguments (the others valid)."""

    def call():
        scheduler = scheduler_cls()
        scheduler.set_timesteps(2)
        sample = torch.zeros(SHAPE)
        output = torch.zeros(SHAPE) if model_output is None else model_output
        scheduler.step(output, scheduler.timesteps[0] if timestep is None else timestep, sample, **step_kwargs)

    return call


def _cm_step(*, model_output=None, timestep=None, steps=1, **step_kwargs):
    def call():
        scheduler = CMMultistepScheduler()
        scheduler.set_timesteps(2)
        sample = torch.zeros(1, 3, 4, 4)
        for _ in range(steps):
            t = scheduler.timesteps[min(scheduler.step_index or 0, 1)] if timestep is None else timestep
            output = torch.zeros(1, 3, 4, 4) if model_output is None else model_output
            scheduler.step(output, t, sample, **step_kwargs)

    return call


def _set(scheduler_cls=ConsistencyScheduler, **kwargs):
    return lambda: scheduler_cls().set_timesteps(**kwargs)


def _make(scheduler_cls=ConsistencyScheduler, **kwargs):
    return lambda: scheduler_cls(**kwargs)


CASES = {
    # ConsistencyScheduler / TrajectoryConsistencyScheduler config
    "beta_start_nan": (_make(beta_start=NAN), ValueError, r"`beta_start` must be a finite number >= 0, got nan"),
    "beta_end_inf": (_make(beta_end=INF), ValueError, r"`beta_end` must be a finite number >= 0, got inf"),
    "beta_start_negative": (_make(beta_start=-0.1), ValueError, r"`beta_start` must be a finite number >= 0, got -0.1"),
    "beta_end_string": (_make(beta_end="0.012"), TypeError, r"`beta_end` must be a finite number .* of type str"),
    "betas_above_one": (_make(beta_end=2.0), ValueError,
        r"`beta_start`=0.00085 and `beta_end`=2.0 .* give betas outside \[0, 1\]"),
    "trained_betas_nan": (_make(trained_betas=[0.1, NAN]), ValueError, r"`trained_betas` give betas outside \[0, 1\]"),
    "trained_betas_above_one": (_make(trained_betas=[0.5, 1.5]), ValueError,
        r"`trained_betas` give betas outside \[0, 1\] .*max 1.5"),
    "trained_betas_2d": (_make(trained_betas=[[0.1, 0.2]]), ValueError,
        r"`trained_betas` must be a non-empty 1-D list .* shape \(1, 2\)"),
    "trained_betas_empty": (_make(trained_betas=[]), ValueError, r"`trained_betas` must be a non-empty 1-D list"),
    "trained_betas_strings": (_make(trained_betas="0.1,0.2"), TypeError,
        r"`trained_betas` must be a 1-D list or array of numbers"),
    "num_train_timesteps_bool": (_make(num_train_timesteps=True), TypeError,
        r"`num_train_timesteps` must be an int .* of type bool"),
    "num_train_timesteps_float": (_make(num_train_timesteps=1000.0), TypeError,
        r"`num_train_timesteps` must be an int .* of type float"),
    "original_inference_steps_bool": (_make(original_inference_steps=True), TypeError,
        r"`original_inference_steps` must be an int"),
    "gamma_nan": (_make(gamma=NAN), ValueError, r"`gamma` must be a number in \[0, 1\] .*, got nan"),
    "gamma_bool": (_make(gamma=True), TypeError, r"`gamma` must be a number in \[0, 1\] .*, got True of type bool"),
    "tcd_gamma_out_of_range": (_make(TrajectoryConsistencyScheduler, gamma=1.5), ValueError,
        r"`gamma` must be a number in \[0, 1\] .*, got 1.5"),
    "clip_sample_string": (_make(clip_sample="yes"), TypeError, r"`clip_sample` must be a bool .*'yes'"),
    "thresholding_int": (_make(thresholding=1), TypeError, r"`thresholding` must be a bool .* got 1 of type int"),
    "clip_sample_range_zero": (_make(clip_sample_range=0.0), ValueError,
        r"`clip_sample_range` must be a finite number > 0, got 0.0"),
    "thresholding_ratio_above_one": (_make(dynamic_thresholding_ratio=1.5), ValueError,
        r"`dynamic_thresholding_ratio` must be a finite number in \(0, 1\], got 1.5"),
    "sample_max_value_nan": (_make(sample_max_value=NAN), ValueError,
        r"`sample_max_value` must be a finite number > 0, got nan"),
    "timestep_scaling_negative": (_make(timestep_scaling=-10.0), ValueError,
        r"`timestep_scaling` must be a finite number > 0, got -10.0"),
    "steps_offset_negative": (_make(steps_offset=-1), ValueError, r"`steps_offset` must be in \[0, 1000\], got -1"),
    "prediction_type_none": (_make(prediction_type=None), ValueError, r"`prediction_type` must be one of .*, got None"),
    # set_timesteps
    "num_inference_steps_nan": (_set(num_inference_steps=NAN), TypeError,
        r"`num_inference_steps` must be an int in \[1, 50\], got nan"),
    "num_inference_steps_bool": (_set(num_inference_steps=True), TypeError,
        r"`num_inference_steps` must be an int .* of type bool"),
    "num_inference_steps_too_many": (_set(num_inference_steps=51), ValueError,
        r"`num_inference_steps` must be in \[1, 50\], got 51"),
    "strength_nan": (_set(num_inference_steps=4, strength=NAN), ValueError, r"`strength` must be in \(0, 1\], got nan"),
    "strength_bool": (_set(num_inference_steps=4, strength=True), ValueError,
        r"`strength` must be in \(0, 1\], got True"),
    "timesteps_nan": (_set(timesteps=[999, NAN]), ValueError, r"`timesteps` must be integers, got \[999.0, nan\]"),
    "timesteps_inf": (_set(timesteps=[INF, 10]), ValueError, r"`timesteps` must be integers, got \[inf, 10.0\]"),
    "timesteps_bools": (_set(timesteps=[True, False]), TypeError,
        r"`timesteps` must be a list of ints, got \[True, False\]"),
    "timesteps_strings": (_set(timesteps=["999", "499"]), TypeError,
        r"`timesteps` must be a list of ints, got \['999', '499'\]"),
    "timesteps_2d": (_set(timesteps=[[999, 499]]), ValueError, r"`timesteps` must be a non-empty 1-D list of ints"),
    "timesteps_ascending": (_set(timesteps=[499, 999]), ValueError,
        r"`timesteps` must be strictly descending, got \[499, 999\]"),
    "tcd_timesteps_out_of_range": (_set(TrajectoryConsistencyScheduler, timesteps=[1000, 500]), ValueError,
        r"`timesteps` must lie in \[0, num_train_timesteps=1000\)"),
    "original_inference_steps_arg_zero": (_set(num_inference_steps=1, original_inference_steps=0), ValueError,
        r"`original_inference_steps` must be in \[1, 1000\], got 0"),
    "device_bad_string": (_set(num_inference_steps=4, device="gpu:x"), ValueError,
        r"`device` must be a torch device .*'gpu:x'"),
    # step
    "step_gamma_nan": (_lcm_step(gamma=NAN), ValueError, r"`gamma` must be a number in \[0, 1\] .*, got nan"),
    "step_shape_mismatch": (_lcm_step(model_output=torch.zeros(1, 4, 8, 8)), ValueError,
        r"`model_output` has shape \(1, 4, 8, 8\) but `sample` has shape \(2, 4, 8, 8\)"),
    "step_model_output_numpy": (_lcm_step(model_output=np.zeros(SHAPE)), TypeError,
        r"`model_output` must be a torch.Tensor, got ndarray"),
    "step_generator_int": (_lcm_step(generator=0), TypeError,
        r"`generator` must be None, a torch.Generator or a list of them"),
    "step_generator_list_length": (_lcm_step(generator=[torch.Generator()]), ValueError,
        r"`generator` is a list of 1, but the batch has 2 samples"),
    "step_timestep_string": (_lcm_step(timestep="999"), TypeError, r"`timestep` must be a number or a tensor"),
    "step_timestep_off_schedule": (_lcm_step(timestep=998), ValueError,
        r"`timestep` 998 is not in the current schedule \[999, 499\]"),
    "tcd_step_eta_nan": (_lcm_step(TrajectoryConsistencyScheduler, eta=NAN), ValueError,
        r"`eta` must be a number in \[0, 1\] .*, got nan"),
    "tcd_step_eta_bool": (_lcm_step(TrajectoryConsistencyScheduler, eta=True), TypeError,
        r"`eta` must be a number in \[0, 1\] .*, got True of type bool"),
    "step_gamma_string": (_lcm_step(gamma="0.5"), TypeError,
        r"`gamma` must be a number in \[0, 1\] .*, got '0.5' of type str"),
    "tcd_step_eta_above_one": (_lcm_step(TrajectoryConsistencyScheduler, eta=1.5), ValueError,
        r"`eta` must be a number in \[0, 1\] .*, got 1.5"),
    # CMMultistepScheduler config
    "cm_sigma_min_zero": (_make(CMMultistepScheduler, sigma_min=0.0), ValueError,
        r"`sigma_min` must be a finite number > 0, got 0.0"),
    "cm_sigma_max_nan": (_make(CMMultistepScheduler, sigma_max=NAN), ValueError,
        r"`sigma_max` must be a finite number > sigma_min=0.002, got nan"),
    "cm_sigma_max_below_min": (_make(CMMultistepScheduler, sigma_max=0.001), ValueError,
        r"`sigma_max` must be a finite number > sigma_min=0.002, got 0.001"),
    "cm_sigma_data_inf": (_make(CMMultistepScheduler, sigma_data=INF), ValueError,
        r"`sigma_data` must be a finite number > 0, got inf"),
    "cm_rho_negative": (_make(CMMultistepScheduler, rho=-7.0), ValueError,
        r"`rho` must be a finite number > 0, got -7.0"),
    "cm_s_noise_string": (_make(CMMultistepScheduler, s_noise="1"), TypeError,
        r"`s_noise` must be a finite number >= 0, got '1' of type str"),
    "cm_num_train_timesteps_one": (_make(CMMultistepScheduler, num_train_timesteps=1), ValueError,
        r"`num_train_timesteps` must be in \[2, 1000000000\], got 1"),
    "cm_clip_denoised_string": (_make(CMMultistepScheduler, clip_denoised="no"), TypeError,
        r"`clip_denoised` must be a bool"),
    # CMMultistepScheduler set_timesteps / step
    "cm_sigmas_nan": (_set(CMMultistepScheduler, sigmas=[80.0, NAN]), ValueError,
        r"`sigmas` must be a non-empty, strictly descending list of finite numbers, got \[80.0, nan\]"),
    "cm_sigmas_inf": (_set(CMMultistepScheduler, sigmas=[INF, 1.0]), ValueError,
        r"`sigmas` must be a non-empty, strictly descending list of finite numbers"),
    "cm_sigmas_strings": (_set(CMMultistepScheduler, sigmas=["80", "1"]), TypeError,
        r"`sigmas` must be a list of numbers"),
    "cm_sigmas_ascending": (_set(CMMultistepScheduler, sigmas=[1.0, 2.0]), ValueError,
        r"`sigmas` must be a non-empty, strictly descending"),
    "cm_sigmas_above_max": (_set(CMMultistepScheduler, sigmas=[100.0, 1.0]), ValueError,
        r"`sigmas` must lie in \[sigma_min=0.002, sigma_max=80.0\]"),
    "cm_timesteps_repeated": (_set(CMMultistepScheduler, timesteps=[22, 22]), ValueError,
        r"`timesteps` must be in strictly descending order, got \[22, 22\]"),
    "cm_timesteps_negative": (_set(CMMultistepScheduler, timesteps=[22, -1]), ValueError,
        r"`timesteps` must lie in \[0, num_train_timesteps=40\), got \[22, -1\]"),
    "cm_timesteps_fractional": (_set(CMMultistepScheduler, timesteps=[22.5, 0]), ValueError,
        r"`timesteps` must be integers, got \[22.5, 0.0\]"),
    "cm_num_inference_steps_too_many": (_set(CMMultistepScheduler, num_inference_steps=41), ValueError,
        r"`num_inference_steps` must be in \[1, 40\], got 41"),
    "cm_num_inference_steps_float": (_set(CMMultistepScheduler, num_inference_steps=2.0), TypeError,
        r"`num_inference_steps` must be an int in \[1, 40\], got 2.0"),
    "cm_device_bad_string": (_set(CMMultistepScheduler, num_inference_steps=2, device="gpu:x"), ValueError,
        r"`device` must be a torch device .*'gpu:x'"),
    "cm_step_integer_timestep": (_cm_step(timestep=3), ValueError,
        r"`timestep` must be one of scheduler.timesteps .* got the integer 3"),
    "cm_step_past_the_end": (_cm_step(steps=3), ValueError,
        r"`step\(\)` was called 3 times but the schedule has 2 timesteps"),
    "cm_step_shape_mismatch": (_cm_step(model_output=torch.zeros(2, 3, 4, 4)), ValueError,
        r"`model_output` has shape \(2, 3, 4, 4\) but `sample` has shape \(1, 3, 4, 4\)"),
    "cm_step_generator_string": (_cm_step(generator="seed"), TypeError, r"`generator` must be None, a torch.Generator"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_scheduler_input_is_refused_with_a_message_that_names_it(name):
    call, exception, match = CASES[name]
    with pytest.raises(exception, match=match):
        call()
