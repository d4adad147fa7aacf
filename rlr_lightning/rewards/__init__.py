"""Reward models: images in [0, 1] plus prompts in, one float32 reward per image out.

Video rewards (``PerFrameReward``, ``TemporalConsistencyReward``, the moving-shapes world's ``WorldMotionReward``
and ``WorldMotionCheckerReward``, and a ``WeightedSum`` of them) take videos
``(B, F, 3, H, W)`` instead and give one reward per video.

Weighted rewards (``AestheticReward``, ``HPSv2Reward``, ``PickScoreReward``, ``CLIPScoreReward``) load from a
local path or their public source and raise :class:`MissingRewardWeightsError` (naming the file, its source
and the init option for a local copy) when neither is available. Heavy libraries (open_clip, transformers)
are imported only when such a reward is built.

``RemoteReward`` scores with a reward served over HTTP (``rlr serve-reward``, :mod:`rlr_lightning.rewards.server`);
it raises :class:`RewardServerError` when the server does not answer and :class:`RewardRequestError` when it
refuses a request.
"""

from rlr_lightning.rewards.aesthetic import AestheticHead, AestheticReward
from rlr_lightning.rewards.base import RewardModel
from rlr_lightning.rewards.clip_score import CLIPScoreReward, HPSv2Reward
from rlr_lightning.rewards.combine import WeightedSum
from rlr_lightning.rewards.jpeg import JpegCompressibility, JpegIncompressibility
from rlr_lightning.rewards.pickscore import PickScoreReward
from rlr_lightning.rewards.preprocess import CLIPPreprocess
from rlr_lightning.rewards.remote import RemoteReward, RewardRequestError, RewardServerError
from rlr_lightning.rewards.toy import ColorBalance, QuantizedBrightness, TargetColor
from rlr_lightning.rewards.video import PerFrameReward, TemporalConsistencyReward
from rlr_lightning.rewards.weights import MissingRewardWeightsError
from rlr_lightning.rewards.world import (
    WorldCheckerReward,
    WorldColorReward,
    WorldCountReward,
    WorldPositionReward,
)
from rlr_lightning.rewards.world_video import WorldMotionCheckerReward, WorldMotionReward

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
    "PerFrameReward",
    "PickScoreReward",
    "QuantizedBrightness",
    "RemoteReward",
    "RewardModel",
    "RewardRequestError",
    "RewardServerError",
    "TargetColor",
    "TemporalConsistencyReward",
    "WeightedSum",
    "WorldCheckerReward",
    "WorldColorReward",
    "WorldCountReward",
    "WorldMotionCheckerReward",
    "WorldMotionReward",
    "WorldPositionReward",
]


def reward_class_names() -> list[str]:
    """The reward models this package offers (class names for ``model.reward``)."""
    return sorted(
        name
        for name, cls in globals().items()
        if isinstance(cls, type) and issubclass(cls, RewardModel) and cls is not RewardModel
    )


def missing_reward_message(model: str, action: str, checkpoint_reward: str | None = None) -> str:
    """What to do when there is no reward to ``action`` (``train`` or ``validate``) ``model`` with.

    Args:
        model: The model's name or path.
        action: ``train`` or ``validate``.
        checkpoint_reward: The reward class a loaded checkpoint was trained with, if known.
    """
    trained = f" (this checkpoint was trained with {checkpoint_reward})" if checkpoint_reward else ""
    return (
        f"model.reward is required to {action} {model!r}: choose one of rlr_lightning.rewards "
        f"({', '.join(reward_class_names())}), e.g. --model.reward rlr_lightning.rewards.AestheticReward on the "
        f"command line, or RLRModule(reward=...) from Python. Checkpoints hold no reward{trained}: give it to "
        "RLRModule.load_from_checkpoint(path, reward=...). Sampling (generate) and export_lora need none."
    )
