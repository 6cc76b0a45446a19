"""2-D Gaussian-mixture benchmark of consistency distillation / training against the diffusion model.

One EDM diffusion model (a :class:`~lcm_kit.testing.ToyMLP`, time input 250 log sigma) is trained first; CD distils
it (Heun teacher), CT, iCT and ECT train from its weights without a teacher. The continuous-time sCT / sCD start from
a second diffusion model whose time input is the TrigFlow time arctan(sigma / sigma_data) (sCM's identity time
transformation); ``scd_log_sigma`` is sCD with the 250 log sigma time input instead, from the first model. Every
sampler is scored by the sliced 2-Wasserstein distance of 2,000 samples to 2,000 held-out data points (the floor is
the distance between two data draws). Prints a markdown table and writes it (plus JSON) next to ``--out``.

    HF_HUB_OFFLINE=1 python benchmarks/consistency_toy.py --diffusion_steps 2000 --consistency_steps 2000
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from lcm_kit.consistency import SIGMA_DATA, sigma_from_trigflow_time, sigma_to_timestep, trigflow_time_from_sigma
from lcm_kit.precond import AdaptiveLossWeighting, ConsistencyModel, EDMDenoiser, TrigFlowConsistencyModel
from lcm_kit.sampling import consistency_sample, edm_sample
from lcm_kit.schedulers.scheduling_cm import CMMultistepScheduler
from lcm_kit.testing import ToyMLP, gaussian_mixture_2d, sliced_wasserstein, train_toy_consistency, train_toy_diffusion
from lcm_kit.training.losses import ConsistencyLoss, ECTLoss, SCMLoss

# iCT's two-step schedule for CIFAR-10 (sigma_max then 0.821), used for every 2-step consistency row.
TWO_STEP_SIGMAS = [80.0, 0.821]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusion_steps", type=int, default=2000)
    parser.add_argument("--consistency_steps", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--hidden_dim", type=int, default=128)
    parser.add_argument("--modes", default="cd,ct,ict,ect,sct,scd,scd_log_sigma")
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    def data(n, generator):
        return gaussian_mixture_2d(n, generator)

    reference, _ = gaussian_mixture_2d(args.num_samples, torch.Generator().manual_seed(10_000 + args.seed))
    other, _ = gaussian_mixture_2d(args.num_samples, torch.Generator().manual_seed(20_000 + args.seed))
    noise = torch.randn(args.num_samples, 2, generator=torch.Generator().manual_seed(30_000 + args.seed))

    def score(samples):
        return sliced_wasserstein(samples, reference, generator=torch.Generator().manual_seed(1))

    rows = [("data vs data (floor)", "-", score(other), 0.0)]
    start = time.perf_counter()
    diffusion = EDMDenoiser(ToyMLP(hidden_dim=args.hidden_dim))
    train_toy_diffusion(diffusion, data, args.diffusion_steps, args.batch_size, seed=args.seed, progress=True)
    diffusion_time = time.perf_counter() - start
    for steps, solver in ((1, "euler"), (2, "euler"), (25, "heun")):
        samples = edm_sample(diffusion, noise, steps, solver)
        rows.append((f"diffusion (EDM {solver})", steps, score(samples), diffusion_time))
    modes = args.modes.split(",")
    if {"sct", "scd"} & set(modes):
        start = time.perf_counter()
        trig_diffusion = EDMDenoiser(ToyMLP(hidden_dim=args.hidden_dim), noise_conditioning=_trigflow_time)
        train_toy_diffusion(trig_diffusion, data, args.diffusion_steps, args.batch_size, seed=args.seed, progress=True)
        trig_time = time.perf_counter() - start
        for steps, solver in ((1, "euler"), (25, "heun")):
            rows.append((f"diffusion, TrigFlow time input (EDM {solver})", steps,
                         score(edm_sample(trig_diffusion, noise, steps, solver)), trig_time))
    for mode in modes:
        start = time.perf_counter()
        scheduler = CMMultistepScheduler(clip_denoised=False)
        if mode in ("sct", "scd", "scd_log_sigma"):
            start_from = diffusion if mode == "scd_log_sigma" else trig_diffusion
            model = TrigFlowConsistencyModel(copy.deepcopy(start_from.backbone), loss_weighting=AdaptiveLossWeighting(),
                                             time_conditioning=_log_sigma if mode == "scd_log_sigma" else None)
            objective = SCMLoss("sct" if mode == "sct" else "scd", teacher=None if mode == "sct" else start_from,
                                tangent_warmup_steps=args.consistency_steps // 10)
            if mode != "scd_log_sigma":
                scheduler = CMMultistepScheduler(clip_denoised=False, parameterization="trigflow")
        elif mode == "ect":
            model, objective = ConsistencyModel(copy.deepcopy(diffusion.backbone)), ECTLoss(args.consistency_steps)
        else:
            model = ConsistencyModel(copy.deepcopy(diffusion.backbone))
            kwargs = {"teacher": diffusion} if mode == "cd" else {}
            objective = ConsistencyLoss(mode, args.consistency_steps, **kwargs)
        ema, _ = train_toy_consistency(objective, model, data, args.batch_size, seed=args.seed, progress=True,
                                       num_steps=args.consistency_steps)
        elapsed = time.perf_counter() - start
        for steps in (1, 2):
            sample_kwargs = {"num_inference_steps": 1} if steps == 1 else {"sigmas": TWO_STEP_SIGMAS}
            for name, net in (("online", model), ("EMA", ema)):
                generator = torch.Generator().manual_seed(40_000 + args.seed)
                if mode == "scd_log_sigma":  # its time input is no scheduler's: f itself at the same two sigmas
                    samples = _trigflow_sample(net, noise, steps, generator)
                else:
                    samples = consistency_sample(net.backbone, scheduler, noise, generator=generator, **sample_kwargs)
                rows.append((f"{mode.upper()} ({name})", steps, score(samples), elapsed))

    header = ("| model | steps | sliced W2 to data (lower is better) | train CPU s |\n|---|---|---|---|")
    lines = [header] + [f"| {name} | {steps} | {value:.4f} | {t:.0f} |" for name, steps, value, t in rows]
    table = "\n".join(lines)
    print(table)
    print(f"diffusion steps {args.diffusion_steps}, consistency steps {args.consistency_steps}, batch {args.batch_size}, "
          f"{args.threads} thread(s)")
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(table + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


def _trigflow_time(sigma):
    return trigflow_time_from_sigma(sigma, SIGMA_DATA)


def _log_sigma(t):
    return sigma_to_timestep(sigma_from_trigflow_time(t, SIGMA_DATA))


@torch.no_grad()
def _trigflow_sample(model, noise, steps, generator):
    """1 or 2 steps of a TrigFlow consistency model called directly, at the TrigFlow times of sigmas [80, 0.821]."""
    times = [_trigflow_time(torch.tensor(s)) for s in TWO_STEP_SIGMAS[:steps]]
    x = model(noise * SIGMA_DATA, times[0].expand(len(noise)))  # x_t at t ~ pi/2 is sigma_data z
    for t in times[1:]:
        z = torch.randn(noise.shape, generator=generator) * SIGMA_DATA
        x = model(torch.cos(t) * x + torch.sin(t) * z, t.expand(len(noise)))
    return x


if __name__ == "__main__":
    main()
