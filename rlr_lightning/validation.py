"""Validation statistics: the reward of the validation samples, extra metric rewards and their diversity.

Aggregated over ranks by torchmetrics, so every rank logs the same values.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import Tensor, nn
from torchmetrics import CatMetric, MeanMetric

from rlr_lightning.evaluation import image_features, mean_pairwise_distance
from rlr_lightning.rewards import RewardModel


class ValidationRewards(nn.Module):
    """Collects the rewards of validation images over an epoch and reports their statistics.

    Args:
        metrics: Extra reward models reported on the validation prompts (never trained on).
    """

    def __init__(self, metrics: list[RewardModel] | None = None) -> None:
        super().__init__()
        self.metrics = nn.ModuleList([m.freeze() for m in metrics or []])
        self.names = [type(m).__name__ for m in self.metrics]
        self.rewards = CatMetric()
        self.metric_values = nn.ModuleList([CatMetric() for _ in self.metrics])
        self.diversity = MeanMetric()

    @torch.no_grad()
    def update(self, images: Tensor, prompts: list[str], reward: RewardModel) -> None:
        """Score one validation batch with the trained ``reward`` and every metric."""
        self.rewards.update(reward(images, prompts))
        # nn.ModuleList is not generic: its items are CatMetrics.
        for metric, values in zip(self.metrics, cast("Iterable[CatMetric]", self.metric_values)):
            values.update(metric(images, prompts))
        if len(prompts) > 1:
            self.diversity.update(mean_pairwise_distance(image_features(images, reward)))

    def compute(self) -> dict[str, Tensor]:
        """``val/reward_mean``, ``val/reward_std``, the same per metric and ``val/diversity``; then reset."""
        stats = {}
        metric_values = cast("Iterable[CatMetric]", self.metric_values)  # nn.ModuleList is not generic
        for name, values in [("reward", self.rewards), *zip(self.names, metric_values)]:
            v = values.compute().float().reshape(-1)
            stats[f"val/{name}_mean"] = v.mean()
            stats[f"val/{name}_std"] = v.std() if v.numel() > 1 else torch.zeros(())
            values.reset()
        if self.diversity.update_called:
            stats["val/diversity"] = self.diversity.compute()
        self.diversity.reset()
        return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in stats.items()}
