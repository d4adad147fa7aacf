"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet conditioned on its token sequence, DDIM."""

from __future__ import annotations

import torch

from rlr_lightning.models.base import DiffusionBackbone
from rlr_lightning.sampling import PromptEmbeds


class StableDiffusionBackbone(DiffusionBackbone):
    """A frozen Stable Diffusion 1.x / 2.x pipeline (``StableDiffusionPipeline``) with LoRA on its UNet.

    Its components: ``unet`` (``UNet2DConditionModel``), ``vae`` (``AutoencoderKL``), ``text_encoder``
    (``CLIPTextModel``), ``tokenizer`` (``CLIPTokenizer``) and ``scheduler`` (any of the family's schedulers,
    sampled as DDIM). The negative prompt is the empty prompt, as in ``StableDiffusionPipeline``.
    """

    component_classes = {
        "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        # Any Stable Diffusion scheduler config (their repositories ship PNDM), read as DDIM.
        "scheduler": ("diffusers", "DDIMScheduler"),
    }
    pipeline_class_name = "StableDiffusionPipeline"
    networks = ("unet", "vae", "text_encoder")

    def _token_sequence(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids, return_dict=False)[0]

    def _encode_prompts(self, prompts: list[str], negative: bool) -> PromptEmbeds:
        cond = self._token_sequence(prompts)
        uncond = self._token_sequence([""]).expand_as(cond).contiguous() if negative else None
        return PromptEmbeds(cond=cond, uncond=uncond)
