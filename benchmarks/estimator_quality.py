"""Estimator quality: bias, variance, cosine to full backprop, and cost, side by side, on the trained shapes
world with the count reward (default) or on the tiny model with the quickstart's colour reward.

    python benchmarks/estimator_quality.py [--problem world] [--model shapes-world] [--draws 32] [--batch 4]
    python benchmarks/estimator_quality.py --problem tiny

Every estimator is sampled on the same draws (common random numbers) as the full-backprop reference, so
the bias column (||mean difference|| in standard errors: about 1 when unbiased, growing as sqrt(N) when
not) is sharp. The LoRA weights are moved off their initialisation first (B = 0 there would hide every
LoRA A gradient). Writes benchmarks/results/estimator_quality.json (tiny) or estimator_quality_world.json
(world) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import random

import torch
from common import (
    WORLD_MODEL,
    check_world_model,
    machine,
    markdown_table,
    measure_step,
    move_lora_off_init,
    save,
    tiny_module,
    world_module,
    world_prompts,
)

from rlr_lightning.diagnostics import compare, gradient_samples
from rlr_lightning.estimators import RLR, FullBackprop, ScoreFunction, TruncatedBackprop

logger = logging.getLogger("estimator_quality")


def estimators():
    for h in (1, 2, 4):
        yield f"RLR h={h} zo=score", RLR(h=h, zo_mode="score")
        yield f"RLR h={h} zo=parameter (antithetic)", RLR(h=h, zo_mode="parameter", zo_scale=1e-3)
        yield f"RLR h={h} zo=none", RLR(h=h, zo_mode="none")
    for k in (1, 2, 5):
        yield f"truncated K={k}", TruncatedBackprop(k=k)
    yield "score function", ScoreFunction()
    yield "full backprop", FullBackprop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", choices=("world", "tiny"), default="world")
    parser.add_argument("--model", default=WORLD_MODEL, help="world pipeline: a model name or directory")
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    if args.draws < 2:
        parser.error(f"--draws must be >= 2 (bias and variance need several draws), got {args.draws}")
    if args.problem == "world":
        check_world_model(parser, args.model)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    if args.problem == "world":
        # A fixed batch of distinct captions, the same for every draw.
        prompts = random.Random(0).sample(world_prompts(), args.batch)
        module = world_module(FullBackprop(), args.num_steps, model=args.model)
    else:
        prompts = ["cat", "owl", "fox", "whale", "horse", "frog", "bee", "crab"][: args.batch]
        module = tiny_module(FullBackprop(), args.num_steps)
    move_lora_off_init(module, 0.05)
    reference = gradient_samples(module, prompts, FullBackprop(), args.draws)
    rows = []
    for name, estimator in estimators():
        samples = gradient_samples(module, prompts, estimator, args.draws)
        diag = compare(samples, reference)
        module.estimator = estimator
        cost = measure_step(module, prompts)
        rows.append(dict(name=name, images=len(prompts) * (2 if estimator.antithetic else 1), **vars(diag), **cost))
        logger.info("%s: bias %.2f SE, variance %.3g, cosine %.3f, %.0f ms, %.1f MB", name, diag.bias_se,
                    diag.variance, diag.cosine, cost["time_s"] * 1e3, cost["activation_mb"])
    columns = [("name", "estimator", "s"), ("images", "images / estimate", "d"), ("bias_se", "bias (SE)", ".2f"),
               ("max_abs_z", "max abs z", ".1f"), ("variance", "total variance", ".3g"),
               ("cosine", "cosine of mean", ".3f"), ("mean_cosine", "mean single cosine", ".3f"),
               ("time_s", "time / estimate (s)", ".3f"), ("activation_mb", "activation MB", ".1f")]
    table = markdown_table(rows, columns)
    name = "estimator_quality" if args.problem == "tiny" else f"estimator_quality_{args.problem}"
    path = save(name, dict(machine=machine(), args=vars(args), prompts=prompts, rows=rows, table=table))
    logger.info("%s\nwrote %s", table, path)


if __name__ == "__main__":
    main()
