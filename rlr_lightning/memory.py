"""How the gradient terms run within a memory budget: chunk sizes, activation checkpointing, block length.

A :class:`MemoryPlan` says how many trajectory samples one graph-carrying model call group may hold
(``chunk_samples``) and whether activation checkpointing is on. The estimators and the sampler execute it
(``rlr_lightning.estimators.base``, ``rlr_lightning.sampling``); the planner below chooses it from costs
measured on the real model before the first step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Literal

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryPlan:
    """How the gradient terms of one step run.

    Attributes:
        chunk_samples: At most this many trajectory samples (prompts; classifier-free guidance's two branches
            and the steps of a window count inside one sample) per graph-carrying model call group: each
            likelihood-ratio re-scoring call holds at most this many (step, sample) transitions, and the
            first-order and half-order windows are replayed for at most this many samples at a time, each
            chunk's backward before the next chunk's forward. ``None``: no chunking over samples (windows
            keep their graph from the sampling pass, re-scoring covers ``score_chunk_steps`` steps of the
            whole batch per call).
        activation_checkpointing: Keep only the inputs of each denoiser call in a gradient window
            (recomputed during backward), checkpoint the VAE decoder's blocks and the reward model on the
            first-order path. Costs about one extra forward of those calls; the gradients are unchanged.
        rescore_samples: Transitions per likelihood-ratio re-scoring call when that differs from
            ``chunk_samples`` (``None``: ``chunk_samples``). A re-scoring call keeps one denoiser call's graph,
            a window several plus the decoder's, so re-scoring can take larger chunks in the same memory, and
            fewer, larger calls are faster.
    """

    chunk_samples: int | None = None
    activation_checkpointing: bool = False
    rescore_samples: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_samples is not None and self.chunk_samples < 1:
            raise ValueError(f"chunk_samples must be >= 1 (or None for no chunking), got {self.chunk_samples}")
        if self.rescore_samples is not None and self.rescore_samples < 1:
            raise ValueError(f"rescore_samples must be >= 1 (or None), got {self.rescore_samples}")

    def chunks(self, samples: int) -> bool:
        """Whether a batch of ``samples`` trajectory samples runs in chunks (else unchunked, as one)."""
        return self.chunk_samples is not None and self.chunk_samples < samples

    def rescore_cap(self) -> int | None:
        """The most transitions one re-scoring call may hold under this plan (``None``: no cap)."""
        return self.rescore_samples if self.rescore_samples is not None else self.chunk_samples


# --------------------------------------------------------------------------------------------------------
# What one step keeps a graph of, and what each piece costs


@dataclass(frozen=True)
class GraphShape:
    """What one estimator step keeps a graph of (``GradientEstimator.graph_shape(num_steps, samples)``).

    Attributes:
        samples: Trajectory samples of the local batch (antithetic pairs count twice).
        windows: Lengths of the gradient windows, in steps, in the order their backward passes run.
        reward_window: Index into ``windows`` of the window whose output is decoded and rewarded with
            gradient (the first-order path), or ``None`` when no gradient goes through the reward.
        rescoring_steps: Number of steps whose stored transitions likelihood-ratio terms re-score (0: none).
        rescore_steps_per_call: Steps of the whole batch one re-scoring call covers (``score_chunk_steps``).
    """

    samples: int
    windows: tuple[int, ...] = ()
    reward_window: int | None = None
    rescoring_steps: int = 0
    rescore_steps_per_call: int = 1

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"a step needs at least 1 trajectory sample, got samples={self.samples}")
        if any(length < 1 for length in self.windows):
            raise ValueError(f"gradient windows must be at least 1 step long, got {self.windows}")
        if self.reward_window is not None and not 0 <= self.reward_window < len(self.windows):
            raise ValueError(f"reward_window={self.reward_window} is no index into windows={self.windows}")
        if self.rescoring_steps < 0 or self.rescore_steps_per_call < 1:
            raise ValueError(
                f"need rescoring_steps >= 0 and rescore_steps_per_call >= 1, got {self.rescoring_steps} and "
                f"{self.rescore_steps_per_call}"
            )


@dataclass(frozen=True)
class MemoryCosts:
    """Measured memory of the pieces of one step, in bytes (per sample or per image where so named).

    Attributes:
        resident: Allocated before the step: weights, LoRA gradients and optimizer state, the trajectory.
        sample_step: Transient peak of one denoiser step without gradient, per sample (guidance included).
        grad_step: What one denoiser step with gradient holds, per sample (guidance included): its saved
            activations plus its backward's transient.
        grad_step_input: What one checkpointed denoiser step keeps until its backward, per sample: its inputs
            (and the small DDIM arithmetic around the call).
        reward_path: Decode + reward with gradient, per image: saved activations plus backward transient.
        reward_path_checkpointed: The same with the VAE decoder's and the reward model's checkpointing on.
        reward_forward: Transient peak of decode + reward without gradient, per image (0 if unknown).
        grad_step_checkpointed: Peak of one checkpointed denoiser step over its forward and its backward (the
            recomputation), per sample; ``None``: assume ``grad_step``.
        reward_inputs: What the checkpointed decode + reward keeps per image until its backward (the inputs of
            its checkpointed blocks); ``None``: assume ``reward_path_checkpointed`` (an upper bound).
    """

    resident: int
    sample_step: int
    grad_step: int
    grad_step_input: int
    reward_path: int
    reward_path_checkpointed: int
    reward_forward: int = 0
    grad_step_checkpointed: int | None = None
    reward_inputs: int | None = None

    def __post_init__(self) -> None:
        negative = {k: v for k, v in vars(self).items() if v is not None and v < 0}
        if negative:
            raise ValueError(f"memory costs are bytes >= 0, got {negative}")

    def describe(self) -> str:
        """One log line: the measured costs, per sample."""
        return (
            f"memory costs: resident {format_bytes(self.resident)}; per sample: no-grad step "
            f"{format_bytes(self.sample_step)}, grad step {format_bytes(self.grad_step)} "
            f"({format_bytes(self.grad_step_input)} kept when checkpointed), decode + reward with grad "
            f"{format_bytes(self.reward_path)} ({format_bytes(self.reward_path_checkpointed)} checkpointed, "
            f"{format_bytes(self.reward_kept(True))} kept until its backward), without grad "
            f"{format_bytes(self.reward_forward)}"
        )

    def reward_kept(self, checkpointing: bool) -> int:
        """What decode + reward keeps per image while other backward passes run (upper bound without
        checkpointing: its peak)."""
        if not checkpointing:
            return self.reward_path
        return self.reward_path_checkpointed if self.reward_inputs is None else self.reward_inputs


def format_bytes(n: float) -> str:
    """``n`` bytes for people: ``19.3 GiB``, ``512.0 MiB``, ``12 KiB``."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.0f} KiB"


# --------------------------------------------------------------------------------------------------------
# The model of one step's peak


@dataclass(frozen=True)
class Phase:
    """A moment of the step at which memory may peak, and what is held then.

    Attributes:
        name: What runs then (``sampling pass``, ``first backward``, ...).
        parts: ``(what, bytes)`` of everything held, the resident memory first.
        scales_with_batch: Whether the phase covers the whole local batch whatever the chunk size (only a
            smaller batch shrinks it).
    """

    name: str
    parts: tuple[tuple[str, int], ...]
    scales_with_batch: bool = False

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)


def _window_kept(costs: MemoryCosts, length: int, n: int, checkpointing: bool) -> int:
    """Bytes a window of ``length`` steps over ``n`` samples keeps between its forward and its backward."""
    per_step = costs.grad_step_input if checkpointing else costs.grad_step
    return length * per_step * n


def _window_recompute(costs: MemoryCosts, n: int, checkpointing: bool) -> int:
    """Bytes of the one denoiser call a checkpointed window recomputes at a time during its backward."""
    if not checkpointing:
        return 0
    per_sample = costs.grad_step if costs.grad_step_checkpointed is None else costs.grad_step_checkpointed
    return per_sample * n


def _reward_path(costs: MemoryCosts, n: int, checkpointing: bool) -> int:
    return (costs.reward_path_checkpointed if checkpointing else costs.reward_path) * n


def _steps(windows: Sequence[int]) -> str:
    return "+".join(str(length) for length in windows)


def _count(n: int, noun: str) -> str:
    """``1 sample``, ``2 samples``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def memory_phases(costs: MemoryCosts, shape: GraphShape, plan: MemoryPlan) -> list[Phase]:
    """The phases of one step under ``plan`` and what each holds; :func:`predicted_peak` is their maximum.

    The model (each phase also holds ``costs.resident``):

    * A window of ``L`` steps over ``n`` samples keeps ``L * grad_step * n`` until its backward;
      checkpointed, ``L * grad_step_input * n``, and its backward recomputes one call at a time
      (``grad_step_checkpointed * n``). Every window step is checkpointed, single-step windows included.
      The decode + reward path of ``n`` images peaks at ``reward_path * n`` (``reward_path_checkpointed *
      n``) during its own backward and keeps :meth:`MemoryCosts.reward_kept` per image while other backward
      passes run.
    * Unchunked (``plan.chunk_samples`` is ``None`` or ``>= shape.samples``): the windows run inside the
      sampling pass and keep their graphs until their backward, so the *sampling pass* holds the no-grad
      step transient of the whole batch plus every window's graph (an upper bound: a window that ends at the
      last step never overlaps a no-grad step). The backward passes run in window order: window ``i``'s
      holds the graphs of windows ``i, i+1, ...``, the decode + reward graph if its window comes later, and
      the recomputed call when checkpointed; the reward window's starts with the decode + reward backward.
      So the first backward holds every window's graph and the whole batch's decode + reward graph. Without
      a first-order path the rewards are computed without gradient for the whole batch, windows held.
    * Chunked (``c = plan.chunk_samples < shape.samples``): the sampling pass keeps no graph; the rewards are
      computed without gradient ``c`` images at a time; then each window is replayed ``c`` samples at a
      time, forward then backward, one window at a time, the first-order window with its decode + reward
      path of ``c`` images (whose backward finishes before the window's recomputation starts).
    * Re-scoring runs after the windows' backward passes, one call at a time, each holding
      ``min(rescore_steps_per_call, rescoring_steps) * samples`` transitions of ``grad_step`` bytes, or at
      most ``c`` transitions when chunked (``chunk_samples`` caps a re-scoring call even when it is
      ``>= samples``).

    Not modelled (the planner's headroom covers them): fixed per-call overheads (workspaces), allocator
    fragmentation, the stored latents of the trajectory (``T + 1`` latents per sample), LoRA gradients
    created at the first backward.
    """
    n = shape.samples
    ck = plan.activation_checkpointing
    c = plan.chunk_samples
    resident = ("resident weights and optimizer state", costs.resident)

    def no_grad_step(m: int) -> tuple[str, int]:
        return f"denoiser step without grad, {_count(m, 'sample')}", costs.sample_step * m

    def no_grad_reward(m: int) -> tuple[str, int]:
        return f"decode + reward without grad, {_count(m, 'image')}", costs.reward_forward * m

    def recompute(m: int) -> tuple[str, int]:
        return f"denoiser call recomputed, {_count(m, 'sample')}", _window_recompute(costs, m, ck)

    def reward_path(m: int) -> tuple[str, int]:
        return f"decode + reward with grad, {_count(m, 'image')}", _reward_path(costs, m, ck)

    def reward_kept(m: int) -> tuple[str, int]:
        return f"decode + reward graph kept, {_count(m, 'image')}", costs.reward_kept(ck) * m

    phases: list[Phase] = []
    rw = shape.reward_window
    if not plan.chunks(n):
        kept = [_window_kept(costs, length, n, ck) for length in shape.windows]

        def windows_from(i: int) -> list[tuple[str, int]]:
            if i >= len(kept):
                return []
            what = f"gradient windows of {_steps(shape.windows[i:])} steps x {_count(n, 'sample')}"
            return [(what, sum(kept[i:]))]

        phases.append(Phase("sampling pass", (resident, no_grad_step(n), *windows_from(0)), True))
        if rw is None:
            phases.append(Phase("reward", (resident, no_grad_reward(n), *windows_from(0)), True))
        # Backward passes in window order: window i's frees its graph; the later ones wait, kept.
        for i, length in enumerate(shape.windows):
            name = f"backward of window {i + 1} ({_count(length, 'step')})"
            if i == rw:
                phases.append(
                    Phase(f"{name}, through decode + reward", (resident, *windows_from(i), reward_path(n)))
                )
            held = [resident, *windows_from(i), *([reward_kept(n)] if rw is not None and rw > i else [])]
            if ck:
                phases.append(Phase(name, (*held, recompute(n))))
            elif i != rw:
                phases.append(Phase(name, tuple(held)))
    else:
        phases.append(Phase("sampling pass", (resident, no_grad_step(n)), True))
        phases.append(Phase("reward", (resident, no_grad_reward(c))))
        for i, length in enumerate(shape.windows):
            name = f"replay of window {i + 1} ({_count(length, 'step')})"
            window = (f"window of {_count(length, 'step')} x {_count(c, 'sample')}",
                      _window_kept(costs, length, c, ck))
            if i == rw:
                phases.append(Phase(f"{name}, through decode + reward", (resident, window, reward_path(c))))
            if ck:
                phases.append(Phase(name, (resident, window, recompute(c))))
            elif i != rw:
                phases.append(Phase(name, (resident, window)))
    if shape.rescoring_steps:
        per_call = min(shape.rescore_steps_per_call, shape.rescoring_steps) * n
        if plan.rescore_cap() is not None:
            per_call = min(per_call, plan.rescore_cap())
        phases.append(Phase("re-scoring", (resident, (f"re-scoring call, {_count(per_call, 'transition')}",
                                                      costs.grad_step * per_call))))
    return phases


def predicted_peak(costs: MemoryCosts, shape: GraphShape, plan: MemoryPlan) -> int:
    """Peak bytes of one step under ``plan``: the largest of :func:`memory_phases` (see it for the model)."""
    return max(phase.total for phase in memory_phases(costs, shape, plan))


# --------------------------------------------------------------------------------------------------------
# The planner


class MemoryBudgetError(ValueError):
    """No plan fits the memory budget; the message says what does not fit and what to lower."""


#: A block length: fixed, ``auto`` (the planner picks the largest that fits), or ``None`` (no block).
BlockLength = int | Literal["auto"] | None


def _plan_text(plan: MemoryPlan, h: int | None) -> str:
    c = plan.chunk_samples
    chunks = "no chunking" if c is None else f"chunks of {_count(c, 'sample')}"
    if plan.rescore_samples is not None:
        chunks += f" (re-scoring {_count(plan.rescore_samples, 'transition')} per call)"
    text = f"{chunks}, activation checkpointing {'on' if plan.activation_checkpointing else 'off'}"
    return text if h is None else f"{text}, h = {h}"


@dataclass(frozen=True)
class PlannedMemory:
    """What :func:`plan_memory` chose.

    Attributes:
        plan: Chunk size and activation checkpointing.
        h: The block length the plan is for (the chosen one with ``h="auto"``), or ``None`` without a block.
        predicted_peak: Predicted peak bytes of one step under the plan.
        usable_budget: The budget less the headroom, in bytes: what the predicted peak had to fit.
        budget: The budget, in bytes.
    """

    plan: MemoryPlan
    h: int | None
    predicted_peak: int
    usable_budget: int
    budget: int

    def describe(self) -> str:
        """One log line, e.g. ``memory plan: budget 24.0 GiB (21.6 GiB usable), chunks of 2 samples,
        activation checkpointing on, h = 2: predicted peak 19.3 GiB``."""
        return (
            f"memory plan: budget {format_bytes(self.budget)} ({format_bytes(self.usable_budget)} usable), "
            f"{_plan_text(self.plan, self.h)}: predicted peak {format_bytes(self.predicted_peak)}"
        )


def _block_lengths(
    h: BlockLength, h_auto_max: int, num_steps: int | None, max_block: int | None = None
) -> list[int | None]:
    """The block lengths to try, largest first."""
    if h is None:
        return [None]
    if h == "auto":
        if isinstance(h_auto_max, bool) or not isinstance(h_auto_max, int) or h_auto_max < 1:
            raise ValueError(f"h_auto_max must be an integer >= 1, got {h_auto_max!r}")
        if max_block is None and num_steps is not None:
            max_block = num_steps - 1
        top = h_auto_max if max_block is None else min(h_auto_max, max_block)
        if top < 1:
            raise ValueError(
                f"h='auto' needs room for a block of at least 1 step before the first-order steps, got T={num_steps} "
                f"(longest block {max_block})"
            )
        return list(range(top, 0, -1))
    if isinstance(h, bool) or not isinstance(h, int) or h < 1:
        raise ValueError(f"h must be an integer >= 1, 'auto' or None, got {h!r}")
    return [h]


class _Shapes:
    """``shape_for_h`` called at most once per block length."""

    def __init__(self, shape_for_h: Callable[[int | None], GraphShape]) -> None:
        self._shape_for_h = shape_for_h
        self._cache: dict[int | None, GraphShape] = {}

    def __call__(self, h: int | None) -> GraphShape:
        if h not in self._cache:
            self._cache[h] = self._shape_for_h(h)
        return self._cache[h]


def _search(
    costs: MemoryCosts,
    usable: int,
    shapes: _Shapes,
    hs: list[int | None],
    chunk_samples: int | None,
    activation_checkpointing: bool | None,
) -> tuple[MemoryPlan, int | None, int] | None:
    """The first plan that fits, in the order (no checkpointing, largest h, largest chunk), then the same
    with checkpointing; fixed choices are searched as given."""
    for ck in [False, True] if activation_checkpointing is None else [activation_checkpointing]:
        for h in hs:
            shape = shapes(h)
            chunks = [None, *range(shape.samples - 1, 0, -1)] if chunk_samples is None else [chunk_samples]
            for c in chunks:
                plan = MemoryPlan(c, ck)
                peak = predicted_peak(costs, shape, plan)
                if peak <= usable:
                    return plan, h, peak
    return None


def _leanest(
    costs: MemoryCosts,
    shapes: _Shapes,
    hs: list[int | None],
    chunk_samples: int | None,
    activation_checkpointing: bool | None,
) -> tuple[MemoryPlan, int | None, Phase]:
    """The plan with the smallest predicted peak among the choices left open, and its peak phase (the
    smallest chunk is the leanest; checkpointing almost always is, and both are tried)."""
    chunk = 1 if chunk_samples is None else chunk_samples
    candidates = []
    for ck in [True, False] if activation_checkpointing is None else [activation_checkpointing]:
        for h in hs:
            plan = MemoryPlan(chunk, ck)
            peak_phase = max(memory_phases(costs, shapes(h), plan), key=lambda p: p.total)
            candidates.append((peak_phase.total, plan, h, peak_phase))
    _, plan, h, phase = min(candidates, key=lambda item: item[0])
    return plan, h, phase


def _contributors(phase: Phase) -> str:
    parts = sorted((part for part in phase.parts if part[1] > 0), key=lambda part: -part[1])[:3]
    return ", ".join(f"{what} {format_bytes(size)}" for what, size in parts)


def _option_names(options: Iterable[str]) -> str:
    names = {
        "chunk_samples": "`model.chunk_samples`",
        "activation_checkpointing": "`model.activation_checkpointing`",
        "h": "the estimator's `h`",
    }
    return " and ".join(names[o] for o in options)


def plan_memory(
    costs: MemoryCosts,
    budget_bytes: int,
    shape_for_h: Callable[[int | None], GraphShape],
    h: BlockLength = None,
    h_auto_max: int = 2,
    chunk_samples: int | None = None,
    activation_checkpointing: bool | None = None,
    headroom: float = 0.1,
    num_steps: int | None = None,
    max_block: int | None = None,
) -> PlannedMemory:
    """Choose chunk size, activation checkpointing and (with ``h="auto"``) the block length so a step fits.

    The usable budget is ``budget_bytes * (1 - headroom)``. The choice is deterministic: the first plan whose
    :func:`predicted_peak` fits, trying without checkpointing first, then the largest block length, then the
    largest chunk (unchunked first, then ``samples - 1`` down to 1); then the same with checkpointing. This is
    the paper's rule for ``h`` (``h* = floor((B - B_z (T - 1)) / (B_h - B_z))``, the largest block whose
    memory fits, ``docs/method.md`` section 3) evaluated with the measured model instead of a linear one.

    Args:
        costs: Measured costs (:func:`measure_costs`).
        budget_bytes: Memory one step may use, resident memory included (:func:`resolve_budget`).
        shape_for_h: The step's :class:`GraphShape` for a block length (estimators without a block ignore it).
        h: A fixed block length, ``"auto"`` to choose one in ``[1, min(T - 1, h_auto_max)]``, or ``None``
            for an estimator without a block.
        h_auto_max: Largest block length ``"auto"`` considers.
        chunk_samples: The user's chunk size, or ``None`` to let the planner choose.
        activation_checkpointing: The user's choice, or ``None`` to let the planner choose.
        headroom: Share of the budget kept free for what the model does not cover (fragmentation, workspaces).
        num_steps: ``T``; caps ``"auto"`` at ``T - 1`` (the block may not contain the last step).
        max_block: The longest block the estimator allows (``RLR`` with an exact tail of ``K`` steps:
            ``T - K``); caps ``"auto"`` instead of ``T - 1``.

    Raises:
        MemoryBudgetError: Nothing fits, even in chunks of one sample with checkpointing; the message gives
            the budget, the smallest predicted peak and what it is made of, and what to lower (a setting the
            user fixed, when that is what does not fit).
    """
    if isinstance(budget_bytes, bool) or not budget_bytes > 0:
        raise ValueError(f"budget_bytes must be > 0, got {budget_bytes!r}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom!r}")
    if chunk_samples is not None:
        MemoryPlan(chunk_samples)  # validates
    hs = _block_lengths(h, h_auto_max, num_steps, max_block)
    shapes = _Shapes(shape_for_h)
    usable = int(budget_bytes * (1 - headroom))
    found = _search(costs, usable, shapes, hs, chunk_samples, activation_checkpointing)
    if found is not None:
        plan, chosen_h, peak = found
        plan = _widen_rescoring(costs, usable, shapes(chosen_h), plan)
        peak = predicted_peak(costs, shapes(chosen_h), plan)
        return PlannedMemory(plan, chosen_h, peak, usable, int(budget_bytes))
    raise MemoryBudgetError(
        _no_fit_message(costs, int(budget_bytes), usable, headroom, shapes, h, hs, chunk_samples,
                        activation_checkpointing)
    )


def _widen_rescoring(costs: MemoryCosts, usable: int, shape: GraphShape, plan: MemoryPlan) -> MemoryPlan:
    """Let re-scoring calls hold more transitions than a window chunk when the budget allows: each holds one
    denoiser call's graph, and fewer, larger calls run faster (small calls leave the GPU waiting on launches)."""
    c = plan.chunk_samples
    if not shape.rescoring_steps or not plan.chunks(shape.samples) or costs.grad_step <= 0:
        return plan
    cap = min(shape.rescore_steps_per_call, shape.rescoring_steps) * shape.samples
    fits = int((usable - costs.resident) // costs.grad_step)
    rows = min(cap, fits)
    return replace(plan, rescore_samples=rows) if rows > c else plan


def _no_fit_message(
    costs: MemoryCosts,
    budget: int,
    usable: int,
    headroom: float,
    shapes: _Shapes,
    h: BlockLength,
    hs: list[int | None],
    chunk_samples: int | None,
    activation_checkpointing: bool | None,
) -> str:
    head = (f"one training step does not fit the memory budget of {format_bytes(budget)} "
            f"({format_bytes(usable)} usable after {headroom:.0%} headroom)")
    # The user's fixed choices, by option: would the step fit if the planner could change some of them?
    fixed = {}
    if chunk_samples is not None:
        fixed["chunk_samples"] = f"chunk_samples={chunk_samples}"
    if activation_checkpointing is not None:
        fixed["activation_checkpointing"] = f"activation_checkpointing={activation_checkpointing!s}".lower()
    if isinstance(h, int):
        fixed["h"] = f"h={h}"

    def attempt(relaxed: tuple[str, ...]):
        return _search(
            costs, usable, shapes,
            list(range(h, 0, -1)) if "h" in relaxed else hs,
            None if "chunk_samples" in relaxed else chunk_samples,
            None if "activation_checkpointing" in relaxed else activation_checkpointing,
        )

    if fixed:
        # The fewest options to free: each single one that suffices, else the smallest pairs, else all.
        for size in range(1, len(fixed) + 1):
            ways = [(names, found) for names in combinations(fixed, size)
                    if (found := attempt(names)) is not None]
            if ways:
                plan, lean_h, phase = _leanest(costs, shapes, hs, chunk_samples, activation_checkpointing)
                alternatives = " or ".join(
                    f"with {_plan_text(found[0], found[1])} (predicted peak {format_bytes(found[2])}) if the "
                    f"planner may choose {_option_names(names)}"
                    for names, found in ways
                )
                return (
                    f"{head}: with {', '.join(fixed.values())} it is predicted to peak at "
                    f"{format_bytes(phase.total)} in the {phase.name} ({_contributors(phase)}). It fits "
                    f"{alternatives}. Remove {'those settings' if len(ways[0][0]) > 1 else 'that setting'} "
                    "from the configuration (or set it to null; the estimator's `h` to `auto`) to let the "
                    "planner choose"
                )
    lengths = list(range(h, 0, -1)) if isinstance(h, int) else hs
    plan, lean_h, phase = _leanest(costs, shapes, lengths, None, None)
    message = (f"{head}: even the leanest plan ({_plan_text(plan, lean_h)}) is predicted to peak at "
               f"{format_bytes(phase.total)} in the {phase.name} ({_contributors(phase)}). ")
    n = shapes(lean_h).samples
    if costs.resident > usable:
        return message + (
            f"The model alone (resident {format_bytes(costs.resident)}: weights, optimizer state) exceeds "
            "the usable budget: load the frozen weights in a smaller `model.weight_dtype` (bfloat16), or use "
            "a device with more memory"
        )
    per_sample = (phase.total - costs.resident) / n
    if phase.scales_with_batch and per_sample > 0:
        fit = int((usable - costs.resident) // per_sample)
        if fit >= 1:
            return message + (
                f"It holds {format_bytes(per_sample)} per trajectory sample for the {n} samples of a step "
                f"(antithetic pairs count twice); about {fit} fit. Lower `data.batch_size` (raise "
                "`model.gradient_accumulation_steps` to keep the samples per optimizer step)"
            )
    return message + (
        "A single sample does not fit: shorten the gradient windows (the estimator's `h` or `k`), lower the "
        "image resolution, or use a device with more memory"
    )


# --------------------------------------------------------------------------------------------------------
# The budget and the measured costs


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
        import psutil

        return int(psutil.virtual_memory().available + psutil.Process().memory_info().rss)
    raise ValueError(
        f"memory_budget_gb='auto' reads the free memory of CUDA and CPU devices only, got device {device}; "
        "give the budget as a number of GiB"
    )


#: ``step_fn(n, grad, checkpoint) -> latents``: one denoiser step (a DDIM transition) for ``n`` samples.
StepFn = Callable[[int, bool, bool], Tensor]
#: ``reward_fn(latents) -> (n,) rewards``: decode and reward, differentiable in the latents.
LatentRewardFn = Callable[[Tensor], Tensor]


def _slope(values: Sequence[int], samples: tuple[int, int]) -> int:
    """Bytes per sample between two measurements: fixed overheads cancel."""
    return max(0, round((values[1] - values[0]) / (samples[1] - samples[0])))


class _Probe:
    """Measures the memory one piece of work takes, on CUDA from the allocator's statistics, elsewhere from
    the bytes autograd saves for backward (:class:`~rlr_lightning.diagnostics.AutogradMemoryMeter`)."""

    def __init__(self, device: torch.device, exclude: list[Tensor]) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.exclude = exclude

    def cuda_bytes(self, work: Callable[[], object], held: bool = False) -> int:
        """Peak bytes above the start while ``work`` runs, or (``held``) bytes held by what it returns."""
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        result = work()
        torch.cuda.synchronize(self.device)
        used = (torch.cuda.memory_allocated if held else torch.cuda.max_memory_allocated)(self.device) - base
        del result
        return int(used)

    def saved_bytes(self, forward: Callable[[], Tensor]) -> int:
        """Bytes autograd saves for backward while ``forward`` runs (model weights excluded)."""
        from rlr_lightning.diagnostics import AutogradMemoryMeter  # imports Lightning: only on this path

        with AutogradMemoryMeter(self.exclude) as meter:
            out = forward()
        del out
        return meter.peak

    def no_grad(self, forward: Callable[[], Tensor]) -> int:
        """Transient peak of a forward without gradient (CUDA only; 0 elsewhere: nothing measures it)."""
        if not self.cuda:
            return 0
        with torch.no_grad():
            return self.cuda_bytes(forward)

    def with_grad(self, forward: Callable[[], Tensor], wrt: Sequence[Tensor]) -> int:
        """What a forward with gradient holds: on CUDA its peak over forward and backward (with respect to
        ``wrt``, nothing written to ``.grad``); elsewhere the bytes it saves for backward."""
        with torch.enable_grad():
            if not self.cuda:
                return self.saved_bytes(forward)

            def forward_backward() -> None:
                out = forward()
                torch.autograd.grad(out.float().sum(), list(wrt), allow_unused=True)

            return self.cuda_bytes(forward_backward)

    def kept(self, forward: Callable[[], Tensor]) -> int:
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
    backward (:class:`~rlr_lightning.diagnostics.AutogradMemoryMeter`, model weights excluded), backward
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
            import psutil

            resident = psutil.Process().memory_info().rss

    measured: dict[str, list[int]] = {}
    try:
        for n in samples:
            for name, value in _measure_at(n, probe, step_fn, reward_fn, set_reward_checkpointing, trainable):
                measured.setdefault(name, []).append(value)
    finally:
        set_reward_checkpointing(False)
    logger.debug("memory measured at %s samples: %s", samples, measured)
    return MemoryCosts(resident=int(resident), **{name: _slope(v, samples) for name, v in measured.items()})


def _measure_at(
    n: int,
    probe: _Probe,
    step_fn: StepFn,
    reward_fn: LatentRewardFn,
    set_reward_checkpointing: Callable[[bool], None],
    trainable: list[Tensor],
) -> list[tuple[str, int]]:
    """Every cost of :class:`MemoryCosts` but ``resident``, for ``n`` samples (not yet per sample)."""
    with torch.no_grad():
        latents = step_fn(n, False, False).detach()
    costs = [
        ("sample_step", probe.no_grad(lambda: step_fn(n, False, False))),
        ("grad_step", probe.with_grad(lambda: step_fn(n, True, False), trainable)),
        ("grad_step_input", probe.kept(lambda: step_fn(n, True, True))),
        # Elsewhere than CUDA nothing sees the recomputation: the step's own saved bytes stand for it.
        ("grad_step_checkpointed", probe.with_grad(lambda: step_fn(n, True, True), trainable)
         if probe.cuda else probe.with_grad(lambda: step_fn(n, True, False), trainable)),
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
