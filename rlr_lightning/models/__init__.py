"""Model families: one backbone class each, and :func:`load_backbone`, which picks the family of a pipeline.

One module per concern: :mod:`~rlr_lightning.models.base` (what every family shares: freezing, LoRA,
export and import, decoding, the sampler), :mod:`~rlr_lightning.models.lora` (LoRA settings and files),
:mod:`~rlr_lightning.models.sd` (Stable Diffusion 1.x / 2.x) and :mod:`~rlr_lightning.models.sdxl`
(Stable Diffusion XL), the flow-matching families (``sd3``, ``flux``) and Wan 2.1 text-to-video (``wan``).
A new family is one new module here with a :class:`DiffusionBackbone` subclass (and a
new denoiser or transition kernel in :mod:`rlr_lightning.sampling` if its network call or sampler is new),
registered in :data:`FAMILIES`.
"""

from __future__ import annotations

import os

import torch

from rlr_lightning.builtin import resolve_model
from rlr_lightning.dtypes import DTYPES
from rlr_lightning.hub import ModelNotAvailableError, is_offline, read_model_index
from rlr_lightning.models.base import DiffusionBackbone
from rlr_lightning.models.flow import FlowMatchingBackbone
from rlr_lightning.models.flux import FluxBackbone
from rlr_lightning.models.lora import LoraSettings, read_lora_settings
from rlr_lightning.models.sd import StableDiffusionBackbone
from rlr_lightning.models.sd3 import StableDiffusion3Backbone
from rlr_lightning.models.sdxl import StableDiffusionXLBackbone
from rlr_lightning.models.wan import WanBackbone

#: The diffusers pipeline class named in ``model_index.json`` to the backbone class of its family.
FAMILIES: dict[str, type[DiffusionBackbone]] = {
    "StableDiffusionPipeline": StableDiffusionBackbone,
    "StableDiffusionXLPipeline": StableDiffusionXLBackbone,
    "StableDiffusion3Pipeline": StableDiffusion3Backbone,
    "FluxPipeline": FluxBackbone,
    "WanPipeline": WanBackbone,
}


def backbone_class(
    pretrained_model_name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> type[DiffusionBackbone]:
    """The backbone class of a pipeline, from the pipeline class its ``model_index.json`` names.

    Args:
        pretrained_model_name_or_path: A built-in model name (see :mod:`rlr_lightning.builtin`), a hub id or a
            diffusers pipeline directory.
        revision: Hub revision of a hub id.
        cache_dir: Hub cache directory of a hub id.
        local_files_only: Never download; ``None``: the offline policy of :mod:`rlr_lightning.hub`.

    Raises:
        FileNotFoundError: A local directory is missing or is not a diffusers pipeline directory.
        ModelNotAvailableError: A hub id is neither cached nor downloadable.
        ValueError: The pipeline is of a family this library does not support; the message lists those it does.
    """
    pretrained_model_name_or_path = resolve_model(str(pretrained_model_name_or_path))
    path = os.path.expanduser(pretrained_model_name_or_path)
    if not os.path.isdir(path) and os.path.exists(path):
        raise FileNotFoundError(f"{path} is a file; pass a diffusers pipeline directory or a hub id")
    index = read_model_index(pretrained_model_name_or_path, revision, cache_dir, local_files_only)
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise ValueError(
            f"{pretrained_model_name_or_path} is a {name} pipeline; supported pipelines: {', '.join(FAMILIES)}"
        )
    return FAMILIES[name]


def load_backbone(
    pretrained_model_name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> DiffusionBackbone:
    """Load a pipeline with the backbone class of its family (see :func:`backbone_class`).

    Args:
        pretrained_model_name_or_path: A built-in model name (``tiny``, ``tiny-sdxl``, ``tiny-sd3``,
            ``tiny-flux``, ``tiny-wan``, ``shapes-world``: :data:`rlr_lightning.builtin.BUILTIN_MODELS`), a hub id or a
            diffusers pipeline directory. Names resolve through :func:`rlr_lightning.builtin.resolve_model`,
            as ``rlr sample --model`` and ``RLRModule`` resolve them.
        dtype: Dtype of the frozen weights.
        revision: Hub revision of a hub id.
        variant: Weight variant (e.g. ``fp16``) of a hub id or directory.
        cache_dir: Hub cache directory of a hub id.
        local_files_only: Never download; ``None``: the offline policy of :mod:`rlr_lightning.hub`.
    """
    # Resolved here, so Python callers take the names the command line takes, through the same function.
    source = resolve_model(str(pretrained_model_name_or_path))
    offline = is_offline() if local_files_only is None else local_files_only
    cls = backbone_class(source, revision, cache_dir, offline)
    return cls.from_pretrained(
        source,
        dtype=dtype,
        revision=revision,
        variant=variant,
        cache_dir=cache_dir,
        local_files_only=offline,
    )


__all__ = [
    "DTYPES",
    "FAMILIES",
    "DiffusionBackbone",
    "FlowMatchingBackbone",
    "FluxBackbone",
    "LoraSettings",
    "ModelNotAvailableError",
    "StableDiffusion3Backbone",
    "StableDiffusionBackbone",
    "StableDiffusionXLBackbone",
    "WanBackbone",
    "backbone_class",
    "load_backbone",
    "read_lora_settings",
]
