"""``rlr eval``: how well a shapes-world model (with a LoRA, or not) follows captions, skill by skill.

    rlr eval --model shapes-world --lora shapes-world-aligned --config configs/world_align.yaml
    rlr eval --model shapes-world --steps 20 --eta 0 --guidance 3 --seeds 0 1 2 --json base.json

Samples every caption of a split (held-out combinations by default) once per sampling seed, judges each image
with the exact checker (:mod:`rlr_lightning.world.checker`) and prints a GenEval-style table: colour, count (and
count by the asked number), position and all (every asked attribute right in the same image), each as the
mean over the seeds +- the standard error of that mean, with every seed's value. ``--config`` takes the
sampler settings (``model:`` steps, eta, guidance, timestep spacing and model) from a training config, so a
LoRA is evaluated as it was trained; options given explicitly win over the config.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

#: Sampler settings without a config: the ones docs/world.md reports the base model under.
DEFAULTS = dict(model="shapes-world", steps=20, eta=0.0, guidance=3.0, timestep_spacing=None)
#: ``model:`` keys of a training config and the options they fill.
CONFIG_KEYS = {
    "pretrained_model_name_or_path": "model",
    "num_steps": "steps",
    "eta": "eta",
    "guidance_scale": "guidance",
    "timestep_spacing": "timestep_spacing",
}
#: Rows of the table: the checker's verdict and its name.
ROWS = (
    ("color_ok", "colour"),
    ("count_ok", "count"),
    ("count_ok@1", "  asked one"),
    ("count_ok@2", "  asked two"),
    ("count_ok@3", "  asked three"),
    ("count_ok@4", "  asked four"),
    ("position_ok", "position"),
    ("all_ok", "all (count and position)"),
)


def _parser() -> argparse.ArgumentParser:
    from rlr_lightning.argparsing import HelpFormatter, SampleArgumentParser
    from rlr_lightning.builtin import describe_builtin_loras

    p = SampleArgumentParser(
        prog="rlr eval",
        formatter_class=HelpFormatter,
        description="Sample every caption of a shapes-world split once per sampling seed, judge each image with the "
        "exact checker and print a GenEval-style table: colour, count (and by the asked number), position and all "
        "(every asked attribute right in the same image), each as the mean over the seeds +- its standard error, "
        "with every seed's value. --config takes the sampler settings from a training config (evaluate a LoRA as "
        "it was trained); options given explicitly win.",
    )
    p.add_argument("--model", default=None, help="the world pipeline: shapes-world (default) or a directory")
    p.add_argument(
        "--lora",
        default=None,
        help=f"LoRA weights to evaluate: a directory or .safetensors file, or {describe_builtin_loras()}",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a training config (YAML) whose model: sampler settings (num_steps, eta, guidance_scale, "
        "timestep_spacing, pretrained_model_name_or_path) are used: evaluate a LoRA as it was trained",
    )
    p.add_argument(
        "--split",
        choices=("held_out", "train"),
        default="held_out",
        help="caption split: held_out (combinations never seen in the world's training; default) or train",
    )
    p.add_argument(
        "--samples-per-caption", type=int, default=2, help="samples of each caption per seed (default 2)"
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        metavar="SEED",
        help="sampling seeds, each a full pass over the captions (default: 0 1 2)",
    )
    p.add_argument("--steps", type=int, default=None, help="sampling steps T (default 20, or the config's)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0, or the config's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default 3, or the config's)")
    p.add_argument(
        "--timestep-spacing",
        choices=("leading", "trailing", "linspace"),
        default=None,
        help="DDIM timestep spacing (default: the model's scheduler, or the config's)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling call (memory only)")
    p.add_argument(
        "--json", type=Path, default=None, help="also write the per-seed results and the table to this file"
    )
    p.add_argument(
        "--grid",
        type=Path,
        default=None,
        metavar="PNG",
        help="with --lora, also write a before/after grid: --grid-captions captions of the split, the base "
        "model above and the LoRA below from the first seed's noise, framed green where the checker finds "
        "every asked attribute right, red where not",
    )
    p.add_argument(
        "--grid-captions",
        type=int,
        default=24,
        metavar="N",
        help="captions in the grid, spread evenly over the split (default 24, in bands of 8)",
    )
    return p


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The sampler settings: explicit options, then the config's model: keys, then :data:`DEFAULTS`."""
    settings = dict(DEFAULTS)
    if args.config is not None:
        import yaml

        if not args.config.is_file():
            parser.error(f"--config {args.config}: no such file")
        try:
            model = (yaml.safe_load(args.config.read_text()) or {}).get("model") or {}
        except yaml.YAMLError as err:
            parser.error(f"--config {args.config} is not valid YAML: {err}")
        settings.update({option: model[key] for key, option in CONFIG_KEYS.items() if key in model})
    for option in ("model", "steps", "eta", "guidance", "timestep_spacing"):
        if getattr(args, option) is not None:
            settings[option] = getattr(args, option)
    return settings


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace, settings: dict) -> None:
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {' '.join(map(str, args.seeds))}")
    if args.samples_per_caption < 1:
        parser.error(f"--samples-per-caption must be >= 1, got {args.samples_per_caption}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if int(settings["steps"]) < 1:
        parser.error(f"--steps must be >= 1, got {settings['steps']}")
    if float(settings["eta"]) < 0:
        parser.error(f"--eta must be >= 0, got {settings['eta']}")
    if float(settings["guidance"]) < 1:
        parser.error(f"--guidance must be >= 1 (1 turns guidance off), got {settings['guidance']}")
    for option, path in (("--json", args.json), ("--grid", args.grid)):
        if path is not None and not path.parent.exists():
            parser.error(f"{option} {path}: its directory {path.parent} does not exist")
    if args.grid_captions < 1:
        parser.error(f"--grid-captions must be >= 1, got {args.grid_captions}")
    if args.grid is not None and args.lora is None:
        parser.error("--grid compares the base model with a LoRA: give --lora too")


def format_table(result: dict, title: str) -> str:
    """The GenEval-style table of an :func:`~rlr_lightning.world.evaluate.evaluate_seeds` result."""
    seeds = result["seeds"]
    header = f"{'skill':26s} {'mean +- SE':>14s}  " + "  ".join(f"{'seed ' + str(s):>7s}" for s in seeds)
    lines = [title, header, "-" * len(header)]
    for key, name in ROWS:
        if key not in result["mean"]:
            continue
        se = result["se"][key]
        mean = f"{100 * result['mean'][key]:5.1f}%" + (f" +- {100 * se:4.1f}" if se is not None else "")
        per_seed = "  ".join(f"{100 * one[key]:6.1f}%" for one in result["per_seed"])
        lines.append(f"{name:26s} {mean:>14s}  {per_seed}")
    return "\n".join(lines)


def evaluate_command(argv: list[str]) -> dict:
    """Run ``rlr eval``; returns the pooled result (what ``--json`` writes)."""
    from rlr_lightning.builtin import resolve_lora
    from rlr_lightning.world.evaluate import before_after_grid, evaluate_seeds, grid_captions

    parser = _parser()
    args = parser.parse_args(argv)
    settings = _settings(parser, args)
    _check(parser, args, settings)
    lora = None
    if args.lora is not None:
        lora = resolve_lora(args.lora)
        if not Path(lora).expanduser().exists():
            parser.error(f"--lora {args.lora}: no such file or directory (nor a built-in LoRA name)")
    try:
        result = evaluate_seeds(
            settings["model"],
            args.seeds,
            args.split,
            args.samples_per_caption,
            int(settings["steps"]),
            float(settings["guidance"]),
            float(settings["eta"]),
            lora=lora,
            batch_size=args.batch_size,
            timestep_spacing=settings["timestep_spacing"],
        )
    except (OSError, ValueError) as err:  # a model or LoRA that does not load, or does not fit
        raise SystemExit(f"rlr eval: error: {err}") from None
    spacing = f", {settings['timestep_spacing']} spacing" if settings["timestep_spacing"] else ""
    title = (
        f"{settings['model']}{' + LoRA ' + args.lora if args.lora else ''}: {args.split} captions, "
        f"{settings['steps']} steps, eta {float(settings['eta']):g}, guidance {float(settings['guidance']):g}"
        f"{spacing}; {result['n_per_seed']} samples per seed, mean +- standard error over {len(args.seeds)} "
        f"seed{'s' if len(args.seeds) > 1 else ''}"
    )
    table = format_table(result, title)
    print(table)
    payload = dict(
        result,
        settings=dict(
            settings, lora=args.lora, split=args.split, samples_per_caption=args.samples_per_caption
        ),
        table=table,
    )
    if args.grid is not None:
        assert lora is not None  # --grid needs --lora (_check)
        captions = grid_captions(args.split, args.grid_captions)
        image, verdicts = before_after_grid(
            settings["model"],
            lora,
            captions,
            args.seeds[0],
            int(settings["steps"]),
            float(settings["guidance"]),
            float(settings["eta"]),
            settings["timestep_spacing"],
        )
        image.save(args.grid)
        payload["grid"] = dict(path=str(args.grid), captions=captions, seed=args.seeds[0], **verdicts)
        print(
            f"Before/after grid written to {args.grid} (all right: {sum(verdicts['before'])} of "
            f"{len(verdicts['before'])} before, {sum(verdicts['after'])} after)"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(payload, indent=1))
        logger.info("Results written to %s", args.json)
    return payload


def legacy_main(argv: list[str] | None = None) -> None:
    """``python -m rlr_lightning.world.evaluate [PIPELINE] [options]``: the same as ``rlr eval [--model PIPELINE]
    [options]`` (kept for older command lines)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--model", *argv]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    evaluate_command(argv)
