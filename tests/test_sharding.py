"""The frozen base sharded with FSDP2 (``rlr_lightning.sharding``), family by family, in this process.

A one-rank gloo group shards every family's denoiser and text encoders for real (DTensor shards, gathered by
FSDP2's hooks around each block); the sharded model must compute what the whole one computes: conditioning,
a step with gradient (plain, checkpointed, and at perturbed LoRA weights) and the LoRA gradients. Two ranks
against DDP, and resuming, are in ``test_distributed.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rlr_lightning.memory import measure
from rlr_lightning.models import LoraSettings
from rlr_lightning.sampling import Perturbation
from rlr_lightning.sharding import block_units, shard_backbone, sharded_networks
from rlr_lightning.task import SamplingSettings, Task
from tests.conftest import perturb_lora_

FAMILIES = ["tiny_pipeline_dir", "tiny_sdxl_dir", "tiny_sd3_dir", "tiny_flux_dir", "tiny_wan_dir"]


@pytest.fixture
def one_rank_mesh(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    finally:
        dist.destroy_process_group()


def _task(model_dir, guidance: float) -> Task:
    settings = SamplingSettings(num_steps=4, eta=1.0, guidance_scale=guidance)
    task = Task.build(str(model_dir), settings, LoraSettings(rank=2), seed=3)
    perturb_lora_(task.backbone, seed=1)  # LoRA B away from zero, or its gradients would prove little
    return task


def _step(task: Task, checkpoint: bool, perturbation: Perturbation | None):
    """Latents after one stochastic step with gradient, and the LoRA gradients of their sum of squares."""
    sampler = task.sampler
    embeds = task.conditioning_for(["a red circle", "two blue squares on the left"])
    x, noise = sampler.initial_noise(2, torch.Generator().manual_seed(0), task.device)
    out = sampler.step(1, x, embeds.at(1), noise=noise[1], checkpoint=checkpoint, perturbation=perturbation)
    params = task.backbone.lora_parameters()
    grads = torch.autograd.grad(out.next_latents.pow(2).sum(), list(params.values()), allow_unused=True)
    return out.next_latents.detach(), dict(zip(params, grads))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sharded_base_computes_what_the_whole_one_computes(family, request, one_rank_mesh):
    model_dir = request.getfixturevalue(family)
    whole, sharded = _task(model_dir, 3.0), _task(model_dir, 3.0)
    blocks = {
        name: len(block_units(getattr(sharded.backbone, name))) for name in sharded_networks(sharded.backbone)
    }
    sharding = shard_backbone(sharded.backbone, one_rank_mesh)
    from torch.distributed.tensor import DTensor

    # One unit per block the model names as unsplittable, plus the denoiser's remaining weights.
    assert sharding.units == sum(blocks.values()) + 1
    assert blocks[sharded.backbone.lora_component] > 0
    # Only LoRA stays whole in the denoiser; of the text encoders, all but their embeddings and final norm.
    for pname, p in getattr(sharded.backbone, sharded.backbone.lora_component).named_parameters():
        assert isinstance(p, DTensor) != ("lora_" in pname), pname
    for name in sharded_networks(sharded.backbone):
        kinds = [isinstance(p, DTensor) for p in getattr(sharded.backbone, name).parameters()]
        assert sum(kinds) > len(kinds) / 2, name
    frozen = sum(p.numel() * p.element_size() for p in whole.backbone.parameters() if not p.requires_grad)
    assert 0 < sharding.largest_unit_bytes < sharding.sharded_bytes <= frozen

    for checkpoint, perturbation in ((False, None), (True, None), (False, Perturbation(seed=5, scale=0.05))):
        expected, expected_grads = _step(whole, checkpoint, perturbation)
        got, got_grads = _step(sharded, checkpoint, perturbation)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert expected_grads.keys() == got_grads.keys()
        used = [name for name, g in expected_grads.items() if g is not None]
        assert used and all(got_grads[name] is not None for name in used)
        for (
            name
        ) in used:  # float rounding of the gathered weights' products, relative to each gradient's size
            error = (got_grads[name] - expected_grads[name]).abs().max()
            assert error <= 1e-5 * expected_grads[name].abs().max(), name


def test_the_planner_counts_gathered_blocks_as_resident(tiny_pipeline_dir, one_rank_mesh):
    from rlr_lightning.rewards import TargetColor

    task = _task(tiny_pipeline_dir, 1.0)
    task.reward = TargetColor()
    task.sharding = shard_backbone(task.backbone, one_rank_mesh)
    costs = measure(task, "a red circle")
    # The block running and the next one, gathered whole: no per-sample slope can see them.
    assert costs.gathered_weights == 2 * task.sharding.largest_unit_bytes > 0
    assert costs.resident >= costs.gathered_weights
    assert "sharded weights gathered for a block" in costs.describe()
