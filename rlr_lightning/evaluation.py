"""Evaluation helpers: image features and the diversity of a batch of samples.

Reward hacking and mode collapse show up as a reward that keeps rising while the samples of different
prompts and seeds converge; the mean pairwise distance of image features makes the second visible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def image_features(images: Tensor, encoder: nn.Module | None = None) -> Tensor:
    """Features for diversity: ``encoder.image_features(images)`` L2-normalised when the encoder (e.g. a
    CLIP-based reward) has one, else 16 x 16 average-pooled pixels scaled to unit RMS per dimension."""
    extract = getattr(encoder, "image_features", None)
    if callable(extract):
        return F.normalize(extract(images).float(), dim=-1)
    pooled = F.adaptive_avg_pool2d(images.float(), 16).flatten(1)
    return pooled / pooled.shape[1] ** 0.5


def mean_pairwise_distance(features: Tensor) -> Tensor:
    """Mean Euclidean distance over all pairs of rows (0 for identical samples); needs two rows or more."""
    n = features.shape[0]
    if n < 2:
        raise ValueError("diversity needs at least two samples")
    distances = torch.cdist(features.float().unsqueeze(0), features.float().unsqueeze(0)).squeeze(0)
    return distances.sum() / (n * (n - 1))
