"""The memory planner's types: what a plan says, what a step's graph looks like, what its pieces cost.

No project imports: the estimators (which describe their graph), the sampler (which executes a plan) and the
planner all depend on this module and on nothing else of the package's memory code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: A block length: fixed, ``auto`` (the planner picks the largest that fits), or ``None`` (no block).
BlockLength = int | Literal["auto"] | None


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
            raise ValueError(
                f"chunk_samples must be >= 1 (or None for no chunking), got {self.chunk_samples}"
            )
        if self.rescore_samples is not None and self.rescore_samples < 1:
            raise ValueError(f"rescore_samples must be >= 1 (or None), got {self.rescore_samples}")

    def chunks(self, samples: int) -> bool:
        """Whether a batch of ``samples`` trajectory samples runs in chunks (else unchunked, as one)."""
        return self.chunk_samples is not None and self.chunk_samples < samples

    def rescore_cap(self) -> int | None:
        """The most transitions one re-scoring call may hold under this plan (``None``: no cap)."""
        return self.rescore_samples if self.rescore_samples is not None else self.chunk_samples


@dataclass(frozen=True)
class MemoryOptions:
    """The user's memory settings (``RLRModule``'s ``memory_budget_gb``, ``chunk_samples``,
    ``activation_checkpointing``), checked once.

    Attributes:
        budget_gb: GiB one step may use, ``"auto"`` (the device's free memory) or ``None`` (no planning).
        chunk_samples: A fixed chunk size, or ``None`` (the planner's choice; unchunked without a budget).
        activation_checkpointing: A fixed choice, or ``None`` (the planner's; off without a budget).
    """

    budget_gb: float | Literal["auto"] | None = None
    chunk_samples: int | None = None
    activation_checkpointing: bool | None = None

    def __post_init__(self) -> None:
        if self.budget_gb is not None and self.budget_gb != "auto" and not float(self.budget_gb) > 0:
            raise ValueError(f"memory_budget_gb must be > 0 GiB or 'auto', got {self.budget_gb!r}")
        if self.chunk_samples is not None and self.chunk_samples < 1:
            raise ValueError(
                f"chunk_samples must be >= 1 (or null to let the planner choose), got {self.chunk_samples}"
            )

    def check_block(self, block_length: BlockLength) -> None:
        """Refuse ``h="auto"`` without a budget to choose it from."""
        if block_length == "auto" and self.budget_gb is None:
            raise ValueError(
                "RLR(h='auto') chooses the block length from the memory budget: set model.memory_budget_gb "
                "(a number of GiB, or auto), or give h a number"
            )

    def initial_plan(self) -> MemoryPlan:
        """The plan until the planner runs: the user's choices, unchunked and unchecked otherwise."""
        return MemoryPlan(self.chunk_samples, bool(self.activation_checkpointing))


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
        rescore_step_checkpointed: Peak of one re-scored transition under activation checkpointing, for the
            families whose re-scoring calls then checkpoint the network's blocks
            (``Denoiser.checkpoint_blocks``: the same call as a checkpointed window step); ``None``: re-scoring
            keeps every activation whatever the plan (``grad_step``).
        gathered_weights: Of ``resident``: the whole weights of sharded blocks a rank gathers at once
            (:class:`~rlr_lightning.sharding.FSDP2Strategy`: the block running and the next one), which a
            per-sample slope cannot see (the same for any number of samples); 0 when nothing is sharded.
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
    rescore_step_checkpointed: int | None = None
    gathered_weights: int = 0

    def __post_init__(self) -> None:
        negative = {k: v for k, v in vars(self).items() if v is not None and v < 0}
        if negative:
            raise ValueError(f"memory costs are bytes >= 0, got {negative}")

    def describe(self) -> str:
        """One log line: the measured costs, per sample."""
        return (
            f"memory costs: resident {format_bytes(self.resident)}"
            + (
                f" ({format_bytes(self.gathered_weights)} of it sharded weights gathered for a block)"
                if self.gathered_weights
                else ""
            )
            + f"; per sample: no-grad step "
            f"{format_bytes(self.sample_step)}, grad step {format_bytes(self.grad_step)} "
            f"({format_bytes(self.grad_step_input)} kept when checkpointed), decode + reward with grad "
            f"{format_bytes(self.reward_path)} ({format_bytes(self.reward_path_checkpointed)} checkpointed, "
            f"{format_bytes(self.reward_kept(True))} kept until its backward), without grad "
            f"{format_bytes(self.reward_forward)}"
        )

    def checkpointed_step(self) -> int:
        """Peak of one checkpointed denoiser call over its forward and its recomputing backward, per sample
        (``grad_step`` where not measured)."""
        return self.grad_step if self.grad_step_checkpointed is None else self.grad_step_checkpointed

    def rescore_step(self, checkpointing: bool) -> int:
        """What one re-scored transition holds at its peak (its forward and backward) under the plan."""
        if checkpointing and self.rescore_step_checkpointed is not None:
            return self.rescore_step_checkpointed
        return self.grad_step

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


def count_noun(n: int, noun: str) -> str:
    """``1 sample``, ``2 samples``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


class MemoryBudgetError(ValueError):
    """No plan fits the memory budget; the message says what does not fit and what to lower."""


def plan_text(plan: MemoryPlan, h: int | None) -> str:
    c = plan.chunk_samples
    chunks = "no chunking" if c is None else f"chunks of {count_noun(c, 'sample')}"
    if plan.rescore_samples is not None:
        chunks += f" (re-scoring {count_noun(plan.rescore_samples, 'transition')} per call)"
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
        costs: The measured costs the plan was chosen from.
        shape: The step's graph at the chosen block length (with ``costs`` and ``plan``,
            :func:`~rlr_lightning.memory.memory_phases` gives the predicted peak of every phase).
    """

    plan: MemoryPlan
    h: int | None
    predicted_peak: int
    usable_budget: int
    budget: int
    costs: MemoryCosts | None = None
    shape: GraphShape | None = None

    def describe(self) -> str:
        """One log line, e.g. ``memory plan: budget 24.0 GiB (21.6 GiB usable), chunks of 2 samples,
        activation checkpointing on, h = 2: predicted peak 19.3 GiB``."""
        return (
            f"memory plan: budget {format_bytes(self.budget)} ({format_bytes(self.usable_budget)} usable), "
            f"{plan_text(self.plan, self.h)}: predicted peak {format_bytes(self.predicted_peak)}"
        )
