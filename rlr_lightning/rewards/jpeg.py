"""JPEG file size rewards (DDPO's compressibility tasks): non-differentiable by nature."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from torch import Tensor

from rlr_lightning.rewards.base import RewardModel


def jpeg_size_kb(images: Tensor, quality: int) -> Tensor:
    """Size in kB (1000 bytes) of each image ``(B, 3, H, W)`` in [0, 1], saved by PIL as JPEG at ``quality``.

    Pixels are rounded to uint8 first, as DDPO's compressibility reward does.
    """
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class _JpegSize(RewardModel):
    differentiable = False
    _sign = 1.0

    def __init__(self, quality: int = 95) -> None:
        super().__init__()
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        self.quality = quality

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self._sign * jpeg_size_kb(images, self.quality)

    def extra_repr(self) -> str:
        return f"quality={self.quality}"


class JpegCompressibility(_JpegSize):
    """Minus the JPEG size in kB: rewards images that compress well (flat, simple). Not differentiable.

    Args:
        quality: JPEG quality (1 to 100) of the encoding whose size is measured.
    """

    _sign = -1.0


class JpegIncompressibility(_JpegSize):
    """The JPEG size in kB: rewards images that compress badly (detailed, textured). Not differentiable.

    Args:
        quality: JPEG quality (1 to 100) of the encoding whose size is measured.
    """

    _sign = 1.0
