"""Sharding the frozen base over ranks (FSDP2), with the LoRA adapters replicated as under DDP.

Why FSDP2 (``torch.distributed.fsdp.fully_shard`` under Lightning's ``ModelParallelStrategy``) and not FSDP1
(Lightning's ``FSDPStrategy``): FSDP1 flattens each unit's parameters into one flat parameter, so a unit that
mixes frozen weights with trainable LoRA weights needs ``use_orig_params=True`` and still allocates its gradient
for the whole flat parameter, frozen part included. FSDP2 shards every parameter on its own (a ``DTensor``),
keeps no gradient for frozen ones, and can leave chosen parameters out (``ignored_params``).

What is sharded: the denoiser and the text encoders, one FSDP unit per block, the blocks being what the model
itself names as never to be split (diffusers' and transformers' ``_no_split_modules``: ``BasicTransformerBlock``,
``FluxTransformerBlock``, ``T5Block``, ``CLIPEncoderLayer``, ...), then one unit for the rest of the denoiser
(the text encoders' token embeddings and final norms stay whole: see :func:`_root_unit`).
A rank holds ``1 / world`` of these weights and gathers one unit at a time for its forward (and, under
activation checkpointing, again for the recomputation).

What is not: the LoRA weights (a few MB to a few hundred; the estimators perturb them functionally and take
their flat gradient norm, which sharding would turn into collectives for nothing) stay whole on every rank and
their gradients are averaged over ranks at the last backward of an optimizer step, as DDP does. So a checkpoint
holds them whole, written once by rank zero, and the export is rank zero's. The VAE and the reward models are
replicated too (well under 1 GB each).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from lightning.pytorch.strategies.model_parallel import default_pg_timeout
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from rlr_lightning.models import DiffusionBackbone

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sharding:
    """How a backbone is sharded: what the memory planner adds to a rank's resident memory.

    Attributes:
        world_size: Ranks the weights are sharded over.
        units: FSDP units (blocks plus one root per sharded network).
        sharded_bytes: Bytes of the sharded weights, whole (a rank keeps ``sharded_bytes / world_size``).
        largest_unit_bytes: Bytes of the largest unit, whole: what one gathered unit holds.
    """

    world_size: int
    units: int
    sharded_bytes: int
    largest_unit_bytes: int

    @property
    def gathered_bytes(self) -> int:
        """Whole weights a rank holds at once beyond its shard: the unit running plus the next one, gathered
        ahead of its use (FSDP2 prefetches one unit)."""
        return 2 * self.largest_unit_bytes


def sharded_networks(backbone: DiffusionBackbone) -> list[str]:
    """The backbone's networks that are sharded: the denoiser and the text encoders (not the VAE)."""
    return [name for name in backbone.networks if name == backbone.lora_component or name.startswith("text_")]


def block_units(network: nn.Module) -> list[nn.Module]:
    """The modules of ``network`` that become FSDP units of their own: those whose class the model names in
    ``_no_split_modules``, innermost first (FSDP2 shards nested units before the units around them)."""
    names = set(getattr(network, "_no_split_modules", None) or ())
    units = [
        module for module in network.modules() if module is not network and type(module).__name__ in names
    ]
    # modules() lists parents before children: reversed, every unit comes after the units inside it.
    return units[::-1]


def _root_unit(network: nn.Module) -> list[nn.Module]:
    """The network itself as the unit of its remaining weights, except for transformers models: sharding
    changes a module's class, and transformers finds which outputs a model records (``output_hidden_states``,
    which the families' prompt encoders read) by its class, so their few remaining weights (the token
    embeddings, a final norm) stay whole on every rank."""
    from transformers import PreTrainedModel

    return [] if isinstance(network, PreTrainedModel) else [network]


def _own_bytes(module: nn.Module, skip: set[int]) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in skip)


def shard_backbone(
    backbone: DiffusionBackbone, mesh: DeviceMesh, reshard_after_forward: bool = True
) -> Sharding:
    """Shard the backbone's denoiser and text encoders over ``mesh`` (in place), one unit per block; LoRA
    weights stay whole. Returns what the planner needs to know.

    Args:
        backbone: The backbone, LoRA added, on CPU or its device (shards move to the mesh's device).
        mesh: The one-dimensional data-parallel mesh.
        reshard_after_forward: Free each gathered unit after its forward (the memory-lean choice); ``False``
            keeps gathered units until the backward (faster, as much memory as unsharded weights).
    """
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns when a unit returns a view (the flow transformers' unpatchified output), because an in-place
    # op on it would skip the unit's pre-backward hook. Nothing here writes into a network's output in place
    # (tests/test_sharding.py checks every family's gradients against the unsharded model's).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")

    lora = {id(p) for p in backbone.lora_parameters().values()}
    units = [
        unit
        for name in sharded_networks(backbone)
        for unit in [*block_units(getattr(backbone, name)), *_root_unit(getattr(backbone, name))]
    ]
    # Each unit's own weights (those no inner unit took, LoRA excluded), counted before any is sharded:
    # sharding replaces a unit's parameters by new ones.
    counted: set[int] = set(lora)
    sizes: list[int] = []
    for unit in units:
        sizes.append(_own_bytes(unit, counted))
        counted.update(id(p) for p in unit.parameters())
    for unit in units:
        lora_here = {p for p in unit.parameters() if id(p) in lora}
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=lora_here)
    return Sharding(mesh.size(), len(sizes), sum(sizes), max(sizes, default=0))


class FSDP2Strategy(ModelParallelStrategy):
    """Data parallelism with the frozen base sharded over the ranks (FSDP2) and the LoRA weights replicated.

    Every rank samples its own prompts, as under DDP; each holds ``1 / world`` of the denoiser's and the text
    encoders' weights and gathers one block at a time. LoRA gradients are averaged over ranks at the last
    backward of an optimizer step, so the LoRA, its optimizer state and the export are what DDP's would be.
    Checkpoints are one file of LoRA weights and counters, as on one device (resumable on any number of ranks).

    Args:
        reshard_after_forward: Free each gathered block after its forward (least memory); ``False`` keeps the
            gathered blocks until the step's backward (fewer all-gathers, the whole base's memory).
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPU (``None``: chosen from the device).
        timeout: How long a collective waits for the other ranks.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        from torch.distributed.fsdp import fully_shard

        if "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise ImportError(
                f"FSDP2Strategy needs torch >= 2.7 (fully_shard's ignored_params keeps the LoRA weights whole); "
                f"this is torch {torch.__version__}: upgrade torch, or use DDP (configs/slurm/ddp.yaml)"
            )
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.reshard_after_forward = reshard_after_forward
        self.sharding: Sharding | None = None

    def setup_environment(self) -> None:
        # One data-parallel dimension over every rank (the parent's "auto" would make it the node count).
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self, backbone: DiffusionBackbone) -> Sharding:
        """Shard ``backbone`` over the data-parallel mesh (``RLRModule.configure_model`` calls this)."""
        self.sharding = shard_backbone(
            backbone, self.device_mesh["data_parallel"], self.reshard_after_forward
        )
        if self.global_rank == 0:
            logger.info(
                "Sharded %.2f GB of frozen weights over %d ranks in %d units (largest %.1f MB); LoRA replicated",
                self.sharding.sharded_bytes / 1e9,
                self.sharding.world_size,
                self.sharding.units,
                self.sharding.largest_unit_bytes / 1e6,
            )
        return self.sharding

    @contextlib.contextmanager
    def gradient_sync(self, params: Sequence[torch.Tensor], sync: bool) -> Iterator[None]:
        """Around one backward: when ``sync`` (the optimizer step's last backward), average the accumulated
        gradients of ``params`` over ranks afterwards, as DDP's reducer does."""
        yield
        if not sync or self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    # -- checkpoints: LoRA weights are whole on every rank; rank zero writes one file ----------------------
    # (ModelParallelStrategy's distributed checkpoint would gather or save the frozen shards too.)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        # Only the LoRA weights are plain tensors (the rest are shards): LoraCheckpoints keeps only those.
        return {k: v for k, v in self.lightning_module.state_dict().items() if "lora_" in k}

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        Strategy.load_model_state_dict(self, checkpoint, strict=strict)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        return Strategy.optimizer_state(self, optimizer)

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        Strategy.load_optimizer_state_dict(self, checkpoint)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        path = Path(self.broadcast(filepath))
        if self.is_global_zero:
            self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        return Strategy.load_checkpoint(self, self.broadcast(checkpoint_path), weights_only=weights_only)
