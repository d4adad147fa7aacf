"""The score-function estimator (REINFORCE; DDPO without clipping)."""

from __future__ import annotations

import torch

from rlr_lightning.estimators.base import GradientEstimator, Rollout, SurrogateTerm
from rlr_lightning.memory.plan import GraphShape
from rlr_lightning.sampling import Conditioning, Plan, Sampler


class ScoreFunction(GradientEstimator):
    """``A * grad log p(s_{k+1} | s_k)`` on every step (or a random subset): no reward gradient needed.

    Sampling keeps no graph; the stored transitions are re-scored afterwards in batched chunks, one
    backward per chunk, so memory is that of ``score_chunk_steps`` UNet calls.

    Args:
        subsample: Re-score only K random steps per iteration, scaled by ``T / K`` (unbiased; DDPO's
            timestep subsampling). ``None`` uses all ``T`` steps.
        baseline: ``leave_one_out`` over the global batch, ``group`` (the other samples of the same prompt; needs
            ``group_size >= 2``), or ``none``.
        normalize_advantages: Divide the estimate by the running reward standard deviation of earlier
            iterations (DDPO divides by the current batch's, which biases the estimate; this does not).
        score_chunk_steps: Steps per batched re-scoring call.
        reward_ema_decay: Decay of the running reward mean and standard deviation.
        group_size: Samples per prompt (each with its own noise), for the ``group`` baseline.
        step_baseline: Per-step baseline: ``none``, ``prompt_mean``, ``value``, ``muprop``, or one per step (see
            :class:`~rlr_lightning.estimators.GradientEstimator`).
        step_baseline_sigma_ratio: With one ``step_baseline`` name: the steps of sigma at most this share of the
            largest step sigma use it (1: every step).
    """

    requires_reward_grad = False

    def __init__(
        self,
        subsample: int | None = None,
        baseline: str = "leave_one_out",
        normalize_advantages: bool = False,
        score_chunk_steps: int = 4,
        reward_ema_decay: float = 0.9,
        group_size: int = 1,
        step_baseline: str | list[str] = "none",
        step_baseline_sigma_ratio: float = 1.0,
    ) -> None:
        super().__init__(
            baseline,
            normalize_advantages,
            score_chunk_steps,
            reward_ema_decay,
            group_size=group_size,
            step_baseline=step_baseline,
            step_baseline_sigma_ratio=step_baseline_sigma_ratio,
        )
        if subsample is not None and subsample < 1:
            raise ValueError(f"subsample must be >= 1 (or None for all steps), got {subsample}")
        self.subsample = subsample

    def uses_likelihood_ratios(self, num_steps: int) -> bool:
        return True

    def setup(self, num_steps: int, eta: float, reward_differentiable: bool = True) -> None:
        if self.subsample is not None and self.subsample > num_steps:
            raise ValueError(
                f"ScoreFunction subsample K={self.subsample} exceeds the number of steps T={num_steps} "
                f"(model.num_steps); use subsample <= {num_steps}, or null for every step"
            )
        super().setup(num_steps, eta, reward_differentiable)

    def graph_shape(self, num_steps: int, prompts: int, h: int | None = None) -> GraphShape:
        steps = self.subsample if self.subsample is not None else num_steps
        return GraphShape(
            prompts * self.samples_per_prompt,
            rescoring_steps=steps,
            rescore_steps_per_call=self.score_chunk_steps,
        )

    def plan(self, num_steps: int, step_generator: torch.Generator, rank_seed: int) -> Plan:
        info = {}
        if self.subsample is not None:
            pick = torch.randperm(num_steps, generator=step_generator)[: self.subsample]
            info["steps"] = sorted(pick.tolist())
        return Plan(num_steps, info=info)

    def likelihood_ratio_steps(self, plan: Plan) -> list[int]:
        return list(plan.info.get("steps", range(plan.num_steps)))

    def terms(self, rollout: Rollout, sampler: Sampler, embeds: Conditioning) -> list[SurrogateTerm]:
        T = rollout.plan.num_steps
        steps = rollout.plan.info.get("steps", list(range(T)))
        return self.score_terms(rollout, sampler, embeds, steps, T / len(steps), "zo")
