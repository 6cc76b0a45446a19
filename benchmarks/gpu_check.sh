#!/usr/bin/env bash
# The one GPU check of lcm-kit: every trainer (train_lcm_lora, train_lcm, train_consistency --mode cd|ct|ict) runs
# 5 steps in fp16 and in bf16 on SD1.5-shaped random weights at 512^2 (a CIFAR-sized pixel CM at 32^2), with
# --cache_latents --cache_text_embeddings (LCM trainers), a checkpoint at step 3 and a resume from it that must end
# at the same weights; the saved LoRA loads in stock diffusers; LCMPipeline (LoRA, full LCM) and CMPipeline
# generate in fp16; then benchmarks/bench_train_step.py --config gpu and benchmarks/bench_inference.py (if present)
# time the step and generation. ONE table at the end, also in $OUT/gpu_check_table.md, with $OUT/gpu_check.json,
# $OUT/gpu_check_logs.txt and the benchmarks' JSON files.
#
# Usage
#   bash benchmarks/gpu_check.sh                  # on a CUDA machine: the whole check, <= 7.5 minutes (--budget 450)
#   bash benchmarks/gpu_check.sh --tiny           # CPU test of this script: the tiny kit, 32^2, fp32 (or
#                                                 #   LCM_GPU_CHECK_TINY=1); a few minutes on 2 cores
#   bash benchmarks/gpu_check.sh --only pipelines,bench_train,bench_inference   # rerun parts on a warm machine
#                                                 #   (reuses /tmp/lcm-gpu-check-gpu from the first call)
#   Other flags: --budget SECONDS, --jobs N (training runs at a time, default 4), --out DIR, --work DIR.
#
# The device machine has torch, transformers, accelerate, peft, safetensors and huggingface_hub but not diffusers,
# datasets, webdataset or braceexpand (and their missing dependencies). Prepare the wheels ONCE, here, in the
# repository root (7 MB):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 datasets==5.2.0 dill==0.4.1 \
#     multiprocess==0.70.19 webdataset==1.0.2 braceexpand==0.1.7
# and call the device with carry [".whl"], timeout_s 540, command:
#   bash benchmarks/gpu_check.sh
# (this script installs .whl/*.whl into /tmp/site itself when the folder is there).
#
# Device-time budget (15 minutes per task, start-up included): machine start 1-2 min; wheels ~10 s; build (SD1.5
# random weights, 4.3 GB written) ~40 s; training, 10 run + resume pairs, 4 at a time, ~3-3.5 min (the two full-LCM
# pairs, each writing a 14 GB checkpoint, run one after the other); pipelines ~40 s; bench_train_step ~1.5 min;
# bench_inference capped at ~35 s. About 7.5 min of script, ~9.5 min with start-up: a partial rerun (--only ...)
# fits in what is left, a full one does not. Each stage has a share of --budget; a stage that runs out is reported
# as such and the table is still printed.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu_check.py "$@"
