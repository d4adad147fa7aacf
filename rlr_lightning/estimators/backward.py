"""One gradient estimate outside the training loop: rollout, then every term's backward, then the gradient.

The diagnostics, the benchmarks and the tests all need the estimate as a vector; the training step
(``RLRModule.training_step``) runs the same rollout and backward order itself, with DDP synchronisation,
gradient accumulation and skips on top.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rlr_lightning.estimators.base import GradientEstimator, RewardFn, Rollout, rollout
from rlr_lightning.memory import MemoryPlan
from rlr_lightning.sampling import Conditioning, Sampler


def flat_grad(params: Iterable[Tensor]) -> Tensor:
    """The ``.grad`` of ``params`` as one detached flat vector, in their order; zeros where a parameter has no
    gradient (a LoRA layer the terms did not reach), so vectors of different estimates line up."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten() for p in params])


@dataclass
class GradientEstimate:
    """One draw of an estimator, as ascent directions (``+grad J``) in float64.

    Attributes:
        total: The whole estimate, flattened over the trainable parameters: the sum of ``terms``.
        terms: The gradient of each kind of term (``fo``, ``ho``, ``zo``; chunks of one kind summed).
        rollout: The rollout the terms came from (rewards, plan, info), e.g. for ``estimator.observe``.
    """

    total: Tensor
    terms: dict[str, Tensor]
    rollout: Rollout


def estimate_gradient(
    estimator: GradientEstimator,
    sampler: Sampler,
    embeds: Conditioning,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    step_seed: int,
    rank_seed: int,
    memory: MemoryPlan | None = None,
) -> GradientEstimate:
    """Run :func:`~rlr_lightning.estimators.rollout`, backpropagate its terms one at a time (each graph freed
    before the next is built) and return the estimate over ``sampler.trainable_parameters()``.

    Arguments are those of :func:`~rlr_lightning.estimators.rollout` (one process: no gather). The same seeds
    give the same estimate, and estimators drawn with the same seeds share their noise (common random
    numbers). Each term's gradient is taken from zero, so per-term shares are exact; the parameters'
    ``.grad`` are left as they were found (an accumulating training step is not disturbed). The estimator's
    running statistics are not updated: call ``estimator.observe(estimate.rollout, {})`` for that.
    """
    params = list(sampler.trainable_parameters().values())
    saved = [p.grad for p in params]
    terms: dict[str, Tensor] = {}
    try:
        result = rollout(estimator, sampler, embeds, prompts, reward_fn, step_seed, rank_seed, memory=memory)
        for term in result.terms:
            for p in params:
                p.grad = None
            term.loss().backward()
            # Losses are negated objectives: minus their gradients ascend the reward.
            share = -flat_grad(params).double()
            terms[term.name] = terms[term.name] + share if term.name in terms else share
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad
    device = params[0].device if params else embeds.device
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=device)
    for share in terms.values():
        total = total + share
    return GradientEstimate(total, terms, result)
