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
import textwrap
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


@dataclass(frozen=True)
class _LoraFile:
    """The UNet part of a LoRA weights file, in peft's layout (``<layer>.lora_A.weight``).

    Attributes:
        path: The file (or the directory holding it), for messages.
        weights: The UNet's LoRA weights without the ``unet.`` prefix.
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


def _read_lora_file(path: str | os.PathLike) -> _LoraFile:
    """Read a diffusers LoRA file through diffusers' own reader (which also converts Kohya files)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

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
    state_dict, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(
        str(path.parent if path.is_file() else path), return_lora_metadata=True, **kwargs
    )

    def unet_part(entries: dict | None) -> dict:
        return {k.removeprefix("unet."): v for k, v in (entries or {}).items() if k.startswith("unet.")}

    weights = unet_part(state_dict)
    if not weights:
        raise ValueError(f"{path} holds no UNet LoRA weights (no key starts with 'unet.')")
    # Older exporters and other trainers name some layers' weights lora.down / lora.up.
    weights = convert_unet_state_dict_to_peft(weights)
    return _LoraFile(path, weights, unet_part(metadata), unet_part(network_alphas))


def read_lora_settings(path: str | os.PathLike, alpha: float | None = None) -> LoraSettings:
    """The :class:`LoraSettings` of a LoRA weights file, for :meth:`DiffusionBackbone.add_lora`.

    Files written by :meth:`DiffusionBackbone.export_lora` (and diffusers' training scripts) record rank,
    alpha and target modules in their metadata. For files without that metadata, the rank comes from the
    weights' shapes, the targets are the layers named in the file, and the alpha is ``alpha`` (default: the
    rank, i.e. scale 1, diffusers' own fallback) unless the file holds Kohya-style alphas.

    Args:
        path: The directory holding the ``.safetensors`` file, or the file itself.
        alpha: ``lora_alpha`` of a file that does not record it; must agree with the file where it does.

    Raises:
        FileNotFoundError: There is no such file.
        ValueError: The file holds no UNet LoRA weights, or settings that :class:`LoraSettings` cannot hold.
    """
    return _read_lora_file(path).settings(alpha)


def _adapter_key(key: str) -> str:
    """``<layer>.lora_A.weight`` -> ``<layer>.lora_A.default.weight``: where peft keeps the adapter's weight."""
    head, _, tail = key.rpartition(".lora_")
    name, _, rest = tail.partition(".")
    return f"{head}.lora_{name}.{ADAPTER_NAME}" + (f".{rest}" if rest else "")


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
        self._warned_truncation = False
        # Prompts already checked against the token limit: a training run re-encodes the same prompts every
        # epoch, and tokenizing them a second time on every step would only repeat the answer.
        self._checked_prompts: set[str] = set()
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
        """LoRA weights in peft's layout (``<layer>.lora_A.weight``), without the ``unet.`` prefix.

        diffusers' ``load_lora_weights`` reads this layout for every layer type. Its older ``lora.down`` /
        ``lora.up`` names exist for a few layer types only, and diffusers picks the layout from the first key,
        so a file mixing the two (attention and conv layers) loses one of them.
        """
        from peft.utils import get_peft_model_state_dict

        self._require_lora()
        peft_sd = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER_NAME)
        return {k: v.detach().cpu().contiguous() for k, v in peft_sd.items()}

    def export_lora(self, directory: str | os.PathLike) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` that ``StableDiffusionPipeline.load_lora_weights`` reads.

        The adapter config (rank, alpha, targets) travels in the file's metadata, so diffusers applies the
        same ``alpha / rank`` scale the weights were trained with, and :meth:`load_lora` (``rlr sample
        --lora``) rebuilds the same adapter.
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

    def load_lora(self, path: str | os.PathLike, alpha: float | None = None) -> LoraSettings:
        """Load LoRA weights written by :meth:`export_lora`, or any diffusers Stable Diffusion UNet LoRA.

        A UNet without an adapter gets one with the file's settings (:func:`read_lora_settings`); a UNet that
        has one keeps it, and the file must match its rank and alpha and cover exactly its adapted layers.
        Nothing changes when the file does not fit.

        Args:
            path: The directory holding ``pytorch_lora_weights.safetensors``, or the file itself.
            alpha: ``lora_alpha`` of a file that does not record it (third-party LoRAs without adapter
                metadata); defaults to the file's rank. Must agree with the file where it records one.

        Returns:
            The settings of the loaded adapter.

        Raises:
            FileNotFoundError: There is no such file.
            ValueError: The file does not fit this UNet; the message names the file and what differs (layers,
                shapes, rank or alpha).
        """
        lora = _read_lora_file(path)
        settings = lora.settings(alpha)
        added = self.lora_settings is None
        if not added:
            ours = self.lora_settings
            file_alpha = lora.recorded_alpha() if alpha is None else float(alpha)
            if settings.rank != ours.rank or (file_alpha is not None and file_alpha != float(ours.alpha)):
                raise ValueError(
                    f"{lora.path} was trained with LoRA rank {settings.rank}, alpha {settings.alpha:g}; this "
                    f"backbone has rank {ours.rank}, alpha {ours.alpha:g}"
                )
        try:
            if added:
                try:
                    self.add_lora(settings)
                except ValueError as err:  # peft: none of the file's target modules exists in this UNet
                    raise ValueError(f"{lora.path} does not fit this UNet: {err}") from None
            self._set_lora_weights(lora)
        except ValueError:
            if added:  # leave the UNet as it was, without adapter layers or adapter config
                self.unet.unload_lora()
                self.lora_settings = None
            raise
        logger.info(
            "Loaded LoRA weights from %s: rank %d, alpha %g, %d adapted layers",
            lora.path, self.lora_settings.rank, self.lora_settings.alpha, len(lora.layers),
        )
        return self.lora_settings

    def _set_lora_weights(self, lora: _LoraFile) -> None:
        """Copy the file's weights into the adapter after checking that they cover it exactly."""
        from peft.utils import set_peft_model_state_dict

        ours = {k: v.shape for k, v in self.unet.state_dict().items() if ".lora_" in k}
        theirs = {_adapter_key(k): v for k, v in lora.weights.items()}
        unexpected = sorted(k for k in theirs if k not in ours)
        if unexpected:
            raise ValueError(
                f"{lora.path} has LoRA weights for {len(unexpected)} layers that this UNet's adapter lacks, e.g. "
                f"{unexpected[:3]}; it was trained on another model or with other target modules"
            )
        missing = sorted(k for k in ours if k not in theirs)
        if missing:
            raise ValueError(f"{lora.path} lacks LoRA weights for {len(missing)} adapted layers, e.g. {missing[:3]}")
        wrong = [(k, tuple(v.shape), tuple(ours[k])) for k, v in theirs.items() if v.shape != ours[k]]
        if wrong:
            key, file_shape, unet_shape = wrong[0]
            raise ValueError(
                f"{lora.path} does not fit this UNet: {len(wrong)} of its {len(theirs)} LoRA weights have other "
                f"shapes, e.g. {key.replace(f'.{ADAPTER_NAME}', '')} is {file_shape} in the file but {unet_shape} "
                "in this UNet; it was trained on another model"
            )
        result = set_peft_model_state_dict(self.unet, lora.weights, ADAPTER_NAME)
        # The checks above mirror peft's key mapping; peft's own report is the final word.
        leftover = getattr(result, "unexpected_keys", [])
        if leftover:
            raise ValueError(f"{lora.path} has LoRA weights for layers this UNet lacks: {leftover[:5]}")

    def _require_lora(self) -> None:
        if self.lora_settings is None:
            raise RuntimeError("the UNet has no LoRA adapter; call add_lora first")

    # -- text, sampling, images -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _warn_if_truncated(self, prompts: list[str]) -> None:
        """Warn once per backbone that prompts longer than the tokenizer's limit are cut."""
        unchecked = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self._checked_prompts]
        if self._warned_truncation or not unchecked:
            return
        self._checked_prompts.update(unchecked)
        limit = self.tokenizer.model_max_length
        # verbose=False: the tokenizer's own warning would not say which prompt is too long.
        lengths = [len(ids) for ids in self.tokenizer(unchecked, verbose=False).input_ids]
        too_long = [(prompt, n) for prompt, n in zip(unchecked, lengths) if n > limit]
        if too_long:
            prompt, n = too_long[0]
            logger.warning(
                "The text encoder reads at most %d tokens per prompt; longer prompts are cut, e.g. %r (%d tokens). "
                "Shorten them if their ends matter (this is said only once).",
                limit, textwrap.shorten(prompt, width=60, placeholder=" ..."), n,
            )
            self._warned_truncation = True

    @torch.no_grad()
    def _encode(self, prompts: Sequence[str]) -> Tensor:
        self._warn_if_truncated(list(prompts))
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

    def set_decoder_checkpointing(self, enabled: bool) -> None:
        """Recompute the VAE decoder's blocks in backward instead of keeping their activations (diffusers'
        gradient checkpointing; the VAE has no LoRA, so recomputing at its frozen weights is exact)."""
        if enabled:
            self.vae.enable_gradient_checkpointing()
        else:
            self.vae.disable_gradient_checkpointing()

    def decode(self, latents: Tensor) -> Tensor:
        """Decode latents to images in [0, 1], ``(B, 3, H, W)`` float32; differentiable in the latents."""
        config = self.vae.config
        z = latents / config.scaling_factor
        if getattr(config, "shift_factor", None):
            z = z + config.shift_factor
        images = self.vae.decode(z.to(self.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
