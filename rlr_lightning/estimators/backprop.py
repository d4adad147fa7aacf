"""Pathwise baselines: full backprop (the exact reference) and truncated backprop (AlignProp, DRaFT-K)."""

from __future__ import annotations

import torch

from rlr_lightning.estimators.base import (
    GradientEstimator,
    Rollout,
    SurrogateTerm,
    perturbations_for,
)
from rlr_lightning.memory.plan import GraphShape
from rlr_lightning.sampling import Conditioning, Plan, Sampler


class FullBackprop(GradientEstimator):
    """Backpropagate the reward through every denoising step: the exact gradient, memory linear in ``T``.

    The reference of the unbiasedness tests on tiny models; infeasible at Stable Diffusion scale.

    Args:
        perturbation_scale: If > 0, every step runs at ``theta + u_k`` with the same seeded perturbations as
            ``RLR(zo_mode="parameter")``, so the gradient is that of the same smoothed objective (for
            like-for-like comparisons); 0 is the plain gradient.
        antithetic: With ``perturbation_scale``: run each prompt at ``theta + u`` and ``theta - u``, as RLR's
            antithetic pairs do.
    """

    def __init__(self, perturbation_scale: float = 0.0, antithetic: bool = False) -> None:
        super().__init__(baseline="none")
        if perturbation_scale < 0:
            raise ValueError(f"perturbation_scale must be >= 0, got {perturbation_scale}")
        self.perturbation_scale = perturbation_scale
        self.antithetic = antithetic and perturbation_scale > 0

    def graph_shape(self, num_steps: int, prompts: int, h: int | None = None) -> GraphShape:
        return GraphShape(prompts * (2 if self.antithetic else 1), windows=(num_steps,), reward_window=0)

    def plan(self, num_steps: int, step_generator: torch.Generator, rank_seed: int) -> Plan:
        perturbations = {}
        if self.perturbation_scale > 0:
            perturbations = perturbations_for(
                range(num_steps), rank_seed, self.perturbation_scale, self.antithetic
            )
        return Plan(num_steps, windows=((0, num_steps),), perturbations=perturbations)

    def terms(self, rollout: Rollout, sampler: Sampler, embeds: Conditioning) -> list[SurrogateTerm]:
        return reward_window_terms(self, rollout, sampler, embeds)


class TruncatedBackprop(GradientEstimator):
    """Backpropagate only through the last ``K`` steps (AlignProp, DRaFT-K); biased by the dropped steps.

    Args:
        k: Number of last steps backpropagated through (DRaFT-K); ignored when ``k_range`` is set.
        k_range: Inclusive ``[k_min, k_max]``: draw ``K`` uniformly each iteration, identically on all ranks
            (AlignProp's randomised truncation).
    """

    def __init__(self, k: int = 1, k_range: tuple[int, int] | None = None) -> None:
        super().__init__(baseline="none")
        lo, hi = (k, k) if k_range is None else (int(k_range[0]), int(k_range[1]))
        if lo < 1 or hi < lo:
            raise ValueError(
                f"truncation K must be >= 1 (k_range with k_min <= k_max), got k={k}, k_range={k_range}"
            )
        self.k_range = (lo, hi)
        self._k_option = "k" if k_range is None else "k_range"  # which option set K, for messages

    def setup(self, num_steps: int, eta: float, reward_differentiable: bool = True) -> None:
        lo, hi = self.k_range
        if hi > num_steps:
            given, fix = (
                (f"k={hi}", f"k <= {num_steps}")
                if getattr(self, "_k_option", "k_range") == "k"
                else (f"k_range [{lo}, {hi}]", f"k_range [{min(lo, num_steps)}, {num_steps}]")
            )
            raise ValueError(
                f"TruncatedBackprop {given}: truncation K={hi} exceeds the number of steps T={num_steps} "
                f"(model.num_steps); use {fix} or more steps"
            )
        super().setup(num_steps, eta, reward_differentiable)

    def graph_shape(self, num_steps: int, prompts: int, h: int | None = None) -> GraphShape:
        return GraphShape(prompts, windows=(self.k_range[1],), reward_window=0)

    def plan(self, num_steps: int, step_generator: torch.Generator, rank_seed: int) -> Plan:
        lo, hi = self.k_range
        k = int(torch.randint(lo, hi + 1, (1,), generator=step_generator)) if hi > lo else lo
        return Plan(num_steps, windows=((num_steps - k, num_steps),), info={"truncation": k})

    def terms(self, rollout: Rollout, sampler: Sampler, embeds: Conditioning) -> list[SurrogateTerm]:
        return reward_window_terms(self, rollout, sampler, embeds)


def reward_window_terms(
    estimator: GradientEstimator, rollout: Rollout, sampler: Sampler, embeds: Conditioning
) -> list[SurrogateTerm]:
    """``-mean r`` backpropagated through the plan's one window, which ends at the last step."""
    (window,) = rollout.plan.windows
    B = rollout.batch_size
    return estimator.window_terms(
        rollout, sampler, embeds, window, "fo", lambda view: -view.rewards().sum() / B
    )
