"""Tiny offline reward backbones for the reward tests, saved to disk and loaded back the production way."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

#: A tiny open_clip architecture (about 1.6 M parameters, almost all in the 49408-token embedding, so the
#: bundled OpenAI BPE tokenizer works unchanged).
TINY_OPEN_CLIP_CFG = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=8, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
)
TINY_CONFIG_NAME = "rlr-test-tiny-clip"

#: Where the real LAION aesthetic head lives, next to the repository.
REAL_AESTHETIC_HEAD = (
    Path(__file__).parents[2]
    / ".."
    / "shared"
    / "data"
    / "laion-aesthetic-mlp-sac-logos-ava1-l14-linearMSE.pth"
)


def save_tiny_open_clip(directory: Path, seed: int = 0) -> dict[str, str]:
    """Save a tiny random open_clip model as a JSON config plus checkpoints in two formats.

    Returns the paths: ``config`` (JSON model config), ``checkpoint`` (a plain state dict, as open_clip saves
    it) and ``hps_checkpoint`` (the HPS training format: ``{"state_dict": ...}`` with DDP ``module.`` keys).
    """
    import open_clip

    directory.mkdir(parents=True, exist_ok=True)
    config = directory / f"{TINY_CONFIG_NAME}.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    torch.manual_seed(seed)
    state = open_clip.CLIP(**TINY_OPEN_CLIP_CFG).state_dict()
    checkpoint, hps_checkpoint = directory / "tiny_clip.pt", directory / "tiny_hps.pt"
    torch.save(state, checkpoint)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, hps_checkpoint)
    return {"config": str(config), "checkpoint": str(checkpoint), "hps_checkpoint": str(hps_checkpoint)}


def save_tiny_aesthetic_head(path: Path, input_size: int = 16, seed: int = 0) -> str:
    """Save a random :class:`AestheticHead` of the given input width as a plain state dict."""
    from rlr_lightning.rewards import AestheticHead

    torch.manual_seed(seed)
    torch.save(AestheticHead(input_size).state_dict(), path)
    return str(path)


def save_tiny_pickscore(directory: Path, seed: int = 0) -> str:
    """Save a tiny transformers CLIPModel and its CLIPProcessor (tiny tokenizer, 32-px images) together."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from rlr_lightning.tiny import tiny_clip_tokenizer

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=514,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=2,
            num_hidden_layers=1,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=2,
            num_hidden_layers=1,
        ),
        projection_dim=16,
        logit_scale_init_value=4.6052,  # exp = 100, PickScore's scale
    )
    CLIPModel(config).save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_clip_tokenizer()).save_pretrained(directory)
    return str(directory)


def smooth_uint8_image(height: int, width: int, seed: int = 0, noise: float = 0.3) -> torch.Tensor:
    """A ``(1, 3, H, W)`` uint8 image: a smooth random colour field plus uniform noise of size ``noise``."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 8, generator=gen)
    x = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    x = (x + noise * torch.rand(1, 3, height, width, generator=gen)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


def to_pil(image_uint8: torch.Tensor):
    """The PIL image of one ``(3, H, W)`` uint8 tensor."""
    from PIL import Image

    return Image.fromarray(image_uint8.permute(1, 2, 0).numpy())
