"""Data parallelism in the training step: one synchronised backward per optimizer step, and running
statistics that agree on every rank."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import cast

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor


def backward_sync(trainer: L.Trainer, sync: bool, params: Sequence[Tensor] = ()) -> AbstractContextManager:
    """A context for one backward: the gradient all-reduce only when ``sync`` (the last backward of an
    optimizer step), DDP's or, with the base sharded (:class:`~rlr_lightning.sharding.FSDP2Strategy`), that of
    the replicated LoRA weights ``params``; a no-op on one process."""
    strategy = trainer.strategy
    gradient_sync = getattr(strategy, "gradient_sync", None)
    if gradient_sync is not None:
        return gradient_sync(params, sync)
    if sync or not isinstance(strategy, ParallelStrategy):
        return contextlib.nullcontext()
    return strategy.block_backward_sync()


def weights_sharded(trainer: L.Trainer) -> bool:
    """Whether the frozen weights are sharded over several ranks (:class:`~rlr_lightning.sharding.FSDP2Strategy`):
    then every forward is a collective, and rendering or diagnosing "on rank zero" needs every rank to run it."""
    return hasattr(trainer.strategy, "shard") and trainer.world_size > 1


def renders(trainer: L.Trainer) -> bool:
    """Whether this rank runs a callback's model forwards (samples, diagnostics) that rank zero reports: rank
    zero alone, or every rank when the weights are sharded."""
    return trainer.is_global_zero or weights_sharded(trainer)


def mean_over_ranks(module: L.LightningModule, values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over ranks: statistics that shape later plans (the grad-norm block law) must be
    the same everywhere."""
    if not values or module.trainer.world_size == 1:
        return values
    keys = sorted(values)
    # all_gather of one tensor returns a tensor (Lightning types it for collections too).
    gathered = cast(Tensor, module.all_gather(torch.tensor([values[k] for k in keys], device=module.device)))
    return dict(zip(keys, gathered.reshape(-1, len(keys)).mean(0).tolist()))
