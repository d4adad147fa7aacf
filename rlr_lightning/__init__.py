"""Reward fine-tuning of diffusion models with the Recursive Likelihood Ratio (RLR) optimizer.

What users import lives here: the training module, the task, every backbone family, the estimators and the
rewards. The names load on first use (PEP 562), so ``rlr --help`` does not pay for Lightning and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Each exported name and the module that defines it.
_EXPORTS = {
    "RLRModule": "rlr_lightning.module",
    "Task": "rlr_lightning.task",
    "SamplingSettings": "rlr_lightning.task",
    "PromptDataModule": "rlr_lightning.data",
    # Model families.
    "DiffusionBackbone": "rlr_lightning.models",
    "StableDiffusionBackbone": "rlr_lightning.models",
    "StableDiffusionXLBackbone": "rlr_lightning.models",
    "StableDiffusion3Backbone": "rlr_lightning.models",
    "FluxBackbone": "rlr_lightning.models",
    "WanBackbone": "rlr_lightning.models",
    "FlowMatchingBackbone": "rlr_lightning.models",
    "LoraSettings": "rlr_lightning.models",
    "load_backbone": "rlr_lightning.models",
    "ModelNotAvailableError": "rlr_lightning.hub",
    # Sampling.
    "DDIMSampler": "rlr_lightning.sampling",
    "DiffusionSampler": "rlr_lightning.sampling",
    "Perturbation": "rlr_lightning.sampling",
    "Plan": "rlr_lightning.sampling",
    "PromptEmbeds": "rlr_lightning.sampling",
    "Trajectory": "rlr_lightning.sampling",
    # Estimators.
    "RLR": "rlr_lightning.estimators",
    "FullBackprop": "rlr_lightning.estimators",
    "TruncatedBackprop": "rlr_lightning.estimators",
    "ScoreFunction": "rlr_lightning.estimators",
    "GRPO": "rlr_lightning.estimators",
    "GradientEstimator": "rlr_lightning.estimators",
    "estimate_gradient": "rlr_lightning.estimators",
    # Rewards.
    "RewardModel": "rlr_lightning.rewards",
    "AestheticReward": "rlr_lightning.rewards",
    "CLIPScoreReward": "rlr_lightning.rewards",
    "HPSv2Reward": "rlr_lightning.rewards",
    "PickScoreReward": "rlr_lightning.rewards",
    "JpegCompressibility": "rlr_lightning.rewards",
    "JpegIncompressibility": "rlr_lightning.rewards",
    "WeightedSum": "rlr_lightning.rewards",
    "TargetColor": "rlr_lightning.rewards",
    "WorldCheckerReward": "rlr_lightning.rewards",
    "WorldColorReward": "rlr_lightning.rewards",
    "WorldCountReward": "rlr_lightning.rewards",
    "WorldPositionReward": "rlr_lightning.rewards",
    "PerFrameReward": "rlr_lightning.rewards",
    "TemporalConsistencyReward": "rlr_lightning.rewards",
    "WorldMotionReward": "rlr_lightning.rewards",
    "WorldMotionCheckerReward": "rlr_lightning.rewards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # loaded once
        return value
    raise AttributeError(f"module 'rlr_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from rlr_lightning.data import PromptDataModule
    from rlr_lightning.estimators import (
        GRPO,
        RLR,
        FullBackprop,
        GradientEstimator,
        ScoreFunction,
        TruncatedBackprop,
        estimate_gradient,
    )
    from rlr_lightning.hub import ModelNotAvailableError
    from rlr_lightning.models import (
        DiffusionBackbone,
        FlowMatchingBackbone,
        FluxBackbone,
        LoraSettings,
        StableDiffusion3Backbone,
        StableDiffusionBackbone,
        StableDiffusionXLBackbone,
        load_backbone,
    )
    from rlr_lightning.module import RLRModule
    from rlr_lightning.rewards import (
        AestheticReward,
        CLIPScoreReward,
        HPSv2Reward,
        JpegCompressibility,
        JpegIncompressibility,
        PickScoreReward,
        RewardModel,
        TargetColor,
        WeightedSum,
        WorldCheckerReward,
        WorldColorReward,
        WorldCountReward,
        WorldPositionReward,
    )
    from rlr_lightning.sampling import (
        DDIMSampler,
        DiffusionSampler,
        Perturbation,
        Plan,
        PromptEmbeds,
        Trajectory,
    )
    from rlr_lightning.task import SamplingSettings, Task
