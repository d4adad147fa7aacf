"""Reward against the number of generated images, for RLR, truncated backprop, the score function, full
backprop and GRPO, several seeds each, on the trained shapes world (default) or the quickstart's tiny model.

    python benchmarks/sample_efficiency.py [--problem world] [--model shapes-world] [--steps 80] [--batch 8]
    python benchmarks/sample_efficiency.py --problem tiny        # the quickstart problem (--steps 100 --batch 32)
    python benchmarks/sample_efficiency.py --estimators "GRPO (G=4, 2 inner updates, clip 0.2)" --merge

Same model, reward, prompts, optimizer (AdamW) and clipping for all; only the estimator differs, and every
estimator generates the same number of images: ``--batch`` images per sampled batch, which an estimator with
``G`` samples per prompt (the group baseline, GRPO) draws as ``batch / G`` prompts ``G`` times each, and
``--steps`` sampled batches, on which GRPO takes ``inner_updates`` optimizer steps each. ``world``: the count
reward on the world's training captions (``common.world_module``), AdamW; each run's LoRA is exported at the
end, and the exact checker's accuracies on the captions of both caption splits (held-out combinations, never
seen in the world's training, and the training ones) are measured before fine-tuning (the base model on the
sampling seeds ``--before-seeds``) and after (each run's LoRA on the sampling seed ``--eval-seed``), reported as
mean +- standard error of the mean over seeds; ``--before-only`` re-evaluates only the base model into the
stored results. ``tiny``: the quickstart problem (tiny model,
red-minus-blue reward, AdamW 1e-2).

Writes benchmarks/results/sample_efficiency[_world].{json,md,png} (rewritten after every run, so a run cut
short keeps what it finished) and prints the tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from common import (
    RESULTS,
    WORLD_MODEL,
    ResultLog,
    check_world_model,
    machine,
    markdown_table,
    tiny_module,
    world_accuracy,
    world_accuracy_seeds,
    world_module,
    world_prompts,
)
from lightning.pytorch.loggers import CSVLogger

from rlr_lightning.data import PromptDataModule
from rlr_lightning.estimators import (
    GRPO,
    RLR,
    FullBackprop,
    ScoreFunction,
    TruncatedBackprop,
)
from rlr_lightning.lightning_cli import quiet_lightning

logger = logging.getLogger("sample_efficiency")

ESTIMATORS = {
    "RLR (h=2, zo=score)": lambda: RLR(h=2, zo_mode="score"),
    "truncated backprop (K=1)": lambda: TruncatedBackprop(k=1),
    "score function": lambda: ScoreFunction(),
    "full backprop": lambda: FullBackprop(),
    # Per-prompt baseline: each prompt sampled 4 times, a sample's baseline the mean of its 3 siblings (unbiased).
    "RLR (h=2, zo=score, group G=4)": lambda: RLR(h=2, zo_mode="score", baseline="group", group_size=4),
    # Flow-GRPO's estimator (advantages scaled by the group's std and clipped to 5); the clip range only acts
    # from the second inner update on (the first update's ratio is exactly 1).
    "GRPO (G=4, 1 inner update)": lambda: GRPO(group_size=4, inner_updates=1),
    "GRPO (G=4, 2 inner updates, clip 1e-4)": lambda: GRPO(group_size=4, clip_range=1e-4, inner_updates=2),
    "GRPO (G=4, 2 inner updates, clip 0.2)": lambda: GRPO(group_size=4, clip_range=0.2, inner_updates=2),
}
#: Per problem: DDIM steps T, batch, optimizer steps, learning rate (the tiny values are the quickstart's).
DEFAULTS = {
    "world": dict(num_steps=10, batch=8, steps=80, lr=3e-3),
    "tiny": dict(num_steps=6, batch=32, steps=100, lr=1e-2),
}
#: Mean reward over this many first / last optimizer steps, for the table.
FIRST, LAST = 5, 10


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def fit(args, name: str, seed: int, out: Path) -> dict:
    """One run: its reward curve (batch mean per sampled batch), wall time and exported LoRA."""
    optimizer = lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=1e-4)  # noqa: E731
    estimator = ESTIMATORS[name]()
    # The same images per sampled batch for every estimator: batch / G prompts, G samples each.
    prompts_per_batch = args.batch // estimator.samples_per_prompt
    run_dir = out / slug(name) / f"seed{seed}"
    if args.problem == "world":
        module = world_module(
            estimator,
            args.num_steps,
            model=args.model,
            seed=seed,
            optimizer=optimizer,
            export_dir=str(run_dir / "lora"),
        )
        data = PromptDataModule(prompts=world_prompts("train"), batch_size=prompts_per_batch, seed=seed)
    else:
        module = tiny_module(
            estimator, args.num_steps, seed=seed, optimizer=optimizer, export_dir=str(run_dir / "lora")
        )
        data = PromptDataModule(prompt_set="animals", batch_size=prompts_per_batch, seed=seed)
    # max_steps counts optimizer steps: GRPO takes inner_updates of them on each sampled batch.
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps * estimator.inner_updates,
        logger=CSVLogger(run_dir, name="log"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    with next((run_dir / "log").rglob("metrics.csv")).open() as f:
        rewards = [float(r["train/reward"]) for r in csv.DictReader(f) if r.get("train/reward")]
    return dict(
        estimator=name,
        seed=seed,
        rewards=rewards,
        seconds=seconds,
        lora=str(module.exported_lora),
        prompts_per_batch=prompts_per_batch,
        inner_updates=estimator.inner_updates,
    )


def evaluate_world(args, lora: str | None) -> dict:
    """Checker accuracies on the captions of both splits (same sampling seed for every model,
    so before and after compare on the same noise)."""
    captions = {split: world_prompts(split) for split in ("held_out", "train")}
    return world_accuracy(args.model, captions, lora, args.eval_samples, args.num_steps, seed=args.eval_seed)


def reward_rows(runs: list[dict], batch: int) -> list[dict]:
    rows = []
    for name in ESTIMATORS:
        mine = [r for r in runs if r["estimator"] == name]
        if not mine:
            continue
        finals = [statistics.mean(r["rewards"][-LAST:]) for r in mine]
        per_batch = mine[0].get("prompts_per_batch", batch)  # runs stored before groups: one image per prompt
        start = statistics.mean(statistics.mean(r["rewards"][:FIRST]) for r in mine)
        rows.append(
            dict(
                name=name,
                seeds=len(mine),
                start=start,
                final=statistics.mean(finals),
                spread=max(finals) - min(finals),
                images=len(mine[0]["rewards"]) * batch,
                layout=f"{per_batch} x {batch // per_batch}",
                updates=len(mine[0]["rewards"]) * mine[0].get("inner_updates", 1),
                step_s=statistics.mean(r["seconds"] / max(len(r["rewards"]), 1) for r in mine),
            )
        )
    return rows


def evaluate_before(args) -> dict:
    """The base model's checker accuracies on both splits, over the sampling seeds ``--before-seeds`` (pooled:
    mean and standard error over them, and each seed's)."""
    captions = {split: world_prompts(split) for split in ("held_out", "train")}
    return world_accuracy_seeds(
        args.model, captions, args.before_seeds, None, args.eval_samples, args.num_steps
    )


def _mean_se(values: list[float], percent: bool) -> str:
    """``mean +- SE`` of the values (standard error of the mean over them; the mean alone for one value)."""
    scale = 100 if percent else 1
    mean = scale * statistics.fmean(values)
    digits = 1 if percent else 3
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * statistics.stdev(values) / len(values) ** 0.5:.{digits}f}"


ACCURACY_KEYS = ("position_ok", "count_ok", "all_ok", "reward")


def accuracy_rows(payload: dict) -> list[dict]:
    """``before`` (over its sampling seeds, when it was evaluated on several) and one row per estimator (over
    its training seeds, each evaluated on the ``--eval-seed`` noise) of the checker's accuracies: mean and
    standard error of the mean over those seeds, in percent (the reward as it is)."""

    def row(name: str, evaluations: list[dict], seeds: str) -> dict:
        out = dict(name=name, seeds=seeds)
        for split in ("held_out", "train"):
            for key in ACCURACY_KEYS:
                out[f"{split}_{key}"] = _mean_se([e[split][key] for e in evaluations], key != "reward")
        return out

    rows = []
    before = payload.get("before")
    if before:
        per_seed = before["held_out"].get("per_seed")
        if per_seed:  # several sampling seeds of the one base model
            evaluations = [
                {split: before[split]["per_seed"][i] for split in ("held_out", "train")}
                for i in range(len(per_seed))
            ]
            rows.append(
                row(
                    "before fine-tuning",
                    evaluations,
                    f"{len(per_seed)} sampling ({', '.join(str(r['seed']) for r in per_seed)})",
                )
            )
        else:
            rows.append(row("before fine-tuning", [before], "1 sampling"))
    for name in ESTIMATORS:
        evaluations = [r["after"] for r in payload["rows"] if r["estimator"] == name and r.get("after")]
        if evaluations:
            rows.append(row(name, evaluations, f"{len(evaluations)} training"))
    return rows


REWARD_COLUMNS = [
    ("name", "estimator", "s"),
    ("seeds", "seeds", "d"),
    ("start", f"reward, first {FIRST} steps", ".3f"),
    ("final", f"reward, last {LAST} steps", ".3f"),
    ("spread", "seed spread (final)", ".3f"),
    ("images", "images generated", "d"),
    ("layout", "prompts x samples per batch", "s"),
    ("updates", "optimizer steps", "d"),
    ("step_s", "s / sampled batch", ".2f"),
]
ACCURACY_COLUMNS = [
    ("name", "LoRA", "s"),
    ("seeds", "seeds", "s"),
    ("held_out_position_ok", "held-out position %", "s"),
    ("held_out_count_ok", "held-out count %", "s"),
    ("held_out_all_ok", "held-out all %", "s"),
    ("held_out_reward", "held-out reward", "s"),
    ("train_position_ok", "train position %", "s"),
    ("train_count_ok", "train count %", "s"),
    ("train_all_ok", "train all %", "s"),
    ("train_reward", "train reward", "s"),
]


def render(payload: dict) -> str:
    text = markdown_table(reward_rows(payload["rows"], payload["args"]["batch"]), REWARD_COLUMNS)
    if payload["args"]["problem"] == "world":
        text += "\n\n" + markdown_table(accuracy_rows(payload), ACCURACY_COLUMNS)
    return text + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = payload["args"]["batch"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, name in enumerate(ESTIMATORS):
        runs = [r["rewards"] for r in payload["rows"] if r["estimator"] == name]
        if not runs:
            continue
        # The batch mean of a few images is noisy: running means over 10 steps show the trend, per seed
        # (faint) and averaged over seeds (bold).
        smoothed = [
            [statistics.mean(rewards[max(0, k - 9) : k + 1]) for k in range(len(rewards))] for rewards in runs
        ]
        length = min(len(curve) for curve in smoothed)
        images = [batch * (k + 1) for k in range(length)]
        for curve in smoothed:
            ax.plot(images, curve[:length], color=f"C{index}", alpha=0.3, lw=0.8)
        mean = [statistics.mean(curve[k] for curve in smoothed) for k in range(length)]
        few = len(runs) < len(payload["args"]["seeds"])
        seeds = f" ({len(runs)} seed{'s' if len(runs) > 1 else ''})" if few else ""
        ax.plot(images, mean, color=f"C{index}", lw=1.8, label=name + seeds)
    ax.set_xlabel("images generated")
    ylabel = {"world": "batch mean count reward", "tiny": "batch mean reward (red - blue)"}
    ax.set_ylabel(ylabel[payload["args"]["problem"]])
    seeds = len(payload["args"]["seeds"])
    title = {"world": "Shapes world, count reward", "tiny": "Quickstart problem"}[payload["args"]["problem"]]
    ax.set_title(
        f"{title}: 10-step running mean, up to {seeds} seed{'s' if seeds > 1 else ''} (faint) and their mean",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


#: What must match for runs to be merged into stored results (the rest, e.g. seeds and estimators, may differ).
MERGE_KEYS = ("problem", "model", "steps", "batch", "lr", "num_steps", "eval_samples", "eval_seed")


def stored_results(path: Path, args) -> dict | None:
    """The stored results ``--merge`` adds to, or ``None`` when there are none; an error when their settings
    differ (merging runs of other settings would compare unlike things)."""
    if not path.is_file():
        logger.warning("--merge: no stored results at %s, starting new ones", path)
        return None
    stored = json.loads(path.read_text())
    differ = {
        k: (stored["args"].get(k), getattr(args, k))
        for k in MERGE_KEYS
        if stored["args"].get(k) != getattr(args, k)
    }
    if differ:
        raise SystemExit(
            f"--merge: {path} was run with other settings (stored, now): {differ}; run without --merge "
            "to replace it, or with the stored settings"
        )
    return stored


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problem", choices=tuple(DEFAULTS), default="world")
    parser.add_argument("--model", default=WORLD_MODEL, help="world pipeline: a model name or directory")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default per problem)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="prompts (images) per step (default per problem)"
    )
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default per problem)")
    parser.add_argument("--num-steps", type=int, default=None, help="DDIM steps T (default per problem)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--estimators",
        nargs="+",
        choices=tuple(ESTIMATORS),
        default=list(ESTIMATORS),
        metavar="NAME",
        help=f"a subset of: {', '.join(repr(n) for n in ESTIMATORS)}",
    )
    parser.add_argument(
        "--eval-samples", type=int, default=2, help="world: samples per caption in the checker's evaluation"
    )
    parser.add_argument(
        "--eval-seed",
        type=int,
        default=0,
        help="world: sampling seed of the checker's evaluation of each run's LoRA",
    )
    parser.add_argument(
        "--before-seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="world: sampling seeds of the base model's evaluation (mean and standard error over them)",
    )
    parser.add_argument(
        "--before-only",
        action="store_true",
        help="world: only (re-)evaluate the base model on --before-seeds and write it into the stored "
        "results of the same settings",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the stored results of the same settings (the base model's evaluation and the "
        "runs of other estimators or seeds) and add this run's to them",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="a new directory for the runs' logs and LoRA exports (default: a temporary one); "
        "its path is saved in the results",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_lightning("fit")
    # No validation prompts on purpose: the checker evaluates after each run.
    warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero")
    for key, value in DEFAULTS[args.problem].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.problem == "world":
        check_world_model(parser, args.model)
    for key in ("steps", "batch", "num_steps", "eval_samples"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    for estimator in args.estimators:
        per_prompt = ESTIMATORS[estimator]().samples_per_prompt
        if args.batch % per_prompt:
            parser.error(
                f"--batch {args.batch} is not a multiple of the {per_prompt} samples per prompt of "
                f"{estimator!r}: every estimator must generate --batch images per sampled batch"
            )
    if args.steps < LAST:
        logger.warning(
            "--steps %d is below %d: the 'last %d steps' column averages fewer steps", args.steps, LAST, LAST
        )
    name = "sample_efficiency" if args.problem == "tiny" else f"sample_efficiency_{args.problem}"
    if args.before_only:
        if args.problem != "world":
            parser.error("--before-only evaluates the world's base model: use it with --problem world")
        stored = stored_results(RESULTS / f"{name}.json", args)
        if stored is None:
            parser.error(f"--before-only: no stored results at {RESULTS / f'{name}.json'}")
        stored["before"] = dict(evaluate_before(args), measured=machine())
        (RESULTS / f"{name}.json").write_text(json.dumps(stored, indent=2))
        (RESULTS / f"{name}.md").write_text(render(stored))
        logger.info(
            "%s\nwrote the base model's evaluation (seeds %s) into %s",
            render(stored),
            args.before_seeds,
            RESULTS / f"{name}.json",
        )
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="sample_efficiency_"))
    header = dict(machine=machine(), args={**vars(args), "out": str(out)})
    stored = stored_results(RESULTS / f"{name}.json", args) if args.merge else None
    if stored is not None:  # the header describes every run the results hold
        seeds = set(stored["args"]["seeds"]) | set(args.seeds)
        estimators = set(stored["args"]["estimators"]) | set(args.estimators)
        header["args"].update(seeds=sorted(seeds), estimators=[n for n in ESTIMATORS if n in estimators])
    log = ResultLog(RESULTS, name, header, render)
    started = time.perf_counter()
    if stored is not None:
        log.write(
            merged_from=dict(
                machine=stored["machine"], args=stored["args"], total_seconds=stored.get("total_seconds")
            )
        )
        for run in stored["rows"]:
            if not (run["estimator"] in args.estimators and run["seed"] in args.seeds):
                log.add(dict(run, measured=run.get("measured", stored["machine"])))
    if args.problem == "world":
        if stored is not None and stored.get("before"):
            log.write(before=stored["before"])
        else:
            log.write(before=evaluate_before(args))
        logger.info("before fine-tuning: %s", log.payload["before"])
    for estimator in args.estimators:
        for seed in args.seeds:
            run = fit(args, estimator, seed, out)
            if args.problem == "world":
                run["after"] = evaluate_world(args, run["lora"])
            log.add(dict(run, measured=machine()))
            logger.info(
                "%s, seed %d: %.0f s, last reward %.3f",
                estimator,
                seed,
                run["seconds"],
                statistics.mean(run["rewards"][-LAST:]),
            )
    log.write(total_seconds=time.perf_counter() - started)
    plot(log.payload, RESULTS / f"{name}.png")
    logger.info(
        "%s\nwrote %s, %s and %s", render(log.payload), log.json, log.markdown, RESULTS / f"{name}.png"
    )


if __name__ == "__main__":
    main()
