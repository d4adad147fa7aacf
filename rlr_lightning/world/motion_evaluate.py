"""How well a video pipeline's samples follow moving-shapes captions: colour, count and motion accuracy by the exact
checker (:func:`rlr_lightning.world.motion.check_motion`), on the captions of one split (held-out by default).

Run ``python -m rlr_lightning.world.motion_evaluate [--lora DIR] [--seeds 0 1 2]``: it samples with the project's
own sampler, decodes every frame and checks the pixels, once per sampling seed, and reports each seed's
accuracies and their mean with its standard error over the seeds (:func:`rlr_lightning.world.evaluate.pool_seeds`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from rlr_lightning.world.evaluate import DEFAULT_SEEDS, pool_seeds
from rlr_lightning.world.motion import MOTION_CHECKS, check_motion, motion_caption, split_motion_specs

logger = logging.getLogger(__name__)

#: The built-in moving-shapes model (:mod:`rlr_lightning.builtin`).
MOTION_MODEL = "moving-shapes"


def motion_split_captions(split: str = "held_out") -> list[str]:
    """The captions of ``split`` (``train`` or ``held_out``) of the default motion split."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    train, held_out = split_motion_specs()
    return [motion_caption(spec) for spec in (train if split == "train" else held_out)]


@torch.no_grad()
def sample_and_check_motion(
    backbone, sampler, captions: Sequence[str], seed: int, batch_size: int = 32
) -> dict[str, float]:
    """Sample ``captions`` from one seed and return the checker's accuracies and the number of samples ``n``."""
    from rlr_lightning.sampling import Plan

    generator = torch.Generator().manual_seed(seed)
    totals = dict.fromkeys(MOTION_CHECKS, 0.0)
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        embeds = backbone.encode_prompts(chunk, negative=sampler.uses_guidance)
        videos = backbone.decode(sampler.run(Plan(sampler.num_steps), embeds, generator=generator).final)
        result = check_motion(videos, chunk)
        for name in MOTION_CHECKS:
            totals[name] += float(result[name].float().sum())
    return {**{name: value / len(captions) for name, value in totals.items()}, "n": len(captions)}


@torch.no_grad()
def evaluate_motion_seeds(
    pipeline: str | Path = MOTION_MODEL,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    split: str = "held_out",
    samples_per_caption: int = 2,
    num_steps: int = 10,
    guidance_scale: float = 3.0,
    eta: float = 0.0,
    lora: str | Path | None = None,
    batch_size: int = 32,
) -> dict:
    """Accuracies of ``pipeline`` (with ``lora``) on ``split``'s captions, once per sampling seed, pooled.

    Returns ``seeds``, ``per_seed`` and the pooled ``mean``, ``se`` (standard error over the seeds: the one to
    report), ``se_samples``, ``n_seeds``, ``n_per_seed`` and ``n`` (:func:`~rlr_lightning.world.evaluate.pool_seeds`).
    A LoRA samples as it was trained: pass the steps, eta and guidance of its run."""
    from rlr_lightning.builtin import resolve_model
    from rlr_lightning.models import load_backbone

    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"need distinct seeds, got {seeds}")
    backbone = load_backbone(resolve_model(str(pipeline)), local_files_only=True)
    if not getattr(backbone, "video", False):
        raise ValueError(
            f"{pipeline} is an image model; the motion checker judges videos (e.g. {MOTION_MODEL})"
        )
    if lora is not None:
        backbone.load_lora(lora)
    sampler = backbone.make_sampler(num_steps, eta, guidance_scale)
    captions = [text for text in motion_split_captions(split) for _ in range(samples_per_caption)]
    per_seed = [
        dict(sample_and_check_motion(backbone, sampler, captions, seed, batch_size), seed=seed)
        for seed in seeds
    ]
    return dict(seeds=seeds, per_seed=per_seed, **pool_seeds(per_seed, checks=MOTION_CHECKS))


def format_pooled(result: dict) -> str:
    """One line per check: the mean over the seeds with its standard error."""
    lines = []
    for name in MOTION_CHECKS:
        mean, se = result["mean"][name], result["se"][name]
        spread = f" +- {100 * se:.1f}" if se is not None else ""
        lines.append(
            f"{name:10s} {100 * mean:5.1f}%{spread} (over {result['n_seeds']} seeds, {result['n']} samples)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rlr_lightning.world.motion_evaluate", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--model", default=MOTION_MODEL, help="video pipeline (default: the built-in moving-shapes)"
    )
    parser.add_argument("--lora", default=None, help="LoRA directory to evaluate (default: the base model)")
    parser.add_argument("--split", default="held_out", choices=("train", "held_out"))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--samples-per-caption", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the full result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result = evaluate_motion_seeds(
        args.model,
        args.seeds,
        args.split,
        args.samples_per_caption,
        args.steps,
        args.guidance,
        args.eta,
        args.lora,
    )
    sys.stdout.write(format_pooled(result) + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
