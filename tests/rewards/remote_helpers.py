"""Reward classes a reward server serves in the remote-reward tests: users' own classes, by import path.

``rlr serve-reward`` imports them in its own process (``--reward tests.rewards.remote_helpers.NAME``, with the
repository on ``PYTHONPATH``); the in-process servers of the fast tests take instances.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from rlr_lightning.rewards import TargetColor

logger = logging.getLogger(__name__)


class RecordingReward(TargetColor):
    """The toy reward, recording the batch size and prompts of every call (what one request carried)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        self.calls.append(list(prompts))
        return super().score(images, prompts)


class SlowReward(TargetColor):
    """The toy reward, answering after ``seconds``.

    Args:
        seconds: How long every call takes.
    """

    def __init__(self, seconds: float = 1.0) -> None:
        super().__init__()
        self.seconds = seconds

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        time.sleep(self.seconds)
        return super().score(images, prompts)


class FailingReward(TargetColor):
    """A reward whose every call raises, as a broken reward model would."""

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        raise RuntimeError("the reward model is broken")


class StallAfterCheckpoint(TargetColor):
    """The toy reward until ``checkpoint`` exists; then it touches ``marker`` and stalls, so that a test can
    kill the server while a training step waits for its rewards, after a checkpoint was written.

    Args:
        checkpoint: The checkpoint file whose existence starts the stall.
        marker: The file touched when the stall starts.
    """

    def __init__(self, checkpoint: str, marker: str) -> None:
        super().__init__()
        self.checkpoint, self.marker = Path(checkpoint), Path(marker)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if self.checkpoint.exists():
            logger.info("%s exists: stalling until killed", self.checkpoint)
            self.marker.touch()
            time.sleep(300)
        return super().score(images, prompts)
