"""Video rewards: image rewards applied frame by frame, and the temporal consistency of consecutive frames.

Both take videos ``(B, F, 3, H, W)`` in [0, 1] (:attr:`RewardModel.video`), frames along the second axis, as
the video families' ``decode`` returns them. A :class:`~rlr_lightning.rewards.WeightedSum` of video rewards
is a video reward too, e.g. a per-frame aesthetic score plus a little temporal consistency.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rlr_lightning.rewards.base import RewardModel

logger = logging.getLogger(__name__)

#: Side of the square the default pixel embedding of :class:`TemporalConsistencyReward` pools frames to.
PIXEL_EMBEDDING_SIZE = 16


def _check_positive_int(name: str, value: object) -> int:
    # bool is an int subclass: True would silently mean 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_image_reward(owner: str, name: str, reward: object) -> RewardModel:
    if not isinstance(reward, RewardModel):
        raise ValueError(f"{owner}'s {name} must be a RewardModel, got {type(reward).__name__}")
    if reward.video:
        raise ValueError(
            f"{owner}'s {name} must be an image reward (taking (B, 3, H, W)), but {type(reward).__name__} "
            "is a video reward"
        )
    return reward


def strided_frame_indices(num_frames: int, frame_stride: int = 1, max_frames: int | None = None) -> list[int]:
    """The frames a video reward looks at, of a video of ``num_frames`` frames.

    Every ``frame_stride``-th frame starting at frame 0; then, if ``max_frames`` is set and there are more
    strided frames than that, ``max_frames`` of them evenly spread over the strided ones, always the first
    and the last (position ``round(i * (n - 1) / (max_frames - 1))`` of the ``n`` strided frames, halves
    rounded up; ``max_frames=1`` keeps frame 0 only). For example 16 frames, stride 2, at most 3 frames:
    strided 0, 2, ..., 14, then frames 0, 8 and 14.
    """
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    strided = list(range(0, num_frames, frame_stride))
    n = len(strided)
    if max_frames is None or n <= max_frames:
        return strided
    if max_frames == 1:
        return strided[:1]
    # Integer arithmetic: exact, platform-independent rounding. The positions are distinct because n > max_frames
    # makes their spacing (n - 1) / (max_frames - 1) greater than 1.
    span = max_frames - 1
    return [strided[(i * (n - 1) + span // 2) // span] for i in range(max_frames)]


def _select_frames(videos: Tensor, indices: list[int]) -> Tensor:
    """``videos[:, indices]``, without the copy when every frame is kept."""
    if indices == list(range(videos.shape[1])):
        return videos
    return videos[:, indices]


class PerFrameReward(RewardModel):
    """Any image reward applied to the frames of videos: the mean of its scores over each video's frames.

    Frames are sub-sampled (see ``frame_stride`` and ``max_frames``), then the frames of all videos are scored
    ``frame_chunk`` at a time, each with its video's prompt. When gradients are needed and there is more than
    one chunk, each chunk is scored under activation checkpointing (``torch.utils.checkpoint``, non-reentrant),
    so only one chunk's reward activations are alive at once: the memory of the reward no longer grows with
    the number of frames, at the cost of scoring every frame twice (once more in backward). The gradient is
    exact. Differentiable when the image reward is.

    Args:
        reward: The image reward to apply to every frame (a ``RewardModel`` taking ``(B, 3, H, W)``; in YAML, a
            class_path/init_args).
        frame_stride: Score every ``frame_stride``-th frame, starting at frame 0.
        max_frames: At most this many of the strided frames, evenly spread and always including the first
            and the last strided frame (1: the first frame only). None: all strided frames.
        frame_chunk: How many frames (over all videos of the batch) the image reward scores at once; bounds
            the reward's memory.
    """

    video = True

    def __init__(
        self,
        reward: RewardModel,
        frame_stride: int = 1,
        max_frames: int | None = None,
        frame_chunk: int = 8,
    ) -> None:
        super().__init__()
        self.reward = _check_image_reward("PerFrameReward", "reward", reward)
        self.frame_stride = _check_positive_int("frame_stride", frame_stride)
        self.max_frames = None if max_frames is None else _check_positive_int("max_frames", max_frames)
        self.frame_chunk = _check_positive_int("frame_chunk", frame_chunk)
        self.differentiable = reward.differentiable
        self.freeze()

    def frame_indices(self, num_frames: int) -> list[int]:
        """The frames scored of a video of ``num_frames`` frames (see :func:`strided_frame_indices`)."""
        return strided_frame_indices(num_frames, self.frame_stride, self.max_frames)

    def image_embedding(self, images: Tensor) -> Tensor | None:
        """None: a video reward has no single image embedding."""
        return None

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Passed to the image reward, whose own implementation (if it overrides the default) decides."""
        self.reward.set_activation_checkpointing(enabled)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        videos = images
        batch = videos.shape[0]
        indices = self.frame_indices(videos.shape[1])
        frames = _select_frames(videos, indices).flatten(0, 1)  # (B * F', 3, H, W), video by video
        frame_prompts = [prompt for prompt in prompts for _ in indices]
        total = frames.shape[0]
        # Checkpointing pays a second forward to free activations between chunks; with a single chunk nothing
        # accumulates, and without gradients nothing is kept at all.
        use_checkpoint = torch.is_grad_enabled() and total > self.frame_chunk
        scores = []
        for start in range(0, total, self.frame_chunk):
            chunk = frames[start : start + self.frame_chunk]
            chunk_prompts = frame_prompts[start : start + self.frame_chunk]
            if use_checkpoint:
                scores.append(checkpoint(self.reward, chunk, chunk_prompts, use_reentrant=False))
            else:
                scores.append(self.reward(chunk, chunk_prompts))
        return torch.cat(scores).view(batch, len(indices)).mean(dim=1)


class TemporalConsistencyReward(RewardModel):
    """Mean cosine similarity of the embeddings of consecutive frames: 1 for a static video, lower the more
    the content changes from frame to frame.

    The embedding is an image reward's :meth:`~RewardModel.image_embedding` (the CLIP-based rewards of this
    package: aesthetic, CLIP score, HPSv2, PickScore), so consistency is judged in the space that reward
    sees. Without one (the offline default), frames are area-downsampled to 16 x 16, flattened and centred on
    their own mean: the cosine is then the correlation of the coarse frames, blind to changes of overall
    brightness and contrast, and 0 for a frame of a single colour (which has no structure to keep). All
    frames of the batch are embedded at once. Differentiable when the embedding reward is (the pixel
    embedding always is).

    Args:
        embedding: The image reward whose image embedding to compare (a ``RewardModel`` with an image
            embedding; in YAML, a class_path/init_args); checked at construction by embedding one small
            image. None: the pixel embedding above, no weights needed.
        frame_stride: Compare every ``frame_stride``-th frame, starting at frame 0, with the next one kept;
            videos need at least two frames left.
    """

    video = True

    def __init__(self, embedding: RewardModel | None = None, frame_stride: int = 1) -> None:
        super().__init__()
        self.frame_stride = _check_positive_int("frame_stride", frame_stride)
        self.embedding: RewardModel | None = None
        if embedding is not None:
            self.embedding = _check_image_reward("TemporalConsistencyReward", "embedding", embedding)
            self._probe_embedding(self.embedding)
            self.differentiable = embedding.differentiable
        self.freeze()

    @staticmethod
    def _probe_embedding(embedding: RewardModel) -> None:
        """Fail at construction, not on the first training step, when ``embedding`` has no image embedding."""
        tensors = [*embedding.parameters(), *embedding.buffers()]
        like = tensors[0] if tensors else torch.empty(0)
        dtype = like.dtype if like.is_floating_point() else torch.float32
        # One small grey image: the rewards resize to their own input size anyway.
        probe = torch.full((1, 3, 32, 32), 0.5, device=like.device, dtype=dtype)
        with torch.no_grad():
            result = embedding.image_embedding(probe)
        if result is None:
            raise ValueError(
                f"TemporalConsistencyReward's embedding {type(embedding).__name__} has no image embedding "
                "(its image_embedding returns None): use a CLIP-based reward (AestheticReward, "
                "CLIPScoreReward, HPSv2Reward, PickScoreReward), or embedding=None for the pixel embedding"
            )

    def embed(self, frames: Tensor) -> Tensor:
        """Embeddings ``(N, D)`` of frames ``(N, 3, H, W)`` in [0, 1]."""
        if self.embedding is None:
            pooled = F.adaptive_avg_pool2d(frames.float(), PIXEL_EMBEDDING_SIZE).flatten(1)
            return pooled - pooled.mean(dim=1, keepdim=True)
        embedded = self.embedding.image_embedding(frames)
        if embedded is None:  # checked at construction; a reward could still change its mind
            raise ValueError(f"{type(self.embedding).__name__}.image_embedding returned None")
        return embedded

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        videos = images
        batch = videos.shape[0]
        indices = strided_frame_indices(videos.shape[1], self.frame_stride)
        if len(indices) < 2:
            raise ValueError(
                f"TemporalConsistencyReward needs at least two frames after frame_stride={self.frame_stride}, "
                f"got {len(indices)} of a {videos.shape[1]}-frame video"
            )
        frames = _select_frames(videos, indices).flatten(0, 1)
        embedded = self.embed(frames).float().view(batch, len(indices), -1)
        return F.cosine_similarity(embedded[:, 1:], embedded[:, :-1], dim=-1).mean(dim=1)
