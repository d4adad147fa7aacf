"""A KL penalty toward the base model, for every estimator: it changes the objective, not how its gradient is
estimated, so it is a term added next to any estimator's terms (``RLRModule(kl_coefficient=...)``).

The objective becomes ``E[r] - beta * sum_k KL_k`` with, per stochastic transition ``k`` of a sampled
trajectory, the divergence of the fine-tuned Gaussian transition from the base model's (LoRA off) at the same
state: ``KL_k = mean_d (m_theta(s_k) - m_base(s_k))^2 / (2 sigma_k^2)``, averaged over latent dimensions as
Flow-GRPO defines it (the exact KL is the sum, ``D`` times larger). As in Flow-GRPO, the states are the sampled
ones, detached: the penalty's gradient is that of the per-step divergences at those states, not the score-
function part of the path KL's gradient (which has the divergence as its "reward" and a variance of its
own). Deterministic steps (sigma 0: eta 0, or outside a flow model's SDE window) have no transition density
and carry no penalty; a sampler with none is refused (use LoRA weight decay there).

Each batch draws ``steps`` of the stochastic steps uniformly (without replacement) and scales their sum by
``stochastic steps / steps``: an unbiased estimate of the sum over all of them at ``2 * steps`` extra network
calls per sample (the adapted one with gradient, the base one without).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlr_lightning.estimators.base import Rollout, SurrogateTerm
from rlr_lightning.sampling import Conditioning, Sampler

#: The name of the penalty's surrogate term (its loss and gradient norm are logged under it).
KL_TERM = "kl"


def stochastic_steps(sigmas: Tensor) -> list[int]:
    """The steps with a transition density (sigma > 0)."""
    return [k for k, sigma in enumerate(sigmas.tolist()) if sigma > 0]


def check_kl_sampler(sigmas: Tensor) -> None:
    """Refuse a KL penalty on a sampler without stochastic steps (named in the message)."""
    if not stochastic_steps(sigmas):
        raise ValueError(
            "kl_coefficient > 0 needs a stochastic sampler (eta > 0): every step of this one is deterministic "
            "(sigma 0), and deterministic transitions have no KL divergence; set eta > 0, or kl_coefficient 0 and "
            "weight decay on the LoRA"
        )


def kl_terms(
    rollout: Rollout, sampler: Sampler, embeds: Conditioning, coefficient: float, steps: int, seed: int
) -> list[SurrogateTerm]:
    """The KL penalty as surrogate terms (one per drawn step) of a sampled batch.

    Args:
        rollout: The sampled batch (its trajectory's stored states are scored).
        sampler: The sampler that drew it (the adapted and the base transition means).
        embeds: The batch's conditioning, as the estimator's terms take it.
        coefficient: ``beta``.
        steps: Stochastic steps drawn per batch (all of them if there are fewer).
        seed: Seed of the draw (the same on every rank, so every rank builds the same graph).
    """
    trajectory = rollout.trajectory
    candidates = stochastic_steps(trajectory.sigmas)
    check_kl_sampler(trajectory.sigmas)
    generator = torch.Generator().manual_seed(seed)
    drawn = [
        candidates[i] for i in torch.randperm(len(candidates), generator=generator)[: max(1, steps)].tolist()
    ]
    weight = len(candidates) / len(drawn)
    B = trajectory.batch_size
    base_means: dict[int, Tensor] = rollout.cache.setdefault("kl_base_means", {})
    totals = rollout.cache.setdefault("kl_totals", {"sum": 0.0, "rows": 0})

    def make(k: int) -> SurrogateTerm:
        def loss() -> Tensor:
            rows_k, samples = torch.full((B,), k, dtype=torch.long), torch.arange(B)
            index, x, _ = trajectory.rows(rows_k, samples)
            row_embeds = embeds.rows(rows_k, samples)
            if k not in base_means:  # the base model does not move: once per batch (GRPO's inner updates)
                base_means[k] = sampler.base_mean(index, x, row_embeds)
            mean = sampler.step(index, x, row_embeds, prev_latents=trajectory.latents[k + 1]).mean
            sigma = trajectory.sigmas[k].to(mean.device)
            kl = ((mean - base_means[k]) ** 2 / (2 * sigma**2)).flatten(1).mean(1)
            totals["sum"] += float(kl.detach().sum())
            totals["rows"] += B
            # Per transition, averaged over the drawn ones: comparable across batch sizes and step counts.
            rollout.info["kl"] = totals["sum"] / totals["rows"]
            return coefficient * weight * kl.sum() / B

        return SurrogateTerm(KL_TERM, loss)

    return [make(k) for k in drawn]


class KLPenalty:
    """The KL penalty's settings, checked once, and its terms for a batch (none when it is off).

    Args:
        coefficient: ``beta`` (0 turns the penalty off).
        steps: Stochastic steps drawn per batch.
        eta: The sampler's noise level (the penalty needs stochastic transitions).
        estimator_coefficient: The estimator's own KL coefficient (GRPO's), which must not also be set.
    """

    def __init__(
        self, coefficient: float, steps: int, eta: float, estimator_coefficient: float = 0.0
    ) -> None:
        if not coefficient >= 0:
            raise ValueError(f"kl_coefficient must be >= 0 (0 turns the KL penalty off), got {coefficient!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"kl_steps must be an integer >= 1, got {steps!r}")
        if coefficient > 0 and eta == 0:
            raise ValueError(
                "kl_coefficient > 0 needs a stochastic sampler: eta is 0, and deterministic transitions have no KL "
                "divergence; set eta > 0, or kl_coefficient 0 (weight decay on the LoRA regularises any sampler)"
            )
        if coefficient > 0 and estimator_coefficient > 0:
            raise ValueError(
                "both model.kl_coefficient and the GRPO estimator's kl_coefficient are set: the penalty would count "
                "twice; keep one (model.kl_coefficient works with every estimator)"
            )
        self.coefficient = float(coefficient)
        self.steps = steps

    def terms(self, rollout: Rollout, sampler: Sampler, seed: int) -> list[SurrogateTerm]:
        """The penalty's terms for ``rollout`` (none when off); ``seed`` draws the steps, the same on every rank
        and inner update."""
        if self.coefficient == 0:
            return []
        assert rollout.embeds is not None  # rollout() records the batch's conditioning
        return kl_terms(rollout, sampler, rollout.embeds, self.coefficient, self.steps, seed)
