"""Gradient diagnostics: draw many independent estimates and compare them with full backprop.

Draw ``i`` of every estimator uses the same seeds (prompts, initial noise, step noises, perturbations), so
estimates of different estimators are paired by common random numbers: the bias of an estimator is judged
from the per-draw differences to full backprop, whose variance is far smaller than either's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor

from rlr_lightning.estimators import (
    FullBackprop,
    GradientEstimator,
    derive_seed,
    estimate_gradient,
)


def gradient_samples(
    module, prompts: Sequence[str], estimator: GradientEstimator | None = None, num_samples: int = 16, seed: int = 0
) -> Tensor:
    """``num_samples`` independent estimates of ``grad J`` (ascent direction), one flattened LoRA row each.

    Args:
        module: A configured :class:`~rlr_lightning.module.RLRModule` (``configure_model`` called).
        prompts: The fixed batch of prompts every draw uses.
        estimator: The estimator to sample; defaults to the module's own.
        num_samples: Number of independent draws ``N``.
        seed: Base seed: draw ``i`` of every estimator with the same seed sees the same noise.

    Returns:
        ``(N, D)`` float64, ``D`` the number of LoRA weights. The module's own gradients are left untouched.
    """
    estimator = estimator if estimator is not None else module.estimator
    module.prepare_estimator(estimator)
    prompts = list(prompts)
    embeds = module.conditioning_for(prompts)
    rows = [
        estimate_gradient(estimator, module.sampler, embeds, prompts, module.latent_reward,
                          step_seed=derive_seed(seed, i, 0), rank_seed=derive_seed(seed, i, 1),
                          memory=module.memory_plan).total
        for i in range(num_samples)
    ]
    return torch.stack(rows)


def reference_gradient(module, prompts: Sequence[str], num_samples: int = 16, seed: int = 0) -> Tensor:
    """The full-backprop samples (exact per draw): their mean is the reference gradient."""
    return gradient_samples(module, prompts, FullBackprop(), num_samples, seed)


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
        raise ValueError(f"need paired samples of equal shape with N >= 2, got {tuple(samples.shape)} and "
                         f"{tuple(reference.shape)}")
    n = samples.shape[0]
    diff = samples - reference
    mean_diff = diff.mean(0)
    se = (diff.var(0).sum() / n).sqrt()
    direction = torch.randn(samples.shape[1], projections, dtype=samples.dtype,
                            generator=torch.Generator().manual_seed(seed))
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


def diagnose(module, prompts: Sequence[str], estimator: GradientEstimator | None = None, num_samples: int = 16,
             seed: int = 0) -> GradientDiagnostics:
    """Sample ``estimator`` and full backprop on the same ``num_samples`` draws and compare them."""
    samples = gradient_samples(module, prompts, estimator, num_samples, seed)
    return compare(samples, reference_gradient(module, prompts, num_samples, seed), seed=seed)


class GradientDiagnosticsCallback(L.Callback):
    """Log :func:`diagnose` of the module's estimator every N optimizer steps (rank zero only; costs
    ``2 * num_samples`` extra estimator steps each time, so keep it rare).

    Args:
        prompts: The fixed prompts of the diagnostic batch.
        every_n_steps: Interval in optimizer steps.
        num_samples: Draws per diagnosis.
        seed: Seed of the draws (the same every time, so the numbers track the model, not the noise).
    """

    def __init__(self, prompts: list[str], every_n_steps: int = 500, num_samples: int = 16, seed: int = 0) -> None:
        if every_n_steps < 1 or num_samples < 2 or not prompts:
            raise ValueError("need prompts, every_n_steps >= 1 and num_samples >= 2")
        self.prompts = prompts
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.seed = seed
        self.history: list[tuple[int, GradientDiagnostics]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step % self.every_n_steps or any(s == step for s, _ in self.history):
            return
        strategy = trainer.strategy
        # Local backward passes only: never arm DDP's gradient all-reduce from one rank.
        no_sync = strategy.block_backward_sync() if hasattr(strategy, "block_backward_sync") else contextlib.nullcontext()
        with no_sync:
            result = diagnose(pl_module, self.prompts, None, self.num_samples, self.seed)
        self.history.append((step, result))
        metrics = {f"diag/{k}": float(v) for k, v in vars(result).items() if k != "num_samples"}
        for run_logger in trainer.loggers:
            run_logger.log_metrics(metrics, step=step)


class _Held:
    """A tensor held for backward; counts its storage while autograd keeps it."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: Tensor, meter: AutogradMemoryMeter) -> None:
        self.tensor = tensor
        self.meter = meter
        self.key = meter._hold(tensor)

    def __del__(self) -> None:
        self.meter._release(self.key)


class AutogradMemoryMeter:
    """Bytes that autograd holds for backward (activation memory), live and peak, on any device.

    Counts each saved storage once, while any saved tensor keeps it, and ignores the storages of
    ``exclude`` (the model's parameters, which exist anyway). On a GPU, ``torch.cuda.max_memory_allocated``
    measures everything; this measures the part an estimator's plan controls, identically on CPU and GPU.

    Args:
        exclude: Tensors whose storages are not activations (typically ``module.parameters()``).
    """

    def __init__(self, exclude=()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._counts: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self._hooks = None

    def _hold(self, tensor: Tensor) -> int | None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._excluded or key == 0:
            return None
        if key not in self._counts:
            self._counts[key] = 0
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._counts[key] += 1
        return key

    def _release(self, key: int | None) -> None:
        if key is None or key not in self._counts:
            return
        self._counts[key] -= 1
        if self._counts[key] == 0:
            del self._counts[key]
            self.live -= self._sizes.pop(key)

    def __enter__(self) -> AutogradMemoryMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: _Held(t, self), lambda held: held.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
