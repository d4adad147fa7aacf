"""Checkpointed full backprop as a recipe: its activation memory and time against the number of sampling steps
T, side by side with plain full backprop and RLR, and how the exact gradient's norm grows with T, on the
trained shapes world with the count reward (default) or on the tiny model with the quickstart's colour reward.

    OMP_NUM_THREADS=1 python benchmarks/checkpointed_backprop.py --threads 1
    #   defaults: --steps 10 20 50 --draws 32 --repeats 5 --batch 4 (12 minutes on one CPU thread)
    OMP_NUM_THREADS=1 python benchmarks/checkpointed_backprop.py --draws 2 --repeats 1   # a look (minutes)
    python benchmarks/checkpointed_backprop.py --problem tiny --steps 4 6 --draws 4 --repeats 1   # smoke run

For every T (one module per T: the sampler's timesteps depend on it), on a fixed batch of distinct captions
(``estimator_quality.py``'s: ``random.Random(0).sample(world_prompts(), batch)``), with the LoRA moved off its
initialisation (noise 0.05; ``B = 0`` would zero every LoRA ``A`` gradient):

* **Cost** of one gradient estimate of each configuration (:data:`CONFIGS`): full backprop unplanned (every
  denoiser call's activations kept until the backward), full backprop with ``MemoryPlan(activation_
  checkpointing=True)`` (each denoiser call keeps only its inputs and is recomputed in the backward, the VAE
  decoder's blocks likewise; unchunked, so the sampling pass itself records the checkpointed graph), the same
  with ``chunk_samples=1`` (the pass runs without a graph and the window is replayed sample by sample: the
  least memory), and ``RLR(h=2, tail=2)`` (score mode, default memory plan) for comparison. ``activation MB``
  is the peak of what autograd holds for backward (``AutogradMemoryMeter``, as ``common.activation_mb``);
  times are medians of ``--repeats`` estimates per configuration timed round-robin (each round times every
  configuration once, in a rotated order) after one warm-up of each, so the ratios are measured side by side.
  A configuration's memory plan also switches the decoder's checkpointing (``RLRModule.set_activation_
  checkpointing``), as training with that plan does.
* **The exact gradient's norm**: ``--draws`` full-backprop estimates (draws 0 .. N-1, exact per draw), the
  mean and standard error of ``||g_i||``, their median and ``max / median`` (a heavy tail shows there), the
  norm of the mean gradient and that norm debiased for the noise of N draws
  (``sqrt(max(0, ||mean||^2 - tr Cov / N))``), and the total variance ``tr Cov``.
* **Same gradient**: draw 0's gradient under each checkpointed plan against the plain one (largest absolute
  difference over the largest absolute coordinate): checkpointing recomputes, it must not change the gradient.

Writes benchmarks/results/checkpointed_backprop.json (tiny: checkpointed_backprop_tiny.json), with the
command, machine and date, and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from common import (
    RESULTS,
    WORLD_MODEL,
    activation_mb,
    check_world_model,
    interleaved_times,
    machine,
    markdown_table,
    move_lora_off_init,
    save,
    tiny_module,
    use_memory_plan,
    world_module,
    world_prompts,
)

from rlr_lightning.diagnostics import gradient_samples
from rlr_lightning.estimators import RLR, FullBackprop
from rlr_lightning.memory import MemoryPlan

logger = logging.getLogger("checkpointed_backprop")

TINY_PROMPTS = ["cat", "owl", "fox", "whale", "horse", "frog", "bee", "crab"]
PLAIN = "full backprop"
CHECKPOINTED = "full backprop, checkpointed"
CHUNKED = "full backprop, checkpointed, chunk_samples=1"
RLR_NAME = "RLR h=2 tail=2 zo=score"


def configs() -> list[tuple[str, object, MemoryPlan]]:
    """(name, estimator, memory plan) of every cost row, in table order."""
    return [
        (PLAIN, FullBackprop(), MemoryPlan()),
        (CHECKPOINTED, FullBackprop(), MemoryPlan(activation_checkpointing=True)),
        (CHUNKED, FullBackprop(), MemoryPlan(chunk_samples=1, activation_checkpointing=True)),
        (RLR_NAME, RLR(h=2, tail=2, zo_mode="score"), MemoryPlan()),
    ]


def use(module, estimator, plan: MemoryPlan) -> None:
    """Make ``estimator`` under ``plan`` the module's: its memory plan and the decoder's checkpointing, as a
    training run with that plan has them."""
    module.task.prepare(estimator)
    module.estimator = estimator
    use_memory_plan(module, plan)


def norm_stats(samples: torch.Tensor) -> dict:
    """How big the exact gradient is over ``(N, D)`` draws: per-draw norms (mean, standard error, median,
    max / median), the norm of the mean (and debiased for the noise of N draws) and the total variance."""
    n = samples.shape[0]
    norms = samples.norm(dim=1)
    mean = samples.mean(0)
    variance = float(samples.var(0).sum()) if n > 1 else float("nan")
    mean_sq = float(mean.pow(2).sum())
    median = float(norms.median())
    return dict(
        draws=n,
        finite=bool(torch.isfinite(samples).all()),
        norm_mean=float(norms.mean()),
        norm_se=float(norms.std() / n**0.5) if n > 1 else float("nan"),
        norm_median=median,
        norm_max=float(norms.max()),
        max_over_median=float(norms.max()) / median if median > 0 else float("nan"),
        mean_norm=mean_sq**0.5,
        mean_norm_debiased=max(0.0, mean_sq - variance / n) ** 0.5 if n > 1 else float("nan"),
        total_variance=variance,
        norms=norms.tolist(),
    )


def measure(module, prompts: list[str], draws: int, repeats: int, num_steps: int) -> tuple[list[dict], dict]:
    """One T: the cost rows of every configuration and the exact gradient's norm statistics (``module`` built
    for ``num_steps`` steps, LoRA already moved off its initialisation)."""
    made = configs()
    rows = {name: dict(steps=num_steps, name=name) for name, *_ in made}
    # The exact gradient: plain full backprop (the fastest way to the same numbers).
    use(module, FullBackprop(), MemoryPlan())
    started = time.perf_counter()
    samples = gradient_samples(module, prompts, FullBackprop(), draws)
    norms = dict(steps=num_steps, **norm_stats(samples), seconds=time.perf_counter() - started)
    logger.info(
        "T=%d: ||g|| mean %.4g +- %.2g (median %.4g, max/median %.2f), ||mean g|| %.4g "
        "(debiased %.4g), tr Cov %.3g, %d draws in %.0f s",
        num_steps,
        norms["norm_mean"],
        norms["norm_se"],
        norms["norm_median"],
        norms["max_over_median"],
        norms["mean_norm"],
        norms["mean_norm_debiased"],
        norms["total_variance"],
        draws,
        norms["seconds"],
    )
    # Checkpointing recomputes; the gradient must be the plain one (draw 0).
    scale = float(samples[0].abs().max())
    for name, estimator, plan in made:
        if isinstance(estimator, FullBackprop) and plan.activation_checkpointing:
            use(module, estimator, plan)
            other = gradient_samples(module, prompts, estimator, 1)[0]
            difference = float((other - samples[0]).abs().max())
            rows[name]["grad_max_rel_diff"] = difference / scale if scale > 0 else difference
    for name, estimator, plan in made:
        use(module, estimator, plan)
        rows[name]["activation_mb"] = activation_mb(module, prompts)
        logger.info("T=%d %s: %.2f MB", num_steps, name, rows[name]["activation_mb"])
    times = interleaved_times(
        module, [(name, estimator, prompts, plan) for name, estimator, plan in made], repeats
    )
    for name in rows:
        rows[name].update(time_s=statistics.median(times[name]), times_s=times[name])
    base = {key: rows[key]["time_s"] for key in (PLAIN, RLR_NAME)}
    for row in rows.values():
        row.update(
            vs_plain=row["time_s"] / base[PLAIN],
            vs_rlr=row["time_s"] / base[RLR_NAME],
            mb_vs_plain=row["activation_mb"] / rows[PLAIN]["activation_mb"],
        )
        logger.info(
            "T=%d %s: median %.3f s (%.2f x plain, %.2f x RLR) over %d round-robin estimates",
            num_steps,
            row["name"],
            row["time_s"],
            row["vs_plain"],
            row["vs_rlr"],
            repeats,
        )
    use(module, FullBackprop(), MemoryPlan())
    return list(rows.values()), norms


COST_COLUMNS = [
    ("steps", "T", "d"),
    ("name", "estimator", "s"),
    ("activation_mb", "activation MB", ".1f"),
    ("mb_vs_plain", "MB / plain", ".3f"),
    ("time_s", "time / estimate (s, median)", ".3f"),
    ("vs_plain", "time / plain", ".2f"),
    ("vs_rlr", "time / RLR", ".2f"),
    ("grad_max_rel_diff", "gradient vs plain (max rel. diff.)", ".1e"),
]
NORM_COLUMNS = [
    ("steps", "T", "d"),
    ("draws", "draws", "d"),
    ("norm_mean", "mean ‖g‖", ".4g"),
    ("norm_se", "its SE", ".2g"),
    ("norm_median", "median ‖g‖", ".4g"),
    ("max_over_median", "max / median", ".2f"),
    ("mean_norm", "‖mean g‖", ".4g"),
    ("mean_norm_debiased", "‖mean g‖ debiased", ".4g"),
    ("total_variance", "tr Cov", ".3g"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problem", choices=("world", "tiny"), default="world")
    parser.add_argument(
        "--model",
        default=None,
        help=f"world pipeline: a model name or directory (default {WORLD_MODEL}); with "
        "--problem tiny, the tiny pipeline (default: the built-in tiny model)",
    )
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[10, 20, 50], help="the T values (default %(default)s)"
    )
    parser.add_argument(
        "--draws",
        type=int,
        default=32,
        help="full-backprop draws per T for the gradient norm (default %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed estimates per configuration and T, round-robin; the time is their median",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: as torch has it)"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS,
        help="where the results JSON is written (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.draws < 2 or args.repeats < 1 or args.batch < 2 or min(args.steps) < 4:
        parser.error(
            f"need --draws >= 2, --repeats >= 1, --batch >= 2 (chunk_samples=1 must chunk) and "
            f"every --steps >= 4 (RLR h=2 tail=2 needs T >= h + tail), got {args.draws}, "
            f"{args.repeats}, {args.batch}, {args.steps}"
        )
    if args.problem == "world":
        args.model = args.model or WORLD_MODEL
        check_world_model(parser, args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    if args.problem == "world":
        prompts = random.Random(0).sample(world_prompts(), args.batch)
    else:
        prompts = (TINY_PROMPTS * args.batch)[: args.batch]
    cost_rows, norm_rows = [], []
    for num_steps in args.steps:
        torch.manual_seed(0)
        if args.problem == "world":
            module = world_module(FullBackprop(), num_steps, model=args.model)
        else:
            extra = {"pretrained": args.model} if args.model else {}
            module = tiny_module(FullBackprop(), num_steps, **extra)
        move_lora_off_init(module, 0.05)
        rows, norms = measure(module, prompts, args.draws, args.repeats, num_steps)
        cost_rows += rows
        norm_rows.append(norms)
        del module
        gc.collect()
    cost_table = markdown_table(cost_rows, COST_COLUMNS)
    norm_table = markdown_table(norm_rows, NORM_COLUMNS)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python", "benchmarks/checkpointed_backprop.py", *given])
    name = "checkpointed_backprop" if args.problem == "world" else "checkpointed_backprop_tiny"
    args_record = {k: v for k, v in vars(args).items() if k != "results_dir"}
    path = save(
        name,
        dict(
            command=command,
            machine=machine(),
            args=args_record,
            prompts=prompts,
            wall_s=time.perf_counter() - started,
            cost=cost_rows,
            norms=norm_rows,
            cost_table=cost_table,
            norm_table=norm_table,
        ),
        args.results_dir,
    )
    logger.info("wrote %s in %.0f s", path, time.perf_counter() - started)
    print(f"{cost_table}\n\n{norm_table}")


if __name__ == "__main__":
    main()
