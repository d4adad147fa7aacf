"""``rlr diagnose``: the per-step variance map (:mod:`rlr_lightning.variance_map`) of a training config.

    rlr diagnose --config configs/quickstart.yaml [--draws 32] [--batch 4] [--out map.json] [--model.num_steps 20]

The config is read as ``rlr fit`` reads it (any ``--model.*`` / ``--data.*`` override included); the model, reward
and sampler it builds are the ones measured, on ``--batch`` of its training prompts. It prints the map, the
composed estimators' variances against full backprop, and the recommended ``tail`` and ``step_baseline`` of
``RLR``; then it measures that recommendation (and the config's own estimator) on the same draws.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    from rlr_lightning.argparsing import HelpFormatter, SampleArgumentParser
    from rlr_lightning.estimators.baselines import STEP_BASELINES

    p = SampleArgumentParser(
        prog="rlr diagnose",
        formatter_class=HelpFormatter,
        add_help=False,
        description="Measure, step by step, where the gradient noise of a training config lives: each step's sigma, "
        "its share of the true gradient, the variance of its pathwise share and of its likelihood-ratio term under "
        "each step baseline; the variances of full backprop, truncated backprop, the score function and an exact "
        "tail with likelihood ratios before it, composed on the same draws; and the recommended RLR tail and "
        "per-step baselines, measured on the same draws. Every other option (--config, --model.*, --data.*) is read "
        "as rlr fit reads it.",
    )
    p.add_argument(
        "-h", "--help", action="store_true", help="show this help and the config options, then exit"
    )
    p.add_argument(
        "--draws",
        type=int,
        default=24,
        help="paired draws (default %(default)s; likelihood-ratio variances are heavy-tailed: fewer "
        "understate them)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=4,
        help="training prompts per draw, one image each (default "
        "%(default)s); likelihood-ratio variances fall as 1 / batch",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the prompts and the draws (default %(default)s)"
    )
    p.add_argument(
        "--baselines",
        nargs="+",
        default=list(STEP_BASELINES),
        choices=STEP_BASELINES,
        metavar="NAME",
        help=f"step baselines to measure (default: all of {', '.join(STEP_BASELINES)})",
    )
    p.add_argument(
        "--no-measure",
        dest="measure",
        action="store_false",
        help="skip measuring the recommended RLR and the config's estimator on the same draws",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the map as JSON to this file")
    return p


def diagnose(argv: list[str]) -> None:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        print("\nconfig options: those of rlr fit (rlr fit --help)")
        return
    if args.draws < 4:
        parser.error(
            f"--draws must be >= 4 (a variance needs several draws; a few dozen are better), got {args.draws}"
        )
    if args.batch < 2:
        parser.error(
            f"--batch must be >= 2 (the leave-one-out baseline needs another sample), got {args.batch}"
        )
    if args.out is not None and args.out.parent and not args.out.parent.exists():
        parser.error(f"--out {args.out}: its directory {args.out.parent} does not exist")
    if not any(a == "--config" or a.startswith("--config=") for a in rest):
        parser.error("give the training config to diagnose: --config FILE (e.g. configs/quickstart.yaml)")
    from rlr_lightning.lightning_cli import DEBUG_ENV, build, debug_enabled

    try:
        # LightningCLI reads sys.argv too when given args: show it only what is its own.
        argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            cli = build(rest, run=False, prog="rlr diagnose")
        finally:
            sys.argv = argv
        module, data = cli.model, cli.datamodule
        prompts = data.prompts
        if len(prompts) < args.batch:
            parser.error(
                f"--batch {args.batch} needs as many training prompts; the config has {len(prompts)}"
            )
        module.configure_model()
        module.task.prepare(module.estimator)
        from rlr_lightning.variance_map import check_task

        check_task(module.task)
    except (ValueError, OSError, ImportError) as err:
        # A config the user fixes from the message alone (the checks rlr fit runs, before any draw).
        if debug_enabled():
            raise
        sys.stderr.write(f"rlr diagnose: error: {err}\n(set {DEBUG_ENV}=1 for the full traceback)\n")
        sys.exit(2)
    prompts = random.Random(args.seed).sample(prompts, args.batch)
    report(module, prompts, args.draws, args.seed, args.baselines, args.measure, args.out)


def report(
    module, prompts: list[str], draws: int, seed: int, baselines, measure: bool, out: Path | None
) -> dict:
    """Measure the map, print it with the recommendation (and, with ``measure``, the recommended RLR measured on
    the same draws), and write the JSON to ``out``. Returns what was written."""
    from rlr_lightning.diagnostics import gradient_samples
    from rlr_lightning.estimators import RLR
    from rlr_lightning.variance_map import variance_map

    logger.info("variance map of %d draws of %d prompts: %s", draws, len(prompts), "; ".join(prompts))
    vmap = variance_map(module, prompts, draws, seed, baselines)
    result = vmap.to_dict()
    lines = [vmap.table(), "", f"recommended for RLR ({vmap.recommended}):", vmap.recommendation()]
    full = vmap.estimators["full backprop"]["variance"]
    if measure:
        measured = {}
        block = module.estimator.block_length
        h = min(block if isinstance(block, int) else 2, module.settings.num_steps - vmap.tail)
        candidates = {"RLR, recommended": RLR(h=h, tail=vmap.tail, step_baseline=vmap.step_baseline)}
        candidates[f"the config's estimator ({module.estimator.name})"] = module.estimator
        for name, estimator in candidates.items():
            samples = gradient_samples(module, prompts, estimator, draws, seed)
            measured[name] = float(samples.var(0).sum())
        result["measured"] = measured
        lines += ["", "measured on the same draws (total variance, x full backprop):"]
        lines += [f"  {name}: {v:.3g} ({v / full:.3g}x)" for name, v in measured.items()]
    print("\n".join(lines))
    if out is not None:
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return result


if __name__ == "__main__":  # pragma: no cover
    diagnose(sys.argv[1:])
