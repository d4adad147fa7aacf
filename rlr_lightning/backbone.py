"""The frozen Stable Diffusion backbone with trainable LoRA adapters on its UNet.

Loading goes through the components' own ``from_pretrained`` (a hub id or a local diffusers pipeline
directory), so real models and the tiny test model take the same path. Everything is frozen and in eval
mode in the chosen dtype; only the LoRA weights that :meth:`DiffusionBackbone.add_lora` creates are
trainable, and they are kept in float32 (the diffusers training recipe). LoRA weights are exported in the
format ``StableDiffusionPipeline.load_lora_weights`` reads, and can be imported back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rlr_lightning.sampling import DDIMSampler, PromptEmbeds

logger = logging.getLogger(__name__)

#: The components a Stable Diffusion 1.x / 2.x pipeline directory must provide.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: peft's adapter name for the one adapter we train.
ADAPTER_NAME = "default"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class ModelNotAvailableError(OSError):
    """A model could not be found locally and could not be downloaded."""


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


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_pretrained(name_or_path: str | os.PathLike) -> str:
    """Check a local pipeline directory early, or pass a hub id through.

    Raises:
        FileNotFoundError: naming the missing directory or the missing component subfolders.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file; pass a diffusers pipeline directory or a hub id")
        missing = [c for c in COMPONENTS if not (path / c).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a complete diffusers pipeline directory: missing {', '.join(missing)}/ "
                f"(expected subfolders {', '.join(COMPONENTS)})"
            )
        return str(path)
    if _looks_like_path(name):
        raise FileNotFoundError(
            f"model directory {path} does not exist. Pass a diffusers pipeline directory (with "
            f"{', '.join(COMPONENTS)} subfolders) or a Hugging Face hub id such as "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5'"
        )
    return name


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _unavailable(repo_id: str, offline: bool, cause: Exception) -> ModelNotAvailableError:
    how = (
        "is not in the local Hugging Face cache and downloads are off (HF_HUB_OFFLINE=1 or local_files_only)"
        if offline
        else "could not be downloaded"
    )
    return ModelNotAvailableError(
        f"model '{repo_id}' {how}: {cause}\n"
        f"Download it on a machine with internet access, e.g.\n"
        f"    hf download {repo_id} --local-dir /path/to/models/{repo_id.split('/')[-1]}\n"
        "and pass that directory as the model path (pretrained_model_name_or_path), or allow downloads "
        "(unset HF_HUB_OFFLINE) to fill the cache. If you meant a local directory: "
        f"{Path(repo_id).expanduser().resolve()} does not exist."
    )


def _load_components(
    source: str,
    dtype: torch.dtype,
    revision: str | None,
    variant: str | None,
    cache_dir: str | None,
    local_files_only: bool,
) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    logger.info("Loading the diffusion backbone from %s (dtype %s)", source, dtype)
    return dict(
        unet=UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=dtype, variant=variant, **hub
        ),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, variant=variant, **hub),
        text_encoder=CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", dtype=dtype, variant=variant, **hub
        ),
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub),
        # Any Stable Diffusion scheduler config (their repositories ship PNDM) read as DDIM.
        scheduler=DDIMScheduler.from_pretrained(source, subfolder="scheduler", **hub),
    )


class DiffusionBackbone(nn.Module):
    """A frozen Stable Diffusion 1.x / 2.x backbone with optional LoRA adapters on the UNet.

    Build it with :meth:`from_pretrained`. It is an ``nn.Module`` so that it moves with the
    ``LightningModule`` that owns it; its only trainable parameters are the LoRA weights.

    Args:
        unet: The denoiser (``UNet2DConditionModel``).
        vae: The latent autoencoder (``AutoencoderKL``).
        text_encoder: The CLIP text encoder.
        tokenizer: The CLIP tokenizer.
        scheduler: The noise scheduler; its configuration is sampled as DDIM.
        dtype: Dtype of the frozen weights (float32, or bfloat16 on accelerators).
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.dtype = dtype
        self.lora_settings: LoraSettings | None = None
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        variant: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
    ) -> DiffusionBackbone:
        """Load from a hub id or a local pipeline directory.

        Args:
            pretrained_model_name_or_path: Hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``) or a
                diffusers pipeline directory.
            dtype: Dtype of the frozen weights.
            revision: Hub revision (branch, tag or commit).
            variant: Weight variant such as ``fp16``.
            cache_dir: Hugging Face cache directory; defaults to the hub's own.
            local_files_only: Never download; defaults to ``True`` when ``HF_HUB_OFFLINE`` is set.

        Raises:
            FileNotFoundError: A local directory is missing or incomplete.
            ModelNotAvailableError: A hub id is neither cached nor downloadable; the message says what to
                download and where to point the loader.
        """
        source = resolve_pretrained(pretrained_model_name_or_path)
        is_local = Path(source).is_dir()
        offline = _offline() if local_files_only is None else local_files_only
        try:
            components = _load_components(
                source, dtype, revision, variant, None if cache_dir is None else str(cache_dir), offline
            )
        except (OSError, ValueError) as err:
            if is_local:
                raise
            raise _unavailable(source, offline, err) from err
        return cls(**components, dtype=dtype)

    # -- freezing and LoRA ------------------------------------------------------------------------------

    def freeze(self) -> None:
        """Frozen, eval mode, in ``self.dtype``; LoRA weights (if any) stay trainable in float32."""
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            if module.dtype != self.dtype:
                module.to(dtype=self.dtype)
            module.eval()
        if self.lora_settings is not None:
            self._make_lora_trainable()

    def train(self, mode: bool = True) -> DiffusionBackbone:
        # Lightning puts modules in train mode during fit; the backbone must stay in eval mode (no dropout,
        # fixed normalisation statistics) so sampling stays a deterministic function of the noise.
        return super().train(False)

    @property
    def has_lora(self) -> bool:
        return self.lora_settings is not None

    def add_lora(self, settings: LoraSettings = LoraSettings()) -> None:
        """Add a LoRA adapter to the UNet (idempotent for the same settings)."""
        from peft import LoraConfig

        if self.lora_settings is not None:
            if self.lora_settings != settings:
                raise ValueError(f"the UNet already has LoRA {self.lora_settings}; cannot add {settings}")
            return
        self.unet.add_adapter(
            LoraConfig(
                r=settings.rank,
                lora_alpha=settings.alpha,
                init_lora_weights=settings.init,
                target_modules=list(settings.target_modules),
            ),
            adapter_name=ADAPTER_NAME,
        )
        self.lora_settings = settings
        self._make_lora_trainable()

    def _make_lora_trainable(self) -> None:
        from diffusers.training_utils import cast_training_params

        for name, p in self.unet.named_parameters():
            p.requires_grad_("lora_" in name)
        # peft creates the adapter in the UNet's dtype; train it in float32 (diffusers' recipe).
        cast_training_params(self.unet, dtype=torch.float32)

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable LoRA weights by UNet parameter name."""
        return {n: p for n, p in self.unet.named_parameters() if p.requires_grad}

    # -- export and import ------------------------------------------------------------------------------

    def lora_state_dict(self) -> dict[str, Tensor]:
        """LoRA weights in the diffusers layout (``...lora.down.weight``), without the ``unet.`` prefix."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        self._require_lora()
        peft_sd = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER_NAME)
        return {k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(peft_sd).items()}

    def export_lora(self, directory: str | os.PathLike) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` that ``StableDiffusionPipeline.load_lora_weights`` reads.

        The adapter config (rank, alpha, targets) travels in the file's metadata, so diffusers applies the
        same ``alpha / rank`` scale the weights were trained with.
        """
        from diffusers import StableDiffusionPipeline

        self._require_lora()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.unet.peft_config[ADAPTER_NAME].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        StableDiffusionPipeline.save_lora_weights(
            directory,
            unet_lora_layers=self.lora_state_dict(),
            safe_serialization=True,
            unet_lora_adapter_metadata=config,
        )
        path = directory / LORA_WEIGHT_NAME
        logger.info("Exported LoRA weights to %s", path)
        return path

    def load_lora(self, path: str | os.PathLike) -> None:
        """Load LoRA weights exported by :meth:`export_lora` (or any diffusers SD LoRA of the same shape).

        Args:
            path: The directory holding ``pytorch_lora_weights.safetensors``, or the file itself.
        """
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        self._require_lora()
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"LoRA weights not found: {path}")
        kwargs = {"weight_name": path.name} if path.is_file() else {}
        state_dict, _, metadata = StableDiffusionPipeline.lora_state_dict(
            str(path.parent if path.is_file() else path), return_lora_metadata=True, **kwargs
        )
        unet_sd = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
        if not unet_sd:
            raise ValueError(f"{path} holds no UNet LoRA weights")
        if metadata:
            metadata = {k.removeprefix("unet."): v for k, v in metadata.items()}
            saved = (metadata.get("r"), metadata.get("lora_alpha"))
            ours = (self.lora_settings.rank, self.lora_settings.alpha)
            if saved[0] is not None and (saved[0] != ours[0] or float(saved[1]) != float(ours[1])):
                raise ValueError(
                    f"{path} was trained with LoRA rank {saved[0]}, alpha {saved[1]}; this backbone has rank "
                    f"{ours[0]}, alpha {ours[1]}"
                )
        result = set_peft_model_state_dict(self.unet, convert_unet_state_dict_to_peft(unet_sd), ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{path} has LoRA weights for layers this UNet lacks: {unexpected[:5]}")
        ours = {k for k in self.unet.state_dict() if "lora_" in k}
        missing = [k for k in getattr(result, "missing_keys", []) if k in ours]
        if missing:
            raise ValueError(f"{path} lacks LoRA weights for {len(missing)} adapted layers, e.g. {missing[:3]}")

    def _require_lora(self) -> None:
        if self.lora_settings is None:
            raise RuntimeError("the UNet has no LoRA adapter; call add_lora first")

    # -- text, sampling, images -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def _encode(self, prompts: Sequence[str]) -> Tensor:
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids, return_dict=False)[0]

    def encode_prompts(self, prompts: Sequence[str], negative: bool = True) -> PromptEmbeds:
        """Encode prompts, and the empty negative prompt when ``negative`` (needed for guidance)."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a sequence of prompts, not one string")
        if len(prompts) == 0:
            raise ValueError("encode_prompts got no prompts")
        cond = self._encode(prompts)
        uncond = self._encode([""]).expand_as(cond).contiguous() if negative else None
        return PromptEmbeds(cond=cond, uncond=uncond)

    def make_sampler(
        self, num_steps: int, eta: float, guidance_scale: float = 1.0, timestep_spacing: str | None = None
    ) -> DDIMSampler:
        """A :class:`DDIMSampler` over this backbone's UNet and scheduler."""
        return DDIMSampler(
            self.unet,
            self.scheduler,
            num_steps=num_steps,
            eta=eta,
            guidance_scale=guidance_scale,
            model_dtype=self.dtype,
            timestep_spacing=timestep_spacing,
        )

    def decode(self, latents: Tensor) -> Tensor:
        """Decode latents to images in [0, 1], ``(B, 3, H, W)`` float32; differentiable in the latents."""
        config = self.vae.config
        z = latents / config.scaling_factor
        if getattr(config, "shift_factor", None):
            z = z + config.shift_factor
        images = self.vae.decode(z.to(self.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
