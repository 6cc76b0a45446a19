"""LCMXLPipeline: equal to stock diffusers SDXL pipelines + LCMScheduler on the tiny SDXL kit, and its own checks."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.callbacks import SDXLCFGCutoffCallback

from lcm_kit.pipelines import LCMXLPipeline
from lcm_kit.schedulers import ConsistencyScheduler
from lcm_kit.testing import tiny_sd_components


def components(time_cond_proj_dim=None):
    return tiny_sd_components("sdxl", time_cond_proj_dim=time_cond_proj_dim)


def stock(cls, parts):
    return cls(**{**parts, "scheduler": LCMScheduler.from_config(parts["scheduler"].config)})


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def lora_kit():
    parts = components()
    return LCMXLPipeline(**parts), stock(StableDiffusionXLPipeline, parts), parts


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_text_to_image_equals_stock_sdxl_with_lcm_scheduler(lora_kit, steps):
    pipe, reference, _ = lora_kit
    assert isinstance(pipe.scheduler, ConsistencyScheduler)  # the SDXL folder's Euler scheduler was converted
    ours = pipe("a red cube", num_inference_steps=steps, generator=seeded(), output_type="latent").images
    theirs = reference("a red cube", num_inference_steps=steps, guidance_scale=1.0, generator=seeded(),
                       output_type="latent").images
    assert ours.shape == (1, 4, 16, 16)
    assert (ours - theirs).abs().max().item() <= 1e-6


@pytest.mark.parametrize("negative_prompt", [None, "blurry"])
def test_real_cfg_above_one_equals_stock(lora_kit, negative_prompt):
    """LoRA rule: CFG only when guidance > 1; no negative prompt means zeroed embeddings
    (force_zeros_for_empty_prompt), as in diffusers."""
    pipe, reference, _ = lora_kit
    kwargs = dict(num_inference_steps=4, guidance_scale=1.7, negative_prompt=negative_prompt, output_type="latent")
    ours = pipe(["a red cube", "a dog"], generator=seeded(3), **kwargs).images
    theirs = reference(["a red cube", "a dog"], generator=seeded(3), **kwargs).images
    assert (ours - theirs).abs().max().item() <= 1e-6
    unguided = pipe(["a red cube", "a dog"], num_inference_steps=4, generator=seeded(3), output_type="latent").images
    assert (ours - unguided).abs().max().item() > 1e-3  # guidance changed the result: it was applied


def test_micro_conditioning_reaches_the_unet(lora_kit):
    pipe, reference, _ = lora_kit
    kwargs = dict(num_inference_steps=2, original_size=(512, 384), crops_coords_top_left=(16, 8),
                  target_size=(32, 32), output_type="latent")
    ours = pipe("a red cube", generator=seeded(), **kwargs).images
    theirs = reference("a red cube", guidance_scale=1.0, generator=seeded(), **kwargs).images
    assert (ours - theirs).abs().max().item() <= 1e-6
    default = pipe("a red cube", num_inference_steps=2, generator=seeded(), output_type="latent").images
    assert (ours - default).abs().max().item() > 1e-4


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_distilled_lcm_w_embedding_equals_stock(steps):
    parts = components(time_cond_proj_dim=8)
    pipe = LCMXLPipeline(**parts)
    assert pipe.default_guidance_scale == 8.5
    ours = pipe("a red cube", num_inference_steps=steps, generator=seeded(1), output_type="latent").images
    theirs = stock(StableDiffusionXLPipeline, parts)("a red cube", num_inference_steps=steps, guidance_scale=8.5,
                                                      generator=seeded(1), output_type="latent").images
    assert (ours - theirs).abs().max().item() <= 1e-6
    other_w = pipe("a red cube", num_inference_steps=steps, guidance_scale=3.0, generator=seeded(1),
                   output_type="latent").images
    assert (ours - other_w).abs().max().item() > 1e-5  # the w-embedding conditions the UNet


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_image_to_image_equals_stock_sdxl_img2img(lora_kit, steps):
    pipe, _, parts = lora_kit
    reference = stock(StableDiffusionXLImg2ImgPipeline, parts)
    image = pipe("a red cube", num_inference_steps=2, generator=seeded(5)).images[0]
    ours = pipe("a dog", image=image, strength=1.0, num_inference_steps=steps, generator=seeded(),
                output_type="latent").images
    theirs = reference("a dog", image=image, strength=1.0, num_inference_steps=steps, guidance_scale=1.0,
                       generator=seeded(), output_type="latent").images
    assert (ours - theirs).abs().max().item() <= 1e-6


def test_image_to_image_strength_follows_lcm_convention(lora_kit):
    """strength goes to scheduler.set_timesteps (LCM img2img convention): num_inference_steps steps are run over
    the truncated distillation grid. Stock SDXL img2img instead runs the last strength-fraction of an n-step
    schedule; those timesteps passed explicitly (strength 1: the list is used as given, as LCMScheduler does) give
    stock's result."""
    pipe, _, parts = lora_kit
    reference = stock(StableDiffusionXLImg2ImgPipeline, parts)
    image = pipe("a red cube", num_inference_steps=2, generator=seeded(5)).images[0]
    theirs = reference("a dog", image=image, strength=0.5, num_inference_steps=8, guidance_scale=1.0,
                       generator=seeded(), output_type="latent").images
    stock_timesteps = reference.scheduler.timesteps.tolist()[4:]  # stock runs the last half of 8 steps
    assert len(stock_timesteps) == 4
    ours = pipe("a dog", image=image, strength=1.0, timesteps=stock_timesteps, generator=seeded(),
                output_type="latent").images
    assert (ours - theirs).abs().max().item() <= 1e-6
    pipe("a dog", image=image, strength=0.5, num_inference_steps=4, generator=seeded(), output_type="latent")
    assert len(pipe.scheduler.timesteps) == 4
    assert pipe.scheduler.timesteps[0] < 999 * 0.5 + 20


def test_cfg_cutoff_callback_turns_guidance_off_part_way(lora_kit):
    pipe, reference, _ = lora_kit
    kwargs = dict(num_inference_steps=4, guidance_scale=1.7, output_type="latent")
    def cutoff():
        return SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)

    ours = pipe("a red cube", generator=seeded(), callback_on_step_end=cutoff(), **kwargs).images
    theirs = reference("a red cube", generator=seeded(), callback_on_step_end=cutoff(), **kwargs).images
    assert (ours - theirs).abs().max().item() <= 1e-6
    always_guided = pipe("a red cube", generator=seeded(), **kwargs).images
    assert (ours - always_guided).abs().max().item() > 1e-5  # guidance was turned off part-way


def test_prompt_embeds_round_trip_and_gamma(lora_kit):
    pipe, _, _ = lora_kit
    embeds, _, pooled, _ = pipe.encode_prompt("a red cube", device="cpu", do_classifier_free_guidance=False)
    by_text = pipe("a red cube", num_inference_steps=4, generator=seeded(), output_type="latent").images
    by_embeds = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=4, generator=seeded(),
                     output_type="latent").images
    assert (by_text - by_embeds).abs().max().item() == 0.0
    deterministic = [pipe("a red cube", num_inference_steps=4, gamma=0.0, generator=seeded(seed),
                          latents=torch.ones(1, 4, 16, 16), output_type="latent").images for seed in (0, 1)]
    assert torch.equal(*deterministic)  # gamma = 0: no fresh noise between steps


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_embeds=torch.zeros(1, 77, 64)), "pooled_prompt_embeds"),
    (dict(prompt="a", negative_prompt_2="b"), "negative_prompt_2"),
    (dict(prompt="a", prompt_2=3), "prompt_2"),
    (dict(prompt="a", original_size=(0, 32)), "original_size"),
    (dict(prompt="a", crops_coords_top_left=(-1, 0)), "crops_coords_top_left"),
    (dict(prompt="a", negative_prompt="b"), "negative prompt"),
    (dict(prompt="a", height=33), "height"),
])
def test_bad_inputs_name_the_argument(lora_kit, kwargs, message):
    pipe, _, _ = lora_kit
    with pytest.raises(ValueError, match=message):
        pipe(num_inference_steps=1, **kwargs)


def test_save_pretrained_loads_in_stock_diffusers_and_back(tmp_path):
    pipe = LCMXLPipeline(**components(time_cond_proj_dim=8))
    pipe.save_pretrained(tmp_path / "xl", safe_serialization=True)
    index = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    loaded_stock = DiffusionPipeline.from_pretrained(tmp_path / "xl")
    assert type(loaded_stock) is StableDiffusionXLPipeline
    ours = LCMXLPipeline.from_pretrained(tmp_path / "xl")
    assert isinstance(ours.scheduler, ConsistencyScheduler)
    a = ours("a red cube", num_inference_steps=4, generator=seeded(), output_type="latent").images
    b = loaded_stock("a red cube", num_inference_steps=4, guidance_scale=8.5, generator=seeded(),
                     output_type="latent").images
    assert (a - b).abs().max().item() <= 1e-6


def test_fp16_vae_is_upcast_for_decoding(lora_kit):
    pipe, _, _ = lora_kit
    latents = pipe("a red cube", num_inference_steps=1, generator=seeded(), output_type="latent").images
    reference = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    pipe.vae.to(torch.float16)
    pipe.vae.config.force_upcast = True
    try:
        decoded = pipe._decode(latents.half())
        assert pipe.vae.dtype == torch.float16  # back to fp16 after the fp32 decode
        assert decoded.dtype == torch.float32
        assert (decoded - reference).abs().max().item() < 1e-2
    finally:
        pipe.vae.to(torch.float32)


def test_generate_takes_sdxl_folders_and_names_an_unsupported_family(tmp_path):
    from PIL import Image

    from lcm_kit.cli import main
    from lcm_kit.testing import save_tiny_pipeline

    folder = save_tiny_pipeline("sdxl", tmp_path / "xl")
    assert main(["generate", "--model", str(folder), "--prompt", "a cat", "--num_inference_steps", "2",
                 "--output", str(tmp_path / "xl.png")]) == 0
    assert Image.open(tmp_path / "xl.png").size == (32, 32)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusion3Pipeline"
    index["transformer"] = index.pop("unet")
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match=r"StableDiffusion3Pipeline with components \[.*'transformer'.*SDXL"):
        main(["generate", "--model", str(folder), "--prompt", "a cat", "--output", str(tmp_path / "x.png")])
