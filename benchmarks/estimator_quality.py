"""Estimator quality: bias, variance, cosine to full backprop, and cost, side by side, on the trained shapes
world with the count reward (default) or on the tiny model with the quickstart's colour reward.

    python benchmarks/estimator_quality.py [--problem world] [--sampler world] [--model shapes-world] \
        [--draws 96] [--batch 4]
    python benchmarks/estimator_quality.py --sampler quickstart   # the quickstart's trailing spacing, no guidance
    python benchmarks/estimator_quality.py --problem tiny --draws 32
    python benchmarks/estimator_quality.py --estimators "score function, group baseline (G=4)"   # one row, merged
    python benchmarks/estimator_quality.py --timing-only [--time-repeats 7]   # re-time the stored rows, quietly

Every estimator is sampled on the same draws (common random numbers) as the full-backprop reference, so
the bias columns are sharp. ``bias (SE)`` is ||mean difference|| in standard errors: about 1 when unbiased,
growing as sqrt(N) when not, but blind to a bias small against the variance of all D coordinates. ``z along
gradient`` projects every paired difference onto the unit true-gradient direction (the mean of full backprop
over ``--direction-draws`` other draws) and divides the mean by its standard error: within about +-3 when
unbiased; ``bias along gradient`` is that mean over the reference's own projection (-1: the estimate misses
the whole gradient along its direction). Likelihood-ratio estimates are heavy-tailed, so the variance of N
draws is pinned down only loosely (its standard error is reported) and small N understates it: use N >= 96.

Times are medians of ``--time-repeats`` estimates per estimator, timed round-robin (each round times every
estimator once, in a rotated order), after one warm-up of each. ``--timing-only`` re-times the rows stored for
the same settings (and only changes their time columns), for a rerun on a quiet machine. The group-baseline
rows generate the same images per estimate as the others: ``batch / G`` captions ``G`` times each, the
captions of draw ``i`` being the ``i``-th slice of the fixed batch (cyclically), so their mean over the draws
estimates the same gradient; their reference is full backprop on the same layout and noise (its own row). The
LoRA weights are moved off their initialisation first (B = 0 there would hide every LoRA A gradient). ``MSE``
is the total variance plus the squared bias (estimated from the paired differences less their noise), and the
last two columns are ``MSE x seconds`` relative to truncated backprop K=1's and full backprop's. A plain run also
measures the per-step variance map (``rlr_lightning.variance_map``) on the compared draws, and the row
"rlr diagnose's recommendation" measures what a map of ``--map-draws`` other draws (seed 1) recommends. Writes
benchmarks/results/estimator_quality.json (tiny), estimator_quality_world.json (world) or
estimator_quality_world_trailing.json (world, ``--sampler quickstart``) and prints a markdown table; a plain run
measures the default rows, ``--estimators`` a subset merged into the stored results of the same settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
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
    world_module,
    world_prompts,
)

from rlr_lightning.diagnostics import compare, gradient_samples
from rlr_lightning.estimators import (
    RLR,
    FullBackprop,
    ScoreFunction,
    TruncatedBackprop,
    compute_advantages,
    derive_seed,
    estimate_gradient,
)

logger = logging.getLogger("estimator_quality")


#: Samples per caption of the group-baseline rows.
GROUP_SIZE = 4
#: The full-backprop reference of the group-baseline rows: the same captions and noise as theirs, draw by draw.
GROUP_REFERENCE = f"full backprop, group layout (G={GROUP_SIZE})"
#: Draws per estimator. Likelihood-ratio estimates are heavy-tailed: on the world, full backprop's total
#: variance was 11 on draws 0-31 and 29 on draws 0-95, so fewer draws understate variances.
DEFAULT_DRAWS = 96
#: Timed estimates per estimator (round-robin); the time columns are their medians.
TIME_REPEATS = 7


#: The row measured with ``rlr diagnose``'s recommendation (a variance map on other draws, seed 1).
RECOMMENDED = "RLR h=2, rlr diagnose's recommendation"
#: The fixed rule of the variance notes: leave-one-out on the first four steps, MuProp after (tail 2).
LATE_MUPROP = "RLR h=2 tail=2, MuProp baselines from step 4"
#: A rule of the schedule alone, for any sampler: the automatic tail, MuProp on the steps of sigma <= 0.75 x the
#: largest (the world's steps 4-7, the quickstart's 4-8: where the variance maps of both samplers found it wins).
SIGMA_RULE = "RLR h=2 tail=auto, MuProp baselines where sigma <= 0.75 max"


def estimators(num_steps: int = 10) -> list[tuple[str, object]]:
    """(name, estimator) of every row, in table order; the group rows next to their counterparts."""
    rows = []
    for h in (1, 2, 4):
        rows.append((f"RLR h={h} zo=score", RLR(h=h, zo_mode="score")))
        if h == 2:
            rows.append(
                (
                    f"RLR h=2 zo=score, group baseline (G={GROUP_SIZE})",
                    RLR(h=2, zo_mode="score", baseline="group", group_size=GROUP_SIZE),
                )
            )
        rows.append((f"RLR h={h} zo=parameter (antithetic)", RLR(h=h, zo_mode="parameter", zo_scale=1e-3)))
        rows.append((f"RLR h={h} zo=none", RLR(h=h, zo_mode="none")))
        if h == 2:
            # The exact tail (the world's schedule: tail="auto" takes K = 2, its two steps of sigma < 0.05).
            for tail in (2, 3):
                rows.append((f"RLR h=2 tail={tail} zo=score", RLR(h=2, tail=tail, zo_mode="score")))
            # Per-step baselines on top of the exact tail.
            for kind, label in (("value", "value"), ("muprop", "MuProp")):
                rows.append((f"RLR h=2 tail=2, {label} baselines", RLR(h=2, tail=2, step_baseline=kind)))
            late = ["none"] * 4 + ["muprop"] * (num_steps - 4)
            rows.append((LATE_MUPROP, RLR(h=2, tail=2, step_baseline=late)))
            rows.append(
                (SIGMA_RULE, RLR(h=2, tail="auto", step_baseline="muprop", step_baseline_sigma_ratio=0.75))
            )
            rows.append((RECOMMENDED, None))  # built from the variance map at run time
    for k in (1, 2, 5):
        rows.append((f"truncated K={k}", TruncatedBackprop(k=k)))
    rows.append(("score function", ScoreFunction()))
    rows.append(("score function, MuProp baselines", ScoreFunction(step_baseline="muprop")))
    rows.append(
        (
            f"score function, group baseline (G={GROUP_SIZE})",
            ScoreFunction(baseline="group", group_size=GROUP_SIZE),
        )
    )
    rows.append(("full backprop", FullBackprop()))
    rows.append((GROUP_REFERENCE, FullBackprop()))
    return rows


#: The rows a plain run measures (``--estimators`` picks others, e.g. the group rows).
DEFAULT_ROWS = [
    "RLR h=1 zo=score",
    "RLR h=2 zo=score",
    "RLR h=2 zo=parameter (antithetic)",
    "RLR h=2 zo=none",
    "RLR h=2 tail=2 zo=score",
    "RLR h=2 tail=3 zo=score",
    "RLR h=2 tail=2, value baselines",
    "RLR h=2 tail=2, MuProp baselines",
    LATE_MUPROP,
    SIGMA_RULE,
    RECOMMENDED,
    "truncated K=1",
    "truncated K=2",
    "score function",
    "score function, MuProp baselines",
    "full backprop",
]
#: The samplers: the world's (leading spacing, guidance 3) and the quickstart's (trailing spacing, no guidance).
SAMPLERS = {"world": dict(), "quickstart": dict(timestep_spacing="trailing", guidance_scale=1.0)}


NAMES = [name for name, _ in estimators()]


def caption_slices(prompts: list[str], group_size: int) -> list[list[str]]:
    """The fixed batch cut into slices of ``len(prompts) / group_size`` captions: draw ``i`` of a group row
    samples slice ``i mod len(slices)``, each caption ``group_size`` times, so it generates as many images as
    the other rows and its mean over the draws estimates the gradient of the whole batch."""
    per_draw = len(prompts) // group_size
    return [prompts[i : i + per_draw] for i in range(0, len(prompts), per_draw)]


def layout_samples(module, prompt_sets: list[list[str]], estimator, draws: int, seed: int = 0):
    """``gradient_samples`` with the captions of draw ``i`` taken from ``prompt_sets[i mod len]``, on the same
    seeds: a group row's draw and the group reference's draw (its captions repeated ``G`` times, in the group
    order) sample the same noise. Returns the ``(draws, D)`` estimates and the ``(draws, images)`` rewards."""
    module.task.prepare(estimator)
    rows, rewards = [], []
    for i in range(draws):
        prompts = prompt_sets[i % len(prompt_sets)]
        estimate = estimate_gradient(
            estimator,
            module.task.sampler,
            module.task.conditioning_for(prompts),
            prompts,
            module.task.latent_reward,
            step_seed=derive_seed(seed, i, 0),
            rank_seed=derive_seed(seed, i, 1),
            memory=module.task.memory_plan,
        )
        rows.append(estimate.total)
        rewards.append(estimate.rollout.rewards.detach().double())
    return torch.stack(rows), torch.stack(rewards)


def reward_spread(rewards, prompt_sets: list[list[str]], baseline: str) -> dict:
    """What the likelihood-ratio terms multiply: the reward per caption (mean, standard deviation over its
    samples) and the root mean square of the advantages ``r - b`` that ``baseline`` gives on these draws."""
    per_caption: dict[str, list[float]] = {}
    squares = []
    for i, r in enumerate(rewards):
        for caption, value in zip(prompt_sets[i % len(prompt_sets)], r.tolist()):
            per_caption.setdefault(caption, []).append(value)
        a = compute_advantages(r, r, baseline, group_size=GROUP_SIZE if baseline == "group" else 1)
        squares.append(float(a.pow(2).mean()))
    captions = {
        c: dict(mean=statistics.mean(v), std=statistics.stdev(v), n=len(v)) for c, v in per_caption.items()
    }
    return dict(baseline=baseline, advantage_rms=statistics.mean(squares) ** 0.5, captions=captions)


def true_direction(module, prompts: list[str], draws: int, seed: int = 1) -> torch.Tensor:
    """Unit vector along the mean of full backprop (exact per draw) over ``draws`` draws of ``seed``: other
    draws than the compared ones (seed 0), so the direction does not share their noise."""
    mean = gradient_samples(module, prompts, FullBackprop(), draws, seed).mean(0)
    return mean / mean.norm()


def along_gradient(samples, reference, direction) -> dict:
    """The bias along the true gradient: the paired differences ``G_i - G_full,i`` projected on the unit
    ``direction``, their mean over its standard error (``along_z``: within about +-3 for an unbiased estimator;
    a norm over every coordinate, ``bias_se``, can hide a bias that this one shows) and over the reference's own
    mean projection (``along_share``, with its standard error ``along_share_se``: -1 when the estimate misses
    the whole gradient along it)."""
    projected = samples @ direction
    truth = reference @ direction
    diff = projected - truth
    n = diff.numel()
    mean, se = float(diff.mean()), float(diff.std() / n**0.5)
    z = mean / se if se > 0 else 0.0
    share_of = float(truth.mean())
    return dict(
        along_z=z,
        along_bias=mean,
        along_bias_se=se,
        along_truth=share_of,
        along_share=mean / share_of,
        along_share_se=se / abs(share_of),
    )


def stored_results(path, settings: dict, prompts: list[str]) -> dict:
    """An earlier run with the same settings and captions (what a subset run is merged into)."""
    if not path.is_file():
        return {"rows": []}
    stored = json.loads(path.read_text())
    same = {k: stored["args"].get(k) for k in settings} == settings and stored.get("prompts") == prompts
    if not same:
        raise SystemExit(
            f"{path} holds a run with other settings ({stored['args']}); run every estimator "
            "(no --estimators) to replace it"
        )
    for row in stored["rows"]:
        row.setdefault("measured", stored["machine"])
    return stored


COLUMNS = [
    ("name", "estimator", "s"),
    ("images", "images / estimate", "d"),
    ("bias_se", "bias (SE)", ".2f"),
    ("along_z", "z along gradient", ".1f"),
    ("along_share", "bias along gradient (share)", ".2f"),
    ("along_share_se", "its SE", ".2f"),
    ("max_abs_z", "max abs z", ".1f"),
    ("variance", "total variance", ".3g"),
    ("variance_se", "its SE", ".2g"),
    ("mse", "MSE to the true gradient", ".3g"),
    ("cosine", "cosine of mean", ".3f"),
    ("mean_cosine", "mean single cosine", ".3f"),
    ("time_s", "time / estimate (s, median)", ".3f"),
    ("activation_mb", "activation MB", ".1f"),
    ("mse_time_vs_truncated", "MSE x s / truncated K=1's", ".3g"),
    ("mse_time_vs_full", "MSE x s / full backprop's", ".3g"),
]


def draw_prompts(row_name: str, estimator, prompts: list[str], slices: list[list[str]]) -> list[str]:
    """The captions of one estimate of a row (what its cost is measured on)."""
    if row_name == GROUP_REFERENCE:
        return slices[0] * GROUP_SIZE
    return slices[0] if estimator.group_size > 1 else prompts


def time_rows(
    module, rows: list[dict], made: dict, prompts: list[str], slices: list[list[str]], repeats: int
) -> None:
    """Median time of one estimate of every row's estimator, timed round-robin (``interleaved_times``); sets
    ``time_s``, ``time_repeats``, ``times_s`` (every timed estimate) and ``timed`` (machine and date)."""
    jobs = [
        (row["name"], made[row["name"]], draw_prompts(row["name"], made[row["name"]], prompts, slices))
        for row in rows
    ]
    times = interleaved_times(module, jobs, repeats)
    for row in rows:
        row.update(
            time_s=statistics.median(times[row["name"]]),
            time_repeats=repeats,
            times_s=times[row["name"]],
            timed=machine(),
        )
        logger.info(
            "%s: median %.3f s over %d round-robin estimates (%.3f to %.3f)",
            row["name"],
            row["time_s"],
            repeats,
            min(times[row["name"]]),
            max(times[row["name"]]),
        )


def mean_squared_error(samples, reference) -> dict:
    """MSE of one estimate to the true gradient, ``tr Cov(G) + ||bias||^2``, with the squared bias estimated from
    the paired differences to full backprop less its own noise (``||mean d||^2 - tr Cov(d) / N``, at least 0)."""
    diff = samples - reference
    n = diff.shape[0]
    bias_sq = max(float(diff.mean(0).pow(2).sum() - diff.var(0).sum() / n), 0.0)
    return dict(bias_sq=bias_sq, mse=float(samples.var(0).sum()) + bias_sq)


def efficiency(rows: list[dict]) -> None:
    """``MSE x seconds`` of every row relative to truncated backprop K=1's and full backprop's (when measured):
    below 1, the row reaches a given accuracy in less time (for the biased rows MSE keeps their bias)."""
    by_name = {row["name"]: row for row in rows}
    for key, ref in (("mse_time_vs_truncated", "truncated K=1"), ("mse_time_vs_full", "full backprop")):
        base = by_name.get(ref)
        for row in rows:
            ok = (
                base
                and row.get("mse") is not None
                and base.get("mse")
                and row.get("time_s")
                and base.get("time_s")
            )
            row[key] = row["mse"] * row["time_s"] / (base["mse"] * base["time_s"]) if ok else None


def recommended_estimator(recommendation: dict):
    return RLR(h=2, tail=recommendation["tail"], step_baseline=recommendation["step_baseline"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problem", choices=("world", "tiny"), default="world")
    parser.add_argument(
        "--sampler",
        choices=tuple(SAMPLERS),
        default="world",
        help="world: the world's leading spacing with guidance 3 (estimator_quality_world.json); "
        "quickstart: the quickstart's trailing spacing without guidance "
        "(estimator_quality_world_trailing.json)",
    )
    parser.add_argument("--model", default=WORLD_MODEL, help="world pipeline: a model name or directory")
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument(
        "--draws",
        type=int,
        default=DEFAULT_DRAWS,
        help="estimates per estimator, N (default %(default)s: heavy-tailed likelihood-ratio "
        "variances are understated by fewer)",
    )
    parser.add_argument(
        "--direction-draws",
        type=int,
        default=DEFAULT_DRAWS,
        help="full-backprop draws (other than the compared ones) whose mean gives the true-gradient "
        "direction of the 'z along gradient' column (default %(default)s)",
    )
    parser.add_argument(
        "--map-draws",
        type=int,
        default=24,
        help="draws of the variance map (seed 1: other draws than the compared ones) whose "
        f"recommendation the row {RECOMMENDED!r} measures, as `rlr diagnose` would give it (default "
        "%(default)s)",
    )
    parser.add_argument(
        "--no-step-table",
        action="store_true",
        help="skip the per-step variance table (a variance map on the compared draws)",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--estimators",
        nargs="+",
        choices=NAMES,
        default=None,
        metavar="NAME",
        help="run only these rows and merge them into the stored results of the same settings "
        f"(default: {len(DEFAULT_ROWS)} rows); names: {', '.join(repr(n) for n in NAMES)}",
    )
    parser.add_argument(
        "--time-repeats",
        type=int,
        default=TIME_REPEATS,
        help="timed estimates per estimator, round-robin; the time column is their median",
    )
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="only re-time the stored rows of the same problem, model, steps and batch (or the "
        "--estimators among them) and rewrite their time columns; run it on a quiet machine",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS,
        help="where the results JSON is read (merging, --timing-only) and written (default: %(default)s)",
    )
    args = parser.parse_args()
    if args.draws < 2 or args.direction_draws < 1 or args.map_draws < 4:
        parser.error(
            f"--draws must be >= 2 (bias and variance need several draws), --direction-draws >= 1 and "
            f"--map-draws >= 4, got {args.draws}, {args.direction_draws} and {args.map_draws}"
        )
    if args.time_repeats < 1:
        parser.error(f"--time-repeats must be >= 1, got {args.time_repeats}")
    made = dict(estimators(args.num_steps))
    group_rows = [n for n, e in made.items() if (e is not None and e.group_size > 1) or n == GROUP_REFERENCE]
    if args.batch % GROUP_SIZE and args.estimators and set(args.estimators) & set(group_rows):
        parser.error(
            f"--batch must be a multiple of the group rows' G = {GROUP_SIZE} (they sample batch / G "
            f"captions {GROUP_SIZE} times each), got {args.batch}"
        )
    if args.problem == "world":
        check_world_model(parser, args.model)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    if args.problem == "world":
        # A fixed batch of distinct captions, the same for every draw.
        prompts = random.Random(0).sample(world_prompts(), args.batch)
        module = world_module(FullBackprop(), args.num_steps, model=args.model, **SAMPLERS[args.sampler])
    else:
        prompts = ["cat", "owl", "fox", "whale", "horse", "frog", "bee", "crab"][: args.batch]
        module = tiny_module(FullBackprop(), args.num_steps)
    move_lora_off_init(module, 0.05)
    slices = [] if args.batch % GROUP_SIZE else caption_slices(prompts, GROUP_SIZE)
    name = "estimator_quality" if args.problem == "tiny" else f"estimator_quality_{args.problem}"
    if args.sampler == "quickstart":
        name += "_trailing"
    path = args.results_dir / f"{name}.json"
    settings_keys = ("problem", "sampler", "model", "num_steps", "batch")

    if args.timing_only:
        if not path.is_file():
            parser.error(f"--timing-only: no stored results at {path}; run without --timing-only first")
        stored = json.loads(path.read_text())
        settings = {k: getattr(args, k) for k in settings_keys}
        stored_settings = {k: stored["args"].get(k, "world" if k == "sampler" else None) for k in settings}
        if stored_settings != settings or stored.get("prompts") != prompts:
            parser.error(f"--timing-only: {path} holds a run with other settings ({stored['args']})")
        if "recommendation" in stored:
            made[RECOMMENDED] = recommended_estimator(stored["recommendation"])
        rows = [row for row in stored["rows"] if args.estimators is None or row["name"] in args.estimators]
        time_rows(module, rows, made, prompts, slices, args.time_repeats)
        efficiency(stored["rows"])
        stored["table"] = markdown_table(stored["rows"], COLUMNS)
        stored["timing"] = dict(
            machine=machine(), repeats=args.time_repeats, rows=[row["name"] for row in rows]
        )
        save(name, stored, args.results_dir)
        logger.info("%s\nre-timed %d rows; wrote %s", stored["table"], len(rows), path)
        return

    if slices and args.draws % len(slices):
        logger.warning(
            "--draws %d is not a multiple of %d: the group rows' draws cover the captions unevenly",
            args.draws,
            len(slices),
        )
    settings = {k: getattr(args, k) for k in (*settings_keys, "draws", "direction_draws")}
    selected = args.estimators or DEFAULT_ROWS
    if args.batch % GROUP_SIZE:
        selected = [n for n in selected if n not in group_rows]
    stored = {"rows": []} if args.estimators is None else stored_results(path, settings, prompts)
    kept = [row for row in stored["rows"] if row["name"] not in selected]
    spreads = dict(stored.get("reward_spread", {}))
    references = {}
    direction = true_direction(module, prompts, args.direction_draws)
    extra = {k: stored[k] for k in ("recommendation", "per_step", "per_step_table") if k in stored}
    if RECOMMENDED in selected:
        from rlr_lightning.variance_map import variance_map

        # As a user gets it: `rlr diagnose` on draws of its own (seed 1), then measured on the compared draws.
        vmap = variance_map(module, prompts, args.map_draws, seed=1)
        extra["recommendation"] = dict(
            tail=vmap.tail, step_baseline=vmap.step_baseline, map_draws=args.map_draws, map_table=vmap.table()
        )
        logger.info(
            "rlr diagnose's recommendation (%d draws): tail %d, step baselines %s",
            args.map_draws,
            vmap.tail,
            vmap.step_baseline,
        )
    if "recommendation" in extra:
        made[RECOMMENDED] = recommended_estimator(extra["recommendation"])
    if not args.no_step_table and args.estimators is None:
        from rlr_lightning.variance_map import variance_map

        # Where the variance lives, on the compared draws (seed 0) themselves.
        vmap = variance_map(module, prompts, args.draws, seed=0)
        extra["per_step"] = vmap.to_dict()
        extra["per_step_table"] = vmap.table()
        logger.info("per-step variance (%d draws):\n%s", args.draws, vmap.table())

    def reference(grouped: bool):
        """Full backprop's draws: on the fixed batch, or on the group rows' layout (computed once each); their
        rewards give the reward spread each baseline leaves in the advantages."""
        if grouped not in references:
            sets = [s * GROUP_SIZE for s in slices] if grouped else [prompts]
            references[grouped], rewards = layout_samples(module, sets, FullBackprop(), args.draws)
            key = "group layout" if grouped else "fixed batch"
            spreads[key] = reward_spread(rewards, sets, "group" if grouped else "leave_one_out")
            logger.info(
                "%s: advantage RMS %.3f (%s baseline)",
                key,
                spreads[key]["advantage_rms"],
                spreads[key]["baseline"],
            )
        return references[grouped]

    rows = []
    for row_name, estimator in made.items():
        if row_name not in selected:
            continue
        grouped = estimator.group_size > 1 or row_name == GROUP_REFERENCE
        if row_name == GROUP_REFERENCE:
            samples = reference(True)
        elif grouped:
            samples, _ = layout_samples(module, slices, estimator, args.draws)
        else:
            samples = gradient_samples(module, prompts, estimator, args.draws)
        diag = compare(samples, reference(grouped))
        along = along_gradient(samples, reference(grouped), direction)
        module.estimator = estimator
        estimate_prompts = draw_prompts(row_name, estimator, prompts, slices)
        images = len(estimate_prompts) * estimator.samples_per_prompt
        # How well N draws pin the total variance down (heavy-tailed likelihood-ratio estimates: loosely).
        spread = (samples - samples.mean(0)).pow(2).sum(1)
        variance_se = float(spread.std() / len(spread) ** 0.5)
        rows.append(
            dict(
                name=row_name,
                images=images,
                measured=machine(),
                variance_se=variance_se,
                **vars(diag),
                **along,
                **mean_squared_error(samples, reference(grouped)),
                activation_mb=activation_mb(module, estimate_prompts),
            )
        )
        logger.info(
            "%s: bias %.2f SE, z along gradient %.1f (share %.3f), variance %.3g (SE %.2g), MSE %.3g, "
            "cosine %.3f, %.1f MB",
            row_name,
            diag.bias_se,
            along["along_z"],
            along["along_share"],
            diag.variance,
            variance_se,
            rows[-1]["mse"],
            diag.cosine,
            rows[-1]["activation_mb"],
        )
    time_rows(module, rows, made, prompts, slices, args.time_repeats)
    order = {n: i for i, n in enumerate(NAMES)}
    rows = sorted(kept + rows, key=lambda row: order.get(row["name"], len(order)))
    efficiency(rows)
    table = markdown_table(rows, COLUMNS)
    reference_mean = references[False].mean(0) if False in references else None
    direction_cosine = (
        float(torch.nn.functional.cosine_similarity(direction, reference_mean, dim=0))
        if reference_mean is not None
        else None
    )
    args_record = {k: v for k, v in vars(args).items() if k != "results_dir"}
    path = save(
        name,
        dict(
            machine=machine(),
            args=args_record,
            prompts=prompts,
            rows=rows,
            table=table,
            reward_spread=spreads,
            direction_cosine=direction_cosine,
            **extra,
            timing=dict(machine=machine(), repeats=args.time_repeats, rows=[r["name"] for r in rows]),
        ),
        args.results_dir,
    )
    logger.info(
        "%s\nthe true-gradient direction (%d other draws) has cosine %s to the mean of the compared "
        "reference draws\nwrote %s",
        table,
        args.direction_draws,
        direction_cosine,
        path,
    )


if __name__ == "__main__":
    main()
