"""The memory planner: a model of one step's peak under a plan, the search for a plan that fits a budget, and
the message that says what to lower when none does.

The model (:func:`memory_phases`) prices the phases of one step from costs measured on the real model
(:mod:`rlr_lightning.memory.measure`); :func:`plan_memory` chooses chunk size, activation checkpointing and
(for ``RLR(h="auto")``) the block length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import combinations

from rlr_lightning.memory.plan import (
    BlockLength,
    GraphShape,
    MemoryBudgetError,
    MemoryCosts,
    MemoryPlan,
    PlannedMemory,
    count_noun,
    format_bytes,
    plan_text,
)


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
    return costs.checkpointed_step() * n


def _reward_path(costs: MemoryCosts, n: int, checkpointing: bool) -> int:
    return (costs.reward_path_checkpointed if checkpointing else costs.reward_path) * n


def _steps(windows: Sequence[int]) -> str:
    return "+".join(str(length) for length in windows)


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
      ``min(rescore_steps_per_call, rescoring_steps) * samples`` transitions of ``grad_step`` bytes
      (:meth:`MemoryCosts.rescore_step`: less under checkpointing where the family checkpoints blocks), or at
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
        return f"denoiser step without grad, {count_noun(m, 'sample')}", costs.sample_step * m

    def no_grad_reward(m: int) -> tuple[str, int]:
        return f"decode + reward without grad, {count_noun(m, 'image')}", costs.reward_forward * m

    def recompute(m: int) -> tuple[str, int]:
        return f"denoiser call recomputed, {count_noun(m, 'sample')}", _window_recompute(costs, m, ck)

    def reward_path(m: int) -> tuple[str, int]:
        return f"decode + reward with grad, {count_noun(m, 'image')}", _reward_path(costs, m, ck)

    def reward_kept(m: int) -> tuple[str, int]:
        return f"decode + reward graph kept, {count_noun(m, 'image')}", costs.reward_kept(ck) * m

    phases: list[Phase] = []
    rw = shape.reward_window
    if not plan.chunks(n):
        kept = [_window_kept(costs, length, n, ck) for length in shape.windows]

        def windows_from(i: int) -> list[tuple[str, int]]:
            if i >= len(kept):
                return []
            what = f"gradient windows of {_steps(shape.windows[i:])} steps x {count_noun(n, 'sample')}"
            return [(what, sum(kept[i:]))]

        phases.append(Phase("sampling pass", (resident, no_grad_step(n), *windows_from(0)), True))
        if rw is None:
            phases.append(Phase("reward", (resident, no_grad_reward(n), *windows_from(0)), True))
        # Backward passes in window order: window i's frees its graph; the later ones wait, kept.
        for i, length in enumerate(shape.windows):
            name = f"backward of window {i + 1} ({count_noun(length, 'step')})"
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
        assert c is not None  # plan.chunks(n): a chunk size is set
        phases.append(Phase("sampling pass", (resident, no_grad_step(n)), True))
        phases.append(Phase("reward", (resident, no_grad_reward(c))))
        for i, length in enumerate(shape.windows):
            name = f"replay of window {i + 1} ({count_noun(length, 'step')})"
            window = (
                f"window of {count_noun(length, 'step')} x {count_noun(c, 'sample')}",
                _window_kept(costs, length, c, ck),
            )
            if i == rw:
                phases.append(Phase(f"{name}, through decode + reward", (resident, window, reward_path(c))))
            if ck:
                phases.append(Phase(name, (resident, window, recompute(c))))
            elif i != rw:
                phases.append(Phase(name, (resident, window)))
    if shape.rescoring_steps:
        per_call = min(shape.rescore_steps_per_call, shape.rescoring_steps) * n
        if (cap := plan.rescore_cap()) is not None:
            per_call = min(per_call, cap)
        phases.append(
            Phase(
                "re-scoring",
                (
                    resident,
                    (
                        f"re-scoring call, {count_noun(per_call, 'transition')}",
                        costs.rescore_step(ck) * per_call,
                    ),
                ),
            )
        )
    return phases


def predicted_peak(costs: MemoryCosts, shape: GraphShape, plan: MemoryPlan) -> int:
    """Peak bytes of one step under ``plan``: the largest of :func:`memory_phases` (see it for the model)."""
    return max(phase.total for phase in memory_phases(costs, shape, plan))


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
        return PlannedMemory(plan, chosen_h, peak, usable, int(budget_bytes), costs, shapes(chosen_h))
    raise MemoryBudgetError(
        _no_fit_message(
            costs, int(budget_bytes), usable, headroom, shapes, h, hs, chunk_samples, activation_checkpointing
        )
    )


def _widen_rescoring(costs: MemoryCosts, usable: int, shape: GraphShape, plan: MemoryPlan) -> MemoryPlan:
    """Let re-scoring calls hold more transitions than a window chunk when the budget allows: each holds one
    denoiser call's graph, and fewer, larger calls run faster (small calls leave the GPU waiting on launches)."""
    c = plan.chunk_samples
    per_transition = costs.rescore_step(plan.activation_checkpointing)
    if not shape.rescoring_steps or not plan.chunks(shape.samples) or per_transition <= 0:
        return plan
    assert c is not None  # plan.chunks(): a chunk size is set
    cap = min(shape.rescore_steps_per_call, shape.rescoring_steps) * shape.samples
    fits = int((usable - costs.resident) // per_transition)
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
    head = (
        f"one training step does not fit the memory budget of {format_bytes(budget)} "
        f"({format_bytes(usable)} usable after {headroom:.0%} headroom)"
    )
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
            costs,
            usable,
            shapes,
            list(range(h, 0, -1)) if "h" in relaxed and isinstance(h, int) else hs,
            None if "chunk_samples" in relaxed else chunk_samples,
            None if "activation_checkpointing" in relaxed else activation_checkpointing,
        )

    if fixed:
        # The fewest options to free: each single one that suffices, else the smallest pairs, else all.
        for size in range(1, len(fixed) + 1):
            ways = [
                (names, found) for names in combinations(fixed, size) if (found := attempt(names)) is not None
            ]
            if ways:
                plan, lean_h, phase = _leanest(costs, shapes, hs, chunk_samples, activation_checkpointing)
                alternatives = " or ".join(
                    f"with {plan_text(found[0], found[1])} (predicted peak {format_bytes(found[2])}) if the "
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
    lengths: list[int | None] = list(range(h, 0, -1)) if isinstance(h, int) else hs
    plan, lean_h, phase = _leanest(costs, shapes, lengths, None, None)
    message = (
        f"{head}: even the leanest plan ({plan_text(plan, lean_h)}) is predicted to peak at "
        f"{format_bytes(phase.total)} in the {phase.name} ({_contributors(phase)}). "
    )
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
