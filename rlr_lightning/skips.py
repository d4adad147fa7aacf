"""Skipped updates: a non-finite reward or gradient drops the update, and a run that keeps dropping stops.

``max_steps`` counts real updates only, so a run whose every update is skipped would never end: after
``max_consecutive`` skips in a row :class:`UpdateSkips` raises :class:`TrainingStalledError`, saying what to
check. The counts are checkpointed (a resumed run keeps counting where it stopped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning.pytorch.core.optimizer import LightningOptimizer

logger = logging.getLogger(__name__)


class TrainingStalledError(RuntimeError):
    """Too many consecutive updates were skipped (non-finite rewards or gradients): the run cannot progress."""


class UpdateSkips:
    """Drops updates with a non-finite reward or gradient, counts them, and stops a run that keeps skipping.

    Args:
        max_consecutive: Stop after this many updates in a row were skipped.
        log: ``log(name, value)`` of the training module (``train/skipped_updates``).
    """

    def __init__(self, max_consecutive: int = 20, log: Callable[[str, float], object] | None = None) -> None:
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.log = log
        self.total = 0
        self.consecutive = 0
        #: Why an earlier micro-batch of the current optimizer step was dropped (``None``: none was).
        self.window_cause: str | None = None

    def drop_non_finite_rewards(
        self,
        rewards: Tensor,
        optimizer: torch.optim.Optimizer | LightningOptimizer,
        last_micro: bool,
        step: int,
    ) -> None:
        """Drop the whole optimizer step for ``rewards`` (gathered) that are not all finite, at its last
        micro-batch (every rank sees the same rewards, so every rank drops it)."""
        cause = f"non-finite reward ({int((~torch.isfinite(rewards)).sum())} of {rewards.numel()})"
        if last_micro:
            self.skip(optimizer, cause, reward_at_fault=True, step=step)
        else:
            optimizer.zero_grad(set_to_none=True)
            self.window_cause = cause

    def gradient_finite(
        self, grads: Tensor, optimizer: torch.optim.Optimizer | LightningOptimizer, step: int
    ) -> bool:
        """Whether the accumulated gradient is finite; if not, the update is dropped."""
        if bool(torch.isfinite(grads).all()):
            return True
        self.skip(optimizer, "non-finite gradient", reward_at_fault=False, step=step)
        return False

    def skip(
        self,
        optimizer: torch.optim.Optimizer | LightningOptimizer,
        why: str,
        reward_at_fault: bool,
        step: int,
    ) -> None:
        """Drop this update entirely (gradients cleared, weights and optimizer state untouched) and count it;
        raise once too many came in a row."""
        optimizer.zero_grad(set_to_none=True)
        self.total += 1
        self.consecutive += 1
        if self.log is not None:
            self.log("train/skipped_updates", float(self.total))
        if self.consecutive >= self.max_consecutive:
            if reward_at_fault:
                advice = (
                    "check the reward model (model.reward): it returns NaN or inf for these images; if it "
                    "did so only after training started, the model diverged: lower the learning rate"
                )
            else:
                advice = (
                    "lower the learning rate (model.optimizer, e.g. --model.optimizer.init_args.lr) or set "
                    "model.gradient_clip_val; check that the reward has a finite gradient"
                )
            raise TrainingStalledError(
                f"Stopped at step {step}: the last {self.consecutive} updates were all skipped (last cause: {why}); "
                f"{advice}. The LoRA weights are those of the last real update. model.max_consecutive_skips="
                f"{self.max_consecutive} sets how many skips in a row are tolerated."
            )
        logger.warning(
            "Skipping update at step %d: %s (%d in a row; the run stops at %d)",
            step,
            why,
            self.consecutive,
            self.max_consecutive,
        )

    def stepped(self) -> None:
        """A real update was made: the run of skips ends."""
        self.consecutive = 0
        if self.log is not None:
            self.log("train/skipped_updates", float(self.total))

    def state_dict(self) -> dict[str, int]:
        return {"rlr_skipped_updates": self.total, "rlr_consecutive_skips": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.total = state.get("rlr_skipped_updates", 0)
        self.consecutive = state.get("rlr_consecutive_skips", 0)
