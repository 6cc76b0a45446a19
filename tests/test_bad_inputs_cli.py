"""Bad command lines of `lcm-kit generate` / `eval` / `quickstart`, in process through lcm_kit.cli.main: every one
stops with SystemExit and a message naming the flag and what is allowed, before any output is written. Nothing
big loads: generate runs on `--model tiny-sd1`, eval on a saved tiny folder, quickstart stops before training."""

import re

import pytest
import torch

from lcm_kit.cli import main

GENERATE = ["generate", "--model", "tiny-sd1", "--prompt", "a red cube", "--height", "32", "--width", "32",
            "--output", "{out}/x.png"]
EVAL = ["eval", "--model", "{kit}", "--scheduler", "lcm", "--steps", "1", "--num_per_digit", "2", "--device", "cpu",
        "--json", "{out}/x.json"]
QUICKSTART = ["quickstart", "--out", "{out}/qs", "--launcher", "inprocess"]
NO_CUDA_INDEX = f"cuda:{torch.cuda.device_count()}"  # one past the last device: refused with or without CUDA

# id -> (argv, regex of the message, argparse usage error (exit code 2, message on stderr) or not (the message is
# the SystemExit value, "lcm-kit <command>: error: ..."))
CASES = {
    "generate: NaN guidance": (GENERATE + ["--guidance_scale", "nan"],
                               r"argument --guidance_scale: must be a finite number >= 0, got 'nan'", True),
    "generate: inf guidance": (GENERATE + ["--guidance_scale", "inf"],
                               r"argument --guidance_scale: must be a finite number >= 0, got 'inf'", True),
    "generate: negative guidance": (GENERATE + ["--guidance_scale", "-1"],
                                    r"argument --guidance_scale: must be a finite number >= 0, got '-1'", True),
    "generate: 0 steps": (GENERATE + ["--num_inference_steps", "0"],
                          r"argument --num_inference_steps: must be an integer >= 1, got '0'", True),
    "generate: fractional steps": (GENERATE + ["--num_inference_steps", "2.5"],
                                   r"argument --num_inference_steps: must be an integer >= 1, got '2\.5'", True),
    "generate: more steps than the scheduler has": (GENERATE + ["--num_inference_steps", "51"],
                                                    r"lcm-kit generate: error: `num_inference_steps` must be in "
                                                    r"\[1, 50\], got 51", False),
    "generate: height not a multiple of 8": (GENERATE + ["--height", "33"],
                                             r"argument --height: must be an integer in \[8, 8192\] that is a "
                                             r"multiple of 8, got '33'", True),
    "generate: width 0": (GENERATE + ["--width", "0"], r"argument --width: must be an integer in \[8, 8192\]", True),
    "generate: height too large": (GENERATE + ["--height", "100000"],
                                   r"argument --height: must be an integer in \[8, 8192\].*got '100000'", True),
    "generate: 0 images": (GENERATE + ["--num_images", "0"],
                           r"argument --num_images: must be an integer >= 1, got '0'", True),
    "generate: negative seed": (GENERATE + ["--seed", "-1"],
                                r"argument --seed: must be an integer in \[0, 9223372036854775807\], got '-1'", True),
    "generate: unknown device": (GENERATE + ["--device", "gpu"],
                                 r"argument --device: must be auto, cpu, cuda, cuda:<index> or mps, got 'gpu'", True),
    "generate: a CUDA device this machine lacks": (GENERATE + ["--device", NO_CUDA_INDEX],
                                                   rf"argument --device: '{NO_CUDA_INDEX}': this machine has", True),
    "generate: unknown dtype": (GENERATE + ["--dtype", "float64"], r"argument --dtype: invalid choice: 'float64'",
                                True),
    "generate: not a PNG": (GENERATE + ["--output", "{out}/x.jpg"], r"--output must be a \.png file", True),
    "generate: output folder missing": (GENERATE + ["--output", "{out}/missing/x.png"],
                                        r"--output '.*missing/x\.png': folder .* does not exist", True),
    "generate: a negative prompt that would be ignored": (GENERATE + ["--negative_prompt", "blurry"],
                                                          r"lcm-kit generate: error: A negative prompt was given but "
                                                          r"would be ignored", False),
    "generate: missing LoRA file": (GENERATE + ["--lora", "{out}/none.safetensors"],
                                    r"--lora '.*none\.safetensors': no such file or folder", False),
    "generate: a pickled LoRA": (GENERATE + ["--lora", "{out}/pickled.bin"],
                                 r"--lora '.*pickled\.bin': LoRA file .* is a pickled PyTorch file: lcm-kit reads "
                                 r"LoRA weights from safetensors files only", False),
    "generate: a model folder with pickled weights": (GENERATE + ["--model", "{pickled_model}"],
                                                      r"--model '.*pickled_model' holds pickled weights \[.*"
                                                      r"unet/diffusion_pytorch_model\.bin.*lcm-kit loads safetensors "
                                                      r"weights only", False),
    "generate: an abbreviated flag": (GENERATE + ["--num_inf", "2"],
                                      r"unrecognized arguments: --num_inf \(abbreviations are not accepted: did you "
                                      r"mean --num_inference_steps\?\)", True),
    "generate: no prompt": (["generate", "--model", "tiny-sd1"], r"the following arguments are required: --prompt",
                            True),
    "eval: 0 steps": (EVAL + ["--steps", "0"], r"argument --steps: must be an integer >= 1, got '0'", True),
    "eval: NaN guidance": (EVAL + ["--guidance_scale", "3", "nan"],
                           r"argument --guidance_scale: must be a finite number > 0, got 'nan'", True),
    "eval: guidance 0": (EVAL + ["--guidance_scale", "0"],
                         r"argument --guidance_scale: must be a finite number > 0, got '0'", True),
    "eval: 1 sample per digit": (EVAL + ["--num_per_digit", "1"],
                                 r"argument --num_per_digit: must be an integer >= 2, got '1'", True),
    "eval: batch size 0": (EVAL + ["--batch_size", "0"], r"argument --batch_size: must be an integer >= 1, got '0'",
                           True),
    "eval: negative seed": (EVAL + ["--seed", "-3"], r"argument --seed: must be an integer in \[0, ", True),
    "eval: unknown scheduler": (EVAL + ["--scheduler", "euler"], r"argument --scheduler: invalid choice: 'euler'",
                                True),
    "eval: missing model folder": (EVAL + ["--model", "{out}/nothing"],
                                   r"lcm-kit eval: error: --model '.*nothing': not a diffusers folder", False),
    "eval: JSON file in a missing folder": (EVAL + ["--json", "{out}/missing/x.json"],
                                            r"lcm-kit eval: error: --json '.*missing/x\.json': must be a file in an "
                                            r"existing folder", False),
    "eval: missing classifier folder": (EVAL + ["--classifier", "{out}/no_classifier"],
                                        r"lcm-kit eval: error: --classifier '.*no_classifier': no such folder", False),
    "eval: a pickled LoRA": (EVAL + ["--lora", "{out}/pickled.bin"],
                             r"lcm-kit eval: error: --lora '.*pickled\.bin': LoRA file .* is a pickled PyTorch file: "
                             r"lcm-kit reads LoRA weights from safetensors files only", False),
    "eval: a model folder with pickled weights": (EVAL + ["--model", "{pickled_model}"],
                                                  r"lcm-kit eval: error: --model '.*pickled_model' holds pickled "
                                                  r"weights", False),
    "eval: an abbreviated flag": (EVAL + ["--step", "2"], r"unrecognized arguments: --step \(abbreviations are not accepted: did you mean --steps\?\)", True),
    "quickstart: 1 sample per digit": (QUICKSTART + ["--num_per_digit", "1"],
                                       r"argument --num_per_digit: must be an integer >= 2, got '1'", True),
    "quickstart: 0 training steps": (QUICKSTART + ["--max_train_steps", "0"],
                                     r"argument --max_train_steps: must be an integer >= 1, got '0'", True),
    "quickstart: 0 threads": (QUICKSTART + ["--num_threads", "0"],
                              r"argument --num_threads: must be an integer >= 1, got '0'", True),
    "quickstart: infinite guidance": (QUICKSTART + ["--guidance", "inf"],
                                      r"argument --guidance: must be a finite number >= 1", True),
    "quickstart: NaN guidance": (QUICKSTART + ["--guidance", "nan"], r"argument --guidance: must be a finite number", True),
    "quickstart: negative seed": (QUICKSTART + ["--seed", "-1"], r"argument --seed: must be an integer in \[0, ", True),
    "quickstart: 0 full-LCM steps": (QUICKSTART + ["--full", "--full_max_train_steps", "0"],
                                     r"argument --full_max_train_steps: must be an integer >= 1", True),
    "quickstart: unknown launcher": (QUICKSTART + ["--launcher", "slurm"],
                                     r"argument --launcher: invalid choice: 'slurm'", True),
    "quickstart: malformed --train_args": (QUICKSTART + ["--train_args", "learning_rate 1e-4"],
                                           r"--train_args must be '--flag value' pairs or '--switch'es, got "
                                           r"'learning_rate'", False),
    "quickstart: an abbreviated flag": (QUICKSTART + ["--max_train", "3"],
                                        r"unrecognized arguments: --max_train \(abbreviations .*did you mean "
                                        r"--max_train_steps\?\)", True),
    "quickstart: a non-integer seed": (QUICKSTART + ["--seed", "1.5"], r"argument --seed: must be an integer",
                                       True),
}


@pytest.fixture(scope="module")
def pickled_model(tmp_path_factory):
    """The tiny SD1 kit saved with torch.save pickles (safe_serialization=False) instead of safetensors."""
    from lcm_kit.testing import tiny_pipeline

    folder = tmp_path_factory.mktemp("pickled") / "pickled_model"
    tiny_pipeline("sd1").save_pretrained(folder, safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    return folder


def _never_unpickle(*args, **kwargs):
    raise AssertionError("a user's file was unpickled")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_command_line_stops_with_a_message_naming_the_flag(case, tmp_path, kit, pickled_model, capsys,
                                                               monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # never the network
    argv, problem, usage_error = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"w": torch.zeros(1)}, out / "pickled.bin")  # an existing pickle for --lora
    monkeypatch.setattr(torch, "load", _never_unpickle)
    argv = [a.replace("{out}", str(out)).replace("{kit}", str(kit["sd1"])).replace("{pickled_model}",
                                                                                   str(pickled_model)) for a in argv]
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    if usage_error:
        assert excinfo.value.code == 2
        message = capsys.readouterr().err
    else:
        message = str(excinfo.value.code)
        assert excinfo.value.code not in (0, None) and message.startswith(f"lcm-kit {argv[0]}: error: "), message
    assert re.search(problem, message, flags=re.DOTALL), message
    assert sorted(p.name for p in out.iterdir()) == ["pickled.bin"]  # nothing written
