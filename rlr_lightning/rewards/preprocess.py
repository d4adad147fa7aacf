"""Differentiable CLIP-style image preprocessing: resize, centre crop and normalise, all in torch.

The reference preprocessing of CLIP models (open_clip's ``preprocess``, transformers' ``CLIPImageProcessor``)
goes through PIL or uint8 tensors and so cuts the gradient from the reward to the image. This module does
the same operations on float tensors with the same geometry (output size of the resize, crop offsets) and
the same kernel (torch's antialiased bicubic is a port of PIL's), reading every setting from the model's
own configuration, so rewards stay differentiable and see what their model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The normalisation of OpenAI CLIP, also open_clip's default.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resampling codes, as transformers image processors store them.
_PIL_RESAMPLE: dict[int, Literal["nearest", "bilinear", "bicubic"]] = {
    0: "nearest",
    2: "bilinear",
    3: "bicubic",
}


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"expected one size or (height, width), got {size}")
    return size


class CLIPPreprocess(nn.Module):
    """Resize, centre-crop and normalise images in [0, 1], differentiably, with no PIL round trip.

    Build it from a model's own configuration with :meth:`from_open_clip` or :meth:`from_image_processor`
    rather than by hand.

    Args:
        crop_size: Output (height, width) after the centre crop.
        mean: Per-channel mean of the normalisation.
        std: Per-channel standard deviation of the normalisation.
        resize: An int resizes the shortest side to it and keeps the aspect ratio (the long side is
            truncated, as torchvision's ``Resize(int)`` and transformers' ``shortest_edge`` do); a pair
            resizes to exactly (height, width) ("squash"); None scales the image by the smallest factor that
            covers ``crop_size``, rounding (open_clip's resize for non-square targets).
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``; bicubic and bilinear are antialiased.
        crop_rounding: How an odd margin is split: ``"round"`` (torchvision's ``CenterCrop``, used by
            open_clip) or ``"floor"`` (transformers' image processors).
        clamp: Clamp the resized image to [0, 1] as the uint8 reference pipelines do (bicubic overshoots);
            the gradient of clamped pixels is zero.
    """

    # Buffers (registered in __init__).
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        crop_size: int | tuple[int, int] = 224,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        resize: int | tuple[int, int] | None = 224,
        interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic",
        crop_rounding: Literal["round", "floor"] = "round",
        clamp: bool = True,
    ) -> None:
        super().__init__()
        if interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"unsupported interpolation {interpolation!r}")
        if crop_rounding not in ("round", "floor"):
            raise ValueError(f"crop_rounding must be 'round' or 'floor', got {crop_rounding!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std must have three values, got {mean} and {std}")
        self.crop_size = _pair(crop_size)
        self.resize = resize if resize is None or isinstance(resize, int) else _pair(resize)
        self.interpolation = interpolation
        self.crop_rounding = crop_rounding
        self.clamp = clamp
        # Constants are buffers so they follow the reward across devices; not persistent, so they never
        # enter a state dict (they come from the model's configuration).
        for name, value in (("mean", mean), ("std", std)):
            buffer = torch.tensor(value, dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer(name, buffer, persistent=False)

    @classmethod
    def from_open_clip(cls, model: nn.Module) -> CLIPPreprocess:
        """The preprocessing of open_clip's ``preprocess`` transform (evaluation mode) for ``model``.

        Reads ``model.visual.preprocess_cfg`` (set by ``open_clip.create_model``); falls back to
        ``model.visual.image_size`` / ``image_mean`` / ``image_std`` and open_clip's defaults for a model
        constructed directly.
        """
        visual = model.visual
        cfg: dict[str, Any] = dict(getattr(visual, "preprocess_cfg", None) or {})
        size = _pair(cfg.get("size", getattr(visual, "image_size", 224)))
        mean = cfg.get("mean") or getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN
        std = cfg.get("std") or getattr(visual, "image_std", None) or OPENAI_CLIP_STD
        interpolation = cfg.get("interpolation", "bicubic")
        resize_mode = cfg.get("resize_mode", "shortest")
        if resize_mode == "squash":
            resize: int | tuple[int, int] | None = size
        elif resize_mode == "shortest":
            # open_clip uses Resize(int) for square targets and ResizeKeepRatio otherwise.
            resize = size[0] if size[0] == size[1] else None
        else:
            raise ValueError(f"unsupported open_clip resize_mode {resize_mode!r} ('shortest', 'squash' are)")
        return cls(size, mean, std, resize=resize, interpolation=interpolation, crop_rounding="round")

    @classmethod
    def from_image_processor(cls, processor: Any) -> CLIPPreprocess:
        """The preprocessing of a transformers ``CLIPImageProcessor`` (read from its configuration)."""

        def get(cfg: Any, key: str) -> Any:
            if cfg is None:
                return None
            return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)

        size, crop = processor.size, getattr(processor, "crop_size", None)
        if not getattr(processor, "do_resize", True):
            raise ValueError("image processors without resize are not supported (images of varying size)")
        resize: int | tuple[int, int]
        if get(size, "shortest_edge"):
            resize = int(get(size, "shortest_edge"))
        elif get(size, "height") and get(size, "width"):
            resize = (int(get(size, "height")), int(get(size, "width")))
        else:
            raise ValueError(f"unsupported image processor size {size!r}")
        if getattr(processor, "do_center_crop", True) and crop is not None:
            crop_size = (int(get(crop, "height")), int(get(crop, "width")))
        elif isinstance(resize, tuple):
            crop_size = resize
        else:
            raise ValueError("an image processor without centre crop gives images of varying size")
        if getattr(processor, "do_normalize", True):
            mean, std = processor.image_mean, processor.image_std
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        resample = getattr(processor, "resample", 3)
        interpolation = _PIL_RESAMPLE.get(int(resample), None)
        if interpolation is None:
            raise ValueError(f"unsupported resample {resample!r} (nearest, bilinear and bicubic are)")
        return cls(crop_size, mean, std, resize=resize, interpolation=interpolation, crop_rounding="floor")

    def _resized_shape(self, height: int, width: int) -> tuple[int, int]:
        if isinstance(self.resize, tuple):
            return self.resize
        if isinstance(self.resize, int):
            short, long = min(height, width), max(height, width)
            new_short, new_long = self.resize, int(self.resize * long / short)
            return (new_short, new_long) if height <= width else (new_long, new_short)
        ratio = min(height / self.crop_size[0], width / self.crop_size[1])
        return round(height / ratio), round(width / ratio)

    def _crop_offset(self, size: int, crop: int) -> int:
        margin = (size - crop) / 2.0
        return int(round(margin)) if self.crop_rounding == "round" else int(margin)

    def forward(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] to normalised model inputs ``(B, 3, *crop_size)`` in float32."""
        x = images.float()
        height, width = x.shape[-2:]
        new_h, new_w = self._resized_shape(height, width)
        if (new_h, new_w) != (height, width):
            antialias = self.interpolation != "nearest"
            x = F.interpolate(
                x,
                size=(new_h, new_w),
                mode=self.interpolation,
                antialias=antialias,
                **({} if self.interpolation == "nearest" else {"align_corners": False}),
            )
        if self.clamp:
            x = x.clamp(0.0, 1.0)
        crop_h, crop_w = self.crop_size
        if new_h < crop_h or new_w < crop_w:
            raise ValueError(f"resized image {new_h}x{new_w} is smaller than its crop {crop_h}x{crop_w}")
        top, left = self._crop_offset(new_h, crop_h), self._crop_offset(new_w, crop_w)
        x = x[..., top : top + crop_h, left : left + crop_w]
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return (
            f"crop_size={self.crop_size}, resize={self.resize}, interpolation={self.interpolation!r}, "
            f"crop_rounding={self.crop_rounding!r}"
        )
