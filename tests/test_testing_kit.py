"""The offline tiny-model kit: real CLIP BPE tokenization, loadable diffusers folders for every family."""

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from lcm_kit.testing import clip_tokenizer, save_tiny_pipeline, tiny_sd_components


def test_clip_tokenizer_matches_openai_clip_ids():
    ids = clip_tokenizer()("a photo of a cat").input_ids
    # Token ids of openai/clip-vit-large-patch14 for this prompt.
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_builders_are_deterministic():
    a, b = tiny_sd_components("sd1", seed=3), tiny_sd_components("sd1", seed=3)
    for name in ("unet", "vae", "text_encoder"):
        for (k, p), (_, q) in zip(a[name].state_dict().items(), b[name].state_dict().items()):
            assert torch.equal(p, q), f"{name}.{k} differs between two builds with the same seed"


def test_saved_folders_load_in_stock_diffusers(tmp_path):
    sd2 = StableDiffusionPipeline.from_pretrained(save_tiny_pipeline("sd2", tmp_path / "sd2"))
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    out = sd2("a cat", num_inference_steps=2, height=32, width=32, output_type="np",
              generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(out)).all()
    xl = StableDiffusionXLPipeline.from_pretrained(save_tiny_pipeline("sdxl", tmp_path / "xl"))
    assert xl.unet.config.addition_embed_type == "text_time"
    lcm = StableDiffusionPipeline.from_pretrained(save_tiny_pipeline("sd1", tmp_path / "lcm", time_cond_proj_dim=32))
    assert lcm.unet.config.time_cond_proj_dim == 32
