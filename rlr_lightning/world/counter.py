"""A small network that counts the shapes of each palette colour in a shapes-world image, and its training.

:class:`CountNetwork` predicts a non-negative *density* per palette colour at every pixel and sums it over
the image: a count is a sum of local evidence, so it does not depend on where the shapes are, and its
gradient reaches every pixel (:class:`rlr_lightning.rewards.WorldCountReward` rewards
``-(predicted - asked)^2``). The convolutions keep the resolution and their dilations widen the receptive
field to 17 px, more than a large shape (9 px at 32 px) with its blurred rim. The network reads images at a
fixed working resolution (``resolution``, 32 px): larger images are area-averaged down to it first, which is
how the world's renderer anti-aliases, so a 64 px image counts as its 32 px render does.

:func:`train_counter` trains it on freshly rendered world scenes (0 to 4 shapes of each colour, counted from
the scene itself, plus a few empty images), each drawn with a random degradation -- Gaussian blur, colour
mixing and intensity scaling, pixel noise -- and, with ``model_samples``, on a world model's own samples
labelled by the exact checker (:mod:`rlr_lightning.world.model_samples`). It saves with the Hub mixin's
``save_pretrained`` (``config.json`` + ``model.safetensors``); ``CountNetwork.from_pretrained`` loads it back.

The packaged counter (:data:`PRETRAINED_COUNTER`, built by ``python benchmarks/build_counter.py``) reads each
colour's soft checker mask through shared weights (``inputs="mask_per_colour"``) and was trained on 13,248
samples of ``shapes-world`` (base and LoRA-tuned, five samplers) besides renders: on 2,016 held-out model
samples its rounded count of the asked colour is the checker's for 97.1% of them (a counter trained on
renders only: 78.5%, and a generator tuned against it learns to paint what it miscounts). ``docs/world.md``
has the measurements.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from rlr_lightning.world.checker import soft_color_masks
from rlr_lightning.world.scenes import PALETTE, Scene, all_specs, render, sample_scene

logger = logging.getLogger(__name__)

#: The counter shipped with the package (trained by ``train_counter`` with its defaults).
PRETRAINED_COUNTER = Path(__file__).parent / "pretrained" / "counter"
#: What a counter can read (:class:`CountNetwork`'s ``inputs``).
INPUTS = ("rgb", "rgb_masks", "mask_per_colour")
#: The command that builds a counter directory (named in the error for a missing one).
TRAIN_COMMAND = "python -m rlr_lightning.world.counter --out"

_CARD = """
---
{{ card_data }}
---

Counter network of rlr_lightning's procedural shapes world: the number of shapes of each palette colour
(red, green, blue, yellow, white) in a `(B, 3, H, W)` image in [0, 1]. Load it with
`rlr_lightning.world.counter.CountNetwork.from_pretrained(DIR)`; train one with
`python -m rlr_lightning.world.counter --out DIR` (the packaged one: `python benchmarks/build_counter.py --out DIR` in
the rlr_lightning repository).
"""


class CountNetwork(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="rlr_lightning",
    tags=["shapes-world", "counting"],
    model_card_template=_CARD,
):
    """Counts the shapes of each palette colour: ``(B, 3, H, W)`` images in [0, 1] to ``(B, len(PALETTE))``
    non-negative counts, in :data:`~rlr_lightning.world.scenes.PALETTE` order. Differentiable.

    A stack of 3x3 convolutions that keep the resolution (each followed by batch normalisation, whose running
    statistics make it a fixed affine map in eval mode, and a ReLU), then a 1x1 convolution to one softplus
    density per colour, summed over the pixels.

    Args:
        channels: Width of the hidden convolutions.
        dilations: Dilation of each hidden 3x3 convolution; the receptive field is ``1 + 2 * sum(dilations)``
            pixels at the working resolution (17 for the default) and should exceed a large shape with its
            blurred rim.
        resolution: Working resolution in pixels: images of another size are resized so their longer side
            has this many pixels (area-averaged when shrinking) before counting.
        inputs: What the convolutions read. ``rgb``: the image. ``rgb_masks``: the image and the checker's colour
            decision, softened (:func:`~rlr_lightning.world.checker.soft_color_masks`), 5 more channels.
            ``mask_per_colour``: each colour's soft mask alone, through the same weights for every colour (the
            checker counts a colour from its own pixels only): the network learns which regions the checker
            counts as shapes (its area threshold, merged and fragmented shapes), once for all colours, from five
            times the examples, and cannot confuse one colour's count with another's.
    """

    def __init__(
        self,
        channels: int = 16,
        dilations: Sequence[int] = (1, 1, 2, 4),
        resolution: int = 32,
        inputs: str = "rgb",
    ) -> None:
        super().__init__()
        dilations = [int(d) for d in dilations]
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if not dilations or min(dilations) < 1:
            raise ValueError(f"dilations must be a non-empty list of integers >= 1, got {dilations}")
        if resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, got {resolution}")
        self.resolution = resolution
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
        self.inputs = inputs
        layers: list[nn.Module] = []
        width = {"rgb": 3, "rgb_masks": 3 + len(PALETTE), "mask_per_colour": 1}[inputs]
        for dilation in dilations:
            # Batch normalisation: without it 1500 steps reached 72 % count accuracy; with it, 99.6 % in 1000.
            layers += [
                nn.Conv2d(width, channels, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            ]
            width = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, 1 if inputs == "mask_per_colour" else len(PALETTE), 1)
        # Start near zero counts (softplus(-6) * 32 * 32 = 2.5 per colour) rather than hundreds: the
        # background, most of every image, must learn to contribute nothing.
        assert self.head.bias is not None  # a Conv2d made with its bias
        nn.init.constant_(self.head.bias, -6.0)

    def density(self, images: Tensor) -> Tensor:
        """Shapes per pixel of each colour ``(B, len(PALETTE), h, w)`` at the working resolution."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"CountNetwork takes images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}"
            )
        images = images.to(self.head.weight.dtype)
        height, width = images.shape[-2:]
        scale = self.resolution / max(height, width)
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            # Area averaging is the renderer's anti-aliasing: a 64 px render shrinks to its 32 px one.
            images = F.interpolate(images, size=size, mode="area" if scale < 1 else "bilinear")
        if self.inputs == "rgb_masks":
            images = torch.cat([images, soft_color_masks(images.clamp(0, 1))], dim=1)
        elif self.inputs == "mask_per_colour":
            masks = soft_color_masks(images.clamp(0, 1))  # (B, K, h, w): one single-channel image per colour
            b, k, h, w = masks.shape
            density = F.softplus(self.head(self.features(masks.reshape(b * k, 1, h, w))))
            return density.reshape(b, k, h, w)
        return F.softplus(self.head(self.features(images)))

    def forward(self, images: Tensor) -> Tensor:
        """Predicted number of shapes of each palette colour, ``(B, len(PALETTE))``."""
        return self.density(images).sum(dim=(2, 3))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True, **kwargs):
        # A local directory loads without the mixin's console line and strictly (a missing or unexpected
        # tensor is an error, not a silently untrained layer); Hub repository ids take the mixin's path.
        if os.path.isdir(model_id):
            hub_options = ("revision", "cache_dir", "force_download", "local_files_only", "token")
            model = cls(**{k: v for k, v in kwargs.items() if k not in hub_options})
            weights = os.path.join(model_id, "model.safetensors")
            return cls._load_as_safetensor(model, weights, map_location, strict)
        return super()._from_pretrained(model_id=model_id, map_location=map_location, strict=strict, **kwargs)


def load_counter(directory: str | os.PathLike | None = None) -> CountNetwork:
    """The counter saved in ``directory`` (None: the packaged :data:`PRETRAINED_COUNTER`), in eval mode.

    Raises:
        FileNotFoundError: naming the directory and the command that builds a counter there.
    """
    path = Path(directory).expanduser() if directory is not None else PRETRAINED_COUNTER
    missing = [name for name in ("config.json", "model.safetensors") if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"no counter network at {path} (missing {', '.join(missing)}); "
            f"build one with: {TRAIN_COMMAND} {path}"
        )
    return CountNetwork.from_pretrained(path).eval()


def scene_counts(scene: Scene) -> Tensor:
    """Number of shapes of each palette colour in ``scene``, ``(len(PALETTE),)`` float32."""
    colours = list(PALETTE)
    counts = torch.zeros(len(colours))
    for shape in scene.shapes:
        counts[colours.index(shape.color)] += 1
    return counts


def sample_counting_set(
    num_scenes: int, generator: torch.Generator, image_size: int = 32, empty_fraction: float = 0.03
) -> tuple[Tensor, Tensor]:
    """Rendered world scenes ``(N, 3, S, S)`` and their true counts per colour ``(N, len(PALETTE))``.

    Each scene is drawn for a caption chosen uniformly among all 360 combinations, with 0 to 3 distractors of
    other colours (so every colour appears 0 to 4 times); ``empty_fraction`` of the images are black (nothing
    drawn, as a generator may produce).
    """
    specs = all_specs()
    images, counts = [], []
    for _ in range(num_scenes):
        if torch.rand((), generator=generator).item() < empty_fraction:
            scene = Scene(())
        else:
            spec = specs[int(torch.randint(len(specs), (), generator=generator))]
            distractors = int(torch.randint(4, (), generator=generator))
            scene = sample_scene(spec, generator, max_distractors=distractors)
        images.append(render(scene, image_size))
        counts.append(scene_counts(scene))
    return torch.stack(images), torch.stack(counts)


def gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """Each image ``(N, C, H, W)`` blurred by a Gaussian of its own standard deviation ``sigmas[i]`` (pixels;
    0 leaves it as it is), the world's black background continuing past the edges."""
    n, c, height, width = images.shape
    radius = max(1, math.ceil(2.5 * float(sigmas.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    # A per-image kernel in one grouped convolution: torchvision's blur takes one sigma per call, and a call
    # per image costs more than the network's whole training step.
    variances = sigmas.clamp_min(1e-3).to(images.dtype).square().view(-1, 1)
    kernels = torch.exp(-offsets.square() / (2 * variances))
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    flat = images.reshape(1, n * c, height, width)
    flat = F.conv2d(flat, kernels.view(n * c, 1, -1, 1), padding=(radius, 0), groups=n * c)
    flat = F.conv2d(flat, kernels.view(n * c, 1, 1, -1), padding=(0, radius), groups=n * c)
    return flat.reshape(n, c, height, width)


def degrade(
    images: Tensor,
    generator: torch.Generator,
    *,
    max_blur: float = 1.2,
    max_noise: float = 0.08,
    color_jitter: float = 0.1,
    clean_fraction: float = 0.25,
) -> Tensor:
    """Random stand-ins for a generator's pixels: per image, a Gaussian blur of sigma up to ``max_blur`` px,
    a colour transform (each channel scaled by ``1 +- color_jitter``, mixed into the others by up to
    ``color_jitter / 2``, the whole image by an intensity in [0.7, 1.05]) and Gaussian noise of standard
    deviation up to ``max_noise``; ``clean_fraction`` of the images are left untouched. Clamped to [0, 1]."""
    n = images.shape[0]
    uniform = lambda *shape: torch.rand(shape, generator=generator)  # noqa: E731
    out = gaussian_blur(images, uniform(n) * max_blur)
    mixing = torch.diag_embed(1 + color_jitter * (2 * uniform(n, 3) - 1))
    mixing = mixing + (color_jitter / 2) * (2 * uniform(n, 3, 3) - 1) * (1 - torch.eye(3))
    intensity = 0.7 + 0.35 * uniform(n, 1, 1, 1)
    out = torch.einsum("bij,bjhw->bihw", mixing, out) * intensity
    out = out + max_noise * uniform(n, 1, 1, 1) * torch.randn(out.shape, generator=generator)
    clean = uniform(n) < clean_fraction
    out[clean] = images[clean]
    return out.clamp(0.0, 1.0)


def count_accuracy(network: CountNetwork, images: Tensor, counts: Tensor, batch_size: int = 256) -> Tensor:
    """Fraction of (image, colour) pairs whose rounded predicted count equals the true count, per colour."""
    with torch.no_grad():
        chunks = [network(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        predicted = torch.cat(chunks)
    return (predicted.round() == counts).float().mean(dim=0)


def checker_agreement(network: CountNetwork, samples: dict, batch_size: int = 256) -> dict[str, float]:
    """How often the counter's rounded count equals the exact checker's on labelled model samples
    (:mod:`rlr_lightning.world.model_samples`): ``asked`` (the caption's colour, what the count reward reads)
    and ``all_colours`` (every (image, colour) pair); ``n`` images."""
    from rlr_lightning.world.scenes import parse_caption

    images, counts = samples["images"], samples["counts"]
    with torch.no_grad():
        predicted = torch.cat(
            [network(images[i : i + batch_size].float() / 255) for i in range(0, len(images), batch_size)]
        )
    right = predicted.round() == counts
    colours = list(PALETTE)
    asked = torch.tensor([colours.index(parse_caption(text).color) for text in samples["captions"]])
    return dict(
        asked=float(right[torch.arange(len(asked)), asked].float().mean()),
        all_colours=float(right.float().mean()),
        n=len(images),
    )


def train_counter(
    out: str | os.PathLike,
    steps: int = 1500,
    seed: int = 0,
    *,
    num_scenes: int = 3000,
    batch_size: int = 32,
    lr: float = 6e-3,
    channels: int = 16,
    dilations: Sequence[int] = (1, 1, 2, 4),
    validation_scenes: int = 500,
    inputs: str = "rgb",
    model_samples: Sequence[str | os.PathLike] = (),
    model_fraction: float = 0.5,
) -> Path:
    """Train a :class:`CountNetwork` on the shapes world and save it at ``out`` (``save_pretrained``);
    returns ``out``.

    The scenes (``num_scenes``, 32 px) are rendered once; every step draws a batch of them, mirrored
    left-right at random (the world's triangles point up, so no vertical flips) and degraded by
    :func:`degrade`. The loss is the squared error of the counts (what the reward measures), with Adam on a
    cosine learning-rate schedule. ``validation_scenes`` fresh scenes (another seed) measure the
    rounded-count accuracy at the end.

    Args:
        out: Directory to save the network in.
        steps: Optimizer steps.
        seed: Seed of the weights, the scenes and the augmentations.
        num_scenes: Scenes rendered for training.
        batch_size: Images per step.
        lr: Peak learning rate.
        channels: Width of the network's hidden convolutions.
        dilations: Dilations of its hidden convolutions.
        validation_scenes: Held-out scenes for the final accuracy (0 skips it).
        model_samples: Files of a world model's own samples labelled by the exact checker
            (``python -m rlr_lightning.world.model_samples``); each batch then holds ``model_fraction`` of them
            (mirrored at random, not degraded: they are the pixels the reward will read).
        model_fraction: Share of each batch drawn from ``model_samples``.
        inputs: What the network reads (see :class:`CountNetwork`); ``mask_per_colour`` also trains on the
            images rotated by quarter turns and mirrored vertically (the checker's count is invariant to them).
    """
    if steps < 1 or num_scenes < 1 or batch_size < 1:
        raise ValueError(
            f"steps, num_scenes and batch_size must be >= 1, got {steps}, {num_scenes} and {batch_size}"
        )
    start = time.monotonic()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    network = CountNetwork(channels=channels, dilations=dilations, inputs=inputs)
    # Channels-last convolutions train about 30 % faster on a CPU; the weights go back to the default layout
    # before saving (safetensors stores contiguous tensors).
    network = network.to(memory_format=torch.channels_last)
    images, counts = sample_counting_set(num_scenes, generator)
    logger.info("rendered %d counting scenes in %.0f s", num_scenes, time.monotonic() - start)
    model_images = model_counts = None
    from_model = 0
    if model_samples:
        from rlr_lightning.world.model_samples import load_sets

        if not 0.0 < model_fraction < 1.0:
            raise ValueError(f"model_fraction must be in (0, 1) with model_samples, got {model_fraction}")
        loaded = load_sets(model_samples)
        model_images, model_counts = loaded["images"], loaded["counts"]
        from_model = round(batch_size * model_fraction)
        logger.info(
            "%d model samples from %d sources, %d per batch",
            len(model_images),
            len(loaded["sources"]),
            from_model,
        )
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    network.train()
    for step in range(steps):
        index = torch.randint(num_scenes, (batch_size - from_model,), generator=generator)
        batch, target = degrade(images[index], generator), counts[index]
        if from_model:
            assert model_images is not None and model_counts is not None  # loaded with model_samples
            picked = torch.randint(len(model_images), (from_model,), generator=generator)
            batch = torch.cat([batch, model_images[picked].float() / 255])
            target = torch.cat([target, model_counts[picked]])
        flip = torch.rand(batch_size, generator=generator) < 0.5
        batch[flip] = batch[flip].flip(-1)
        if inputs == "mask_per_colour":  # no kind of shape is read, so upside-down triangles count the same
            batch = torch.rot90(batch, int(torch.randint(4, (), generator=generator)), dims=(2, 3))
        loss = F.mse_loss(network(batch.contiguous(memory_format=torch.channels_last)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            logger.info("counter step %d/%d: squared count error %.4f", step + 1, steps, loss.item())
    network = network.to(memory_format=torch.contiguous_format).eval()
    if validation_scenes > 0:
        held_out = torch.Generator().manual_seed(seed + 1)
        held_images, held_counts = sample_counting_set(validation_scenes, held_out)
        accuracy = count_accuracy(network, held_images, held_counts)
        logger.info(
            "held-out rounded-count accuracy: %s",
            ", ".join(f"{colour} {value:.3f}" for colour, value in zip(PALETTE, accuracy.tolist())),
        )
    out = Path(out)
    network.save_pretrained(out)
    logger.info("counter saved to %s after %.0f s", out, time.monotonic() - start)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rlr_lightning.world.counter", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to save the counter network in")
    parser.add_argument(
        "--steps", type=int, default=1500, help="optimizer steps (default 1500: a minute on one CPU thread)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, scenes and augmentations")
    parser.add_argument("--scenes", type=int, default=3000, help="training scenes rendered (default 3000)")
    parser.add_argument(
        "--validation-scenes",
        type=int,
        default=500,
        help="fresh scenes for the final accuracy (default 500; 0 skips it)",
    )
    parser.add_argument(
        "--model-samples",
        type=Path,
        nargs="+",
        default=[],
        metavar="FILE",
        help="a world model's samples labelled by the checker (python -m "
        "rlr_lightning.world.model_samples), mixed into every batch",
    )
    parser.add_argument(
        "--model-fraction",
        type=float,
        default=0.5,
        help="share of each batch drawn from --model-samples (default 0.5)",
    )
    parser.add_argument(
        "--channels", type=int, default=16, help="width of the hidden convolutions (default 16)"
    )
    parser.add_argument(
        "--dilations",
        type=int,
        nargs="+",
        default=[1, 1, 2, 4],
        help="dilations of the hidden convolutions, one layer each (default 1 1 2 4)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    parser.add_argument(
        "--inputs",
        choices=INPUTS,
        default="rgb",
        help="what the network reads: the image (rgb), the image and the checker's soft colour masks "
        "(rgb_masks), or each colour's mask alone through shared weights (mask_per_colour)",
    )
    args = parser.parse_args(argv)
    for option, value, least in (
        ("--steps", args.steps, 1),
        ("--scenes", args.scenes, 1),
        ("--validation-scenes", args.validation_scenes, 0),
    ):
        if value < least:
            parser.error(f"{option} must be >= {least}, got {value}")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; give a directory (it is created if missing)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train_counter(
        args.out,
        steps=args.steps,
        seed=args.seed,
        num_scenes=args.scenes,
        validation_scenes=args.validation_scenes,
        model_samples=args.model_samples,
        model_fraction=args.model_fraction,
        channels=args.channels,
        dilations=tuple(args.dilations),
        batch_size=args.batch_size,
        inputs=args.inputs,
    )


if __name__ == "__main__":
    main()
