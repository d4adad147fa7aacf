"""Combining rewards."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from rlr_lightning.rewards.base import RewardModel


class WeightedSum(RewardModel):
    """A weighted sum of rewards, e.g. aesthetic plus a little CLIP score to keep the prompt.

    Differentiable only if every part is; a non-differentiable part makes the whole sum non-differentiable
    (estimators then use no reward gradient at all, rather than the gradient of some parts only).

    The parts are all image rewards or all video rewards (:attr:`RewardModel.video`); a sum of video rewards
    is a video reward. To add an image reward to video rewards, wrap it in
    :class:`~rlr_lightning.rewards.PerFrameReward`, which scores it frame by frame.

    Args:
        rewards: The rewards to add (each a ``RewardModel``; in YAML, a list of class_path/init_args), all image
            rewards or all video rewards.
        weights: Weight of each reward, in the same order. None: all 1.
    """

    weights: Tensor  # a buffer

    def __init__(self, rewards: list[RewardModel], weights: list[float] | None = None) -> None:
        super().__init__()
        if not rewards:
            raise ValueError("WeightedSum needs at least one reward")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"{len(rewards)} rewards but {len(weights)} weights")
        videos = [reward for reward in rewards if reward.video]
        if videos and len(videos) != len(rewards):
            images = ", ".join(type(reward).__name__ for reward in rewards if not reward.video)
            raise ValueError(
                f"WeightedSum cannot mix image rewards ({images}) with video rewards "
                f"({', '.join(type(reward).__name__ for reward in videos)}): wrap each image reward in "
                "rlr_lightning.rewards.PerFrameReward to score videos frame by frame"
            )
        # An instance attribute, like differentiable: forward checks (B, F, 3, H, W) inputs for a video sum.
        self.video = bool(videos)
        self.rewards = nn.ModuleList(rewards)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.differentiable = all(reward.differentiable for reward in rewards)
        self.freeze()

    def image_embedding(self, images: Tensor) -> Tensor | None:
        """The image embedding of the first part that has one (in the order given), else None."""
        for reward in cast("Iterable[RewardModel]", self.rewards):  # nn.ModuleList is not generic
            embedding = reward.image_embedding(images)
            if embedding is not None:
                return embedding
        return None

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        parts = torch.stack([reward(images, prompts) for reward in self.rewards], dim=1)
        return parts @ self.weights.to(parts.dtype)
