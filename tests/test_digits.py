"""Digits data (split, upscaling, captions), the small CLIP tokenizer, teacher training and the shipped teacher."""

import json
import random

import numpy as np
import pytest
import torch

from lcm_kit import digits
from lcm_kit.digits import data as digits_data
from lcm_kit.digits import teacher as teacher_training
from lcm_kit.digits import teacher_report
from lcm_kit.digits.tokenizer import build_caption_tokenizer

# ---------------------------------------------------------------------------------------------------------- data


def test_split_is_deterministic_disjoint_stratified():
    train, heldout = digits.split_indices()
    train2, heldout2 = digits.split_indices()
    assert np.array_equal(train, train2) and np.array_equal(heldout, heldout2)
    assert len(train) + len(heldout) == 1797 and len(heldout) == 360
    assert not set(train) & set(heldout)
    _, labels = digits_data._raw_digits()
    for d in range(10):  # stratified: each digit ~20% held out
        fraction = (labels[heldout] == d).sum() / (labels == d).sum()
        assert abs(fraction - 0.2) < 0.02
    other, _ = digits.split_indices(seed=1)
    assert not np.array_equal(train, other)


def test_upscale_values_and_layout():
    raw = np.zeros((1, 8, 8), dtype=np.float32)
    raw[0, 2, 5] = 16.0
    nearest = digits.upscale(raw, 32, mode="nearest")
    assert nearest.shape == (1, 3, 32, 32) and nearest.dtype == torch.float32
    expected = torch.full((32, 32), -1.0)
    expected[8:12, 20:24] = 1.0  # one 8x8 pixel -> a 4x4 block, ink white on black
    assert torch.equal(nearest[0, 0], expected)
    assert torch.equal(nearest[0, 0], nearest[0, 2])
    images, labels = digits.load_split("heldout")
    assert images.shape == (360, 3, 32, 32) and labels.shape == (360,)
    assert images.min() >= -1.0 and images.max() <= 1.0
    # bicubic keeps the 8x8 content: average-pooling back to 8x8 is close to the original scan
    raw_all, raw_labels = digits_data._raw_digits()
    _, heldout = digits.split_indices()
    pooled = torch.nn.functional.avg_pool2d((images[:, :1] + 1) / 2, 4)[:, 0]
    error = (pooled - torch.as_tensor(raw_all[heldout] / 16.0)).abs()
    assert error.mean() < 0.06 and error.max() < 0.3  # measured 0.045 / 0.25 (bicubic smoothing)
    assert torch.equal(labels, torch.as_tensor(raw_labels[heldout]))
    with pytest.raises(ValueError, match="mode"):
        digits.upscale(raw, 32, mode="lanczos")
    with pytest.raises(ValueError, match="split"):
        digits.load_split("test")


def test_captions_have_variety_name_the_digit_and_drop_out():
    rng = random.Random(0)
    for d in range(10):
        captions = {digits.caption_for(d, rng) for _ in range(300)}
        assert len(captions) >= 10
        assert all(str(d) in c or digits.DIGIT_WORDS[d] in c.split() for c in captions)
    dropped = sum(digits.caption_for(3, rng, caption_dropout=0.1) == "" for _ in range(4000)) / 4000
    assert abs(dropped - 0.1) < 0.03
    with pytest.raises(ValueError, match="digit"):
        digits.caption_for(10, rng)
    assert digits.eval_prompt(7) == "a handwritten 7"


def test_dataset_is_reproducible_and_varies_by_epoch():
    a = digits.DigitsDataset("train", caption_dropout=0.1, seed=3)
    b = digits.DigitsDataset("train", caption_dropout=0.1, seed=3)
    first = [a[i]["caption"] for i in range(50)]
    assert first == [b[i]["caption"] for i in range(50)]
    a.set_epoch(1)
    assert first != [a[i]["caption"] for i in range(50)]
    item = a[0]
    assert item["pixel_values"].shape == (3, 32, 32) and 0 <= item["label"] <= 9
    hf = digits.to_hf_dataset("heldout")
    assert len(hf) == 360 and set(hf.column_names) == {"image", "text", "label"}
    assert hf[0]["image"].size == (32, 32)


# ----------------------------------------------------------------------------------------------------- tokenizer


def test_small_tokenizer_matches_full_clip_on_captions(tmp_path):
    from lcm_kit.testing import clip_tokenizer

    small = build_caption_tokenizer(digits.caption_vocabulary(), tmp_path / "tok")
    full = clip_tokenizer()
    texts = [t.format(n=d, word=digits.DIGIT_WORDS[d]) for d in range(10) for t in digits.CAPTION_TEMPLATES]
    for text in texts + [""]:
        assert small.tokenize(text) == full.tokenize(text), text
    assert len(small) < 700  # vs 49,408
    ids = small("a handwritten 7").input_ids
    assert ids[0] == small.get_vocab()["<|startoftext|>"] and ids[-1] == small.get_vocab()["<|endoftext|>"]
    # a word outside the caption vocabulary still tokenizes (byte symbols) and round-trips
    assert small.decode(small("zebra crossing").input_ids, skip_special_tokens=True).strip() == "zebra crossing"


# ---------------------------------------------------------------------------------------------- teacher training


def _tiny_config(**overrides):
    values = dict(vae_steps=2, unet_steps=2, batch_size=4, vae_batch_size=4, lr_warmup_steps=1,
                  vae_block_out_channels=(8, 8, 8), unet_block_out_channels=(16, 32), text_hidden_size=16,
                  text_intermediate_size=16)
    values.update(overrides)
    return teacher_training.TeacherConfig(**values)


def test_teacher_stages_are_deterministic(tmp_path):
    config = _tiny_config(seed=5)
    tokenizer = build_caption_tokenizer(digits.caption_vocabulary(), tmp_path / "tok")
    images, labels = digits.load_split("train")
    images, labels = images[:16], labels[:16]

    def run():
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        vae = teacher_training.build_vae(config)
        teacher_training.train_vae(vae, images, config, generator)
        mean, std = teacher_training.encode_latent_distribution(vae, images)
        text_encoder = teacher_training.build_text_encoder(tokenizer, config)
        unet = teacher_training.build_unet(config, vae_scale_factor=4)
        stats = teacher_training.train_unet_and_text_encoder(
            unet, text_encoder, tokenizer, teacher_training.build_scheduler(), mean, std, labels, 1.0, config,
            generator,
        )
        return mean, unet.state_dict(), text_encoder.state_dict(), stats

    first, second = run(), run()
    assert torch.equal(first[0], second[0]) and first[3] == second[3]
    for a, b in ((first[1], second[1]), (first[2], second[2])):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_teacher_saves_a_stock_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    teacher_training.train_teacher(_tiny_config(seed=5), tmp_path / "a", command="python train_teacher.py")
    record = json.loads((tmp_path / "a" / "training_config.json").read_text())
    assert record["config"]["seed"] == 5 and record["stats"]["vae_scaling_factor"] > 0
    assert record["command"] == "python train_teacher.py"
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "a")
    assert pipe.vae.config.scaling_factor == pytest.approx(record["stats"]["vae_scaling_factor"])
    assert pipe.unet.config.sample_size == 8 and pipe.vae_scale_factor == 4
    assert pipe.unet.dtype == torch.float32  # stored float16, loads float32
    out = pipe("a handwritten 3", num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    readme = teacher_report.write_teacher_readme(tmp_path / "a", record).read_text()
    assert "python train_teacher.py" in readme and "seed: 5" in readme
    with pytest.raises(ValueError, match="caption_dropout"):
        _tiny_config(caption_dropout=1.5)


# --------------------------------------------------------------------------------------------- shipped teacher


@pytest.fixture(scope="module")
def shipped_teacher():
    from diffusers import StableDiffusionPipeline

    if not (digits.teacher_path() / "model_index.json").is_file():
        pytest.fail("the shipped digits teacher is missing: run train_scripts/train_teacher.py")
    pipe = StableDiffusionPipeline.from_pretrained(digits.teacher_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_teacher_is_a_small_stock_sd_folder(shipped_teacher):
    from transformers import CLIPTokenizer

    pipe = shipped_teacher
    assert teacher_training.safetensors_megabytes(digits.teacher_path()) <= 10.0
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32
    assert pipe.text_encoder.dtype == torch.float32
    sched = pipe.scheduler.config
    assert (sched.prediction_type, sched.beta_schedule, sched.beta_start, sched.beta_end,
            sched.num_train_timesteps) == ("epsilon", "scaled_linear", 0.00085, 0.012, 1000)
    tokenizer = CLIPTokenizer.from_pretrained(digits.teacher_path() / "tokenizer")
    assert tokenizer("the digit seven").input_ids == pipe.tokenizer("the digit seven").input_ids
    assert len(tokenizer) == pipe.text_encoder.config.vocab_size
    assert (digits.teacher_path() / "README.md").read_text().count("train_teacher.py") >= 1


def test_shipped_teacher_generates_the_prompted_digit(shipped_teacher):
    from lcm_kit.eval import evaluate_pipeline

    row = evaluate_pipeline(shipped_teacher, "dpmsolver", 25, 3.0, num_per_digit=3, seed=123)
    assert row["accuracy"] >= 0.9, row


@pytest.mark.slow
def test_shipped_teacher_generates_the_prompted_digit_200_samples(shipped_teacher):
    from lcm_kit.eval import evaluate_pipeline, real_floor

    row = evaluate_pipeline(shipped_teacher, "dpmsolver", 25, 3.0, num_per_digit=20, seed=0)
    assert row["accuracy"] >= 0.9, row
    assert row["fd"] < 10 * real_floor(num_per_digit=20)["fd"], row


def test_shipped_teacher_loads_in_lcm_pipeline():
    from lcm_kit.pipelines import LCMPipeline

    pipe = LCMPipeline.from_pretrained(digits.teacher_path())
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
