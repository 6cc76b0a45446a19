"""Class-conditional consistency models (CT, iCT, sCT, ECT) on the shipped digits, scored by the digits harness.

Trains a class-conditional ``UNet2DModel`` with the real ``train_scripts`` path
(``lcm_kit.training.train_consistency``: Accelerate loop, data module) -- in the shipped
digits teacher's VAE latent space (4x8x8, ``--latent``, the default) or in pixel space (32x32, ``--no-latent``) --
then samples every digit at 1 and 2 steps with :class:`~lcm_kit.pipelines.pipeline_cm.CMPipeline` and
reports the shipped classifier's accuracy and the Frechet distance to the held-out digits (lcm_kit.eval.metrics),
20 samples per digit, fixed seeds. The training budget is reported in CPU seconds (``time.process_time`` of this
process; run with ``OMP_NUM_THREADS=1`` so CPU seconds are single-thread seconds).

    # the numbers in benchmarks/consistency_results.md (about 12 CPU-minutes of training each):
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/consistency_digits.py --mode ict --max_train_steps 3000 \
        --s1 160 --out /tmp/cm_ict
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/consistency_digits.py --mode ct --max_train_steps 3000 \
        --out /tmp/cm_ct
    # continuous-time consistency training (TrigFlow, JVP tangent) at iCT's budget:
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/consistency_digits.py --mode sct --max_train_steps 1500 \
        --out /tmp/cm_sct
    # ECT: first an EDM diffusion model of the same UNet (--pretrain_steps, its CPU seconds reported apart), then
    # Easy Consistency Tuning from its weights:
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/consistency_digits.py --mode ect --pretrain_steps 2000 \
        --pretrain_learning_rate 1e-3 --learning_rate 1e-4 --ect_stages 4 --max_train_steps 500 --ema_decay 0.99 \
        --out /tmp/cm_ect
    # re-score a trained model (e.g. other 2-step intermediate sigmas) without training again:
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/consistency_digits.py --mode ict --out /tmp/cm_ict \
        --evaluate_only --mid_sigmas 0.821,2.0
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def prepare_data(out: str) -> str:
    """The digits train split as a ``datasets`` folder whose caption column is the class index."""
    from lcm_kit import digits

    data_dir = os.path.join(out, "data")
    if not os.path.isdir(data_dir):
        dataset = digits.to_hf_dataset("train", 32).map(lambda e: {"class": str(e["label"])})
        dataset.save_to_disk(data_dir)
    return data_dir


def training_argv(args, data_dir: str, model_dir: str) -> list[str]:
    from lcm_kit import digits

    argv = [
        "--mode", args.mode, "--dataset_name", data_dir, "--image_column", "image", "--caption_column", "class",
        "--num_class_embeds", "10", "--resolution", "32", "--block_out_channels", args.block_out_channels,
        "--layers_per_block", str(args.layers_per_block), "--train_batch_size", str(args.train_batch_size),
        "--max_train_steps", str(args.max_train_steps), "--learning_rate", str(args.learning_rate),
        "--ema_decay", str(args.ema_decay), "--sigma_data", str(args.sigma_data), "--output_dir", model_dir,
        "--report_to", "none", "--seed", str(args.seed), "--checkpointing_steps", str(args.max_train_steps),
        "--validation_steps", str(args.max_train_steps), "--num_train_epochs", "100000",
    ]
    if args.latent:
        argv += ["--pretrained_vae_model_name_or_path", str(digits.teacher_path() / "vae")]
    for flag in ("s0", "s1", "dropout", "loss_type", "ect_stages", "ect_q"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    if args.mode == "ect":  # the UNet comes from the pretrained diffusion model (its shape flags with it)
        drop = {"--block_out_channels", "--layers_per_block"}
        argv = [a for i, a in enumerate(argv) if a not in drop and (i == 0 or argv[i - 1] not in drop)]
        argv += ["--pretrained_unet", pretrained_dir(args)]
    return argv


def pretrained_dir(args) -> str:
    return os.path.join(args.out, "edm-pretrained")


def pretrain_diffusion(args) -> dict:
    """The EDM diffusion model ECT starts from: the same class-conditional UNet2DModel, trained with EDM's loss
    (:class:`~lcm_kit.training.losses.EDMDenoisingLoss`) on the digits' VAE latents (a posterior sample per
    step), time input 250 log sigma (the consistency models' convention, so its weights are a consistency model's
    starting point), Adam at --pretrain_learning_rate (default --learning_rate), gradient clip 1. Returns its CPU
    seconds and steps."""
    from diffusers import AutoencoderKL, UNet2DModel

    from lcm_kit import digits
    from lcm_kit.precond import EDMDenoiser
    from lcm_kit.training.losses import EDMDenoisingLoss
    from lcm_kit.utils import sample_latents

    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(str(digits.teacher_path() / "vae")).eval()
    images, labels = digits.load_split("train", 32)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    blocks = tuple(int(c) for c in args.block_out_channels.split(","))
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=blocks,
                       down_block_types=("DownBlock2D",) * len(blocks), up_block_types=("UpBlock2D",) * len(blocks),
                       layers_per_block=args.layers_per_block, norm_num_groups=min(32, blocks[0]), num_class_embeds=10)
    denoiser = EDMDenoiser(unet, sigma_data=args.sigma_data)
    loss_fn = EDMDenoisingLoss(sigma_data=args.sigma_data)
    optimizer = torch.optim.Adam(unet.parameters(), lr=args.learning_rate if args.pretrain_learning_rate is None
                                 else args.pretrain_learning_rate)
    generator = torch.Generator().manual_seed(args.seed)
    cpu_start = time.process_time()
    for _ in range(args.pretrain_steps):
        index = torch.randint(0, len(labels), (args.train_batch_size,), generator=generator)
        clean = sample_latents(posterior.mean[index], posterior.std[index], generator, vae.config.scaling_factor)
        loss = loss_fn(denoiser, clean, labels[index], generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
    cpu_seconds = time.process_time() - cpu_start
    unet.save_pretrained(pretrained_dir(args))
    return {"pretrain_cpu_seconds": cpu_seconds, "pretrain_steps": args.pretrain_steps}


def evaluate(args, model_dir: str) -> list[dict]:
    """Accuracy and FD of the EMA and online weights at 1 step and at 2 steps for each intermediate sigma."""
    from diffusers import AutoencoderKL, UNet2DModel

    from lcm_kit.eval.metrics import evaluate_images
    from lcm_kit.pipelines.pipeline_cm import CMPipeline

    vae = None
    if os.path.isdir(os.path.join(model_dir, "vae")):
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()
    labels = torch.arange(10).repeat_interleave(args.num_per_digit)
    settings = [(1, None)] + [(2, float(s)) for s in args.mid_sigmas.split(",")]
    rows = []
    for weights in ("unet", "unet_online"):
        pipe = CMPipeline.from_pretrained(model_dir, vae=vae)
        if weights != "unet":
            pipe.unet = UNet2DModel.from_pretrained(os.path.join(model_dir, weights))
        pipe.set_progress_bar_config(disable=True)
        for steps, mid_sigma in settings:
            kwargs = {"num_inference_steps": 1} if mid_sigma is None else {"sigmas": [80.0, mid_sigma]}
            images = pipe(batch_size=len(labels), class_labels=labels, output_type="pt",
                          generator=torch.Generator().manual_seed(args.seed), **kwargs).images
            scores = evaluate_images(images, labels, value_range=(0.0, 1.0))
            rows.append({"weights": "EMA" if weights == "unet" else "online", "steps": steps, "mid_sigma": mid_sigma,
                         "accuracy": scores["accuracy"], "fd": scores["fd"]})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="ict", choices=("ct", "ict", "sct", "ect"))
    parser.add_argument("--pretrain_steps", type=int, default=2000,
                        help="ect: steps of the EDM diffusion model it starts from (skipped if --out has one).")
    parser.add_argument("--pretrain_learning_rate", type=float, default=None,
                        help="ect: Adam learning rate of the diffusion pretraining (default: --learning_rate).")
    parser.add_argument("--latent", action=argparse.BooleanOptionalAction, default=True,
                        help="Train in the digits teacher's VAE latent space (4x8x8); --no-latent: 32x32 pixels.")
    parser.add_argument("--max_train_steps", type=int, default=3000)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--block_out_channels", default="64,128")
    parser.add_argument("--layers_per_block", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=None)
    parser.add_argument("--loss_type", default=None)
    parser.add_argument("--s0", type=int, default=None, help="Curriculum start (default: the mode's, 2 / 10).")
    parser.add_argument("--s1", type=int, default=None, help="Curriculum end (default: the mode's, 150 / 1280).")
    parser.add_argument("--ect_stages", type=int, default=None, help="ect: stages of the gap schedule (default 8).")
    parser.add_argument("--ect_q", type=float, default=None, help="ect: the gap shrinks by q each stage (default 2).")
    parser.add_argument("--sigma_data", type=float, default=0.5)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--mid_sigmas", default="0.821,2.0",
                        help="Comma-separated intermediate sigmas of the 2-step schedule [80, mid].")
    parser.add_argument("--num_per_digit", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate_only", action="store_true", help="Score the model already in --out/--mode.")
    parser.add_argument("--out", default="consistency-digits")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lcm_kit.training.train_consistency import main as train_consistency

    model_dir = os.path.join(args.out, args.mode)
    results_path = os.path.join(args.out, f"{args.mode}_results.json")
    record = {"args": vars(args)}
    if args.evaluate_only:
        with open(results_path) as f:
            record = json.load(f)
    else:
        data_dir = prepare_data(args.out)
        if args.mode == "ect" and not os.path.isdir(pretrained_dir(args)):
            record.update(pretrain_diffusion(args))
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        result = train_consistency(training_argv(args, data_dir, model_dir))
        record.update(train_cpu_seconds=time.process_time() - cpu_start,
                      train_wall_seconds=time.perf_counter() - wall_start, global_step=result.global_step)
    rows = evaluate(args, model_dir)
    record["rows"] = rows
    table = ["| model | steps | sigmas | classifier accuracy % | FD |", "|---|---|---|---|---|"]
    for r in rows:
        sigmas = "[80]" if r["mid_sigma"] is None else f"[80, {r['mid_sigma']:g}]"
        table.append(f"| {args.mode.upper()} ({r['weights']}) | {r['steps']} | {sigmas} | "
                     f"{100 * r['accuracy']:.1f} | {r['fd']:.2f} |")
    print("\n".join(table))
    print(f"{args.mode}: {record.get('global_step')} steps, batch {record['args']['train_batch_size']}, "
          f"{record.get('train_cpu_seconds', float('nan')):.0f} CPU-s ({record.get('train_wall_seconds', float('nan')):.0f}"
          f" s wall) on {args.threads} thread(s); {args.num_per_digit} samples per digit")
    with open(results_path, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
