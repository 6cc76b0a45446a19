"""Publishing what a run trained: model cards (one renderer) and the Hub upload; secrets are masked by
:mod:`lcm_kit.training.redaction`.

    card = render_model_card("runwayml/stable-diffusion-v1-5", "me/lcm-lora-sd15", lora=True,
                             training_command=training_command(), license=license_from_model_folder_or_card(teacher),
                             validation_image="validation.png")
    push_to_hub(output_dir, "me/lcm-lora-sd15", token=args.hub_token, model_card=card)

Every card goes through ``redact_text`` and its training command through ``redact_command``; the token itself is
only ever handed to ``HfApi``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData, try_to_load_from_cache

from .redaction import redact_command, redact_text, training_command

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_IGNORE_PATTERNS",
    "hub_repo_id",
    "license_from_model_folder_or_card",
    "push_to_hub",
    "push_training_outputs",
    "render_card",
    "render_consistency_model_card",
    "render_lcm_model_card",
    "render_model_card",
]

#: Never uploaded: training state, caches, temporary and hidden files.
DEFAULT_IGNORE_PATTERNS = (
    "checkpoint-*", "*/checkpoint-*", "step_*", "epoch_*", "*.tmp", "*.tmp-*", ".*", "*/.*", "*cache*/*",
    "*.lock",
)
_STANDARD_TAGS = ("lcm", "diffusers", "text-to-image", "lcm-kit")


def license_from_model_folder_or_card(path_or_id: str | os.PathLike | None) -> str | None:
    """The ``license`` in a teacher's model card front matter, or ``None`` when not known.

    Reads ``<folder>/README.md``, a card file given directly, or for a Hub id the README already in the local
    Hugging Face cache (never the network). ``license: other`` with a ``license_name`` returns the name.
    """
    if path_or_id is None:
        return None

    path = Path(path_or_id).expanduser()
    card_path: Path | None = None
    if path.is_dir():
        card_path = path / "README.md" if (path / "README.md").is_file() else None
    elif path.is_file():
        card_path = path
    else:
        try:
            cached = try_to_load_from_cache(str(path_or_id), "README.md")
        except Exception:  # not a valid repo id: nothing cached to read
            cached = None
        card_path = Path(cached) if isinstance(cached, str) else None
    if card_path is None:
        return None
    data = ModelCard(card_path.read_text(encoding="utf-8"), ignore_metadata_errors=True).data
    license_value = getattr(data, "license", None)
    if license_value == "other" and getattr(data, "license_name", None):
        return str(data.license_name)
    return str(license_value) if license_value else None


def _is_hub_id(name: str) -> bool:
    """Hub repo ids look like ``name`` or ``owner/name`` and are not paths that exist here."""
    return (not Path(name).expanduser().exists() and not name.startswith(("/", ".", "~"))
            and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None)


def _usage_snippet(base_model: str, hub_model_id: str, lora: bool, sdxl: bool = False, method: str = "lcm",
                   num_phases: int | None = None, num_ddim_timesteps: int = 50) -> str:
    if method not in ("lcm", "scd"):  # sCD samples as an LCM does
        return _trajectory_snippet(base_model, hub_model_id, lora, sdxl, method, num_phases, num_ddim_timesteps)
    if lora:
        return f'''```python
import torch
from diffusers import DiffusionPipeline, LCMScheduler

pipe = DiffusionPipeline.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
pipe.load_lora_weights("{hub_model_id}")

# LCM-LoRA: 4 steps, guidance 1.0 (no classifier-free guidance; 1.0-2.0 works)
image = pipe("a photo of an astronaut riding a horse", num_inference_steps=4, guidance_scale=1.0).images[0]
image.save("lcm.png")
```'''
    pipeline = "StableDiffusionXLPipeline" if sdxl else "LatentConsistencyModelPipeline"
    return f'''```python
import torch
from diffusers import {pipeline}, LCMScheduler, UNet2DConditionModel

unet = UNet2DConditionModel.from_pretrained("{hub_model_id}", subfolder="unet", torch_dtype=torch.float16)
pipe = {pipeline}.from_pretrained("{base_model}", unet=unet, torch_dtype=torch.float16)
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
pipe = pipe.to("cuda")

# The guidance scale is an input of the distilled UNet (guidance embedding), applied in a single pass.
image = pipe("a photo of an astronaut riding a horse", num_inference_steps=4, guidance_scale=8.0).images[0]
image.save("lcm.png")
```'''


def _trajectory_snippet(base_model, hub_model_id, lora, sdxl, method, num_phases, num_ddim_timesteps) -> str:
    """PCM and TCD models sample with diffusers' TCDScheduler on their distillation grid: PCM deterministically
    (eta 0) in as many steps as phases, which walks the phase edges; TCD with its gamma as eta (0.3)."""
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    steps, eta = (num_phases, 0.0) if method == "pcm" else (4, 0.3)
    comment = (f"# PCM, {num_phases} phases: {num_phases} steps over the phase edges, deterministic (eta 0)"
               if method == "pcm" else "# TCD: 4 steps (2-8 work), eta = TCD's gamma (0 deterministic, 0.3 default)")
    if lora:
        load = (f'pipe = {pipeline}.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")\n'
                f'pipe.load_lora_weights("{hub_model_id}")')
        imports, guidance = f"{pipeline}, TCDScheduler", 1.0
    else:
        load = (f'unet = UNet2DConditionModel.from_pretrained("{hub_model_id}", subfolder="unet", '
                f'torch_dtype=torch.float16)\n'
                f'pipe = {pipeline}.from_pretrained("{base_model}", unet=unet, torch_dtype=torch.float16).to("cuda")')
        imports, guidance = f"{pipeline}, TCDScheduler, UNet2DConditionModel", 8.0
    return f'''```python
import torch
from diffusers import {imports}

{load}
pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config, original_inference_steps={num_ddim_timesteps})

{comment}
image = pipe("a photo of an astronaut riding a horse", num_inference_steps={steps}, guidance_scale={guidance},
             eta={eta}).images[0]
image.save("{method}.png")
```'''


def render_card(title: str, sections: Sequence[str], card_data=None) -> str:
    """The one renderer of every card and README lcm-kit writes: ``# title``, the sections separated by blank
    lines, YAML front matter from ``card_data`` (a ``huggingface_hub.ModelCardData``) when given; token-shaped
    strings are masked."""

    body = "\n\n".join([f"# {title}", *sections]) + "\n"
    if card_data is None:
        return redact_text(body)
    return redact_text(str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")))


def render_model_card(
    base_model: str,
    hub_model_id: str,
    lora: bool,
    training_command: str | Sequence[str],
    license: str | None = None,
    validation_image: str | None = None,
    extra_tags: Iterable[str] = (),
    metrics: Mapping[str, Any] | None = None,
    datasets: str | Sequence[str] | None = None,
    sdxl: bool = False,
    method: str = "lcm",
    num_phases: int | None = None,
    num_ddim_timesteps: int = 50,
) -> str:
    """A Hub model card (``README.md``) for an LCM-LoRA (``lora=True``) or a fully distilled LCM UNet (``sdxl``:
    of an SDXL base, tagged ``sdxl``, the snippet uses ``StableDiffusionXLPipeline``). ``method`` "pcm" / "tcd"
    (distilled with that target rule, tagged so) gives a ``TCDScheduler`` snippet on the ``num_ddim_timesteps``
    grid (PCM: ``num_phases`` steps, eta 0); "scd" (sCM distillation) samples, and gets the snippet of, an LCM.

    Front matter: ``base_model`` (when it is a Hub id; a local teacher path is named in the text only),
    ``license`` when known, ``library_name: diffusers``, tags lcm / lora / diffusers / text-to-image / lcm-kit
    (+ ``extra_tags``), ``datasets``. Body: a 4-step usage snippet, the validation grid (``validation_image``,
    a path relative to the uploaded folder), ``metrics`` as a table and the training command with secrets
    redacted.
    """

    if not isinstance(base_model, str) or not base_model:
        raise ValueError(f"base_model must be a non-empty string, got {base_model!r}")
    if not isinstance(hub_model_id, str) or not hub_model_id:
        raise ValueError(f"hub_model_id must be a non-empty string, got {hub_model_id!r}")
    tags = list(_STANDARD_TAGS[:1]) + (["lora"] if lora else []) + list(_STANDARD_TAGS[1:])
    method_tags = {"lcm": [], "pcm": ["pcm", "phased-consistency-model"], "tcd": ["tcd", "trajectory-consistency"],
                   "scd": ["scm", "continuous-time-consistency"]}
    if method not in method_tags:
        raise ValueError(f"method must be one of {tuple(method_tags)}, got {method!r}.")
    tags += [t for t in [*extra_tags, *(["sdxl"] if sdxl else []), *method_tags[method]] if t not in tags]
    base_is_hub_id = _is_hub_id(base_model)
    data = ModelCardData(
        base_model=base_model if base_is_hub_id else None,
        license=license,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
        datasets=[datasets] if isinstance(datasets, str) else (list(datasets) if datasets else None),
    )
    kind = {"lcm": "LCM", "pcm": "PCM", "tcd": "TCD", "scd": "sCD"}[method] + ("-LoRA" if lora else " (distilled UNet)")
    if method == "lcm" and not lora:
        kind = "Latent Consistency Model (distilled UNet)"
    distillation = {"lcm": "latent consistency distillation",
                    "pcm": f"phased consistency distillation, {num_phases} phases",
                    "tcd": "trajectory consistency distillation",
                    "scd": "continuous-time consistency distillation (sCM, TrigFlow)"}[method]
    teacher = f"[{base_model}](https://huggingface.co/{base_model})" if base_is_hub_id else f"`{base_model}`"
    what = (
        "A LoRA adapter that turns the teacher into a latent consistency model: load it on top of the base "
        "pipeline and sample in 2-8 steps."
        if lora else
        "A UNet distilled from the teacher by latent consistency distillation, with a guidance-scale embedding: "
        "use it in place of the base UNet and sample in 2-8 steps."
    )
    sections = [
        f"# {kind}: {hub_model_id}",
        f"Distilled from {teacher} with lcm-kit ({distillation}). {what}",
        "## Usage\n\n" + _usage_snippet(base_model if base_is_hub_id else "<base model>", hub_model_id, lora, sdxl,
                                        method, num_phases, num_ddim_timesteps),
    ]
    if validation_image:
        sections.append(f"## Validation samples (4 steps)\n\n![validation images]({validation_image})")
    if metrics:
        rows = "\n".join(f"| {redact_text(str(name))} | {redact_text(_format_metric(value))} |"
                         for name, value in metrics.items())
        sections.append("## Metrics\n\n| metric | value |\n|---|---|\n" + rows)
    sections.append("## Training\n\nTrained with:\n\n```bash\n" + redact_command(training_command) + "\n```")
    if license is None:
        sections.append("License: not known (the teacher's card did not state one); check the base model's terms.")
    return render_card(sections[0].removeprefix("# "), sections[1:], data)


def _format_metric(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    client: Any = None,
    commit_message: str = "Upload LCM weights trained with lcm-kit",
    private: bool = False,
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
    model_card: str | None = None,
) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` to it; returns the repo id the Hub reports.

    Args:
        folder: the output directory (weights, ``README.md``, validation grid).
        repo_id: ``owner/name`` or ``name``.
        token: Hub token for the default client; never logged nor written anywhere.
        client: an ``huggingface_hub.HfApi``-like object (tests inject a recording fake); default
            ``HfApi(token=token)``.
        ignore_patterns: never uploaded; by default checkpoints, caches, temporary and hidden files.
        model_card: when given, written to ``folder/README.md`` first.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder={str(folder)!r} is not a directory")
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a non-empty string like 'owner/name', got {repo_id!r}")
    if client is None:
        client = HfApi(token=token)
    if model_card is not None:
        (folder / "README.md").write_text(model_card, encoding="utf-8")
    repo_url = client.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
    resolved = getattr(repo_url, "repo_id", None) or repo_id
    logger.info("uploading %s to the Hub repo %s", folder, resolved)
    client.upload_folder(
        repo_id=resolved,
        folder_path=str(folder),
        commit_message=commit_message,
        ignore_patterns=list(ignore_patterns),
        repo_type="model",
    )
    return resolved


# ----------------------------------------------------------------------------------------------------------------
# Cards and upload of a training run (from its parsed flags)
# ----------------------------------------------------------------------------------------------------------------


def hub_repo_id(args) -> str:
    """``--hub_model_id``, or the output folder's name."""
    return args.hub_model_id or Path(args.output_dir).resolve().name


def _validation_image(args, result) -> str | None:
    return os.path.relpath(result.validation_grids[-1], args.output_dir) if result.validation_grids else None


def render_lcm_model_card(args, lora: bool, result, command: Sequence[str] | None = None,
                          family: str = "sd") -> str:
    """:func:`render_model_card` for an LCM-LoRA / full LCM run of a ``family`` ("sd" or "sdxl") teacher: base
    model, license, tags, command, 4-step snippet, validation grid, final loss and steps."""
    dataset = args.dataset_name if args.dataset_name and not os.path.exists(args.dataset_name) else None
    return render_model_card(
        base_model=str(args.pretrained_teacher_model),
        hub_model_id=hub_repo_id(args),
        lora=lora,
        training_command=training_command(command),
        license=license_from_model_folder_or_card(args.pretrained_teacher_model),
        validation_image=_validation_image(args, result),
        metrics={"final loss": result.last_loss, "steps": result.global_step},
        datasets=dataset,
        sdxl=family == "sdxl",
        method=args.method,
        num_phases=args.num_phases,
        num_ddim_timesteps=args.num_ddim_timesteps,
    )


def render_consistency_model_card(args, result, command: Sequence[str] | None = None) -> str:
    """A card for a consistency model (CD / CT / iCT) trained here: usage with the stock
    ``ConsistencyModelPipeline``, the validation grid and the command."""

    repo_id = hub_repo_id(args)
    conditional = args.num_class_embeds is not None
    data = ModelCardData(library_name="diffusers", pipeline_tag="unconditional-image-generation",
                         tags=["consistency-models", "diffusers", "lcm-kit", f"consistency-{args.mode}"])
    labels = "class_labels=[0, 1, 2, 3], " if conditional else ""
    latent = ""
    if args.pretrained_vae_model_name_or_path:
        latent = ("\n# Latent-space model: lcm_kit's CMPipeline decodes with the VAE in vae/:\n"
                  "# CMPipeline.from_pretrained(repo, vae=AutoencoderKL.from_pretrained(repo, subfolder='vae'))")
    usage = f'''```python
import torch
from diffusers import ConsistencyModelPipeline

pipe = ConsistencyModelPipeline.from_pretrained("{repo_id}")
images = pipe({labels}batch_size=4, num_inference_steps=1).images          # one step
images = pipe({labels}batch_size=4, timesteps=[22, 0]).images              # two steps{latent}
```'''
    mode_text = {"cd": f"consistency distillation of `{args.teacher}`", "ct": "consistency training (no teacher)",
                 "ict": "improved consistency training (iCT, no teacher)"}[args.mode]
    sections = [
        f"Trained with lcm-kit by {mode_text}, {result.global_step} steps, in EDM sigma space "
        f"([{args.sigma_min}, {args.sigma_max}], sigma_data {args.sigma_data}). The saved UNet is the sampling EMA "
        f"(decay {args.ema_decay}); `unet_online/` holds the online weights.",
        "## Usage\n\n" + usage,
    ]
    grid = _validation_image(args, result)
    if grid:
        sections.append(f"## Validation samples ({args.validation_num_inference_steps} step(s))\n\n![validation]({grid})")
    sections.append("## Training\n\n```bash\n" + training_command(command) + "\n```")
    return render_card(f"Consistency model: {repo_id}", sections, data)


def push_training_outputs(args, model_card: str, client=None,
                          commit_message: str = "Upload weights trained with lcm-kit") -> str:
    """Upload ``--output_dir`` (checkpoints and caches excluded) with ``model_card`` as its README to
    ``--hub_model_id`` through :func:`push_to_hub`; returns the repo id."""
    return push_to_hub(args.output_dir, hub_repo_id(args), token=args.hub_token, client=client,
                       model_card=model_card, commit_message=commit_message)
