"""Stable Diffusion 3 / 3.5: an MMDiT transformer, three text encoders, rectified flow sampled as an SDE.

The conditioning is ``StableDiffusion3Pipeline.encode_prompt``'s own (a pipeline object assembled from the
backbone's components), so it equals diffusers' by construction: the token sequence is both CLIP encoders'
penultimate hidden states side by side, zero-padded to T5's width, followed by T5's sequence; the pooled
projection is both CLIP encoders' projected outputs side by side. The negative branch of classifier-free
guidance is the encoded empty prompt (SD 3 has no zeroed negatives).

Sampling follows the flow-matching Euler scheduler's timesteps (with its time shift, 3 for SD 3 / 3.5) through
the stochastic kernel :class:`~rlr_lightning.sampling.kernels.FlowMatchSDE`, whose noise level ``0`` is the
scheduler's own deterministic sampler.
"""

from __future__ import annotations

from torch import Tensor

from rlr_lightning.models.flow import FlowMatchingBackbone
from rlr_lightning.sampling import Denoiser, PromptEmbeds


class SD3Denoiser(Denoiser):
    """A diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5).

    Called as ``transformer(hidden_states=x, timestep=t, encoder_hidden_states=context,
    pooled_projections=added["pooled_projections"], return_dict=False)[0]`` with the scheduler's timesteps
    (``t * 1000``), as ``StableDiffusion3Pipeline`` calls it; it predicts the flow velocity of ``(B, C, h, w)``
    latents (the transformer patches them itself).
    """

    def inputs(self, latents, timesteps, context, added):
        if "pooled_projections" not in added:
            raise ValueError(
                f"the SD 3 transformer needs the pooled text projections (added conditioning 'pooled_projections'), "
                f"got {sorted(added)}; encode the prompts with the SD 3 backbone"
            )
        kwargs = {
            "hidden_states": latents.to(self.dtype),
            "timestep": timesteps,
            "encoder_hidden_states": context.to(self.dtype),
            "pooled_projections": added["pooled_projections"].to(self.dtype),
            "return_dict": False,
        }
        return (), kwargs

    def output(self, result) -> Tensor:
        return result[0]


class StableDiffusion3Backbone(FlowMatchingBackbone):
    """A frozen SD 3 / 3.5 pipeline (``StableDiffusion3Pipeline``) with LoRA on its transformer.

    Its components: ``transformer`` (``SD3Transformer2DModel``; SD 3.5's dual attention layers and query/key
    norm included), ``vae`` (16 latent channels, with a latent shift), ``text_encoder`` and ``text_encoder_2``
    (``CLIPTextModelWithProjection``: CLIP-L and CLIP-G), ``text_encoder_3`` (``T5EncoderModel``), their tokenizers
    ``tokenizer``, ``tokenizer_2`` and ``tokenizer_3``, and ``scheduler`` (``FlowMatchEulerDiscreteScheduler``).

    Sampling is the flow SDE (:class:`~rlr_lightning.sampling.kernels.FlowMatchSDE`) on the scheduler's
    timesteps: the ``eta`` of :meth:`make_sampler` (``model.eta`` of ``RLRModule``) is the SDE's noise level,
    Flow-GRPO's ``a`` (DanceGRPO's eta): 0 is the scheduler's deterministic sampler, and likelihood-ratio
    estimators need it above 0 (Flow-GRPO trains with 0.7). The default resolution is the transformer's
    ``sample_size`` times the VAE's scale (1024 x 1024 for SD 3 / 3.5 medium and large).

    The default LoRA targets (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) adapt the attention projections of the
    image stream (and SD 3.5's second image attention); Flow-GRPO also adapts the text stream's, with the targets
    ``to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out``.

    Args:
        max_sequence_length: T5 tokens per prompt (prompts are padded or cut to it), as
            ``StableDiffusion3Pipeline``'s argument of that name; at most 512. ``None``: the pipeline's default,
            256, or the T5 tokenizer's own limit where that is smaller (the tiny test model's).
        components: As for :class:`~rlr_lightning.models.base.DiffusionBackbone`.
    """

    component_classes = {
        "transformer": ("diffusers", "SD3Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_3": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "tokenizer_3": ("transformers", "T5TokenizerFast"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    }
    pipeline_class_name = "StableDiffusion3Pipeline"
    networks = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    t5_tokenizer = "tokenizer_3"
    default_max_sequence_length = 256
    truncation_loggers = (
        "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
        *FlowMatchingBackbone.truncation_loggers,
    )

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer, self.tokenizer_2, self.tokenizer_3)

    # -- resolution ----------------------------------------------------------------------------------------

    def check_resolution(self, height: int, width: int) -> None:
        """Each latent side a multiple of the transformer's patch size, and within its position embeddings."""
        super().check_resolution(height, width)
        config = self.transformer.config
        patch, scale = config.patch_size, self.vae_scale_factor
        if height % (scale * patch) or width % (scale * patch):
            raise ValueError(
                f"resolution {height}x{width} is not a multiple of {scale * patch} on each side (the VAE's scale "
                f"{scale} times the transformer's patch size {patch})"
            )
        limit = config.pos_embed_max_size
        if limit is not None and max(height, width) > limit * patch * scale:
            raise ValueError(
                f"resolution {height}x{width} exceeds the transformer's position embeddings: at most "
                f"{limit * patch * scale} pixels a side ({limit} patches of {patch * scale} pixels)"
            )

    # -- conditioning --------------------------------------------------------------------------------------

    def _encode_prompts(self, prompts: list[str], negative: bool) -> PromptEmbeds:
        cond, uncond, pooled, uncond_pooled = self.encode_with_pipeline(
            prompts, None, None, do_classifier_free_guidance=negative
        )
        if not negative:
            return PromptEmbeds(cond=cond, added={"pooled_projections": pooled})
        return PromptEmbeds(
            cond=cond,
            uncond=uncond,
            added={"pooled_projections": pooled},
            uncond_added={"pooled_projections": uncond_pooled},
        )

    # -- sampling ------------------------------------------------------------------------------------------

    def make_denoiser(self) -> SD3Denoiser:
        return SD3Denoiser(self.transformer, self.dtype, sample_size=self.latent_size)

    @property
    def latent_patch(self) -> int:
        return self.transformer.config.patch_size

    def timestep_spacing_refusal(self) -> str:
        return (
            f"is a DDIM option; Stable Diffusion 3 takes its times from its flow-matching scheduler (shift "
            f"{self.scheduler.config.get('shift', 1.0):g})"
        )


__all__ = ["SD3Denoiser", "StableDiffusion3Backbone"]
