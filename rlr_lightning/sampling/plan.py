"""Plans, perturbations and trajectories: what an estimator asks the sampler to record, and what it gets.

An estimator describes what it needs as a :class:`Plan` (which steps run with gradient, in which contiguous
*windows*, and which steps run with a seeded perturbation of the trainable weights); the sampler executes it
in one pass and returns a :class:`Trajectory` holding the detached latents and noises of every step plus the
graph-carrying means and log-probabilities of the window steps only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor


@dataclass
class StepOutput:
    """One transition of a batch.

    Attributes:
        mean: ``m_k``, float32, carrying a graph when computed with gradient.
        sigma: ``sigma_k`` per sample, ``(B,)``.
        next_latents: ``s_{k+1} = mean + sigma * noise`` (pathwise: carries the mean's graph), or the given
            ``prev_latents`` detached when re-scoring a stored transition.
        log_prob: ``log p_theta(sg(s_{k+1}) | s_k)`` per sample, ``(B,)`` float32; ``None`` where sigma is 0.
        prediction: The clean latent ``x0_hat_k`` the model output predicts, when asked for (``predict``).
    """

    mean: Tensor
    sigma: Tensor
    next_latents: Tensor
    log_prob: Tensor | None
    prediction: Tensor | None = None


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
            n: (
                torch.randn(params[n].shape, generator=gen, device=device, dtype=torch.float32) * self.scale
            ).to(params[n].dtype)
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
        predictions: Steps whose mean ``m_k`` and clean-latent prediction ``x0_hat_k`` the trajectory keeps
            (detached), for the per-step value and MuProp baselines (``rlr_lightning.estimators.baselines``).
    """

    num_steps: int
    windows: tuple[tuple[int, int], ...] = ()
    perturbations: dict[int, Perturbation] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    predictions: tuple[int, ...] = ()

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
        self.predictions = tuple(sorted({int(k) for k in self.predictions}))
        bad = [k for k in self.predictions if not 0 <= k < T]
        if bad:
            raise ValueError(f"recorded prediction steps {bad} are outside steps [0, {T})")

    def grad_at(self, k: int) -> bool:
        return any(start <= k < stop for start, stop in self.windows)

    def starts_window(self, k: int) -> bool:
        return any(start == k for start, _ in self.windows)


@dataclass
class Trajectory:
    """What :meth:`~rlr_lightning.sampling.sampler.DiffusionSampler.run` records.

    Attributes:
        plan: The plan it ran.
        latents: ``s_0 .. s_T``, detached, ``T + 1`` tensors of shape ``(B, C, H, W)``.
        noises: ``eps_0 .. eps_{T-1}``, ``(T, B, C, H, W)``.
        sigmas: ``sigma_0 .. sigma_{T-1}``, ``(T,)``.
        log_probs: Sampling-time ``log p(s_{k+1} | s_k)`` of every step, detached, ``(T, B)`` (NaN where
            sigma is 0); what PPO-style ratios compare against.
        window_means: Step index to the graph-carrying mean ``m_k``, for window steps only.
        window_log_probs: Step index to the graph-carrying ``log p_theta(sg(s_{k+1}) | s_k)``, ``(B,)``
            (``None`` on a deterministic step).
        final: ``s_T``; carries the graph of the last window when that window ends at ``T - 1``.
        step_means: Step index to the detached mean ``m_k``, for the plan's ``predictions`` steps.
        predictions: Step index to the detached clean-latent prediction ``x0_hat_k`` (from ``s_k``), for the
            plan's ``predictions`` steps.
    """

    plan: Plan
    latents: list[Tensor]
    noises: Tensor
    sigmas: Tensor
    log_probs: Tensor
    window_means: dict[int, Tensor]
    window_log_probs: dict[int, Tensor | None]
    final: Tensor
    step_means: dict[int, Tensor] = field(default_factory=dict)
    predictions: dict[int, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.final.shape[0]

    def transitions(self, steps: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Stack stored transitions of ``steps`` for :meth:`~rlr_lightning.sampling.sampler.DiffusionSampler.log_probs`.

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
        log_probs: Step index to the graph-carrying ``log p_theta(sg(s_{k+1}) | s_k)`` of those samples
            (``None`` on a deterministic step).
        final: The latent after the window's last step, pathwise from the detached latent at its start.
    """

    samples: Tensor
    means: dict[int, Tensor]
    log_probs: dict[int, Tensor | None]
    final: Tensor
