"""LCMPipeline: parity with diffusers' LCM pipelines, LoRA loaders, img2img, gamma, callbacks and input checks.

All on the tiny kit at 32x32 pixels (16x16 latents), CPU float32.
"""

import json

import pytest
import torch
from diffusers import (
    LatentConsistencyModelImg2ImgPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
)

from lcm_kit.lora import add_lcm_lora, save_lora_weights
from lcm_kit.pipelines import LCMPipeline
from lcm_kit.schedulers import ConsistencyScheduler
from lcm_kit.testing import save_tiny_pipeline, tiny_sd_components

SIZE = dict(height=32, width=32)
PROMPT = "a red cube on a table"
TOL = 1e-5


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def lcm_pipe(components):
    pipe = LCMPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_pipe(cls, components):
    scheduler = LCMScheduler.from_config(components["scheduler"].config)
    pipe = cls(**{**components, "scheduler": scheduler}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def distilled():
    """Components of a fully distilled LCM (UNet with a w-embedding input)."""
    return tiny_sd_components("sd1", time_cond_proj_dim=32)


@pytest.fixture(scope="module")
def sd1():
    return tiny_sd_components("sd1")


@pytest.fixture(scope="module")
def sd1_pipe(sd1):
    return lcm_pipe(sd1)


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------------------------------------


def test_scheduler_is_converted_from_sd_scheduler_config(sd1):
    pipe = lcm_pipe(sd1)
    assert isinstance(pipe.scheduler, ConsistencyScheduler)
    for key in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "prediction_type", "set_alpha_to_one"):
        assert pipe.scheduler.config[key] == sd1["scheduler"].config[key], key
    # An LCM scheduler is kept as given.
    lcm = LCMScheduler.from_config(sd1["scheduler"].config)
    assert lcm_pipe({**sd1, "scheduler": lcm}).scheduler is lcm


def test_from_pretrained_sd_folder_and_save_round_trip(tmp_path, sd1_pipe):
    folder = save_tiny_pipeline("sd2", tmp_path / "sd2")
    pipe = LCMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, ConsistencyScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.steps_offset == 1

    # Same components in memory -> same images.
    reference = lcm_pipe(tiny_sd_components("sd2"))
    out = pipe(PROMPT, **SIZE, generator=gen(), output_type="latent").images
    ref = reference(PROMPT, **SIZE, generator=gen(), output_type="latent").images
    assert max_diff(out, ref) <= TOL

    # save_pretrained writes the stock LCMScheduler it equals; LCMPipeline gets its ConsistencyScheduler back.
    pipe.save_pretrained(tmp_path / "lcm")
    again = LCMPipeline.from_pretrained(tmp_path / "lcm")
    again.set_progress_bar_config(disable=True)
    assert isinstance(again.scheduler, ConsistencyScheduler)
    assert max_diff(again(PROMPT, **SIZE, generator=gen(), output_type="latent").images, out) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# parity with diffusers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_parity_distilled_lcm_vs_latent_consistency_pipeline(distilled, steps):
    ref = diffusers_pipe(LatentConsistencyModelPipeline, distilled)
    ours = lcm_pipe(distilled)
    kwargs = dict(num_inference_steps=steps, guidance_scale=8.5, **SIZE, output_type="latent")
    a = ref(PROMPT, generator=gen(), **kwargs).images
    b = ours(PROMPT, generator=gen(), **kwargs).images
    assert a.shape == (1, 4, 16, 16)
    assert max_diff(a, b) <= TOL


def test_parity_distilled_batch_and_default_guidance(distilled):
    """Prompt list x num_images_per_prompt, guidance_scale left at its default (8.5 for a distilled LCM)."""
    ref = diffusers_pipe(LatentConsistencyModelPipeline, distilled)
    ours = lcm_pipe(distilled)
    kwargs = dict(num_inference_steps=2, num_images_per_prompt=2, **SIZE, output_type="latent")
    a = ref([PROMPT, "a dog"], generator=gen(3), guidance_scale=8.5, **kwargs).images
    b = ours([PROMPT, "a dog"], generator=gen(3), **kwargs).images
    assert a.shape[0] == 4
    assert max_diff(a, b) <= TOL


@pytest.mark.parametrize(
    "schedule", [dict(timesteps=[999, 499, 259]), dict(original_inference_steps=25, num_inference_steps=3)]
)
def test_parity_distilled_custom_schedule(distilled, schedule):
    ref = diffusers_pipe(LatentConsistencyModelPipeline, distilled)
    ours = lcm_pipe(distilled)
    kwargs = dict(guidance_scale=8.5, **SIZE, output_type="latent", **schedule)
    a = ref(PROMPT, generator=gen(), **kwargs).images
    b = ours(PROMPT, generator=gen(), **kwargs).images
    assert max_diff(a, b) <= TOL
    assert ours.scheduler.timesteps.tolist() == ref.scheduler.timesteps.tolist()
    if "timesteps" in schedule:
        assert ours.scheduler.timesteps.tolist() == schedule["timesteps"]


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_parity_lora_case_vs_stable_diffusion_with_lcm_scheduler(sd1, sd1_pipe, steps):
    ref = diffusers_pipe(StableDiffusionPipeline, sd1)
    kwargs = dict(num_inference_steps=steps, guidance_scale=1.0, **SIZE, output_type="latent")
    a = ref(PROMPT, generator=gen(), **kwargs).images
    b = sd1_pipe(PROMPT, generator=gen(), **kwargs).images
    assert max_diff(a, b) <= TOL


@pytest.mark.parametrize("steps", [1, 4])
def test_parity_lora_case_sd2_v_prediction(steps):
    sd2 = tiny_sd_components("sd2")
    ref = diffusers_pipe(StableDiffusionPipeline, sd2)
    ours = lcm_pipe(sd2)
    assert ours.scheduler.config.prediction_type == "v_prediction"
    kwargs = dict(num_inference_steps=steps, guidance_scale=1.0, **SIZE, output_type="latent")
    a = ref(PROMPT, generator=gen(), **kwargs).images
    b = ours(PROMPT, generator=gen(), **kwargs).images
    assert max_diff(a, b) <= TOL


def test_lora_case_real_cfg_matches_stable_diffusion(sd1, sd1_pipe):
    """guidance_scale > 1 on a UNet without w-embedding is standard CFG with the negative prompt."""
    ref = diffusers_pipe(StableDiffusionPipeline, sd1)
    kwargs = dict(num_inference_steps=2, guidance_scale=1.8, negative_prompt="blurry", **SIZE, output_type="latent")
    a = ref(PROMPT, generator=gen(), **kwargs).images
    b = sd1_pipe(PROMPT, generator=gen(), **kwargs).images
    assert max_diff(a, b) <= TOL
    no_cfg = sd1_pipe(PROMPT, generator=gen(), num_inference_steps=2, **SIZE, output_type="latent").images
    assert max_diff(b, no_cfg) > 1e-3  # guidance really changed the result


def test_clip_skip(sd1, sd1_pipe):
    """clip_skip=1 conditions on the penultimate CLIP layer (through the final layer norm), as diffusers defines it;
    compared against StableDiffusionPipeline fed those embeddings (diffusers' own clip_skip path expects the
    pre-transformers-5 `CLIPTextModel.text_model`)."""
    encoder, tokenizer = sd1["text_encoder"], sd1["tokenizer"]
    ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states
        penultimate = getattr(encoder, "text_model", encoder).final_layer_norm(hidden[-2])
    ref = diffusers_pipe(StableDiffusionPipeline, sd1)
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, **SIZE, output_type="latent")
    a = ref(prompt_embeds=penultimate, generator=gen(), **kwargs).images
    b = sd1_pipe(PROMPT, clip_skip=1, generator=gen(), **kwargs).images
    assert max_diff(a, b) <= TOL
    assert max_diff(b, sd1_pipe(PROMPT, generator=gen(), **kwargs).images) > 1e-3


@pytest.mark.parametrize("steps", [2, 4])
def test_img2img_parity_vs_latent_consistency_img2img(distilled, steps):
    ref = diffusers_pipe(LatentConsistencyModelImg2ImgPipeline, distilled)
    ours = lcm_pipe(distilled)
    image = torch.rand(1, 3, 32, 32, generator=gen(1))
    kwargs = dict(image=image, strength=0.5, num_inference_steps=steps, guidance_scale=8.5, output_type="latent")
    a = ref(PROMPT, generator=gen(), **kwargs).images
    b = ours(PROMPT, generator=gen(), **kwargs).images
    assert max_diff(a, b) <= TOL
    # strength reached the scheduler: the schedule starts half-way into the 50-step distillation grid.
    assert ours.scheduler.timesteps[0].item() < 500


def test_img2img_pil_input_and_strength_effect(sd1_pipe):
    from PIL import Image

    pixels = (torch.rand(32, 32, 3, generator=gen(2)) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    low = sd1_pipe(PROMPT, image=image, strength=0.2, num_inference_steps=2, generator=gen(), output_type="np")
    high = sd1_pipe(PROMPT, image=image, strength=1.0, num_inference_steps=2, generator=gen(), output_type="np")
    assert low.images.shape == (1, 32, 32, 3)
    # Low strength stays closer to the input image than full re-noising does.
    target = pixels / 255.0
    assert abs(low.images[0] - target).mean() < abs(high.images[0] - target).mean()


# ---------------------------------------------------------------------------------------------------------------
# outputs, gamma, callbacks
# ---------------------------------------------------------------------------------------------------------------


def test_output_types_agree(sd1_pipe):
    kwargs = dict(num_inference_steps=1, **SIZE)
    pt = sd1_pipe(PROMPT, generator=gen(), output_type="pt", **kwargs).images
    np_images = sd1_pipe(PROMPT, generator=gen(), output_type="np", **kwargs).images
    pil = sd1_pipe(PROMPT, generator=gen(), output_type="pil", **kwargs).images
    assert pt.shape == (1, 3, 32, 32) and np_images.shape == (1, 32, 32, 3)
    assert torch.allclose(pt.permute(0, 2, 3, 1), torch.from_numpy(np_images), atol=1e-6)
    assert pil[0].size == (32, 32)
    images, nsfw = sd1_pipe(PROMPT, generator=gen(), output_type="pt", return_dict=False, **kwargs)
    assert torch.equal(images, pt) and nsfw is None


def test_gamma(sd1_pipe):
    latents = torch.randn(1, 4, 16, 16, generator=gen(5))
    run = lambda seed, gamma: sd1_pipe(  # noqa: E731
        PROMPT, latents=latents, generator=gen(seed), gamma=gamma, num_inference_steps=2, output_type="latent"
    ).images
    # gamma=1 is the default LCM sampler: the generator's fresh noise matters.
    assert max_diff(run(0, 1.0), run(0, None)) == 0
    assert max_diff(run(0, 1.0), run(1, 1.0)) > 1e-3
    # gamma=0 is deterministic given the initial latents.
    assert max_diff(run(0, 0.0), run(1, 0.0)) == 0
    assert max_diff(run(0, 0.0), run(0, 1.0)) > 1e-3
    with pytest.raises(ValueError, match="gamma"):
        run(0, 1.5)


def test_gamma_other_than_one_needs_consistency_scheduler(sd1):
    pipe = lcm_pipe({**sd1, "scheduler": LCMScheduler.from_config(sd1["scheduler"].config)})
    with pytest.raises(ValueError, match="ConsistencyScheduler"):
        pipe(PROMPT, gamma=0.5, num_inference_steps=1, **SIZE)


def test_callback_on_step_end(distilled):
    pipe = lcm_pipe(distilled)
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t), sorted(tensors)))
        if i == 0:  # replacing a tensor changes the run
            return {"latents": torch.zeros_like(tensors["latents"])}
        return {}

    out = pipe(
        PROMPT,
        num_inference_steps=3,
        **SIZE,
        generator=gen(),
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "denoised", "w_embedding"],
    ).images
    assert [s[0] for s in seen] == [0, 1, 2]
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert seen[0][2] == ["denoised", "latents", "w_embedding"]
    plain = pipe(PROMPT, num_inference_steps=3, **SIZE, generator=gen(), output_type="latent").images
    assert max_diff(out, plain) > 1e-3


def test_progress_bar_reports_steps(sd1_pipe, capsys):
    sd1_pipe.set_progress_bar_config(disable=False)
    try:
        sd1_pipe(PROMPT, num_inference_steps=3, **SIZE, generator=gen(), output_type="latent")
    finally:
        sd1_pipe.set_progress_bar_config(disable=True)
    assert "3/3" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# LoRA loaders (the LCM-LoRA use case)
# ---------------------------------------------------------------------------------------------------------------


def make_lora(tmp_path, kind="sd1", rank=4, alpha=8, seed=0):
    """A random (non-zero) LCM-LoRA on a copy of the tiny unet, saved with lcm_kit.lora; returns (folder, unet)."""
    unet = tiny_sd_components(kind)["unet"]
    add_lcm_lora(unet, rank=rank, alpha=alpha)
    g = gen(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter); make it do something
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    save_lora_weights(unet, tmp_path / "lora")
    return tmp_path / "lora", unet


def test_load_fuse_unfuse_set_adapters(tmp_path):
    folder, lora_unet = make_lora(tmp_path)
    pipe = lcm_pipe(tiny_sd_components("sd1"))
    # Compare UNet predictions (order 1) rather than 1-step latents: x0 at t=999 divides by sqrt(alpha_bar) ~ 0.07,
    # which would turn float32 summation-order noise into ~1e-5 on latents of magnitude ~60.
    sample, text = torch.randn(1, 4, 16, 16, generator=gen(7)), torch.randn(1, 77, 32, generator=gen(8))

    def eps(unet):
        with torch.no_grad():
            return unet(sample, 999, text).sample

    def latents():
        return pipe(PROMPT, num_inference_steps=1, **SIZE, generator=gen(), output_type="latent").images

    base_eps, base_latents = eps(pipe.unet), latents()
    expected = eps(lora_unet)  # the in-memory LoRA that was saved

    pipe.load_lora_weights(folder, adapter_name="lcm")
    assert max_diff(eps(pipe.unet), expected) <= TOL
    assert max_diff(eps(pipe.unet), base_eps) > 1e-3
    assert max_diff(latents(), base_latents) > 1e-3  # the pipeline samples with the adapter

    pipe.set_adapters(["lcm"], adapter_weights=[0.0])
    assert max_diff(eps(pipe.unet), base_eps) <= TOL
    pipe.set_adapters(["lcm"], adapter_weights=[1.0])

    pipe.fuse_lora()
    assert max_diff(eps(pipe.unet), expected) <= 1e-4  # fused weights: same function, other summation order
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert max_diff(eps(pipe.unet), base_eps) <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=PROMPT, height=33, width=32), "height"),
        (dict(prompt=PROMPT, height=32, width=31), "width"),
        (dict(prompt=PROMPT, prompt_embeds=torch.zeros(1, 77, 32)), "not both"),
        (dict(), "neither"),
        (dict(prompt=3), "prompt"),
        (dict(prompt_embeds=torch.zeros(2, 77, 32), negative_prompt_embeds=torch.zeros(1, 77, 32), guidance_scale=2.0),
         "negative_prompt_embeds"),
        (dict(prompt=[PROMPT, "b"], negative_prompt=["x"], guidance_scale=2.0), "negative_prompt"),
        (dict(prompt=PROMPT, num_images_per_prompt=2, generator=[gen(0), gen(1), gen(2)]), "generator"),
        (dict(prompt=[PROMPT, "b"], generator=[gen(0)]), "generator"),
        (dict(prompt=PROMPT, strength=0.5), "strength.*without `image`"),
        (dict(prompt=PROMPT, image=torch.rand(1, 3, 32, 32), strength=0.0), "strength"),
        (dict(prompt=PROMPT, image=torch.rand(1, 3, 32, 32), strength=1.5), "strength"),
        (dict(prompt=PROMPT, negative_prompt="ugly"), "negative prompt.*guidance_scale=1.0"),
        (dict(prompt=PROMPT, output_type="jpeg"), "output_type"),
        (dict(prompt=PROMPT, num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt=PROMPT, callback_on_step_end_tensor_inputs=["unet"]), "callback_on_step_end_tensor_inputs"),
        (dict(prompt=PROMPT, num_inference_steps=0), "num_inference_steps"),
    ],
)
def test_bad_input_raises(sd1_pipe, kwargs, match):
    kwargs.setdefault("num_inference_steps", 1)
    with pytest.raises(ValueError, match=match):
        sd1_pipe(**kwargs)


def test_negative_prompt_refused_for_distilled_lcm(distilled):
    with pytest.raises(ValueError, match="distilled LCM"):
        lcm_pipe(distilled)(PROMPT, negative_prompt="ugly", num_inference_steps=1, **SIZE)


# ---------------------------------------------------------------------------------------------------------------
# drop-in use: what a diffusers user tries first
# ---------------------------------------------------------------------------------------------------------------


def test_img2img_strength_defaults_to_diffusers_0_8(sd1_pipe):
    image = torch.rand(1, 3, 32, 32, generator=gen(3))
    default = sd1_pipe(PROMPT, image=image, generator=gen(), output_type="latent").images
    explicit = sd1_pipe(PROMPT, image=image, strength=0.8, generator=gen(), output_type="latent").images
    half = sd1_pipe(PROMPT, image=image, strength=0.5, generator=gen(), output_type="latent").images
    assert torch.equal(default, explicit) and max_diff(default, half) > 1e-3


def test_scheduler_none_builds_a_prompt_encoder_and_names_the_missing_scheduler(sd1, tmp_path):
    pipe = LCMPipeline(**{**sd1, "scheduler": None}, requires_safety_checker=False)
    embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    reference, _ = lcm_pipe(sd1).encode_prompt(PROMPT, "cpu", 1, False)
    assert torch.equal(embeds, reference)
    with pytest.raises(ValueError, match="no scheduler"):
        pipe(PROMPT, num_inference_steps=1, **SIZE)
    folder = save_tiny_pipeline("sd1", tmp_path / "sd1")
    assert LCMPipeline.from_pretrained(folder, scheduler=None).scheduler is None


def test_from_pipe_reuses_the_stock_pipelines_components(sd1):
    stock = StableDiffusionPipeline(**sd1, requires_safety_checker=False)
    pipe = LCMPipeline.from_pipe(stock)
    assert pipe.unet is stock.unet and pipe.vae is stock.vae and pipe.text_encoder is stock.text_encoder
    assert isinstance(pipe.scheduler, ConsistencyScheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=2, generator=gen(), output_type="latent", **SIZE).images
    ref = lcm_pipe(sd1)(PROMPT, num_inference_steps=2, generator=gen(), output_type="latent", **SIZE).images
    assert max_diff(out, ref) <= TOL


def test_stock_cfg_cutoff_callback_turns_guidance_off_part_way(sd1):
    """diffusers' SDCFGCutoffCallback sets pipe._guidance_scale = 0 and keeps the conditional embedding: the steps
    after the cutoff run one UNet pass without guidance, as in stock pipelines."""
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe = lcm_pipe(sd1)
    batches = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, *a, **k: batches.append(x.shape[0]) or forward(x, *a, **k)
    callback = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)
    out = pipe(PROMPT, num_inference_steps=4, guidance_scale=2.0, generator=gen(), output_type="latent",
               callback_on_step_end=callback, **SIZE).images
    assert batches == [2, 2, 1, 1] and torch.isfinite(out).all()
    assert pipe._guidance_scale == 0.0


def test_saved_folder_loads_in_stock_diffusers_and_back(sd1, distilled, tmp_path):
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    for name, components, stock_class in (("lora", sd1, StableDiffusionPipeline),
                                          ("distilled", distilled, LatentConsistencyModelPipeline)):
        ours = lcm_pipe(components)
        ours.save_pretrained(tmp_path / name)
        for loader in (DiffusionPipeline, AutoPipelineForText2Image):
            stock = loader.from_pretrained(tmp_path / name)
            assert type(stock) is stock_class and type(stock.scheduler) is LCMScheduler, loader
        stock = DiffusionPipeline.from_pretrained(tmp_path / name)
        stock.set_progress_bar_config(disable=True)
        back = LCMPipeline.from_pretrained(tmp_path / name)
        back.set_progress_bar_config(disable=True)
        assert isinstance(back.scheduler, ConsistencyScheduler)
        kwargs = dict(num_inference_steps=4, guidance_scale=8.5 if name == "distilled" else 1.0, **SIZE,
                      output_type="latent")
        a = stock(PROMPT, generator=gen(), **kwargs).images
        b = back(PROMPT, generator=gen(), **kwargs).images
        c = ours(PROMPT, generator=gen(), **kwargs).images
        assert max_diff(a, b) == 0.0  # the same loaded weights: stock diffusers and lcm-kit sample identically
        # in memory vs loaded: diffusers' loader keeps file tensors at other alignments and CPU kernels round
        # differently (1.6e-5 here); a wrong scheduler or guidance would be off by O(1)
        assert max_diff(b, c) <= 1e-4


def test_ip_adapter_arguments_are_accepted_and_checked(sd1_pipe):
    import inspect

    params = inspect.signature(sd1_pipe.__call__).parameters
    assert {"ip_adapter_image", "ip_adapter_image_embeds"} <= set(params)
    with pytest.raises(ValueError, match="ip_adapter_image_embeds"):
        sd1_pipe(PROMPT, ip_adapter_image_embeds=torch.zeros(1, 1, 8), num_inference_steps=1, **SIZE)
    with pytest.raises(ValueError, match="not both"):
        sd1_pipe(PROMPT, ip_adapter_image=torch.rand(1, 3, 32, 32), ip_adapter_image_embeds=[torch.zeros(1, 1, 8)],
                 num_inference_steps=1, **SIZE)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(guidance_scale=float("inf")), "guidance_scale"),
        (dict(guidance_scale="2"), "guidance_scale"),
        (dict(num_inference_steps="4"), "num_inference_steps"),
        (dict(num_inference_steps=2.5), "num_inference_steps"),
        (dict(height=32.0), "height"),
        (dict(prompt=[]), "prompt"),
        (dict(prompt=["a", 3]), "prompt"),
        (dict(latents=torch.randn(1, 4, 8, 8)), "latents"),
        (dict(latents=torch.randn(1, 3, 16, 16)), "latents"),
        (dict(latents=torch.full((1, 4, 16, 16), float("nan"))), "latents.*NaN"),
        (dict(image=torch.rand(1, 3, 1, 1)), "image"),
        (dict(image=[torch.rand(3, 32, 32), torch.rand(3, 16, 16)]), "different sizes"),
        (dict(image=[]), "image"),
        (dict(image=torch.full((1, 3, 32, 32), float("nan"))), "image.*NaN"),
        (dict(image="cat.png"), "image"),
        (dict(image=torch.rand(1, 3, 32, 32), strength=float("nan")), "strength"),
        (dict(gamma=float("nan")), "gamma"),
    ],
)
def test_bad_values_are_named_before_anything_runs(sd1_pipe, kwargs, match):
    kwargs = {"prompt": PROMPT, "num_inference_steps": 1, **SIZE, **kwargs}
    with pytest.raises(ValueError, match=match):
        sd1_pipe(**kwargs)


def test_rgba_image_is_read_as_pixels_not_latents(sd1_pipe):
    """A 32x32 RGBA PIL image has 4 channels like latents: it is composited over white and VAE-encoded, so the
    output keeps the image's size (it used to be taken for latents and give 64x64)."""
    import numpy as np
    from PIL import Image

    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 4), dtype=np.uint8), "RGBA")
    out = sd1_pipe(PROMPT, image=rgba, strength=0.5, num_inference_steps=1, generator=gen()).images[0]
    assert out.size == (32, 32)
    composited = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    ref = sd1_pipe(PROMPT, image=composited, strength=0.5, num_inference_steps=1, generator=gen(),
                   output_type="np").images
    got = sd1_pipe(PROMPT, image=rgba, strength=0.5, num_inference_steps=1, generator=gen(), output_type="np").images
    assert np.array_equal(got, ref)


def _stock_pipelines():
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    image = torch.rand(1, 3, 32, 32, generator=gen(5))
    mask = (torch.rand(1, 1, 32, 32, generator=gen(6)) > 0.5).float()
    sd = {k: v for k, v in tiny_sd_components("sd1").items() if k != "image_encoder"}
    sdxl = {k: v for k, v in tiny_sd_components("sdxl").items() if k != "image_encoder"}
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(sd["unet"], conditioning_embedding_out_channels=(16, 32))
    return [
        ("sdxl", StableDiffusionXLPipeline, sdxl, {}),
        ("sdxl img2img", StableDiffusionXLImg2ImgPipeline, sdxl, {"image": image, "strength": 0.6}),
        ("img2img", StableDiffusionImg2ImgPipeline, sd, {"image": image, "strength": 0.6}),
        ("inpaint", StableDiffusionInpaintPipeline, sd, {"image": image, "mask_image": mask, "strength": 0.9}),
        ("controlnet", StableDiffusionControlNetPipeline, {**sd, "controlnet": controlnet}, {"image": image}),
    ]


@pytest.mark.parametrize("index", range(5))
def test_consistency_scheduler_in_stock_pipelines_gives_lcm_scheduler_images(index):
    """ConsistencyScheduler is a drop-in for LCMScheduler in stock SDXL, img2img, inpaint and ControlNet pipelines:
    the same images for the same components and seed."""
    name, cls, components, extra = _stock_pipelines()[index]
    images = []
    for scheduler_class in (LCMScheduler, ConsistencyScheduler):
        kwargs = {"requires_safety_checker": False} if "sdxl" not in name else {}
        pipe = cls(**{**components, "scheduler": scheduler_class.from_config(components["scheduler"].config)},
                   **kwargs)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, generator=gen(), output_type="pt",
                           **SIZE, **extra).images)
    assert torch.isfinite(images[0]).all()
    assert max_diff(images[0], images[1]) == 0.0, name


def test_a_tcd_folder_keeps_tcd_sampling_and_matches_the_stock_tcd_pipeline(sd1, tmp_path):
    """A folder with diffusers' TCDScheduler (a TCD-LoRA setup) becomes the exact TrajectoryConsistencyScheduler in
    LCMPipeline: the same images as stock StableDiffusionPipeline + TCDScheduler at the same eta; saved, it is a
    TCDScheduler folder again."""
    from diffusers import TCDScheduler

    from lcm_kit.schedulers import TrajectoryConsistencyScheduler

    tcd = TCDScheduler.from_config(sd1["scheduler"].config)
    ours = lcm_pipe({**sd1, "scheduler": tcd})
    assert type(ours.scheduler) is TrajectoryConsistencyScheduler
    stock = StableDiffusionPipeline(**{**sd1, "scheduler": TCDScheduler.from_config(sd1["scheduler"].config)},
                                    requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    for eta in (0.0, 0.3, 1.0):
        a = stock(PROMPT, num_inference_steps=4, guidance_scale=1.0, eta=eta, generator=gen(), output_type="latent",
                  **SIZE).images
        b = ours(PROMPT, num_inference_steps=4, gamma=eta, generator=gen(), output_type="latent", **SIZE).images
        assert max_diff(a, b) <= TOL, eta
    ours.save_pretrained(tmp_path / "tcd")
    assert json.loads((tmp_path / "tcd" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == (
        "TCDScheduler")
    assert type(LCMPipeline.from_pretrained(tmp_path / "tcd").scheduler) is TrajectoryConsistencyScheduler
