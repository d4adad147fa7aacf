"""The moving-shapes world: short clips of flat shapes that move in one direction or stay still, their captions,
a train / held-out split of captions, and an exact pixel checker of motion.

It extends the image world of :mod:`rlr_lightning.world.scenes` (same palette, kinds, sizes, black background,
coordinates as fractions of the side with ``x`` right and ``y`` down) to time: each frame of a clip is a
:class:`~rlr_lightning.world.scenes.Scene` drawn by :func:`~rlr_lightning.world.scenes.render`, and the
checker reads each frame with :func:`~rlr_lightning.world.checker.find_blobs`.

**Caption grammar** (lower case; :func:`parse_motion_caption` also accepts other cases and extra spaces)::

    caption := COUNT " " COLOUR " " KIND " " MOTION
    COUNT   := "a" (1) | "two" | "three"
    COLOUR  := "red" | "green" | "blue" | "yellow" | "white"
    KIND    := "circle" | "square" | "triangle"      (with a plural "s" when COUNT is not "a")
    MOTION  := "moving left" | "moving right" | "moving up" | "moving down" | "staying still"

e.g. ``"a red square moving right"``, ``"two blue circles moving up"``, ``"a green triangle staying still"``:
5 x 3 x 3 x 5 = 225 combinations over a vocabulary of 21 words (plurals included). The first three words are
the image world's caption without a region (:func:`~rlr_lightning.world.scenes.caption`); "four" is left out
because four shapes moving together across most of a 17-frame clip leave too little room at 32 px.

**Clips.** A clip holds exactly COUNT shapes of COLOUR, all of KIND (sizes drawn per shape from
:data:`~rlr_lightning.world.scenes.SIZES`), which move *together* (one rigid translation, so they never
overlap or merge) at the constant speed :data:`SPEED` per frame in the asked direction, or do not move for
"staying still". Every shape stays fully inside the frame, at least
:data:`~rlr_lightning.world.scenes.BORDER` from its edges, in every frame. A clip may also hold up to
``max_distractors`` (default 1) *still* shapes of other colours, placed clear of the whole path of the
moving ones. Clips have :data:`CLIP_LENGTHS` frames (9 by default; ``4k + 1`` frames, what Wan's video VAE
takes): 9 frames at speed 0.035 move a shape 0.28 of the side (9 px at 32 px), 17 frames 0.56.

**Meaning and the checker** (:func:`check_motion`). A caption is true of a clip when, in every frame, the clip
holds exactly COUNT shapes of COLOUR (the image checker's colours and 8-connected blobs), and the *track* of
their centroid (the mean of their blob centroids, per frame) has, by a least-squares line over
the frames, a net displacement from the first frame to the last of

* for a direction: at least :data:`MIN_DISPLACEMENT` along it and at most :data:`MAX_CROSS_DISPLACEMENT`
  across it;
* for "staying still": at most :data:`MAX_STILL_DISPLACEMENT` in length.

The thresholds are net displacements over the whole clip, whatever its length. On renders of every caption
(4 seeds at 9 frames) the displacement along the asked direction was at least 0.25 (0.28 asked: blob
centroids shift a little as rims cross pixel boundaries), across it at most 0.012, and "still" clips do not
move at all: the thresholds leave a generated clip about 2 px of drift at 32 px, and a gap between "still"
(up to 0.07) and "moving" (from 0.14) that neither crosses by accident. The checker, like the image one, does
not decide the kind of the shapes; shapes of other colours are not judged. Rewards on clips are in
:mod:`rlr_lightning.rewards.world_video`.

**Split.** :func:`split_motion_specs` holds out a fraction of the 225 combinations (colour, kind, count,
motion), reproducibly by seed, with the rule of :func:`~rlr_lightning.world.scenes.split_specs`: every *pair*
of attribute values (e.g. yellow + triangle, three + moving up, white + staying still) still occurs in
training, so every single value does too, and a held-out caption is a new combination of things seen in
training.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypedDict, get_args

import torch
from torch import Tensor
from torch.utils.data import Dataset

from rlr_lightning.errors import quote_prompt
from rlr_lightning.world.checker import COLOR_THRESHOLD, MIN_AREA, MIN_INTENSITY, find_blobs
from rlr_lightning.world.scenes import (
    BORDER,
    GAP,
    KINDS,
    MAX_SHAPES,
    PALETTE,
    SIZES,
    CaptionSpec,
    Scene,
    Shape,
    Split,
    caption,
    draw_choice,
    item_generator,
    parse_caption,
    render,
)

logger = logging.getLogger(__name__)

Motion = Literal["left", "right", "up", "down", "still"]

#: The motions of the world, in caption order.
MOTIONS: tuple[str, ...] = get_args(Motion)
#: Unit direction of each motion, ``(x, y)`` with ``y`` down (so "up" is ``(0, -1)``); zero for "still".
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "still": (0.0, 0.0),
}
#: Counts of motion captions (the image world's 1 to 3; see the module docstring for why not 4).
MOTION_COUNTS: tuple[int, ...] = (1, 2, 3)
#: Numbers of frames a clip may have (``4k + 1``, what Wan's video VAE encodes); 9 is the default.
CLIP_LENGTHS: tuple[int, ...] = (9, 13, 17)
#: Distance a moving shape covers per frame, a fraction of the side (1.12 px at 32 px).
SPEED = 0.035
#: Least net displacement of a moving clip along the asked direction, a fraction of the side (4.5 px at 32 px;
#: half of what a 9-frame render covers, 0.28).
MIN_DISPLACEMENT = 0.14
#: Largest net displacement of a moving clip across the asked direction (2.2 px at 32 px).
MAX_CROSS_DISPLACEMENT = 0.07
#: Largest net displacement of a "staying still" clip, in length (2.2 px at 32 px).
MAX_STILL_DISPLACEMENT = 0.07
#: Names of the checks :func:`check_motion` returns.
MOTION_CHECKS = ("color_ok", "count_ok", "motion_ok", "all_ok")

# Attempts at placing a clip's shapes with sizes drawn freely, then as many with small shapes only, then as many
# without distractors. Few: three shapes crossing 17 frames (0.56 of the side) have room only when small and
# stacked across the motion.
_ATTEMPTS = 20
# Positions drawn at once for each shape of an attempt.
_CANDIDATES = 50

_MOTION_PHRASES = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "still": "staying still",
}
MOTION_GRAMMAR = (
    "COUNT COLOUR KIND MOTION with COUNT in {a, two, three}, COLOUR in {"
    + ", ".join(PALETTE)
    + "}, KIND in {circle, square, triangle} (plural after two/three) and MOTION in {"
    + ", ".join(_MOTION_PHRASES.values())
    + "}, e.g. 'two red circles moving left'"
)


@dataclass(frozen=True)
class MotionSpec:
    """What a motion caption asks: exactly ``count`` shapes of ``color``, all ``kind``, moving ``motion``."""

    color: str
    kind: str
    count: int
    motion: str

    def __post_init__(self) -> None:
        if self.color not in PALETTE:
            raise ValueError(f"color must be one of {list(PALETTE)}, got {self.color!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.count not in MOTION_COUNTS:
            raise ValueError(f"count must be one of {list(MOTION_COUNTS)}, got {self.count!r}")
        if self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {list(MOTIONS)}, got {self.motion!r}")


@dataclass(frozen=True)
class Clip:
    """A scene trajectory: what a caption asks, one :class:`Scene` per frame, the moving shapes' velocity
    ``(x, y)`` per frame (fractions of the side; zero for "still"), and the side in pixels the clip was
    sampled for (:func:`render_clip`'s default)."""

    spec: MotionSpec
    frames: tuple[Scene, ...]
    velocity: tuple[float, float]
    size: int = 32

    @property
    def num_frames(self) -> int:
        return len(self.frames)


class MotionExample(NamedTuple):
    """One sample of the moving-shapes world: the rendered clip ``(F, 3, H, W)`` in [0, 1], its caption, what
    the caption asks, and the clip's scenes."""

    video: Tensor
    caption: str
    spec: MotionSpec
    clip: Clip


def motion_caption(spec: MotionSpec) -> str:
    """The caption of ``spec`` in the grammar of this module, e.g. ``"two red circles moving left"``."""
    return f"{caption(CaptionSpec(spec.color, spec.kind, spec.count))} {_MOTION_PHRASES[spec.motion]}"


def _not_a_caption(text: object, problem: str | None = None) -> ValueError:
    detail = f" ({problem})" if problem else ""
    return ValueError(
        f"{quote_prompt(text)} is not a moving-shapes caption{detail}; captions read: {MOTION_GRAMMAR}"
    )


@functools.lru_cache(maxsize=4096)
def parse_motion_caption(text: str) -> MotionSpec:
    """The :class:`MotionSpec` a caption asks for; the inverse of :func:`motion_caption`.

    Raises:
        ValueError: naming the caption and the grammar, when ``text`` is not a caption of this world.
    """
    normalised = " ".join(str(text).lower().split())
    motion = next((m for m, phrase in _MOTION_PHRASES.items() if normalised.endswith(" " + phrase)), None)
    if motion is None:
        raise _not_a_caption(text, "it does not end with a motion")
    # What precedes the motion is an image-world caption without a region: reuse that grammar's parser.
    shapes = normalised[: -len(_MOTION_PHRASES[motion]) - 1]
    try:
        spec = parse_caption(shapes)
    except ValueError:
        raise _not_a_caption(text, f"{shapes!r} is not COUNT COLOUR KIND") from None
    if spec.region != "anywhere":
        raise _not_a_caption(text, "motion captions name no region")
    if spec.count not in MOTION_COUNTS:
        raise _not_a_caption(text, f"at most {max(MOTION_COUNTS)} shapes move")
    return MotionSpec(spec.color, spec.kind, spec.count, motion)


def all_motion_specs() -> tuple[MotionSpec, ...]:
    """Every caption combination of the world (5 colours x 3 kinds x 3 counts x 5 motions = 225)."""
    return tuple(
        MotionSpec(color, kind, count, motion)
        for color, kind, count, motion in itertools.product(PALETTE, KINDS, MOTION_COUNTS, MOTIONS)
    )


@functools.lru_cache(maxsize=16)
def split_motion_specs(
    seed: int = 0, held_out_fraction: float = 0.2
) -> tuple[tuple[MotionSpec, ...], tuple[MotionSpec, ...]]:
    """The train and held-out caption combinations, reproducible by ``seed`` (45 of 225 held out at 0.2).

    Combinations are visited in a seeded random order and held out while fewer than ``held_out_fraction`` of
    all are, skipping any whose removal would leave a pair of attribute values (colour-kind, colour-count,
    colour-motion, kind-count, kind-motion, count-motion) without a training caption: the rule of
    :func:`~rlr_lightning.world.scenes.split_specs`, so every colour, kind, count and motion, and every pair
    of them, is seen in training.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    specs = all_motion_specs()
    target = round(held_out_fraction * len(specs))
    order = torch.randperm(len(specs), generator=torch.Generator().manual_seed(seed)).tolist()

    def pairs(spec: MotionSpec) -> list[tuple]:
        values = (spec.color, spec.kind, spec.count, spec.motion)
        return [(i, values[i], j, values[j]) for i, j in itertools.combinations(range(4), 2)]

    in_train: dict[tuple, int] = {}
    for spec in specs:
        for pair in pairs(spec):
            in_train[pair] = in_train.get(pair, 0) + 1
    held: set[int] = set()
    for index in order:
        if len(held) >= target:
            break
        if all(in_train[pair] > 1 for pair in pairs(specs[index])):
            held.add(index)
            for pair in pairs(specs[index]):
                in_train[pair] -= 1
    train = tuple(s for i, s in enumerate(specs) if i not in held)
    held_out = tuple(s for i, s in enumerate(specs) if i in held)
    return train, held_out


def _box(shape: Shape, travel: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` of everything ``shape``'s bounding box covers while it moves by ``travel``."""
    half = shape.size / 2.0
    return (
        shape.x - half + min(0.0, travel[0]),
        shape.y - half + min(0.0, travel[1]),
        shape.x + half + max(0.0, travel[0]),
        shape.y + half + max(0.0, travel[1]),
    )


def _apart(boxes: Tensor, other: tuple[float, float, float, float]) -> Tensor:
    """Which of the boxes ``(N, 4)`` (``x0, y0, x1, y1``) lie at least GAP from ``other`` along x or along y
    (then blur cannot join the shapes)."""
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    return (x0 - other[2] >= GAP) | (other[0] - x1 >= GAP) | (y0 - other[3] >= GAP) | (other[1] - y1 >= GAP)


def _check_num_frames(num_frames: int) -> None:
    if num_frames not in CLIP_LENGTHS:
        raise ValueError(f"num_frames must be one of {list(CLIP_LENGTHS)} (4k + 1 frames), got {num_frames}")


def sample_clip(
    spec: MotionSpec,
    generator: torch.Generator,
    num_frames: int = 9,
    size: int = 32,
    *,
    max_distractors: int = 1,
) -> Clip:
    """A random clip of which ``spec``'s caption is true, drawn with ``generator`` (deterministic by its seed).

    The ``spec.count`` asked shapes move together by :data:`SPEED` per frame in the asked direction; their
    first-frame positions are drawn so that every shape stays inside the frame in every frame. 0 to
    ``max_distractors`` still shapes (at most 4 shapes in all) of other colours, any kind, are placed clear of
    the moving shapes' whole path. Positions are rejection-sampled; when a draw of sizes does not fit, later
    attempts use small shapes only, and the last ones drop the distractors.

    Args:
        spec: What the clip shows.
        generator: Source of randomness.
        num_frames: Frames of the clip, one of :data:`CLIP_LENGTHS`.
        size: Side in pixels the clip is meant for (the default of :func:`render_clip`); positions are
            fractions of the side, so the trajectory itself does not depend on it.
        max_distractors: Most still shapes of other colours.
    """
    _check_num_frames(num_frames)
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    if max_distractors < 0:
        raise ValueError(f"max_distractors must be >= 0, got {max_distractors}")
    n_distractors = int(
        torch.randint(min(max_distractors, MAX_SHAPES - spec.count) + 1, (), generator=generator)
    )
    others = [c for c in PALETTE if c != spec.color]
    distractors = [
        (draw_choice(generator, KINDS), draw_choice(generator, others)) for _ in range(n_distractors)
    ]
    direction = DIRECTIONS[spec.motion]
    velocity = (SPEED * direction[0], SPEED * direction[1])
    travel = (velocity[0] * (num_frames - 1), velocity[1] * (num_frames - 1))
    sizes = list(SIZES.values())

    def sweep(moves: bool, other_moves: bool) -> tuple[float, float]:
        """The travel of a shape's box when it is compared with another's: its whole path when it moves and
        the other does not; none when both move (they keep their relative positions) or it is still."""
        return travel if moves and not other_moves else (0.0, 0.0)

    for attempt in range(3 * _ATTEMPTS):
        # The moving shapes first (they need the most room), then the still distractors clear of their path.
        wanted = [(spec.kind, spec.color, True)] * spec.count
        if attempt < 2 * _ATTEMPTS:
            wanted += [(kind, color, False) for kind, color in distractors]
        placed: list[tuple[Shape, bool]] = []
        for kind, color, moves in wanted:
            side = min(sizes) if attempt >= _ATTEMPTS else draw_choice(generator, sizes)
            path = travel if moves else (0.0, 0.0)
            # Box centre ranges keeping the box inside the frame at the start and at the end of its path.
            lo, hi = BORDER + side / 2.0, 1.0 - BORDER - side / 2.0
            x_lo, x_hi = lo - min(0.0, path[0]), hi - max(0.0, path[0])
            y_lo, y_hi = lo - min(0.0, path[1]), hi - max(0.0, path[1])
            # _CANDIDATES positions at once, the first that keeps clear of every placed shape taken.
            draws = torch.rand((_CANDIDATES, 2), generator=generator, dtype=torch.float64)
            xs, ys = x_lo + (x_hi - x_lo) * draws[:, 0], y_lo + (y_hi - y_lo) * draws[:, 1]
            clear = torch.ones(_CANDIDATES, dtype=torch.bool)
            for other, other_moves in placed:
                # Moving shapes keep their relative positions, so two are compared at the first frame; a still
                # shape is compared with the whole path of a moving one.
                reach = sweep(moves, other_moves)
                boxes = torch.stack(
                    [
                        xs - side / 2.0 + min(0.0, reach[0]),
                        ys - side / 2.0 + min(0.0, reach[1]),
                        xs + side / 2.0 + max(0.0, reach[0]),
                        ys + side / 2.0 + max(0.0, reach[1]),
                    ],
                    dim=1,
                )
                clear &= _apart(boxes, _box(other, sweep(other_moves, moves)))
            hits = clear.nonzero()
            if len(hits) == 0:
                break
            first = int(hits[0])
            placed.append((Shape(kind, color, float(xs[first]), float(ys[first]), side), moves))
        if len(placed) == len(wanted):
            frames = tuple(
                Scene(
                    tuple(
                        Shape(s.kind, s.color, s.x + velocity[0] * t, s.y + velocity[1] * t, s.size)
                        if moves
                        else s
                        for s, moves in placed
                    )
                )
                for t in range(num_frames)
            )
            if len(placed) < spec.count + len(distractors):
                logger.debug(
                    "no room for the distractors of %r in %d frames", motion_caption(spec), num_frames
                )
            return Clip(spec, frames, velocity, size)
    # Unreachable for the world's constants (every spec and length is tested); guards against edits to them.
    raise RuntimeError(f"could not place the shapes of {motion_caption(spec)!r} in {num_frames} frames")


def render_clip(clip: Clip, size: int | None = None, antialias: int = 4) -> Tensor:
    """The clip as a video ``(F, 3, size, size)`` in [0, 1] (float32), each frame drawn by
    :func:`~rlr_lightning.world.scenes.render`; deterministic.

    Args:
        clip: The scene trajectory (:func:`sample_clip`).
        size: Side of the frames in pixels; None renders at the size the clip was sampled for.
        antialias: Samples per pixel along each axis (see :func:`~rlr_lightning.world.scenes.render`).
    """
    side = clip.size if size is None else size
    return torch.stack([render(scene, side, antialias) for scene in clip.frames])


def centroid_track(
    video: Tensor,
    color: str,
    color_threshold: float = COLOR_THRESHOLD,
    min_intensity: float = MIN_INTENSITY,
    min_area: float = MIN_AREA,
) -> tuple[list[int], Tensor | None]:
    """Per frame, the number of blobs of ``color`` and, when every frame has one, the track ``(F, 2)`` of
    their centroid ``(x, y)`` (the mean of the blob centroids, fractions of the side).

    Args:
        video: ``(F, 3, H, W)`` in [0, 1].
        color: A palette colour name.
        color_threshold: Largest RGB distance to a palette colour's shades that counts as the colour.
        min_intensity: Lowest intensity of a palette colour's shades.
        min_area: Smallest blob, as a fraction of the frame's area.
    Returns:
        The blob counts per frame, and the track (float64, CPU) or None when a frame has no blob of ``color``.
    """
    if video.dim() != 4 or video.shape[1] != 3:
        raise ValueError(f"centroid_track takes one video of shape (F, 3, H, W), got {tuple(video.shape)}")
    counts: list[int] = []
    points: list[tuple[float, float]] = []
    for frame in video:
        blobs = find_blobs(frame, color_threshold, min_intensity, min_area)[color]
        counts.append(len(blobs))
        if blobs:
            # The plain mean of the blob centroids: weighting by area would let the rim pixels that a
            # sub-pixel move adds to one blob and takes from another shift the mean between them.
            points.append(
                (
                    sum(blob.centroid[0] for blob in blobs) / len(blobs),
                    sum(blob.centroid[1] for blob in blobs) / len(blobs),
                )
            )
    track = torch.tensor(points, dtype=torch.float64) if len(points) == len(counts) else None
    return counts, track


def net_displacement(track: Tensor) -> Tensor:
    """Net displacement ``(..., 2)`` from the first frame to the last of tracks ``(..., F, 2)``: the slope of the
    least-squares line through the positions over the frame index, times ``F - 1``.

    For a constant-speed track it is the last position minus the first; unlike that difference it uses every
    frame, so one jittered frame moves it by only a fraction of its jitter. Differentiable.
    """
    frames = track.shape[-2]
    if frames < 2:
        raise ValueError(f"a displacement needs at least 2 frames, got {frames}")
    t = torch.arange(frames, dtype=track.dtype, device=track.device)
    t = t - t.mean()
    weights = t / t.pow(2).sum() * (frames - 1)
    return (weights.unsqueeze(-1) * track).sum(dim=-2)


def motion_ok(displacement: tuple[float, float] | Tensor, motion: str) -> bool:
    """Whether a net displacement ``(dx, dy)`` (fractions of the side) shows ``motion``, by the module's
    thresholds (:data:`MIN_DISPLACEMENT`, :data:`MAX_CROSS_DISPLACEMENT`, :data:`MAX_STILL_DISPLACEMENT`)."""
    dx, dy = (float(v) for v in displacement)
    if motion == "still":
        return math.hypot(dx, dy) <= MAX_STILL_DISPLACEMENT
    ux, uy = DIRECTIONS[motion]
    along, across = dx * ux + dy * uy, dx * uy - dy * ux
    return along >= MIN_DISPLACEMENT and abs(across) <= MAX_CROSS_DISPLACEMENT


def check_motion(
    videos: Tensor,
    captions: Sequence[MotionSpec | str],
    color_threshold: float = COLOR_THRESHOLD,
    min_intensity: float = MIN_INTENSITY,
    min_area: float = MIN_AREA,
) -> dict[str, Tensor]:
    """Whether each video shows what its caption asks (the module docstring says what each check means).

    * ``color_ok``: a blob of the asked colour in every frame;
    * ``count_ok``: exactly the asked number of blobs of that colour in every frame;
    * ``motion_ok``: the colour in every frame, and the net displacement of the track of its centroid
      (:func:`centroid_track`, :func:`net_displacement`) passes :func:`motion_ok`;
    * ``all_ok``: all three (the caption is true, except for the kind of the shapes, which is not decided).

    Args:
        videos: ``(B, F, 3, H, W)`` in [0, 1], at least 2 frames, any size.
        captions: One :class:`MotionSpec` or caption string per video.
        color_threshold: Largest RGB distance to a palette colour's shades that counts as the colour.
        min_intensity: Lowest intensity of a palette colour's shades.
        min_area: Smallest blob, as a fraction of a frame's area.
    Returns:
        ``{"color_ok", "count_ok", "motion_ok", "all_ok"}``, each a bool tensor ``(B,)`` on the CPU.
    """
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"check_motion takes videos of shape (B, F, 3, H, W), got {tuple(videos.shape)}")
    if videos.shape[1] < 2:
        raise ValueError(f"check_motion needs at least 2 frames to judge motion, got {videos.shape[1]}")
    if len(captions) != videos.shape[0]:
        raise ValueError(f"{videos.shape[0]} videos but {len(captions)} captions")
    # Parse every caption before any work, so a bad one fails at once.
    specs = [parse_motion_caption(c) if isinstance(c, str) else c for c in captions]
    results = {name: torch.zeros(videos.shape[0], dtype=torch.bool) for name in MOTION_CHECKS}
    pixels = videos.detach().float().cpu()
    for i, spec in enumerate(specs):
        counts, track = centroid_track(pixels[i], spec.color, color_threshold, min_intensity, min_area)
        results["color_ok"][i] = min(counts) > 0
        results["count_ok"][i] = all(n == spec.count for n in counts)
        results["motion_ok"][i] = track is not None and motion_ok(net_displacement(track), spec.motion)
    results["all_ok"] = results["color_ok"] & results["count_ok"] & results["motion_ok"]
    return results


def sample_motion_example(
    generator: torch.Generator,
    split: Split = "train",
    *,
    num_frames: int = 9,
    image_size: int = 32,
    split_seed: int = 0,
    held_out_fraction: float = 0.2,
    max_distractors: int = 1,
) -> MotionExample:
    """A caption drawn uniformly from ``split``'s combinations (:func:`split_motion_specs`), a clip it is true
    of, and the clip rendered at ``image_size``; deterministic given the generator's state."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    train, held_out = split_motion_specs(split_seed, held_out_fraction)
    specs = train if split == "train" else held_out
    if not specs:
        raise ValueError(f"the {split!r} split is empty at held_out_fraction={held_out_fraction}")
    spec = draw_choice(generator, specs)
    clip = sample_clip(spec, generator, num_frames, image_size, max_distractors=max_distractors)
    return MotionExample(render_clip(clip), motion_caption(spec), spec, clip)


class MotionWorldItem(TypedDict):
    """An item of :class:`MotionWorldDataset`: the caption and the clip ``(F, 3, H, W)`` in [0, 1]."""

    prompt: str
    video: Tensor


class MotionWorldDataset(Dataset):
    """A fixed-length dataset of moving-shapes clips; item ``i`` is the same for the same arguments.

    Items are dicts ``{"prompt": str, "video": Tensor (F, 3, H, W) in [0, 1]}`` (they batch with the default
    collate into a list of prompts and videos ``(B, F, 3, H, W)``); :meth:`example` gives the full
    :class:`MotionExample` with the spec and the clip's scenes.

    Args:
        split: ``"train"`` or ``"held_out"``: which caption combinations the clips are drawn from.
        num_examples: Number of clips (each is generated on demand from its index).
        num_frames: Frames per clip, one of :data:`CLIP_LENGTHS`.
        image_size: Side of the frames in pixels.
        seed: Seed of the clips; item ``i`` is drawn from a generator seeded by ``(seed, i)``.
        split_seed: Seed of the train / held-out split of caption combinations (keep it fixed across runs
            that must share a held-out set).
        held_out_fraction: Fraction of the caption combinations held out of training.
        max_distractors: Most still shapes of colours other than the caption's added to each clip.
    """

    def __init__(
        self,
        split: Split = "train",
        num_examples: int = 10_000,
        num_frames: int = 9,
        image_size: int = 32,
        seed: int = 0,
        split_seed: int = 0,
        held_out_fraction: float = 0.2,
        max_distractors: int = 1,
    ) -> None:
        if split not in ("train", "held_out"):
            raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        _check_num_frames(num_frames)
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
        if max_distractors < 0:
            raise ValueError(f"max_distractors must be >= 0, got {max_distractors}")
        split_motion_specs(split_seed, held_out_fraction)  # validates the fraction now, not at the first item
        self.split = split
        self.num_examples = num_examples
        self.num_frames = num_frames
        self.image_size = image_size
        self.seed = seed
        self.split_seed = split_seed
        self.held_out_fraction = held_out_fraction
        self.max_distractors = max_distractors

    def __len__(self) -> int:
        return self.num_examples

    def example(self, index: int) -> MotionExample:
        """The full example at ``index`` (video, caption, spec, clip)."""
        if not -self.num_examples <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        index %= self.num_examples
        return sample_motion_example(
            item_generator(self.seed, index),
            self.split,
            num_frames=self.num_frames,
            image_size=self.image_size,
            split_seed=self.split_seed,
            held_out_fraction=self.held_out_fraction,
            max_distractors=self.max_distractors,
        )

    def __getitem__(self, index: int) -> MotionWorldItem:
        example = self.example(index)
        return {"prompt": example.caption, "video": example.video}
