"""The KL penalty toward the base model (``RLRModule(kl_coefficient=...)``), for every estimator.

* Its terms' gradient is exactly that of ``beta * sum_k mean_d (m_theta - m_base)^2 / (2 sigma_k^2) / B`` at the
  sampled states, with the base means from an independent copy of the denoiser (every ``lora_B`` at zero).
* Drawing one step per batch is unbiased: the drawn steps' scaled gradients average to the all-steps gradient.
* It adds the same gradient to every estimator's (it is a term of the objective, not of an estimator).
"""

from __future__ import annotations

import pytest
import torch

from rlr_lightning.estimators import (
    GRPO,
    RLR,
    FullBackprop,
    ScoreFunction,
    TruncatedBackprop,
    estimate_gradient,
)
from rlr_lightning.estimators.regularizers import KL_TERM, kl_terms
from tests.estimators.harness import ToyProblem, base_kl_gradient

BETA = 0.7


@pytest.fixture(scope="module")
def problem():
    return ToyProblem(num_steps=4, eta=1.0, guidance_scale=2.0, timestep_spacing="leading", batch=2)


def penalty_gradient(problem, result, steps: int, seed: int) -> torch.Tensor:
    params = list(problem.sampler.trainable_parameters().values())
    for p in params:
        p.grad = None
    terms = kl_terms(result, problem.sampler, result.embeds, BETA, steps, seed)
    assert {term.name for term in terms} == {KL_TERM}
    for term in terms:
        term.loss().backward()
    grad = torch.cat([p.grad.flatten() for p in params]).double()
    for p in params:
        p.grad = None
    return grad


@pytest.mark.parametrize(
    "estimator",
    [RLR(h=1), FullBackprop(), TruncatedBackprop(k=1), ScoreFunction(), GRPO(group_size=2)],
    ids=lambda e: type(e).__name__,
)
def test_the_penalty_is_the_transition_kl_gradient_for_every_estimator(problem, estimator):
    estimator.setup(problem.num_steps, problem.eta)
    embeds, prompts = problem.embeds, problem.prompts
    if estimator.group_size > 1:
        embeds, prompts = embeds.repeat(estimator.group_size), prompts * estimator.group_size
    result = estimate_gradient(estimator, problem.sampler, embeds, prompts, problem.reward, 3, 10_003).rollout
    expected = base_kl_gradient(problem.sampler, result, BETA)
    assert expected.norm() > 0
    got = penalty_gradient(problem, result, steps=problem.num_steps, seed=0)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert result.info["kl"] > 0


def test_one_drawn_step_per_batch_is_unbiased(problem):
    """Each step is drawn with probability 1 / T and scaled by T: over the T possible draws the mean is exact."""
    estimator = FullBackprop()
    estimator.setup(problem.num_steps, problem.eta)
    result = estimate_gradient(
        estimator, problem.sampler, problem.embeds, problem.prompts, problem.reward, 1, 10_001
    ).rollout
    full = penalty_gradient(problem, result, steps=problem.num_steps, seed=0)
    by_step: dict[int, torch.Tensor] = {}
    for seed in range(200):
        drawn = int(torch.randperm(problem.num_steps, generator=torch.Generator().manual_seed(seed))[0])
        if drawn not in by_step:
            by_step[drawn] = penalty_gradient(problem, result, steps=1, seed=seed)
        if len(by_step) == problem.num_steps:
            break
    assert sorted(by_step) == list(range(problem.num_steps))
    mean = torch.stack(list(by_step.values())).mean(0)
    assert torch.allclose(mean, full, rtol=1e-4, atol=1e-6 * float(full.abs().max()))
    assert not torch.allclose(by_step[0], full, rtol=1e-2)  # one step alone is not the whole penalty
