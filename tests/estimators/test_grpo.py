"""Group baselines and the GRPO baseline estimator, on the toy denoiser.

* The ``group`` baseline (the other samples of the same prompt) keeps the likelihood-ratio estimators unbiased.
* GRPO with one inner update and no clip is exactly the score-function estimator with the group baseline.
* On a later inner update the clip zeroes exactly the transitions whose ratio left ``[1 - eps, 1 + eps]`` on the
  side the advantage pushes, and the rest follow ``rho * A * grad log p``.
"""

from __future__ import annotations

import pytest
import torch

from rlr_lightning.estimators import (
    GRPO,
    RLR,
    FullBackprop,
    ScoreFunction,
    compute_advantages,
    estimate_gradient,
)
from rlr_lightning.estimators.base import rollout
from tests.estimators.harness import ToyProblem

G = 4  # samples per prompt


@pytest.fixture(scope="module")
def problem():
    return ToyProblem(num_steps=5, eta=1.0, timestep_spacing="trailing", batch=16)


def grouped_gradient(problem, estimator, draw, group_size=G):
    """A grouped estimator's draw; for group_size-free references, the same images through a repeated batch."""
    embeds, prompts = problem.embeds, problem.prompts
    if estimator.group_size == 1 and group_size > 1:
        embeds, prompts = embeds.repeat(group_size), prompts * group_size
    estimate = estimate_gradient(
        estimator, problem.sampler, embeds, prompts, problem.reward, step_seed=draw, rank_seed=10_000 + draw
    )
    estimator.observe(estimate.rollout, {})
    return estimate


def test_group_baseline_is_the_mean_of_the_other_samples_of_the_same_prompt():
    B = 3
    rewards = torch.arange(B * G, dtype=torch.float32) ** 1.5  # copy j of prompt p at index j * B + p
    adv = compute_advantages(rewards, rewards, "group", group_size=G)
    for i in range(B * G):
        others = [float(rewards[j]) for j in range(B * G) if j % B == i % B and j != i]
        assert adv[i].item() == pytest.approx(float(rewards[i]) - sum(others) / len(others))


def test_group_baseline_leaves_out_the_antithetic_twin_too():
    B = 2
    rewards = torch.randn(2 * G * B, generator=torch.Generator().manual_seed(0))
    adv = compute_advantages(rewards, rewards, "group", antithetic_pairs=True, group_size=G)
    n = rewards.numel()
    for i in range(n):
        twin = (i + n // 2) % n
        others = [float(rewards[j]) for j in range(n) if j % B == i % B and j not in (i, twin)]
        assert adv[i].item() == pytest.approx(float(rewards[i]) - sum(others) / len(others), abs=1e-6)


@pytest.mark.parametrize("antithetic", [False, True])
def test_no_sample_s_baseline_depends_on_its_own_reward(antithetic):
    """What unbiasedness rests on: changing one sample's reward (and its twin's, which shares its noise) changes
    no part of that sample's baseline ``r - A``. (Including the sample in its group mean would fail this; the
    statistical test below has no power against that: it scales the estimate by (G - 1) / G.)"""
    B = 3
    n = B * G * (2 if antithetic else 1)
    rewards = torch.randn(n, generator=torch.Generator().manual_seed(3))
    baseline = rewards - compute_advantages(
        rewards, rewards, "group", antithetic_pairs=antithetic, group_size=G
    )
    for i in range(n):
        changed = rewards.clone()
        changed[i] += 10.0
        if antithetic:
            changed[(i + n // 2) % n] -= 7.0
        b = changed - compute_advantages(changed, changed, "group", antithetic_pairs=antithetic, group_size=G)
        assert b[i].item() == pytest.approx(baseline[i].item(), abs=1e-5)


@pytest.mark.parametrize("estimator", ["score_function", "rlr"])
@pytest.mark.slow
def test_group_baseline_keeps_the_estimators_unbiased(problem, estimator):
    """Paired with full backprop on the same images: along the true gradient and 4 random directions, |z| < 4.

    A sanity check against gross errors (a wrong group layout pairs samples of different prompts, which is still
    unbiased, or drops terms). It has no power against small biases: the group mean including the sample itself
    (the likelihood-ratio terms scaled by 3/4) gives |z| < 1 here, so the structural test above is what guards the
    baseline's independence."""
    make = {
        "score_function": lambda: ScoreFunction(baseline="group", group_size=G),
        "rlr": lambda: RLR(h=2, zo_mode="score", baseline="group", group_size=G),
    }[estimator]
    est, ref = make(), FullBackprop()
    for e in (est, ref):
        e.setup(5, 1.0)
    truth = torch.stack(
        [grouped_gradient(problem, FullBackprop(), 50_000 + i).total for i in range(40)]
    ).mean(0)
    directions = torch.cat(
        [
            (truth / truth.norm()).unsqueeze(1),
            torch.randn(truth.numel(), 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
        ],
        dim=1,
    )
    draws = 150
    d = torch.stack(
        [
            (grouped_gradient(problem, est, i).total - grouped_gradient(problem, ref, i).total) @ directions
            for i in range(draws)
        ]
    )
    z = (d.mean(0) / (d.std(0) / draws**0.5)).abs()
    assert z.max() < 4, z


def test_grpo_without_clip_on_its_first_update_is_the_score_function_with_the_group_baseline(problem):
    for draw in range(3):
        grpo = GRPO(group_size=G, clip_range=None, scale_by_group_std=False, advantage_clip=None)
        sf = ScoreFunction(baseline="group", group_size=G)
        g_grpo = grouped_gradient(problem, grpo, draw).total
        g_sf = grouped_gradient(problem, sf, draw).total
        assert g_grpo.norm() > 0
        assert torch.allclose(g_grpo, g_sf, rtol=1e-5, atol=1e-7 * g_sf.abs().max())
        # The clip does not act on the first update: the ratio there is exactly 1.
        clipped = grouped_gradient(
            problem, GRPO(group_size=G, clip_range=1e-4, scale_by_group_std=False, advantage_clip=None), draw
        ).total
        assert torch.equal(clipped, g_grpo)


def test_grpo_advantages_are_flow_grpos_group_normalised_rewards():
    est = GRPO(group_size=G, advantage_clip=None)
    B = 5
    rewards = torch.randn(B * G, generator=torch.Generator().manual_seed(2)) * 3 + 1
    adv = est.shape_advantages(compute_advantages(rewards, rewards, "group", group_size=G), rewards)
    groups = rewards.reshape(G, B)
    expected = (groups - groups.mean(0)) / (groups.std(0, unbiased=False) + 1e-4)
    assert torch.allclose(adv, expected.reshape(-1), atol=1e-5)
    clipped = GRPO(group_size=G, advantage_clip=0.5).shape_advantages(
        compute_advantages(rewards, rewards, "group", group_size=G), rewards
    )
    assert clipped.abs().max() == pytest.approx(0.5) and torch.allclose(
        clipped, expected.reshape(-1).clamp(-0.5, 0.5), atol=1e-5
    )


def test_the_clip_engages_when_the_ratio_leaves_its_range(problem):
    """Second inner update after a large step: clipped transitions contribute nothing, the others
    rho * A * grad log p."""
    eps = 0.02
    est = GRPO(group_size=G, clip_range=eps, inner_updates=2, scale_by_group_std=False, advantage_clip=None)
    est.setup(5, 1.0)
    sampler, params = problem.sampler, list(problem.sampler.trainable_parameters().values())
    result = rollout(est, sampler, problem.embeds, problem.prompts, problem.reward, step_seed=0, rank_seed=1)
    saved = [p.detach().clone() for p in params]
    try:
        for term in result.terms:  # first update: records the old log-probs, ratio 1
            term.loss().backward()
        with torch.no_grad():
            for p in params:
                p.add_(
                    -0.003 * p.grad / max(float(p.grad.norm()), 1e-12)
                )  # a large step: ratios leave the range
                p.grad = None
        for term in est.terms(result, sampler, result.embeds):
            term.loss().backward()
        got = torch.cat([p.grad.flatten() for p in params])
        assert 0.05 < result.info["clip_fraction"] < 0.95, result.info

        # The same gradient by hand: per (step, sample) row, keep rho * A * grad log p unless the clip holds it.
        for p in params:
            p.grad = None
        steps = result.plan.info["steps"]
        B = result.batch_size
        k = torch.as_tensor(steps).repeat_interleave(B)
        s = torch.arange(B).repeat(len(steps))
        index, x, x_next = result.trajectory.rows(k, s)
        log_p = sampler.log_probs(index, x, x_next, result.embeds.rows(k, s))
        old = torch.cat(
            [result.cache["grpo_old_log_probs"][i] for i in sorted(result.cache["grpo_old_log_probs"])]
        )
        ratio = torch.exp(log_p - old)
        adv = result.advantages[s]
        held = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))
        assert bool(held.any()) and not bool(held.all())
        (-(ratio * adv)[~held].sum() / B).backward()
        expected = torch.cat([p.grad.flatten() for p in params])
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max())
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
                p.grad = None


def test_the_kl_penalty_pulls_toward_the_base_model_by_the_transition_kl(problem):
    """GRPO(beta) - GRPO(0) on the same draw is the gradient of beta * sum_rows mean_d (m - m_base)^2 / (2 sigma^2) / B,
    with the base model's means computed independently (a copy of the denoiser with every lora_B at zero)."""
    from tests.estimators.harness import base_kl_gradient

    beta = 0.5
    make = lambda b: GRPO(
        group_size=G,
        clip_range=None,
        scale_by_group_std=False,
        advantage_clip=None,  # noqa: E731
        kl_coefficient=b,
    )
    with_kl = grouped_gradient(problem, make(beta), 0)
    without = grouped_gradient(problem, make(0.0), 0).total
    assert with_kl.rollout.info["kl"] > 0

    expected = -base_kl_gradient(problem.sampler, with_kl.rollout, beta)  # the estimate ascends
    assert expected.norm() > 0
    assert torch.allclose(with_kl.total - without, expected, rtol=1e-4, atol=1e-6 * expected.abs().max())


def test_grpo_refuses_deterministic_steps(problem):
    from rlr_lightning.sampling import DDIMSampler
    from tests.estimators.harness import toy_scheduler

    est = GRPO(group_size=2)
    sampler = DDIMSampler(problem.sampler.denoiser, toy_scheduler(), num_steps=3, eta=0.0)
    with pytest.raises(ValueError, match="deterministic"):
        estimate_gradient(
            est, sampler, problem.embeds, problem.prompts, problem.reward, step_seed=0, rank_seed=0
        )


def test_grpo_trains_on_the_steps_it_is_given():
    est = GRPO(group_size=2, step_range=(1, 5), step_fraction=0.5)
    est.setup(6, 1.0)
    plans = [est.plan(6, torch.Generator().manual_seed(i), 0).info["steps"] for i in range(20)]
    assert all(len(p) == 2 and set(p) <= {1, 2, 3, 4} for p in plans)
    assert len({tuple(p) for p in plans}) > 1  # a fresh subset each iteration
    with pytest.raises(ValueError, match="step_range"):
        GRPO(group_size=2, step_range=(2, 9)).setup(6, 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(group_size=1), "group_size must be >= 2"),
        (dict(clip_range=0.0), "clip_range"),
        (dict(inner_updates=0), "inner_updates"),
        (dict(step_fraction=1.5), "step_fraction"),
        (dict(kl_coefficient=-1.0), "kl_coefficient"),
    ],
)
def test_bad_grpo_settings_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPO(**kwargs)


def test_group_baseline_needs_a_group():
    with pytest.raises(ValueError, match="group_size >= 2"):
        ScoreFunction(baseline="group")
