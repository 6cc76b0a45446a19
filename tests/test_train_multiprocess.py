"""`accelerate launch --num_processes 2` on CPU: the run completes, both ranks hold identical adapter weights, and
only rank 0 writes the outputs (the file on disk is those weights)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

DRIVER = textwrap.dedent(
    """
    import hashlib, json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from lcm_kit.training.train_lcm_lora import main as train_lcm_lora

    report_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    result = train_lcm_lora(argv)
    objective = result.objective
    unet = objective.inference_unet(result.model)
    # named as in the saved file (peft's ".default" adapter name dropped, "unet." prefix)
    lora = {"unet." + n.replace(".default.weight", ".weight"): p.detach()
            for n, p in unet.named_parameters() if "lora_" in n}
    digest = hashlib.sha256(b"".join(lora[n].numpy().tobytes() for n in sorted(lora))).hexdigest()
    rank = objective.accelerator.process_index
    (report_dir / f"rank{rank}.json").write_text(json.dumps({
        "digest": digest, "step": result.global_step, "files": result.output_files,
        "world": objective.accelerator.num_processes, "loss": result.last_loss}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_two_cpu_processes_train_identically_and_only_rank0_writes(tmp_path, train_argv, kind):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "out"
    argv = train_argv(out, kind=kind, steps=3)[:-1] + ["--validation_prompts", "a red square", "--validation_steps", "2",
                                               "--checkpointing_steps", "2", "--lora_rank", "4",
                                               "--learning_rate", "1e-3"]
    # --multi_gpu is accelerate's torchrun launcher; ACCELERATE_USE_CPU makes the ranks MULTI_CPU (gloo backend),
    # what an `accelerate config` with distributed_type MULTI_CPU does.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               ACCELERATE_USE_CPU="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(driver), str(tmp_path), *argv]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2] and [r["step"] for r in reports] == [3, 3]
    assert reports[0]["digest"] == reports[1]["digest"]
    assert reports[0]["files"] and reports[1]["files"] == []
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    digest = hashlib.sha256(b"".join(saved[k].numpy().tobytes() for k in sorted(saved))).hexdigest()
    assert digest == reports[0]["digest"]  # the file holds exactly the ranks' weights
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002.png", "step-000003.png"]
    assert {p.name for p in (out / "checkpoint-2").iterdir()} >= {"random_states_0.pkl", "random_states_1.pkl",
                                                                   "objective_state.safetensors"}
