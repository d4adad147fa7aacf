"""How well a pipeline's samples follow shapes-world captions: colour, count and position accuracy by the exact
checker, on captions of one split (held-out by default: combinations never seen in training).

The command is ``rlr eval`` (:mod:`rlr_lightning.eval_cli`); it samples with the project's own sampler, decodes,
and checks the pixels, over several sampling seeds (:func:`evaluate_seeds`), reporting each seed's accuracies
and their mean with its standard error over the seeds.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlr_lightning.world.checker import CHECKS, check
from rlr_lightning.world.scenes import COUNTS, parse_caption

if TYPE_CHECKING:
    from rlr_lightning.rewards.base import RewardModel

logger = logging.getLogger(__name__)

#: The sampling seeds evaluated when none are given: three, so every reported accuracy has a standard error.
DEFAULT_SEEDS = (0, 1, 2)
#: Count accuracy among the captions asking for each number: ``count_ok@1`` ... ``count_ok@4``.
COUNT_BY_NUMBER = tuple(f"count_ok@{n}" for n in COUNTS)


def _captions(split: str, captions: list[str] | None, samples_per_caption: int) -> list[str]:
    if captions is None:
        from rlr_lightning.world.model_samples import split_captions

        captions = split_captions(split)
    return [text for text in captions for _ in range(samples_per_caption)]


def _load(pipeline, lora, num_steps: int, eta: float, guidance_scale: float, timestep_spacing: str | None):
    """The backbone (with the LoRA loaded, if any) and its sampler: loaded once, sampled for every seed."""
    from rlr_lightning.builtin import resolve_model
    from rlr_lightning.models import load_backbone

    backbone = load_backbone(resolve_model(str(pipeline)), local_files_only=True)
    if lora is not None:
        backbone.load_lora(lora)
    return backbone, backbone.make_sampler(num_steps, eta, guidance_scale, timestep_spacing)


def _sample_and_check(
    backbone, sampler, captions: list[str], seed: int, batch_size: int, reward: RewardModel | None
) -> dict[str, float]:
    from rlr_lightning.sampling import Plan

    generator = torch.Generator().manual_seed(seed)
    totals = dict.fromkeys((*CHECKS, *(("reward",) if reward is not None else ())), 0.0)
    asked = torch.tensor([parse_caption(text).count for text in captions])
    count_ok = torch.zeros(len(captions), dtype=torch.bool)
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        embeds = backbone.encode_prompts(chunk, negative=sampler.uses_guidance)
        images = backbone.decode(sampler.run(Plan(sampler.num_steps), embeds, generator=generator).final)
        result = check(images, chunk)
        for name in CHECKS:
            totals[name] += float(result[name].float().sum())
        count_ok[start : start + len(chunk)] = result["count_ok"]
        if reward is not None:
            totals["reward"] += float(reward(images, chunk).sum())
    by_number = {
        f"count_ok@{n}": float(count_ok[asked == n].float().mean())
        for n in COUNTS
        if bool((asked == n).any())
    }
    return {
        **{name: value / len(captions) for name, value in totals.items()},
        **by_number,
        "n": len(captions),
    }


@torch.no_grad()
def evaluate(
    pipeline: str | Path,
    split: str = "held_out",
    samples_per_caption: int = 1,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 0.0,
    seed: int = 0,
    lora: str | Path | None = None,
    batch_size: int = 64,
    timestep_spacing: str | None = None,
    captions: list[str] | None = None,
    reward: RewardModel | None = None,
) -> dict[str, float]:
    """Sample every caption of ``split`` (or the given ``captions``) from one sampling ``seed`` and return the
    checker's accuracies (``color_ok``, ``count_ok``, ``position_ok``, ``all_ok``), the mean ``reward`` of the
    samples when a reward model is given, and the number of samples ``n``. ``timestep_spacing`` overrides the
    scheduler's (a LoRA samples as trained: pass the spacing, steps, eta and guidance it was trained with).

    One seed is one draw of the sampling noise: report accuracies pooled over several seeds
    (:func:`evaluate_seeds`)."""
    backbone, sampler = _load(pipeline, lora, num_steps, eta, guidance_scale, timestep_spacing)
    return _sample_and_check(
        backbone, sampler, _captions(split, captions, samples_per_caption), seed, batch_size, reward
    )


def pool_seeds(per_seed: Sequence[dict[str, float]], checks: Sequence[str] = CHECKS) -> dict:
    """Pool per-seed results (each as :func:`evaluate` returns them, one per sampling seed); ``checks`` name
    the metrics that are shares of 0/1 verdicts (the image checker's by default).

    Returns a dict with ``mean`` (per metric, the mean of the per-seed values), ``se`` (the standard error of
    that mean over the seeds: sample standard deviation of the per-seed values, ``ddof = 1``, over
    ``sqrt(n_seeds)``; ``None`` for a single seed), ``se_samples`` (for the checker's 0/1 verdicts, the binomial
    standard error ``sqrt(p (1 - p) / n)`` of the pooled share ``p`` over all ``n`` samples, as if every sample
    were independent), ``n_seeds``, ``n_per_seed`` and ``n`` (all samples).

    Which standard error: ``se`` is the one reported. The seed is the unit that is replicated (every sample of
    one seed shares its generator and its captions), and ``se`` needs no assumption about how samples within a
    seed relate; but with 3 seeds it rests on 2 degrees of freedom, so it is itself uncertain (a 95% interval is
    about mean +- 4.3 SE, Student's t). ``se_samples`` is the steadier cross-check; the two should agree to
    within a factor of about 2 when the seeds differ only by sampling noise. Two models evaluated on the same
    seeds and captions see the same noise, so their per-seed differences are paired."""
    if not per_seed:
        raise ValueError("need at least one seed's results")
    k = len(per_seed)
    metrics = [key for key in per_seed[0] if key not in ("n", "seed")]
    mean = {key: statistics.fmean(r[key] for r in per_seed) for key in metrics}
    se = {
        key: statistics.stdev(r[key] for r in per_seed) / math.sqrt(k) if k > 1 else None for key in metrics
    }
    n = sum(int(r["n"]) for r in per_seed)
    se_samples = {key: math.sqrt(mean[key] * (1 - mean[key]) / n) for key in metrics if key in checks}
    return dict(mean=mean, se=se, se_samples=se_samples, n_seeds=k, n_per_seed=int(per_seed[0]["n"]), n=n)


@torch.no_grad()
def evaluate_seeds(
    pipeline: str | Path,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    split: str = "held_out",
    samples_per_caption: int = 1,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 0.0,
    lora: str | Path | None = None,
    batch_size: int = 64,
    timestep_spacing: str | None = None,
    captions: list[str] | None = None,
    reward: RewardModel | None = None,
) -> dict:
    """:func:`evaluate` once per sampling seed (the model loaded once), pooled by :func:`pool_seeds`.

    Returns ``seeds``, ``per_seed`` (each seed's :func:`evaluate` result, with its ``seed``), and the pooled
    ``mean``, ``se`` (standard error of the mean over the seeds: the one to report, with ``n_seeds``),
    ``se_samples``, ``n_seeds``, ``n_per_seed`` and ``n``. Arguments as :func:`evaluate`."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"need distinct seeds, got {seeds}")
    backbone, sampler = _load(pipeline, lora, num_steps, eta, guidance_scale, timestep_spacing)
    texts = _captions(split, captions, samples_per_caption)
    per_seed = [
        dict(_sample_and_check(backbone, sampler, texts, seed, batch_size, reward), seed=seed)
        for seed in seeds
    ]
    return dict(seeds=seeds, per_seed=per_seed, **pool_seeds(per_seed))


def grid_captions(split: str = "held_out", count: int = 24) -> list[str]:
    """``count`` captions spread evenly over ``split``'s (every asked number, colour and place shows up)."""
    from rlr_lightning.world.model_samples import split_captions

    captions = split_captions(split)
    step = max(1, len(captions) // count)
    return captions[::step][:count]


#: Captions per band of a before/after grid, and the gap between bands (pixels).
GRID_BAND, GRID_GAP = 8, 12


def grid_tiles(
    captions: Sequence[str], image_side: int, scale: int = 4
) -> list[dict[str, tuple[int, int, int, int]]]:
    """Per caption, the pixel boxes ``(left, top, right, bottom)`` of its ``before`` and ``after`` images in
    :func:`before_after_grid`'s picture: bands of :data:`GRID_BAND` captions, one under the other, each laid out
    as :class:`~rlr_lightning.callbacks.BeforeAfterGrid` lays out a run's."""
    from rlr_lightning.grids import BeforeAfterLayout

    layout, tiles, top = BeforeAfterLayout(scale=scale), [], 0
    for start in range(0, len(captions), GRID_BAND):
        band = layout.tile_boxes(list(captions[start : start + GRID_BAND]), image_side)
        for before, after in zip(*band):
            tiles.append(
                {
                    name: (box[0], box[1] + top, box[2], box[3] + top)
                    for name, box in (("before", before), ("after", after))
                }
            )
        top += band[1][0][3] + GRID_GAP
    return tiles


@torch.no_grad()
def before_after_grid(
    pipeline: str | Path,
    lora: str | Path,
    captions: Sequence[str],
    seed: int = 0,
    num_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 0.0,
    timestep_spacing: str | None = None,
    scale: int = 4,
):
    """The ``captions`` sampled by the base model and with ``lora`` from the same noise (``seed``): bands of
    :data:`GRID_BAND` captions, each with the base model's images above the LoRA's (the layout of
    :class:`~rlr_lightning.callbacks.BeforeAfterGrid`), every image framed green where the exact checker finds
    every asked attribute right and red where it does not (:func:`grid_tiles` gives the boxes).

    Returns the PIL image and the checker's ``all_ok`` verdicts, ``{"before": [...], "after": [...]}``."""
    from PIL import Image, ImageDraw

    from rlr_lightning.grids import BeforeAfterLayout, to_uint8
    from rlr_lightning.sampling import Plan

    captions = list(captions)
    backbone, sampler = _load(pipeline, lora, num_steps, eta, guidance_scale, timestep_spacing)
    embeds = backbone.encode_prompts(captions, negative=sampler.uses_guidance)

    def draw() -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return backbone.decode(sampler.run(Plan(sampler.num_steps), embeds, generator=generator).final)

    with backbone.lora_disabled():
        before = draw()
    after = draw()
    verdicts = {
        name: check(images, captions)["all_ok"].tolist()
        for name, images in (("before", before), ("after", after))
    }
    layout = BeforeAfterLayout(scale=scale)
    bands = [
        layout.grid(
            to_uint8(before[i : i + GRID_BAND]),
            to_uint8(after[i : i + GRID_BAND]),
            captions[i : i + GRID_BAND],
        )
        for i in range(0, len(captions), GRID_BAND)
    ]
    canvas = Image.new(
        "RGB",
        (max(b.width for b in bands), sum(b.height for b in bands) + GRID_GAP * (len(bands) - 1)),
        "white",
    )
    top = 0
    for band in bands:
        canvas.paste(band, (0, top))
        top += band.height + GRID_GAP
    pen = ImageDraw.Draw(canvas)
    for i, tile in enumerate(grid_tiles(captions, before.shape[-1], scale)):
        for name, (left, top, right, bottom) in tile.items():
            colour = (0, 160, 0) if verdicts[name][i] else (200, 0, 0)
            pen.rectangle((left - 2, top - 2, right + 1, bottom + 1), outline=colour, width=2)
    return canvas, verdicts


if __name__ == "__main__":  # python -m rlr_lightning.world.evaluate: the older form of `rlr eval`
    from rlr_lightning.eval_cli import legacy_main

    legacy_main()
