"""LoRA adapters on a backbone's denoiser: their settings, and reading diffusers LoRA files.

Files are read through the diffusers pipeline class of the model family (its ``lora_state_dict`` also converts
Kohya-style files), so whatever ``load_lora_weights`` of that pipeline reads, :meth:`DiffusionBackbone.load_lora`
reads too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

#: peft's adapter name for the one adapter we train.
ADAPTER_NAME = "default"
#: The file name diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` looks for.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters on the UNet (peft).

    Attributes:
        rank: Rank ``r`` of each adapter.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / rank``.
        target_modules: Names of the UNet linear layers that get adapters (the attention projections by
            default, as in the RLR paper and diffusers' LoRA training examples).
        init: peft ``init_lora_weights``; ``gaussian`` starts with B = 0, so training starts at the base model.
    """

    rank: int = 4
    alpha: float = 4.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    init: str = "gaussian"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not self.target_modules:
            raise ValueError("LoRA target_modules is empty; name at least one UNet layer, e.g. to_q")


# Module hyperparameters hold LoraSettings, and Lightning restores checkpoints with weights_only=True.
torch.serialization.add_safe_globals([LoraSettings])


@dataclass(frozen=True)
class LoraFile:
    """The denoiser part of a LoRA weights file, in peft's layout (``<layer>.lora_A.weight``).

    Attributes:
        path: The file (or the directory holding it), for messages.
        weights: The denoiser's LoRA weights without the component prefix (``unet.``).
        config: The peft adapter config stored in the file's metadata (empty when it has none).
        network_alphas: Per-layer alphas of Kohya-style files, as diffusers reports them.
    """

    path: Path
    weights: dict[str, Tensor]
    config: dict
    network_alphas: dict[str, float]

    @property
    def layers(self) -> list[str]:
        """The adapted UNet layers, by module path."""
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.weights})

    def recorded_alpha(self) -> float | None:
        """The ``lora_alpha`` the file records, or ``None`` when it does not say."""
        if "lora_alpha" in self.config:
            return float(self.config["lora_alpha"])
        alphas = set(self.network_alphas.values())
        if len(alphas) > 1:
            raise ValueError(
                f"{self.path} has per-layer alphas {sorted(alphas)[:5]}; LoraSettings holds one alpha for all layers"
            )
        return float(alphas.pop()) if alphas else None

    def settings(self, alpha: float | None = None) -> LoraSettings:
        """Rank, alpha and targets from the metadata, else rank from the shapes and targets from the keys."""
        config = self.config
        if "r" in config:
            if config.get("rank_pattern") or config.get("alpha_pattern"):
                raise ValueError(
                    f"{self.path} gives some layers their own rank or alpha (rank_pattern / alpha_pattern); "
                    "LoraSettings holds one rank and one alpha for all layers"
                )
            rank = int(config["r"])
            targets = config.get("target_modules")
            # peft also accepts one regular expression; the layer names say the same thing explicitly.
            targets = tuple(targets) if isinstance(targets, (list, tuple)) and targets else tuple(self.layers)
        else:
            ranks = {v.shape[0] for k, v in self.weights.items() if ".lora_A." in k}
            if len(ranks) != 1:
                raise ValueError(
                    f"{self.path} has no adapter config in its metadata and its layers have ranks "
                    f"{sorted(ranks)}; LoraSettings needs one rank for all layers"
                )
            rank = ranks.pop()
            targets = tuple(self.layers)
        recorded = self.recorded_alpha()
        if recorded is not None and alpha is not None and float(alpha) != recorded:
            raise ValueError(
                f"{self.path} records LoRA alpha {recorded:g}, but alpha {alpha:g} was given; leave it out to use "
                "the file's"
            )
        # Without a recorded alpha, diffusers' own loader also falls back to alpha = rank (scale 1).
        alpha = recorded if recorded is not None else (float(alpha) if alpha is not None else float(rank))
        return LoraSettings(rank=rank, alpha=alpha, target_modules=targets)


def _lora_state_dict(
    pipeline_class: type[Any], source: str, **kwargs
) -> tuple[dict, dict | None, dict | None]:
    """``(weights, network alphas, metadata)`` from the pipeline's ``lora_state_dict``, whatever its return shape.

    The Stable Diffusion mixins return the alphas always; FLUX's only when asked (``return_alphas``); SD 3's has
    none and returns ``(weights, metadata)``.
    """
    import inspect

    if "return_alphas" in inspect.signature(pipeline_class.lora_state_dict).parameters:
        kwargs["return_alphas"] = True
    out = pipeline_class.lora_state_dict(source, return_lora_metadata=True, **kwargs)
    if len(out) == 3:
        return out
    state_dict, metadata = out
    return state_dict, None, metadata


def read_lora_file(
    path: str | os.PathLike, pipeline_class: type[Any] | None = None, component: str = "unet"
) -> LoraFile:
    """Read a diffusers LoRA file through diffusers' own reader (which also converts Kohya files).

    Args:
        path: The directory holding the ``.safetensors`` file, or the file itself.
        pipeline_class: The diffusers pipeline whose ``lora_state_dict`` reads the file (default
            ``StableDiffusionPipeline``).
        component: The adapted component, the prefix of its keys in the file.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft

    if pipeline_class is None:
        from diffusers import StableDiffusionPipeline

        pipeline_class = StableDiffusionPipeline

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA weights not found: {path}")
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(
            f"LoRA weights not found: {path} holds no .safetensors file (export_lora writes {LORA_WEIGHT_NAME})"
        )
    if path.is_file():
        kwargs = {"weight_name": path.name}
    else:  # our export's name first; otherwise diffusers picks the directory's one .safetensors file
        kwargs = {"weight_name": LORA_WEIGHT_NAME} if (path / LORA_WEIGHT_NAME).is_file() else {}
    state_dict, network_alphas, metadata = _lora_state_dict(
        pipeline_class, str(path.parent if path.is_file() else path), **kwargs
    )

    prefix = f"{component}."

    def part(entries: dict | None) -> dict:
        return {k.removeprefix(prefix): v for k, v in (entries or {}).items() if k.startswith(prefix)}

    weights = part(state_dict)
    if not weights:
        raise ValueError(f"{path} holds no {component} LoRA weights (no key starts with {prefix!r})")
    # Older exporters and other trainers name some layers' weights lora.down / lora.up.
    weights = convert_unet_state_dict_to_peft(weights)
    return LoraFile(path, weights, part(metadata), part(network_alphas))


def read_lora_settings(
    path: str | os.PathLike,
    alpha: float | None = None,
    pipeline_class: type[Any] | None = None,
    component: str = "unet",
) -> LoraSettings:
    """The :class:`LoraSettings` of a LoRA weights file, for :meth:`DiffusionBackbone.add_lora`.

    Files written by :meth:`DiffusionBackbone.export_lora` (and diffusers' training scripts) record rank,
    alpha and target modules in their metadata. For files without that metadata, the rank comes from the
    weights' shapes, the targets are the layers named in the file, and the alpha is ``alpha`` (default: the
    rank, i.e. scale 1, diffusers' own fallback) unless the file holds Kohya-style alphas.

    Args:
        path: The directory holding the ``.safetensors`` file, or the file itself.
        alpha: ``lora_alpha`` of a file that does not record it; must agree with the file where it does.
        pipeline_class: The diffusers pipeline that reads the file (default ``StableDiffusionPipeline``).
        component: The adapted component (``unet``).

    Raises:
        FileNotFoundError: There is no such file.
        ValueError: The file holds no LoRA weights for the component, or settings that :class:`LoraSettings`
            cannot hold.
    """
    return read_lora_file(path, pipeline_class, component).settings(alpha)


def adapter_key(key: str) -> str:
    """``<layer>.lora_A.weight`` -> ``<layer>.lora_A.default.weight``: where peft keeps the adapter's weight."""
    head, _, tail = key.rpartition(".lora_")
    name, _, rest = tail.partition(".")
    return f"{head}.lora_{name}.{ADAPTER_NAME}" + (f".{rest}" if rest else "")
