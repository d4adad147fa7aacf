"""Images per second of the quickstart with 1 and 2 processes (DDP, gloo) on this machine's CPU cores.

    python benchmarks/data_parallel.py [--steps 20]

Both runs share the cores fairly: 1 process with all threads, or 2 processes with half each
(OMP_NUM_THREADS). Throughput is the median of the logged train/images_per_sec after a warm-up, which
counts the images of all ranks. Writes benchmarks/results/data_parallel.json.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine, save

ROOT = Path(__file__).resolve().parents[1]


def images_per_second(devices: int, steps: int, threads: int) -> float:
    out = Path(tempfile.mkdtemp())
    cmd = [
        sys.executable,
        "-m",
        "rlr_lightning",
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--trainer.max_steps",
        str(steps),
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.devices",
        str(devices),
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger.init_args.save_dir",
        str(out),
    ]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    metrics = next(out.rglob("metrics.csv"))
    with metrics.open() as f:
        values = [
            float(r["train/images_per_sec"]) for r in csv.DictReader(f) if r.get("train/images_per_sec")
        ]
    return statistics.median(values[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    one = images_per_second(1, args.steps, cores)
    two = images_per_second(2, args.steps, max(1, cores // 2))
    # The same per-process resources as each DDP rank: separates DDP's own cost from intra-op threading.
    one_narrow = images_per_second(1, args.steps, max(1, cores // 2))
    result = dict(
        machine=machine(),
        cores=cores,
        steps=args.steps,
        one_process=one,
        two_processes=two,
        speedup=two / one,
        one_process_half_threads=one_narrow,
        scaling_at_equal_threads=two / (2 * one_narrow),
    )
    print(result)
    save("data_parallel", result)


if __name__ == "__main__":
    main()
