"""enable_fast_inference: outputs equal the eager LCMPipeline's, switching off restores every weight bit for bit, the
prompt cache never serves a stale embedding, unsupported calls take the normal path, one compile per shape.

CPU float32 on the tiny kit (32x32 pixels, 16x16 latents) and the shipped digits teacher.
"""

import copy

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from diffusers import AutoencoderTiny, LCMScheduler
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from lcm_kit.digits.data import eval_prompt, teacher_path
from lcm_kit.lora import add_lcm_lora
from lcm_kit.pipelines import LCMPipeline
from lcm_kit.testing import tiny_sd_components

SIZE = dict(height=32, width=32)
PROMPTS = ["a red cube on a table", "a cat"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randomize(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def lora_components():
    """The tiny SD1 kit with a randomised LCM-LoRA on the UNet."""
    components = tiny_sd_components("sd1")
    add_lcm_lora(components["unet"], 4, 8)
    randomize(components["unet"])
    return components


def pair(components, **enable):
    """(fast, eager): the same weights, fast inference switched on in the first only."""
    fast = LCMPipeline(**copy.deepcopy(components), requires_safety_checker=False)
    eager = LCMPipeline(**copy.deepcopy(components), requires_safety_checker=False)
    for pipe in (fast, eager):
        pipe.set_progress_bar_config(disable=True)
    fast.enable_fast_inference(**enable)
    return fast, eager


def digits_pair():
    """(fast, eager) shipped digits teachers with the same randomised LCM-LoRA; fast inference not yet switched on."""
    pipes = []
    for _ in range(2):
        pipe = LCMPipeline.from_pretrained(teacher_path(), safety_checker=None, requires_safety_checker=False)
        add_lcm_lora(pipe.unet, 8, 8)
        randomize(pipe.unet, seed=1, std=0.02)
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    return tuple(pipes)


def run(pipe, prompt=PROMPTS, output_type="latent", seed=0, **kwargs):
    return pipe(prompt, generator=gen(seed), output_type=output_type, **{**SIZE, **kwargs}).images


def max_diff(a, b):
    return (a - b).abs().max().item()


def close(a, b, rtol=1e-5):
    """Equal up to float32 rounding (fused LoRA weights round differently): relative to the largest value."""
    return max_diff(a, b) <= rtol * (1 + b.abs().max().item())


CALLS = [
    dict(),
    dict(num_images_per_prompt=2),
    dict(guidance_scale=1.5, negative_prompt=["blurry", ""]),
    dict(timesteps=[999, 759, 499, 259]),
    dict(num_inference_steps=1),
    dict(prompt="one prompt", generator=[gen(1), gen(2)], num_images_per_prompt=2),
    dict(latents=torch.randn(2, 4, 16, 16, generator=gen(5))),
    dict(output_type="pt"),
    dict(output_type="np"),
]


def test_fast_path_equals_the_eager_pipeline_bit_for_bit(lora_components):
    fast, eager = pair(lora_components, fuse_lora=False)
    for call in CALLS:
        outputs = [pipe(**{"prompt": PROMPTS, "generator": gen(3), "output_type": "latent", **SIZE,
                           **copy.deepcopy(call)}).images for pipe in (fast, eager)]
        a, b = (torch.as_tensor(o) for o in outputs)
        assert a.shape == b.shape and torch.equal(a, b), (call, max_diff(a, b))
    stats = fast.fast_inference_stats
    assert stats["fast_calls"] == len(CALLS) and stats["fallbacks"] == {}
    # PIL output, and the same call again from the caches
    for _ in range(2):
        assert [list(i.getdata()) for i in run(fast, output_type="pil")] == [
            list(i.getdata()) for i in run(eager, output_type="pil")]
    assert fast.fast_inference_stats["prompt_cache_hits"] >= 2


def test_fast_path_with_fused_lora_equals_eager(lora_components):
    fast, eager = pair(lora_components)
    assert fast.fast_inference_stats["lora_fused"]
    unfused = run(eager, output_type="pt")
    assert close(run(fast, output_type="pt"), unfused)
    eager.fuse_lora(components=["unet"])  # the same fused weights: the same bits
    assert torch.equal(run(fast), run(eager))
    assert max_diff(run(eager, output_type="pt"), unfused) > 0  # fusing rounds: the first check compared something


def test_distilled_lcm_and_lcm_scheduler_equal_eager():
    components = tiny_sd_components("sd1", time_cond_proj_dim=32)
    fast, eager = pair(components)
    for kwargs in (dict(), dict(guidance_scale=3.0), dict(guidance_scale=3.0, num_images_per_prompt=2)):
        assert torch.equal(run(fast, **kwargs), run(eager, **kwargs)), kwargs
    # diffusers' LCMScheduler instead of the ConsistencyScheduler
    for pipe in (fast, eager):
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    assert torch.equal(run(fast, output_type="pt"), run(eager, output_type="pt"))
    assert fast.fast_inference_stats["fast_calls"] == 4 and fast.fast_inference_stats["fallbacks"] == {}


def test_digits_teacher_with_lcm_lora_equals_eager():
    fast, eager = digits_pair()
    fast.enable_fast_inference()
    prompts = [eval_prompt(d) for d in (0, 3, 7, 9)]
    for output_type in ("latent", "pt"):
        a, b = (run(p, prompts, output_type, height=32, width=32) for p in (fast, eager))
        assert close(a, b), output_type
    assert fast.fast_inference_stats["fast_calls"] == 2 and fast.fast_inference_stats["lora_fused"]


def test_reduced_precision_fast_path_equals_the_eager_pipeline_in_that_precision(lora_components):
    fast, eager = pair(lora_components, dtype=torch.bfloat16, fuse_lora=False)
    assert {fast.unet.dtype, fast.vae.dtype, fast.text_encoder.dtype} == {torch.bfloat16}
    eager.to(dtype=torch.bfloat16)
    assert torch.equal(run(fast, output_type="pt"), run(eager, output_type="pt"))
    fast.disable_fast_inference()
    assert {fast.unet.dtype, fast.vae.dtype, fast.text_encoder.dtype} == {torch.float32}


def test_switching_on_and_off_restores_weights_processors_and_outputs(lora_components):
    fast, eager = pair(lora_components, fuse_lora=False)
    fast.disable_fast_inference()
    for pipe in (fast, eager):
        pipe.unet.set_attn_processor(AttnProcessor())
    weights = {k: v.clone() for k, v in fast.unet.state_dict().items()}
    expected = run(eager, output_type="pt")

    fast.enable_fast_inference(channels_last=True)
    assert fast.fast_inference_stats["lora_fused"]
    assert {type(p) for p in fast.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    changed = [k for k, v in fast.unet.state_dict().items() if not torch.equal(v, weights[k])]
    assert any(k.endswith("base_layer.weight") for k in changed)  # really fused
    assert close(run(fast, output_type="pt"), expected)

    fast.disable_fast_inference()
    assert not fast.fast_inference_enabled and fast.fast_inference_stats is None
    after = fast.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    assert all(not m.merged for m in fast.unet.modules() if isinstance(m, BaseTunerLayer))
    assert fast.num_fused_loras == 0
    assert {type(p) for p in fast.unet.attn_processors.values()} == {AttnProcessor}
    assert fast.unet.conv_in.weight.is_contiguous()
    assert torch.equal(run(fast, output_type="pt"), expected)


def test_disable_can_keep_the_lora_fused(lora_components):
    fast, eager = pair(lora_components)
    fast.disable_fast_inference(unfuse_lora=False)
    eager.fuse_lora(components=["unet"])
    assert fast.num_fused_loras == 1
    assert torch.equal(run(fast), run(eager))
    fast.unfuse_lora(components=["unet"])  # now diffusers' own bookkeeping and unfuse
    assert fast.num_fused_loras == 0


def test_lora_scale_is_fused_and_a_per_call_scale_is_an_error(lora_components):
    fast, eager = pair(lora_components, lora_scale=0.5)
    scaled = run(eager, cross_attention_kwargs={"scale": 0.5})
    assert close(run(fast), scaled)
    with pytest.raises(ValueError, match="cross_attention_kwargs"):
        run(fast, cross_attention_kwargs={"scale": 0.7})
    weights = copy.deepcopy(lora_components["unet"]).state_dict()
    fast.disable_fast_inference()
    after = fast.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())  # scalings restored with the weights
    assert torch.equal(run(fast), run(eager))


def text_encoder_lora_file(components, folder, seed):
    """A random text-encoder LoRA in the file format diffusers' ``save_lora_weights`` writes (peft's own
    ``add_adapter`` on transformers 5 wants a newer peft, so the layers are injected directly)."""
    text_encoder = copy.deepcopy(components["text_encoder"])
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                            text_encoder)
    g = torch.Generator().manual_seed(seed)
    layers = {name.replace(".default", ""): torch.randn(p.shape, generator=g) * 0.2
              for name, p in text_encoder.named_parameters() if "lora_" in name}
    LCMPipeline.save_lora_weights(folder, text_encoder_lora_layers=layers)
    return folder


def test_prompt_cache_is_never_stale(lora_components, tmp_path):
    fast, eager = pair(lora_components)
    encodes = []
    fast.text_encoder.register_forward_hook(lambda *args: encodes.append(1))

    def same(**kwargs):
        a, b = run(fast, **kwargs), run(eager, **kwargs)
        assert close(a, b), kwargs
        return a

    before = same()
    same()
    assert len(encodes) == 1 and fast.fast_inference_stats["prompt_cache_hits"] == 1

    lora = text_encoder_lora_file(lora_components, tmp_path / "te", seed=7)
    for pipe in (fast, eager):
        pipe.load_lora_weights(lora, adapter_name="te")
    with_te_lora = same()
    assert len(encodes) == 2 and max_diff(with_te_lora, before) > 1e-3

    for pipe in (fast, eager):
        pipe.set_adapters(["default", "te"], adapter_weights=[1.0, 0.3])
    weighted = same()
    assert len(encodes) == 3 and max_diff(weighted, with_te_lora) > 1e-4

    skipped = same(clip_skip=1)
    assert len(encodes) == 4 and max_diff(skipped, weighted) > 1e-3
    same()
    assert len(encodes) == 4  # the clip_skip=None entry is still valid

    for pipe in (fast, eager):
        pipe.delete_adapters("te")
    assert close(same(), before)
    assert fast.fast_inference_stats["lora_fused"]


def test_prompt_cache_can_be_switched_off(lora_components):
    fast, _ = pair(lora_components, prompt_cache_size=0)
    encodes = []
    fast.text_encoder.register_forward_hook(lambda *args: encodes.append(1))
    run(fast)
    run(fast)
    assert len(encodes) == 2


def test_replaced_components_are_picked_up(lora_components):
    fast, eager = pair(lora_components)
    run(fast)
    other = tiny_sd_components("sd1", seed=3)
    for pipe in (fast, eager):
        pipe.unet, pipe.text_encoder = copy.deepcopy(other["unet"]), copy.deepcopy(other["text_encoder"])
    assert torch.equal(run(fast, output_type="pt"), run(eager, output_type="pt"))
    assert not fast.fast_inference_stats["lora_fused"]  # the new UNet has no LoRA


def test_unsupported_calls_take_the_normal_path(lora_components):
    fast, eager = pair(lora_components, fuse_lora=False)
    image = torch.rand(1, 3, 32, 32, generator=gen(9)) * 2 - 1
    steps = []
    callback = lambda pipe, i, t, tensors: steps.append(i) or tensors  # noqa: E731
    calls = {
        "image-to-image": dict(prompt="a cat", image=image, strength=0.6),
        "callback_on_step_end": dict(callback_on_step_end=callback),
        "gamma < 1": dict(gamma=0.5),
        "cross_attention_kwargs": dict(cross_attention_kwargs={"scale": 0.5}),
    }
    for reason, call in calls.items():
        a, b = (p(**{"prompt": PROMPTS, "generator": gen(), "output_type": "latent", **SIZE, **call}).images
                for p in (fast, eager))
        assert torch.equal(a, b), reason
        assert fast.fast_inference_stats["fallbacks"][reason] == 1
    assert steps == [0, 1, 2, 3, 0, 1, 2, 3] and fast.fast_inference_stats["fast_calls"] == 0
    for pipe in (fast, eager):  # an offloading hook (what enable_model_cpu_offload attaches)
        add_hook_to_module(pipe.unet, ModelHook())
    assert torch.equal(run(fast), run(eager)) and fast.fast_inference_stats["fallbacks"]["offloading hooks"] == 1
    with pytest.raises(ValueError, match="offloading"):
        fast.enable_fast_inference()
    remove_hook_from_module(fast.unet)
    run(fast)
    assert fast.fast_inference_stats["fast_calls"] == 1
    with pytest.raises(ValueError, match="height"):  # invalid input on the fast path: the pipeline's own error
        run(fast, height=33)


def test_tiny_decoder_decodes_the_fast_path_only(lora_components):
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4).eval()
    fast, eager = pair(lora_components, fuse_lora=False, vae=tiny)
    latents = run(eager)
    with torch.no_grad():
        decoded = tiny.decode(latents / tiny.config.scaling_factor, return_dict=False)[0]
    expected = eager.image_processor.postprocess(decoded, output_type="pt")
    assert torch.equal(run(fast, output_type="pt"), expected)
    # the normal path keeps pipe.vae, and so does the fast path once switched off
    full = run(eager, output_type="pt")
    assert max_diff(full, expected) > 1e-2
    assert torch.equal(run(fast, output_type="pt", callback_on_step_end=lambda p, i, t, k: k), full)
    fast.disable_fast_inference()
    assert torch.equal(run(fast, output_type="pt"), full)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dtype="fp16"), ValueError, "dtype"),
        (dict(compile="yes"), TypeError, "compile"),
        (dict(compile_mode="fastest"), ValueError, "compile_mode"),
        (dict(compile_mode="default", backend="eager"), ValueError, "compile_mode"),
        (dict(backend=3), TypeError, "backend"),
        (dict(fuse_lora=None), TypeError, "fuse_lora"),
        (dict(lora_scale=float("nan")), ValueError, "lora_scale"),
        (dict(prompt_cache_size=-1), ValueError, "prompt_cache_size"),
        (dict(vae="taesd"), TypeError, "vae"),
        (dict(vae=AutoencoderTiny(encoder_block_out_channels=(8,), decoder_block_out_channels=(8,),
                                  num_encoder_blocks=(1,), num_decoder_blocks=(1,), latent_channels=3)),
         ValueError, "latent_channels"),
    ],
)
def test_bad_settings_are_rejected(lora_components, kwargs, error, match):
    pipe = LCMPipeline(**lora_components, requires_safety_checker=False)
    with pytest.raises(error, match=match):
        pipe.enable_fast_inference(**kwargs)
    assert not pipe.fast_inference_enabled


def test_compiles_once_per_shape_never_per_call_or_step_count():
    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    fast, eager = pair(tiny_sd_components("sd1"), compile=True, backend=counting_backend)
    try:
        counts = []
        for kwargs in (dict(), dict(), dict(num_inference_steps=2), dict(timesteps=[999, 499, 99]),
                       dict(prompt="one"), dict(), dict(prompt="one", num_inference_steps=3)):
            assert close(run(fast, **kwargs), run(eager, **kwargs)), kwargs
            counts.append(len(graphs))
        first = counts[0]
        assert first >= 1
        assert counts[:4] == [first] * 4  # same shape: no compile, whatever the steps
        assert counts[4] > first and counts[4:] == [counts[4]] * 3  # batch 1: one more; both shapes stay cached
        run(fast, output_type="pt")
        decode = len(graphs)
        assert decode > counts[-1]  # the VAE decode compiled once...
        run(fast, output_type="pt", num_inference_steps=2)
        assert len(graphs) == decode  # ...and not again
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_fast_path_equals_eager_on_the_digits_teacher():
    torch._dynamo.reset()
    fast, eager = digits_pair()
    fast.enable_fast_inference(compile=True)
    prompts = [eval_prompt(d) for d in (1, 4)]
    try:
        for output_type in ("pt", "pt", "latent"):
            assert close(run(fast, prompts, output_type), run(eager, prompts, output_type), rtol=1e-4)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        run(fast, prompts, "pt", num_inference_steps=2)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    finally:
        torch._dynamo.reset()


def test_fused_qkv_projections_match_and_are_undone(lora_components):
    fast, eager = pair(lora_components, fuse_qkv=True)
    weights = {k: v.clone() for k, v in copy.deepcopy(lora_components["unet"]).state_dict().items()}
    attention = fast.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    assert hasattr(attention.attn1, "to_qkv") and hasattr(attention.attn2, "to_kv")
    assert hasattr(fast.vae.decoder.mid_block.attentions[0], "to_qkv")
    assert close(run(fast, output_type="pt"), run(eager, output_type="pt"))
    assert close(run(fast, guidance_scale=1.5), run(eager, guidance_scale=1.5))
    # a LoRA change unfuses (the fused projection holds the old LoRA) and the next call fuses again
    for pipe in (fast, eager):
        pipe.set_adapters(["default"], adapter_weights=[0.5])
    assert not hasattr(attention.attn1, "to_qkv")
    assert close(run(fast), run(eager)) and hasattr(attention.attn1, "to_qkv")
    for pipe in (fast, eager):
        pipe.set_adapters(["default"], adapter_weights=[1.0])
    fast.disable_fast_inference()
    assert not hasattr(attention.attn1, "to_qkv") and not attention.attn1.fused_projections
    assert {type(p) for p in fast.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert fast.unet.state_dict().keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in fast.unet.state_dict().items())
    assert torch.equal(run(fast), run(eager))


def test_qkv_projections_stay_apart_over_an_unfused_lora(lora_components):
    fast, eager = pair(lora_components, fuse_qkv=True, fuse_lora=False)
    assert not hasattr(fast.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1, "to_qkv")
    assert hasattr(fast.vae.decoder.mid_block.attentions[0], "to_qkv")  # no LoRA there
    assert close(run(fast, output_type="pt"), run(eager, output_type="pt"))


def test_a_warm_call_never_walks_the_modules(lora_components):
    """diffusers' ``ModelMixin.device`` / ``.dtype`` and ``pipe._execution_device`` scan every submodule for
    offloading hooks (milliseconds on an SD1.5 UNet), lcm-kit's cheaper ``pipe._execution_device`` once per
    submodule: the fast path reads none of them once warm."""
    from unittest import mock

    from diffusers import DiffusionPipeline, ModelMixin

    fast, eager = pair(lora_components)
    expected = run(eager, output_type="pt")
    run(fast, output_type="pt")

    def walked(self):
        raise AssertionError("a per-call module walk")

    from lcm_kit.pipelines.execution_device import ExecutionDeviceMixin

    with mock.patch.object(ModelMixin, "device", property(walked)), \
            mock.patch.object(ModelMixin, "dtype", property(walked)), \
            mock.patch.object(DiffusionPipeline, "_execution_device", property(walked)), \
            mock.patch.object(ExecutionDeviceMixin, "_execution_device", property(walked)), \
            mock.patch.object(ExecutionDeviceMixin, "device", property(walked)):
        assert close(run(fast, output_type="pt"), expected)
        with pytest.raises(AssertionError, match="module walk"):
            run(eager, output_type="pt")  # the eager path does walk: the patch is live
