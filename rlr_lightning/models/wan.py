"""Wan 2.1 text-to-video: a 3D flow-matching transformer over video latents, UMT5 conditioning, a causal video VAE.

Everything follows diffusers' ``WanPipeline`` (what the tests compare against). The conditioning is the
pipeline's own ``encode_prompt``: UMT5's last hidden states, cut to each prompt's tokens and zero-padded to
``max_sequence_length`` (512 in the pipeline); the negative branch of classifier-free guidance is the encoded
negative prompt (the pipeline's default, the empty prompt). Sampling runs Flow-GRPO's SDE
(:class:`~rlr_lightning.sampling.kernels.FlowMatchSDE`) at the pipeline's times: with a flow-matching Euler
scheduler they are its ``set_timesteps`` times and noise level ``0`` is that scheduler's step, bit for bit; Wan
2.1's released checkpoints ship ``UniPCMultistepScheduler`` with flow sigmas, whose times (``linspace(1, 1 /
1000, T + 1)[:-1]`` shifted by ``flow_shift``, integer timesteps) the kernel takes over, stepping them by
Euler-Maruyama instead of UniPC's multistep update (a likelihood needs a one-step Gaussian transition).

Latents are ``(B, 16, f, h, w)`` with ``f = (frames - 1) / 4 + 1`` latent frames (the VAE's temporal factor)
and ``h, w`` the pixel size over its spatial factor (8); the transformer patches them ``1 x 2 x 2``.
:meth:`WanBackbone.decode` returns videos ``(B, frames, 3, H, W)`` in [0, 1], what video rewards take.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rlr_lightning.models.flow import FlowMatchingBackbone
from rlr_lightning.paths import VIDEO_DEFAULTS_FILE
from rlr_lightning.sampling import Denoiser, PromptEmbeds

logger = logging.getLogger(__name__)

#: ``WanPipeline.__call__``'s defaults, used where a pipeline directory has no :data:`VIDEO_DEFAULTS_FILE`.
PIPELINE_RESOLUTION = (480, 832)
PIPELINE_NUM_FRAMES = 81

#: The schedulers a Wan pipeline may ship whose times the flow SDE can take over.
SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")


class WanDenoiser(Denoiser):
    """A diffusers ``WanTransformer3DModel`` called as ``WanPipeline`` calls it (Wan 2.1: one time per sample).

    Called as ``transformer(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]``
    with the scheduler's timesteps (``t * 1000``); it predicts the flow velocity of ``(B, C, f, h, w)`` latents.

    Args:
        module: The transformer (LoRA or not).
        dtype: Dtype of its inputs (its frozen weights').
        sample_size: Latent height and width.
        latent_frames: Latent frames ``f``.
    """

    # One call at 480 x 832 and 33 frames with guidance holds about 65 GiB of activations (H200, 2026-12-04).
    checkpoint_blocks = True

    def __init__(
        self,
        module: torch.nn.Module,
        dtype: torch.dtype | None = None,
        sample_size: tuple[int, int] | None = None,
        latent_frames: int = 1,
    ) -> None:
        super().__init__(module, dtype, sample_size)
        if self.sample_size is None:
            raise ValueError(
                "WanDenoiser needs sample_size, the latent (height, width): the transformer has none"
            )
        self.latent_frames = int(latent_frames)

    def inputs(self, latents, timesteps, context, added):
        if latents.dim() != 5:
            raise ValueError(f"Wan takes video latents (B, C, frames, h, w), got {tuple(latents.shape)}")
        kwargs = {
            "hidden_states": latents.to(self.dtype),
            "timestep": timesteps,
            "encoder_hidden_states": context.to(self.dtype),
            "return_dict": False,
        }
        return (), kwargs

    def output(self, result) -> Tensor:
        return result[0]

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        config: Any = self.module.config
        assert self.sample_size is not None  # __init__ refuses None
        return (batch_size, config.in_channels, self.latent_frames, *self.sample_size)


class WanBackbone(FlowMatchingBackbone):
    """A frozen Wan 2.1 text-to-video pipeline (``WanPipeline``) with LoRA on its transformer.

    Its components: ``transformer`` (``WanTransformer3DModel``), ``vae`` (``AutoencoderKLWan``: 4x in time, 8x in
    space, 16 latent channels normalised by per-channel means and standard deviations), ``text_encoder``
    (``UMT5EncoderModel``), ``tokenizer`` and ``scheduler`` (flow-matching Euler, or the released checkpoints'
    UniPC with flow sigmas: see the module's docstring). Wan 2.2's two-transformer pipelines
    (``transformer_2``, ``boundary_ratio``) and per-token timesteps (``expand_timesteps``) are refused.

    ``eta`` of :meth:`make_sampler` is the flow SDE's noise level ``a`` (0: the deterministic sampler);
    ``guidance_scale`` is classifier-free guidance (5 in ``WanPipeline``). The default LoRA targets (``to_q``,
    ``to_k``, ``to_v``, ``to_out.0``) adapt every block's self- and cross-attention.

    Args:
        max_sequence_length: UMT5 tokens per prompt (512, ``WanPipeline``'s default, where the tokenizer allows).
        components: As for :class:`~rlr_lightning.models.base.DiffusionBackbone`.
    """

    component_classes = {
        "transformer": ("diffusers", "WanTransformer3DModel"),
        "vae": ("diffusers", "AutoencoderKLWan"),
        "text_encoder": ("transformers", "UMT5EncoderModel"),
        "tokenizer": ("transformers", "AutoTokenizer"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),  # or UniPC: see load_components
    }
    pipeline_class_name = "WanPipeline"
    networks = ("transformer", "vae", "text_encoder")
    t5_tokenizer = "tokenizer"
    default_max_sequence_length = 512  # WanPipeline.__call__'s (its encode_prompt defaults to 226)
    truncation_loggers = ("diffusers.pipelines.wan.pipeline_wan", *FlowMatchingBackbone.truncation_loggers)
    #: Videos, not images: ``decode`` returns ``(B, frames, 3, H, W)`` and rewards must be video rewards.
    video = True

    def __init__(
        self,
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int | None = None,
        defaults: dict | None = None,
        **components,
    ) -> None:
        super().__init__(dtype=dtype, max_sequence_length=max_sequence_length, **components)
        defaults = defaults or {}
        self._default_resolution = tuple(defaults.get("resolution", PIPELINE_RESOLUTION))
        self._default_num_frames = int(defaults.get("num_frames", PIPELINE_NUM_FRAMES))
        self._num_frames: int | None = None
        name = type(self.scheduler).__name__
        if name not in SCHEDULERS:
            raise ValueError(
                f"Wan pipelines with a {name} are not supported; the scheduler must be one of {SCHEDULERS}"
            )
        if name == "UniPCMultistepScheduler" and not self.scheduler.config.get("use_flow_sigmas", False):
            raise ValueError("a Wan UniPCMultistepScheduler must use flow sigmas (use_flow_sigmas: true)")

    # -- loading -----------------------------------------------------------------------------------------

    @classmethod
    def classes_at(cls, source: str, **hub) -> dict[str, tuple[str, str]]:
        """The scheduler's class from the pipeline's ``model_index.json`` (Wan 2.1 ships UniPC); Wan 2.2
        pipelines and unsupported schedulers are refused before any weights load."""
        from rlr_lightning.hub import read_model_index

        index = read_model_index(
            source, hub.get("revision"), hub.get("cache_dir"), hub.get("local_files_only")
        )
        if (index.get("transformer_2") or [None])[0] is not None or index.get("expand_timesteps"):
            raise ValueError(
                f"{source} is a Wan 2.2 pipeline (two transformers or per-token timesteps); only Wan 2.1's "
                "single-transformer text-to-video pipelines are supported"
            )
        scheduler_class = (index.get("scheduler") or [None, "FlowMatchEulerDiscreteScheduler"])[1]
        if scheduler_class not in SCHEDULERS:
            raise ValueError(
                f"{source} ships a {scheduler_class}; Wan pipelines with one of {', '.join(SCHEDULERS)} are supported"
            )
        return dict(cls.component_classes, scheduler=("diffusers", scheduler_class))

    @classmethod
    def load_components(cls, source: str, dtype: torch.dtype, **hub) -> dict:
        """As every family loads, plus the size a directory built by this library records
        (:data:`VIDEO_DEFAULTS_FILE`)."""
        loaded = super().load_components(source, dtype, **hub)
        defaults = Path(source) / VIDEO_DEFAULTS_FILE
        if defaults.is_file():
            loaded["defaults"] = json.loads(defaults.read_text())
        return loaded

    # -- frames and resolution ---------------------------------------------------------------------------

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame (after the first): the VAE's ``scale_factor_temporal`` (4)."""
        return int(self.vae.config.scale_factor_temporal)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    def default_resolution(self) -> tuple[int, int]:
        h, w = self._default_resolution
        return int(h), int(w)

    def check_resolution(self, height: int, width: int) -> None:
        patch = self.transformer.config.patch_size
        step_h, step_w = self.vae_scale_factor * patch[1], self.vae_scale_factor * patch[2]
        if height % step_h or width % step_w or height < step_h or width < step_w:
            raise ValueError(
                f"resolution {height}x{width} is not a positive multiple of {step_h}x{step_w} (the VAE's spatial "
                f"factor {self.vae_scale_factor} times the transformer's patch {patch[1]}x{patch[2]}); e.g. "
                f"{max(step_h, height // step_h * step_h)}x{max(step_w, width // step_w * step_w)}"
            )

    def check_num_frames(self, num_frames: int) -> None:
        """Frames must be ``k * temporal factor + 1`` (the causal VAE encodes the first frame alone)."""
        f = self.temporal_factor
        if (
            isinstance(num_frames, bool)
            or not isinstance(num_frames, int)
            or num_frames < 1
            or (num_frames - 1) % f
        ):
            nearest = (
                max(1, round((int(num_frames) - 1) / f) * f + 1) if isinstance(num_frames, int) else 1 + 4 * f
            )
            raise ValueError(
                f"num_frames must be a multiple of the VAE's temporal factor {f} plus one (1, {f + 1}, {2 * f + 1}, "
                f"..., 81), got {num_frames!r}; e.g. {nearest}"
            )

    def set_num_frames(self, num_frames: int | None) -> None:
        """Sample videos of ``num_frames`` frames; ``None``: the model's default. Takes effect for samplers made
        afterwards."""
        if num_frames is not None:
            self.check_num_frames(num_frames)
        self._num_frames = num_frames

    @property
    def num_frames(self) -> int:
        """Frames of the sampled videos (see :meth:`set_num_frames`)."""
        return self._num_frames if self._num_frames is not None else self._default_num_frames

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // self.temporal_factor + 1

    @property
    def latent_patch(self) -> int:
        return int(self.transformer.config.patch_size[1])

    # -- conditioning ------------------------------------------------------------------------------------

    def _encode_prompts(self, prompts: list[str], negative: bool) -> PromptEmbeds:
        cond, uncond = self.encode_with_pipeline(prompts, None, do_classifier_free_guidance=negative)
        return PromptEmbeds(cond=cond, uncond=uncond if negative else None)

    # -- sampling ----------------------------------------------------------------------------------------

    def make_denoiser(self) -> WanDenoiser:
        return WanDenoiser(
            self.transformer, self.dtype, sample_size=self.latent_size, latent_frames=self.latent_frames
        )

    def flow_scheduler(self):
        """A flow-matching Euler scheduler whose ``set_timesteps`` gives the pipeline's times (itself, or the
        Euler equivalent of UniPC's flow sigmas, shifted by its ``flow_shift``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            return self.scheduler
        config = self.scheduler.config
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.num_train_timesteps,
            shift=config.get("flow_shift", 1.0),
            use_dynamic_shifting=config.get("use_dynamic_shifting", False),
        )

    def schedule_sigmas(self, num_steps: int):
        import numpy as np

        if type(self.scheduler).__name__ == "UniPCMultistepScheduler":
            # UniPC's unshifted flow sigmas (scheduling_unipc_multistep.set_timesteps).
            n = self.scheduler.config.num_train_timesteps
            return np.linspace(1, 1 / n, num_steps + 1)[:-1]
        return None

    def pipeline_timesteps(self, num_steps: int) -> Tensor | None:
        """What the pipeline calls the transformer with, where it differs from ``times * 1000`` (UniPC rounds its
        timesteps down to integers); ``None``: no difference."""
        if type(self.scheduler).__name__ != "UniPCMultistepScheduler":
            return None
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(num_steps)
        return scheduler.timesteps.float().cpu()

    def timestep_spacing_refusal(self) -> str:
        return "is a DDIM option; Wan takes its times from its flow-matching scheduler's shift"

    # -- decoding ----------------------------------------------------------------------------------------

    _decoder_checkpointing = False

    def set_decoder_checkpointing(self, enabled: bool) -> None:
        """Recompute the VAE decode in backward instead of keeping its activations, one latent frame at a time
        (:meth:`_decode_checkpointed`): ``AutoencoderKLWan`` has no block-level gradient checkpointing in
        diffusers. Exact: the VAE is frozen, and each recomputation repeats its frame's forward from the same
        inputs."""
        self._decoder_checkpointing = bool(enabled)

    def _decode_checkpointed(self, z: Tensor) -> Tensor:
        """``AutoencoderKLWan.decode`` (untiled) with each latent frame's decoder call as its own checkpoint, so
        its backward holds one latent frame's activations instead of the whole video's (at 480 x 832 and 33
        frames the whole decode's activations outgrow an 80 GB card).

        The causal decoder carries a feature cache (the last frames of every causal convolution's input) from
        one latent frame to the next and rewrites it in place. Each frame's call therefore starts from a copy
        of the cache it found and returns the new one: a recomputation in backward sees the cache the forward
        saw. Only the caches, a few frames of features per convolution, stay alive between frames.
        """
        vae = self.vae
        x = vae.post_quant_conv(z)
        vae.clear_cache()  # also gives the number of cached convolutions
        cache: list = [None] * len(vae._feat_map)

        def frame(x_i: Tensor, cache_in: list, first: bool) -> tuple[Tensor, list]:
            cache_out = list(cache_in)
            out = vae.decoder(x_i, feat_cache=cache_out, feat_idx=[0], first_chunk=first)
            return out, cache_out

        frames = []
        for i in range(x.shape[2]):
            out, cache = checkpoint(frame, x[:, :, i : i + 1], cache, i == 0, use_reentrant=False)
            frames.append(out)
        vae.clear_cache()
        return torch.cat(frames, 2).clamp(-1.0, 1.0)

    def decode(self, latents: Tensor) -> Tensor:
        """Decode video latents ``(B, 16, f, h, w)`` to videos ``(B, frames, 3, H, W)`` in [0, 1], float32;
        differentiable in the latents. The latents are de-normalised by the VAE's per-channel means and standard
        deviations, as ``WanPipeline`` does."""
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(config.latents_std, device=latents.device).view(shape)
        z = (latents.float() * std + mean).to(self.vae.dtype)
        # Tiling and patched VAEs (Wan 2.2) take diffusers' own decode, checkpointed whole.
        per_frame = not self.vae.use_tiling and self.vae.config.patch_size is None
        if self._decoder_checkpointing and torch.is_grad_enabled() and z.requires_grad:
            if per_frame:
                video = self._decode_checkpointed(z)
            else:
                video = checkpoint(lambda z: self.vae.decode(z, return_dict=False)[0], z, use_reentrant=False)
        else:
            video = self.vae.decode(z, return_dict=False)[0]  # (B, 3, frames, H, W) in [-1, 1]
        return (video.float().permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1)


__all__ = ["WanBackbone", "WanDenoiser"]
