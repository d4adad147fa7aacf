"""The reward interface: images (or videos) in [0, 1] and their prompts in, float32 rewards of shape (B,) out.

Image rewards take ``(B, 3, H, W)``; video rewards (:attr:`RewardModel.video`) take ``(B, F, 3, H, W)``, frames
along the second axis (what the video families' ``decode`` returns).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn


class RewardModel(nn.Module, ABC):
    """Base class of rewards. Frozen and in eval mode; a submodule of the LightningModule, so it moves with it.

    Subclasses implement :meth:`score` and set :attr:`differentiable` to ``False`` when the reward has no
    useful gradient (estimators that backpropagate through the reward then refuse it, and RLR scores its
    last step by a likelihood ratio instead). Rewards that score an image embedding (CLIP-based ones) also
    implement :meth:`image_embedding`.
    """

    #: Whether gradients flow from the reward to the images.
    differentiable: bool = True
    #: Whether the reward scores videos ``(B, F, 3, H, W)`` rather than images ``(B, 3, H, W)``.
    video: bool = False

    @abstractmethod
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Rewards of ``images`` ``(B, 3, H, W)`` in [0, 1] for their ``prompts``; shape ``(B,)``."""

    def image_embedding(self, images: Tensor) -> Tensor | None:
        """The image embedding the reward scores, ``(B, D)``, for images ``(B, 3, H, W)`` in [0, 1]; None for
        rewards without one (pixel statistics, JPEG sizes).

        Computed exactly as :meth:`score` computes it (same preprocessing, same model), not necessarily
        L2-normalised. Evaluation measures the diversity of samples in this space where there is one
        (:func:`rlr_lightning.evaluation.image_features`): distances the reward itself can tell apart.
        """
        return None

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if images.dim() != (5 if self.video else 4) or images.shape[-3] != 3:
            expected = "videos of shape (B, F, 3, H, W)" if self.video else "images of shape (B, 3, H, W)"
            raise ValueError(f"{type(self).__name__} takes {expected}, got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            rewards = self.score(images, prompts)
        if not self.differentiable:
            rewards = rewards.detach()
        return rewards.float().reshape(images.shape[0])

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute the reward model's blocks in backward instead of keeping their activations, where the
        underlying model supports it (open_clip's ``set_grad_checkpointing``); a no-op for cheap rewards."""
        for module in self.modules():
            if module is not self and hasattr(module, "set_grad_checkpointing"):
                # Not an nn.Module method: torch types unknown attributes as Tensor | Module.
                cast(Any, module).set_grad_checkpointing(enabled)

    def freeze(self) -> RewardModel:
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> RewardModel:
        # Rewards are fixed functions: never switch them to training mode (dropout, batch-norm statistics).
        return super().train(False)
