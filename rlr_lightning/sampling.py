"""DDIM sampling with transition log-probabilities, driven by a plan.

Notation follows ``method.md``: steps are indexed in sampling order, ``s_0`` is the initial noise and step
``k`` maps ``s_k`` to ``s_{k+1} = m_k(theta) + sigma_k * eps_k``; step ``T - 1`` produces the decoded latent.

The sampler knows nothing about rewards or estimators. An estimator describes what it needs as a
:class:`Plan` (which steps run with gradient, in which contiguous *windows*, and which steps run with a
seeded perturbation of the trainable weights); :meth:`DDIMSampler.run` executes it in one pass and returns a
:class:`Trajectory` holding the detached latents and noises of every step plus the graph-carrying means and
log-probabilities of the window steps only. :meth:`DDIMSampler.log_probs` re-scores stored transitions in one
batched UNet call, for likelihood-ratio terms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from torch import Tensor, nn
from torch.func import functional_call

_LOG_2PI = math.log(2.0 * math.pi)
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# --------------------------------------------------------------------------------------------------------
# Prompt embeddings


@dataclass
class PromptEmbeds:
    """Text-encoder outputs for a batch of prompts.

    Attributes:
        cond: Embeddings of the prompts, ``(B, L, D)``.
        uncond: Embeddings of the empty negative prompt, ``(B, L, D)``, or ``None`` without guidance.
    """

    cond: Tensor
    uncond: Tensor | None = None

    def __post_init__(self) -> None:
        if self.uncond is not None and self.uncond.shape != self.cond.shape:
            raise ValueError(
                f"cond and uncond embeddings must have the same shape, got {tuple(self.cond.shape)} "
                f"and {tuple(self.uncond.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.cond.shape[0]

    def repeat(self, n: int) -> PromptEmbeds:
        """Tile the batch ``n`` times (``[batch, batch, ...]``), to pair with stacked transitions."""
        tile = lambda x: None if x is None else x.repeat(n, *([1] * (x.dim() - 1)))  # noqa: E731
        return PromptEmbeds(tile(self.cond), tile(self.uncond))

    def select(self, index: Tensor | slice) -> PromptEmbeds:
        return PromptEmbeds(self.cond[index], None if self.uncond is None else self.uncond[index])

    @property
    def device(self) -> torch.device:
        return self.cond.device

    def at(self, step: int) -> PromptEmbeds:
        """The conditioning of step ``step``: the same at every step."""
        return self

    def for_steps(self, steps: Sequence[int]) -> PromptEmbeds:
        """Rows for stacked transitions of ``steps`` (step-major), see :meth:`Trajectory.transitions`."""
        return self.repeat(len(steps))

    def rows(self, steps: Tensor, samples: Tensor) -> PromptEmbeds:
        """The conditioning of arbitrary (step, sample) rows: sample ``samples[i]`` at step ``steps[i]``."""
        return self.select(samples)


@dataclass
class ScaledPromptEmbeds:
    """Diffusive chain-of-thought conditioning: each step range is conditioned on its own prompt rewrite.

    Sampling goes coarse to fine, so a prompt may come with a layout (coarse), a geometry (mid) and a detail
    (fine) rewrite, each conditioning a contiguous range of steps in sampling order (``method.md`` §6).

    Attributes:
        scales: ``(start, stop, embeds)`` for half-open step ranges that tile ``[0, T)`` in order.
    """

    scales: tuple[tuple[int, int, PromptEmbeds], ...]

    def __post_init__(self) -> None:
        if not self.scales:
            raise ValueError("ScaledPromptEmbeds needs at least one scale")
        expected = 0
        for start, stop, embeds in self.scales:
            if start != expected or stop <= start:
                raise ValueError(f"scale step ranges must tile [0, T) in order, got {[s[:2] for s in self.scales]}")
            if embeds.batch_size != self.scales[0][2].batch_size:
                raise ValueError("every scale must embed the same number of prompts")
            expected = stop

    @property
    def num_steps(self) -> int:
        return self.scales[-1][1]

    @property
    def batch_size(self) -> int:
        return self.scales[0][2].batch_size

    @property
    def device(self) -> torch.device:
        return self.scales[0][2].device

    def at(self, step: int) -> PromptEmbeds:
        for start, stop, embeds in self.scales:
            if start <= step < stop:
                return embeds
        raise IndexError(f"step {step} is outside the scales' steps [0, {self.num_steps})")

    def repeat(self, n: int) -> ScaledPromptEmbeds:
        return ScaledPromptEmbeds(tuple((a, b, e.repeat(n)) for a, b, e in self.scales))

    def for_steps(self, steps: Sequence[int]) -> PromptEmbeds:
        parts = [self.at(k) for k in steps]
        uncond = None if parts[0].uncond is None else torch.cat([p.uncond for p in parts])
        return PromptEmbeds(torch.cat([p.cond for p in parts]), uncond)

    def rows(self, steps: Tensor, samples: Tensor) -> PromptEmbeds:
        """The conditioning of arbitrary (step, sample) rows: each row gets its step's scale."""
        steps, samples = steps.cpu(), samples.cpu()
        first = self.scales[0][2]
        cond = first.cond.new_empty((len(samples), *first.cond.shape[1:]))
        uncond = None if first.uncond is None else first.uncond.new_empty((len(samples), *first.uncond.shape[1:]))
        for start, stop, embeds in self.scales:
            mask = (steps >= start) & (steps < stop)
            if bool(mask.any()):
                where = mask.nonzero().squeeze(1).to(cond.device)
                picked = samples[mask].to(cond.device)
                cond[where] = embeds.cond[picked]
                if uncond is not None:
                    uncond[where] = embeds.uncond[picked]
        return PromptEmbeds(cond, uncond)


#: What a trajectory is conditioned on: one embedding for all steps, or one per DCoT scale.
Conditioning = PromptEmbeds | ScaledPromptEmbeds


# --------------------------------------------------------------------------------------------------------
# The DDIM schedule and one step


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step DDIM coefficients for ``T`` inference steps, in sampling order.

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
        overrides = {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
        if timestep_spacing not in (None, "leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing must be leading, trailing or linspace, got {timestep_spacing!r}")
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

    def to(self, device: torch.device | str) -> DDIMSchedule:
        return replace(
            self,
            timesteps=self.timesteps.to(device),
            alpha=self.alpha.to(device),
            alpha_prev=self.alpha_prev.to(device),
            sigma=self.sigma.to(device),
        )


def _compute_dtype(x: Tensor) -> torch.dtype:
    """At least float32: the DDIM update and the log-density are never computed in half precision."""
    return torch.promote_types(x.dtype, torch.float32)


def _per_sample(values: Tensor, step_index: Tensor, like: Tensor) -> Tensor:
    """Gather one coefficient per sample and shape it to broadcast over ``like``'s non-batch dims."""
    return values[step_index].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def ddim_mean(schedule: DDIMSchedule, step_index: Tensor, latents: Tensor, model_output: Tensor) -> Tensor:
    """The DDIM posterior mean ``m_k`` of each sample, in float32, with per-sample step indices.

    Matches ``DDIMScheduler.step(..., eta=schedule.eta)`` with zero variance noise.
    """
    dtype = _compute_dtype(latents)
    x = latents.to(dtype)
    out = model_output.to(dtype)
    a_t = _per_sample(schedule.alpha, step_index, x)
    a_prev = _per_sample(schedule.alpha_prev, step_index, x)
    sigma = _per_sample(schedule.sigma, step_index, x)
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
    return a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps


def gaussian_log_prob(sample: Tensor, mean: Tensor, sigma: Tensor) -> Tensor:
    """``log N(sample; mean, sigma^2 I)`` per sample, summed over all non-batch dims, in float32.

    Summed, not averaged: the scale matters once likelihood-ratio terms are added to backprop terms. Autocast
    is off because ``(x - m)^2 / sigma^2`` with a small sigma is numerically poor in half precision.
    """
    with torch.autocast(device_type=sample.device.type, enabled=False):
        dtype = _compute_dtype(sample)
        x = sample.to(dtype)
        m = mean.to(dtype)
        s = sigma.to(dtype).reshape(-1)
        dims = x[0].numel()
        sq = (x - m).pow(2).flatten(1).sum(1)
        return -sq / (2 * s**2) - dims * (s.log() + 0.5 * _LOG_2PI)


@dataclass
class StepOutput:
    """One DDIM transition of a batch.

    Attributes:
        mean: ``m_k``, float32, carrying a graph when computed with gradient.
        sigma: ``sigma_k`` per sample, ``(B,)``.
        next_latents: ``s_{k+1} = mean + sigma * noise`` (pathwise: carries the mean's graph), or the given
            ``prev_latents`` detached when re-scoring a stored transition.
        log_prob: ``log p_theta(sg(s_{k+1}) | s_k)`` per sample, ``(B,)`` float32; ``None`` where sigma is 0.
    """

    mean: Tensor
    sigma: Tensor
    next_latents: Tensor
    log_prob: Tensor | None


# --------------------------------------------------------------------------------------------------------
# Parameter perturbations and plans


@dataclass(frozen=True)
class Perturbation:
    """A seeded Gaussian perturbation ``u ~ N(0, scale^2 I)`` of the trainable weights.

    Nothing is stored: :meth:`noise` regenerates ``u`` bit for bit from ``seed``, both when a step runs at
    ``theta + u`` and later when an estimator needs ``u`` for its zeroth-order term.

    Attributes:
        seed: Seed of ``u``.
        scale: Standard deviation ``s`` of ``u``.
        antithetic: If set, the first half of the batch runs at ``theta + u`` and the second at ``theta - u``.
    """

    seed: int
    scale: float
    antithetic: bool = False

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"perturbation scale must be > 0, got {self.scale!r}")

    def noise(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Regenerate ``u`` for ``params`` (visited in sorted name order, so the draw is order-independent)."""
        names = sorted(params)
        if not names:
            return {}
        device = params[names[0]].device
        gen = torch.Generator(device=device).manual_seed(self.seed)
        return {
            n: (torch.randn(params[n].shape, generator=gen, device=device, dtype=torch.float32) * self.scale).to(
                params[n].dtype
            )
            for n in names
        }


@dataclass
class Plan:
    """What one trajectory must record, decided by an estimator before sampling.

    Attributes:
        num_steps: ``T``.
        windows: Disjoint half-open step ranges ``[start, stop)`` that run with gradient. Each window starts
            from the *detached* latent ``s_start`` and is pathwise inside (its noises held fixed), so a
            window of length ``h`` ending at ``T - 1`` is truncated backprop, ``[(0, T)]`` is full backprop,
            and adjacent windows never backpropagate into each other.
        perturbations: Step index to the parameter perturbation that step runs with. Gradients taken on a
            perturbed step are with respect to the unperturbed leaves, evaluated at the perturbed point.
        info: The estimator's own notes on the draw (block start, truncation length), for its terms and logs.
    """

    num_steps: int
    windows: tuple[tuple[int, int], ...] = ()
    perturbations: dict[int, Perturbation] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        T = self.num_steps
        self.windows = tuple((int(a), int(b)) for a, b in sorted(self.windows))
        previous_stop = 0
        for start, stop in self.windows:
            if not 0 <= start < stop <= T:
                raise ValueError(f"gradient window [{start}, {stop}) is empty or outside steps [0, {T})")
            if start < previous_stop:
                raise ValueError(f"gradient windows overlap: {self.windows}")
            previous_stop = stop
        bad = [k for k in self.perturbations if not 0 <= k < T]
        if bad:
            raise ValueError(f"perturbed steps {bad} are outside steps [0, {T})")

    def grad_at(self, k: int) -> bool:
        return any(start <= k < stop for start, stop in self.windows)

    def starts_window(self, k: int) -> bool:
        return any(start == k for start, _ in self.windows)

    @property
    def grad_steps(self) -> list[int]:
        return [k for start, stop in self.windows for k in range(start, stop)]


@dataclass
class Trajectory:
    """What :meth:`DDIMSampler.run` records.

    Attributes:
        plan: The plan it ran.
        latents: ``s_0 .. s_T``, detached, ``T + 1`` tensors of shape ``(B, C, H, W)``.
        noises: ``eps_0 .. eps_{T-1}``, ``(T, B, C, H, W)``.
        sigmas: ``sigma_0 .. sigma_{T-1}``, ``(T,)``.
        log_probs: Sampling-time ``log p(s_{k+1} | s_k)`` of every step, detached, ``(T, B)`` (NaN where
            sigma is 0); what PPO-style ratios compare against.
        window_means: Step index to the graph-carrying mean ``m_k``, for window steps only.
        window_log_probs: Step index to the graph-carrying ``log p_theta(sg(s_{k+1}) | s_k)``, ``(B,)``.
        final: ``s_T``; carries the graph of the last window when that window ends at ``T - 1``.
    """

    plan: Plan
    latents: list[Tensor]
    noises: Tensor
    sigmas: Tensor
    log_probs: Tensor
    window_means: dict[int, Tensor]
    window_log_probs: dict[int, Tensor]
    final: Tensor

    @property
    def batch_size(self) -> int:
        return self.final.shape[0]

    def transitions(self, steps: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Stack stored transitions of ``steps`` for :meth:`DDIMSampler.log_probs`.

        Returns ``(step_index, latents, next_latents)`` with ``len(steps) * B`` rows ordered step-major, so
        they pair with ``embeds.for_steps(steps)``.
        """
        B = self.batch_size
        device = self.final.device
        index = torch.as_tensor(list(steps), device=device, dtype=torch.long).repeat_interleave(B)
        x = torch.cat([self.latents[k] for k in steps])
        x_next = torch.cat([self.latents[k + 1] for k in steps])
        return index, x, x_next

    def rows(self, steps: Tensor, samples: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Stored transitions of arbitrary (step, sample) rows: ``(step_index, latents, next_latents)``.

        ``steps`` and ``samples`` are CPU index tensors of equal length; pair the result with
        ``embeds.rows(steps, samples)``.
        """
        steps_d, samples_d = steps.to(self.final.device), samples.to(self.final.device)
        stacked = self._stacked_latents
        return steps_d, stacked[steps_d, samples_d], stacked[steps_d + 1, samples_d]

    @cached_property
    def _stacked_latents(self) -> Tensor:
        # (T + 1, B, ...), stacked once per trajectory: a step re-scores it in many calls.
        return torch.stack(self.latents)


@dataclass
class WindowReplay:
    """A gradient window re-run with gradient for some samples of a stored trajectory.

    Attributes:
        samples: Indices of the samples (into the trajectory's batch), CPU ``long``.
        means: Step index to the graph-carrying mean ``m_k`` of those samples.
        log_probs: Step index to the graph-carrying ``log p_theta(sg(s_{k+1}) | s_k)`` of those samples.
        final: The latent after the window's last step, pathwise from the detached latent at its start.
    """

    samples: Tensor
    means: dict[int, Tensor]
    log_probs: dict[int, Tensor]
    final: Tensor


# --------------------------------------------------------------------------------------------------------
# The sampler


class DDIMSampler:
    """Batched DDIM sampling with log-probabilities, classifier-free guidance and parameter perturbations.

    Args:
        unet: The denoiser, called as ``unet(x, t, encoder_hidden_states=..., return_dict=False)[0]`` with
            per-sample timesteps ``t`` of shape ``(B,)`` (a diffusers ``UNet2DConditionModel``, LoRA or not).
            Its parameters with ``requires_grad`` are the ones perturbations act on.
        scheduler: A diffusers scheduler (or its config holder) of the model; interpreted as DDIM.
        num_steps: Number of denoising steps ``T``.
        eta: DDIM eta; must be > 0 on steps whose log-probability is used.
        guidance_scale: Classifier-free guidance weight ``w``; 1 turns guidance off (one conditional UNet
            call), above 1 runs the unconditional and conditional branches in one batched call.
        model_dtype: Dtype the UNet's inputs are cast to (its frozen weights' dtype); defaults to the dtype
            of its first parameter.
        timestep_spacing: Override of the scheduler's timestep spacing (``leading``, ``trailing``,
            ``linspace``).
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        num_steps: int,
        eta: float,
        guidance_scale: float = 1.0,
        model_dtype: torch.dtype | None = None,
        timestep_spacing: str | None = None,
    ) -> None:
        if not guidance_scale >= 1:
            raise ValueError(
                f"guidance_scale must be >= 1 (1 turns classifier-free guidance off), got {guidance_scale!r}"
            )
        self.unet = unet
        self.schedule = DDIMSchedule.from_scheduler(scheduler, num_steps, eta, timestep_spacing)
        self.guidance_scale = float(guidance_scale)
        self.model_dtype = model_dtype or next(unet.parameters()).dtype
        self._schedules: dict[torch.device, DDIMSchedule] = {}

    @property
    def num_steps(self) -> int:
        return len(self.schedule)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1

    def schedule_on(self, device: torch.device) -> DDIMSchedule:
        device = torch.device(device)
        if device not in self._schedules:
            self._schedules[device] = self.schedule.to(device)
        return self._schedules[device]

    def trainable_parameters(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.unet.named_parameters() if p.requires_grad}

    # -- model calls ------------------------------------------------------------------------------------

    def _call_unet(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        params: Mapping[str, Tensor] | None,
        checkpoint: bool = False,
    ) -> Tensor:
        def call(x: Tensor, t: Tensor, context: Tensor) -> Tensor:
            args = (x.to(self.model_dtype), t)
            kwargs = {"encoder_hidden_states": context.to(self.model_dtype), "return_dict": False}
            if params is None:
                return self.unet(*args, **kwargs)[0]
            # A functional call evaluates the UNet at theta + u without touching the parameters: the leaves
            # stay the unperturbed weights, so a gradient taken here is d f(theta + u) / d theta, and no saved
            # tensor is ever invalidated by an in-place edit.
            return functional_call(self.unet, dict(params), args, kwargs, strict=False)[0]

        if checkpoint and torch.is_grad_enabled():
            # The whole call is one checkpoint: only its inputs are kept, and backward recomputes it with the
            # same (possibly perturbed) parameter tensors, which the closure holds. Checkpointing inside the
            # UNet (diffusers' per-block option) would recompute outside the functional call, at the
            # unperturbed weights, and silently give wrong gradients in parameter mode.
            return torch.utils.checkpoint.checkpoint(call, x, t, context, use_reentrant=False)
        return call(x, t, context)

    def model_output(
        self,
        latents: Tensor,
        step_index: Tensor,
        embeds: PromptEmbeds,
        perturbation: Perturbation | None = None,
        minus: Tensor | None = None,
        checkpoint: bool = False,
    ) -> Tensor:
        """The (guided) model output for each sample at its own step, float32, in one UNet call.

        Args:
            latents: ``(B, C, H, W)``.
            step_index: ``(B,)`` step of each sample.
            embeds: The samples' conditioning.
            perturbation: Run at ``theta + u`` (``None``: at ``theta``).
            minus: With an antithetic ``perturbation``, a ``(B,)`` CPU bool mask of the samples that run at
                ``theta - u``; by default the second half of the batch (the twins, see :class:`Perturbation`).
            checkpoint: Keep only the call's inputs for backward (activation checkpointing).
        """
        B = latents.shape[0]
        if embeds.batch_size != B or step_index.shape != (B,):
            raise ValueError(
                f"batch sizes differ: latents {B}, prompt embeddings {embeds.batch_size}, "
                f"step indices {tuple(step_index.shape)}"
            )
        if perturbation is None:
            return self._model_output(latents, step_index, embeds, None, checkpoint)
        params = self.trainable_parameters()
        u = replace(perturbation, antithetic=False).noise(params)
        if not perturbation.antithetic:
            return self._model_output(latents, step_index, embeds, {n: p + u[n] for n, p in params.items()}, checkpoint)
        if minus is None:
            if B % 2:
                raise ValueError(f"antithetic perturbations need an even batch size, got {B}")
            minus = torch.arange(B) >= B // 2
        parts = []
        for mask, sign in ((~minus, 1.0), (minus, -1.0)):
            rows = mask.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            rows_d = rows.to(latents.device)
            signed = {n: p + sign * u[n] for n, p in params.items()}
            parts.append((rows_d, self._model_output(
                latents[rows_d], step_index[rows_d], embeds.select(rows_d), signed, checkpoint)))
        if len(parts) == 1:
            return parts[0][1]
        out = parts[0][1].new_empty((B, *parts[0][1].shape[1:]))
        for rows_d, values in parts:
            out = out.index_copy(0, rows_d, values)
        return out

    def _model_output(
        self,
        latents: Tensor,
        step_index: Tensor,
        embeds: PromptEmbeds,
        params: Mapping[str, Tensor] | None,
        checkpoint: bool = False,
    ) -> Tensor:
        t = self.schedule_on(latents.device).timesteps[step_index]
        dtype = _compute_dtype(latents)
        if not self.uses_guidance:
            return self._call_unet(latents, t, embeds.cond, params, checkpoint).to(dtype)
        if embeds.uncond is None:
            raise ValueError(
                f"guidance_scale={self.guidance_scale} needs unconditional embeddings; encode the prompts with "
                "the empty negative prompt"
            )
        out = self._call_unet(
            torch.cat([latents, latents]), torch.cat([t, t]), torch.cat([embeds.uncond, embeds.cond]), params,
            checkpoint,
        ).to(dtype)
        uncond, cond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    # -- transitions ------------------------------------------------------------------------------------

    def step(
        self,
        k: int | Tensor,
        latents: Tensor,
        embeds: PromptEmbeds,
        noise: Tensor | None = None,
        perturbation: Perturbation | None = None,
        prev_latents: Tensor | None = None,
        minus: Tensor | None = None,
        checkpoint: bool = False,
    ) -> StepOutput:
        """One DDIM transition ``s_k -> s_{k+1}`` for a batch (``k`` an int or per-sample indices).

        Give ``noise`` to sample (``s_{k+1} = m_k + sigma_k * noise``) or ``prev_latents`` to score a stored
        ``s_{k+1}``; exactly one of them is needed unless sigma is 0. ``minus`` and ``checkpoint`` are passed to
        :meth:`model_output`.
        """
        B = latents.shape[0]
        schedule = self.schedule_on(latents.device)
        if not isinstance(k, Tensor) or k.dim() == 0:  # one step for the whole batch (int-like)
            # Decided on the CPU copy of the schedule: no device-to-host sync in the sampling loop.
            sigma_k = float(self.schedule.sigma[int(k)])
            any_stochastic = all_stochastic = sigma_k > 0
            k = torch.full((B,), int(k), device=latents.device, dtype=torch.long)
        else:
            cpu_sigma = self.schedule.sigma[k.cpu()]
            any_stochastic, all_stochastic = bool((cpu_sigma > 0).any()), bool((cpu_sigma > 0).all())
        index = k
        out = self.model_output(latents, index, embeds, perturbation, minus=minus, checkpoint=checkpoint)
        mean = ddim_mean(schedule, index, latents, out)
        sigma = schedule.sigma[index]
        if prev_latents is not None:
            next_latents = prev_latents.detach().to(mean.dtype)
        elif noise is not None:
            if noise.shape != latents.shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != latents shape {tuple(latents.shape)}")
            next_latents = mean + _per_sample(schedule.sigma, index, mean) * noise.to(mean.dtype)
        elif not any_stochastic:
            next_latents = mean
        else:
            raise ValueError("a stochastic step (sigma > 0) needs either noise or prev_latents")
        log_prob = gaussian_log_prob(next_latents.detach(), mean, sigma) if all_stochastic else None
        return StepOutput(mean=mean, sigma=sigma, next_latents=next_latents, log_prob=log_prob)

    def log_probs(
        self,
        step_index: Tensor,
        latents: Tensor,
        next_latents: Tensor,
        embeds: PromptEmbeds,
        perturbation: Perturbation | None = None,
    ) -> Tensor:
        """Re-score many stored transitions ``(k, s_k, s_{k+1})`` in one UNet call (per-sample timesteps).

        Returns ``log p_theta(s_{k+1} | s_k)``, ``(N,)`` float32, differentiable in the trainable weights when
        called with gradient enabled. Use :meth:`Trajectory.transitions` and ``embeds.for_steps`` (or
        :meth:`Trajectory.rows` and ``embeds.rows``) to build the inputs.
        """
        if next_latents.shape != latents.shape:
            raise ValueError(
                f"latents {tuple(latents.shape)} and next latents {tuple(next_latents.shape)} differ in shape"
            )
        if bool((self.schedule.sigma[step_index.cpu()] == 0).any()):
            raise ValueError("log-probabilities need sigma > 0 on every scored step; use eta > 0")
        out = self.step(step_index, latents, embeds, perturbation=perturbation, prev_latents=next_latents)
        return out.log_prob

    def replay(
        self,
        trajectory: Trajectory,
        start: int,
        stop: int,
        samples: Tensor,
        embeds: Conditioning,
        checkpoint: bool = False,
    ) -> WindowReplay:
        """Re-run steps ``start .. stop-1`` of a stored trajectory with gradient, for some of its samples.

        The window starts from the detached stored latent ``s_start`` and is pathwise inside, with the stored
        noises and the plan's perturbations (antithetic twins keep their sign), exactly as :meth:`run` computes
        a window: running a window sample chunk by sample chunk gives the same gradients as running it for the
        whole batch, with the memory of one chunk.

        Args:
            trajectory: A trajectory :meth:`run` sampled (its graph is not needed).
            start: First step of the window.
            stop: One past its last step.
            samples: CPU ``long`` indices of the samples to replay.
            embeds: The conditioning of the whole batch.
            checkpoint: Keep only each denoiser call's inputs for backward (activation checkpointing).
        """
        plan = trajectory.plan
        if not 0 <= start < stop <= plan.num_steps:
            raise ValueError(f"window [{start}, {stop}) is empty or outside steps [0, {plan.num_steps})")
        B = trajectory.batch_size
        samples = torch.as_tensor(samples, dtype=torch.long).cpu()
        minus = samples >= B // 2  # the antithetic twins, when a perturbation is antithetic
        device = trajectory.final.device
        rows = samples.to(device)
        x = trajectory.latents[start][rows].detach()
        means: dict[int, Tensor] = {}
        log_probs: dict[int, Tensor] = {}
        with torch.enable_grad():
            for k in range(start, stop):
                out = self.step(
                    k, x, embeds.at(k).select(rows), noise=trajectory.noises[k][rows],
                    perturbation=plan.perturbations.get(k), minus=minus, checkpoint=checkpoint,
                )
                means[k], log_probs[k] = out.mean, out.log_prob
                x = out.next_latents
        return WindowReplay(samples=samples, means=means, log_probs=log_probs, final=x)

    # -- trajectories -----------------------------------------------------------------------------------

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        config = self.unet.config
        size = config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, config.in_channels, h, w)

    def initial_noise(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """Draw ``s_0`` and ``eps_0 .. eps_{T-1}`` from ``generator``, in that order.

        Everything random in a trajectory comes from here, so the same generator state replays it exactly,
        whatever the plan.
        """
        shape = self.latent_shape(batch_size)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        x0 = torch.randn(shape, generator=generator, device=gen_device)
        noises = torch.randn((self.num_steps, *shape), generator=generator, device=gen_device)
        return x0.to(device), noises.to(device)

    @torch.no_grad()
    def sample(self, embeds: Conditioning, generator: torch.Generator | None = None) -> Tensor:
        """Plain sampling without gradient: returns ``s_T``."""
        return self.run(Plan(self.num_steps), embeds, generator=generator).final

    def run(
        self,
        plan: Plan,
        embeds: Conditioning,
        generator: torch.Generator | None = None,
        initial_latents: Tensor | None = None,
        noises: Tensor | None = None,
        record_graph: bool = True,
        checkpoint: bool = False,
    ) -> Trajectory:
        """Sample one trajectory per prompt, recording what ``plan`` asks for.

        Steps outside the plan's windows run under ``no_grad`` and keep no graph, whatever the caller's grad
        mode; window steps run with gradient from the detached latent at their window's start.

        Args:
            plan: Windows and perturbations; ``plan.num_steps`` must equal this sampler's ``T``.
            embeds: Prompt embeddings of the batch, or per-step DCoT embeddings.
            generator: Source of ``s_0`` and the noises when they are not given.
            initial_latents: ``s_0``, ``(B, C, H, W)``, to replay a trajectory.
            noises: ``eps``, ``(T, B, C, H, W)``, to replay a trajectory.
            record_graph: Run the windows with gradient. ``False`` samples every step without a graph (the
                estimators then :meth:`replay` the windows chunk by chunk); the trajectory is the same.
            checkpoint: Keep only the inputs of the windows' denoiser calls for backward (activation
                checkpointing).
        """
        T = self.num_steps
        if plan.num_steps != T:
            raise ValueError(f"plan is for {plan.num_steps} steps but the sampler runs {T}")
        B = embeds.batch_size
        device = embeds.device
        if isinstance(embeds, ScaledPromptEmbeds) and embeds.num_steps != T:
            raise ValueError(f"DCoT scales cover {embeds.num_steps} steps but the sampler runs {T}")
        if initial_latents is None or noises is None:
            drawn_x0, drawn_noises = self.initial_noise(B, generator, device)
            initial_latents = drawn_x0 if initial_latents is None else initial_latents
            noises = drawn_noises if noises is None else noises
        if initial_latents.shape[0] != B or noises.shape[:2] != (T, B):
            raise ValueError(
                f"batch sizes differ: {B} prompts, initial latents {tuple(initial_latents.shape)}, noises "
                f"{tuple(noises.shape)} (expected ({T}, {B}, ...))"
            )
        x = initial_latents.detach().to(_compute_dtype(initial_latents))
        latents = [x]
        log_probs = []
        window_means: dict[int, Tensor] = {}
        window_log_probs: dict[int, Tensor] = {}
        for k in range(T):
            grad = record_graph and plan.grad_at(k)
            if plan.starts_window(k):
                x = x.detach()
            with torch.set_grad_enabled(grad):
                out = self.step(
                    k, x, embeds.at(k), noise=noises[k], perturbation=plan.perturbations.get(k), checkpoint=checkpoint
                )
            if grad:
                window_means[k] = out.mean
                window_log_probs[k] = out.log_prob
            log_probs.append(
                out.log_prob.detach() if out.log_prob is not None else torch.full((B,), float("nan"), device=device)
            )
            x = out.next_latents
            latents.append(x.detach())
        return Trajectory(
            plan=plan,
            latents=latents,
            noises=noises,
            sigmas=self.schedule_on(device).sigma.clone(),
            log_probs=torch.stack(log_probs),
            window_means=window_means,
            window_log_probs=window_log_probs,
            final=x,
        )
