#!/usr/bin/env bash
# The one-shot GPU benchmark (benchmarks/gpu_cost.py) on a machine without network access, from the repository
# root, with the project on PYTHONPATH (not pip-installed):
#
#     bash benchmarks/gpu_run.sh            # writes to $OUT (default benchmarks/results); DEADLINE_S=270
#     bash benchmarks/gpu_run.sh --tiny     # extra arguments go to gpu_cost.py (--tiny: CPU, tiny model)
#     bash benchmarks/gpu_run.sh --family sd35   # SD 3.5 Medium size: RLR and GRPO (log: gpu_cost_sd35.log)
#     DEADLINE_S=540 bash benchmarks/gpu_run.sh --family wan   # Wan 2.1 T2V 1.3B, 33 x 480 x 832 (gpu_cost_wan.log)
#     DEADLINE_S=420 bash benchmarks/gpu_run.sh --family sdxl  # SDXL base at 1024 px, budgets 24/40/auto (gpu_cost_sdxl.log)
#     DEADLINE_S=420 bash benchmarks/gpu_run.sh --family flux  # FLUX.1-dev at 512 px, budgets 40/auto (gpu_cost_flux.log)
#     DEADLINE_S=360 bash benchmarks/gpu_run.sh --family sd35 --reward pickscore   # PickScore's CLIP-H as the reward
#                                                              # (gpu_cost_sd35_pickscore.log)
#
# Each fits in 10 minutes of device time: the deadline counts from the script's start (imports and the 60-90 s of
# building the weights included); a configuration predicted to end past it is skipped and listed, and the last one
# started may overrun it by its own length (a minute at most at these sizes), after about 30 s of installing wheels.
#
# The machine is expected to have Python 3.12 with torch, lightning, transformers, torchmetrics, torchvision,
# accelerate, safetensors and huggingface_hub, and the rest as wheels in .whl/ (diffusers, peft, open_clip_torch,
# ftfy, wcwidth, jsonargparse, docstring-parser, typeshed-client), fetched beforehand on a machine with access to
# PyPI by:
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl diffusers==0.42.1 peft==0.21.2 open_clip_torch==3.3.0 ftfy wcwidth jsonargparse==4.53.0 \
#         docstring-parser typeshed-client
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_run.sh: no wheels in $PWD/.whl: fetch them first (see the top of this script) and carry .whl" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --root-user-action=ignore \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1 || true)"
versions="$(python3 -c 'import sys, torch, diffusers, peft, transformers, lightning
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers "
      f"{diffusers.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
      f"lightning {lightning.__version__}")')"
echo "GPU: $gpu | $versions"

# One log per family and reward, named as that run's results (the SD 1.5 run with the colour reward keeps its name).
family="sd15"
reward="color"
for ((i = 1; i <= $#; i++)); do
    j=$((i + 1))
    if [[ "${!i}" == "--family" ]]; then
        family="${!j:-sd15}"
    elif [[ "${!i}" == "--reward" ]]; then
        reward="${!j:-color}"
    fi
done
log="gpu_cost"
if [[ "$family" != "sd15" ]]; then
    log="${log}_${family}"
fi
if [[ "$reward" != "color" ]]; then
    log="${log}_${reward}"
fi
log="${log}.log"
python3 benchmarks/gpu_cost.py --out "$OUT" --deadline-s "${DEADLINE_S:-270}" "$@" 2>&1 | tee "$OUT/$log"
