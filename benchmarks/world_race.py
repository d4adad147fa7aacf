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
what finished; ``--merge`` adds runs to stored results) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from common import RESULTS, machine, markdown_table, world_prompts
from lightning.pytorch.loggers import CSVLogger

from rlr_lightning.data import PromptDataModule
from rlr_lightning.estimators import GRPO, RLR, FullBackprop, ScoreFunction, TruncatedBackprop
from rlr_lightning.lightning_cli import quiet_lightning
from rlr_lightning.module import RLRModule
from rlr_lightning.world.checker import CHECKS
from rlr_lightning.world.evaluate import _sample_and_check, evaluate_seeds

logger = logging.getLogger("world_race")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "world_align.yaml"
CURVE_SEED = 1000


def composite_reward(counter: str | None = None):
    """The config's reward with another counter (None: the packaged one)."""
    from rlr_lightning.rewards import WeightedSum, WorldColorReward, WorldCountReward, WorldPositionReward

    return WeightedSum([WorldCountReward(counter), WorldPositionReward(), WorldColorReward()], [1.0, 0.5, 0.5])


def count_reward(counter: str | None = None):
    from rlr_lightning.rewards import WorldCountReward

    return WorldCountReward(counter)


def checker_reward():
    from rlr_lightning.rewards import WorldCheckerReward

    return WorldCheckerReward(partial_credit=True)


#: name -> (estimator factory, reward factory or None for the config's, samples per prompt)
RUNS = {
    "full backprop (checkpointed)": (lambda: FullBackprop(), None),
    "truncated backprop (K=1)": (lambda: TruncatedBackprop(k=1), None),
    "RLR (today)": (lambda: RLR(h=2), None),
    "RLR (best of issue 20)": (lambda: RLR(h=2, tail="auto", step_baseline="muprop", step_baseline_sigma_ratio=0.75),
                               None),
    "score function": (lambda: ScoreFunction(), None),
    "GRPO (G=8, checker reward)": (lambda: GRPO(group_size=8, inner_updates=2, clip_range=0.2), checker_reward),
    # The reward checks: the count reward alone, with the packaged counter and with the render-only one.
    "full backprop, count reward": (lambda: FullBackprop(), lambda: count_reward()),
    "full backprop, render-only counter": (lambda: FullBackprop(),
                                           lambda: count_reward(str(ROOT / "benchmarks" / "data" / "counter_renders"))),
}


def model_settings(config: Path) -> dict:
    """The ``model:`` section of the config (sampler, reward, LoRA, optimizer, KL), with the ``data:`` prompt set
    under ``prompt_set``."""
    text = yaml.safe_load(config.read_text())
    return dict(text["model"], prompt_set=text.get("data", {}).get("prompt_set", "shapes"))


def build_module(settings: dict, estimator, reward, seed: int, export_dir: str) -> RLRModule:
    from rlr_lightning.models import LoraSettings
    from rlr_lightning.rewards import WeightedSum, WorldColorReward, WorldCountReward, WorldPositionReward

    lora = settings.get("lora", {})
    optimizer = settings.get("optimizer", {}).get("init_args", {})
    if reward is None:  # the config's own WeightedSum of world rewards
        spec = settings["reward"]["init_args"]
        classes = dict(WorldCountReward=WorldCountReward, WorldPositionReward=WorldPositionReward,
                       WorldColorReward=WorldColorReward)
        parts = [classes[part["class_path"].rsplit(".", 1)[1]](**part.get("init_args", {})) for part in spec["rewards"]]
        reward = WeightedSum(parts, spec.get("weights"))
    module = RLRModule(
        pretrained_model_name_or_path=settings["pretrained_model_name_or_path"], estimator=estimator, reward=reward,
        num_steps=settings["num_steps"], eta=settings["eta"], guidance_scale=settings["guidance_scale"],
        timestep_spacing=settings.get("timestep_spacing"), seed=seed,
        lora=LoraSettings(rank=lora.get("rank", 4), alpha=lora.get("alpha", 4.0),
                          target_modules=tuple(lora.get("target_modules", LoraSettings().target_modules))),
        optimizer=lambda p: torch.optim.AdamW(p, lr=optimizer.get("lr", 3e-3),
                                              weight_decay=optimizer.get("weight_decay", 1e-4)),
        gradient_clip_val=settings.get("gradient_clip_val", 1.0), kl_coefficient=settings.get("kl_coefficient", 0.0),
        activation_checkpointing=isinstance(estimator, FullBackprop) or None, export_dir=export_dir,
    )
    module.configure_model()
    return module


class Curve(L.Callback):
    """Held-out checker accuracies and reward every ``every`` images (and before the first step)."""

    def __init__(self, every: int, images_per_step: int, captions: list[str]) -> None:
        self.every, self.images_per_step, self.captions = every, images_per_step, captions
        self.points: list[dict] = []

    def measure(self, module: RLRModule, images: int) -> None:
        with torch.no_grad():
            result = _sample_and_check(module.backbone, module.sampler, self.captions, CURVE_SEED, 72, module.reward)
        self.points.append(dict(images=images, **{k: result[k] for k in (*CHECKS, "reward")}))
        logger.info("  %6d images: reward %.3f, checker count %.1f%%, all %.1f%%", images, result["reward"],
                    100 * result["count_ok"], 100 * result["all_ok"])

    def on_train_start(self, trainer, module) -> None:
        self.measure(module, 0)

    def on_train_batch_end(self, trainer, module, *args) -> None:
        images = (trainer.fit_loop.total_batch_idx + 1) * self.images_per_step
        if images % self.every == 0:
            self.measure(module, images)


def run(args, name: str, seed: int, out: Path) -> dict:
    make_estimator, make_reward = RUNS[name]
    estimator = make_estimator()
    settings = model_settings(args.config)
    run_dir = out / "".join(c if c.isalnum() else "_" for c in name.lower()) / f"seed{seed}"
    module = build_module(settings, estimator, make_reward() if make_reward else None, seed, str(run_dir / "lora"))
    images_per_batch = args.batch
    prompts_per_batch = images_per_batch // estimator.samples_per_prompt
    batches = args.images // images_per_batch
    curve = Curve(args.eval_every, images_per_batch, world_prompts("held_out"))
    data = PromptDataModule(prompt_set=settings["prompt_set"], batch_size=prompts_per_batch, seed=seed)
    trainer = L.Trainer(accelerator="cpu", max_steps=batches * estimator.inner_updates, logger=CSVLogger(run_dir, name="log"),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=run_dir, callbacks=[curve])
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    final = evaluate_final(args, settings, str(module.exported_lora))
    return dict(run=name, seed=seed, seconds=seconds, images=batches * images_per_batch, curve=curve.points,
                lora=str(module.exported_lora), final=final)


def evaluate_final(args, settings: dict, lora: str | None) -> dict:
    return {split: evaluate_seeds(settings["pretrained_model_name_or_path"], args.eval_seeds, split, 2,
                                  settings["num_steps"], settings["guidance_scale"], settings["eta"], lora=lora,
                                  timestep_spacing=settings.get("timestep_spacing"))
            for split in ("held_out", "train")}


def _cell(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.1f}%"
    return f"{mean:.1f}% ± {100 * statistics.stdev(values) / len(values) ** 0.5:.1f}"


def rows(payload: dict) -> list[dict]:
    out = []
    base = payload.get("base")
    if base:
        # Over the evaluation seeds: the mean and its standard error.
        out.append(dict(run="base model", seeds="-", minutes="-",
                        **{f"{s}_{k}": _cell([one[k] for one in base[s]["per_seed"]])
                           for s in ("held_out", "train") for k in CHECKS}))
    for name in RUNS:
        mine = [r for r in payload["runs"] if r["run"] == name]
        if not mine:
            continue
        row = dict(run=name, seeds=" ".join(str(r["seed"]) for r in mine),
                   minutes=f"{statistics.fmean(r['seconds'] for r in mine) / 60:.1f}")
        for split in ("held_out", "train"):
            for key in CHECKS:
                # Per training seed: the mean over evaluation seeds; the ± is over training seeds.
                row[f"{split}_{key}"] = _cell([r["final"][split]["mean"][key] for r in mine])
        out.append(row)
    return out


COLUMNS = [("run", "run", "s"), ("seeds", "training seeds", "s"), ("held_out_all_ok", "held-out all", "s"),
           ("held_out_count_ok", "held-out count", "s"), ("held_out_position_ok", "held-out position", "s"),
           ("held_out_color_ok", "held-out colour", "s"), ("train_all_ok", "train all", "s"),
           ("train_count_ok", "train count", "s"), ("minutes", "minutes per run", "s")]


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    for name in RUNS:
        mine = [r for r in payload["runs"] if r["run"] == name]
        for i, r in enumerate(mine):
            xs = [p["images"] for p in r["curve"]]
            label = name if i == 0 else None
            line = top.plot(xs, [p["reward"] for p in r["curve"]], label=label, alpha=0.8)[0]
            bottom.plot(xs, [100 * p["all_ok"] for p in r["curve"]], color=line.get_color(), alpha=0.8)
            bottom.plot(xs, [100 * p["count_ok"] for p in r["curve"]], color=line.get_color(), alpha=0.5, ls=":")
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
    parser.add_argument("--eval-every", type=int, default=960, help="images between curve points (default 960)")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--name", default="world_race", help="results file name (default world_race)")
    parser.add_argument("--merge", action="store_true", help="add to the stored results instead of replacing them")
    parser.add_argument("--list", action="store_true", help="list the run names and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(RUNS))
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
    payload.update(machine=machine(), config=str(args.config.relative_to(ROOT)), images=args.images, batch=args.batch)
    payload.setdefault("runs", [])
    if "base" not in payload:
        settings = model_settings(args.config)
        payload["base"] = evaluate_final(args, settings, None)
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.runs:
            for seed in args.seeds:
                logger.info("%s, seed %d", name, seed)
                result = run(args, name, seed, Path(scratch))
                payload["runs"] = [r for r in payload["runs"] if (r["run"], r["seed"]) != (name, seed)] + [result]
                path.write_text(json.dumps(payload, indent=1))
                table = markdown_table(rows(payload), COLUMNS)
                (RESULTS / f"{args.name}.md").write_text(f"{payload['machine']}\n\n{table}\n")
                plot(payload, RESULTS / f"{args.name}.png")
                print(table, flush=True)


if __name__ == "__main__":
    main()
