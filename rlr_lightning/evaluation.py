"""Evaluation helpers: image features and the diversity of a batch of samples.

Reward hacking and mode collapse show up as a reward that keeps rising while the samples of different
prompts and seeds converge; the mean pairwise distance of image features makes the second visible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlr_lightning.rewards.base import RewardModel


def image_features(images: Tensor, reward: RewardModel | None = None) -> Tensor:
    """Features for diversity, one row per image ``(B, 3, H, W)`` in [0, 1].

    The reward's own image embedding (:meth:`RewardModel.image_embedding`, e.g. CLIP's for the aesthetic,
    CLIP-score, HPSv2 and PickScore rewards), L2-normalised, so diversity is measured in the space the reward
    judges; for rewards without one (and no reward), 16 x 16 average-pooled pixels scaled to unit RMS per
    dimension.
    """
    embedding = reward.image_embedding(images) if reward is not None else None
    if embedding is not None:
        return F.normalize(embedding.float(), dim=-1)
    pooled = F.adaptive_avg_pool2d(images.float(), 16).flatten(1)
    return pooled / pooled.shape[1] ** 0.5


def mean_pairwise_distance(features: Tensor) -> Tensor:
    """Mean Euclidean distance over all pairs of rows (0 for identical samples); needs two rows or more."""
    n = features.shape[0]
    if n < 2:
        raise ValueError("diversity needs at least two samples")
    distances = torch.cdist(features.float().unsqueeze(0), features.float().unsqueeze(0)).squeeze(0)
    return distances.sum() / (n * (n - 1))
