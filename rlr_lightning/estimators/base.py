"""What every gradient estimator shares: a plan, surrogate terms, advantages and one rollout.

An estimator is two things (``architecture.md``): a :class:`~rlr_lightning.sampling.Plan` for the sampler
and a list of :class:`SurrogateTerm` whose autograd gradients add up to the estimate. Each term builds its
loss lazily, so a caller can backpropagate the terms one at a time and free each graph before the next
(the likelihood-ratio re-scoring of many steps would otherwise hold every chunk's activations at once).
Losses are *negated* objectives: minimising them ascends the reward.

:func:`rollout` runs one estimator step without Lightning; the ``LightningModule``, the tests and the
diagnostics all call it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rlr_lightning.sampling import Conditioning, DDIMSampler, Perturbation, Plan, Trajectory

#: ``reward_fn(final_latents, prompts) -> (B,)`` rewards; differentiable in the latents when FO needs it.
RewardFn = Callable[[Tensor, Sequence[str]], Tensor]
#: Gathers a detached per-rank tensor from all ranks (identity on one process).
GatherFn = Callable[[Tensor], Tensor]

_BASELINES = ("leave_one_out", "none")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, ...), stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class SurrogateTerm:
    """One part of the estimate: ``loss()`` builds a scalar whose gradient is minus that part.

    Attributes:
        name: ``fo``, ``ho`` or ``zo``: the share of the gradient it carries, for per-term logging.
        loss: Builds the loss; called once, right before its backward.
    """

    name: str
    loss: Callable[[], Tensor]


@dataclass
class Rollout:
    """One sampled batch and everything an estimator derived from it.

    Attributes:
        plan: The plan the trajectory ran.
        trajectory: The sampled trajectory.
        prompts: The prompts of the (possibly doubled) batch.
        rewards: ``(B,)`` rewards; carry a graph to the FO window when there is one.
        all_rewards: Detached rewards of the global batch (all ranks), ``(N,)``.
        advantages: ``(B,)`` detached advantages ``r - b``.
        terms: The surrogate terms to backpropagate.
        info: Scalars worth logging (block start, truncation, ...).
    """

    plan: Plan
    trajectory: Trajectory
    prompts: list[str]
    rewards: Tensor
    all_rewards: Tensor
    advantages: Tensor
    terms: list[SurrogateTerm] = field(default_factory=list)
    info: dict[str, float] = field(default_factory=dict)


def compute_advantages(
    rewards: Tensor, all_rewards: Tensor, baseline: str = "leave_one_out", normalize_std: bool = False
) -> Tensor:
    """Advantages of the local samples against a baseline over the global batch.

    The leave-one-out mean excludes the sample itself, so the baseline is independent of that sample's
    noise and the likelihood-ratio terms stay unbiased; dividing by the batch standard deviation rescales
    the step, it does not bias its direction.
    """
    r = rewards.detach().float()
    if baseline == "leave_one_out":
        n = all_rewards.numel()
        if n < 2:
            raise ValueError("a leave-one-out baseline needs a global batch of at least 2 samples")
        advantages = r - (all_rewards.sum() - r) / (n - 1)
    elif baseline == "none":
        advantages = r
    else:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {_BASELINES}")
    if normalize_std:
        advantages = advantages / (all_rewards.float().std() + 1e-8)
    return advantages


class GradientEstimator(ABC):
    """Base class: subclasses decide the plan and the surrogate terms.

    Args:
        baseline: Baseline of the likelihood-ratio advantages: ``leave_one_out`` (mean of the other samples
            of the global batch, all ranks) or ``none``.
        normalize_advantages: Divide advantages by the global batch's reward standard deviation.
        score_chunk_steps: How many steps' transitions one batched re-scoring UNet call covers (memory).
    """

    #: Whether the estimator backpropagates through the reward model.
    requires_reward_grad: bool = True
    #: Whether the batch runs as antithetic pairs (each prompt twice, at theta + u and theta - u).
    antithetic: bool = False

    def __init__(
        self, baseline: str = "leave_one_out", normalize_advantages: bool = False, score_chunk_steps: int = 4
    ) -> None:
        if baseline not in _BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {_BASELINES}")
        if score_chunk_steps < 1:
            raise ValueError(f"score_chunk_steps must be >= 1, got {score_chunk_steps}")
        self.baseline = baseline
        self.normalize_advantages = normalize_advantages
        self.score_chunk_steps = score_chunk_steps

    @property
    def name(self) -> str:
        return type(self).__name__

    # -- to override -------------------------------------------------------------------------------------

    def setup(self, num_steps: int, eta: float, reward_differentiable: bool = True) -> None:
        """Check the estimator can run with ``T = num_steps``, this ``eta`` and this reward; raise otherwise.

        Called once the sampler and reward are known (at the module's construction), before any sampling.
        """
        self._check_eta(num_steps, eta)
        if self.requires_reward_grad and not reward_differentiable:
            raise ValueError(
                f"{self.name} backpropagates through the reward, but the reward is not differentiable; use RLR "
                "(which then scores the last step by its likelihood ratio) or ScoreFunction"
            )

    def uses_likelihood_ratios(self, num_steps: int) -> bool:
        return False

    @abstractmethod
    def plan(self, num_steps: int, step_generator: torch.Generator, rank_seed: int) -> Plan:
        """The plan of one iteration.

        Args:
            num_steps: ``T``.
            step_generator: Seeded from the global step only, identical on all ranks: draw everything that
                decides the graph (block start, truncation length) from it.
            rank_seed: Per-rank seed for what must differ across ranks (parameter perturbations).
        """

    @abstractmethod
    def terms(self, rollout: Rollout, sampler: DDIMSampler, embeds: Conditioning) -> list[SurrogateTerm]:
        """The surrogate terms of a sampled and scored rollout."""

    def observe(self, rollout: Rollout, grad_norms: dict[str, float]) -> None:
        """Update running statistics after the backward passes (called only on a completed update)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (resume)."""

    # -- shared pieces ---------------------------------------------------------------------------------

    def _check_eta(self, num_steps: int, eta: float) -> None:
        if self.uses_likelihood_ratios(num_steps) and not eta > 0:
            raise ValueError(
                f"{self.name} uses likelihood-ratio terms, which need a stochastic sampler: eta must be > 0, "
                f"got {eta}"
            )

    def score_terms(
        self,
        rollout: Rollout,
        sampler: DDIMSampler,
        embeds: Conditioning,
        steps: Sequence[int],
        weight: float,
        name: str,
    ) -> list[SurrogateTerm]:
        """Likelihood-ratio terms ``weight * mean_b A_b * log p(s_{k+1} | s_k)`` for ``steps``, re-scored in
        chunks of ``score_chunk_steps`` (one UNet call and one backward each)."""
        steps = list(steps)
        B = rollout.trajectory.batch_size
        chunks = [steps[i : i + self.score_chunk_steps] for i in range(0, len(steps), self.score_chunk_steps)]

        def make(chunk: list[int]) -> Callable[[], Tensor]:
            def loss() -> Tensor:
                index, x, x_next = rollout.trajectory.transitions(chunk)
                log_p = sampler.log_probs(index, x, x_next, embeds.for_steps(chunk))
                return -weight * (rollout.advantages.repeat(len(chunk)) * log_p).sum() / B

            return loss

        return [SurrogateTerm(name, make(chunk)) for chunk in chunks]


def _identity(x: Tensor) -> Tensor:
    return x


def rollout(
    estimator: GradientEstimator,
    sampler: DDIMSampler,
    embeds: Conditioning,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    step_seed: int,
    rank_seed: int,
    gather: GatherFn = _identity,
) -> Rollout:
    """Plan, sample, score and build the surrogate terms of one iteration; no backward yet.

    Args:
        estimator: The gradient estimator.
        sampler: The DDIM sampler over the trainable UNet.
        embeds: Prompt embeddings of the local batch.
        prompts: The local prompts (passed to the reward).
        reward_fn: ``(final_latents, prompts) -> rewards``.
        step_seed: Identical on all ranks (derive it from the run seed and the global step).
        rank_seed: Different on every rank (derive it from the run seed, the global step and the rank).
        gather: All-gather of a detached tensor over ranks (identity on one process).
    """
    T = sampler.num_steps
    step_generator = torch.Generator().manual_seed(step_seed)
    plan = estimator.plan(T, step_generator, rank_seed)
    B = embeds.batch_size
    device = embeds.device
    x0, noises = sampler.initial_noise(B, torch.Generator().manual_seed(rank_seed), device)
    prompts = list(prompts)
    if estimator.antithetic:
        # Common random numbers: both members of a pair share prompt, initial noise and step noises, and
        # differ only in the sign of the parameter perturbation.
        embeds = embeds.repeat(2)
        prompts = prompts * 2
        x0 = torch.cat([x0, x0])
        noises = torch.cat([noises, noises], dim=1)
    trajectory = sampler.run(plan, embeds, initial_latents=x0, noises=noises)
    with torch.set_grad_enabled(trajectory.final.requires_grad):
        rewards = reward_fn(trajectory.final, prompts).float()
    if rewards.shape != (len(prompts),):
        raise ValueError(f"the reward returned shape {tuple(rewards.shape)}, expected ({len(prompts)},)")
    all_rewards = gather(rewards.detach()).reshape(-1)
    advantages = compute_advantages(rewards, all_rewards, estimator.baseline, estimator.normalize_advantages)
    result = Rollout(plan, trajectory, prompts, rewards, all_rewards, advantages)
    result.terms = estimator.terms(result, sampler, embeds)
    return result


def perturbations_for(steps: Sequence[int], rank_seed: int, scale: float, antithetic: bool) -> dict[int, Perturbation]:
    """One independent seeded perturbation per step (seeds derived from the rank seed and the step)."""
    # The constant separates these seeds from the rank seed's other uses (the noise generator).
    return {k: Perturbation(derive_seed(rank_seed, 7919, k), scale, antithetic) for k in steps}
