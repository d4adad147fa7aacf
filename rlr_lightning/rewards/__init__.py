"""Reward models: images in [0, 1] plus prompts in, one float32 reward per image out."""

from rlr_lightning.rewards.base import RewardModel
from rlr_lightning.rewards.toy import ColorBalance, QuantizedBrightness, TargetColor

__all__ = ["ColorBalance", "QuantizedBrightness", "RewardModel", "TargetColor"]
