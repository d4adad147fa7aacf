"""Gradient estimators: RLR and the baselines it is compared with (backprop, score function, GRPO), each a plan plus
surrogate terms."""

from rlr_lightning.estimators.backprop import FullBackprop, TruncatedBackprop
from rlr_lightning.estimators.base import (
    GradientEstimator,
    Rollout,
    SurrogateTerm,
    compute_advantages,
    derive_seed,
    rollout,
)
from rlr_lightning.estimators.grpo import GRPO
from rlr_lightning.estimators.rlr import RLR
from rlr_lightning.estimators.score import ScoreFunction
from rlr_lightning.estimators.step import (
    GradientEstimate,
    TermBackward,
    backward_terms,
    estimate_gradient,
    flat_grad,
)

__all__ = [
    "RLR",
    "FullBackprop",
    "GRPO",
    "GradientEstimate",
    "GradientEstimator",
    "TermBackward",
    "Rollout",
    "ScoreFunction",
    "SurrogateTerm",
    "TruncatedBackprop",
    "backward_terms",
    "compute_advantages",
    "derive_seed",
    "estimate_gradient",
    "flat_grad",
    "rollout",
]
