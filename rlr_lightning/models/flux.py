"""FLUX.1: a rectified-flow transformer over 2x2-packed latents, T5 and CLIP conditioning, a guidance embedding.

Everything follows ``FluxPipeline`` (what the tests compare against). The conditioning is the pipeline's own
``encode_prompt``: T5's token sequence and CLIP's pooled embedding (``pooled_projections``). Sampling runs the
flow SDE kernel (:class:`~rlr_lightning.sampling.kernels.FlowMatchSDE`) on the pipeline's timesteps: ``sigmas =
linspace(1, 1 / T, T)`` shifted by ``mu``, which grows with the image's token count. FLUX.1-dev is
guidance-distilled: it takes no classifier-free guidance, and the guidance scale is an input of the transformer
(its guidance embedding), so every step is one transformer call. FLUX.1-schnell has no guidance embedding.

The sampler keeps latents unpacked, ``(B, 16, h, w)``, as every family does; :class:`FluxDenoiser` packs them into
the transformer's ``(B, h w / 4, 64)`` token sequence and unpacks its prediction, so ``h`` and ``w`` must be even.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rlr_lightning.models.flow import FlowMatchingBackbone
from rlr_lightning.sampling import Denoiser, DiffusionSampler, PromptEmbeds
from rlr_lightning.sampling.kernels import FlowMatchSDE


class FluxDenoiser(Denoiser):
    """A diffusers ``FluxTransformer2DModel`` called as ``FluxPipeline`` calls it, on unpacked latents.

    Latents ``(B, C, h, w)`` are packed into 2x2 patches (``FluxPipeline._pack_latents``) with their position ids,
    the text tokens get zero position ids, the time is the kernel's timestep divided by 1000 (the transformer takes
    the flow time ``t``), and the prediction (the velocity) is unpacked to ``(B, C, h, w)``.

    Args:
        module: The transformer (LoRA or not).
        dtype: Dtype of the transformer's inputs (its frozen weights'); defaults to its first parameter's.
        sample_size: Latent height and width ``(h, w)``, both even.
        guidance: The value of the guidance embedding (FLUX.1-dev's guidance scale); required exactly when the
            transformer has one (``guidance_embeds`` in its config).
    """

    sample_size: tuple[int, int]  # required here: __init__ refuses None

    def __init__(
        self,
        module: nn.Module,
        dtype: torch.dtype | None = None,
        sample_size: tuple[int, int] | None = None,
        guidance: float | None = None,
    ) -> None:
        super().__init__(module, dtype, sample_size)
        if self.sample_size is None:
            raise ValueError(
                "FluxDenoiser needs sample_size, the latent (height, width): the transformer has none"
            )
        h, w = self.sample_size
        if h % 2 or w % 2 or h < 2 or w < 2:
            raise ValueError(
                f"FLUX packs latents in 2x2 patches: latent height and width must be even, got {h}x{w}"
            )
        config: Any = module.config  # a diffusers model's config: read by attribute
        embeds_guidance = bool(getattr(config, "guidance_embeds", False))
        if embeds_guidance and guidance is None:
            raise ValueError(
                "this FLUX transformer is guidance-distilled (guidance_embeds): give its guidance value"
            )
        if not embeds_guidance and guidance is not None:
            raise ValueError(
                f"this FLUX transformer has no guidance embedding; it takes no guidance, got {guidance}"
            )
        self.guidance = None if guidance is None else float(guidance)
        self.latent_channels = config.in_channels // 4

    def inputs(self, latents, timesteps, context, added):
        from diffusers import FluxPipeline

        B, C, h, w = latents.shape
        if (h, w) != self.sample_size:
            raise ValueError(
                f"latents are {h}x{w}, but this denoiser samples {'x'.join(map(str, self.sample_size))}"
            )
        device = latents.device
        kwargs = {
            "hidden_states": FluxPipeline._pack_latents(latents.to(self.dtype), B, C, h, w),
            # As the pipeline does it: the timestep in the latents' dtype, then the flow time t = timestep / 1000.
            "timestep": timesteps.to(self.dtype) / 1000,
            "pooled_projections": added["pooled_projections"].to(self.dtype),
            "encoder_hidden_states": context.to(self.dtype),
            "txt_ids": torch.zeros(context.shape[1], 3, device=device, dtype=self.dtype),
            "img_ids": FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, device, self.dtype),
            "return_dict": False,
        }
        if self.guidance is not None:
            kwargs["guidance"] = torch.full((B,), self.guidance, device=device, dtype=torch.float32)
        return (), kwargs

    def output(self, result) -> Tensor:
        from diffusers import FluxPipeline

        h, w = self.sample_size
        # vae_scale_factor=1: the "height" and "width" given are the latent's own.
        return FluxPipeline._unpack_latents(result[0], h, w, vae_scale_factor=1)

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.latent_channels, *self.sample_size)


class FluxBackbone(FlowMatchingBackbone):
    """A frozen FLUX.1 pipeline (``FluxPipeline``: FLUX.1-dev, FLUX.1-schnell) with LoRA on its transformer.

    Its components: ``transformer`` (``FluxTransformer2DModel``), ``vae`` (``AutoencoderKL``, 16 latent channels,
    with a scaling and a shift factor), ``text_encoder`` (``CLIPTextModel``, its pooled output only),
    ``text_encoder_2`` (``T5EncoderModel``, the token sequence), ``tokenizer``, ``tokenizer_2`` and ``scheduler``
    (``FlowMatchEulerDiscreteScheduler``, shifted by the image resolution).

    Sampling (:meth:`make_sampler`) is Flow-GRPO's SDE on the pipeline's timesteps: ``eta`` is the SDE's noise
    level ``a`` (Flow-GRPO's and DanceGRPO's eta; 0 is the pipeline's deterministic sampler, Flow-GRPO trains with
    0.7). ``guidance_scale`` is the guidance embedding's value for FLUX.1-dev (3.5 in its pipeline), in one
    transformer call per step; FLUX.1-schnell takes none (``guidance_scale`` must be 1). The default resolution is
    the VAE's ``sample_size`` (1024 for FLUX.1); each side must be a multiple of twice the VAE's scale (16 pixels).

    Prompts are encoded by ``FluxPipeline.encode_prompt``, with T5 reading up to ``max_sequence_length`` tokens
    (``tokenizer_2``'s limit, at most 512, the pipeline's default).

    Args:
        max_sequence_length: T5 tokens per prompt (prompts are padded or cut to it), as ``FluxPipeline``'s argument
            of that name; at most 512. ``None``: the pipeline's default, 512, or the T5 tokenizer's own limit where
            that is smaller (the tiny test model's).
        components: As for :class:`~rlr_lightning.models.base.DiffusionBackbone`.
    """

    component_classes = {
        "transformer": ("diffusers", "FluxTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "T5TokenizerFast"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    }
    pipeline_class_name = "FluxPipeline"
    networks = ("transformer", "vae", "text_encoder", "text_encoder_2")
    t5_tokenizer = "tokenizer_2"
    truncation_loggers = ("diffusers.pipelines.flux.pipeline_flux", *FlowMatchingBackbone.truncation_loggers)

    @property
    def guidance_distilled(self) -> bool:
        """The transformer takes the guidance scale as an input (FLUX.1-dev), instead of no guidance at all."""
        return bool(self.transformer.config.guidance_embeds)

    @property
    def tokenizers(self) -> tuple:
        # T5's sequence is what the transformer attends to; CLIP gives only the pooled embedding.
        return (self.tokenizer_2, self.tokenizer)

    # -- resolution --------------------------------------------------------------------------------------

    def default_resolution(self) -> tuple[int, int]:
        size = self.vae.config.sample_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def check_resolution(self, height: int, width: int) -> None:
        step = 2 * self.vae_scale_factor
        if height % step or width % step or height < step or width < step:
            raise ValueError(
                f"FLUX packs its latents in 2x2 patches: each side of the resolution must be a positive multiple of "
                f"{step} pixels, got {height}x{width} (e.g. {max(step, height // step * step)}x"
                f"{max(step, width // step * step)})"
            )

    # -- conditioning ------------------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        sequence, pooled, _ = self.encode_with_pipeline(prompts)
        return sequence, pooled

    def _encode_prompts(self, prompts: list[str], negative: bool) -> PromptEmbeds:
        sequence, pooled = self._encode(prompts)
        added = {"pooled_projections": pooled}
        if not negative:
            return PromptEmbeds(cond=sequence, added=added)
        # FLUX samples without classifier-free guidance; the negative branch is the empty prompt, as in the
        # pipeline's optional "true CFG".
        uncond, uncond_pooled = (
            x.expand(len(prompts), *x.shape[1:]).contiguous() for x in self._encode([""])
        )
        return PromptEmbeds(
            cond=sequence, uncond=uncond, added=added, uncond_added={"pooled_projections": uncond_pooled}
        )

    # -- sampling ----------------------------------------------------------------------------------------

    def make_denoiser(self, guidance_scale: float = 1.0) -> FluxDenoiser:
        """The transformer's call at this backbone's resolution, with the guidance embedding's value."""
        if self.guidance_distilled:
            if not guidance_scale > 0:
                raise ValueError(
                    f"FLUX.1-dev's guidance scale is the value of its guidance embedding and must be > 0 (its "
                    f"pipeline uses 3.5), got {guidance_scale!r}"
                )
            guidance = float(guidance_scale)
        else:
            if guidance_scale != 1:
                raise ValueError(
                    f"this FLUX transformer has no guidance embedding (FLUX.1-schnell is not guidance-distilled) and "
                    f"samples without guidance: guidance_scale must be 1, got {guidance_scale!r}"
                )
            guidance = None
        return FluxDenoiser(self.transformer, self.dtype, sample_size=self.latent_size, guidance=guidance)

    def schedule_sigmas(self, num_steps: int):
        import numpy as np

        # The pipeline's times before the shift, unless the scheduler makes its own (use_flow_sigmas).
        if self.scheduler.config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / num_steps, num_steps)

    def timestep_spacing_refusal(self) -> str:
        return (
            "applies to DDIM only; FLUX takes its timesteps from its scheduler's resolution-dependent shift"
        )

    def sampler_over(self, kernel: FlowMatchSDE, guidance_scale: float) -> DiffusionSampler:
        # Guidance-distilled: the guidance scale is the denoiser's embedding input, one call per step, no CFG.
        return DiffusionSampler(self.make_denoiser(guidance_scale), kernel, guidance_scale=1.0)
