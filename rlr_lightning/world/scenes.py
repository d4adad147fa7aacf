"""The procedural shapes world: scenes, their captions, rendering, and a train / held-out split of captions.

**Scenes.** A scene is 1 to 4 flat shapes (circle, square, upward triangle) on a black background, in the
colours of :data:`PALETTE` (pure red, green, blue, yellow, white: every pair at least 1.0 apart in RGB, so a
colour threshold below 0.5 separates them), in two sizes (:data:`SIZES`, side of the bounding box as a
fraction of the image side). Positions are fractions of the image side, ``x`` to the right and ``y`` down
from the top-left corner, so one scene renders at any resolution. Shapes never overlap: their bounding boxes
are at least :data:`GAP` apart and :data:`BORDER` inside the image edges.

**Caption grammar** (lower case; :func:`parse_caption` also accepts other cases and extra spaces)::

    caption := COUNT " " COLOUR " " KIND [" " REGION]
    COUNT   := "a" (1) | "two" | "three" | "four"
    COLOUR  := "red" | "green" | "blue" | "yellow" | "white"
    KIND    := "circle" | "square" | "triangle"      (with a plural "s" when COUNT is not "a")
    REGION  := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"

e.g. ``"two red circles on the left"``, ``"a blue square at the top"``, ``"three white triangles"``. A
caption is the text of a :class:`CaptionSpec` (:func:`caption`), and :func:`parse_caption` reads it back.

**Meaning** (what makes a caption exactly checkable). A caption is true of a scene when the scene holds
*exactly* COUNT shapes of COLOUR, all of them of KIND, and the mass centroid of each lies in REGION:

* ``left``: ``x < 0.5``; ``right``: ``x > 0.5``; ``top``: ``y < 0.5``; ``bottom``: ``y > 0.5``;
* ``center``: ``max(|x - 0.5|, |y - 0.5|) < 0.25`` (the central square of half the image's side);
* ``anywhere`` (no REGION in the caption): no constraint.

Only the centroid counts: a shape on the left may reach over the middle line. Shapes of *other* colours
(distractors, up to ``max_distractors`` and 4 shapes in all) may be anywhere; the caption says nothing about
them. Size is not part of a caption. The generator keeps every captioned centroid at least
:data:`REGION_MARGIN` inside its region's boundaries, so blur and pixel rounding cannot move it across.

**Split.** :func:`split_specs` holds out a fraction of the 360 caption combinations (colour, kind, count,
region), reproducibly by seed, such that every *pair* of attribute values (e.g. yellow + triangle, four + at
the top) still occurs in training: a held-out caption is a new combination of things seen in training.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypedDict, get_args

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from rlr_lightning.errors import quote_prompt

Kind = Literal["circle", "square", "triangle"]
Region = Literal["left", "right", "top", "bottom", "center", "anywhere"]
Split = Literal["train", "held_out"]

#: Named colours of the world (RGB in [0, 1]); the background is black.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}
BACKGROUND: tuple[float, float, float] = (0.0, 0.0, 0.0)
KINDS: tuple[str, ...] = get_args(Kind)
REGIONS: tuple[str, ...] = get_args(Region)
COUNTS: tuple[int, ...] = (1, 2, 3, 4)
#: Side of a shape's bounding box, as a fraction of the image side (5.8 and 9.0 px at 32 px).
SIZES: dict[str, float] = {"small": 0.18, "large": 0.28}
#: Least distance between two shapes' bounding boxes (2.2 px at 32 px: blur does not join them).
GAP = 0.07
#: Least distance of a bounding box from the image edges.
BORDER = 0.02
#: Least distance of a captioned shape's centroid from its region's boundaries.
REGION_MARGIN = 0.05
MAX_SHAPES = 4

_COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
_REGION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
    "anywhere": "",
}
GRAMMAR = (
    "COUNT COLOUR KIND [REGION] with COUNT in {a, two, three, four}, COLOUR in {"
    + ", ".join(PALETTE)
    + "}, KIND in {circle, square, triangle} (plural after two/three/four) and REGION in {"
    + ", ".join(p for p in _REGION_PHRASES.values() if p)
    + "} or none, e.g. 'two red circles on the left'"
)


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks: exactly ``count`` shapes of ``color``, all ``kind``, with centroids in ``region``."""

    color: str
    kind: str
    count: int
    region: str = "anywhere"

    def __post_init__(self) -> None:
        if self.color not in PALETTE:
            raise ValueError(f"color must be one of {list(PALETTE)}, got {self.color!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.count not in COUNTS:
            raise ValueError(f"count must be one of {list(COUNTS)}, got {self.count!r}")
        if self.region not in REGIONS:
            raise ValueError(f"region must be one of {list(REGIONS)}, got {self.region!r}")


@dataclass(frozen=True)
class Shape:
    """One shape: its bounding box's centre ``(x, y)`` and side ``size``, fractions of the image side."""

    kind: str
    color: str
    x: float
    y: float
    size: float

    @property
    def centroid(self) -> tuple[float, float]:
        """The centre of mass: the box centre, except for the upward triangle (a third of its height up
        from the base)."""
        if self.kind == "triangle":
            return self.x, self.y + self.size / 6.0
        return self.x, self.y

    def coverage(self, xs: Tensor, ys: Tensor) -> Tensor:
        """Boolean mask of the points ``(xs, ys)`` (fractions of the image side) inside the shape."""
        half = self.size / 2.0
        dx, dy = xs - self.x, ys - self.y
        if self.kind == "circle":
            return dx * dx + dy * dy <= half * half
        if self.kind == "square":
            return (dx.abs() <= half) & (dy.abs() <= half)
        # Upward triangle: apex at the top middle of the box, base along its bottom edge.
        return (dy <= half) & (dx.abs() <= (dy + half) / 2.0)


@dataclass(frozen=True)
class Scene:
    """The shapes of one image (non-overlapping), in drawing order."""

    shapes: tuple[Shape, ...]


class Example(NamedTuple):
    """One sample of the world: the rendered image ``(3, H, W)`` in [0, 1], its caption, what the caption
    asks, and the scene itself."""

    image: Tensor
    caption: str
    spec: CaptionSpec
    scene: Scene


def caption(spec: CaptionSpec) -> str:
    """The caption of ``spec`` in the grammar of this module, e.g. ``"two red circles on the left"``."""
    kind = spec.kind if spec.count == 1 else spec.kind + "s"
    words = [_COUNT_WORDS[spec.count], spec.color, kind, _REGION_PHRASES[spec.region]]
    return " ".join(w for w in words if w)


_CAPTION_RE = re.compile(
    r"^(?P<count>a|two|three|four) (?P<color>[a-z]+) (?P<kind>[a-z]+?)(?P<plural>s?)(?: (?P<region>.+))?$"
)


@functools.lru_cache(maxsize=4096)
def parse_caption(text: str) -> CaptionSpec:
    """The :class:`CaptionSpec` a caption asks for; the inverse of :func:`caption`.

    Raises:
        ValueError: naming the caption and the grammar, when ``text`` is not a caption of this world.
    """
    normalised = " ".join(str(text).lower().split())
    match = _CAPTION_RE.match(normalised)
    if match is None:
        raise ValueError(f"{quote_prompt(text)} is not a shapes-world caption; captions read: {GRAMMAR}")
    count = {word: n for n, word in _COUNT_WORDS.items()}[match["count"]]
    regions = {phrase: region for region, phrase in _REGION_PHRASES.items() if phrase}
    problems = []
    if match["color"] not in PALETTE:
        problems.append(f"unknown colour {match['color']!r}")
    if match["kind"] not in KINDS:
        problems.append(f"unknown shape {match['kind'] + match['plural']!r}")
    elif bool(match["plural"]) != (count > 1):
        problems.append(f"{match['count']!r} needs {'the plural' if count > 1 else 'the singular'}")
    if match["region"] is not None and match["region"] not in regions:
        problems.append(f"unknown region {match['region']!r}")
    if len(problems) > 1:  # not an attempt at a caption: the grammar says more than a list of misreadings
        raise ValueError(f"{quote_prompt(text)} is not a shapes-world caption; captions read: {GRAMMAR}")
    if problems:
        raise ValueError(
            f"{quote_prompt(text)} is not a shapes-world caption ({'; '.join(problems)}); captions read: {GRAMMAR}"
        )
    region = regions[match["region"]] if match["region"] is not None else "anywhere"
    return CaptionSpec(match["color"], match["kind"], count, region)


def in_region(x: float, y: float, region: str) -> bool:
    """Whether the point ``(x, y)`` (fractions of the image side) lies in ``region`` (the module's definitions)."""
    return region_distance(x, y, region) > 0.0


def region_distance(x: float, y: float, region: str) -> float:
    """Signed distance of ``(x, y)`` into ``region``: positive inside, negative outside (inf for anywhere)."""
    if region == "left":
        return 0.5 - x
    if region == "right":
        return x - 0.5
    if region == "top":
        return 0.5 - y
    if region == "bottom":
        return y - 0.5
    if region == "center":
        return 0.25 - max(abs(x - 0.5), abs(y - 0.5))
    if region == "anywhere":
        return math.inf
    raise ValueError(f"region must be one of {list(REGIONS)}, got {region!r}")


def all_specs() -> tuple[CaptionSpec, ...]:
    """Every caption combination of the world (5 colours x 3 kinds x 4 counts x 6 regions = 360)."""
    return tuple(
        CaptionSpec(color, kind, count, region)
        for color, kind, count, region in itertools.product(PALETTE, KINDS, COUNTS, REGIONS)
    )


@functools.lru_cache(maxsize=16)
def split_specs(
    seed: int = 0, held_out_fraction: float = 0.2
) -> tuple[tuple[CaptionSpec, ...], tuple[CaptionSpec, ...]]:
    """The train and held-out caption combinations, reproducible by ``seed``.

    Combinations are visited in a seeded random order and held out while fewer than ``held_out_fraction`` of
    all are, skipping any whose removal would leave a pair of attribute values (colour-kind, colour-count,
    colour-region, kind-count, kind-region, count-region) without a training caption.
    """
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    specs = all_specs()
    target = round(held_out_fraction * len(specs))
    order = torch.randperm(len(specs), generator=torch.Generator().manual_seed(seed)).tolist()

    def pairs(spec: CaptionSpec) -> list[tuple]:
        values = (spec.color, spec.kind, spec.count, spec.region)
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


def draw_uniform(generator: torch.Generator, low: float, high: float) -> float:
    """A float uniform on ``[low, high)`` from ``generator`` (the world's draws all come from one generator)."""
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def draw_choice(generator: torch.Generator, options: Sequence):
    """One of ``options``, uniformly, from ``generator``."""
    return options[int(torch.randint(len(options), (), generator=generator))]


def _centre_ranges(kind: str, size: float, region: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Ranges of the box centre ``(x, y)`` that keep the box inside the image and, for a captioned shape,
    its centroid at least REGION_MARGIN inside ``region``."""
    lo, hi = BORDER + size / 2.0, 1.0 - BORDER - size / 2.0
    x_range, y_range = [lo, hi], [lo, hi]
    # The centroid of a triangle lies size/6 below its box centre; the other kinds' is the centre.
    offset_y = size / 6.0 if kind == "triangle" else 0.0
    inner = 0.5 - REGION_MARGIN
    if region == "left":
        x_range[1] = min(x_range[1], inner)
    elif region == "right":
        x_range[0] = max(x_range[0], 1.0 - inner)
    elif region == "top":
        y_range[1] = min(y_range[1], inner - offset_y)
    elif region == "bottom":
        y_range[0] = max(y_range[0], 1.0 - inner - offset_y)
    elif region == "center":
        half = 0.25 - REGION_MARGIN
        x_range = [max(x_range[0], 0.5 - half), min(x_range[1], 0.5 + half)]
        y_range = [max(y_range[0], 0.5 - half - offset_y), min(y_range[1], 0.5 + half - offset_y)]
    return (x_range[0], x_range[1]), (y_range[0], y_range[1])


def _apart(a: Shape, b: Shape) -> bool:
    reach = (a.size + b.size) / 2.0 + GAP
    return abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def sample_scene(spec: CaptionSpec, generator: torch.Generator, *, max_distractors: int = 1) -> Scene:
    """A random scene of which ``spec``'s caption is true, drawn with ``generator`` (deterministic by its seed).

    The scene holds ``spec.count`` shapes as asked plus 0 to ``max_distractors`` shapes (at most 4 in all) of
    other colours, any kind, anywhere. Positions are rejection-sampled so that no shapes overlap; when a
    draw of sizes does not fit (e.g. four large shapes in the centre) later attempts use small shapes only.
    """
    if max_distractors < 0:
        raise ValueError(f"max_distractors must be >= 0, got {max_distractors}")
    n_distractors = int(
        torch.randint(min(max_distractors, MAX_SHAPES - spec.count) + 1, (), generator=generator)
    )
    others = [c for c in PALETTE if c != spec.color]
    wanted = [(spec.kind, spec.color, spec.region)] * spec.count
    wanted += [
        (draw_choice(generator, KINDS), draw_choice(generator, others), "anywhere")
        for _ in range(n_distractors)
    ]
    sizes = list(SIZES.values())
    for attempt in range(200):
        shapes: list[Shape] = []
        for kind, color, region in wanted:
            size = min(sizes) if attempt >= 100 else draw_choice(generator, sizes)
            (x_lo, x_hi), (y_lo, y_hi) = _centre_ranges(kind, size, region)
            for _ in range(50):
                shape = Shape(
                    kind,
                    color,
                    draw_uniform(generator, x_lo, x_hi),
                    draw_uniform(generator, y_lo, y_hi),
                    size,
                )
                if all(_apart(shape, other) for other in shapes):
                    shapes.append(shape)
                    break
            else:
                break
        if len(shapes) == len(wanted):
            return Scene(tuple(shapes))
    # Unreachable for the world's constants (every spec is tested); guards against edits to them.
    raise RuntimeError(f"could not place the shapes of {caption(spec)!r} without overlap; lower SIZES or GAP")


def render(scene: Scene, size: int = 32, antialias: int = 4) -> Tensor:
    """The scene as an image ``(3, size, size)`` in [0, 1] (float32), deterministic.

    Args:
        scene: The shapes to draw.
        size: Side of the image in pixels.
        antialias: Samples per pixel along each axis (coverage is averaged over ``antialias**2`` points per
            pixel, so edges blend into the background); 1 draws hard edges.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    if antialias < 1:
        raise ValueError(f"antialias must be >= 1, got {antialias}")
    fine = size * antialias
    coords = (torch.arange(fine, dtype=torch.float64) + 0.5) / fine
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    image = torch.tensor(BACKGROUND, dtype=torch.float64).view(3, 1, 1).repeat(1, fine, fine)
    for shape in scene.shapes:
        mask = shape.coverage(xs, ys)
        image[:, mask] = torch.tensor(PALETTE[shape.color], dtype=torch.float64).view(3, 1)
    if antialias > 1:
        image = torch.nn.functional.avg_pool2d(image.unsqueeze(0), antialias).squeeze(0)
    return image.float()


def sample_example(
    generator: torch.Generator,
    split: Split = "train",
    *,
    image_size: int = 32,
    split_seed: int = 0,
    held_out_fraction: float = 0.2,
    max_distractors: int = 1,
) -> Example:
    """A caption drawn uniformly from ``split``'s combinations (:func:`split_specs`), a scene it is true of,
    and the scene rendered at ``image_size``; deterministic given the generator's state."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    train, held_out = split_specs(split_seed, held_out_fraction)
    specs = train if split == "train" else held_out
    if not specs:
        raise ValueError(f"the {split!r} split is empty at held_out_fraction={held_out_fraction}")
    spec = draw_choice(generator, specs)
    scene = sample_scene(spec, generator, max_distractors=max_distractors)
    return Example(render(scene, image_size), caption(spec), spec, scene)


def item_generator(seed: int, index: int) -> torch.Generator:
    """The generator of a dataset's item ``index``: SeedSequence mixes ``(seed, index)`` so neighbouring seeds do
    not share items at shifted indices."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


class ShapesWorldItem(TypedDict):
    """An item of :class:`ShapesWorldDataset`: the image ``(3, H, W)`` in [0, 1] and its caption."""

    image: Tensor
    caption: str


class ShapesWorldDataset(Dataset):
    """A fixed-length dataset of shapes-world examples; item ``i`` is the same for the same arguments.

    Items are dicts ``{"image": Tensor (3, H, W) in [0, 1], "caption": str}`` (they batch with the default
    collate into images ``(B, 3, H, W)`` and a list of captions); :meth:`example` gives the full
    :class:`Example` with the spec and the scene.

    Args:
        split: ``"train"`` or ``"held_out"``: which caption combinations the examples are drawn from.
        num_examples: Number of examples (each is generated on demand from its index).
        image_size: Side of the images in pixels (32 or 64 for the tiny pipelines).
        seed: Seed of the examples; item ``i`` is drawn from a generator seeded by ``(seed, i)``.
        split_seed: Seed of the train / held-out split of caption combinations (keep it fixed across runs
            that must share a held-out set).
        held_out_fraction: Fraction of the caption combinations held out of training.
        max_distractors: Most shapes of colours other than the caption's added to each scene.
    """

    def __init__(
        self,
        split: Split = "train",
        num_examples: int = 10_000,
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
        split_specs(split_seed, held_out_fraction)  # validates the fraction now, not at the first item
        self.split = split
        self.num_examples = num_examples
        self.image_size = image_size
        self.seed = seed
        self.split_seed = split_seed
        self.held_out_fraction = held_out_fraction
        self.max_distractors = max_distractors

    def __len__(self) -> int:
        return self.num_examples

    def example(self, index: int) -> Example:
        """The full example at ``index`` (image, caption, spec, scene)."""
        if not -self.num_examples <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        index %= self.num_examples
        return sample_example(
            item_generator(self.seed, index),
            self.split,
            image_size=self.image_size,
            split_seed=self.split_seed,
            held_out_fraction=self.held_out_fraction,
            max_distractors=self.max_distractors,
        )

    def __getitem__(self, index: int) -> ShapesWorldItem:
        example = self.example(index)
        return {"image": example.image, "caption": example.caption}
