#!/usr/bin/env bash
# The one-shot GPU benchmark (benchmarks/gpu_cost.py) on a machine without network access, from the repository
# root, with the project on PYTHONPATH (not pip-installed):
#
#     bash benchmarks/gpu_run.sh            # writes to $OUT (default benchmarks/results); DEADLINE_S=270
#     bash benchmarks/gpu_run.sh --tiny     # extra arguments go to gpu_cost.py (--tiny: CPU, tiny model)
#     bash benchmarks/gpu_run.sh --family sd35   # SD 3.5 Medium size: RLR and GRPO (log: gpu_cost_sd35.log)
#     DEADLINE_S=540 bash benchmarks/gpu_run.sh --family wan   # Wan 2.1 T2V 1.3B, 33 x 480 x 832 (gpu_cost_wan.log)
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

# One log per family, next to that family's results (the SD 1.5 run keeps its name).
log="gpu_cost.log"
for ((i = 1; i <= $#; i++)); do
    if [[ "${!i}" == "--family" ]]; then
        j=$((i + 1))
        [[ "${!j:-sd15}" != "sd15" ]] && log="gpu_cost_${!j}.log"
    fi
done
python3 benchmarks/gpu_cost.py --out "$OUT" --deadline-s "${DEADLINE_S:-270}" "$@" 2>&1 | tee "$OUT/$log"
