"""How well a pipeline's samples follow shapes-world captions: colour, count and position accuracy by the exact
checker, on captions of one split (held-out by default: combinations never seen in training).

Run ``python -m rlr_lightning.world.evaluate DIR`` on a pipeline directory (a trained world pipeline, or any
with a LoRA via ``--lora``); it samples with the project's own sampler, decodes, and checks the pixels.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from rlr_lightning.rewards.base import RewardModel
from rlr_lightning.world.checker import CHECKS, check
from rlr_lightning.world.scenes import caption, split_specs

logger = logging.getLogger(__name__)


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
    """Sample every caption of ``split`` (or the given ``captions``) and return the checker's accuracies
    (``color_ok``, ``count_ok``, ``position_ok``, ``all_ok``), the mean ``reward`` of the samples when a reward
    model is given, and the number of samples ``n``. ``timestep_spacing`` overrides the scheduler's (a LoRA
    samples as trained: pass the spacing, steps, eta and guidance it was trained with)."""
    from rlr_lightning.builtin import resolve_model
    from rlr_lightning.models import load_backbone
    from rlr_lightning.sampling import Plan

    if captions is None:
        train, held_out = split_specs()
        captions = [caption(spec) for spec in {"train": train, "held_out": held_out}[split]]
    captions = [text for text in captions for _ in range(samples_per_caption)]
    backbone = load_backbone(resolve_model(str(pipeline)), local_files_only=True)
    if lora is not None:
        backbone.load_lora(lora)
    sampler = backbone.make_sampler(num_steps, eta, guidance_scale, timestep_spacing)
    generator = torch.Generator().manual_seed(seed)
    totals = dict.fromkeys((*CHECKS, *(("reward",) if reward is not None else ())), 0.0)
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        embeds = backbone.encode_prompts(chunk, negative=sampler.uses_guidance)
        images = backbone.decode(sampler.run(Plan(num_steps), embeds, generator=generator).final)
        result = check(images, chunk)
        for name in CHECKS:
            totals[name] += float(result[name].float().sum())
        if reward is not None:
            totals["reward"] += float(reward(images, chunk).sum())
    return {**{name: value / len(captions) for name, value in totals.items()}, "n": len(captions)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlr_lightning.world.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("pipeline", help="pipeline directory, or shapes-world (the shipped model)")
    parser.add_argument("--split", choices=("train", "held_out"), default="held_out")
    parser.add_argument("--samples-per-caption", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--timestep-spacing", choices=("leading", "trailing", "linspace"), default=None,
                        help="override the scheduler's timestep spacing (sample a LoRA as it was trained)")
    parser.add_argument("--lora", default=None, help="LoRA weights to evaluate with (directory or file)")
    parser.add_argument("--json", type=Path, default=None, help="also write the accuracies to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = evaluate(args.pipeline, args.split, args.samples_per_caption, args.steps, args.guidance, args.eta,
                      lora=args.lora, timestep_spacing=args.timestep_spacing)
    logger.info(
        "%s captions, %d samples: colour %.1f%%, count %.1f%%, position %.1f%%, all %.1f%%", args.split,
        result["n"], *(100 * result[name] for name in CHECKS),
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
