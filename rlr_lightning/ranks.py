"""Data parallelism in the training step: one synchronised backward per optimizer step, and running
statistics that agree on every rank."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import cast

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor


def backward_sync(trainer: L.Trainer, sync: bool) -> AbstractContextManager:
    """A context for one backward: DDP's gradient all-reduce only when ``sync`` (the last backward of an
    optimizer step); a no-op on one process."""
    strategy = trainer.strategy
    if sync or not isinstance(strategy, ParallelStrategy):
        return contextlib.nullcontext()
    return strategy.block_backward_sync()


def mean_over_ranks(module: L.LightningModule, values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over ranks: statistics that shape later plans (the grad-norm block law) must be
    the same everywhere."""
    if not values or module.trainer.world_size == 1:
        return values
    keys = sorted(values)
    # all_gather of one tensor returns a tensor (Lightning types it for collections too).
    gathered = cast(Tensor, module.all_gather(torch.tensor([values[k] for k in keys], device=module.device)))
    return dict(zip(keys, gathered.reshape(-1, len(keys)).mean(0).tolist()))
