"""The world model's own samples, labelled by the exact checker: what a count reward must read right.

A counter trained on clean renders only can be fooled: a generator tuned against it learns pixels that the
network counts as the asked number while the checker does not (issue 21: full backprop raised the count
reward while held-out count accuracy fell). :func:`model_counting_set` samples a world pipeline (the base, or a
LoRA at some strength) under given sampler settings and labels every image with the checker's count of
*every* palette colour, so the counter learns the checker's reading of specks, merged and faint shapes.

Images are stored as 8-bit pixels (what a PNG holds) and labelled *after* quantisation, so an image and its
counts always agree. ``python -m rlr_lightning.world.model_samples`` writes a set to a ``.pt`` file (images
``uint8 (N, 3, S, S)``, counts ``(N, len(PALETTE))``, captions and the settings that made them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rlr_lightning.world.checker import COLOR_THRESHOLD, MIN_AREA, MIN_INTENSITY, _blobs, color_labels
from rlr_lightning.world.scenes import PALETTE, caption, split_specs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerSettings:
    """How a world pipeline is sampled (the ``model:`` sampler keys of a config)."""

    num_steps: int = 20
    eta: float = 0.0
    guidance_scale: float = 3.0
    timestep_spacing: str | None = None

    def __str__(self) -> str:
        spacing = f", {self.timestep_spacing}" if self.timestep_spacing else ""
        return f"{self.num_steps} steps, eta {self.eta:g}, guidance {self.guidance_scale:g}{spacing}"


def checker_counts(
    images: Tensor,
    color_threshold: float = COLOR_THRESHOLD,
    min_intensity: float = MIN_INTENSITY,
    min_area: float = MIN_AREA,
) -> Tensor:
    """The exact checker's number of shapes of every palette colour, ``(B, len(PALETTE))`` float32: the
    components that :func:`rlr_lightning.world.checker.check` counts, for every colour at once."""
    labels = color_labels(images, color_threshold, min_intensity).numpy()
    return torch.tensor(
        [[len(blobs) for blobs in _blobs(image, min_area).values()] for image in labels], dtype=torch.float32
    ).reshape(len(labels), len(PALETTE))


def quantize(images: Tensor) -> Tensor:
    """Images in [0, 1] as 8-bit pixels ``uint8`` (rounded, as a PNG would store them)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def split_captions(split: str) -> list[str]:
    """Every caption of the world's ``train`` or ``held_out`` split."""
    train, held_out = split_specs()
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    return [caption(spec) for spec in (train if split == "train" else held_out)]


def scale_lora(backbone, strength: float) -> None:
    """Scale a loaded LoRA's update by ``strength`` (its B matrices; 0 is the base model, 1 the LoRA as
    trained, above 1 an exaggerated one)."""
    with torch.no_grad():
        for name, parameter in backbone.lora_parameters().items():
            if "lora_B" in name:
                parameter.mul_(strength)


@torch.no_grad()
def model_counting_set(
    pipeline: str | os.PathLike,
    captions: Sequence[str],
    settings: SamplerSettings,
    seed: int,
    lora: str | os.PathLike | None = None,
    lora_strength: float = 1.0,
    batch_size: int = 64,
) -> dict:
    """Sample ``captions`` from ``pipeline`` (with ``lora`` at ``lora_strength``) under ``settings`` from
    sampling seed ``seed``, and label each image with the checker's count of every palette colour.

    Returns ``images`` (``uint8 (N, 3, S, S)``), ``counts`` (``(N, len(PALETTE))``), ``captions`` and
    ``source`` (the settings, LoRA, strength and seed, for the record)."""
    from rlr_lightning.builtin import resolve_model
    from rlr_lightning.models import load_backbone
    from rlr_lightning.sampling import Plan

    backbone = load_backbone(resolve_model(str(pipeline)), local_files_only=True)
    if lora is not None:
        backbone.load_lora(resolve_model(str(lora)))
        scale_lora(backbone, lora_strength)
    sampler = backbone.make_sampler(
        settings.num_steps, settings.eta, settings.guidance_scale, settings.timestep_spacing
    )
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        embeds = backbone.encode_prompts(chunk, negative=sampler.uses_guidance)
        images.append(
            quantize(backbone.decode(sampler.run(Plan(sampler.num_steps), embeds, generator=generator).final))
        )
    pixels = torch.cat(images)
    source = dict(
        asdict(settings),
        pipeline=str(pipeline),
        lora=None if lora is None else str(lora),
        lora_strength=lora_strength,
        seed=seed,
    )
    return dict(
        images=pixels, counts=checker_counts(pixels.float() / 255), captions=list(captions), source=source
    )


def merge_sets(sets: Sequence[dict]) -> dict:
    """One set from several :func:`model_counting_set` results (``sources`` lists each one's record and
    ``source_index`` says which record every image came from)."""
    return dict(
        images=torch.cat([s["images"] for s in sets]),
        counts=torch.cat([s["counts"] for s in sets]),
        captions=[text for s in sets for text in s["captions"]],
        sources=[s["source"] for s in sets],
        source_index=torch.cat([torch.full((len(s["captions"]),), i) for i, s in enumerate(sets)]),
    )


def load_sets(paths: Sequence[str | os.PathLike]) -> dict:
    """The sets saved at ``paths`` by ``python -m rlr_lightning.world.model_samples``, merged."""
    loaded = []
    for path in paths:
        data = torch.load(path, weights_only=True)
        if "source" in data:  # one set: give it the merged layout
            data = merge_sets([data])
        loaded.append(data)
    sources = [record for data in loaded for record in data["sources"]]
    offsets = np.cumsum([0] + [len(data["sources"]) for data in loaded])
    return dict(
        images=torch.cat([data["images"] for data in loaded]),
        counts=torch.cat([data["counts"] for data in loaded]),
        captions=[text for data in loaded for text in data["captions"]],
        sources=sources,
        source_index=torch.cat([data["source_index"] + int(offset) for data, offset in zip(loaded, offsets)]),
    )


def save_png_set(samples: dict, directory: str | os.PathLike, columns: int = 16) -> Path:
    """Write labelled samples as ``images.png`` (a grid, ``columns`` images a row, lossless) and ``labels.json``
    (captions, checker counts, sources): small enough to ship with tests, and viewable."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images = samples["images"]
    n, _, size, _ = images.shape
    rows = -(-n // columns)
    grid = torch.zeros(3, rows * size, columns * size, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[:, r * size : (r + 1) * size, c * size : (c + 1) * size] = images[i]
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(directory / "images.png")
    labels = dict(
        size=size,
        columns=columns,
        captions=samples["captions"],
        counts=samples["counts"].tolist(),
        sources=samples.get("sources"),
        source_index=samples.get("source_index", torch.zeros(n)).tolist(),
    )
    (directory / "labels.json").write_text(json.dumps(labels, indent=None))
    return directory


def load_png_set(directory: str | os.PathLike) -> dict:
    """Samples written by :func:`save_png_set`, in the layout of :func:`merge_sets`."""
    from PIL import Image

    directory = Path(directory)
    labels = json.loads((directory / "labels.json").read_text())
    grid = torch.from_numpy(np.array(Image.open(directory / "images.png").convert("RGB"))).permute(2, 0, 1)
    size, columns = labels["size"], labels["columns"]
    images = torch.stack(
        [
            grid[
                :,
                (i // columns) * size : (i // columns + 1) * size,
                (i % columns) * size : (i % columns + 1) * size,
            ]
            for i in range(len(labels["captions"]))
        ]
    )
    return dict(
        images=images.contiguous(),
        counts=torch.tensor(labels["counts"]),
        captions=labels["captions"],
        sources=labels["sources"],
        source_index=torch.tensor(labels["source_index"], dtype=torch.long),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rlr_lightning.world.model_samples", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help=".pt file to write the labelled samples to")
    parser.add_argument(
        "--pipeline", default="shapes-world", help="world pipeline directory (default shapes-world)"
    )
    parser.add_argument("--lora", default=None, help="LoRA to sample with (directory or file)")
    parser.add_argument(
        "--lora-strengths",
        type=float,
        nargs="+",
        default=[1.0],
        help="scales of the LoRA's update, one pass each (default 1)",
    )
    parser.add_argument("--split", choices=("train", "held_out"), default="train")
    parser.add_argument("--samples-per-caption", type=int, default=1)
    parser.add_argument(
        "--sampler",
        nargs=4,
        action="append",
        metavar=("STEPS", "ETA", "GUIDANCE", "SPACING"),
        help="sampler settings, repeatable (SPACING: leading, trailing, linspace or default); "
        "default: 20 0 3 default",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling seed of the first pass (then +1 per pass)"
    )
    args = parser.parse_args(argv)
    if args.samples_per_caption < 1:
        parser.error(f"--samples-per-caption must be >= 1, got {args.samples_per_caption}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    samplers = [
        SamplerSettings(int(steps), float(eta), float(guidance), None if spacing == "default" else spacing)
        for steps, eta, guidance, spacing in (args.sampler or [("20", "0", "3", "default")])
    ]
    texts = [text for text in split_captions(args.split) for _ in range(args.samples_per_caption)]
    sets, seed = [], args.seed
    for settings in samplers:
        for strength in args.lora_strengths if args.lora else [1.0]:
            sets.append(model_counting_set(args.pipeline, texts, settings, seed, args.lora, strength))
            logger.info(
                "%d samples (%s, LoRA %s x %g, seed %d)", len(texts), settings, args.lora, strength, seed
            )
            seed += 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(merge_sets(sets), args.out)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
