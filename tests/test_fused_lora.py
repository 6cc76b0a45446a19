"""Fused LoRA forward (``lcm_kit.training.fused_lora.fused_lora_forward``): one op per LoRA layer with ``W + s·B·A`` built
differentiably must be peft's unfused ``base(x) + B(A(x))·s`` — same outputs, same gradients of lora_A / lora_B —
for Linear and Conv2d layers (1x1, 3x3, strided) and for the whole tiny UNet; adapter-disabled (teacher) forwards
are untouched, and the LCM objective's loss and gradients do not change when it fuses.

float64 where the comparison is of the function itself (rounding of float32 would only blur the check).
"""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from lcm_kit.lora import add_lcm_lora
from lcm_kit.testing import tiny_unet
from lcm_kit.training.fused_lora import FusedLoRA, fused_lora_forward, lora_fusion_blockers

RANK, ALPHA = 4, 8  # alpha != rank: the scaling (2) must enter the fused weight
RANK_PATTERN, ALPHA_PATTERN = {"to_k": 2}, {"conv1": 3}  # per-module scalings too


def lora_unet(dtype=torch.float64, dropout=0.0, seed=0):
    unet = add_lcm_lora(tiny_unet("sd1"), RANK, ALPHA, dropout, rank_pattern=RANK_PATTERN,
                        alpha_pattern=ALPHA_PATTERN).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft starts lora_B at 0: random A and B so every layer's delta matters
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64) * 0.1)
    return unet.train()


def unet_inputs(dtype=torch.float64, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 16, 16, generator=g, dtype=dtype), torch.tensor([999, 421])[:n],
            torch.randn(n, 77, 32, generator=g, dtype=dtype))


def lora_params(unet):
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}


def output_and_grads(unet, fused, inputs):
    unet.zero_grad(set_to_none=True)
    x, t, embeds = inputs
    context = fused_lora_forward(unet) if fused else torch.enable_grad()
    with context:
        out = unet(x, t, encoder_hidden_states=embeds).sample
    # backward outside the context: the graph already holds the fused ops
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in lora_params(unet).items()}


def test_whole_unet_output_and_lora_gradients_equal_peft():
    unet = lora_unet()
    inputs = unet_inputs()
    out_ref, grads_ref = output_and_grads(unet, False, inputs)
    out_fused, grads_fused = output_and_grads(unet, True, inputs)
    # every LoRA parameter of every module type gets a (non-zero) gradient, equal to peft's
    kinds = {type(m.get_base_layer()).__name__ for m in unet.modules() if isinstance(m, LoraLayer)}
    assert kinds == {"Linear", "Conv2d"}
    assert set(grads_fused) == set(grads_ref) and len(grads_ref) > 50
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-10, atol=1e-10)
    for name in grads_ref:
        assert grads_ref[name].abs().max() > 0, name
        torch.testing.assert_close(grads_fused[name], grads_ref[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize(
    "module_name",
    [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",  # Linear, rank_pattern 2 (scale 4)
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",  # Linear with bias
        "down_blocks.0.resnets.0.conv1",  # Conv2d 3x3, alpha_pattern 3 (scale 3/4)
        "down_blocks.1.resnets.0.conv_shortcut",  # Conv2d 1x1
        "down_blocks.0.downsamplers.0.conv",  # Conv2d 3x3, stride 2
        "down_blocks.0.resnets.0.time_emb_proj",  # Linear on the time embedding
    ],
)
def test_single_layer_output_and_gradients_equal_peft(module_name):
    unet = lora_unet()
    layer = unet.get_submodule(module_name)
    assert isinstance(layer, LoraLayer)
    base = layer.get_base_layer()
    g = torch.Generator().manual_seed(2)
    if isinstance(base, torch.nn.Conv2d):
        x = torch.randn(3, base.in_channels, 9, 9, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(3, 5, base.in_features, generator=g, dtype=torch.float64)
    results = []
    for fused in (False, True):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with fused_lora_forward(unet) if fused else torch.enable_grad():
            assert ("forward" in vars(layer)) == fused  # really the fused op inside, peft's outside
            out = layer(xi)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
        (out * weights).sum().backward()
        results.append((out.detach(), xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
    for ref, fused in zip(*results):
        torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-12)
    # the layer really carries a non-trivial adapter (else the check says nothing)
    with torch.no_grad():
        assert (results[0][0] - base(x)).abs().max() > 1e-3


def test_adapter_disabled_forward_is_the_base_and_context_restores_peft():
    unet = lora_unet()
    teacher = tiny_unet("sd1").to(torch.float64)  # the untouched base (same seed)
    x, t, embeds = unet_inputs()
    with torch.no_grad():
        expected = teacher(x, t, encoder_hidden_states=embeds).sample
        with fused_lora_forward(unet):
            unet.disable_adapters()
            try:
                disabled = unet(x, t, encoder_hidden_states=embeds).sample
            finally:
                unet.enable_adapters()
            adapted = unet(x, t, encoder_hidden_states=embeds).sample
        assert not any("forward" in vars(m) for m in unet.modules())  # peft's forward is back
        peft_adapted = unet(x, t, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(disabled, expected, rtol=0, atol=0)  # bit-identical: the base layers alone
    torch.testing.assert_close(adapted, peft_adapted, rtol=1e-10, atol=1e-10)
    assert (adapted - expected).abs().max() > 1e-3


def test_float32_and_bf16_autocast_match_peft():
    unet = lora_unet(torch.float32)
    x, t, embeds = unet_inputs(torch.float32)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=embeds).sample
        with fused_lora_forward(unet):
            fused = unet(x, t, encoder_hidden_states=embeds).sample
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf16 = unet(x, t, encoder_hidden_states=embeds).sample
            with fused_lora_forward(unet):
                fused_bf16 = unet(x, t, encoder_hidden_states=embeds).sample
    assert fused_bf16.dtype == ref_bf16.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; the two round at different places (W + s·B·A once vs two products)
    scale = ref.abs().max()
    assert (fused_bf16.float() - ref).abs().max() < 0.05 * scale
    assert (fused_bf16.float() - ref).abs().max() <= 2 * (ref_bf16.float() - ref).abs().max() + 1e-3 * scale


def test_fused_lora_base_is_peft_disabled_and_nests():
    """``FusedLoRA.base()`` (the teacher) is bit-identical to peft's ``disable_adapters()`` and leaves the adapter's
    requires_grad alone; a context nested in another runs its own forward and gives the outer one back."""
    unet = lora_unet()
    fusion = FusedLoRA(unet)
    x, t, embeds = unet_inputs()
    with torch.no_grad():
        unet.disable_adapters()
        try:
            expected = unet(x, t, encoder_hidden_states=embeds).sample
        finally:
            unet.enable_adapters()
        with fusion.base():
            teacher = unet(x, t, encoder_hidden_states=embeds).sample
            assert all(p.requires_grad for p in lora_params(unet).values())
        peft_adapted = unet(x, t, encoder_hidden_states=embeds).sample
        with fusion.fused():
            with fusion.base():
                nested_teacher = unet(x, t, encoder_hidden_states=embeds).sample
            adapted = unet(x, t, encoder_hidden_states=embeds).sample
            assert all("forward" in vars(layer) for layer in fusion.layers)
    assert not any("forward" in vars(m) for m in unet.modules())
    torch.testing.assert_close(teacher, expected, rtol=0, atol=0)
    torch.testing.assert_close(nested_teacher, expected, rtol=0, atol=0)
    torch.testing.assert_close(adapted, peft_adapted, rtol=1e-10, atol=1e-10)
    assert (adapted - expected).abs().max() > 1e-3


def test_fused_lora_base_with_a_merged_adapter_is_the_base():
    unet = lora_unet()
    x, t, embeds = unet_inputs()
    with torch.no_grad():
        base = tiny_unet("sd1").to(torch.float64)(x, t, encoder_hidden_states=embeds).sample
        fusion = FusedLoRA(unet)
        for layer in fusion.layers:
            layer.merge()
        with fusion.base():
            teacher = unet(x, t, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(teacher, base, rtol=1e-10, atol=1e-10)


def test_fused_lora_base_switches_another_adapters_layers_off_too():
    """A second adapter on layers the first does not touch: base() must switch those off as well (peft's switch)."""
    from peft import LoraConfig

    unet = lora_unet()
    x, t, embeds = unet_inputs()
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["conv_in"], init_lora_weights=False),
                     adapter_name="other")
    unet.to(torch.float64)
    unet.set_adapters(["default", "other"])
    fusion = FusedLoRA(unet)
    assert all("other" not in layer.lora_A for layer in fusion.layers)
    with torch.no_grad():
        expected = tiny_unet("sd1").to(torch.float64)(x, t, encoder_hidden_states=embeds).sample
        with fusion.base():
            teacher = unet(x, t, encoder_hidden_states=embeds).sample
        adapted = unet(x, t, encoder_hidden_states=embeds).sample
    torch.testing.assert_close(teacher, expected, rtol=1e-10, atol=1e-10)
    assert (adapted - expected).abs().max() > 1e-3


def test_a_layer_whose_forward_a_hook_owns_stays_exact():
    """A layer whose forward someone else replaced (a hook) keeps it: fused() runs peft's path under the hook there,
    and base() switches the adapter off with peft's switch, so the hooked layer is the base too."""
    unet = lora_unet()
    x, t, embeds = unet_inputs()
    fusion = FusedLoRA(unet)
    hooked = fusion.layers[3]
    calls = []
    peft_forward = hooked.forward
    hooked.forward = lambda *a, **k: calls.append(1) or peft_forward(*a, **k)
    with torch.no_grad():
        expected = tiny_unet("sd1").to(torch.float64)(x, t, encoder_hidden_states=embeds).sample
        peft_adapted = unet(x, t, encoder_hidden_states=embeds).sample
        with fusion.base():
            teacher = unet(x, t, encoder_hidden_states=embeds).sample
        with fusion.fused():
            adapted = unet(x, t, encoder_hidden_states=embeds).sample
    assert len(calls) == 3 and "forward" in vars(hooked)
    torch.testing.assert_close(teacher, expected, rtol=0, atol=0)
    torch.testing.assert_close(adapted, peft_adapted, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("grad_first", [True, False])
def test_fused_weights_are_shared_from_grad_forwards_only(grad_first):
    """A no-grad forward reuses the effective weights a grad-enabled forward built (the same tensors), never the
    other way round: a student run after a no-grad target still gets peft's gradients."""
    unet = lora_unet()
    fusion = FusedLoRA(unet)
    x, t, embeds = unet_inputs()
    _, grads_ref = output_and_grads(unet, False, (x, t, embeds))
    with torch.no_grad():
        target_ref = unet(x * 0.5, t, encoder_hidden_states=embeds).sample
    unet.zero_grad(set_to_none=True)
    weights = {}
    built = []
    for layer in fusion.layers:  # count how often W + s·B·A is built
        original = layer.get_delta_weight
        layer.get_delta_weight = lambda name, original=original: built.append(1) or original(name)
    for grad in ([True, False] if grad_first else [False, True]):
        with torch.set_grad_enabled(grad), fusion.fused(weights):
            if grad:
                out = unet(x, t, encoder_hidden_states=embeds).sample
            else:
                target = unet(x * 0.5, t, encoder_hidden_states=embeds).sample
    assert len(weights) == len(fusion.layers)
    assert all(w.requires_grad for w in weights.values())
    assert len(built) == (len(fusion.layers) if grad_first else 2 * len(fusion.layers))
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    torch.testing.assert_close(target, target_ref, rtol=1e-10, atol=1e-10)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(lora_params(unet)[name].grad, grad, rtol=1e-9, atol=1e-11, msg=name)


def test_dropout_blocks_fusion_explicitly():
    unet = lora_unet(dropout=0.1)
    blockers = lora_fusion_blockers(unet)
    assert len(blockers) == sum(isinstance(m, LoraLayer) for m in unet.modules())
    assert all("lora_dropout" in why for why in blockers.values())
    with pytest.raises(ValueError, match="cannot run fused"):
        with fused_lora_forward(unet):
            pass
    with pytest.raises(ValueError, match="cannot run fused"):
        FusedLoRA(unet)
    assert not any("forward" in vars(m) for m in unet.modules())
    with pytest.raises(ValueError, match="adapter_name 'other' not found"):
        lora_fusion_blockers(lora_unet(), "other")


# ---------------------------------------------------------------------------------------------------------------
# The LCM objective: fusion changes nothing but speed
# ---------------------------------------------------------------------------------------------------------------


def test_objective_fuses_student_and_target_and_keeps_loss_and_gradients(lcm_objective, lcm_batch, randomize_lora):
    objective, _ = lcm_objective("lora")
    assert objective.fuse_student_lora and objective.fuse_target_lora
    randomize_lora(objective.unet)
    results = []
    for fused in (False, True):
        objective.fuse_student_lora = objective.fuse_target_lora = fused
        objective.unet.zero_grad(set_to_none=True)
        loss, _ = objective.compute_loss(objective.unet, lcm_batch(), 0, torch.Generator().manual_seed(0))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in lora_params(objective.unet).items()}))
    (loss_ref, grads_ref), (loss_fused, grads_fused) = results
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-5, atol=1e-7)
    # float32 step with a Huber loss (c = 0.001) amplifies rounding: measured worst 1.1e-4 of a tensor's largest
    # entry; a wiring error (lost scaling, a layer not adapted) is O(1). Exactness itself: the float64 tests above.
    for name in grads_ref:
        scale = grads_ref[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(grads_fused[name], grads_ref[name], rtol=0, atol=5e-4 * scale, msg=name)


def test_objective_falls_back_to_peft_with_dropout_and_keeps_target_fused_with_checkpointing(lcm_objective):
    objective, _ = lcm_objective("lora", lora_dropout=0.1)
    assert not objective.fuse_student_lora and not objective.fuse_target_lora
    objective, _ = lcm_objective("lora", gradient_checkpointing=True)
    assert objective.fuse_target_lora and not objective.fuse_student_lora


def test_objective_fused_under_bf16_mixed_precision_matches_unfused(lcm_objective, lcm_batch, randomize_lora):
    """Frozen base in bf16, adapter fp32 (the trainer's mixed-precision layout): W(bf16) + s·B·A(fp32) is formed in
    fp32 and autocast runs the op in bf16, as peft's base op; loss agrees to bf16 precision, every LoRA tensor learns."""
    objective, _ = lcm_objective("lora", mixed_precision="bf16")
    assert objective.fuse_student_lora and objective.fuse_target_lora
    randomize_lora(objective.unet)
    losses = []
    for fused in (False, True):
        objective.fuse_student_lora = objective.fuse_target_lora = fused
        objective.unet.zero_grad(set_to_none=True)
        loss, _ = objective.compute_loss(objective.unet, lcm_batch(), 0, torch.Generator().manual_seed(0))
        loss.backward()
        grads = [p.grad for p in lora_params(objective.unet).values()]
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        assert sum(bool(g.abs().max() > 0) for g in grads) == len(grads)
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) < 0.02 * abs(losses[0])


# ---------------------------------------------------------------------------------------------------------------
# --torch_compile (opt-in)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_torch_compile_flag_compiles_every_unet_in_place(mode, lcm_objective):
    objective, _ = lcm_objective(mode, torch_compile=True)
    unets = [objective.unet, objective.teacher_unet, objective.target_unet]
    assert all(u._compiled_call_impl is not None for u in unets if u is not None)
    assert sum(u is not None for u in unets) == (1 if mode == "lora" else 3)
    off, _ = lcm_objective(mode)
    assert off.unet._compiled_call_impl is None


@pytest.mark.slow
def test_torch_compile_step_matches_eager(lcm_objective, lcm_batch, randomize_lora):
    """A compiled LoRA step (inductor, a few minutes of compile on 2 CPU cores) gives the eager loss."""
    losses = []
    for compiled in (False, True):
        objective, _ = lcm_objective("lora", torch_compile=compiled)
        randomize_lora(objective.unet)
        loss, _ = objective.compute_loss(objective.unet, lcm_batch(), 0, torch.Generator().manual_seed(0))
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) <= 1e-4 * abs(losses[0])
