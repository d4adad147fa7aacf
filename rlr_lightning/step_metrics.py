"""What one training step logs: rewards, each kind of term's loss and gradient norm, the plan's and the
rollout's statistics, and throughput."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from rlr_lightning.estimators import Rollout, TermBackward

if TYPE_CHECKING:
    from rlr_lightning.module import RLRModule


def log_step(
    module: RLRModule,
    result: Rollout,
    done: TermBackward,
    started: float,
    norms: dict[str, float] | None = None,
) -> None:
    """Log one step's metrics under ``train/``.

    Args:
        module: The training module (its ``log`` and trainer).
        result: The step's rollout.
        done: Its terms' backward (losses; gradient norms unless ``norms`` is given).
        started: ``time.perf_counter()`` at the start of the step.
        norms: Gradient norms to log instead of ``done``'s (NaN for a skipped step).
    """
    r = result.all_rewards
    module.log("train/reward", r.mean(), prog_bar=True)
    module.log_dict(
        {
            "train/reward_std": r.std() if r.numel() > 1 else torch.zeros(()),
            "train/reward_min": r.min(),
            "train/reward_max": r.max(),
        }
    )
    # Per-term statistics are rank-local before the gradient all-reduce: log their mean over ranks. Every rank
    # logs the same keys here (the plan, hence the terms, is shared), so the reductions line up.
    for name, value in done.losses.items():
        module.log(f"train/loss_{name}", value, sync_dist=True)
    for name, value in (done.norms() if norms is None else norms).items():
        module.log(f"train/grad_norm_{name}", value, sync_dist=True)
    for name, value in {**result.plan.info, **result.info}.items():
        if isinstance(value, (int, float)):
            module.log(f"train/{name}", float(value))
    trainer = module.trainer
    images = len(result.prompts) * trainer.world_size  # antithetic pairs sample each prompt twice
    module.log("train/images_per_sec", images / max(time.perf_counter() - started, 1e-9), prog_bar=True)
    if module.estimator.inner_updates > 1:
        # max_steps counts optimizer steps, inner updates included: how many batches were sampled for them.
        module.log("train/sampled_batches", float(trainer.fit_loop.total_batch_idx + 1))
