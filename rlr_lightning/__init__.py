"""Reward fine-tuning of diffusion models with the Recursive Likelihood Ratio (RLR) optimizer."""

from rlr_lightning.backbone import DiffusionBackbone, LoraSettings, ModelNotAvailableError
from rlr_lightning.sampling import DDIMSampler, Perturbation, Plan, PromptEmbeds, Trajectory

__version__ = "0.1.0"

__all__ = [
    "DDIMSampler",
    "DiffusionBackbone",
    "LoraSettings",
    "ModelNotAvailableError",
    "Perturbation",
    "Plan",
    "PromptEmbeds",
    "Trajectory",
]
