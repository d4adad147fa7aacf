"""Transition kernels: the mean and standard deviation of each stochastic sampling step.

Step ``k`` maps ``s_k`` to ``s_{k+1} = m_k + sigma_k * eps_k``. A kernel knows, per step, the time the
denoiser is called at, ``sigma_k`` and how ``m_k`` follows from the latent and the (guided) model output; the
Gaussian log-density of a transition is shared by every kernel. :class:`DDIMSchedule` is the DDIM kernel of
the Stable Diffusion family; :class:`FlowMatchSDE` is the Euler-Maruyama kernel of the flow-matching families
(SD 3 / 3.5, FLUX.1), ``docs/flow_matching.md``. A new sampler is a new kernel in this file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

_LOG_2PI = math.log(2.0 * math.pi)
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class TransitionKernel(Protocol):
    """Per-step times, standard deviations and means of a stochastic sampler, in sampling order.

    Attributes:
        timesteps: The time each step calls the denoiser at, ``(T,)``.
        sigma: ``sigma_k``, ``(T,)`` float32 (0 on deterministic steps, which have no log-probability).
    """

    # Read-only: the kernels are frozen dataclasses.
    @property
    def timesteps(self) -> Tensor: ...

    @property
    def sigma(self) -> Tensor: ...

    def __len__(self) -> int: ...

    def to(self, device: torch.device | str) -> TransitionKernel:
        """The same kernel with its tensors on ``device``."""

    def mean(self, step_index: Tensor, latents: Tensor, model_output: Tensor) -> Tensor:
        """``m_k`` of each sample at its own step ``step_index``, float32 (at least), differentiable."""

    def predict_x0(self, step_index: Tensor, latents: Tensor, model_output: Tensor) -> Tensor:
        """The clean latent ``x0_hat`` the model output predicts at step ``step_index`` (what the value and
        MuProp baselines score), float32 (at least)."""


@dataclass(frozen=True)
class DDIMSchedule:
    """The DDIM transition kernel: per-step DDIM coefficients for ``T`` inference steps, in sampling order.

    Attributes:
        timesteps: Model timestep of each step, ``(T,)`` long.
        alpha: ``alphas_cumprod`` at the step's timestep, ``(T,)``.
        alpha_prev: ``alphas_cumprod`` at the previous timestep (``final_alpha_cumprod`` past zero), ``(T,)``.
        sigma: DDIM standard deviation ``eta * sqrt((1 - a_prev)/(1 - a_t) * (1 - a_t/a_prev))``, ``(T,)``.
        eta: The DDIM eta the sigmas were built with.
        prediction_type: What the model predicts: ``epsilon``, ``v_prediction`` or ``sample``.
        clip_sample_range: Clamp of the predicted clean sample, or ``None`` when the scheduler does not clip.
    """

    timesteps: Tensor
    alpha: Tensor
    alpha_prev: Tensor
    sigma: Tensor
    eta: float
    prediction_type: str = "epsilon"
    clip_sample_range: float | None = None

    @classmethod
    def from_scheduler(
        cls, scheduler, num_steps: int, eta: float, timestep_spacing: str | None = None
    ) -> DDIMSchedule:
        """Build the schedule of a diffusers scheduler's configuration, interpreted as DDIM.

        Any scheduler config of the Stable Diffusion family works (their repositories ship PNDM); the DDIM
        timesteps, their spacing and ``steps_offset`` are taken from ``DDIMScheduler`` itself, so they agree
        with ``DDIMScheduler.step`` by construction. ``timestep_spacing`` (``leading``, ``trailing``,
        ``linspace``) overrides the config's.
        """
        from diffusers import DDIMScheduler

        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0 (0 is deterministic DDIM, 1 is DDPM-like), got {eta!r}")
        overrides: dict[str, object] = (
            {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
        )
        if timestep_spacing not in (None, "leading", "trailing", "linspace"):
            raise ValueError(
                f"timestep_spacing must be leading, trailing or linspace, got {timestep_spacing!r}"
            )
        if "clip_sample" not in scheduler.config:
            # A scheduler config that does not say (e.g. a bare Euler config) would get DDIM's default,
            # clip_sample=True, which clamps latents to [-1, 1]; no latent diffusion model is trained that way.
            overrides["clip_sample"] = False
        ddim = DDIMScheduler.from_config(scheduler.config, **overrides)
        if num_steps > ddim.config.num_train_timesteps:
            raise ValueError(
                f"num_steps={num_steps} exceeds the scheduler's num_train_timesteps="
                f"{ddim.config.num_train_timesteps}"
            )
        if ddim.config.thresholding:
            raise ValueError("dynamic thresholding schedulers are not supported; set thresholding=False")
        prediction_type = ddim.config.prediction_type
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not one of {_PREDICTION_TYPES}")
        ddim.set_timesteps(num_steps)
        timesteps = ddim.timesteps.long()
        # Exactly DDIMScheduler.step's previous timestep, whatever the timestep spacing.
        prev = timesteps - ddim.config.num_train_timesteps // num_steps
        ac = ddim.alphas_cumprod.float()
        alpha = ac[timesteps]
        alpha_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.as_tensor(ddim.final_alpha_cumprod))
        variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
        sigma = eta * variance.sqrt()
        if bool((1 - alpha_prev - sigma**2 < 0).any()):
            raise ValueError(
                f"eta={eta} is too large for this schedule: the DDIM direction term sqrt(1 - a_prev - sigma^2) "
                "is undefined; use eta <= 1"
            )
        return cls(
            timesteps=timesteps,
            alpha=alpha,
            alpha_prev=alpha_prev.float(),
            sigma=sigma.float(),
            eta=float(eta),
            prediction_type=prediction_type,
            clip_sample_range=float(ddim.config.clip_sample_range) if ddim.config.clip_sample else None,
        )

    def __len__(self) -> int:
        return self.timesteps.numel()

    def mean(self, step_index: Tensor, latents: Tensor, model_output: Tensor) -> Tensor:
        """The DDIM posterior mean of each sample (:func:`ddim_mean`)."""
        return ddim_mean(self, step_index, latents, model_output)

    def predict_x0(self, step_index: Tensor, latents: Tensor, model_output: Tensor) -> Tensor:
        """DDIM's ``pred_original_sample`` (clipped as the scheduler clips it)."""
        return _ddim_x0_eps(self, step_index, latents.to(compute_dtype(latents)), model_output)[0]

    def to(self, device: torch.device | str) -> DDIMSchedule:
        return replace(
            self,
            timesteps=self.timesteps.to(device),
            alpha=self.alpha.to(device),
            alpha_prev=self.alpha_prev.to(device),
            sigma=self.sigma.to(device),
        )


def compute_dtype(x: Tensor) -> torch.dtype:
    """At least float32: the DDIM update and the log-density are never computed in half precision."""
    return torch.promote_types(x.dtype, torch.float32)


def per_sample(values: Tensor, step_index: Tensor, like: Tensor) -> Tensor:
    """Gather one coefficient per sample and shape it to broadcast over ``like``'s non-batch dims."""
    return values[step_index].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _ddim_x0_eps(
    schedule: DDIMSchedule, step_index: Tensor, x: Tensor, model_output: Tensor
) -> tuple[Tensor, Tensor]:
    """The predicted clean sample (clipped as the scheduler clips it) and noise of each sample."""
    out = model_output.to(x.dtype)
    a_t = per_sample(schedule.alpha, step_index, x)
    if schedule.prediction_type == "epsilon":
        x0 = (x - (1 - a_t).sqrt() * out) / a_t.sqrt()
        eps = out
    elif schedule.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
    else:  # "sample"
        x0 = out
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    if schedule.clip_sample_range is not None:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return x0, eps


def ddim_mean(schedule: DDIMSchedule, step_index: Tensor, latents: Tensor, model_output: Tensor) -> Tensor:
    """The DDIM posterior mean ``m_k`` of each sample, in float32, with per-sample step indices.

    Matches ``DDIMScheduler.step(..., eta=schedule.eta)`` with zero variance noise.
    """
    x = latents.to(compute_dtype(latents))
    x0, eps = _ddim_x0_eps(schedule, step_index, x, model_output)
    a_prev = per_sample(schedule.alpha_prev, step_index, x)
    sigma = per_sample(schedule.sigma, step_index, x)
    return a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps


def gaussian_log_prob(sample: Tensor, mean: Tensor, sigma: Tensor) -> Tensor:
    """``log N(sample; mean, sigma^2 I)`` per sample, summed over all non-batch dims, in float32.

    Summed, not averaged: the scale matters once likelihood-ratio terms are added to backprop terms. Autocast
    is off because ``(x - m)^2 / sigma^2`` with a small sigma is numerically poor in half precision.
    """
    with torch.autocast(device_type=sample.device.type, enabled=False):
        dtype = compute_dtype(sample)
        x = sample.to(dtype)
        m = mean.to(dtype)
        s = sigma.to(dtype).reshape(-1)
        dims = x[0].numel()
        sq = (x - m).pow(2).flatten(1).sum(1)
        return -sq / (2 * s**2) - dims * (s.log() + 0.5 * _LOG_2PI)


@dataclass(frozen=True)
class FlowMatchSDE:
    """The stochastic kernel of a rectified-flow model: Euler-Maruyama steps of the SDE with the ODE's marginals.

    A flow-matching model predicts the velocity ``v = eps - x_0`` of the straight path ``x_t = (1 - t) x_0 + t eps``,
    and diffusers samples the ODE ``dx = v dt`` from ``t = 1`` to ``0`` (``FlowMatchEulerDiscreteScheduler``). The
    reverse-time SDE ``dx = [v + s_t^2 / (2 t) (x + (1 - t) v)] dt + s_t dw`` has the same marginals for any noise
    schedule ``s_t`` (``docs/flow_matching.md``); with Flow-GRPO's ``s_t = a sqrt(t / (1 - t))`` (Liu et al.
    2025, arXiv 2505.05470, Eq. 9 and its Euler-Maruyama step) one step from ``t_k`` to ``t_{k+1} < t_k``
    (``dt = t_{k+1} - t_k < 0``) is the Gaussian transition

        m_k = x (1 + s^2 dt / (2 t_k)) + v (1 + s^2 (1 - t_k) / (2 t_k)) dt,   sigma_k = s sqrt(-dt),

    with ``s = a sqrt(t_k / (1 - t_k))``. At ``t_k = 1`` (the first step of an unshifted schedule) the ratio is
    infinite; there, as Flow-GRPO does, ``1 - t_k`` is replaced by ``1 - t_1`` (the schedule's next time). With
    ``a = 0`` every step is ``FlowMatchEulerDiscreteScheduler.step``: ``m_k = x + v dt``.

    Attributes:
        timesteps: What the denoiser is called with at each step: the scheduler's timesteps ``t_k * 1000``, ``(T,)``
            float32 (a family's denoiser rescales them if its network wants ``t`` itself, as FLUX does).
        times: The flow times ``t_0 > t_1 > ... > t_T`` (the scheduler's ``sigmas``; ``t_T = 0``), ``(T + 1,)``.
        sigma: ``sigma_k``, ``(T,)`` float32; 0 on deterministic (ODE) steps.
        noise_level: Flow-GRPO's ``a``.
        stochastic_steps: The half-open step range that runs the SDE; the other steps are ODE steps (``None``: all
            steps are stochastic).
    """

    timesteps: Tensor
    times: Tensor
    sigma: Tensor
    noise_level: float
    stochastic_steps: tuple[int, int] | None = None

    @classmethod
    def from_scheduler(
        cls,
        scheduler,
        num_steps: int,
        noise_level: float,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        stochastic_steps: tuple[int, int] | None = None,
    ) -> FlowMatchSDE:
        """The kernel on the timesteps a diffusers ``FlowMatchEulerDiscreteScheduler`` config gives for ``num_steps``.

        The times are the scheduler's own (``set_timesteps`` on a copy of its config: its ``shift``, dynamic
        shifting, terminal value), so they agree with ``FlowMatchEulerDiscreteScheduler.step`` by construction.

        Args:
            scheduler: The model's scheduler (or anything with a flow-matching scheduler ``config``).
            num_steps: Sampling steps ``T``.
            noise_level: Flow-GRPO's ``a`` (0: the deterministic ODE sampler; Flow-GRPO trains with 0.7).
            sigmas: Explicit unshifted times for ``set_timesteps`` (the FLUX pipeline passes
                ``linspace(1, 1 / T, T)``); ``None``: the scheduler's default.
            mu: The resolution-dependent shift of schedulers with ``use_dynamic_shifting`` (FLUX).
            stochastic_steps: Half-open ``[start, stop)`` range of SDE steps; the others are ODE steps (the
                SDE-then-ODE sampling of MixGRPO and Flow-GRPO-Fast). ``None``: every step is stochastic.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if not noise_level >= 0:
            raise ValueError(
                f"the flow SDE's noise level must be >= 0 (0 is the deterministic ODE sampler; Flow-GRPO uses 0.7), "
                f"got {noise_level!r}"
            )
        if stochastic_steps is not None:
            start, stop = (int(v) for v in stochastic_steps)
            if not 0 <= start < stop <= num_steps:
                raise ValueError(
                    f"stochastic_steps must be a non-empty range [start, stop) inside [0, {num_steps}), got "
                    f"{tuple(stochastic_steps)}"
                )
            stochastic_steps = (start, stop)
        flow = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        config = flow.config
        for option in ("stochastic_sampling", "invert_sigmas"):
            if config.get(option, False):
                raise ValueError(
                    f"flow-matching schedulers with {option}=True are not supported; set it to False"
                )
        if config.get("use_dynamic_shifting", False) and mu is None:
            raise ValueError(
                "this scheduler shifts its timesteps by the image resolution (use_dynamic_shifting): pass mu, "
                "as the model family's pipeline computes it"
            )
        kwargs = {}
        if sigmas is not None:
            import numpy as np

            kwargs["sigmas"] = np.asarray(sigmas, dtype=np.float32)
            if len(kwargs["sigmas"]) != num_steps:
                raise ValueError(f"{len(kwargs['sigmas'])} sigmas given for num_steps={num_steps}")
        flow.set_timesteps(num_steps, mu=mu, **kwargs)
        times = flow.sigmas.double().cpu()
        timesteps = flow.timesteps.float().cpu()
        if times.numel() != num_steps + 1 or not bool((times[1:] < times[:-1]).all()):
            raise ValueError(
                f"the scheduler gave times {times.tolist()}: expected {num_steps + 1} decreasing times"
            )
        t, t_next = times[:-1], times[1:]
        # Flow-GRPO's s_t = a sqrt(t / (1 - t)), with 1 - t at t = 1 replaced by 1 - t_1 (finite there).
        t_safe = torch.where(t >= 1, times[1] if num_steps > 1 else torch.zeros(()), t)
        s = noise_level * (t / (1 - t_safe)).sqrt()
        sigma = s * (t - t_next).sqrt()
        if stochastic_steps is not None:
            inside = torch.zeros(num_steps, dtype=torch.bool)
            inside[stochastic_steps[0] : stochastic_steps[1]] = True
            sigma = torch.where(inside, sigma, torch.zeros(()))
        if not bool(torch.isfinite(sigma).all()):
            raise ValueError(
                f"noise level {noise_level} gives non-finite step sigmas {sigma.tolist()} on these times"
            )
        return cls(
            timesteps=timesteps,
            times=times.float(),
            sigma=sigma.float(),
            noise_level=float(noise_level),
            stochastic_steps=stochastic_steps,
        )

    def __len__(self) -> int:
        return self.timesteps.numel()

    def to(self, device: torch.device | str) -> FlowMatchSDE:
        return replace(
            self,
            timesteps=self.timesteps.to(device),
            times=self.times.to(device),
            sigma=self.sigma.to(device),
        )

    def mean(self, step_index: Tensor, latents: Tensor, model_output: Tensor) -> Tensor:
        """The Euler-Maruyama mean ``m_k`` of each sample at its own step, at least float32, differentiable."""
        dtype = compute_dtype(latents)
        x = latents.to(dtype)
        v = model_output.to(dtype)
        t = per_sample(self.times, step_index, x)
        dt = per_sample(self.times, step_index + 1, x) - t
        # s^2 = sigma_k^2 / (-dt): the SDE's squared diffusion coefficient at t_k (0 on ODE steps).
        s2 = per_sample(self.sigma, step_index, x).pow(2) / (-dt)
        return x * (1 + s2 * dt / (2 * t)) + v * (1 + s2 * (1 - t) / (2 * t)) * dt

    def predict_x0(self, step_index: Tensor, latents: Tensor, model_output: Tensor) -> Tensor:
        """``x0_hat = x_t - t v``: the end of the straight path through ``x_t`` with velocity ``v = eps - x_0``."""
        dtype = compute_dtype(latents)
        x = latents.to(dtype)
        return x - per_sample(self.times, step_index, x) * model_output.to(dtype)
