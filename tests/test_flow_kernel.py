"""The flow-matching SDE kernel (``FlowMatchSDE``): the ODE sampler at noise level 0, a Gaussian transition with the
density it claims, and the ODE's marginals at any noise level (``docs/flow_matching.md``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from rlr_lightning.sampling import DiffusionSampler, FlowMatchSDE, Plan, PromptEmbeds
from rlr_lightning.sampling.denoisers import Denoiser


def sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


SCHEDULES = {
    "sd3": lambda T: (sd3_scheduler(), {}),
    "flux": lambda T: (flux_scheduler(), {"sigmas": np.linspace(1.0, 1 / T, T), "mu": 0.8}),
}


@pytest.mark.parametrize("family", sorted(SCHEDULES))
def test_noise_level_zero_is_the_schedulers_euler_step_bit_for_bit(family):
    T = 8
    scheduler, kwargs = SCHEDULES[family](T)
    kernel = FlowMatchSDE.from_scheduler(scheduler, T, 0.0, **kwargs)
    scheduler.set_timesteps(T, **kwargs)
    assert torch.equal(kernel.timesteps, scheduler.timesteps.float())
    assert bool((kernel.sigma == 0).all())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 4, 4, generator=gen)
    for k in range(T):
        v = torch.randn(x.shape, generator=gen)
        scheduler._step_index = None  # step() looks the timestep up again
        expected = scheduler.step(v, scheduler.timesteps[k], x, return_dict=False)[0]
        assert torch.equal(kernel.mean(torch.full((3,), k), x, v), expected), f"step {k}"
        x = expected


def test_log_prob_equals_an_independent_gaussian_density_of_the_sde_step():
    """The kernel's algebra (mean rearranged, sigma) against the Euler-Maruyama step written from the SDE."""
    T, a = 6, 0.7
    scheduler = sd3_scheduler()
    kernel = FlowMatchSDE.from_scheduler(scheduler, T, a)
    scheduler.set_timesteps(T)
    times = scheduler.sigmas.double()
    gen = torch.Generator().manual_seed(1)
    for k in range(T):
        x = torch.randn(4, 16, 4, 4, generator=gen, dtype=torch.float64)
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        t, dt = times[k], times[k + 1] - times[k]
        # s_t = a sqrt(t / (1 - t)), finite at t = 1 by using the next time there (Flow-GRPO).
        s = a * (t / (1 - (times[1] if t >= 1 else t))).sqrt()
        drift = v + s**2 / (2 * t) * (x + (1 - t) * v)
        mean = x + drift * dt
        std = s * (-dt).sqrt()
        assert kernel.sigma[k].item() == pytest.approx(std.item(), rel=1e-6)
        step = torch.full((4,), k)
        # The kernel keeps its schedule in float32: agreement to float32 rounding of the coefficients.
        assert torch.allclose(kernel.mean(step, x, v), mean, rtol=1e-6, atol=1e-6)
        y = mean + std * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        expected = torch.distributions.Normal(mean, std).log_prob(y).flatten(1).sum(1)
        from rlr_lightning.sampling import gaussian_log_prob

        got = gaussian_log_prob(y, kernel.mean(step, x, v), kernel.sigma.double()[step])
        assert torch.allclose(got, expected, rtol=1e-5)


def test_the_sampler_log_probs_re_score_its_own_transitions():
    """Through DiffusionSampler: the log-probs recorded while sampling equal the batched re-scoring."""
    T = 5
    sampler = toy_sampler(FlowMatchSDE.from_scheduler(sd3_scheduler(), T, 0.9), batch=6)
    embeds = PromptEmbeds(torch.zeros(6, 1, 1))
    traj = sampler.run(Plan(T), embeds, generator=torch.Generator().manual_seed(0))
    index, x, x_next = traj.transitions(range(T))
    rescored = sampler.log_probs(index, x, x_next, embeds.for_steps(range(T))).reshape(T, 6)
    assert torch.allclose(rescored, traj.log_probs, rtol=1e-5)


# -- the marginals: a one-dimensional flow whose velocity is known exactly ---------------------------------------

#: A two-component Gaussian mixture: weights, means, standard deviations.
MIXTURE = (
    torch.tensor([0.4, 0.6], dtype=torch.float64),
    torch.tensor([-2.0, 1.5], dtype=torch.float64),
    torch.tensor([0.3, 0.5], dtype=torch.float64),
)


def mixture_at(t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, means and standard deviations of ``x_t = (1 - t) x_0 + t eps`` for the mixture ``x_0``."""
    w, mu, s = MIXTURE
    return w, (1 - t) * mu, ((1 - t) ** 2 * s**2 + t**2).sqrt()


class ExactVelocity(nn.Module):
    """``v(x, t) = E[eps - x_0 | x_t = x]`` of the mixture, exactly (the posterior of each component)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()), requires_grad=False)  # a denoiser has parameters

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        w, mu, s = MIXTURE
        t = (timestep.double() / 1000).reshape(-1, 1)
        x = x.double().reshape(-1, 1)
        c2 = (1 - t) ** 2 * s**2 + t**2
        r = x - (1 - t) * mu
        log_w = w.log() - 0.5 * (r**2 / c2 + c2.log())
        post = torch.softmax(log_w, dim=1)
        e_eps = t * r / c2
        e_x0 = mu + (1 - t) * s**2 * r / c2
        return (post * (e_eps - e_x0)).sum(1, keepdim=True)


class ExactDenoiser(Denoiser):
    def inputs(self, latents, timesteps, context, added):
        return (latents, timesteps), {}

    def output(self, result):
        return result

    def latent_shape(self, batch_size):
        return (batch_size, 1)


def toy_sampler(kernel: FlowMatchSDE, batch: int) -> DiffusionSampler:
    return DiffusionSampler(ExactDenoiser(ExactVelocity(), torch.float64), kernel)


def sample_marginals(kernel: FlowMatchSDE, n: int, seed: int) -> torch.Tensor:
    """``(T + 1, n)`` samples of every ``s_k`` of the sampler."""
    sampler = toy_sampler(kernel, n)
    embeds = PromptEmbeds(torch.zeros(n, 1, 1, dtype=torch.float64))
    with torch.no_grad():
        traj = sampler.run(Plan(len(kernel)), embeds, generator=torch.Generator().manual_seed(seed))
    return torch.stack(traj.latents).squeeze(-1)


def mixture_cdf(t: float):
    w, mu, s = (v.numpy() for v in mixture_at(t))
    return lambda x: sum(wi * stats.norm.cdf(x, mi, si) for wi, mi, si in zip(w, mu, s))


def ks_pvalues(samples: torch.Tensor, times: torch.Tensor, steps) -> list[float]:
    return [stats.kstest(samples[k].numpy(), mixture_cdf(float(times[k]))).pvalue for k in steps]


N, T = 20_000, 200


@pytest.mark.parametrize("noise_level", [0.0, 0.7, 1.0])
def test_every_marginal_of_the_sde_matches_the_flow(noise_level):
    """At each checked step the samples' law is the flow's ``p_t`` (KS test against the exact mixture CDF).

    200 Euler(-Maruyama) steps keep the discretisation error well below what 20,000 samples resolve. Steps are
    checked at the start, the middle and the end; the p-values of 3 x 4 tests are each required above 1e-3.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    kernel = FlowMatchSDE.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), T, noise_level)
    samples = sample_marginals(kernel, N, seed=3)
    steps = [T // 4, T // 2, 3 * T // 4, T]
    pvalues = ks_pvalues(samples, kernel.times.double(), steps)
    assert min(pvalues) > 1e-3, dict(zip(steps, pvalues))


def test_the_marginal_test_detects_a_drift_without_the_score_correction():
    """Power: the same test rejects Euler-Maruyama with noise but without the ``s^2 / (2t) (x + (1 - t) v)`` term."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    kernel = FlowMatchSDE.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), T, 0.7)

    class NoCorrection(FlowMatchSDE):
        def mean(self, step_index, latents, model_output):
            t = self.times[step_index].to(latents.dtype).reshape(-1, 1)
            dt = self.times[step_index + 1].to(latents.dtype).reshape(-1, 1) - t
            return latents + model_output.to(latents.dtype) * dt

    wrong = NoCorrection(kernel.timesteps, kernel.times, kernel.sigma, kernel.noise_level)
    samples = sample_marginals(wrong, N, seed=3)
    assert ks_pvalues(samples, kernel.times.double(), [T])[0] < 1e-6


def test_stochastic_steps_keep_the_sde_to_a_window_and_the_rest_deterministic():
    from diffusers import FlowMatchEulerDiscreteScheduler

    kernel = FlowMatchSDE.from_scheduler(
        FlowMatchEulerDiscreteScheduler(shift=3.0), 10, 0.7, stochastic_steps=(0, 3)
    )
    full = FlowMatchSDE.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 10, 0.7)
    assert torch.equal(kernel.sigma[:3], full.sigma[:3]) and bool((kernel.sigma[3:] == 0).all())
    # An ODE step's mean is the Euler step, whatever the noise level.
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    step = torch.full((2,), 5)
    assert torch.allclose(kernel.mean(step, x, v), x + (kernel.times[6] - kernel.times[5]) * v)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_steps=0, noise_level=0.7), "num_steps"),
        (dict(num_steps=4, noise_level=-0.1), "noise level must be >= 0"),
        (dict(num_steps=4, noise_level=0.7, stochastic_steps=(3, 9)), "stochastic_steps"),
    ],
)
def test_bad_settings_are_refused_with_the_value_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlowMatchSDE.from_scheduler(sd3_scheduler(), **kwargs)


def test_a_resolution_shifted_scheduler_needs_mu():
    with pytest.raises(ValueError, match="pass mu"):
        FlowMatchSDE.from_scheduler(flux_scheduler(), 4, 0.7)
