"""Estimator quality on the tiny model: bias, variance, cosine to full backprop, and cost, side by side.

    python benchmarks/estimator_quality.py [--num-steps 10] [--draws 32] [--batch 4]

Every estimator is sampled on the same draws (common random numbers) as the full-backprop reference, so
the bias column (||mean difference|| in standard errors: about 1 when unbiased, growing as sqrt(N) when
not) is sharp. Writes benchmarks/results/estimator_quality.json and prints a markdown table.
"""

from __future__ import annotations

import argparse

import torch
from common import machine, markdown_table, measure_step, save, tiny_module

from rlr_lightning.diagnostics import compare, gradient_samples
from rlr_lightning.estimators import RLR, FullBackprop, ScoreFunction, TruncatedBackprop


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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    prompts = ["cat", "owl", "fox", "whale", "horse", "frog", "bee", "crab"][: args.batch]
    module = tiny_module(FullBackprop(), args.num_steps)
    with torch.no_grad():  # mid-training LoRA: B = 0 at initialisation would hide LoRA A's gradients
        gen = torch.Generator().manual_seed(1)
        for p in module.backbone.lora_parameters().values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    reference = gradient_samples(module, prompts, FullBackprop(), args.draws)
    rows = []
    for name, estimator in estimators():
        samples = gradient_samples(module, prompts, estimator, args.draws)
        diag = compare(samples, reference)
        module.estimator = estimator
        cost = measure_step(module, prompts)
        rows.append(dict(name=name, images=len(prompts) * (2 if estimator.antithetic else 1), **vars(diag), **cost))
        print(f"{name}: bias {diag.bias_se:.2f} SE, variance {diag.variance:.3g}, cosine {diag.cosine:.3f}, "
              f"{cost['time_s'] * 1e3:.0f} ms, {cost['activation_mb']:.1f} MB", flush=True)
    columns = [("name", "estimator", "s"), ("images", "images / estimate", "d"), ("bias_se", "bias (SE)", ".2f"),
               ("max_abs_z", "max abs z", ".1f"), ("variance", "total variance", ".3g"),
               ("cosine", "cosine of mean", ".3f"), ("mean_cosine", "mean single cosine", ".3f"),
               ("time_s", "time / estimate (s)", ".3f"), ("activation_mb", "activation MB", ".1f")]
    table = markdown_table(rows, columns)
    print(table)
    save("estimator_quality", dict(machine=machine(), args=vars(args), rows=rows, table=table))


if __name__ == "__main__":
    main()
