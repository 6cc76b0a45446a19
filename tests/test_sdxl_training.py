"""LCM distillation of an SDXL teacher on the tiny SDXL kit: micro-conditioning, SDXL defaults, the adapter in stock
diffusers (and as kohya), the full-weight folder in stock diffusers, caching, resume, ``accelerate launch``."""

import os
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionXLPipeline
from safetensors.torch import load_file

from lcm_kit.lora import load_lora_weights_strict
from lcm_kit.pipelines import LCMXLPipeline
from lcm_kit.pipelines.families import detect_family
from lcm_kit.training.args import SDXL_DEFAULTS, apply_family_defaults, build_lcm_lora_parser

META = torch.device("meta")


def sdxl_argv(train_argv, out, steps=4):
    return train_argv(out, kind="sdxl", steps=steps)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_family_is_read_from_the_folder_and_sdxl_defaults_fill_what_is_not_given(kit):
    assert detect_family(kit["sdxl"]) == "sdxl" and detect_family(kit["sd1"]) == "sd"
    argv = ["--pretrained_teacher_model", str(kit["sdxl"]), "--dataset_name", "d", "--w_min", "4"]
    args = apply_family_defaults(build_lcm_lora_parser().parse_args(argv), "sdxl", given=argv)
    assert (args.resolution, args.w_min, args.w_max, args.vae_encode_batch_size) == (1024, 4.0, 15.0, 8)
    assert SDXL_DEFAULTS["w_min"] == 3.0
    sd = apply_family_defaults(build_lcm_lora_parser().parse_args(argv), "sd", given=argv)
    assert (sd.resolution, sd.w_max, sd.vae_encode_batch_size) == (512, 15.0, 32)


def test_time_ids_come_from_each_sample_and_reach_teacher_and_student(lcm_objective):
    objective, _ = lcm_objective("lora", kind="sdxl")
    assert objective.family == "sdxl"
    cond = objective.encode_prompts(["a red cube", "a dog"])
    assert set(cond) == {"prompt_embeds", "pooled_prompt_embeds"} and cond["pooled_prompt_embeds"].shape == (2, 32)
    batch = {"pixel_values": torch.zeros(2, 3, 32, 32), "captions": ["a red cube", "a dog"],
             "original_sizes": torch.tensor([[40, 60], [32, 32]]), "crop_top_lefts": torch.tensor([[0, 14], [0, 0]])}
    ids = objective.prompts.time_ids(batch, 2)
    assert ids.tolist() == [[40, 60, 0, 14, 32, 32], [32, 32, 0, 0, 32, 32]]
    uncond = objective.prompts.uncond(2)
    assert all(torch.count_nonzero(v) == 0 for v in uncond.values())  # SDXL: zeroed empty prompt

    def loss_for(b):
        torch.manual_seed(0)
        return objective.compute_loss(objective.unet, b, 0, seeded())[0].item()

    moved = dict(batch, original_sizes=torch.tensor([[1024, 1024], [512, 768]]))
    assert loss_for(batch) != loss_for(moved)  # the micro-conditioning is an input of the step
    objective.prompts.use_fix_crop_and_size = True
    assert objective.prompts.time_ids(moved, 2).tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    with pytest.raises(ValueError, match="original_sizes"):
        objective.prompts.use_fix_crop_and_size = False
        objective.prompts.time_ids({"captions": ["a"]}, 1)


def test_sdxl_objective_on_meta(lcm_objective):
    """The device sweep for the SDXL objective: pooled embeddings and time ids built on the latents' device."""
    objective, _ = lcm_objective("full", kind="sdxl")
    objective.uncond_embeds
    for module in (objective.unet, objective.vae, objective.text_encoder, objective.text_encoder_2,
                   objective.teacher_unet, objective.target_unet):
        module.to(META)
    objective.loss.alphas_cumprod = objective.loss.alphas_cumprod.to(META)
    objective.prompts.to(META)
    objective.device = META
    batch = {"latents": torch.randn(2, 8, 4, 4, device=META), "prompt_embeds": torch.randn(2, 77, 64, device=META),
             "pooled_prompt_embeds": torch.randn(2, 32, device=META),
             "original_sizes": torch.ones(2, 2, dtype=torch.int64, device=META),
             "crop_top_lefts": torch.zeros(2, 2, dtype=torch.int64, device=META)}
    loss, _ = objective.compute_loss(objective.unet, batch, 0, None)
    loss.backward()
    assert loss.device == META


def test_lora_run_loads_completely_in_stock_sdxl_and_as_kohya(kit, tmp_path, train_argv, reset_accelerate,
                                                              hub_client, hub_token):
    """A short SDXL LCM-LoRA run with validation and a Hub upload (fake client): the adapter loads completely in
    stock SDXL (alpha kept: it equals lcm-kit's strict load), the kohya export gives the same result."""
    from lcm_kit.training.train_lcm_lora import main as train_lcm_lora

    out = tmp_path / "lora"
    train_lcm_lora(sdxl_argv(train_argv, out)[:-1] + [
        "--lora_rank", "4", "--lora_alpha", "8", "--export_kohya", "--learning_rate", "1e-2",
        "--validation_prompts", "a red cube", "--validation_steps", "4",
        "--push_to_hub", "--hub_model_id", "me/lcm-lora-sdxl", "--hub_token", hub_token], hub_client=hub_client)
    (_, repo_id, _), (_, upload, files) = hub_client.calls
    assert repo_id == "me/lcm-lora-sdxl" and {"README.md", "pytorch_lora_weights.safetensors"} <= files
    card = (out / "README.md").read_text()
    assert "- sdxl" in card and "validation/step-000004.png" in card and hub_token not in card
    lora_file = out / "pytorch_lora_weights.safetensors"
    stock = StableDiffusionXLPipeline.from_pretrained(kit["sdxl"])
    stock.scheduler = LCMScheduler.from_config(stock.scheduler.config)
    base = stock("a red cube", num_inference_steps=1, guidance_scale=1.0, generator=seeded(),
                 output_type="latent").images
    stock.load_lora_weights(str(lora_file))
    strict = LCMXLPipeline.from_pretrained(kit["sdxl"])
    load_lora_weights_strict(strict, lora_file)  # every tensor applied, alpha / rank read from the metadata
    probe = dict(num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    ours = strict("a red cube", generator=seeded(), **probe).images
    theirs = stock("a red cube", generator=seeded(), **probe).images
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (theirs - base).abs().max().item() > 1e-4  # the adapter changed the model
    kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors")
    assert kohya and all(key.startswith("lora_unet_") for key in kohya)
    diffusers_tensors = load_file(lora_file)
    for key, tensor in diffusers_tensors.items():  # the export renames, it never changes a tensor
        module, matrix = key.removeprefix("unet.").rsplit(".lora_", 1)
        kohya_key = "lora_unet_" + module.replace(".", "_") + {"A.weight": ".lora_down.weight",
                                                                "B.weight": ".lora_up.weight"}[matrix]
        assert torch.equal(kohya[kohya_key], tensor), kohya_key
    from_kohya = StableDiffusionXLPipeline.from_pretrained(kit["sdxl"])
    from_kohya.scheduler = LCMScheduler.from_config(from_kohya.scheduler.config)
    from_kohya.load_lora_weights(str(out / "pytorch_lora_weights_kohya.safetensors"))
    kohya_out = from_kohya("a red cube", generator=seeded(), **probe).images
    # Same tensors, same alpha; stock diffusers builds the kohya adapter's peft config from other target names, and
    # the outputs (magnitude ~70) then differ by a few fp32 ulps, hence the relative term.
    torch.testing.assert_close(kohya_out, theirs, rtol=1e-6, atol=1e-5)


def test_cached_run_resumes_bit_exactly(kit, tmp_path, train_argv, reset_accelerate):
    """--cache_latents and --cache_text_embeddings (both encoders, the pooled embedding, the geometry rows); a run
    stopped at a checkpoint and resumed ends with the adapter of the straight run."""
    from lcm_kit.training.train_lcm_lora import main as train_lcm_lora

    flags = ["--lora_rank", "4", "--cache_latents", "--cache_text_embeddings", "--random_flip",
             "--checkpointing_steps", "2", "--learning_rate", "1e-3"]
    straight = tmp_path / "straight"
    train_lcm_lora(sdxl_argv(train_argv, straight)[:-1] + flags + ["--validation_prompts"])
    cache_files = list((straight / "cache" / "encoded").rglob("shard-*.safetensors"))
    rows = load_file(cache_files[0])
    assert {"pooled_prompt_embeds", "prompt_embeds", "original_sizes", "crop_top_lefts",
            "crop_top_lefts_flipped", "latents", "latents_flipped"} <= set(rows)
    assert rows["original_sizes"].tolist()[0] == [40, 40]
    resumed = tmp_path / "resumed"
    reset_accelerate()
    train_lcm_lora(sdxl_argv(train_argv, resumed, steps=2)[:-1] + flags + ["--validation_prompts"])
    reset_accelerate()
    train_lcm_lora(sdxl_argv(train_argv, resumed)[:-1] + flags + ["--resume_from_checkpoint", "latest",
                                                                  "--validation_prompts"])
    a = load_file(straight / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_run_via_accelerate_launch_saves_a_folder_stock_sdxl_samples(kit, tmp_path, train_argv):
    out = tmp_path / "full"
    argv = sdxl_argv(train_argv, out, steps=2)[:-1] + ["--unet_time_cond_proj_dim", "32", "--validation_prompts",
                                                       "a red cube", "--validation_steps", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    script = os.path.join(os.path.dirname(__file__), "..", "train_scripts", "train_lcm.py")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", script, *argv]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "validation" / "step-000002.png").is_file()
    stock = DiffusionPipeline.from_pretrained(out)
    assert type(stock) is StableDiffusionXLPipeline and stock.unet.config.time_cond_proj_dim == 32
    ours = LCMXLPipeline.from_pretrained(out)
    a = ours("a red cube", num_inference_steps=4, guidance_scale=4.0, generator=seeded(), output_type="latent").images
    b = stock("a red cube", num_inference_steps=4, guidance_scale=4.0, generator=seeded(),
              output_type="latent").images
    assert torch.isfinite(a).all() and (a - b).abs().max().item() <= 1e-6


def test_model_card_of_an_sdxl_lcm_uses_the_sdxl_pipeline():
    from lcm_kit.training.hub import render_model_card

    card = render_model_card("stabilityai/stable-diffusion-xl-base-1.0", "me/lcm-sdxl", lora=False,
                             training_command="train_lcm.py", sdxl=True)
    assert "StableDiffusionXLPipeline.from_pretrained(\"stabilityai/stable-diffusion-xl-base-1.0\", unet=unet" in card
    assert "- sdxl" in card and "LatentConsistencyModelPipeline" not in card
