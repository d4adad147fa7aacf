"""Reward models: images in [0, 1] plus prompts in, one float32 reward per image out.

Weighted rewards (``AestheticReward``, ``HPSv2Reward``, ``PickScoreReward``, ``CLIPScoreReward``) load from a
local path or their public source and raise :class:`MissingRewardWeightsError` (naming the file, its source
and the init option for a local copy) when neither is available. Heavy libraries (open_clip, transformers)
are imported only when such a reward is built.
"""

from rlr_lightning.rewards.aesthetic import AestheticHead, AestheticReward
from rlr_lightning.rewards.base import RewardModel
from rlr_lightning.rewards.clip_score import CLIPScoreReward, HPSv2Reward
from rlr_lightning.rewards.combine import WeightedSum
from rlr_lightning.rewards.jpeg import JpegCompressibility, JpegIncompressibility
from rlr_lightning.rewards.pickscore import PickScoreReward
from rlr_lightning.rewards.preprocess import CLIPPreprocess
from rlr_lightning.rewards.toy import ColorBalance, QuantizedBrightness, TargetColor
from rlr_lightning.rewards.weights import MissingRewardWeightsError
from rlr_lightning.rewards.world import (
    WorldCheckerReward,
    WorldColorReward,
    WorldCountReward,
    WorldPositionReward,
)

__all__ = [
    "AestheticHead",
    "AestheticReward",
    "CLIPPreprocess",
    "CLIPScoreReward",
    "ColorBalance",
    "HPSv2Reward",
    "JpegCompressibility",
    "JpegIncompressibility",
    "MissingRewardWeightsError",
    "PickScoreReward",
    "QuantizedBrightness",
    "RewardModel",
    "TargetColor",
    "WeightedSum",
    "WorldCheckerReward",
    "WorldColorReward",
    "WorldCountReward",
    "WorldPositionReward",
]
