"""GRPO: the group-relative, clipped policy-gradient baseline of Flow-GRPO and DanceGRPO (``docs/flow_matching.md``).

Not an unbiased estimator of the reward gradient, and not meant as one: it is the method the flow-matching
literature trains SD 3.5 and FLUX with, implemented on the same sampler, plans and rollouts as RLR so that the two
are compared on equal terms. What makes it a *biased* baseline is spelled out where it happens: the group standard
deviation of the current samples in the advantage, the advantage clip, and the clipped ratio on later inner updates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlr_lightning.estimators.base import GradientEstimator, Rollout, SurrogateTerm
from rlr_lightning.memory.plan import GraphShape
from rlr_lightning.sampling import Conditioning, Plan, Sampler


class GRPO(GradientEstimator):
    """Group Relative Policy Optimization over the sampler's stochastic transitions (Flow-GRPO, Liu et al. 2025).

    Every prompt is sampled ``group_size`` times. A sample's advantage is its reward relative to its group,
    ``A_i = (r_i - mean_group) / (std_group + 1e-4)`` clipped to ``[-advantage_clip, advantage_clip]``. Each
    transition ``k`` of each sample then contributes the clipped surrogate

        min(rho A, clip(rho, 1 - clip_range, 1 + clip_range) A),   rho = p_theta(s_{k+1} | s_k) / p_old(s_{k+1} | s_k),

    and ``inner_updates`` optimizer steps are taken on each sampled batch. ``p_old`` is the first re-scoring of
    the batch (detached), so the first update's ratio is exactly 1 and its gradient is the score-function
    estimator's with the group baseline; later updates see the policy move and the clip hold it near ``p_old``.

    With ``kl_coefficient`` (Flow-GRPO's ``beta``) each trained transition also pays
    ``beta * mean_d (m_theta - m_base)^2 / (2 sigma_k^2)``: the KL divergence between its Gaussian transition and
    the base model's (LoRA off), averaged over latent dimensions as Flow-GRPO defines it (the exact KL is the
    sum, ``D`` times larger).

    A difference from Flow-GRPO's reference recipe, by design: the loss sums over the trained steps (scaled by
    ``T / K`` for a subset of ``K``), as every estimator here does, where Flow-GRPO averages; Adam makes the two
    the same update up to gradient clipping.

    Args:
        group_size: Images per prompt (Flow-GRPO: 24 on SD 3.5 for PickScore; 8 to 16 is common on fewer GPUs).
            ``data.batch_size`` counts prompts, so a rank samples ``batch_size * group_size`` images.
        clip_range: PPO clip ``epsilon`` of the likelihood ratio (Flow-GRPO: 1e-4); ``None`` turns the clip off.
        inner_updates: Optimizer steps per sampled batch (Flow-GRPO's ``num_inner_epochs``); each re-scores the
            trained steps at the current weights.
        scale_by_group_std: Divide the advantages by their group's reward standard deviation (Flow-GRPO does; it
            makes every group's step size alike, and biases the estimate). ``False`` keeps ``r - mean_group``.
        advantage_clip: Clip the advantages to ``[-advantage_clip, advantage_clip]`` (Flow-GRPO: 5); ``None``
            keeps them as they are.
        step_range: Train on the transitions of these steps only, ``[start, stop)`` in sampling order (the SDE
            window of MixGRPO and Flow-GRPO-Fast; pair it with the sampler's ``stochastic_steps``). ``None``: all.
        step_fraction: Train on this random fraction of the steps of ``step_range`` each iteration (Flow-GRPO's
            ``timestep_fraction``), the same steps on every rank; ``None``: all of them.
        kl_coefficient: Weight ``beta`` of the KL penalty to the base model (Flow-GRPO's recipes use small values,
            such as 0.01 to 0.04, against reward hacking); 0 turns it off and saves the base model's forward
            passes (one per trained transition and batch; they are reused across inner updates).
        score_chunk_steps: Steps per batched re-scoring call (memory).
        step_baseline: Per-step baseline subtracted before the group baseline: ``none``, ``prompt_mean``,
            ``value``, ``muprop``, or one per step (see :class:`~rlr_lightning.estimators.GradientEstimator`); the
            group's standard deviation still scales the result.
        step_baseline_sigma_ratio: With one ``step_baseline`` name: the steps of sigma at most this share of the
            largest step sigma use it (1: every step).
    """

    requires_reward_grad = False

    def __init__(
        self,
        group_size: int = 8,
        clip_range: float | None = 1e-4,
        inner_updates: int = 1,
        scale_by_group_std: bool = True,
        advantage_clip: float | None = 5.0,
        step_range: tuple[int, int] | None = None,
        step_fraction: float | None = None,
        kl_coefficient: float = 0.0,
        score_chunk_steps: int = 4,
        step_baseline: str | list[str] = "none",
        step_baseline_sigma_ratio: float = 1.0,
    ) -> None:
        if not isinstance(group_size, int) or group_size < 2:
            raise ValueError(
                f"GRPO compares the samples of a prompt with each other: group_size must be >= 2, got {group_size!r}"
            )
        super().__init__(
            "group",
            False,
            score_chunk_steps,
            group_size=group_size,
            step_baseline=step_baseline,
            step_baseline_sigma_ratio=step_baseline_sigma_ratio,
        )
        if clip_range is not None and not clip_range > 0:
            raise ValueError(f"clip_range must be > 0 (or null for no clipping), got {clip_range!r}")
        if not isinstance(inner_updates, int) or inner_updates < 1:
            raise ValueError(f"inner_updates must be an integer >= 1, got {inner_updates!r}")
        if advantage_clip is not None and not advantage_clip > 0:
            raise ValueError(f"advantage_clip must be > 0 (or null for none), got {advantage_clip!r}")
        if step_fraction is not None and not 0 < step_fraction <= 1:
            raise ValueError(
                f"step_fraction must be in (0, 1] (or null for every step), got {step_fraction!r}"
            )
        if not kl_coefficient >= 0:
            raise ValueError(
                f"kl_coefficient must be >= 0 (0 turns the KL penalty off), got {kl_coefficient!r}"
            )
        if step_range is not None:
            if len(step_range) != 2 or not 0 <= step_range[0] < step_range[1]:
                raise ValueError(
                    f"step_range must be [start, stop) with 0 <= start < stop, got {step_range!r}"
                )
            step_range = (int(step_range[0]), int(step_range[1]))
        self.clip_range = clip_range
        self.inner_updates = inner_updates
        self.scale_by_group_std = scale_by_group_std
        self.advantage_clip = advantage_clip
        self.step_range = step_range
        self.step_fraction = step_fraction
        self.kl_coefficient = float(kl_coefficient)

    def uses_likelihood_ratios(self, num_steps: int) -> bool:
        return True

    def setup(self, num_steps: int, eta: float, reward_differentiable: bool = True) -> None:
        if self.step_range is not None and self.step_range[1] > num_steps:
            raise ValueError(
                f"step_range {list(self.step_range)} reaches past the last step of T={num_steps} steps "
                f"(model.num_steps): its stop may be at most {num_steps}"
            )
        super().setup(num_steps, eta, reward_differentiable)

    def candidate_steps(self, num_steps: int) -> list[int]:
        start, stop = self.step_range if self.step_range is not None else (0, num_steps)
        return list(range(start, stop))

    def graph_shape(self, num_steps: int, prompts: int, h: int | None = None) -> GraphShape:
        steps = len(self.candidate_steps(num_steps))
        if self.step_fraction is not None:
            steps = max(1, math.ceil(self.step_fraction * steps))
        return GraphShape(
            prompts * self.samples_per_prompt,
            rescoring_steps=steps,
            rescore_steps_per_call=self.score_chunk_steps,
        )

    def plan(self, num_steps: int, step_generator: torch.Generator, rank_seed: int) -> Plan:
        steps = self.candidate_steps(num_steps)
        if self.step_fraction is not None:
            k = max(1, math.ceil(self.step_fraction * len(steps)))
            pick = torch.randperm(len(steps), generator=step_generator)[:k]
            steps = sorted(steps[i] for i in pick.tolist())
        return Plan(num_steps, info={"steps": steps})

    def likelihood_ratio_steps(self, plan: Plan) -> list[int]:
        return list(plan.info["steps"])

    def shape_advantages(self, advantages: Tensor, rewards: Tensor) -> Tensor:
        G = self.group_size
        if self.scale_by_group_std:
            groups = rewards.reshape(G, -1)  # row j: copy j of every prompt
            std = groups.std(0, unbiased=False).repeat(G)
            # r - mean(others) = G / (G - 1) (r - mean(group)): this is Flow-GRPO's (r - mean) / (std + 1e-4).
            advantages = advantages * (G - 1) / G / (std + 1e-4)
        if self.advantage_clip is not None:
            advantages = advantages.clamp(-self.advantage_clip, self.advantage_clip)
        return advantages

    def terms(self, rollout: Rollout, sampler: Sampler, embeds: Conditioning) -> list[SurrogateTerm]:
        """The clipped surrogate of the trained steps, in batched re-scoring chunks; called once per inner update."""
        steps = rollout.plan.info["steps"]
        deterministic = [k for k in steps if float(rollout.trajectory.sigmas[k]) == 0]
        if deterministic:
            raise ValueError(
                f"GRPO trains steps {steps}, but steps {deterministic} are deterministic (sigma 0: eta 0, or outside "
                "the sampler's stochastic steps); train only the stochastic ones (step_range)"
            )
        weight = len(self.candidate_steps(rollout.plan.num_steps)) / len(steps)
        B = rollout.batch_size
        steps_t = torch.as_tensor(steps, dtype=torch.long).repeat_interleave(B)
        samples_t = torch.arange(B).repeat(len(steps))
        per_call = self.score_chunk_steps * B
        if (cap := rollout.memory.rescore_cap()) is not None:
            per_call = min(per_call, cap)
        old_log_probs: dict[int, Tensor] = rollout.cache.setdefault("grpo_old_log_probs", {})
        base_means: dict[int, Tensor] = rollout.cache.setdefault("grpo_base_means", {})
        update = rollout.cache["grpo_update"] = rollout.cache.get("grpo_update", -1) + 1
        stats = {"clipped": 0.0, "rows": 0.0, "log_ratio_sq": 0.0, "kl": 0.0}

        def make(start: int) -> SurrogateTerm:
            rows = slice(start, start + per_call)

            def loss() -> Tensor:
                k, s = steps_t[rows], samples_t[rows]
                index, x, x_next = rollout.trajectory.rows(k, s)
                row_embeds = embeds.rows(k, s)
                step = sampler.step(index, x, row_embeds, prev_latents=x_next)
                log_p = step.log_prob
                assert log_p is not None  # every trained step is stochastic (checked above)
                old = old_log_probs.setdefault(start, log_p.detach())
                ratio = torch.exp(log_p - old)
                advantage = rollout.advantages_at(k, s)
                objective = ratio * advantage
                if self.clip_range is not None:
                    eps = self.clip_range
                    objective = torch.minimum(objective, ratio.clamp(1 - eps, 1 + eps) * advantage)
                    outside = (ratio.detach() - 1).abs() > eps
                    stats["clipped"] += float(outside.sum())
                stats["rows"] += ratio.numel()
                stats["log_ratio_sq"] += float((log_p.detach() - old).pow(2).sum())
                rollout.info["clip_fraction"] = stats["clipped"] / stats["rows"]
                # An estimate of KL(p_old || p_theta) per transition (the usual PPO diagnostic).
                rollout.info["approx_kl"] = 0.5 * stats["log_ratio_sq"] / stats["rows"]
                rollout.info["inner_update"] = float(update)
                loss = -objective.sum()
                if self.kl_coefficient > 0:
                    if start not in base_means:  # the base model does not move: once per batch
                        base_means[start] = sampler.base_mean(index, x, row_embeds)
                    sigma = step.sigma.reshape(-1, *([1] * (x.dim() - 1)))
                    kl = ((step.mean - base_means[start]) ** 2 / (2 * sigma**2)).flatten(1).mean(1)
                    stats["kl"] += float(kl.detach().sum())
                    rollout.info["kl"] = stats["kl"] / stats["rows"]
                    loss = loss + self.kl_coefficient * kl.sum()
                return weight * loss / B

            return SurrogateTerm("grpo", loss)

        return [make(i) for i in range(0, len(steps_t), per_call)]
