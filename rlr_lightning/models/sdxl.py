"""Stable Diffusion XL: two CLIP text encoders, pooled text embeddings and size/crop time ids, DDIM.

The conditioning follows ``StableDiffusionXLPipeline`` exactly (what the tests compare against): the token
sequence is the penultimate hidden states of both text encoders side by side, the pooled embedding is the
second encoder's projected output, and the added time ids are ``(height, width, 0, 0, height, width)`` of the
generated image (no crop, original size = target size). The negative branch is zeros when the pipeline says
``force_zeros_for_empty_prompt`` (SDXL base does), else the encoded empty prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlr_lightning.hub import read_model_index
from rlr_lightning.models.base import DiffusionBackbone
from rlr_lightning.sampling import PromptEmbeds


class StableDiffusionXLBackbone(DiffusionBackbone):
    """A frozen SDXL pipeline (``StableDiffusionXLPipeline``) with LoRA on its UNet.

    Its components: ``unet`` (``UNet2DConditionModel`` with ``text_time`` added conditioning), ``vae``,
    ``text_encoder`` (``CLIPTextModel``), ``text_encoder_2`` (``CLIPTextModelWithProjection``), ``tokenizer``,
    ``tokenizer_2`` and ``scheduler`` (sampled as DDIM).

    Args:
        force_zeros_for_empty_prompt: The negative branch is all zeros (the pipeline's own setting, read from
            its ``model_index.json`` by :meth:`from_pretrained`).
        components: As for :class:`~rlr_lightning.models.base.DiffusionBackbone`.
    """

    component_classes = {
        "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        # SDXL repositories ship an Euler scheduler config; its training schedule is read as DDIM.
        "scheduler": ("diffusers", "DDIMScheduler"),
    }
    pipeline_class_name = "StableDiffusionXLPipeline"
    networks = ("unet", "vae", "text_encoder", "text_encoder_2")
    # Components beyond the ones every family has (see DiffusionBackbone).
    unet: Any
    text_encoder_2: Any
    tokenizer_2: Any

    def __init__(
        self, dtype: torch.dtype = torch.float32, force_zeros_for_empty_prompt: bool = True, **components
    ) -> None:
        super().__init__(dtype=dtype, **components)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self._check_added_conditioning()

    @classmethod
    def load_components(cls, source: str, dtype: torch.dtype, **hub) -> dict:
        index = read_model_index(source, hub["revision"], hub["cache_dir"], hub["local_files_only"])
        return {
            **super().load_components(source, dtype, **hub),
            "force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True),
        }

    def network_dtype(self, name: str) -> torch.dtype:
        # SDXL's VAE overflows in float16 (its config says force_upcast); the pipeline decodes it in float32.
        if name == "vae" and self.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            return torch.float32
        return self.dtype

    def _check_added_conditioning(self) -> None:
        """The UNet's added embedding must take 6 time ids and the second encoder's pooled projection."""
        config = self.unet.config
        if config.addition_embed_type != "text_time":
            raise ValueError(
                f"this UNet has addition_embed_type={config.addition_embed_type!r}; an SDXL base UNet has 'text_time'"
            )
        expected = self.unet.add_embedding.linear_1.in_features
        given = config.addition_time_embed_dim * 6 + self.text_encoder_2.config.projection_dim
        if expected != given:
            raise ValueError(
                f"the UNet's added embedding takes {expected} features, but 6 time ids and the pooled text embedding "
                f"make {given}; refiner-style UNets (aesthetic-score time ids) are not supported"
            )

    @property
    def tokenizers(self) -> tuple:
        return (self.tokenizer, self.tokenizer_2)

    def _sequence_and_pooled(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        sequences = []
        pooled = None
        for tokenizer, encoder in (
            (self.tokenizer, self.text_encoder),
            (self.tokenizer_2, self.text_encoder_2),
        ):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            if out[0].dim() == 2:  # the projected pooled output (text_encoder_2)
                pooled = out[0]
            sequences.append(out.hidden_states[-2])
        assert pooled is not None  # text_encoder_2 (CLIPTextModelWithProjection) returns its projection first
        return torch.cat(sequences, dim=-1), pooled

    def time_ids(self, batch_size: int, dtype: torch.dtype) -> Tensor:
        """``(original size, crop top-left, target size)`` of each sample: ``(h, w, 0, 0, h, w)``."""
        h, w = self.resolution
        return (
            torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=self.device)
            .expand(batch_size, 6)
            .contiguous()
        )

    def _encode_prompts(self, prompts: list[str], negative: bool) -> PromptEmbeds:
        cond, pooled = self._sequence_and_pooled(prompts)
        B = cond.shape[0]
        time_ids = self.time_ids(B, cond.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        if not negative:
            return PromptEmbeds(cond=cond, added=added)
        if self.force_zeros_for_empty_prompt:
            uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(pooled)
        else:
            uncond, uncond_pooled = self._sequence_and_pooled([""])
            uncond, uncond_pooled = (
                uncond.expand_as(cond).contiguous(),
                uncond_pooled.expand_as(pooled).contiguous(),
            )
        return PromptEmbeds(
            cond=cond,
            uncond=uncond,
            added=added,
            uncond_added={"text_embeds": uncond_pooled, "time_ids": time_ids},
        )
