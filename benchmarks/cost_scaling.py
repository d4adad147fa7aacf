"""Step time and activation memory of RLR against T and h, next to full and truncated backprop, plus RLR's
step time as a ratio of its floor, all measured in one run.

    python benchmarks/cost_scaling.py            # tiny model on this machine
    python benchmarks/cost_scaling.py --sd15     # Stable Diffusion 1.5 UNet size (random weights), GPU, bf16

Floor of an RLR step (the issue's definition): a no-grad sample of T steps, plus h + 1 steps of forward and
backward, plus decode and reward forward and backward. Memory: peak bytes autograd holds for backward
(``AutogradMemoryMeter``, identical on CPU and GPU) and, on a GPU, ``torch.cuda.max_memory_allocated``.
Writes benchmarks/results/cost_scaling[_sd15].json and prints markdown tables.
"""

from __future__ import annotations

import argparse

import torch
from common import (
    floor_parts,
    machine,
    markdown_table,
    measure_step,
    save,
    sd15_pipeline_dir,
    synchronize,
    tiny_module,
)

from rlr_lightning.estimators import RLR, FullBackprop, TruncatedBackprop


def floor_seconds(module, prompts, h: int) -> float:
    return floor_parts(module, prompts, h)["floor_s"]


def run(configs, prompts, pretrained, dtype, precision_note):
    rows = []
    for name, estimator, T, h in configs:
        module = tiny_module(estimator, T, pretrained=pretrained, weight_dtype=dtype)
        if torch.cuda.is_available():
            module.to("cuda")
        with torch.autocast(module.device.type, dtype=torch.bfloat16, enabled=module.device.type == "cuda"):
            cost = measure_step(module, prompts, repeats=3)
            row = dict(name=name, T=T, h=h if h else "", **cost)
            if isinstance(estimator, RLR):
                row["floor_s"] = floor_seconds(module, prompts, h)
                row["ratio"] = row["time_s"] / row["floor_s"]
        rows.append(row)
        print(row, flush=True)
        del module
        synchronize()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sd15", action="store_true", help="SD 1.5-size UNet on a GPU (bf16, 512 px)")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    prompts = ["cat", "owl", "fox", "whale", "horse", "frog", "bee", "crab"][: args.batch]
    pretrained, dtype, suffix = "tiny", "float32", ""
    if args.sd15:
        if not torch.cuda.is_available():
            raise SystemExit("--sd15 needs a GPU: the SD 1.5 UNet takes seconds per call on a CPU")
        import tempfile

        pretrained, dtype, suffix = sd15_pipeline_dir(tempfile.mkdtemp()), "bfloat16", "_sd15"
    configs = []
    for T in (10, 20, 50):
        configs += [
            ("RLR h=2 zo=parameter", RLR(h=2, zo_mode="parameter"), T, 2),
            ("RLR h=2 zo=score", RLR(h=2, zo_mode="score"), T, 2),
            ("full backprop", FullBackprop(), T, None),
            ("truncated K=2", TruncatedBackprop(k=2), T, None),
        ]
    for h in (1, 4, 8):
        configs += [
            (f"RLR h={h} zo=parameter", RLR(h=h, zo_mode="parameter"), 20, h),
            (f"RLR h={h} zo=score", RLR(h=h, zo_mode="score"), 20, h),
        ]
    rows = run(configs, prompts, pretrained, dtype, "")
    columns = [
        ("name", "estimator", "s"),
        ("T", "T", "d"),
        ("time_s", "step time (s)", ".3f"),
        ("activation_mb", "activation MB", ".1f"),
        ("cuda_peak_mb", "CUDA peak MB", ".0f"),
        ("floor_s", "floor (s)", ".3f"),
        ("ratio", "time / floor", ".2f"),
    ]
    table = markdown_table(rows, columns)
    print(table)
    save("cost_scaling" + suffix, dict(machine=machine(), args=vars(args), rows=rows, table=table))


if __name__ == "__main__":
    main()
