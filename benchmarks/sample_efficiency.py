"""Reward against the number of generated images on the quickstart problem, for RLR, truncated backprop and
the score-function estimator, several seeds each.

    python benchmarks/sample_efficiency.py [--steps 100] [--seeds 0 1 2]

Same model, reward, batch (32), optimizer (AdamW 1e-2) and clipping for all; only the estimator differs.
Writes benchmarks/results/sample_efficiency.{json,png} and prints a table of the mean reward over the
last 10 steps.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

import lightning as L
import torch
from common import RESULTS, machine, markdown_table, save, tiny_module
from lightning.pytorch.loggers import CSVLogger

from rlr_lightning.data import PromptDataModule
from rlr_lightning.estimators import RLR, ScoreFunction, TruncatedBackprop

ESTIMATORS = {
    "RLR (h=2, zo=score)": lambda: RLR(h=2, zo_mode="score"),
    "truncated backprop (K=1)": lambda: TruncatedBackprop(k=1),
    "score function": lambda: ScoreFunction(),
}


def curve(make_estimator, seed: int, steps: int, batch: int) -> list[float]:
    out = Path(tempfile.mkdtemp())
    module = tiny_module(make_estimator(), 6, seed=seed,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-4))
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=CSVLogger(out, name="run"), log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=out)
    trainer.fit(module, datamodule=PromptDataModule(prompt_set="animals", batch_size=batch, seed=seed))
    with next(out.rglob("metrics.csv")).open() as f:
        return [float(r["train/reward"]) for r in csv.DictReader(f) if r.get("train/reward")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    curves = {name: [curve(make, seed, args.steps, args.batch) for seed in args.seeds] for name, make in ESTIMATORS.items()}
    rows = []
    for name, runs in curves.items():
        finals = [statistics.mean(r[-10:]) for r in runs]
        rows.append(dict(name=name, start=statistics.mean(statistics.mean(r[:5]) for r in runs),
                         final=statistics.mean(finals), spread=max(finals) - min(finals),
                         images=args.steps * args.batch))
    table = markdown_table(rows, [("name", "estimator", "s"), ("start", "reward, first 5 steps", ".3f"),
                                  ("final", "reward, last 10 steps", ".3f"), ("spread", "seed spread (final)", ".3f"),
                                  ("images", "images generated", "d")])
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, runs), color in zip(curves.items(), ("C0", "C1", "C2")):
        for i, rewards in enumerate(runs):
            images = [args.batch * (k + 1) for k in range(len(rewards))]
            ax.plot(images, rewards, color=color, alpha=0.8, lw=1, label=name if i == 0 else None)
    ax.set_xlabel("images generated"); ax.set_ylabel("batch mean reward (red - blue)")
    ax.set_title(f"Quickstart problem, {len(args.seeds)} seeds each"); ax.legend()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "sample_efficiency.png", dpi=120, bbox_inches="tight")
    save("sample_efficiency", dict(machine=machine(), args=vars(args), curves=curves, rows=rows, table=table))


if __name__ == "__main__":
    main()
