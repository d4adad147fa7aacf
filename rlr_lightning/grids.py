"""The before/after picture: base-model images above fine-tuned ones under their prompts, pixel-exact.

Shared by the training callback (:class:`~rlr_lightning.callbacks.BeforeAfterGrid`) and the world's
evaluation (:func:`~rlr_lightning.world.evaluate.before_after_grid`), which frames each tile by the checker.
"""

from __future__ import annotations

import textwrap

import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], ``(B, 3, H, W)``, or videos ``(B, F, 3, H, W)`` (any shape: it works pixel by pixel), as
    rounded 0-255 ``uint8`` on the CPU (the same pixels in every sink)."""
    return images.detach().float().cpu().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


class BeforeAfterLayout:
    """Lays out two rows of images (``before`` above ``after``) under their prompts, each enlarged ``scale``
    times without smoothing so small images stay readable.

    Args:
        scale: Enlargement of each image (nearest neighbour).
    """

    def __init__(self, scale: int = 4) -> None:
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        self.scale = scale

    _LABEL, _PAD, _LINE = 48, 4, 14

    def _lines(self, prompts: list[str], side: int) -> list[list[str]]:
        return [textwrap.wrap(p, width=max(8, side // 7)) or [""] for p in prompts]

    def tile_boxes(
        self, prompts: list[str], image_side: int | tuple[int, int]
    ) -> list[list[tuple[int, int, int, int]]]:
        """``[row][column]`` pixel boxes ``(left, top, right, bottom)`` of the enlarged images in :meth:`grid`,
        for square images of side ``image_side`` or images of ``(height, width)`` (video frames)."""
        height, width = (image_side, image_side) if isinstance(image_side, int) else image_side
        height, width = height * self.scale, width * self.scale
        header = self._LINE * max(len(w) for w in self._lines(prompts, width)) + 4
        return [
            [
                (
                    self._LABEL + col * (width + self._PAD),
                    header + row * (height + self._PAD),
                    self._LABEL + col * (width + self._PAD) + width,
                    header + row * (height + self._PAD) + height,
                )
                for col in range(len(prompts))
            ]
            for row in range(2)
        ]

    def grid(self, before: torch.Tensor, after: torch.Tensor, prompts: list[str]) -> Image.Image:
        """The two rows of ``uint8`` images ``(N, 3, H, W)`` under their prompts, with a row label on the left."""
        from PIL import ImageDraw, ImageFont

        height, width = before.shape[-2] * self.scale, before.shape[-1] * self.scale
        boxes = self.tile_boxes(prompts, (before.shape[-2], before.shape[-1]))
        canvas = Image.new("RGB", (boxes[1][-1][2], boxes[1][-1][3]), "white")
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default(size=11)
        for row, (name, images) in enumerate((("before", before), ("after", after))):
            draw.text((4, boxes[row][0][1] + height // 2 - 6), name, fill="black", font=font)
            for box, image in zip(boxes[row], images):
                canvas.paste(
                    Image.fromarray(image.permute(1, 2, 0).numpy()).resize(
                        (width, height), Image.Resampling.NEAREST
                    ),
                    box,
                )
        for box, wrapped in zip(boxes[0], self._lines(prompts, width)):
            for i, text in enumerate(wrapped):
                draw.text((box[0], 2 + self._LINE * i), text, fill="black", font=font)
        return canvas
