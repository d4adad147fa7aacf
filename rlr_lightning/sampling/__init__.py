"""Sampling with transition log-probabilities, driven by a plan, over any denoiser and transition kernel.

One module per concern:

* :mod:`~rlr_lightning.sampling.conditioning`: what a trajectory is conditioned on (prompt embeddings with a
  model family's added conditioning, and DCoT's per-scale embeddings);
* :mod:`~rlr_lightning.sampling.denoisers`: a model family's network call;
* :mod:`~rlr_lightning.sampling.kernels`: the transition kernels (per-step times, sigmas and means; DDIM, and
  the flow-matching SDE) and the shared Gaussian log-density;
* :mod:`~rlr_lightning.sampling.plan`: plans, perturbations and the trajectories a run records;
* :mod:`~rlr_lightning.sampling.sampler`: the sampler, and the :class:`Sampler` protocol the estimators use.
"""

from rlr_lightning.sampling.conditioning import (
    Conditioning,
    PromptEmbeds,
    ScaledPromptEmbeds,
)
from rlr_lightning.sampling.denoisers import Denoiser, UNetDenoiser
from rlr_lightning.sampling.kernels import (
    DDIMSchedule,
    FlowMatchSDE,
    TransitionKernel,
    ddim_mean,
    gaussian_log_prob,
)
from rlr_lightning.sampling.plan import (
    Perturbation,
    Plan,
    StepOutput,
    Trajectory,
    WindowReplay,
)
from rlr_lightning.sampling.sampler import DDIMSampler, DiffusionSampler, Sampler

__all__ = [
    "Conditioning",
    "DDIMSampler",
    "DDIMSchedule",
    "Denoiser",
    "DiffusionSampler",
    "FlowMatchSDE",
    "Perturbation",
    "Plan",
    "PromptEmbeds",
    "Sampler",
    "ScaledPromptEmbeds",
    "StepOutput",
    "Trajectory",
    "TransitionKernel",
    "UNetDenoiser",
    "WindowReplay",
    "ddim_mean",
    "gaussian_log_prob",
]
