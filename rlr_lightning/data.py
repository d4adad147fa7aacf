"""Prompts for training: built-in prompt sets or an explicit list, batched by a LightningDataModule."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

#: Built-in prompt sets, written for this project. ``animals`` follows the field's aesthetic experiments
#: (a common animal as the whole prompt).
PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "animals": (
        "cat", "dog", "horse", "cow", "sheep", "pig", "goat", "rabbit", "fox", "wolf", "bear", "deer",
        "lion", "tiger", "zebra", "giraffe", "elephant", "monkey", "panda", "koala", "kangaroo", "camel",
        "owl", "eagle", "parrot", "penguin", "duck", "swan", "frog", "turtle", "dolphin", "whale",
        "octopus", "crab", "butterfly", "bee", "squirrel", "hedgehog", "otter", "raccoon", "llama", "goose",
    ),
    "simple": (
        "a photo of a cat", "a red bicycle", "a lighthouse at dusk", "a bowl of fruit on a table",
        "a mountain lake in the morning", "a city street in the rain", "a cup of coffee", "a sailing boat",
    ),
}


class PromptDataset(Dataset):
    """Cycles over ``prompts`` for ``length`` items, so an epoch need not be tiny when the set is."""

    def __init__(self, prompts: Sequence[str], length: int) -> None:
        self.prompts = list(prompts)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> str:
        return self.prompts[index % len(self.prompts)]


def _as_list(batch: list[str]) -> list[str]:
    return list(batch)


class PromptDataModule(L.LightningDataModule):
    """Batches of prompts for reward fine-tuning.

    Under DDP, Lightning's distributed sampler gives every rank different prompts; shuffling is seeded, so
    a run is reproducible.

    Args:
        prompt_set: Name of a built-in prompt set (``animals``, ``simple``); ignored when ``prompts`` is given.
        prompts: An explicit list of prompts.
        batch_size: Prompts per rank per micro-batch.
        epoch_size: Prompts per epoch (the set is cycled); defaults to the size of the set.
        seed: Seed of the shuffling.
        num_workers: DataLoader workers (prompts are tiny: 0 is usually right).
    """

    def __init__(
        self,
        prompt_set: str = "animals",
        prompts: list[str] | None = None,
        batch_size: int = 4,
        epoch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if prompts is None and prompt_set not in PROMPT_SETS:
            raise ValueError(f"unknown prompt_set {prompt_set!r}; choose one of {sorted(PROMPT_SETS)}")
        self.prompts = list(prompts) if prompts is not None else list(PROMPT_SETS[prompt_set])
        if not self.prompts:
            raise ValueError("the prompt list is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.epoch_size = epoch_size or max(len(self.prompts), batch_size)
        self.seed = seed
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            PromptDataset(self.prompts, self.epoch_size),
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=_as_list,
            num_workers=self.num_workers,
        )
