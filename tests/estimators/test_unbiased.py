"""Estimator means against the exact full-backprop gradient, on a toy denoiser, with common random numbers.

For each draw i the estimator and ``FullBackprop`` see the same prompts, initial noise, step noises and
parameter perturbations (the same rank seed), so ``G_est - G_full`` has mean zero exactly when the estimator
is unbiased, with far less variance than either alone. Each coordinate of a fixed random projection of the
mean difference must lie within 4 standard errors for the unbiased estimators; the biased ones must fail
that same check.
"""

from __future__ import annotations

import pytest
import torch

from rlr_lightning.estimators import (
    RLR,
    FullBackprop,
    ScoreFunction,
    TruncatedBackprop,
    estimate_gradient,
)
from rlr_lightning.sampling import DDIMSampler, PromptEmbeds
from tests.estimators.harness import ToyProblem, toy_scheduler
from tests.toy_denoiser import toy_denoiser_with_lora

T = 6
BATCH = 64
DRAWS = 400
PROJECTIONS = 6


@pytest.fixture(scope="module")
def setup():
    # Stable Diffusion's betas with trailing timestep spacing: every step but the last keeps a sigma of
    # 0.37 or more, so likelihood-ratio terms are noisy enough to be realistic yet not so noisy that a
    # test of a few hundred draws could miss a biased term.
    problem = ToyProblem(num_steps=T, eta=1.0, timestep_spacing="trailing", batch=BATCH)
    gen = torch.Generator().manual_seed(5)
    problem.projection = torch.randn(problem.num_weights, PROJECTIONS, generator=gen, dtype=torch.float64)
    return problem


def projected_differences(setup, estimator, reference, draws=DRAWS):
    for est in (estimator, reference):
        est.setup(T, 1.0)
    rows = [
        (setup.gradient(estimator, i) - setup.gradient(reference, i)) @ setup.projection for i in range(draws)
    ]
    d = torch.stack(rows)
    mean = d.mean(0)
    se = d.std(0) / draws**0.5
    return mean, se


def z_scores(setup, estimator, reference=None, draws=DRAWS):
    mean, se = projected_differences(setup, estimator, reference or FullBackprop(), draws)
    return (mean / se).abs()


@pytest.mark.slow
@pytest.mark.parametrize("h, start", [(1, 0), (1, 3), (2, 1), (2, 3)])
def test_rlr_score_mode_is_unbiased(setup, h, start):
    z = z_scores(setup, RLR(h=h, block_law="range", block_range=(start, start), zo_mode="score"))
    assert z.max() < 4, z


@pytest.mark.slow
def test_rlr_with_random_block_start_and_subsampled_zo_is_unbiased(setup):
    z = z_scores(setup, RLR(h=2, block_law="uniform", zo_mode="score", zo_subsample=1))
    assert z.max() < 4, z


@pytest.mark.slow
@pytest.mark.parametrize("h, start", [(1, 2), (2, 0)])
def test_rlr_parameter_mode_antithetic_is_unbiased(setup, h, start):
    scale = 0.05
    est = RLR(h=h, block_law="range", block_range=(start, start), zo_mode="parameter", zo_scale=scale)
    # The same objective: FullBackprop runs every step at the same theta +/- u_k (same seeds, same pairs).
    z = z_scores(setup, est, FullBackprop(perturbation_scale=scale, antithetic=True))
    assert z.max() < 4, z


@pytest.mark.slow
def test_score_function_is_unbiased(setup):
    z = z_scores(setup, ScoreFunction(), draws=200)
    assert z.max() < 4, z


@pytest.mark.slow
def test_truncated_backprop_and_zo_none_show_their_bias(setup):
    z_trunc = z_scores(setup, TruncatedBackprop(k=2), draws=100)
    assert z_trunc.max() > 6, z_trunc
    z_none = z_scores(setup, RLR(h=1, block_law="range", block_range=(4, 4), zo_mode="none"))
    assert z_none.max() > 5, z_none


def test_full_backprop_matches_finite_differences_with_noise_fixed():
    """d r / d theta along a random direction, all noise fixed, in float64."""
    model = toy_denoiser_with_lora(seed=3).double()
    sampler = DDIMSampler(model, toy_scheduler(), num_steps=T, eta=1.0, model_dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    embeds = PromptEmbeds(torch.randn(3, 3, 8, generator=gen, dtype=torch.float64))
    weight = torch.randn(2, 2, 2, generator=gen, dtype=torch.float64)
    x0, noises = sampler.initial_noise(3, torch.Generator().manual_seed(1))
    x0, noises = x0.double(), noises.double()
    params = sampler.trainable_parameters()
    direction = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}

    def objective() -> torch.Tensor:
        from rlr_lightning.sampling import Plan

        final = sampler.run(Plan(T, windows=((0, T),)), embeds, initial_latents=x0, noises=noises).final
        return (torch.tanh(final) * weight).flatten(1).sum(1).mean()

    est = FullBackprop()
    est.setup(T, 1.0)
    objective().backward()
    analytic = sum((p.grad * direction[n]).sum() for n, p in params.items())
    eps = 1e-5
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for n, p in params.items():
                p.add_(sign * eps * direction[n])
            values.append(objective().item())
            for n, p in params.items():
                p.sub_(sign * eps * direction[n])
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(analytic.item() - numeric) < 1e-6 * max(1.0, abs(numeric)), (analytic.item(), numeric)


@pytest.mark.slow
def test_rlr_on_the_tiny_unet_matches_full_backprop(tiny_unet, tiny_scheduler):
    """The same check on the real UNet architecture (LoRA on attention), at low N: no gross bias."""
    sampler = DDIMSampler(tiny_unet, tiny_scheduler, num_steps=4, eta=1.0)
    gen = torch.Generator().manual_seed(0)
    embeds = PromptEmbeds(torch.randn(4, 16, 32, generator=gen))
    weight = torch.randn(4, 8, 8, generator=gen)
    params = sampler.trainable_parameters()
    projection = torch.randn(sum(p.numel() for p in params.values()), 4, generator=gen, dtype=torch.float64)

    def reward(latents, prompts):
        return (torch.tanh(latents) * weight).flatten(1).mean(1)

    def gradient(estimator, draw):
        estimate = estimate_gradient(
            estimator, sampler, embeds, ["p"] * 4, reward, step_seed=draw, rank_seed=draw + 99
        )
        return estimate.total @ projection

    rlr, full = RLR(h=1, zo_mode="score"), FullBackprop()
    for est in (rlr, full):
        est.setup(4, 1.0)
    d = torch.stack([gradient(rlr, i) - gradient(full, i) for i in range(16)])
    z = (d.mean(0) / (d.std(0) / 16**0.5)).abs()
    assert z.max() < 4, z
