"""LCM, PCM (2 and 4 phases, with and without its adversarial loss), TCD and sCD distilled from the shipped digits
teacher, side by side, with their noise.

Each method is an LCM-LoRA run of the quickstart's recipe (``lcm_kit.commands.quickstart.LORA_RECIPE``: the same
steps, batch, lr, rank, 10-point skip grid, Heun teacher step, fixed w = 2 i.e. CFG 3), differing only in
``--method`` / ``--num_phases`` (and ``--adversarial_weight`` for the ``*adv`` entries), so every method gets the
quickstart LoRA's budget (sCD: the steps that fit it at its measured step cost). Three training seeds per method,
three sampling seeds per model; every figure is the mean ± sd over the nine (training, sampling) pairs.

Per model and step count (1 / 2 / 4 / 8, default timesteps; and the timesteps ``lcm-kit tune-steps`` finds at 2 and 4
steps on training seed 0 with its own sampling seed, 100):

* accuracy and FD to the held-out digits (the digits harness), and its ratio to the teacher's 25-step DPM-Solver at
  CFG 3 with the same sampling seed;
* **fidelity to the guided teacher**: FD to the teacher's own 25-step samples (CFG 3), and at 1 step the mean RMS
  latent distance to the teacher's DDIM ODE solution (100 steps, CFG 3) from the same initial latents.

Samplers, as each method's users sample: LCM and sCD with ``ConsistencyScheduler`` (= diffusers' ``LCMScheduler``)
on the teacher's scheduler config, PCM with ``TCDScheduler(eta=0)`` and TCD with ``TCDScheduler(eta=0.3)``, both on the
distillation grid (``original_inference_steps=10``); the TCD models are also scored at ``eta=0`` (row "TCD (gamma
0)", default timesteps only). The LoRAs are loaded into stock ``StableDiffusionPipeline``
with ``load_lora_weights_strict``; guidance is baked in (``guidance_scale=1``).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/compare_objectives.py --out /tmp/cmp
    # evaluation only, over runs already in --out (e.g. trained by two such processes side by side):
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/compare_objectives.py --out /tmp/cmp --skip_training
    # one table from evaluations run in several folders at once (e.g. one process per method):
    python benchmarks/compare_objectives.py --out /tmp/cmp --merge /tmp/cmp-lcm /tmp/cmp-pcm

Writes ``OUT/compare.json`` (every row) and ``OUT/compare.md`` (the tables), and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

METHODS = {
    "lcm": {"flags": {}, "label": "LCM", "scheduler": "consistency", "scheduler_config": {}, "call": {}},
    "pcm2": {"flags": {"method": "pcm", "num_phases": 2}, "label": "PCM, 2 phases", "scheduler": "tcd",
             "scheduler_config": {"original_inference_steps": 10}, "call": {"eta": 0.0}},
    "pcm4": {"flags": {"method": "pcm", "num_phases": 4}, "label": "PCM, 4 phases", "scheduler": "tcd",
             "scheduler_config": {"original_inference_steps": 10}, "call": {"eta": 0.0}},
    # PCM's adversarial consistency loss: the PCM scripts' weight 0.1 and their discriminator / student learning-rate
    # ratio (1e-5 / 5e-6 = 2) applied to the recipe's 3e-4
    "pcm4adv": {"flags": {"method": "pcm", "num_phases": 4, "adversarial_weight": 0.1,
                          "adversarial_learning_rate": 6e-4},
                "label": "PCM, 4 phases, adversarial (weight 0.1)", "scheduler": "tcd",
                "scheduler_config": {"original_inference_steps": 10}, "call": {"eta": 0.0}},
    "pcm2adv": {"flags": {"method": "pcm", "num_phases": 2, "adversarial_weight": 0.1,
                          "adversarial_learning_rate": 6e-4},
                "label": "PCM, 2 phases, adversarial (weight 0.1)", "scheduler": "tcd",
                "scheduler_config": {"original_inference_steps": 10}, "call": {"eta": 0.0}},
    # sCM's continuous-time distillation, sampled as an LCM (its consistency function maps to the origin); its step
    # costs 1.55x an LCM step (benchmarks/bench_scd_step.py), so the LCM-LoRA's 2,000 steps buy 1,293
    "scd": {"flags": {"method": "scd", "max_train_steps": 1293}, "label": "sCD", "scheduler": "consistency",
            "scheduler_config": {}, "call": {}},
    "tcd": {"flags": {"method": "tcd"}, "label": "TCD (gamma 0.3)", "scheduler": "tcd",
            "scheduler_config": {"original_inference_steps": 10}, "call": {"eta": 0.3}},
    # the same TCD LoRAs sampled deterministically (no training of their own, not tuned)
    "tcd0": {"flags": None, "trained_as": "tcd", "label": "TCD (gamma 0)", "scheduler": "tcd",
             "scheduler_config": {"original_inference_steps": 10}, "call": {"eta": 0.0}},
}
GUIDANCE = 3.0
STEPS = (1, 2, 4, 8)
TUNED_STEPS = (2, 4)
TUNE_SEED = 100


def lora_dir(out: Path, method: str, seed: int) -> Path:
    return out / f"{METHODS[method].get('trained_as', method)}-seed{seed}"


def train(out: Path, method: str, seed: int, recipe_overrides: dict | None = None) -> float | None:
    """Distil one LoRA (skipped when its weights exist); returns the wall time or None when skipped.
    ``recipe_overrides``: flags that replace the method's and the recipe's (``--max_train_steps``,
    ``--learning_rate``, ``--scd_p_mean``, ``--scd_p_std`` of this script)."""
    from lcm_kit import digits
    from lcm_kit.commands.quickstart import distillation_argv, run_distillation, write_digits_dataset

    target = lora_dir(out, method, seed)
    if METHODS[method]["flags"] is None or (target / "pytorch_lora_weights.safetensors").exists():
        return None
    data = out / f"data-seed{seed}"
    if not (data / "dataset_info.json").exists():
        write_digits_dataset(data, seed=seed)
    overrides = {**METHODS[method]["flags"], **(recipe_overrides or {})}
    argv = distillation_argv(digits.teacher_path(), data, target, seed=seed, guidance=GUIDANCE, **overrides)
    return run_distillation(argv, False, "accelerate", 1, "cpu")


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(mean, sd, digits=2):
    return "—" if mean is None else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def evaluate(args, out: Path):
    from diffusers import StableDiffusionPipeline

    from lcm_kit import digits
    from lcm_kit.eval import evaluate_images, evaluate_pipeline, load_classifier
    from lcm_kit.eval.fidelity import generate_latents, mean_latent_distance, ode_solution_latents, teacher_reference
    from lcm_kit.lora import load_lora_weights_strict

    classifier = load_classifier()
    pipe = StableDiffusionPipeline.from_pretrained(str(digits.teacher_path()), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    references = {}
    for sample_seed in args.sample_seeds:
        reference = teacher_reference(pipe, GUIDANCE, args.num_per_digit, sample_seed, classifier)
        ode = ode_solution_latents(pipe, GUIDANCE, args.num_per_digit, sample_seed)
        unguided = evaluate_pipeline(pipe, "dpmsolver", 25, 1.0, args.num_per_digit, sample_seed,
                                     classifier=classifier)
        references[sample_seed] = {"stats": reference["stats"], "ode": ode, "fd": reference["row"]["fd"]}
        rows.append(dict(model="teacher DPM-Solver, CFG 3", method="teacher", train_seed=None,
                         sample_seed=sample_seed, steps=25, timesteps="default", accuracy=reference["row"]["accuracy"],
                         fd=reference["row"]["fd"], fd_ratio=1.0))
        rows.append(dict(model="teacher DPM-Solver, CFG 1 (unguided)", method="teacher-unguided", train_seed=None,
                         sample_seed=sample_seed, steps=25, timesteps="default", accuracy=unguided["accuracy"],
                         fd=unguided["fd"], fd_ratio=unguided["fd"] / reference["row"]["fd"]))
        print(f"teacher, sampling seed {sample_seed}: FD {reference['row']['fd']:.2f}, unguided {unguided['fd']:.2f}",
              flush=True)

    tuned = json.loads((out / "tuned_timesteps.json").read_text()) if (out / "tuned_timesteps.json").exists() else {}
    for method in args.methods:
        spec = METHODS[method]
        for train_seed in args.train_seeds:
            folder = lora_dir(out, method, train_seed)
            if not (folder / "pytorch_lora_weights.safetensors").exists():
                print(f"skipping {folder}: not trained", flush=True)
                continue
            pipe.unload_lora_weights()
            load_lora_weights_strict(pipe, folder, low_cpu_mem_usage=True)
            plans = [(steps, None) for steps in args.steps]
            plans += [(len(t), t) for key, t in tuned.get(method, {}).items()]
            for steps, timesteps in plans:
                for sample_seed in args.sample_seeds:
                    ref = references[sample_seed]
                    call = dict(spec["call"])
                    if timesteps is not None:
                        call["timesteps"] = list(timesteps)
                    row, images = evaluate_pipeline(
                        pipe, spec["scheduler"], steps, 1.0, args.num_per_digit, sample_seed, classifier=classifier,
                        return_images=True, scheduler_config=spec["scheduler_config"], **call)
                    labels = torch.arange(10).repeat_interleave(args.num_per_digit)
                    to_teacher = evaluate_images(images, labels, classifier=classifier, reference=ref["stats"],
                                                 value_range=(0.0, 1.0))["fd"]
                    result = dict(model=spec["label"], method=method, train_seed=train_seed, sample_seed=sample_seed,
                                  steps=steps, timesteps="tuned" if timesteps is not None else "default",
                                  timestep_list=list(timesteps) if timesteps is not None else None,
                                  accuracy=row["accuracy"], fd=row["fd"], fd_ratio=row["fd"] / ref["fd"],
                                  fd_to_teacher=to_teacher)
                    if steps == 1:
                        latents = generate_latents(pipe, spec["scheduler"], 1, 1.0, args.num_per_digit, sample_seed,
                                                   spec["scheduler_config"], **spec["call"])
                        result["ode_distance"] = mean_latent_distance(latents, ref["ode"])
                    rows.append(result)
                    print(json.dumps({k: v for k, v in result.items() if k != "timestep_list"}), flush=True)
    return rows


def summarise(rows):
    """One line per (model, steps, timesteps): mean ± sd over the (training, sampling) seed pairs."""
    groups = {}
    for row in rows:
        key = (row["model"], row["method"], row["steps"], row["timesteps"])
        groups.setdefault(key, []).append(row)
    summary = []
    for (model, method, steps, timesteps), group in groups.items():
        line = dict(model=model, method=method, steps=steps, timesteps=timesteps, n=len(group),
                    timestep_list=group[0].get("timestep_list"))
        for name in ("accuracy", "fd", "fd_ratio", "fd_to_teacher", "ode_distance"):
            line[name] = mean_sd([r.get(name) for r in group])
        summary.append(line)
    return summary


def render(summary) -> str:
    lines = ["| model | steps | timesteps | accuracy % | FD to data | × teacher 25 | FD to teacher's samples | "
             "1-step distance to the teacher's ODE solution | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    for line in summary:
        acc_mean, acc_sd = line["accuracy"]
        accuracy = "—" if acc_mean is None else f"{100 * acc_mean:.1f} ± {100 * acc_sd:.1f}"
        timesteps = line["timesteps"] if line["timestep_list"] is None else str(line["timestep_list"])
        lines.append(f"| {line['model']} | {line['steps']} | {timesteps} | {accuracy} | {fmt(*line['fd'])} | "
                     f"{fmt(*line['fd_ratio'])} | {fmt(*line['fd_to_teacher'])} | {fmt(*line['ode_distance'], 3)} | "
                     f"{line['n']} |")
    return "\n".join(lines)


RATIO_TARGETS = {1: 1.15, 2: 0.8, 4: 1.0}  # best method's FD / teacher 25 steps, shipped teacher, CFG 3


def check_targets(summary) -> list[str]:
    """The comparison's targets, each met or missed by how much (mean ± sd over the seed pairs)."""
    lines = {(line["method"], line["steps"], line["timesteps"]): line for line in summary}
    methods = [m for m in METHODS if (m, 1, "default") in lines]
    report = []
    for steps, target in RATIO_TARGETS.items():
        candidates = [(lines[m, steps, t]["fd_ratio"], m, t) for m in methods for t in ("default", "tuned")
                      if (m, steps, t) in lines]
        if not candidates:
            continue
        (mean, sd), method, kind = min(candidates, key=lambda c: c[0][0])
        margin = target - mean
        met = margin > 2 * sd
        in_sd = f"{margin / sd:+.1f} sd" if sd else "no spread"
        report.append(f"- {steps} step(s), FD ≤ {target}× the teacher's by more than 2 sd: best "
                      f"{METHODS[method]['label']} ({kind} timesteps) {mean:.2f} ± {sd:.2f}× — "
                      f"{'met' if met else 'missed'} (margin {margin:+.2f}, {in_sd}).")
    for method in methods:
        fidelity = [lines[method, k, "default"]["fd_to_teacher"][0] for k in STEPS if (method, k, "default") in lines]
        worse = [f"{a:.2f} → {b:.2f}" for a, b in zip(fidelity, fidelity[1:]) if b > a]
        report.append(f"- {METHODS[method]['label']}: FD to the teacher's samples at "
                      f"{' / '.join(str(k) for k in STEPS)} steps {' / '.join(f'{v:.2f}' for v in fidelity)} — "
                      + ("never worse with more steps: met." if not worse else f"gets worse ({', '.join(worse)}): "
                                                                                 "missed."))
    if "lcm" in methods:
        reference = lines["lcm", 1, "default"]["ode_distance"][0]
        for method in methods:
            if method == "lcm":
                continue
            mean, sd = lines[method, 1, "default"]["ode_distance"]
            report.append(f"- {METHODS[method]['label']}: 1-step distance to the teacher's ODE solution {mean:.3f} ± "
                          f"{sd:.3f} vs LCM {reference:.3f} ({mean / reference:.2f}×; target ≤ 0.5×): "
                          f"{'met' if mean <= 0.5 * reference else 'missed'}.")
    for method in methods:
        if (method, 2, "tuned") not in lines:
            continue
        tuned, default = lines[method, 2, "tuned"]["fd"][0], lines[method, 2, "default"]["fd"][0]
        report.append(f"- {METHODS[method]['label']}: tuned 2-step list {lines[method, 2, 'tuned']['timestep_list']} "
                      f"FD {tuned:.2f} vs default {default:.2f} ({tuned / default:.2f}×; target ≤ 0.9×): "
                      f"{'met' if tuned <= 0.9 * default else 'missed'}.")
    return report


def tune(args, out: Path):
    """The 2- and 4-step timesteps ``lcm-kit tune-steps`` finds for each method on training seed 0 (its search,
    :func:`lcm_kit.eval.tune.search_timesteps`, on the FD of 20 images per digit with sampling seed 100)."""
    from diffusers import StableDiffusionPipeline

    from lcm_kit import digits
    from lcm_kit.eval import load_classifier
    from lcm_kit.eval.tune import digits_fd_score, search_timesteps
    from lcm_kit.lora import load_lora_weights_strict

    path = out / "tuned_timesteps.json"
    tuned = json.loads(path.read_text()) if path.exists() else {}
    classifier = load_classifier()
    for method in args.methods:
        spec = METHODS[method]
        folder = lora_dir(out, method, args.train_seeds[0])
        todo = [k for k in args.tuned_steps if str(k) not in tuned.get(method, {})]
        if spec["flags"] is None or not folder.exists() or not todo:  # variants of another method are not tuned
            continue
        pipe = StableDiffusionPipeline.from_pretrained(str(digits.teacher_path()), safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        load_lora_weights_strict(pipe, folder, low_cpu_mem_usage=True)
        score = digits_fd_score(pipe, spec["scheduler"], args.num_per_digit, TUNE_SEED, 1.0, classifier=classifier,
                                scheduler_config=spec["scheduler_config"], **spec["call"])
        for steps in todo:
            result = search_timesteps(score, steps)
            tuned.setdefault(method, {})[str(steps)] = result.best
            print(f"{method}, {steps} steps: {result.best} FD {result.best_score:.3f} (evenly spaced {result.start} "
                  f"{result.start_score:.3f}; seed {TUNE_SEED})", flush=True)
            path.write_text(json.dumps(tuned, indent=2))
    return tuned


def merge(out: Path, folders) -> None:
    """One compare.json / compare.md from the evaluations in ``folders`` (their teacher rows agree: the same seeds)."""
    rows, seen, times = [], set(), {}
    for folder in folders:
        report = json.loads((Path(folder) / "compare.json").read_text())
        times.update(report.get("train_wall_s", {}))
        for row in report["rows"]:
            key = (row["method"], row["train_seed"], row["sample_seed"], row["steps"], row["timesteps"])
            if key in seen:
                continue
            seen.add(key)
            rows.append(row)
    summary = summarise(rows)
    table = render(summary) + "\n\n" + "\n".join(check_targets(summary))
    (out / "compare.json").write_text(json.dumps({"rows": rows, "summary": summary, "train_wall_s": times,
                                                  "merged_from": [str(f) for f in folders]}, indent=2))
    (out / "compare.md").write_text(table + "\n")
    print(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--train_seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sample_seeds", nargs="+", type=int, default=[0, 1000, 2000],
                        help="image i uses noise seed s + i: 1000 apart, the 200 images of each never overlap")
    parser.add_argument("--steps", nargs="+", type=int, default=list(STEPS))
    parser.add_argument("--tuned_steps", nargs="*", type=int, default=list(TUNED_STEPS))
    parser.add_argument("--num_per_digit", type=int, default=20)
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="only merge the compare.json of these folders into OUT's tables (teacher rows once)")
    parser.add_argument("--max_train_steps", type=int, default=None,
                        help="override the recipe's steps (smoke runs only: the figures use the quickstart budget)")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="override the recipe's learning rate (diagnostics: the figures use the recipe's)")
    parser.add_argument("--scd_p_mean", type=float, default=None,
                        help="sCD: override the lognormal mean of its training noise levels (diagnostics)")
    parser.add_argument("--scd_p_std", type=float, default=None,
                        help="sCD: override the lognormal sd of its training noise levels (diagnostics)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge(args.out, args.merge)
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    times_path = args.out / "train_times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    if not args.skip_training:
        for seed in args.train_seeds:
            for method in args.methods:
                given = {"max_train_steps": args.max_train_steps, "learning_rate": args.learning_rate}
                if method == "scd":
                    given.update(scd_p_mean=args.scd_p_mean, scd_p_std=args.scd_p_std)
                overrides = {flag: value for flag, value in given.items() if value is not None}
                wall = train(args.out, method, seed, overrides)
                if wall is not None:
                    times[f"{method}-seed{seed}"] = wall
                    times_path.write_text(json.dumps(times, indent=2))
    start = time.time()
    if args.tuned_steps:
        tune(args, args.out)
    rows = evaluate(args, args.out)
    summary = summarise(rows)
    table = render(summary) + "\n\n" + "\n".join(check_targets(summary))
    (args.out / "compare.json").write_text(json.dumps({"rows": rows, "summary": summary, "train_wall_s": times,
                                                       "evaluation_wall_s": time.time() - start}, indent=2))
    (args.out / "compare.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
