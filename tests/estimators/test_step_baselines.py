"""Per-step baselines: each step's baseline is independent of that step's noise, and the options resolve and fail
as documented. (Unbiasedness along the true gradient is in ``test_unbiased_along_gradient.py``; chunking in
``test_chunking.py``.)"""

from __future__ import annotations

import pytest
import torch

from rlr_lightning.estimators import GRPO, RLR, ScoreFunction, rollout
from rlr_lightning.estimators.baselines import PromptRewardMeans, prompt_keys, resolve_step_baselines
from rlr_lightning.sampling import DDIMSchedule, FlowMatchSDE
from tests.estimators.harness import ToyProblem, toy_scheduler

T = 6


def rollout_with_noise_change(problem, estimator, step: int, sample: int, seed: int = 0, change: float = 0.0):
    """One rollout of ``estimator`` on ``problem`` whose step noise ``eps_step`` of one sample is shifted by
    ``change`` (everything else, the other samples' noises included, as drawn from the seed)."""
    sampler = problem.sampler
    original = type(sampler).initial_noise

    def initial_noise(batch_size, generator=None, device="cpu"):
        x0, noises = original(sampler, batch_size, generator, device)
        noises = noises.clone()
        noises[step, sample] += change
        return x0, noises

    sampler.initial_noise = initial_noise
    try:
        return rollout(
            estimator,
            sampler,
            problem.embeds,
            problem.prompts,
            problem.reward,
            step_seed=seed,
            rank_seed=100 + seed,
        )
    finally:
        del sampler.initial_noise


def baselines_of(result, step: int) -> torch.Tensor:
    """What each sample's advantage at ``step`` subtracted from its reward: ``r - A_k``."""
    return result.rewards.detach().float() - result.step_advantages[step]


MAKERS = {
    "score function, value": lambda: ScoreFunction(step_baseline="value"),
    "score function, muprop": lambda: ScoreFunction(step_baseline="muprop"),
    "score function, group, muprop": lambda: ScoreFunction(
        step_baseline="muprop", baseline="group", group_size=2
    ),
    "score function, prompt mean": lambda: ScoreFunction(step_baseline="prompt_mean"),
    "rlr tail 2, muprop": lambda: RLR(
        h=1, tail=2, block_law="range", block_range=(1, 1), step_baseline="muprop"
    ),
    "rlr parameter (antithetic), value": lambda: RLR(
        h=1, block_law="range", block_range=(2, 2), zo_mode="parameter", zo_scale=0.01, step_baseline="value"
    ),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_steps_baseline_does_not_depend_on_that_steps_noise(name):
    """Shifting one sample's noise ``eps_k`` changes its reward, and leaves the baseline of its step ``k`` (and of
    every earlier step) unchanged: the baseline is a function of what came before the noise. A baseline that used
    ``s_{k+1}`` (the value baseline one step late) or the sample's own reward would fail here."""
    problem = ToyProblem(num_steps=T, eta=1.0, guidance_scale=3.0, timestep_spacing="leading", batch=4)
    estimator = MAKERS[name]()
    estimator.setup(T, 1.0)
    estimator.configure_schedule(problem.sampler.kernel.sigma.tolist())
    # History for the prompt means (the first iteration has none): one earlier iteration.
    estimator.observe(rollout_with_noise_change(problem, estimator, 0, 0, seed=7), {})
    steps = estimator.likelihood_ratio_steps(rollout_with_noise_change(problem, estimator, 0, 0).plan)
    assert steps
    for k in steps:
        for sample in (0, 3):
            before = rollout_with_noise_change(problem, estimator, k, sample)
            # A shift of 0.5 / sigma_k moves s_{k+1} by 0.5 whatever the step's sigma.
            change = 0.5 / float(problem.sampler.kernel.sigma[k])
            after = rollout_with_noise_change(problem, estimator, k, sample, change=change)
            assert (
                abs(float(after.rewards[sample].detach() - before.rewards[sample].detach())) > 1e-3
            )  # the noise matters
            assert k in before.step_baselines
            for j in [j for j in steps if j <= k]:
                torch.testing.assert_close(
                    baselines_of(after, j)[sample],
                    baselines_of(before, j)[sample],
                    rtol=0,
                    atol=2e-6,
                    msg=f"step {j}, noise of step {k}, sample {sample}",
                )


def test_the_value_baseline_of_step_k_plus_1_does_depend_on_step_ks_noise():
    """The structural test above has power: the value baseline of the next step reads ``s_{k+1}``."""
    problem = ToyProblem(num_steps=T, eta=1.0, timestep_spacing="leading", batch=4)
    estimator = ScoreFunction(step_baseline="value", baseline="none")
    estimator.setup(T, 1.0)
    before = rollout_with_noise_change(problem, estimator, 2, 1)
    after = rollout_with_noise_change(problem, estimator, 2, 1, change=2.0)
    assert abs(float(before.step_baselines[3][1] - after.step_baselines[3][1])) > 1e-3


def test_value_and_muprop_baselines_are_the_reward_of_the_predicted_clean_latents():
    problem = ToyProblem(num_steps=T, eta=1.0, batch=3)
    sampler = problem.sampler
    for kind in ("value", "muprop"):
        estimator = ScoreFunction(step_baseline=kind, baseline="none")
        estimator.setup(T, 1.0)
        result = rollout(estimator, sampler, problem.embeds, problem.prompts, problem.reward, 0, 100)
        traj = result.trajectory
        assert set(traj.predictions) == set(range(T))
        for k in range(T):
            x = traj.latents[k] if kind == "value" else traj.latents[k + 1] - traj.sigmas[k] * traj.noises[k]
            if kind == "muprop" and k == T - 1:
                expected = problem.reward(x, problem.prompts)
            else:
                j = k if kind == "value" else k + 1
                index = torch.full((3,), j, dtype=torch.long)
                out = sampler.model_output(x, index, problem.embeds)
                expected = problem.reward(sampler.kernel.predict_x0(index, x, out), problem.prompts)
            torch.testing.assert_close(result.step_baselines[k], expected, rtol=1e-4, atol=1e-5)
            # No batch baseline: the advantage is the residual.
            torch.testing.assert_close(
                result.step_advantages[k], result.rewards - expected, rtol=1e-4, atol=1e-5
            )


def test_grpo_without_clip_with_a_step_baseline_is_the_score_function_with_it():
    problem = ToyProblem(num_steps=4, eta=1.0, batch=2)
    grads = []
    for make in (
        lambda: GRPO(
            group_size=2,
            clip_range=None,
            scale_by_group_std=False,
            advantage_clip=None,
            step_baseline="muprop",
        ),
        lambda: ScoreFunction(baseline="group", group_size=2, step_baseline="muprop"),
    ):
        estimator = make()
        estimator.setup(4, 1.0)
        grads.append(problem.gradient(estimator, 0))
    plain = ScoreFunction(baseline="group", group_size=2)
    plain.setup(4, 1.0)
    assert not torch.allclose(grads[1], problem.gradient(plain, 0), rtol=1e-3)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7 * float(grads[1].abs().max()))


def test_ddim_prediction_is_the_schedulers_pred_original_sample():
    scheduler = toy_scheduler("leading")
    kernel = DDIMSchedule.from_scheduler(scheduler, 5, 1.0)
    scheduler.set_timesteps(5)
    gen = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 2, 4, 4, generator=gen), torch.randn(2, 2, 4, 4, generator=gen)
    for k, t in enumerate(scheduler.timesteps):
        expected = scheduler.step(out, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).pred_original_sample
        torch.testing.assert_close(
            kernel.predict_x0(torch.full((2,), k), x, out), expected, rtol=1e-5, atol=1e-5
        )


def test_flow_prediction_is_where_the_ode_lands_in_one_step():
    """An Euler step to ``t = 0`` lands on ``x - t v``: the prediction equals the deterministic last step's mean."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    kernel = FlowMatchSDE.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 4, 0.0)
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    last = torch.full((2,), 3)
    torch.testing.assert_close(kernel.predict_x0(last, x, v), kernel.mean(last, x, v))
    t = float(kernel.times[1])
    torch.testing.assert_close(kernel.predict_x0(torch.full((2,), 1), x, v), x - t * v)


def test_one_name_applies_below_the_sigma_ratio_and_a_list_names_each_step():
    sigmas = [0.8, 0.6, 0.4, 0.04, 0.02]
    assert resolve_step_baselines("value", sigmas) == ["value"] * 5
    assert resolve_step_baselines("muprop", sigmas, 0.6) == ["none", "none", "muprop", "muprop", "muprop"]
    schedule = ["none", "none", "value", "muprop", "muprop"]
    assert resolve_step_baselines(schedule, sigmas) == schedule
    with pytest.raises(ValueError, match="lists 3 step baselines, but the sampler runs T=5"):
        resolve_step_baselines(schedule[:3], sigmas)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(step_baseline="values"),
            "unknown step_baseline 'values'; choose one of none, prompt_mean, value, muprop",
        ),
        (dict(step_baseline=["none", "mu"]), r"step_baseline lists \['mu'\]"),
        (
            dict(step_baseline="value", step_baseline_sigma_ratio=0.0),
            r"step_baseline_sigma_ratio must be in \(0, 1\]",
        ),
    ],
)
def test_bad_step_baseline_options_name_the_value(kwargs, message):
    for make in (RLR, ScoreFunction):
        with pytest.raises(ValueError, match=message):
            make(**kwargs)


def test_a_sigma_rule_needs_the_schedule():
    problem = ToyProblem(num_steps=4, batch=2)
    estimator = ScoreFunction(step_baseline="value", step_baseline_sigma_ratio=0.5)
    estimator.setup(4, 1.0)
    with pytest.raises(ValueError, match="chosen from the sampler's sigmas: call configure_schedule"):
        problem.gradient(estimator, 0)


def test_prompt_means_are_per_prompt_running_means_and_survive_a_restart():
    keys = prompt_keys(["a", "b", "a"])
    assert keys[0] == keys[2] != keys[1] and keys.dtype == torch.long
    assert torch.equal(prompt_keys(["a"]), prompt_keys(["a"]))  # stable across calls (and processes: no salt)
    means = PromptRewardMeans(decay=0.5)
    means.update(keys, torch.tensor([1.0, 4.0, 3.0]))
    assert means.lookup(prompt_keys(["a", "b", "c"]), fallback=-1.0).tolist() == [2.0, 4.0, -1.0]
    means.update(prompt_keys(["a"]), torch.tensor([4.0]))
    assert means.lookup(prompt_keys(["a"]), None).tolist() == [3.0]
    estimator = ScoreFunction(step_baseline="prompt_mean")
    estimator.prompt_means = means
    restored = ScoreFunction(step_baseline="prompt_mean")
    restored.load_state_dict(estimator.state_dict())
    assert restored.prompt_means.means == means.means


def test_a_step_baseline_list_of_the_wrong_length_fails_at_setup():
    for estimator in (RLR(step_baseline=["none", "value"]), ScoreFunction(step_baseline=["value"] * 3)):
        with pytest.raises(ValueError, match="but the sampler runs T=6 steps"):
            estimator.setup(6, 1.0)
