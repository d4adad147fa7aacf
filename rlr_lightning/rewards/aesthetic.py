"""The LAION aesthetic predictor v2: a linear MLP head on L2-normalised CLIP ViT-L/14 image embeddings."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from rlr_lightning.rewards.base import RewardModel
from rlr_lightning.rewards.openclip_loader import encode_image, load_open_clip
from rlr_lightning.rewards.preprocess import CLIPPreprocess
from rlr_lightning.rewards.weights import check_local_file, fetch_url

logger = logging.getLogger(__name__)

#: The head trained on SAC + LOGOS + AVA1 with an MSE loss over OpenAI CLIP ViT-L/14 embeddings.
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/" + AESTHETIC_HEAD_FILE
)


class AestheticHead(nn.Module):
    """The MLP of the LAION aesthetic predictor v2: 768-1024-128-64-16-1, no activations, dropout between.

    Module names follow the original (``layers.0`` ... ``layers.7``), so the published file loads with
    ``load_state_dict(torch.load(path), strict=True)`` and no key renaming.

    Args:
        input_size: Width of the CLIP image embedding (768 for ViT-L/14).
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        """Scores ``(B, 1)`` of L2-normalised embeddings ``(B, input_size)``."""
        return self.layers(embeddings)

    @classmethod
    def from_file(cls, path: str) -> AestheticHead:
        """Load a head from a state-dict file (the published ``.pth``), strictly, with its input width."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        head = cls(input_size=int(state["layers.0.weight"].shape[1]))
        head.load_state_dict(state, strict=True)
        return head


class AestheticReward(RewardModel):
    """LAION aesthetic score (roughly 1 to 10; base SD 1.4 scores about 4.4): the aesthetic predictor v2.

    The image goes through CLIP ViT-L/14 with the OpenAI weights (QuickGELU), the embedding is L2-normalised
    and :class:`AestheticHead` maps it to a score. Differentiable.

    Args:
        head_path: Local copy of the head weights (``sac+logos+ava1-l14-linearMSE.pth``). None: use the
            copy in ``cache_dir``, downloading it from the improved-aesthetic-predictor repository when not
            offline.
        clip_model: open_clip architecture: a built-in name, or the path of a JSON model config (tests use a
            tiny one). The head was trained on ``ViT-L-14`` embeddings.
        clip_pretrained: open_clip pretrained tag of ``clip_model`` or the path of its checkpoint.
        clip_quick_gelu: Use QuickGELU activations, as the OpenAI weights require; keep True unless
            ``clip_pretrained`` is a checkpoint of a GELU model.
        cache_dir: Where the head is cached (default ``$RLR_CACHE/rewards`` or
            ``~/.cache/rlr_lightning/rewards``); the CLIP weights use open_clip's cache.
    """

    def __init__(
        self,
        head_path: str | None = None,
        clip_model: str = "ViT-L-14",
        clip_pretrained: str = "openai",
        clip_quick_gelu: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        # The small head first: a missing file fails before the large CLIP model is built.
        if head_path is not None:
            path = check_local_file(head_path, AESTHETIC_HEAD_URL, "head_path", AESTHETIC_HEAD_FILE)
        else:
            path = fetch_url(AESTHETIC_HEAD_URL, AESTHETIC_HEAD_FILE, "head_path", cache_dir)
        self.head = AestheticHead.from_file(str(path))
        self.clip, _ = load_open_clip(
            clip_model, clip_pretrained, quick_gelu=clip_quick_gelu, pretrained_option="clip_pretrained"
        )
        # open_clip has no types (and torch types the attributes it does not know as Tensor | Module).
        embed_dim = cast(Any, self.clip.visual).output_dim
        if embed_dim != self.head.input_size:
            raise ValueError(
                f"the aesthetic head takes {self.head.input_size}-dimensional embeddings but {clip_model} "
                f"gives {embed_dim}"
            )
        self.preprocess = CLIPPreprocess.from_open_clip(self.clip)
        self.freeze()

    def image_embedding(self, images: Tensor) -> Tensor:
        """The L2-normalised CLIP image embedding the head scores, ``(B, input_size)``."""
        return encode_image(self.clip, self.preprocess(images))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        embeddings = self.image_embedding(images)
        # The head is tiny: run it outside autocast in its own dtype (float32 unless the reward was cast), so
        # bf16 rounding (0.03 at a score of 5) does not add noise to reward differences.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            head_dtype = cast(nn.Linear, self.head.layers[0]).weight.dtype
            return self.head(embeddings.to(head_dtype)).squeeze(-1)
