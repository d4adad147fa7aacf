"""The exact checker of the shapes world: which shapes of which colour an image holds, and where, from pixels.

A pixel has a palette colour ``c`` (:data:`~rlr_lightning.world.scenes.PALETTE`) when it lies within
``color_threshold`` (Euclidean distance, RGB in [0, 1]) of that colour's *shades*: ``a * c`` for intensities
``a`` from ``min_intensity`` to 1, i.e. the colour blended with the black background by at most
``1 - min_intensity``. Anti-aliasing and blur blend a shape's rim with the background, darkening it without
changing its hue; measuring against the shades keeps a blurred small shape's core (of a small yellow
triangle at 32 px blurred by 1 px, 14 pixels lie within 0.25 of yellow's shades but only 4 within 0.4 of
pure yellow: too few to count), and ``min_intensity`` cuts the rim so shapes 2 px apart stay apart. A
pixel within the threshold of several colours' shades takes the nearest. The defaults (0.25, 0.65) found
every shape of clean renders, and of renders blurred with a Gaussian of sigma up to 1 px at 32 px (2 px at
64 px) plus noise of standard deviation 0.06, in 300 scenes each.

Shapes are the 8-connected components of each colour's pixels (``scipy.ndimage.label``) of at least
``min_area`` (a fraction of the image's area, 0.005 = 5 px at 32 px and 20 px at 64 px; the smallest shape
of the world, a small triangle, covers 0.016), so specks of a generated image's noise are not counted. A
shape's position is its component's centroid, in fractions of the image side (``x`` right, ``y`` down).

:func:`check` decides a caption on an image, per sample:

* ``color_ok``: at least one shape of the asked colour;
* ``count_ok``: exactly the asked number of shapes of that colour;
* ``position_ok``: at least one shape of that colour, and every one has its centroid in the asked region
  (the definitions of :mod:`rlr_lightning.world.scenes`; always true of a present colour for captions
  without a region);
* ``all_ok``: ``count_ok`` and ``position_ok`` (the caption is true, except for the kind of the shapes,
  which the checker does not decide).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from rlr_lightning.world.scenes import PALETTE, CaptionSpec, in_region, parse_caption

#: Largest RGB distance of a pixel from a palette colour's shades that still counts as that colour.
COLOR_THRESHOLD = 0.25
#: Lowest intensity of a palette colour's shades (1 - the largest blend with the background).
MIN_INTENSITY = 0.65
#: Smallest shape, as a fraction of the image's area.
MIN_AREA = 0.005
CHECKS = ("color_ok", "count_ok", "position_ok", "all_ok")

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Blob:
    """One shape found in an image: its colour, area (fraction of the image) and centroid ``(x, y)``."""

    color: str
    area: float
    centroid: tuple[float, float]


def _validate(color_threshold: float, min_intensity: float, min_area: float) -> None:
    if not 0.0 < color_threshold < 0.5:
        raise ValueError(f"color_threshold must be an RGB distance in (0, 0.5), got {color_threshold}")
    if not 0.0 < min_intensity <= 1.0:
        raise ValueError(f"min_intensity must be in (0, 1], got {min_intensity}")
    if not 0.0 <= min_area < 1.0:
        raise ValueError(f"min_area must be a fraction of the image's area in [0, 1), got {min_area}")


def color_labels(
    images: Tensor, color_threshold: float = COLOR_THRESHOLD, min_intensity: float = MIN_INTENSITY
) -> Tensor:
    """Per pixel, the index of its palette colour (in :data:`PALETTE` order) or -1 for none.

    Args:
        images: ``(B, 3, H, W)`` or ``(3, H, W)`` in [0, 1].
        color_threshold: Largest RGB distance to a palette colour's shades that counts as the colour.
        min_intensity: Lowest intensity of a palette colour's shades.
    Returns:
        int64 labels ``(B, H, W)`` or ``(H, W)``, on the CPU.
    """
    _validate(color_threshold, min_intensity, 0.0)
    pixels = images.detach().float().cpu()
    batched = pixels.dim() == 4
    if not batched:
        pixels = pixels.unsqueeze(0)
    nearest_distance, nearest = shade_distances(pixels, min_intensity).min(dim=1)
    labels = torch.where(nearest_distance <= color_threshold**2, nearest, torch.full_like(nearest, -1))
    return labels if batched else labels[0]


def shade_distances(images: Tensor, min_intensity: float = MIN_INTENSITY) -> Tensor:
    """Squared RGB distance of every pixel to each palette colour's nearest shade, ``(B, K, H, W)`` for images
    ``(B, 3, H, W)``; differentiable. The nearest shade ``a * c`` is the projection of the pixel on ``c``, with
    ``a`` clamped to ``[min_intensity, 1]``."""
    colours = torch.tensor(list(PALETTE.values()), dtype=images.dtype, device=images.device).view(
        1, -1, 3, 1, 1
    )
    pixels = images.unsqueeze(1)  # (B, 1, 3, H, W) against colours (1, K, 3, 1, 1)
    intensity = (pixels * colours).sum(dim=2, keepdim=True) / colours.pow(2).sum(dim=2, keepdim=True)
    shade = intensity.clamp(min_intensity, 1.0) * colours
    return (pixels - shade).pow(2).sum(dim=2)


def soft_color_masks(
    images: Tensor,
    sharpness: float = 0.01,
    color_threshold: float = COLOR_THRESHOLD,
    min_intensity: float = MIN_INTENSITY,
) -> Tensor:
    """The checker's colour decision made differentiable: per pixel and palette colour, ``(B, K, H, W)`` in
    [0, 1], a sigmoid of how far the pixel's distance to the colour's shades lies inside ``color_threshold``
    (``sharpness``: the width of the sigmoid, in RGB distance), times a softmax preferring the nearest colour.
    At pixels well inside or outside the threshold it equals :func:`color_labels`' one-hot decision."""
    squared = shade_distances(images, min_intensity)
    distance = (squared + 1e-8).sqrt()
    inside = torch.sigmoid((color_threshold - distance) / sharpness)
    nearest = torch.softmax(-distance / sharpness, dim=1)
    return inside * nearest


def find_blobs(
    image: Tensor,
    color_threshold: float = COLOR_THRESHOLD,
    min_intensity: float = MIN_INTENSITY,
    min_area: float = MIN_AREA,
) -> dict[str, list[Blob]]:
    """The shapes of every palette colour in ``image`` ``(3, H, W)`` in [0, 1], as :class:`Blob` lists keyed
    by colour name (every colour present as a key; ordered by label)."""
    _validate(color_threshold, min_intensity, min_area)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"find_blobs takes one image of shape (3, H, W), got {tuple(image.shape)}")
    return _blobs(color_labels(image, color_threshold, min_intensity).numpy(), min_area)


def _blobs(labels: np.ndarray, min_area: float) -> dict[str, list[Blob]]:
    """The components of each colour of a label map ``(H, W)`` from :func:`color_labels`."""
    height, width = labels.shape
    min_pixels = max(1, int(np.ceil(min_area * height * width)))
    ones = np.ones(labels.shape, dtype=float)
    blobs: dict[str, list[Blob]] = {}
    for index, name in enumerate(PALETTE):
        components, n = ndimage.label(labels == index, structure=_EIGHT_CONNECTED)
        found = []
        if n:
            ids = np.arange(1, n + 1)
            areas = ndimage.sum_labels(ones, components, ids)
            centres = ndimage.center_of_mass(ones, components, ids)
            for area, (row, col) in zip(areas, centres):
                if area >= min_pixels:
                    # Pixel (row, col) covers [col, col + 1) x [row, row + 1): its centre is at +0.5.
                    centroid = ((col + 0.5) / width, (row + 0.5) / height)
                    found.append(Blob(name, float(area) / (height * width), centroid))
        blobs[name] = found
    return blobs


def check(
    images: Tensor,
    specs: Sequence[CaptionSpec | str],
    color_threshold: float = COLOR_THRESHOLD,
    min_intensity: float = MIN_INTENSITY,
    min_area: float = MIN_AREA,
) -> dict[str, Tensor]:
    """Whether each image shows what its caption asks (see the module docstring for each check).

    Args:
        images: ``(B, 3, H, W)`` in [0, 1], any size.
        specs: One :class:`CaptionSpec` or caption string per image.
        color_threshold: Largest RGB distance to a palette colour's shades that counts as the colour.
        min_intensity: Lowest intensity of a palette colour's shades.
        min_area: Smallest shape, as a fraction of the image's area.
    Returns:
        ``{"color_ok", "count_ok", "position_ok", "all_ok"}``, each a bool tensor ``(B,)`` on the CPU;
        ``.float().mean()`` is an accuracy.
    """
    _validate(color_threshold, min_intensity, min_area)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"check takes images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if len(specs) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(specs)} captions")
    # Parse every caption before any work, so a bad one fails at once.
    parsed = [parse_caption(spec) if isinstance(spec, str) else spec for spec in specs]
    results = {name: torch.zeros(images.shape[0], dtype=torch.bool) for name in CHECKS}
    labels = color_labels(images, color_threshold, min_intensity).numpy()
    for i, spec in enumerate(parsed):
        found = _blobs(labels[i], min_area)[spec.color]
        results["color_ok"][i] = len(found) > 0
        results["count_ok"][i] = len(found) == spec.count
        results["position_ok"][i] = len(found) > 0 and all(
            in_region(*blob.centroid, spec.region) for blob in found
        )
    results["all_ok"] = results["count_ok"] & results["position_ok"]
    return results
