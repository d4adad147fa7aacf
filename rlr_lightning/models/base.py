"""A frozen diffusion backbone with trainable LoRA adapters on its denoiser: what every model family shares.

A model family is a subclass (:mod:`rlr_lightning.models.sd`, :mod:`rlr_lightning.models.sdxl`) that says
which components its pipeline directory holds and how they load, how prompts become its conditioning, which
denoiser calls its network, and which diffusers pipeline reads its LoRA files. Everything else lives here:
freezing, LoRA creation, export and import, the sampler, and decoding latents to images.

Loading goes through the components' own ``from_pretrained`` (a hub id or a local diffusers pipeline
directory), so real models and the tiny test models take the same path. Everything is frozen and in eval mode
in the chosen dtype; only the LoRA weights that :meth:`DiffusionBackbone.add_lora` creates are trainable, and
they are kept in float32 (the diffusers training recipe).
"""

from __future__ import annotations

import logging
import os
import textwrap
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rlr_lightning.hub import is_offline, model_unavailable, resolve_pretrained
from rlr_lightning.models.lora import (
    ADAPTER_NAME,
    LORA_WEIGHT_NAME,
    LoraFile,
    LoraSettings,
    adapter_key,
    read_lora_file,
)
from rlr_lightning.sampling import DDIMSampler, Denoiser, DiffusionSampler, PromptEmbeds, UNetDenoiser

logger = logging.getLogger(__name__)


class DiffusionBackbone(nn.Module, ABC):
    """A frozen latent diffusion model with optional LoRA adapters on its denoiser.

    Build one with :meth:`from_pretrained` of a model family's subclass (or
    :func:`rlr_lightning.models.load_backbone`, which picks the family from the pipeline's ``model_index.json``).
    It is an ``nn.Module`` so that it moves with the ``LightningModule`` that owns it; its only trainable
    parameters are the LoRA weights.

    Args:
        components: The pipeline's components by name (``unet``, ``vae``, ``scheduler``, the text encoders and
            tokenizers); each becomes an attribute.
        dtype: Dtype of the frozen weights (float32, or bfloat16 on accelerators).
    """

    #: The pipeline's components: subfolder name to ``(library, class name)`` of the class that loads it.
    #: Networks get the dtype and weight variant; tokenizers and schedulers load as they are.
    component_classes: ClassVar[dict[str, tuple[str, str]]] = {}
    #: The diffusers pipeline class of this family (``save_lora_weights`` / ``load_lora_weights``).
    pipeline_class_name: ClassVar[str] = ""
    #: The component that carries the LoRA adapter, and the prefix of its keys in LoRA files.
    lora_component: ClassVar[str] = "unet"
    #: The components that are networks (frozen, cast to the dtype, in eval mode).
    networks: ClassVar[tuple[str, ...]] = ()
    #: Whether the family makes videos: ``decode`` returns ``(B, frames, 3, H, W)``, and its rewards are video
    #: rewards (:attr:`rlr_lightning.rewards.RewardModel.video`).
    video: ClassVar[bool] = False

    # The components every family has, set from ``components`` in ``__init__``. Their classes are the ones
    # ``component_classes`` names, loaded by name, so they are typed loosely (``nn.Module.__getattr__`` would
    # otherwise type them ``Tensor | Module``).
    vae: Any
    scheduler: Any
    tokenizer: Any
    text_encoder: Any

    @classmethod
    def components(cls) -> tuple[str, ...]:
        """The subfolders a pipeline directory of this family must provide."""
        return tuple(cls.component_classes)

    def __init__(self, dtype: torch.dtype = torch.float32, **components) -> None:
        super().__init__()
        missing = [name for name in self.components() if name not in components]
        if missing:
            raise TypeError(f"{type(self).__name__} needs the components {', '.join(missing)}")
        for name, value in components.items():
            setattr(self, name, value)
        self.dtype = dtype
        self._resolution: tuple[int, int] | None = None
        self._pipeline = None  # see pipeline()
        self.lora_settings: LoraSettings | None = None
        self._warned_truncation = False
        # Prompts already checked against the token limit: a training run re-encodes the same prompts every
        # epoch, and tokenizing them a second time on every step would only repeat the answer.
        self._checked_prompts: set[str] = set()
        self.freeze()

    # -- loading -----------------------------------------------------------------------------------------

    @classmethod
    def pipeline_class(cls) -> type[Any]:
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    def pipeline(self):
        """The family's diffusers pipeline over this backbone's own components (the same module objects, no
        weights of its own), made on first use: the flow-matching families encode prompts with its
        ``encode_prompt``, so their conditioning is diffusers' by construction. A plain attribute, not a
        submodule (a pipeline is no ``nn.Module``)."""
        if self._pipeline is None:
            self._pipeline = self.pipeline_class()(
                **{name: getattr(self, name) for name in self.components()}
            )
        return self._pipeline

    @classmethod
    def classes_at(cls, source: str, **hub) -> dict[str, tuple[str, str]]:
        """The classes that load ``source``'s components: :attr:`component_classes`, unless a family reads a
        component's class from the pipeline (Wan's scheduler). ``hub`` as for :meth:`load_components`."""
        return dict(cls.component_classes)

    @classmethod
    def load_components(cls, source: str, dtype: torch.dtype, **hub) -> dict:
        """Load every component from ``source``, each through its own class's ``from_pretrained``.

        ``hub`` holds ``revision``, ``variant``, ``cache_dir`` and ``local_files_only``.
        """
        import importlib

        variant = hub.pop("variant")
        loaded = {}
        for name, (library, class_name) in cls.classes_at(source, **hub).items():
            component_class = getattr(importlib.import_module(library), class_name)
            kwargs = dict(subfolder=name, **hub)
            if name in cls.networks:
                # diffusers models take torch_dtype, transformers models dtype.
                kwargs.update(
                    variant=variant, **{"torch_dtype" if library == "diffusers" else "dtype": dtype}
                )
            loaded[name] = component_class.from_pretrained(source, **kwargs)
        return loaded

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
            pretrained_model_name_or_path: Hub id or a diffusers pipeline directory of this family.
            dtype: Dtype of the frozen weights.
            revision: Hub revision (branch, tag or commit).
            variant: Weight variant such as ``fp16``.
            cache_dir: Hugging Face cache directory; defaults to the hub's own.
            local_files_only: Never download; defaults to ``True`` when ``HF_HUB_OFFLINE`` or ``RLR_OFFLINE``
                is set.

        Raises:
            FileNotFoundError: A local directory is missing or incomplete.
            ModelNotAvailableError: A hub id is neither cached nor downloadable; the message says what to
                download and where to point the loader.
        """
        source = resolve_pretrained(pretrained_model_name_or_path, cls.components())
        is_local = Path(source).is_dir()
        offline = is_offline() if local_files_only is None else local_files_only
        logger.info("Loading the %s backbone from %s (dtype %s)", cls.__name__, source, dtype)
        try:
            components = cls.load_components(
                source,
                dtype,
                revision=revision,
                variant=variant,
                cache_dir=None if cache_dir is None else str(cache_dir),
                local_files_only=offline,
            )
        except (OSError, ValueError) as err:
            if is_local:
                raise
            raise model_unavailable(source, offline, err) from err
        return cls(dtype=dtype, **components)

    # -- freezing and LoRA ------------------------------------------------------------------------------

    @property
    def network(self) -> Any:
        """The denoiser network, which carries the LoRA adapter."""
        return getattr(self, self.lora_component)

    def network_dtype(self, name: str) -> torch.dtype:
        """The dtype a frozen network is kept in (the backbone's; a family may keep one in float32)."""
        return self.dtype

    def freeze(self) -> None:
        """Frozen, eval mode, in ``self.dtype``; LoRA weights (if any) stay trainable in float32."""
        for name in self.networks:
            module = getattr(self, name)
            module.requires_grad_(False)
            dtype = self.network_dtype(name)
            if module.dtype != dtype:
                module.to(dtype=dtype)
            module.eval()
        if self.lora_settings is not None:
            self._make_lora_trainable()

    def train(self, mode: bool = True) -> DiffusionBackbone:
        # Lightning puts modules in train mode during fit; the backbone must stay in eval mode (no dropout,
        # fixed normalisation statistics) so sampling stays a deterministic function of the noise.
        return super().train(False)

    def add_lora(self, settings: LoraSettings = LoraSettings()) -> None:
        """Add a LoRA adapter to the denoiser network (idempotent for the same settings)."""
        from peft import LoraConfig

        if self.lora_settings is not None:
            if self.lora_settings != settings:
                raise ValueError(
                    f"the {self.lora_component} already has LoRA {self.lora_settings}; cannot add {settings}"
                )
            return
        self.network.add_adapter(
            LoraConfig(
                r=settings.rank,
                lora_alpha=settings.alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
                init_lora_weights=settings.init,  # type: ignore[arg-type]  # peft annotates a Literal
                target_modules=list(settings.target_modules),
            ),
            adapter_name=ADAPTER_NAME,
        )
        self.lora_settings = settings
        self._make_lora_trainable()

    def _make_lora_trainable(self) -> None:
        from diffusers.training_utils import cast_training_params

        for name, p in self.network.named_parameters():
            p.requires_grad_("lora_" in name)
        # peft creates the adapter in the UNet's dtype; train it in float32 (diffusers' recipe).
        cast_training_params(self.network, dtype=torch.float32)

    @contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """Inside the block the denoiser runs without its LoRA adapter: the base model (for "before" images)."""
        if self.lora_settings is None:
            yield
            return
        self.network.disable_adapters()
        try:
            yield
        finally:
            # peft re-enables gradients of the active adapter here: the LoRA weights stay trainable.
            self.network.enable_adapters()

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable LoRA weights by the denoiser network's parameter name."""
        return {n: p for n, p in self.network.named_parameters() if p.requires_grad}

    # -- export and import ------------------------------------------------------------------------------

    def lora_state_dict(self) -> dict[str, Tensor]:
        """LoRA weights in peft's layout (``<layer>.lora_A.weight``), without the ``unet.`` prefix.

        diffusers' ``load_lora_weights`` reads this layout for every layer type. Its older ``lora.down`` /
        ``lora.up`` names exist for a few layer types only, and diffusers picks the layout from the first key,
        so a file mixing the two (attention and conv layers) loses one of them.
        """
        from peft.utils import get_peft_model_state_dict

        self._require_lora()
        peft_sd = get_peft_model_state_dict(self.network, adapter_name=ADAPTER_NAME)
        return {k: v.detach().cpu().contiguous() for k, v in peft_sd.items()}

    def export_lora(self, directory: str | os.PathLike) -> Path:
        """Write ``pytorch_lora_weights.safetensors``, which the family's diffusers pipeline's
        ``load_lora_weights`` reads.

        The adapter config (rank, alpha, targets) travels in the file's metadata, so diffusers applies the
        same ``alpha / rank`` scale the weights were trained with, and :meth:`load_lora` (``rlr sample
        --lora``) rebuilds the same adapter.
        """
        self._require_lora()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.network.peft_config[ADAPTER_NAME].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        self.pipeline_class().save_lora_weights(
            directory,
            safe_serialization=True,
            **{
                f"{self.lora_component}_lora_layers": self.lora_state_dict(),
                f"{self.lora_component}_lora_adapter_metadata": config,
            },
        )
        path = directory / LORA_WEIGHT_NAME
        logger.info("Exported LoRA weights to %s", path)
        return path

    def load_lora(self, path: str | os.PathLike, alpha: float | None = None) -> LoraSettings:
        """Load LoRA weights written by :meth:`export_lora`, or any diffusers LoRA of this model family.

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
        lora = read_lora_file(path, self.pipeline_class(), self.lora_component)
        settings = lora.settings(alpha)
        ours = self.lora_settings
        added = ours is None
        if ours is not None:
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
                    raise ValueError(f"{lora.path} does not fit this {self.lora_component}: {err}") from None
            self._set_lora_weights(lora)
        except ValueError:
            if added:  # leave the UNet as it was, without adapter layers or adapter config
                self.network.unload_lora()
                self.lora_settings = None
            raise
        loaded = self.lora_settings
        assert loaded is not None  # the adapter it had, or the one add_lora made
        logger.info(
            "Loaded LoRA weights from %s: rank %d, alpha %g, %d adapted layers",
            lora.path,
            loaded.rank,
            loaded.alpha,
            len(lora.layers),
        )
        return loaded

    def _set_lora_weights(self, lora: LoraFile) -> None:
        """Copy the file's weights into the adapter after checking that they cover it exactly."""
        from peft.utils import set_peft_model_state_dict

        ours = {k: v.shape for k, v in self.network.state_dict().items() if ".lora_" in k}
        theirs = {adapter_key(k): v for k, v in lora.weights.items()}
        unexpected = sorted(k for k in theirs if k not in ours)
        if unexpected:
            raise ValueError(
                f"{lora.path} has LoRA weights for {len(unexpected)} layers that this {self.lora_component}'s "
                f"adapter lacks, e.g. {unexpected[:3]}; it was trained on another model or with other target modules"
            )
        missing = sorted(k for k in ours if k not in theirs)
        if missing:
            raise ValueError(
                f"{lora.path} lacks LoRA weights for {len(missing)} adapted layers, e.g. {missing[:3]}"
            )
        wrong = [(k, tuple(v.shape), tuple(ours[k])) for k, v in theirs.items() if v.shape != ours[k]]
        if wrong:
            key, file_shape, unet_shape = wrong[0]
            raise ValueError(
                f"{lora.path} does not fit this {self.lora_component}: {len(wrong)} of its {len(theirs)} LoRA weights "
                f"have other shapes, e.g. {key.replace(f'.{ADAPTER_NAME}', '')} is {file_shape} in the file but "
                f"{unet_shape} in this {self.lora_component}; it was trained on another model"
            )
        result = set_peft_model_state_dict(self.network, lora.weights, ADAPTER_NAME)
        # The checks above mirror peft's key mapping; peft's own report is the final word.
        leftover = getattr(result, "unexpected_keys", [])
        if leftover:
            raise ValueError(
                f"{lora.path} has LoRA weights for layers this {self.lora_component} lacks: {leftover[:5]}"
            )

    def _require_lora(self) -> None:
        if self.lora_settings is None:
            raise RuntimeError(f"the {self.lora_component} has no LoRA adapter; call add_lora first")

    # -- text, sampling, images -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def tokenizers(self) -> tuple:
        """The tokenizers whose limits prompts are checked against."""
        return (self.tokenizer,)

    def token_limit(self, tokenizer) -> int:
        """Tokens per prompt the encoder behind ``tokenizer`` reads (its ``model_max_length``; a family that pads
        or cuts to another length, such as a T5 ``max_sequence_length``, overrides this)."""
        return tokenizer.model_max_length

    _limit_check_paused = False

    @contextmanager
    def prompt_limit_unchecked(self) -> Iterator[None]:
        """Inside the block prompts are encoded without the token-limit check, whose warning comes once per
        backbone: prompts that are not trained on (a sample grid's captions, which their callback checks) then
        neither use the warning up nor appear in it as if they were the training prompts."""
        paused, self._limit_check_paused = self._limit_check_paused, True
        try:
            yield
        finally:
            self._limit_check_paused = paused

    def _warn_if_truncated(self, prompts: list[str]) -> None:
        """Warn once per backbone that prompts longer than a text encoder's limit are cut (naming the encoder)."""
        unchecked = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self._checked_prompts]
        if self._warned_truncation or self._limit_check_paused or not unchecked:
            return
        self._checked_prompts.update(unchecked)
        for tokenizer in self.tokenizers:
            limit = self.token_limit(tokenizer)
            # verbose=False: the tokenizer's own warning would not say which prompt is too long.
            lengths = [len(ids) for ids in tokenizer(unchecked, verbose=False).input_ids]
            too_long = [(prompt, n) for prompt, n in zip(unchecked, lengths) if n > limit]
            if too_long:
                prompt, n = too_long[0]
                which = "" if len(self.tokenizers) == 1 else f" ({type(tokenizer).__name__})"
                logger.warning(
                    "The text encoder%s reads at most %d tokens per prompt; longer prompts are cut, e.g. %r (%d "
                    "tokens). Shorten them if their ends matter (this is said only once).",
                    which,
                    limit,
                    textwrap.shorten(prompt, width=60, placeholder=" ..."),
                    n,
                )
                self._warned_truncation = True
                return

    def encode_prompts(self, prompts: Sequence[str], negative: bool = True) -> PromptEmbeds:
        """Encode prompts, and the negative prompt when ``negative`` (needed for guidance)."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a sequence of prompts, not one string")
        if len(prompts) == 0:
            raise ValueError("encode_prompts got no prompts")
        self._warn_if_truncated(list(prompts))
        with torch.no_grad():
            return self._encode_prompts(list(prompts), negative)

    @abstractmethod
    def _encode_prompts(self, prompts: list[str], negative: bool) -> PromptEmbeds:
        """The family's conditioning of ``prompts`` (and of its negative prompt when ``negative``)."""

    # -- resolution --------------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along each side (8 for every released family)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def default_resolution(self) -> tuple[int, int]:
        """The image size the model was made for, ``(height, width)`` in pixels: the denoiser's ``sample_size``
        times the VAE's scale (a family whose network has no ``sample_size`` overrides this)."""
        size = self.network.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def num_frames(self) -> int:
        """Frames per sample: 1 for the image families (a video family overrides this)."""
        return 1

    def set_num_frames(self, num_frames: int | None) -> None:
        """Frames per video, for video families; an image family refuses a number (``None`` is a no-op)."""
        if num_frames is not None:
            raise ValueError(
                f"num_frames={num_frames} is for video models (Wan 2.1); {type(self).__name__} makes images"
            )

    def check_resolution(self, height: int, width: int) -> None:
        """Raise ``ValueError`` for an image size this family cannot sample (each side a multiple of the VAE's
        scale by default; a family with patched latents asks for more)."""
        s = self.vae_scale_factor
        if height % s or width % s or height < s or width < s:
            raise ValueError(
                f"resolution {height}x{width} is not a positive multiple of the VAE's scale factor {s} on each side"
            )

    def set_resolution(self, resolution: int | Sequence[int] | None) -> None:
        """Sample images of ``resolution`` pixels (one side for square images, or ``(height, width)``); ``None``
        goes back to :meth:`default_resolution`. Takes effect for samplers made afterwards."""
        if resolution is None:
            self._resolution = None
            return
        h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        self.check_resolution(int(h), int(w))
        self._resolution = (int(h), int(w))

    @property
    def resolution(self) -> tuple[int, int]:
        """Height and width of the sampled images, in pixels."""
        return self._resolution if self._resolution is not None else self.default_resolution()

    @property
    def latent_size(self) -> tuple[int, int]:
        """Height and width of the sampled latents."""
        h, w = self.resolution
        return h // self.vae_scale_factor, w // self.vae_scale_factor

    # -- sampling ----------------------------------------------------------------------------------------

    def make_denoiser(self) -> Denoiser:
        """The family's network call (a diffusers UNet by default), at the backbone's resolution."""
        return UNetDenoiser(self.network, self.dtype, sample_size=self.latent_size)

    def make_sampler(
        self,
        num_steps: int,
        eta: float,
        guidance_scale: float = 1.0,
        timestep_spacing: str | None = None,
        stochastic_steps: tuple[int, int] | None = None,
    ) -> DiffusionSampler:
        """The sampler RLRModule trains with: DDIM over this backbone's denoiser and scheduler for the UNet families.

        Args:
            num_steps: Sampling steps ``T``.
            eta: The sampler's noise level: DDIM's eta here, the flow SDE's noise level for flow-matching families.
            guidance_scale: Guidance weight (classifier-free guidance, or a guidance embedding where the family
                is guidance-distilled).
            timestep_spacing: DDIM timestep spacing override (``leading``, ``trailing``, ``linspace``).
            stochastic_steps: Flow-matching families only: the ``[start, stop)`` steps that run the SDE, the
                others the ODE (MixGRPO / Flow-GRPO-Fast); ``None``: every step is stochastic.
        """
        if stochastic_steps is not None:
            raise ValueError(
                f"stochastic_steps={list(stochastic_steps)} is for the flow-matching families' SDE sampler; DDIM "
                "makes every step stochastic with eta > 0: leave it unset (null)"
            )
        return DDIMSampler(
            self.make_denoiser(),
            self.scheduler,
            num_steps=num_steps,
            eta=eta,
            guidance_scale=guidance_scale,
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
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
