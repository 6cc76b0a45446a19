"""pytest plugin: run diffusers' own test suites with lcm-kit's classes in place of diffusers'.

Loaded by ``run.py`` (``pytest -p plugin``). ``LCM_KIT_SUITE_CLASSES`` chooses the classes:

* ``lcm-kit`` (default): before any test module is imported, ``diffusers.<Name>`` is rebound to lcm-kit's class for
  every name in ``REBIND``, so ``from diffusers import LCMScheduler`` in a test file gives ``ConsistencyScheduler``
  (and the common scheduler tests' ``scheduler_class == CMStochasticIterativeScheduler`` branches still apply);
* ``diffusers``: nothing is rebound (the reference run).

Either way ``hf-internal-testing/tiny-random-clip`` (the only Hub file the fast tests load) is served offline by a
stand-in built from the CLIP BPE files shipped in ``lcm_kit/assets/clip_tokenizer``: the same byte-level BPE cut
to 1,000 ids (the 512 byte tokens, the first 486 merges and the two special tokens), so every id fits the tests'
``vocab_size=1000`` text encoder. Its ids are not the real tiny tokenizer's, so tests that compare image slices
against hard-coded numbers may fail with both classes alike; compare the two runs, not the absolute counts.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_CLIP = "hf-internal-testing/tiny-random-clip"
STAND_IN_VOCAB = 1000

# diffusers' name -> (lcm-kit module, lcm-kit class)
REBIND = {
    "LCMScheduler": ("lcm_kit.schedulers", "ConsistencyScheduler"),
    "TCDScheduler": ("lcm_kit.schedulers", "TrajectoryConsistencyScheduler"),
    "CMStochasticIterativeScheduler": ("lcm_kit.schedulers", "CMMultistepScheduler"),
    "LatentConsistencyModelPipeline": ("lcm_kit.pipelines", "LCMPipeline"),
    "LatentConsistencyModelImg2ImgPipeline": ("lcm_kit.pipelines", "LCMPipeline"),
}

_state: dict = {}


def _classes() -> str:
    classes = os.environ.get("LCM_KIT_SUITE_CLASSES", "lcm-kit")
    if classes not in ("lcm-kit", "diffusers"):
        raise ValueError(f"LCM_KIT_SUITE_CLASSES must be 'lcm-kit' or 'diffusers', got {classes!r}.")
    return classes


def build_tiny_clip_stand_in(out_dir: Path) -> Path:
    """Write a CLIP tokenizer folder with ids < 1000 (see the module docstring) to ``out_dir``."""
    from transformers import CLIPTokenizer

    from lcm_kit.testing import CLIP_TOKENIZER_DIR

    full_vocab = json.loads((CLIP_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    specials = ["<|startoftext|>", "<|endoftext|>"]
    kept_ids = STAND_IN_VOCAB - len(specials)
    # CLIP's vocabulary is the 512 byte tokens, then one token per merge in merge order: the first ids are closed
    # under the first (kept_ids - 512) merges.
    vocab = {token: i for token, i in full_vocab.items() if i < kept_ids}
    vocab.update({token: kept_ids + k for k, token in enumerate(specials)})
    lines = (CLIP_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    header, merges = lines[0], lines[1 : 1 + kept_ids - 512]
    assert all("".join(m.split()) in vocab for m in merges), "the kept merges must produce kept tokens"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "src").mkdir(exist_ok=True)
    (out_dir / "src" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out_dir / "src" / "merges.txt").write_text("\n".join([header, *merges]) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(out_dir / "src" / "vocab.json"), str(out_dir / "src" / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    return out_dir / "tokenizer"


def _serve_tiny_clip_offline(folder: Path) -> None:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    original = PreTrainedTokenizerBase.from_pretrained.__func__

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if str(pretrained_model_name_or_path) == TINY_CLIP:
            pretrained_model_name_or_path = folder
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)

    PreTrainedTokenizerBase.from_pretrained = classmethod(from_pretrained)
    _state["restore_tokenizer"] = lambda: setattr(PreTrainedTokenizerBase, "from_pretrained", classmethod(original))


def _rebind_diffusers_names() -> dict:
    import diffusers
    import diffusers.pipelines

    rebound = {}
    for name, (module, attribute) in REBIND.items():
        ours = getattr(importlib.import_module(module), attribute)
        rebound[name] = (getattr(diffusers, name), ours)
        setattr(diffusers, name, ours)
    # The common pipeline tests read `encode_prompt`'s source through `diffusers.pipelines.<class name>`.
    for _, ours in rebound.values():
        if issubclass(ours, diffusers.DiffusionPipeline):
            setattr(diffusers.pipelines, ours.__name__, ours)
    return rebound


def pytest_configure(config):
    tmp = Path(tempfile.mkdtemp(prefix="lcm-kit-tiny-clip-"))
    _state["tmp"] = tmp
    _serve_tiny_clip_offline(build_tiny_clip_stand_in(tmp))
    classes = _classes()
    _state["rebound"] = _rebind_diffusers_names() if classes == "lcm-kit" else {}


def pytest_report_header(config):
    rebound = _state.get("rebound") or {}
    if not rebound:
        return "diffusers suites: diffusers' own classes (reference run)"
    pairs = ", ".join(f"{name} -> {ours.__module__}.{ours.__name__}" for name, (_, ours) in rebound.items())
    return f"diffusers suites: lcm-kit's classes: {pairs}"


def pytest_unconfigure(config):
    import diffusers
    import diffusers.pipelines

    for name, (original, ours) in (_state.pop("rebound", None) or {}).items():
        setattr(diffusers, name, original)
        diffusers.pipelines.__dict__.pop(ours.__name__, None)
    if "restore_tokenizer" in _state:
        _state.pop("restore_tokenizer")()
    if "tmp" in _state:
        shutil.rmtree(_state.pop("tmp"), ignore_errors=True)
