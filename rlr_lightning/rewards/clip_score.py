"""Image-text similarity rewards on open_clip models: CLIP score and HPSv2 / HPSv2.1."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn

from rlr_lightning.rewards.base import RewardModel
from rlr_lightning.rewards.openclip_loader import encode_image, encode_text, load_open_clip
from rlr_lightning.rewards.preprocess import CLIPPreprocess
from rlr_lightning.rewards.weights import check_local_file, fetch_hub_file

HPS_REPO_ID = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class _OpenCLIPSimilarity(RewardModel):
    """``scale`` times the cosine of each image's features with its own prompt's features (the diagonal)."""

    def _setup(self, clip: nn.Module, tokenizer: Any, scale: float) -> None:
        self.clip = clip
        self.tokenizer = tokenizer
        self.scale = scale
        self.preprocess = CLIPPreprocess.from_open_clip(clip)
        self.freeze()

    def image_embedding(self, images: Tensor) -> Tensor:
        """The L2-normalised open_clip image features compared with the prompt's, ``(B, embed_dim)``."""
        return encode_image(self.clip, self.preprocess(images))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        image_features = self.image_embedding(images)
        text_features = encode_text(self.clip, self.tokenizer, list(prompts), images.device)
        # The cosine in float32 even under bf16 autocast: the features are unit vectors already.
        return self.scale * (image_features.float() * text_features.float()).sum(dim=-1)


class CLIPScoreReward(_OpenCLIPSimilarity):
    """CLIP score: ``scale`` x cosine of the image and prompt embeddings of any open_clip model.

    Convention: ``100 * cos`` by default, torchmetrics' ``CLIPScore`` without its clamp at zero. The clamp
    (``max(cos, 0)``) changes nothing for matching image-prompt pairs, whose cosine is positive, but would
    zero the gradient of a bad start; Hessel et al.'s ``2.5 * max(cos, 0)`` is ``scale=2.5`` on the positive
    side. Differentiable.

    Args:
        clip_model: open_clip architecture: a built-in name (``open_clip.list_models()``),
            ``hf-hub:org/repo``, ``local-dir:/path``, or the path of a JSON model config (tests use a tiny
            one).
        pretrained: open_clip pretrained tag of ``clip_model`` (``"openai"``, ``"laion2b_s32b_b79k"``, ...) or
            the path of a checkpoint file.
        quick_gelu: True forces QuickGELU activations (needed for OpenAI weights loaded from a file). None
            follows the pretrained tag, or the architecture's config for a file.
        scale: Multiplier of the cosine.
        cache_dir: open_clip's download cache (its default when None).
    """

    def __init__(
        self,
        clip_model: str = "ViT-L-14",
        pretrained: str = "openai",
        quick_gelu: bool | None = None,
        scale: float = 100.0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        clip, tokenizer = load_open_clip(clip_model, pretrained, quick_gelu=quick_gelu, cache_dir=cache_dir)
        self._setup(clip, tokenizer, scale)


class HPSv2Reward(_OpenCLIPSimilarity):
    """Human Preference Score v2 or v2.1: cosine of image and prompt on the HPS-tuned open_clip ViT-H/14.

    Scores are cosines (about 0.2 to 0.35; papers often report them x100). Differentiable.

    Args:
        version: ``"v2.0"`` (``HPS_v2_compressed.pt``, used by DDPO/AlignProp-style evaluations) or ``"v2.1"``
            (``HPS_v2.1_compressed.pt``).
        checkpoint_path: Local copy of the HPS checkpoint. None: fetch it from the Hugging Face Hub
            repository ``xswu/HPSv2`` (or its copy in the Hugging Face cache when offline).
        clip_model: open_clip architecture the checkpoint fits: ``ViT-H-14``, or the path of a JSON model
            config (tests use a tiny one).
        cache_dir: Hugging Face cache directory for the checkpoint (the default cache when None).
    """

    def __init__(
        self,
        version: Literal["v2.0", "v2.1"] = "v2.0",
        checkpoint_path: str | None = None,
        clip_model: str = "ViT-H-14",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if version not in HPS_FILES:
            raise ValueError(f"version must be one of {sorted(HPS_FILES)}, got {version!r}")
        filename = HPS_FILES[version]
        if checkpoint_path is not None:
            source = f"the Hugging Face Hub repository {HPS_REPO_ID} (https://huggingface.co/{HPS_REPO_ID})"
            path = check_local_file(checkpoint_path, source, "checkpoint_path", filename)
        else:
            path = fetch_hub_file(HPS_REPO_ID, filename, "checkpoint_path", cache_dir)
        # HPS fine-tunes all of open_clip's ViT-H-14 (GELU, not QuickGELU); its checkpoint holds the full
        # state dict under "state_dict", which open_clip's checkpoint loader reads strictly.
        clip, tokenizer = load_open_clip(
            clip_model, str(path), quick_gelu=False, pretrained_option="checkpoint_path"
        )
        self.version = version
        self._setup(clip, tokenizer, 1.0)
