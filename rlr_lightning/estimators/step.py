"""The backward loop of one gradient estimate: the surrogate terms backpropagated one at a time.

:func:`backward_terms` is the only place terms are backpropagated. The training step
(``RLRModule.training_step``) calls it with Lightning's ``manual_backward``, DDP's gradient synchronisation on
the last term only and gradient accumulation; :func:`estimate_gradient` calls it outside training, for the
diagnostics, the benchmarks and the tests, which need the estimate as a vector.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rlr_lightning.estimators.base import GradientEstimator, RewardFn, Rollout, SurrogateTerm, rollout
from rlr_lightning.memory.plan import MemoryPlan
from rlr_lightning.sampling import Conditioning, Sampler


def flat_grad(params: Iterable[Tensor]) -> Tensor:
    """The ``.grad`` of ``params`` as one detached flat vector, in their order; zeros where a parameter has no
    gradient (a LoRA layer the terms did not reach), so vectors of different estimates line up."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten() for p in params]
    )


@dataclass
class TermBackward:
    """What :func:`backward_terms` did.

    Attributes:
        losses: The loss of each kind of term (``fo``, ``ho``, ``zo``, ``kl``; chunks of one kind summed).
        grads: The gradient of each kind, float64, flattened over the parameters (chunks summed before any
            norm is taken: a norm of a sum is not a sum of norms); empty unless recorded.
    """

    losses: dict[str, float] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)

    def norms(self) -> dict[str, float]:
        """The gradient norm of each kind of term, as if it had run unchunked."""
        return {name: float(grad.norm()) for name, grad in self.grads.items()}


def backward_terms(
    terms: Sequence[SurrogateTerm],
    params: Sequence[Tensor],
    divisor: float = 1,
    backward: Callable[[Tensor], None] = Tensor.backward,
    sync: Callable[[bool], AbstractContextManager] | None = None,
    record_grads: bool = True,
    isolate: bool = False,
) -> TermBackward:
    """Backpropagate ``terms`` one at a time, each graph freed before the next is built.

    Args:
        terms: The surrogate terms, in the order the estimator made them.
        params: The trainable parameters whose ``.grad`` the terms write.
        divisor: Each loss is divided by it (the micro-batches of one optimizer step).
        backward: How one loss is backpropagated (Lightning's ``manual_backward`` in training).
        sync: ``sync(last)`` wraps each backward; ``last`` is true for the last term (DDP synchronises
            gradients on that one only).
        record_grads: Record each kind's gradient (costs one copy of the gradient per term).
        isolate: Take each term's gradient from zero (``.grad`` set to ``None`` first; the caller keeps and
            restores what was there), so each share is exact; otherwise shares are differences of the
            accumulated ``.grad``, which leaves an accumulating (or synchronising) backward undisturbed.
    """
    done = TermBackward()
    for i, term in enumerate(terms):
        if isolate:
            for p in params:
                p.grad = None
        before = flat_grad(params) if record_grads and not isolate else None
        loss = term.loss() / divisor
        with sync(i == len(terms) - 1) if sync is not None else contextlib.nullcontext():
            backward(loss)
        done.losses[term.name] = done.losses.get(term.name, 0.0) + float(loss.detach())
        if record_grads:
            share = (flat_grad(params) if before is None else flat_grad(params) - before).double()
            done.grads[term.name] = done.grads[term.name] + share if term.name in done.grads else share
        del loss
    return done


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
    try:
        result = rollout(estimator, sampler, embeds, prompts, reward_fn, step_seed, rank_seed, memory=memory)
        done = backward_terms(result.terms, params, isolate=True)
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad
    # Losses are negated objectives: minus their gradients ascend the reward.
    terms = {name: -grad for name, grad in done.grads.items()}
    device = params[0].device if params else embeds.device
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=device)
    for share in terms.values():
        total = total + share
    return GradientEstimate(total, terms, result)
