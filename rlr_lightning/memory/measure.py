"""Measuring memory: what autograd holds, what one step's pieces cost on the real model, and the budget.

On CUDA the allocator's statistics give real device memory; elsewhere :class:`AutogradMemoryMeter` counts the
bytes autograd saves for backward, which is the part a memory plan controls. :func:`measure` prices a
:class:`~rlr_lightning.task.Task` (one denoiser step and the decode + reward path, at two sample counts) for
:func:`~rlr_lightning.memory.planner.plan_memory`.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import psutil
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from rlr_lightning.memory.plan import MemoryCosts, MemoryOptions, PlannedMemory
from rlr_lightning.memory.planner import plan_memory

if TYPE_CHECKING:
    from rlr_lightning.estimators.base import GradientEstimator
    from rlr_lightning.task import Task

logger = logging.getLogger(__name__)


class _Held:
    """A tensor held for backward; counts its storage while autograd keeps it."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: Tensor, meter: AutogradMemoryMeter) -> None:
        self.tensor = tensor
        self.meter = meter
        self.key = meter._hold(tensor)

    def __del__(self) -> None:
        self.meter._release(self.key)


def _local(tensor: Tensor) -> Tensor:
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()


class AutogradMemoryMeter:
    """Bytes that autograd holds for backward (activation memory), live and peak, on any device.

    Counts each saved storage once, while any saved tensor keeps it, and ignores the storages of
    ``exclude`` (the model's parameters, which exist anyway). On a GPU, ``torch.cuda.max_memory_allocated``
    measures everything; this measures the part an estimator's plan controls, identically on CPU and GPU.

    Args:
        exclude: Tensors whose storages are not activations (typically ``module.parameters()``).
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        # A sharded weight (a DTensor, rlr_lightning.sharding) is its local shard's storage.
        self._excluded = {_local(t).untyped_storage().data_ptr() for t in exclude}
        self._counts: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

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
        self._hooks = torch.autograd.graph.saved_tensors_hooks(
            lambda t: _Held(t, self), lambda held: held.tensor
        )
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        assert self._hooks is not None  # set by __enter__
        self._hooks.__exit__(*exc)


def resolve_budget(memory_budget_gb: float | str | None, device: torch.device | str) -> int | None:
    """The memory budget in bytes: GiB given as a number, ``"auto"`` for what the device offers, or ``None``.

    ``"auto"`` is the memory this process can use for a step, its own already-held memory included, since the
    budget covers the resident model too (:func:`plan_memory` counts ``MemoryCosts.resident`` in every peak):

    * CUDA: the device's free memory (``torch.cuda.mem_get_info``) plus what this process's caching allocator
      already reserved (``torch.cuda.memory_reserved``: the loaded weights, cached blocks). Memory of other
      processes and the CUDA context are left out.
    * CPU: the system's available memory (``psutil.virtual_memory().available``) plus this process's resident
      set size, which is what :func:`measure_costs` counts as resident on CPU.

    Raises:
        ValueError: A number that is not > 0 and finite, another string, or ``"auto"`` on another device type.
    """
    if memory_budget_gb is None:
        return None
    valid = "a number of GiB > 0, 'auto' (the device's free memory) or null (no planning)"
    if isinstance(memory_budget_gb, str):
        text = memory_budget_gb.strip().lower()
        if text == "auto":
            return _available_bytes(torch.device(device))
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"memory_budget_gb must be {valid}, got {memory_budget_gb!r}") from None
    elif isinstance(memory_budget_gb, bool) or not isinstance(memory_budget_gb, (int, float)):
        raise ValueError(f"memory_budget_gb must be {valid}, got {memory_budget_gb!r}")
    else:
        value = float(memory_budget_gb)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"memory_budget_gb must be {valid}, got {memory_budget_gb!r}")
    return int(value * 2**30)


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        return int(free + torch.cuda.memory_reserved(index))
    if device.type == "cpu":
        return int(psutil.virtual_memory().available + psutil.Process().memory_info().rss)
    raise ValueError(
        f"memory_budget_gb='auto' reads the free memory of CUDA and CPU devices only, got device {device}; "
        "give the budget as a number of GiB"
    )


#: ``step_fn(n, grad, checkpoint) -> latents``: one denoiser step (a DDIM transition) for ``n`` samples.
StepFn = Callable[[int, bool, bool], Tensor]
#: ``reward_fn(latents) -> (n,) rewards``: decode and reward, differentiable in the latents.
LatentRewardFn = Callable[[Tensor], Tensor]


def per_sample_cost(values: Sequence[int | None], samples: tuple[int, int], out_of_memory: int) -> int:
    """Bytes per sample from a cost measured at two sample counts ``n1 < n2`` (``None``: ran out of memory).

    Both measured: the slope between them, so fixed overheads cancel. Only ``n1`` measured (``n2`` ran out of
    memory): ``values[0] / n1``, an upper bound of the slope since fixed overheads are >= 0. Neither:
    ``out_of_memory`` (the device's memory), so no plan that needs the piece fits: the planner turns to
    checkpointing and chunks, or says what does not fit.
    """
    (n1, n2), (v1, v2) = samples, values
    if v1 is None:
        return out_of_memory
    if v2 is None:
        return math.ceil(v1 / n1)
    return max(0, round((v2 - v1) / (n2 - n1)))


class _Probe:
    """Measures the memory one piece of work takes, on CUDA from the allocator's statistics, elsewhere from
    the bytes autograd saves for backward (:class:`AutogradMemoryMeter`)."""

    def __init__(self, device: torch.device, exclude: list[Tensor]) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.exclude = exclude

    def cuda_bytes(self, work: Callable[[], object], held: bool = False) -> int | None:
        """Peak bytes above the start while ``work`` runs, or (``held``) bytes held by what it returns;
        ``None`` when it runs out of device memory (a video model's unplanned step can: that is a result)."""
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            result = work()
        except torch.OutOfMemoryError:
            result = None
            used = None
        else:
            torch.cuda.synchronize(self.device)
            read = torch.cuda.memory_allocated if held else torch.cuda.max_memory_allocated
            used = read(self.device) - base
        del result
        if used is None:
            # The failed work's tensors died with the exception: return their blocks before the next piece.
            gc.collect()
            torch.cuda.empty_cache()
            return None
        return int(used)

    def saved_bytes(self, forward: Callable[[], Tensor]) -> int:
        """Bytes autograd saves for backward while ``forward`` runs (model weights excluded)."""
        with AutogradMemoryMeter(self.exclude) as meter:
            out = forward()
        del out
        return meter.peak

    def no_grad(self, forward: Callable[[], Tensor]) -> int | None:
        """Transient peak of a forward without gradient (CUDA only; 0 elsewhere: nothing measures it)."""
        if not self.cuda:
            return 0
        with torch.no_grad():
            return self.cuda_bytes(forward)

    def with_grad(self, forward: Callable[[], Tensor], wrt: Sequence[Tensor]) -> int | None:
        """What a forward with gradient holds: on CUDA its peak over forward and backward (with respect to
        ``wrt``, nothing written to ``.grad``); elsewhere the bytes it saves for backward."""
        with torch.enable_grad():
            if not self.cuda:
                return self.saved_bytes(forward)

            def forward_backward() -> None:
                out = forward()
                torch.autograd.grad(out.float().sum(), list(wrt), allow_unused=True)

            return self.cuda_bytes(forward_backward)

    def kept(self, forward: Callable[[], Tensor]) -> int | None:
        """What a forward with gradient keeps until its backward (its transient excluded)."""
        with torch.enable_grad():
            if not self.cuda:
                return self.saved_bytes(forward)
            return self.cuda_bytes(forward, held=True)


def measure_costs(
    step_fn: StepFn,
    reward_fn: LatentRewardFn,
    set_reward_checkpointing: Callable[[bool], None],
    models: Sequence[nn.Module],
    device: torch.device | str,
    samples: tuple[int, int] = (1, 2),
    resident: int | None = None,
) -> MemoryCosts:
    """Measure :class:`MemoryCosts` on the real model, before the first step.

    Every cost is measured at two sample counts and taken as the per-sample slope, so fixed overheads (CUDA
    workspaces, the LoRA gradients) cancel. On CUDA the allocator's statistics give bytes of real device
    memory: peaks over forward and backward (``torch.cuda.max_memory_allocated``), and what a checkpointed
    step still holds after its forward (``torch.cuda.memory_allocated``). On any other device they are a
    *model of activation bytes, not of process memory*: the grad costs are the bytes autograd saves for
    backward (:class:`AutogradMemoryMeter`, model weights excluded), backward
    transients are not counted, and the no-grad transients (``sample_step``, ``reward_forward``) are 0.

    Args:
        step_fn: ``step_fn(n, grad, checkpoint)`` runs one denoiser step (a DDIM transition, with the run's
            guidance) for ``n`` samples and returns its output latents, with a graph to the trainable weights
            when ``grad``; ``checkpoint`` keeps only the call's inputs (activation checkpointing).
        reward_fn: ``reward_fn(latents)`` decodes ``(n, C, H, W)`` latents and rewards them, ``(n,)``,
            differentiably in the latents.
        set_reward_checkpointing: Turns the VAE decoder's and the reward model's checkpointing on or off;
            it is left off.
        models: The modules the step runs (backbone, reward model): gradients are taken with respect to their
            trainable parameters (returned and dropped; ``.grad`` is not touched), and their parameters and
            buffers are not activations.
        device: The device the step runs on.
        samples: The two sample counts ``n1 < n2`` to measure at.
        resident: Bytes held before the step; default: ``torch.cuda.memory_allocated`` on CUDA, this
            process's resident set size elsewhere (matching :func:`resolve_budget`'s ``"auto"``).
    """
    device = torch.device(device)
    n1, n2 = samples
    if not (isinstance(n1, int) and isinstance(n2, int) and 1 <= n1 < n2):
        raise ValueError(f"samples must be two sample counts 1 <= n1 < n2, got {samples!r}")
    trainable = [p for m in models for p in m.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("measure_costs needs trainable parameters (the LoRA weights) in `models`")
    exclude = [t for m in models for t in (*m.parameters(), *m.buffers())]
    probe = _Probe(device, exclude)
    if resident is None:
        if probe.cuda:
            resident = torch.cuda.memory_allocated(device)
        else:
            resident = psutil.Process().memory_info().rss

    measured: dict[str, list[int | None]] = {}
    try:
        for n in samples:
            for name, value in _measure_at(n, probe, step_fn, reward_fn, set_reward_checkpointing, trainable):
                measured.setdefault(name, []).append(value)
    finally:
        set_reward_checkpointing(False)
    logger.debug("memory measured at %s samples: %s", samples, measured)
    out_of_memory = torch.cuda.get_device_properties(device).total_memory if probe.cuda else 0
    ran_out = [f"{name} at {samples[v.index(None)]}" for name, v in measured.items() if None in v]
    if ran_out:
        logger.info(
            "Measuring the step's memory ran out of device memory for %s sample(s); priced per sample from the "
            "smaller count where it ran, else as the whole device (such a plan cannot fit)",
            ", ".join(ran_out),
        )
    return MemoryCosts(
        resident=int(resident),
        **{name: per_sample_cost(v, samples, out_of_memory) for name, v in measured.items()},
    )


def _measure_at(
    n: int,
    probe: _Probe,
    step_fn: StepFn,
    reward_fn: LatentRewardFn,
    set_reward_checkpointing: Callable[[bool], None],
    trainable: Sequence[Tensor],
) -> list[tuple[str, int | None]]:
    """Every cost of :class:`MemoryCosts` but ``resident``, for ``n`` samples (not yet per sample)."""
    with torch.no_grad():
        latents = step_fn(n, False, False).detach()
    costs: list[tuple[str, int | None]] = [
        ("sample_step", probe.no_grad(lambda: step_fn(n, False, False))),
        ("grad_step", probe.with_grad(lambda: step_fn(n, True, False), trainable)),
        ("grad_step_input", probe.kept(lambda: step_fn(n, True, True))),
        # Elsewhere than CUDA nothing sees the recomputation: the step's own saved bytes stand for it.
        (
            "grad_step_checkpointed",
            probe.with_grad(lambda: step_fn(n, True, True), trainable)
            if probe.cuda
            else probe.with_grad(lambda: step_fn(n, True, False), trainable),
        ),
        ("reward_forward", probe.no_grad(lambda: reward_fn(latents))),
    ]
    z = latents.clone().requires_grad_(True)
    set_reward_checkpointing(False)
    costs.append(("reward_path", probe.with_grad(lambda: reward_fn(z), [z])))
    set_reward_checkpointing(True)
    costs.append(("reward_path_checkpointed", probe.with_grad(lambda: reward_fn(z), [z])))
    costs.append(("reward_inputs", probe.kept(lambda: reward_fn(z))))
    set_reward_checkpointing(False)
    return costs


def measure(task: Task, prompt: str, samples: tuple[int, int] = (1, 2)) -> MemoryCosts:
    """Measure the :class:`MemoryCosts` of ``task``'s step on its real model, for one ``prompt``.

    One denoiser step is a middle step of the task's sampler (every step costs the same, and its sigma is > 0
    wherever eta is), with the task's guidance; the decode + reward path is :meth:`Task.latent_reward`.

    Args:
        task: The configured task (backbone with LoRA, sampler, reward).
        prompt: A prompt of the training data (its length sets the text encoders' cost for some families).
        samples: The two sample counts to measure at (:func:`measure_costs`).
    """
    if task.reward is None:
        raise ValueError(
            "measuring a step's memory needs the task's reward (decode + reward is part of a step)"
        )
    sampler, device = task.sampler, task.device
    step = task.settings.num_steps // 2

    def step_fn(n: int, grad: bool, checkpoint: bool) -> Tensor:
        embeds = task.conditioning_for([prompt] * n)
        x, noise = sampler.initial_noise(n, torch.Generator().manual_seed(0), device)
        with torch.set_grad_enabled(grad):
            return sampler.step(
                step, x, embeds.at(step), noise=noise[step], checkpoint=checkpoint
            ).next_latents

    def reward_fn(latents: Tensor) -> Tensor:
        return task.latent_reward(latents, [prompt] * latents.shape[0])

    costs = measure_costs(
        step_fn,
        reward_fn,
        task.set_activation_checkpointing,
        [task.backbone, task.reward],
        device,
        samples=samples,
    )
    if task.sharding is not None:
        # The blocks' weights gathered around each call are the same for one sample and two: the slopes
        # above cannot see them, so they count as held through the whole step.
        gathered = task.sharding.gathered_bytes
        costs = replace(costs, resident=costs.resident + gathered, gathered_weights=gathered)
    if sampler.denoiser.checkpoint_blocks:
        # Its re-scoring calls run as checkpointed window steps do when the plan checkpoints (Sampler.log_probs).
        costs = replace(costs, rescore_step_checkpointed=costs.checkpointed_step())
    return costs


def plan_task(
    task: Task,
    estimator: GradientEstimator,
    options: MemoryOptions,
    prompts: Sequence[str],
    broadcast: Callable[[PlannedMemory], PlannedMemory] | None = None,
) -> PlannedMemory:
    """Measure ``task``, choose the memory plan of ``estimator``'s step for the budget, and apply it: the task's
    ``memory_plan`` and checkpointing, the estimator's block length (``RLR(h="auto")``).

    Args:
        task: The configured task, reward included.
        estimator: The estimator whose step is planned.
        options: The budget (GiB or ``"auto"``, :func:`resolve_budget`) and the user's fixed choices.
        prompts: The local batch's prompts (their number sets the samples of a step).
        broadcast: Under data parallelism, rank zero's plan to every rank (so every rank runs the same block
            length); ``None`` on one process.

    Raises:
        MemoryBudgetError: Nothing fits; the message says what to lower.
    """
    budget = resolve_budget(options.budget_gb, task.device)
    assert budget is not None  # planning runs with a budget (options.budget_gb)
    costs = measure(task, prompts[0])
    T = task.settings.num_steps
    planned = plan_memory(
        costs,
        budget,
        lambda block: estimator.graph_shape(T, len(prompts), block),
        h=estimator.block_length,
        chunk_samples=options.chunk_samples,
        activation_checkpointing=options.activation_checkpointing,
        num_steps=T,
        max_block=estimator.max_block_length(T),
    )
    if broadcast is not None:
        planned = broadcast(planned)
    task.memory_plan = planned.plan
    assert task.reward is not None  # the task is planned with its reward
    estimator.apply_memory_plan(planned, T, task.settings.eta, task.reward.differentiable)
    task.set_activation_checkpointing(planned.plan.activation_checkpointing)
    rank_zero_info(f"Measured {costs.describe()}")
    description = planned.describe()
    rank_zero_info(description[0].upper() + description[1:])
    return planned
