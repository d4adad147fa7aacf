"""Simple rewards with no weights: for the CPU quickstart, tests and sanity checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rlr_lightning.rewards.base import RewardModel


class TargetColor(RewardModel):
    """Negative mean squared distance of every pixel to a target colour (higher is closer).

    Differentiable and easy to climb: the CPU quickstart's reward, where a rising curve is visible in
    minutes.

    Args:
        color: Target RGB colour in [0, 1].
        scale: Multiplier of the reward (100 gives rewards of order -1 to -10 for random images).
    """

    color: Tensor  # a buffer

    def __init__(self, color: tuple[float, float, float] = (0.9, 0.3, 0.1), scale: float = 100.0) -> None:
        super().__init__()
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise ValueError(f"color must be three values in [0, 1], got {color}")
        self.register_buffer(
            "color", torch.tensor(color, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.scale = scale

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return -self.scale * (images.float() - self.color).pow(2).mean(dim=(1, 2, 3))


class QuantizedBrightness(RewardModel):
    """Mean brightness rounded to ``levels`` steps: a reward with no useful gradient, declared as such.

    A stand-in for non-differentiable rewards (JPEG size, a classifier behind an API) in tests and demos.

    Args:
        levels: Number of quantisation levels of the brightness in [0, 1].
    """

    differentiable = False

    def __init__(self, levels: int = 64) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels must be >= 2, got {levels}")
        self.levels = levels

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return torch.round(images.float().mean(dim=(1, 2, 3)) * (self.levels - 1)) / (self.levels - 1)


class ColorBalance(RewardModel):
    """A weighted sum of the mean colour channels, e.g. red minus blue ("warmth"); unbounded and linear.

    Differentiable, with a gradient that never vanishes: the CPU quickstart's reward, where even the tiny
    random model's images can keep moving toward it.

    Args:
        weights: Weight of the mean of each of the R, G, B channels.
        scale: Multiplier of the reward.
    """

    weights: Tensor  # a buffer

    def __init__(self, weights: tuple[float, float, float] = (1.0, 0.0, -1.0), scale: float = 10.0) -> None:
        super().__init__()
        if len(weights) != 3:
            raise ValueError(f"weights must be three numbers (R, G, B), got {weights}")
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.scale = scale

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.scale * (images.float().mean(dim=(2, 3)) * self.weights).sum(dim=1)


def tiny_default_reward(name_or_path: str) -> RewardModel:
    """The toy reward a tiny model trains toward when none is given: :class:`TargetColor`, per frame
    (``PerFrameReward``) for the video family's tiny model."""
    from rlr_lightning.rewards.video import PerFrameReward
    from rlr_lightning.tiny import tiny_family

    return PerFrameReward(TargetColor()) if tiny_family(name_or_path) == "wan" else TargetColor()
