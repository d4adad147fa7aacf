"""Gradient diagnostics: draw many independent estimates and compare them with full backprop.

Draw ``i`` of every estimator uses the same seeds (prompts, initial noise, step noises, perturbations), so
estimates of different estimators are paired by common random numbers: the bias of an estimator is judged
from the per-draw differences to full backprop, whose variance is far smaller than either's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch import Tensor

from rlr_lightning.ranks import renders
from rlr_lightning.task import Task, as_task

if TYPE_CHECKING:
    from rlr_lightning.module import RLRModule

from rlr_lightning.estimators import (
    FullBackprop,
    GradientEstimator,
    derive_seed,
    estimate_gradient,
)


def gradient_samples(
    task: Task | RLRModule,
    prompts: Sequence[str],
    estimator: GradientEstimator | None = None,
    num_samples: int = 16,
    seed: int = 0,
) -> Tensor:
    """``num_samples`` independent estimates of ``grad J`` (ascent direction), one flattened LoRA row each.

    Args:
        task: The :class:`~rlr_lightning.task.Task` (or an ``RLRModule`` whose model is loaded: its task).
        prompts: The fixed batch of prompts every draw uses.
        estimator: The estimator to sample; defaults to the module's own (required with a task).
        num_samples: Number of independent draws ``N``.
        seed: Base seed: draw ``i`` of every estimator with the same seed sees the same noise.

    Returns:
        ``(N, D)`` float64, ``D`` the number of LoRA weights. The module's own gradients are left untouched.
    """
    if estimator is None:
        if isinstance(task, Task):
            raise ValueError("gradient_samples of a Task needs the estimator to sample")
        estimator = task.estimator
    task = as_task(task)
    task.prepare(estimator)
    prompts = list(prompts)
    embeds = task.conditioning_for(prompts)
    rows = [
        estimate_gradient(
            estimator,
            task.sampler,
            embeds,
            prompts,
            task.latent_reward,
            step_seed=derive_seed(seed, i, 0),
            rank_seed=derive_seed(seed, i, 1),
            memory=task.memory_plan,
        ).total
        for i in range(num_samples)
    ]
    return torch.stack(rows)


def reference_gradient(
    task: Task | RLRModule, prompts: Sequence[str], num_samples: int = 16, seed: int = 0
) -> Tensor:
    """The full-backprop samples (exact per draw): their mean is the reference gradient."""
    return gradient_samples(task, prompts, FullBackprop(), num_samples, seed)


@dataclass
class GradientDiagnostics:
    """How a set of estimates compares with full backprop on the same draws.

    Attributes:
        num_samples: ``N``.
        bias_se: ``||mean(G - G_full)||`` in units of its standard error ``sqrt(tr Cov(G - G_full) / N)``:
            about 1 for an unbiased estimator whatever ``N``, growing like ``sqrt(N)`` for a biased one.
        max_abs_z: Largest per-coordinate ``|mean| / SE`` of the paired differences (over random projections).
        variance: Total variance ``tr Cov(G)`` of one estimate.
        reference_variance: The same for full backprop on the same draws.
        cosine: Cosine between the mean estimate and the reference mean.
        mean_cosine: Mean cosine between a single estimate and the reference mean.
    """

    num_samples: int
    bias_se: float
    max_abs_z: float
    variance: float
    reference_variance: float
    cosine: float
    mean_cosine: float


def compare(samples: Tensor, reference: Tensor, projections: int = 16, seed: int = 0) -> GradientDiagnostics:
    """Diagnostics of ``samples`` against paired full-backprop ``reference`` samples (same draws, same order)."""
    if samples.shape != reference.shape or samples.shape[0] < 2:
        raise ValueError(
            f"need paired samples of equal shape with N >= 2, got {tuple(samples.shape)} and "
            f"{tuple(reference.shape)}"
        )
    n = samples.shape[0]
    diff = samples - reference
    mean_diff = diff.mean(0)
    se = (diff.var(0).sum() / n).sqrt()
    direction = torch.randn(
        samples.shape[1], projections, dtype=samples.dtype, generator=torch.Generator().manual_seed(seed)
    )
    projected = diff @ direction
    z = projected.mean(0) / (projected.std(0) / n**0.5).clamp(min=1e-300)
    ref_mean = reference.mean(0)
    cos = torch.nn.functional.cosine_similarity
    return GradientDiagnostics(
        num_samples=n,
        bias_se=float(mean_diff.norm() / se.clamp(min=1e-300)),
        max_abs_z=float(z.abs().max()),
        variance=float(samples.var(0).sum()),
        reference_variance=float(reference.var(0).sum()),
        cosine=float(cos(samples.mean(0), ref_mean, dim=0)),
        mean_cosine=float(cos(samples, ref_mean.expand_as(samples), dim=1).mean()),
    )


def diagnose(
    task: Task | RLRModule,
    prompts: Sequence[str],
    estimator: GradientEstimator | None = None,
    num_samples: int = 16,
    seed: int = 0,
) -> GradientDiagnostics:
    """Sample ``estimator`` and full backprop on the same ``num_samples`` draws and compare them."""
    samples = gradient_samples(task, prompts, estimator, num_samples, seed)
    return compare(samples, reference_gradient(task, prompts, num_samples, seed), seed=seed)


class GradientDiagnosticsCallback(L.Callback):
    """Log :func:`diagnose` of the module's estimator every N optimizer steps (rank zero only; costs
    ``2 * num_samples`` extra estimator steps each time, so keep it rare).

    Args:
        prompts: The fixed prompts of the diagnostic batch.
        every_n_steps: Interval in optimizer steps.
        num_samples: Draws per diagnosis.
        seed: Seed of the draws (the same every time, so the numbers track the model, not the noise).
    """

    def __init__(
        self, prompts: list[str], every_n_steps: int = 500, num_samples: int = 16, seed: int = 0
    ) -> None:
        if every_n_steps < 1 or num_samples < 2 or not prompts:
            raise ValueError("need prompts, every_n_steps >= 1 and num_samples >= 2")
        self.prompts = prompts
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.history: list[tuple[int, GradientDiagnostics]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not renders(trainer) or step % self.every_n_steps or any(s == step for s, _ in self.history):
            return
        strategy = trainer.strategy
        # Local backward passes only: never arm DDP's gradient all-reduce from one rank.
        no_sync = (
            strategy.block_backward_sync()
            if hasattr(strategy, "block_backward_sync")
            else contextlib.nullcontext()
        )
        with no_sync:
            result = diagnose(pl_module, self.prompts, None, self.num_samples, self.seed)
        self.history.append((step, result))
        metrics = {f"diag/{k}": float(v) for k, v in vars(result).items() if k != "num_samples"}
        for run_logger in trainer.loggers:
            run_logger.log_metrics(metrics, step=step)
