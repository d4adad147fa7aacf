"""The alignment race on the shapes world: estimators at equal images, judged by the exact checker.

    python benchmarks/world_race.py --runs "full backprop (checkpointed)" "RLR (today)" --seeds 0 1 2
    python benchmarks/world_race.py --runs "full backprop, render-only counter" "full backprop" --images 4800
    python benchmarks/world_race.py --list

Every run fine-tunes ``shapes-world`` from the same start with the sampler, LoRA, optimizer and prompts of
``configs/world_align.yaml`` (``--config``), for ``--images`` generated images (a GRPO group counts all its
images); only the estimator (and, for the reward checks, the reward) differs. Every ``--eval-every`` images the
held-out captions are sampled once (sampling seed 1000, the same noise for every run and mark) and judged by
the exact checker and the run's reward: the curves of reward and checker accuracy against images. At the end
the run's LoRA is evaluated as ``rlr eval`` does (held-out and training captions, 2 samples per caption,
sampling seeds 0 1 2), and the base model once the same way.

Writes ``benchmarks/results/world_race.{json,md,png}`` (rewritten after every run, so a run cut short keeps
what finished; ``--merge`` adds runs to stored results) and prints the table. Each run's metrics and exported
LoRA stay under ``outputs/world_race/NAME/`` (``--out``). ``--fit-args`` passes further ``rlr fit`` arguments to
every run (a learning rate, LoRA targets) to probe a setting before it goes into the config.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from common import RESULTS, machine, markdown_table, world_prompts
from lightning.pytorch.loggers import CSVLogger

from rlr_lightning.lightning_cli import quiet_lightning
from rlr_lightning.module import RLRModule
from rlr_lightning.world.checker import CHECKS
from rlr_lightning.world.evaluate import _sample_and_check, evaluate_seeds

logger = logging.getLogger("world_race")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "world_align.yaml"
CURVE_SEED = 1000


RENDERS_ONLY_COUNTER = str(ROOT / "benchmarks" / "data" / "counter_renders")
FULL_BACKPROP = {"class_path": "rlr_lightning.estimators.FullBackprop"}
COUNT_REWARD = "rlr_lightning.rewards.WorldCountReward"

#: name -> ``--model.*`` overrides of the config (an estimator, and for the reward checks a reward), as rlr fit
#: takes them; everything else comes from the config.
RUNS = {
    "full backprop (checkpointed)": {"estimator": FULL_BACKPROP},
    "truncated backprop (K=1)": {
        "estimator": {"class_path": "rlr_lightning.estimators.TruncatedBackprop", "init_args": {"k": 1}}
    },
    "RLR (today)": {"estimator": {"class_path": "rlr_lightning.estimators.RLR", "init_args": {"h": 2}}},
    "RLR (best of issue 20)": {
        "estimator": {
            "class_path": "rlr_lightning.estimators.RLR",
            "init_args": {
                "h": 2,
                "tail": "auto",
                "step_baseline": "muprop",
                "step_baseline_sigma_ratio": 0.75,
            },
        }
    },
    "score function": {"estimator": {"class_path": "rlr_lightning.estimators.ScoreFunction"}},
    "GRPO (G=8, checker reward)": {
        "estimator": {
            "class_path": "rlr_lightning.estimators.GRPO",
            "init_args": {"group_size": 8, "inner_updates": 2, "clip_range": 0.2},
        },
        "reward": {
            "class_path": "rlr_lightning.rewards.WorldCheckerReward",
            "init_args": {"partial_credit": True},
        },
    },
    # The reward checks: the count reward alone, with the packaged counter and with the render-only one.
    "full backprop, count reward": {"estimator": FULL_BACKPROP, "reward": {"class_path": COUNT_REWARD}},
    "full backprop, render-only counter": {
        "estimator": FULL_BACKPROP,
        "reward": {"class_path": COUNT_REWARD, "init_args": {"counter": RENDERS_ONLY_COUNTER}},
    },
}


def sampler_settings(config: Path) -> dict:
    """The config's sampler as ``rlr eval --config`` reads it (model, steps, eta, guidance, timestep spacing)."""
    from rlr_lightning.eval_cli import CONFIG_KEYS, DEFAULTS

    model = yaml.safe_load(config.read_text())["model"]
    return dict(DEFAULTS, **{option: model[key] for key, option in CONFIG_KEYS.items() if key in model})


def build_run(
    config: Path,
    overrides: dict,
    seed: int,
    images_per_batch: int,
    export_dir: str,
    fit_args: tuple[str, ...] = (),
):
    """The module and data that ``rlr fit --config CONFIG`` builds, with the run's overrides, ``seed``,
    ``images_per_batch`` images per sampled batch (``batch / G`` prompts for a group of ``G``) and any further
    ``rlr fit`` arguments (``fit_args``, applied last)."""
    import sys

    from rlr_lightning.lightning_cli import build

    group = overrides["estimator"].get("init_args", {}).get("group_size", 1)
    args = [
        "--config",
        str(config),
        "--model.seed",
        str(seed),
        "--model.export_dir",
        export_dir,
        "--data.seed",
        str(seed),
        "--data.batch_size",
        str(images_per_batch // group),
    ]
    for key, value in overrides.items():
        args += [f"--model.{key}", json.dumps(value)]
    # Full backprop recomputes each step's network call in backward (memory flat in T, as users would run it);
    # the other estimators have no multi-step window to checkpoint.
    args += [
        "--model.activation_checkpointing",
        "true" if overrides["estimator"] is FULL_BACKPROP else "null",
    ]
    args += list(fit_args)
    saved, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads sys.argv too when given args
    try:
        cli = build(args, run=False, prog="world_race")
    finally:
        sys.argv = saved
    cli.model.configure_model()
    return cli.model, cli.datamodule


class Curve(L.Callback):
    """Held-out checker accuracies and reward every ``every`` images (and before the first step)."""

    def __init__(self, every: int, images_per_step: int, captions: list[str]) -> None:
        self.every, self.images_per_step, self.captions = every, images_per_step, captions
        self.points: list[dict] = []

    def measure(self, module: RLRModule, images: int) -> None:
        with torch.no_grad():
            result = _sample_and_check(
                module.backbone, module.task.sampler, self.captions, CURVE_SEED, 72, module.reward
            )
        self.points.append(dict(images=images, **{k: result[k] for k in (*CHECKS, "reward")}))
        logger.info(
            "  %6d images: reward %.3f, checker count %.1f%%, all %.1f%%",
            images,
            result["reward"],
            100 * result["count_ok"],
            100 * result["all_ok"],
        )

    def on_train_start(self, trainer, module) -> None:
        self.measure(module, 0)

    def on_train_batch_end(self, trainer, module, *args) -> None:
        images = (trainer.fit_loop.total_batch_idx + 1) * self.images_per_step
        if images % self.every == 0:
            self.measure(module, images)


def run(args, name: str, seed: int, out: Path) -> dict:
    run_dir = out / "".join(c if c.isalnum() else "_" for c in name.lower()) / f"seed{seed}"
    module, data = build_run(
        args.config, RUNS[name], seed, args.batch, str(run_dir / "lora"), tuple(shlex.split(args.fit_args))
    )
    batches = args.images // args.batch
    curve = Curve(args.eval_every, args.batch, world_prompts("held_out"))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=batches * module.estimator.inner_updates,
        logger=CSVLogger(run_dir, name="log"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=run_dir,
        callbacks=[curve],
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    final = evaluate_final(args, str(module.exported_lora))
    return dict(
        run=name,
        seed=seed,
        seconds=seconds,
        images=batches * args.batch,
        curve=curve.points,
        lora=str(module.exported_lora),
        final=final,
    )


def evaluate_final(args, lora: str | None) -> dict:
    """``rlr eval --config CONFIG`` on both splits (2 samples per caption, the evaluation seeds)."""
    settings = sampler_settings(args.config)
    return {
        split: evaluate_seeds(
            settings["model"],
            args.eval_seeds,
            split,
            2,
            settings["steps"],
            settings["guidance"],
            settings["eta"],
            lora=lora,
            timestep_spacing=settings["timestep_spacing"],
        )
        for split in ("held_out", "train")
    }


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.1f}%"
    return f"{mean:.1f}% ± {100 * statistics.stdev(values) / len(values) ** 0.5:.1f}"


def runs_by_name(payload: dict) -> list[tuple[str, list[dict]]]:
    """The stored runs grouped by run name (one entry per training seed), in the order of :data:`RUNS`."""
    grouped = ((name, [r for r in payload["runs"] if r["run"] == name]) for name in RUNS)
    return [(name, mine) for name, mine in grouped if mine]


def rows(payload: dict) -> list[dict]:
    out = []
    base = payload.get("base")
    if base:
        # Over the evaluation seeds: the mean and its standard error.
        out.append(
            dict(
                run="base model",
                seeds="-",
                minutes="-",
                **{
                    f"{s}_{k}": _cell([one[k] for one in base[s]["per_seed"]])
                    for s in ("held_out", "train")
                    for k in CHECKS
                },
            )
        )
    for name, mine in runs_by_name(payload):
        row = dict(
            run=name,
            seeds=" ".join(str(r["seed"]) for r in mine),
            minutes=f"{statistics.fmean(r['seconds'] for r in mine) / 60:.1f}",
        )
        for split in ("held_out", "train"):
            for key in CHECKS:
                # Per training seed: the mean over evaluation seeds; the ± is over training seeds.
                row[f"{split}_{key}"] = _cell([r["final"][split]["mean"][key] for r in mine])
        out.append(row)
    return out


def paired_rows(payload: dict) -> list[dict]:
    """Each run's change from the base model in points, paired on the same sampling noise (evaluation seed).

    Per training seed the change is the mean over evaluation seeds of (run - base); the ± is the standard
    error over evaluation seeds for one training seed, and over training seeds (of their means) for several:
    then it includes how much the training run itself varies."""
    base = payload.get("base")
    if not base:
        return []
    out = []
    for name, mine in runs_by_name(payload):
        row = dict(run=name, seeds=" ".join(str(r["seed"]) for r in mine))
        for split, key, _ in PAIRED:
            per_run = []
            for r in mine:
                pairs = zip(r["final"][split]["per_seed"], base[split]["per_seed"])
                per_run.append([100 * (after[key] - before[key]) for after, before in pairs])
            values = per_run[0] if len(per_run) == 1 else [statistics.fmean(v) for v in per_run]
            se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
            row[f"{split}_{key}"] = f"{statistics.fmean(values):+.1f} ± {se:.1f}"
        out.append(row)
    return out


PAIRED = [
    ("held_out", "all_ok", "held-out all"),
    ("held_out", "count_ok", "held-out count"),
    ("held_out", "position_ok", "held-out position"),
    ("held_out", "color_ok", "held-out colour"),
    ("train", "all_ok", "train all"),
]
PAIRED_COLUMNS = [
    ("run", "run", "s"),
    ("seeds", "training seeds", "s"),
    *((f"{split}_{key}", header, "s") for split, key, header in PAIRED),
]


def report(payload: dict, name: str) -> str:
    """The results tables (absolute accuracies, then paired changes), as written to ``NAME.md``."""
    tables = markdown_table(rows(payload), COLUMNS)
    paired = paired_rows(payload)
    if paired:
        tables += (
            "\n\nChange from the base model in points, paired on the same sampling noise:\n\n"
            + markdown_table(paired, PAIRED_COLUMNS)
        )
    text = f"{payload['machine']}\n\n{tables}\n"
    (RESULTS / f"{name}.md").write_text(text)
    plot(payload, RESULTS / f"{name}.png")
    return tables


COLUMNS = [
    ("run", "run", "s"),
    ("seeds", "training seeds", "s"),
    ("held_out_all_ok", "held-out all", "s"),
    ("held_out_count_ok", "held-out count", "s"),
    ("held_out_position_ok", "held-out position", "s"),
    ("held_out_color_ok", "held-out colour", "s"),
    ("train_all_ok", "train all", "s"),
    ("train_count_ok", "train count", "s"),
    ("minutes", "minutes per run", "s"),
]


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for name, mine in runs_by_name(payload):
        for i, r in enumerate(mine):
            xs = [p["images"] for p in r["curve"]]
            label = name if i == 0 else None
            line = top.plot(xs, [p["reward"] for p in r["curve"]], label=label, alpha=0.8)[0]
            bottom.plot(xs, [100 * p["all_ok"] for p in r["curve"]], color=line.get_color(), alpha=0.8)
            bottom.plot(
                xs, [100 * p["count_ok"] for p in r["curve"]], color=line.get_color(), alpha=0.5, ls=":"
            )
    top.set_ylabel("reward (held-out captions, its own reward)")
    bottom.set_ylabel("checker accuracy, held-out (%)\nsolid: all, dotted: count")
    bottom.set_xlabel("generated images")
    top.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(RUNS)[:6], metavar="NAME")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--images", type=int, default=9600, help="generated images per run (default 9600)")
    parser.add_argument("--batch", type=int, default=32, help="images per sampled batch (default 32)")
    parser.add_argument(
        "--eval-every", type=int, default=960, help="images between curve points (default 960)"
    )
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--name", default="world_race", help="results file name (default world_race)")
    parser.add_argument(
        "--merge", action="store_true", help="add to the stored results instead of replacing them"
    )
    parser.add_argument(
        "--fit-args",
        default="",
        metavar="ARGS",
        help="further rlr fit arguments for every run, e.g. '--model.optimizer.init_args.lr 1e-3'",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where each run's log and LoRA go (default outputs/world_race/NAME)",
    )
    parser.add_argument("--list", action="store_true", help="list the run names and exit")
    parser.add_argument(
        "--report",
        action="store_true",
        help="rewrite NAME.md and NAME.png from the stored NAME.json and exit (no runs)",
    )
    args = parser.parse_args()
    if args.list:
        print("\n".join(RUNS))
        return
    if args.report:
        path = RESULTS / f"{args.name}.json"
        if not path.exists():
            parser.error(f"--report: no results at {path}; run the race first")
        print(report(json.loads(path.read_text()), args.name))
        return
    unknown = [name for name in args.runs if name not in RUNS]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}; choose from: {', '.join(RUNS)}")
    if args.eval_every % args.batch:
        parser.error(f"--eval-every {args.eval_every} must be a multiple of --batch {args.batch}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    quiet_lightning("fit")
    path = RESULTS / f"{args.name}.json"
    payload = json.loads(path.read_text()) if args.merge and path.exists() else {}
    payload.update(
        machine=machine(),
        config=str(args.config.resolve().relative_to(ROOT)),
        images=args.images,
        batch=args.batch,
        fit_args=args.fit_args,
    )
    payload.setdefault("runs", [])
    if "base" not in payload:
        payload["base"] = evaluate_final(args, None)
    out = args.out or ROOT / "outputs" / "world_race" / args.name
    for name in args.runs:
        for seed in args.seeds:
            logger.info("%s, seed %d", name, seed)
            result = run(args, name, seed, out)
            payload["runs"] = [r for r in payload["runs"] if (r["run"], r["seed"]) != (name, seed)] + [result]
            path.write_text(json.dumps(payload, indent=1))
            print(report(payload, args.name), flush=True)


if __name__ == "__main__":
    main()
