"""PCM's optional adversarial consistency loss: the hinge losses' signs, the noise level the discriminator reads, the
two players' gradients kept apart, off by default, bit-exact resume with the discriminator on, bad flags."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from lcm_kit.consistency import phase_edge_timesteps, vp_noise
from lcm_kit.training.discriminator import DiscriminatorHeads, TrainableDiscriminator, unet_feature_channels
from lcm_kit.training.losses.adversarial import (
    AdversarialConsistencyLoss,
    discriminator_timesteps,
    forward_diffuse,
    hinge_discriminator_loss,
    hinge_generator_loss,
)

ADV = dict(method="pcm", num_phases=2, num_ddim_timesteps=10, adversarial_weight=0.1, adversarial_learning_rate=1e-3)


def _alphas():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


# ----------------------------------------------------------------------------------------------------------------
# The loss pieces
# ----------------------------------------------------------------------------------------------------------------


def test_hinge_losses_reward_the_right_side_by_a_margin():
    """D: relu(1 - real) + relu(1 + fake): zero once real >= 1 and fake <= -1; its gradient raises real logits and
    lowers fake ones. G: relu(1 - fake): its gradient raises the fake logits until the margin, then stops."""
    confident = hinge_discriminator_loss([torch.full((2, 1, 3, 3), 2.0)], [torch.full((2, 1, 3, 3), -2.0)])
    assert torch.equal(confident, torch.zeros(2))
    real = torch.full((2, 1, 3, 3), -1.0, requires_grad=True)
    fake = torch.full((2, 1, 3, 3), 1.0, requires_grad=True)
    fooled = hinge_discriminator_loss([real, real * 0.5], [fake, fake * 0.5])
    assert torch.allclose(fooled, torch.full((2,), (4.0 + 3.0) / 2))  # heads averaged: (2 + 2) and (1.5 + 1.5)
    fooled.sum().backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()

    fake_g = torch.tensor([[-1.0, 0.5, 3.0]]).reshape(1, 1, 1, 3).requires_grad_(True)
    g = hinge_generator_loss([fake_g])
    assert torch.allclose(g, torch.tensor([(2.0 + 0.5 + 0.0) / 3]))
    g.sum().backward()
    assert fake_g.grad.flatten().tolist() == [pytest.approx(-1 / 3), pytest.approx(-1 / 3), 0.0]


def test_the_discriminator_reads_a_timestep_inside_the_pairs_phase():
    edges = torch.tensor(phase_edge_timesteps(4, 10))  # [0, 199, 499, 799, 999]
    s = edges[:-1].repeat_interleave(2000)
    t = discriminator_timesteps(s, edges, torch.Generator().manual_seed(0))
    for lower, upper in zip(edges[:-1].tolist(), edges[1:].tolist()):
        drawn = t[s == lower]
        assert drawn.min() == lower and drawn.max() == upper  # both ends of [s, upper edge] are reached
        assert abs(drawn.float().mean().item() - (lower + upper) / 2) < 0.05 * (upper - lower)


def test_forward_diffuse_is_the_forward_process_from_s():
    """x_s noised to s, then carried to t, is x0 noised to t (with the combined Gaussian); t = s is the identity."""
    alphas = _alphas()
    g = torch.Generator().manual_seed(0)
    x0, e1, e2 = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    s, t = torch.tensor([0, 199, 499]), torch.tensor([150, 400, 499])
    a_s, a_t = alphas[s].reshape(-1, 1, 1, 1), alphas[t].reshape(-1, 1, 1, 1)
    x_s = vp_noise(x0, e1, a_s)
    x_t = forward_diffuse(x_s, e2, s, t, alphas)
    combined = ((a_t / a_s).sqrt() * (1 - a_s).sqrt() * e1 + (1 - a_t / a_s).sqrt() * e2) / (1 - a_t).sqrt()
    torch.testing.assert_close(x_t, vp_noise(x0, combined, a_t), rtol=1e-5, atol=1e-5)
    assert torch.equal(forward_diffuse(x_s, e2, s, s, alphas), x_s)


def test_noisy_pair_keeps_the_students_gradient_and_stops_the_targets():
    alphas, edges = _alphas(), torch.tensor(phase_edge_timesteps(2, 10))
    prediction = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, requires_grad=True)  # even a target with a graph gives the "real" side none
    loss = AdversarialConsistencyLoss(0.1)
    fake, real, t = loss.noisy_pair(prediction, target, torch.tensor([0, 499]), alphas, edges,
                                    torch.Generator().manual_seed(1))
    assert fake.requires_grad and not real.requires_grad
    assert 0 <= t[0] <= 499 and 499 <= t[1] <= 999
    again = loss.noisy_pair(prediction, target, torch.tensor([0, 499]), alphas, edges, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip((fake, real, t), again))
    with pytest.raises(ValueError, match="weight must be"):
        AdversarialConsistencyLoss(0.0)


def test_heads_check_their_inputs_and_checkpoint_tensors_round_trip():
    heads = DiscriminatorHeads([8, 16])
    with pytest.raises(ValueError, match="expected 2 feature maps"):
        heads([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match="feature_channels"):
        DiscriminatorHeads([])
    trainer = TrainableDiscriminator(heads, 1e-2)
    features = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    trainer.backward_and_step(hinge_discriminator_loss(trainer(features), trainer([-f for f in features])).mean())
    state = trainer.state_tensors()
    assert any(k.startswith("optimizer.") for k in state) and any(k.startswith("heads.") for k in state)
    other = TrainableDiscriminator(DiscriminatorHeads([8, 16]), 1e-2)
    other.load_state_tensors({k: v.clone() for k, v in state.items()})
    assert all(torch.equal(v, other.state_tensors()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="do not match"):
        TrainableDiscriminator(DiscriminatorHeads([8, 32]), 1e-2).load_state_tensors(state)
    with pytest.raises(ValueError, match="unexpected tensors"):
        other.load_state_tensors({**state, "stray.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------------------
# In the PCM objective (tiny kit)
# ----------------------------------------------------------------------------------------------------------------


def _lora_params(objective):
    return [p for p in objective.trainable_model().parameters() if p.requires_grad]


@pytest.mark.parametrize("mode, kind", [("lora", "sd1"), ("full", "sd1"), ("lora", "sdxl")])
def test_the_discriminator_step_never_reaches_the_student_nor_the_generator_step_the_discriminator(
        lcm_objective, lcm_batch, randomize_lora, mode, kind):
    """compute_loss steps the heads (their own optimiser) on detached fakes: the student has no gradient yet. The
    student's loss backward then reaches the student only: the heads get no gradient and keep their weights. SD and
    SDXL (the discriminator reads the prompt's micro-conditioning too), LoRA and full weights."""
    objective, _ = lcm_objective(mode, kind=kind, use_fix_crop_and_size=kind == "sdxl", **ADV)
    if mode == "lora":
        randomize_lora(objective.unet)
    heads = objective.discriminator.params
    before = [p.detach().clone() for p in heads]
    loss, logs = objective.compute_loss(objective.trainable_model(), lcm_batch(), 0, torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in _lora_params(objective))  # the discriminator's backward stayed in the heads
    stepped = [p.detach().clone() for p in heads]
    assert any(not torch.equal(a, b) for a, b in zip(before, stepped))
    assert torch.isfinite(logs["adversarial_d_loss"]) and torch.isfinite(logs["adversarial_g_loss"])
    loss.backward()
    assert all(p.grad is None for p in heads)
    assert all(torch.equal(a, p) for a, p in zip(stepped, heads))
    grads = [p.grad for p in _lora_params(objective)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    if mode == "full":
        assert all(p.grad is None for p in objective.teacher_unet.parameters())


def test_the_adversarial_term_is_added_with_its_weight_after_the_unchanged_consistency_draws(lcm_objective, lcm_batch):
    """With the same step generator, the adversarial run's loss is the plain PCM loss (same draws, drawn first) plus
    weight x the generator's hinge term; the discriminator reads the pair's phase-edge time s; building the heads
    leaves the global RNG (the LoRA's init, later draws) where the plain run leaves it."""
    plain, _ = lcm_objective("lora", **{**ADV, "adversarial_weight": 0.0, "adversarial_learning_rate": None})
    plain_rng = torch.get_rng_state()
    adversarial, _ = lcm_objective("lora", **ADV)
    assert torch.equal(torch.get_rng_state(), plain_rng)
    assert plain.discriminator is None
    for a, b in zip(_lora_params(plain), _lora_params(adversarial)):
        assert torch.equal(a, b)
    seen = []
    noisy_pair = adversarial.adversarial.noisy_pair

    def recording(prediction, target, s, *args):
        seen.append(s)
        return noisy_pair(prediction, target, s, *args)

    adversarial.adversarial.noisy_pair = recording
    batch = lcm_batch()
    base, logs = plain.compute_loss(plain.trainable_model(), batch, 0, torch.Generator().manual_seed(5))
    total, adv_logs = adversarial.compute_loss(adversarial.trainable_model(), batch, 0,
                                               torch.Generator().manual_seed(5))
    assert logs == {}
    assert torch.equal(total, base + 0.1 * adv_logs["adversarial_g_loss"])
    assert adv_logs["adversarial_g_loss"] > 0
    # the pairs' s, as the consistency loss drew them (same generator): the lower edge of each start's phase
    from lcm_kit.consistency import lower_phase_edge
    from lcm_kit.training.losses import sample_skip_timesteps

    start, _ = sample_skip_timesteps(2, plain.config, torch.Generator().manual_seed(5))
    assert torch.equal(seen[0], lower_phase_edge(start, plain.loss.phase_edges))


def test_the_discriminator_learns_to_tell_target_from_student(lcm_objective, lcm_batch, randomize_lora):
    """Repeated steps on one batch (a student far from its target): the discriminator's hinge loss falls and the
    generator's hinge term rises toward 2 (the student's predictions scored as fake, D -> -1), over 5-step means."""
    objective, _ = lcm_objective("lora", **{**ADV, "adversarial_learning_rate": 3e-3})
    randomize_lora(objective.unet)
    batch, model = lcm_batch(), objective.trainable_model()
    d_losses, g_losses = [], []
    for _ in range(25):
        _, logs = objective.compute_loss(model, batch, 0, torch.Generator().manual_seed(0))
        d_losses.append(float(logs["adversarial_d_loss"]))
        g_losses.append(float(logs["adversarial_g_loss"]))
    first, last = slice(0, 5), slice(-5, None)
    assert sum(d_losses[last]) < 0.7 * sum(d_losses[first]), d_losses
    assert sum(g_losses[last]) / 5 > sum(g_losses[first]) / 5 + 0.25, g_losses


def test_gradient_checkpointing_does_not_leak_the_adapter_into_the_discriminators_teacher(lcm_objective, lcm_batch,
                                                                                          randomize_lora):
    """LoRA: the discriminator's backbone is the student's base with the adapter off. With gradient checkpointing a
    recomputed block would run with the adapter back on; the student's gradients must equal those without."""
    grads = []
    for checkpointing in (False, True):
        objective, _ = lcm_objective("lora", **ADV, gradient_checkpointing=checkpointing)
        randomize_lora(objective.unet)
        objective.fuse_student_lora = False  # the same (peft) forward in both runs
        loss, _ = objective.compute_loss(objective.trainable_model(), lcm_batch(), 0, torch.Generator().manual_seed(2))
        loss.backward()
        grads.append([p.grad.clone() for p in _lora_params(objective)])
        assert objective.unet.is_gradient_checkpointing == checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_feature_channels_follow_the_unet():
    from lcm_kit.testing import tiny_unet

    unet = tiny_unet("sd1")
    assert unet_feature_channels(unet) == [32, 64, 64, 64, 32]


# ----------------------------------------------------------------------------------------------------------------
# Trainer: off by default, checkpoints, resume, flags
# ----------------------------------------------------------------------------------------------------------------


def _adv_argv(train_argv, out, steps, adversarial=True):
    argv = train_argv(out, steps=steps) + ["--lora_rank", "4", "--learning_rate", "1e-3", "--method", "pcm",
                                           "--num_phases", "2", "--num_ddim_timesteps", "10",
                                           "--checkpointing_steps", "2"]
    return argv + (["--adversarial_weight", "0.1", "--adversarial_learning_rate", "1e-3"] if adversarial else [])


def test_resume_with_the_discriminator_is_bit_exact(tmp_path, train_argv, reset_accelerate):
    """4 steps straight vs 2 steps + resume from checkpoint-2: the same adapter and the same discriminator heads and
    AdamW state, bit for bit. The checkpoint lists the discriminator in its manifest; the saved LoRA holds the
    adapter only (the format of a run without the adversarial loss)."""
    from lcm_kit.training.train_lcm_lora import main

    reference = tmp_path / "reference"
    result = main(_adv_argv(train_argv, reference, 4))
    assert result.objective.discriminator is not None
    checkpoint = reference / "checkpoint-2"
    assert (checkpoint / TrainableDiscriminator.CHECKPOINT_FILE).is_file()
    assert TrainableDiscriminator.CHECKPOINT_FILE in (checkpoint / "manifest.json").read_text()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    reset_accelerate()
    main(_adv_argv(train_argv, resumed, 4) + ["--resume_from_checkpoint", "latest"])
    for name in ("pytorch_lora_weights.safetensors", f"checkpoint-4/{TrainableDiscriminator.CHECKPOINT_FILE}"):
        a, b = load_file(reference / name), load_file(resumed / name)
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), name
    lora = load_file(reference / "pytorch_lora_weights.safetensors")
    assert all("lora" in k for k in lora) and not any("heads" in k or "optimizer" in k for k in lora)
    two = load_file(checkpoint / TrainableDiscriminator.CHECKPOINT_FILE)
    four = load_file(reference / "checkpoint-4" / TrainableDiscriminator.CHECKPOINT_FILE)
    assert any(not torch.equal(two[k], four[k]) for k in two)  # the discriminator did train between the two


def test_a_checkpoint_and_a_run_that_disagree_on_the_discriminator_are_refused(tmp_path, train_argv, reset_accelerate):
    from lcm_kit.training.train_lcm_lora import main

    adversarial, plain = tmp_path / "adversarial", tmp_path / "plain"
    main(_adv_argv(train_argv, adversarial, 2))
    reset_accelerate()
    with pytest.raises(ValueError, match="resume it with the same --adversarial_weight"):
        main(_adv_argv(train_argv, adversarial, 4, adversarial=False) + ["--resume_from_checkpoint", "latest"])
    reset_accelerate()
    main(_adv_argv(train_argv, plain, 2, adversarial=False))
    assert not (plain / "checkpoint-2" / TrainableDiscriminator.CHECKPOINT_FILE).exists()
    reset_accelerate()
    with pytest.raises(ValueError, match="trained without the adversarial loss"):
        main(_adv_argv(train_argv, plain, 4) + ["--resume_from_checkpoint", "latest"])


def test_off_by_default(lcm_objective):
    objective, _ = lcm_objective("lora", method="pcm", num_phases=2)
    assert objective.args.adversarial_weight == 0.0 and objective.args.adversarial_learning_rate is None
    assert objective.discriminator is None and objective.adversarial is None


def test_bad_adversarial_flags_are_refused(train_argv, tmp_path):
    from lcm_kit.training.train_lcm_lora import main

    base = train_argv(tmp_path / "x")
    with pytest.raises(ValueError, match="--adversarial_weight only applies to --method pcm.*got --method tcd"):
        main(base + ["--method", "tcd", "--adversarial_weight", "0.1"])
    with pytest.raises(ValueError, match="--adversarial_weight only applies to --method pcm.*got --method lcm"):
        main(base + ["--adversarial_weight", "0.1"])
    with pytest.raises(ValueError, match="--adversarial_learning_rate 0.001 has no effect with --adversarial_weight 0"):
        main(base + ["--method", "pcm", "--adversarial_learning_rate", "1e-3"])
    for bad in (["--adversarial_weight", "-0.1"], ["--adversarial_weight", "nan"],
                ["--adversarial_learning_rate", "0"]):
        with pytest.raises(SystemExit):
            main(base + ["--method", "pcm", *bad])


TWO_RANKS_DRIVER = """
import hashlib, json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from lcm_kit.training.train_lcm_lora import main

report_dir, argv = Path(sys.argv[1]), sys.argv[2:]
result = main(argv)
discriminator = result.objective.discriminator
tensors = discriminator.state_tensors()
lora = {n: p.detach() for n, p in result.model.named_parameters() if "lora_" in n}
rank = result.objective.accelerator.process_index
(report_dir / f"rank{rank}.json").write_text(json.dumps({
    "heads": hashlib.sha256(b"".join(tensors[k].numpy().tobytes() for k in sorted(tensors))).hexdigest(),
    "lora": hashlib.sha256(b"".join(lora[k].numpy().tobytes() for k in sorted(lora))).hexdigest(),
    "world": result.objective.accelerator.num_processes}))
"""


@pytest.mark.slow
def test_two_processes_keep_one_discriminator(tmp_path, train_argv):
    """`accelerate launch --num_processes 2` on CPU (gloo): the ranks see different batches and noise, and the heads'
    gradients are averaged over them, so both ranks end with the same heads and AdamW state (and the same adapter)."""
    import json
    import os
    import socket
    import subprocess
    import sys

    driver = tmp_path / "driver.py"
    driver.write_text(TWO_RANKS_DRIVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               ACCELERATE_USE_CPU="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(driver), str(tmp_path), *_adv_argv(train_argv, tmp_path / "out", 3)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    assert reports[0]["heads"] == reports[1]["heads"] and reports[0]["lora"] == reports[1]["lora"]
