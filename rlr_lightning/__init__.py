"""Reward fine-tuning of diffusion models with the Recursive Likelihood Ratio (RLR) optimizer."""

from rlr_lightning.hub import ModelNotAvailableError
from rlr_lightning.models import (
    DiffusionBackbone,
    LoraSettings,
    StableDiffusionBackbone,
    StableDiffusionXLBackbone,
    load_backbone,
)
from rlr_lightning.sampling import (
    DDIMSampler,
    DiffusionSampler,
    Perturbation,
    Plan,
    PromptEmbeds,
    Trajectory,
)

__version__ = "0.1.0"

__all__ = [
    "DDIMSampler",
    "DiffusionBackbone",
    "DiffusionSampler",
    "LoraSettings",
    "ModelNotAvailableError",
    "Perturbation",
    "Plan",
    "PromptEmbeds",
    "StableDiffusionBackbone",
    "StableDiffusionXLBackbone",
    "Trajectory",
    "load_backbone",
]
