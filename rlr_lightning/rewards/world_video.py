"""Video rewards on the moving-shapes world (:mod:`rlr_lightning.world.motion`): prompts are its captions
(``"two red circles moving left"``), videos are ``(B, F, 3, H, W)`` in [0, 1].

``WorldMotionReward`` is a differentiable function of a soft mask of the asked colour in every frame;
``WorldMotionCheckerReward`` is the exact motion checker's verdict (non-differentiable: RLR scores its last
step by a likelihood ratio). A prompt that is not a caption of the world fails with the caption grammar.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from rlr_lightning.rewards.base import RewardModel
from rlr_lightning.rewards.world import WorldCheckerReward
from rlr_lightning.world.checker import MIN_AREA, soft_color_masks
from rlr_lightning.world.motion import (
    DIRECTIONS,
    MAX_CROSS_DISPLACEMENT,
    MAX_STILL_DISPLACEMENT,
    MIN_DISPLACEMENT,
    SPEED,
    MotionSpec,
    check_motion,
    net_displacement,
    parse_motion_caption,
)
from rlr_lightning.world.scenes import PALETTE

# Mass (fraction of a frame's area) added where a centroid divides by the colour's mass: about one pixel at 32
# px, far above what the soft mask leaks onto a black background (about 1e-4 per pixel at sharpness 0.05), so
# a frame without the colour has its centroid at the centre instead of dividing by nearly zero.
_EPS = 1e-3
# Squared length added under the square root of a displacement's length: its gradient at a clip that does not
# move at all (every render of a "still" caption) would otherwise be 0 / 0.
_LENGTH_EPS = 1e-8
_COLOR_INDEX = {name: i for i, name in enumerate(PALETTE)}


class WorldMotionReward(RewardModel):
    """Whether the asked colour moves the asked way over the clip, as a smooth version of the exact checker's
    motion verdict (``form="verdict"``, in [0, 1]) or as a displacement (``"displacement"``, ``"along"``).
    Differentiable.

    Per frame, the asked colour's soft mask (:func:`rlr_lightning.world.checker.soft_color_masks`: the exact
    checker's colour decision through a sigmoid ``sharpness`` wide in RGB distance, so the antialiased rims
    of other colours, which lie between palette colours, do not count) weights the pixel coordinates into a
    centroid; the net displacement ``d`` of that centroid over the clip is the slope of a least-squares line
    through the frames times ``F - 1`` (:func:`rlr_lightning.world.motion.net_displacement`: every frame gets
    a gradient). With ``u`` the asked unit direction, ``along = d . u`` and ``across = |d x u|``:

    * ``verdict`` (the default): the checker's thresholds through sigmoids ``width`` wide (fractions of the
      side), times the colour's soft presence in its sparsest frame. For a direction
      ``s((along - 0.14) / width) * s((0.07 - across) / width)``; for "staying still" ``s((0.07 - |d|) / width)``
      (:data:`~rlr_lightning.world.motion.MIN_DISPLACEMENT` and the other thresholds); presence is
      ``s((m - a) / (a / 2))`` for the frame with least soft mass ``m``, with ``a`` the checker's smallest
      shape (:data:`~rlr_lightning.world.checker.MIN_AREA`). About 0.9 for a render of the caption, near 0
      for a clip that stays still, moves another way or loses the colour: a clip moving a random way scores
      no better than a still one, so stillness is no refuge (the displacement form's flaw, below).
    * ``displacement``: ``(along - across) / L`` with ``L = SPEED * (F - 1)`` the displacement of a render
      (0.28 of the side at 9 frames): 1 for a render, 0 for no motion, -1 for the opposite way or across;
      ``-|d| / L`` for "staying still". Unbounded above (at most about 3 at 9 frames). Measured on
      ``moving-shapes`` (``docs/world.md``), full backprop toward it learnt to keep every clip still: a still
      clip scores 0 while a clip moving a random one of four ways averages -0.5, so the exact gradient
      raised the reward and lowered the checker's motion accuracy.
    * ``along``: ``along / L`` (``-|d| / L`` for "staying still"): 1 for a render, -1 the opposite way, 0 still
      or across, so a clip moving a random one of four ways averages what a still one scores.

    Only the asked colour's common centroid is judged, not its count or kind; a frame without the colour has
    its centroid at the centre.

    Args:
        form: ``verdict`` (the checker's motion verdict made smooth, in [0, 1]), ``displacement`` (the
            displacement along the asked way less the one across it, about [-1, 1]) or ``along`` (the
            displacement along the asked way only, about [-1, 1]).
        width: ``verdict``: width of the sigmoids around the checker's thresholds, a fraction of the side
            (0.03 is about 1 px at 32 px; larger passes more gradient far from the thresholds).
        sharpness: Width of the soft mask's sigmoid in RGB distance (smaller is closer to the checker, with
            smaller gradients on pixels far from the colour; the checker's own soft masks use 0.01).
    """

    video = True

    def __init__(
        self,
        form: Literal["verdict", "displacement", "along"] = "verdict",
        width: float = 0.03,
        sharpness: float = 0.05,
    ) -> None:
        super().__init__()
        if form not in ("verdict", "displacement", "along"):
            raise ValueError(f"form must be 'verdict', 'displacement' or 'along', got {form!r}")
        if not width > 0:
            raise ValueError(f"width must be > 0 (a fraction of the side, e.g. 0.03), got {width}")
        if not sharpness > 0:
            raise ValueError(f"sharpness must be > 0, got {sharpness}")
        self.form = form
        self.width = width
        self.sharpness = sharpness

    def _masks(self, videos: Tensor, specs: Sequence[MotionSpec]) -> Tensor:
        """The asked colour's soft mask in every frame, ``(B, F, H, W)``."""
        batch, frames, _, height, width = videos.shape
        masks = soft_color_masks(videos.float().flatten(0, 1), self.sharpness)
        masks = masks.view(batch, frames, len(PALETTE), height, width)
        index = torch.tensor([_COLOR_INDEX[spec.color] for spec in specs], device=videos.device)
        return masks.gather(2, index.view(-1, 1, 1, 1, 1).expand(-1, frames, 1, height, width)).squeeze(2)

    @staticmethod
    def _centroids(weights: Tensor) -> Tensor:
        height, width = weights.shape[-2:]
        xs = (torch.arange(width, device=weights.device, dtype=torch.float32) + 0.5) / width
        ys = (torch.arange(height, device=weights.device, dtype=torch.float32) + 0.5) / height
        mass = weights.mean(dim=(2, 3))
        # Pulled toward the centre by _EPS of mass, so a frame without the colour has a defined centroid.
        cx = ((weights * xs.view(1, 1, 1, -1)).mean(dim=(2, 3)) + 0.5 * _EPS) / (mass + _EPS)
        cy = ((weights * ys.view(1, 1, -1, 1)).mean(dim=(2, 3)) + 0.5 * _EPS) / (mass + _EPS)
        return torch.stack([cx, cy], dim=-1)

    def centroids(self, videos: Tensor, prompts: Sequence[str]) -> Tensor:
        """The soft centroid ``(x, y)`` of each frame's asked colour, ``(B, F, 2)`` in fractions of the side."""
        return self._centroids(self._masks(videos, [parse_motion_caption(prompt) for prompt in prompts]))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        specs = [parse_motion_caption(prompt) for prompt in prompts]
        frames = images.shape[1]
        if frames < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 frames to judge motion, got {frames}")
        masks = self._masks(images, specs)
        displacement = net_displacement(self._centroids(masks))  # (B, 2)
        direction = torch.tensor([DIRECTIONS[spec.motion] for spec in specs], device=images.device)
        along = (displacement * direction).sum(dim=-1)
        across = displacement[:, 0] * direction[:, 1] - displacement[:, 1] * direction[:, 0]
        length = (displacement.pow(2).sum(dim=-1) + _LENGTH_EPS).sqrt()
        still = torch.tensor([spec.motion == "still" for spec in specs], device=images.device)
        if self.form == "displacement":
            return torch.where(still, -length, along - across.abs()) / (SPEED * (frames - 1))
        if self.form == "along":
            return torch.where(still, -length, along) / (SPEED * (frames - 1))
        moving_ok = torch.sigmoid((along - MIN_DISPLACEMENT) / self.width) * torch.sigmoid(
            (MAX_CROSS_DISPLACEMENT - (across.pow(2) + _LENGTH_EPS).sqrt()) / self.width
        )
        still_ok = torch.sigmoid((MAX_STILL_DISPLACEMENT - length) / self.width)
        # The checker judges motion only where the colour is in every frame: the sparsest frame decides.
        sparsest = masks.mean(dim=(2, 3)).min(dim=1).values
        present = torch.sigmoid((sparsest - MIN_AREA) / (0.5 * MIN_AREA))
        return torch.where(still, still_ok, moving_ok) * present

    def extra_repr(self) -> str:
        return f"form={self.form!r}, width={self.width}, sharpness={self.sharpness}"


class WorldMotionCheckerReward(WorldCheckerReward):
    """The exact motion checker's verdict on each clip for its caption
    (:func:`rlr_lightning.world.motion.check_motion`). Not differentiable.

    1 when the caption holds (in every frame exactly the asked number of shapes of the asked colour, and their
    centroid's net displacement over the clip shows the asked motion), else 0; with ``partial_credit``, the
    mean of the colour, count and motion checks (0, 1/3, 2/3 or 1).

    Args:
        partial_credit: Score the mean of the three checks instead of all of them at once.
        color_threshold: Largest RGB distance of a pixel to a palette colour's shades that counts as that
            colour (below 0.5; see :mod:`rlr_lightning.world.checker`).
        min_intensity: Lowest intensity of a palette colour's shades (in (0, 1]).
        min_area: Smallest shape the checker counts, as a fraction of a frame's area.
    """

    differentiable = False
    video = True
    partial_checks = ("color_ok", "count_ok", "motion_ok")

    @staticmethod
    def probe() -> tuple[Tensor, list[str]]:
        return torch.zeros(1, 2, 3, 8, 8), ["a red circle moving left"]

    def verdicts(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        return check_motion(images, list(prompts), self.color_threshold, self.min_intensity, self.min_area)
