"""PickScore: a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human preferences, through transformers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from rlr_lightning.rewards.base import RewardModel
from rlr_lightning.rewards.preprocess import CLIPPreprocess
from rlr_lightning.rewards.weights import MissingRewardWeightsError

logger = logging.getLogger(__name__)


def _features(output: Any) -> Tensor:
    """The projected embedding from ``get_image_features``/``get_text_features``.

    transformers 4 returns the tensor; transformers 5 returns a ``ModelOutput`` with it in ``pooler_output``.
    """
    if isinstance(output, Tensor):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise TypeError(f"cannot find the projected features in {type(output).__name__}")


def _from_pretrained(cls: Any, source: str, option: str, cache_dir: str | None, what: str) -> Any:
    """``cls.from_pretrained(source)``, raising :class:`MissingRewardWeightsError` for missing files."""
    local = Path(source).expanduser()
    example = "/path/to/a/directory/saved/with/save_pretrained"
    if source.startswith(("/", ".", "~")) or local.exists():
        if not local.is_dir():
            raise MissingRewardWeightsError(
                what,
                f"the local directory {source}",
                option,
                reason=f"no directory at {local}",
                example=example,
            )
        return cls.from_pretrained(str(local), local_files_only=True)
    try:
        return cls.from_pretrained(source, cache_dir=cache_dir)
    except OSError as err:  # transformers' way of saying "not in the cache and not downloadable"
        raise MissingRewardWeightsError(
            what,
            f"the Hugging Face Hub repository {source} (https://huggingface.co/{source})",
            option,
            reason=f"{type(err).__name__}: {err}",
            example=example,
        ) from err


class PickScoreReward(RewardModel):
    """PickScore v1: ``logit_scale.exp() * cos`` of each image with its own prompt (about 16 to 23 for SD).

    Loaded with transformers ``CLIPModel`` / ``CLIPProcessor``; preprocessing follows the processor's
    ``CLIPImageProcessor`` configuration, differentiably. Differentiable.

    Args:
        model_name_or_path: Hugging Face Hub id, or local directory saved with ``save_pretrained``, of the
            ``CLIPModel``.
        processor_name_or_path: Hub id or local directory of the ``CLIPProcessor`` (tokenizer and image
            processor). PickScore uses the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
        cache_dir: Hugging Face cache directory (the default cache when None).
    """

    def __init__(
        self,
        model_name_or_path: str = "yuvalkirstain/PickScore_v1",
        processor_name_or_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor

        logger.info(
            "Loading PickScore model %s with processor %s", model_name_or_path, processor_name_or_path
        )
        # The small processor first, so a missing model directory fails before any weights are read.
        clip_processor = _from_pretrained(
            CLIPProcessor,
            processor_name_or_path,
            "processor_name_or_path",
            cache_dir,
            "preprocessor_config.json and tokenizer files",
        )
        self.clip = _from_pretrained(
            CLIPModel, model_name_or_path, "model_name_or_path", cache_dir, "config.json and model weights"
        )
        self.tokenizer = clip_processor.tokenizer
        self.preprocess = CLIPPreprocess.from_image_processor(clip_processor.image_processor)
        self.max_length = min(77, int(self.clip.config.text_config.max_position_embeddings))
        self.freeze()

    def image_embedding(self, images: Tensor) -> Tensor:
        """The projected CLIP image features (``get_image_features``, not normalised), ``(B, projection_dim)``."""
        dtype = next(self.clip.parameters()).dtype
        pixels = self.preprocess(images).to(dtype)
        return _features(self.clip.get_image_features(pixel_values=pixels))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        image_features = self.image_embedding(images)
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(images.device)
        text_features = _features(self.clip.get_text_features(**tokens))
        # Normalise and compare in float32 even under bf16 autocast (scores of ~20 with bf16 resolution 0.1).
        image_features = image_features.float() / image_features.float().norm(dim=-1, keepdim=True)
        text_features = text_features.float() / text_features.float().norm(dim=-1, keepdim=True)
        cosine = (image_features * text_features).sum(dim=-1)
        return self.clip.logit_scale.float().exp() * cosine
