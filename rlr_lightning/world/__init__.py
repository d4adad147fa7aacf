"""The procedural shapes world (issue 12): captioned scenes of flat coloured shapes, a held-out split of caption
combinations, and an exact pixel checker of captions. Rewards on it are in :mod:`rlr_lightning.rewards.world`.

The caption grammar and what each caption means are documented in :mod:`rlr_lightning.world.scenes`; what the
checker decides and its thresholds in :mod:`rlr_lightning.world.checker`.
"""

from rlr_lightning.world.checker import (
    CHECKS,
    COLOR_THRESHOLD,
    MIN_AREA,
    MIN_INTENSITY,
    Blob,
    check,
    color_labels,
    find_blobs,
)
from rlr_lightning.world.scenes import (
    BACKGROUND,
    COUNTS,
    GRAMMAR,
    KINDS,
    PALETTE,
    REGION_MARGIN,
    REGIONS,
    SIZES,
    CaptionSpec,
    Example,
    Scene,
    Shape,
    ShapesWorldDataset,
    all_specs,
    caption,
    in_region,
    parse_caption,
    region_distance,
    render,
    sample_example,
    sample_scene,
    split_specs,
)

__all__ = [
    "BACKGROUND",
    "CHECKS",
    "COLOR_THRESHOLD",
    "COUNTS",
    "GRAMMAR",
    "KINDS",
    "MIN_AREA",
    "MIN_INTENSITY",
    "PALETTE",
    "REGIONS",
    "REGION_MARGIN",
    "SIZES",
    "Blob",
    "CaptionSpec",
    "Example",
    "Scene",
    "Shape",
    "ShapesWorldDataset",
    "all_specs",
    "caption",
    "check",
    "color_labels",
    "find_blobs",
    "in_region",
    "parse_caption",
    "region_distance",
    "render",
    "sample_example",
    "sample_scene",
    "split_specs",
]
