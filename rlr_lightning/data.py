"""Prompts for training and evaluation: built-in sets, text and JSONL files, DCoT rewrites.

A prompt is a :class:`PromptRecord`: the prompt, optional diffusive chain-of-thought (DCoT) rewrites for the
coarse, mid and fine scales (``method.md`` §6; the module conditions each step range on its scale's
rewrite), and free metadata. Batches are :class:`PromptBatch` objects.

File formats:

* ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
* ``.jsonl``: one JSON object per line with ``prompt`` (required), optional ``coarse``, ``mid``, ``fine``
  rewrites (all three or none), and any other keys, kept as metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rlr_lightning.errors import quote_prompt

DCOT_SCALES = ("coarse", "mid", "fine")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt.

    Attributes:
        prompt: The prompt the reward judges the image against.
        dcot: Optional ``(coarse, mid, fine)`` rewrites conditioning the early, middle and late steps.
        metadata: Anything else the source provided (category, id, ...).
    """

    prompt: str
    dcot: tuple[str, str, str] | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"a prompt must be a non-empty string, got {quote_prompt(self.prompt)}")
        if self.dcot is not None and (
            len(self.dcot) != 3 or not all(isinstance(p, str) and p for p in self.dcot)
        ):
            raise ValueError(
                f"DCoT rewrites of {quote_prompt(self.prompt)} must be three non-empty strings (coarse, mid, fine), "
                f"got {quote_prompt(self.dcot)}"
            )


@dataclass
class PromptBatch:
    """A batch of prompts (what ``training_step`` receives).

    Attributes:
        prompts: The prompts.
        dcot: Per prompt, its ``(coarse, mid, fine)`` rewrites or ``None``.
        metadata: Per prompt, its metadata.
    """

    prompts: list[str]
    dcot: list[tuple[str, str, str] | None]
    metadata: list[dict]

    @classmethod
    def from_prompts(cls, prompts) -> PromptBatch:
        """A batch of plain prompts: no DCoT rewrites, no metadata."""
        prompts = list(prompts)
        return cls(prompts, [None] * len(prompts), [{} for _ in prompts])

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_dcot(self) -> bool:
        return any(d is not None for d in self.dcot)

    def scale_prompts(self, scale: str) -> list[str]:
        """The rewrite of ``scale`` for every prompt; prompts without rewrites use the prompt itself."""
        i = DCOT_SCALES.index(scale)
        return [p if d is None else d[i] for p, d in zip(self.prompts, self.dcot)]


def collate_prompts(records: Sequence[PromptRecord]) -> PromptBatch:
    return PromptBatch(
        [r.prompt for r in records], [r.dcot for r in records], [dict(r.metadata) for r in records]
    )


def _records(prompts: Sequence[str]) -> tuple[PromptRecord, ...]:
    return tuple(PromptRecord(p) for p in prompts)


#: Built-in prompt sets, written for this project. ``animals`` follows the field's aesthetic experiments
#: (a common animal as the whole prompt); ``styles`` covers the four styles of human-preference benchmarks;
#: ``dcot_hands`` pairs hand prompts with coarse/mid/fine rewrites, the paper's DCoT use case.
PROMPT_SETS: dict[str, tuple[PromptRecord, ...]] = {
    "animals": _records(
        (
            "cat",
            "dog",
            "horse",
            "cow",
            "sheep",
            "pig",
            "goat",
            "rabbit",
            "fox",
            "wolf",
            "bear",
            "deer",
            "lion",
            "tiger",
            "zebra",
            "giraffe",
            "elephant",
            "monkey",
            "panda",
            "koala",
            "kangaroo",
            "camel",
            "owl",
            "eagle",
            "parrot",
            "penguin",
            "duck",
            "swan",
            "frog",
            "turtle",
            "dolphin",
            "whale",
            "octopus",
            "crab",
            "butterfly",
            "bee",
            "squirrel",
            "hedgehog",
            "otter",
            "raccoon",
            "llama",
            "goose",
        )
    ),
    "simple": _records(
        (
            "a photo of a cat",
            "a red bicycle",
            "a lighthouse at dusk",
            "a bowl of fruit on a table",
            "a mountain lake in the morning",
            "a city street in the rain",
            "a cup of coffee",
            "a sailing boat",
        )
    ),
    "styles": tuple(
        PromptRecord(prompt, metadata={"style": style})
        for style, prompts in (
            (
                "photo",
                (
                    "a portrait of an old fisherman, natural light",
                    "a bowl of ramen on a wooden table",
                    "a foggy pine forest at sunrise",
                    "a vintage car parked on a cobblestone street",
                ),
            ),
            (
                "anime",
                (
                    "a girl with a red umbrella in the rain, anime style",
                    "a cozy anime cafe at night",
                    "an anime dragon flying over a castle",
                    "a schoolyard under cherry blossoms, anime",
                ),
            ),
            (
                "concept-art",
                (
                    "a floating city above the clouds, concept art",
                    "a desert outpost on an alien planet",
                    "a giant mech in a ruined city, concept art",
                    "an underwater research station",
                ),
            ),
            (
                "painting",
                (
                    "a field of sunflowers, oil painting",
                    "a harbour at dusk in impressionist style",
                    "a still life with lemons and a jug, oil on canvas",
                    "a winter village, watercolour",
                ),
            ),
        )
        for prompt in prompts
    ),
    "dcot_hands": tuple(
        PromptRecord(prompt, dcot=rewrites, metadata={"focus": "hands"})
        for prompt, rewrites in (
            (
                "a woman waving her hand",
                (
                    "a woman standing, one arm raised",
                    "a raised arm with an open palm facing forward",
                    "a hand with five separate fingers, natural knuckles and nails",
                ),
            ),
            (
                "two hands holding a cup of tea",
                (
                    "a cup of tea held at chest height",
                    "two hands wrapped around a cup",
                    "ten fingers curled around the cup, thumbs on the rim",
                ),
            ),
            (
                "a pianist playing the piano",
                (
                    "a person seated at a grand piano",
                    "both hands resting on the keys",
                    "fingers pressing separate keys, each finger distinct",
                ),
            ),
            (
                "a child counting on her fingers",
                (
                    "a child in a classroom looking at her hand",
                    "one hand held up with some fingers extended",
                    "three extended fingers and two folded, clear fingertips",
                ),
            ),
        )
    ),
}


def _shapes_world_sets() -> dict[str, tuple[PromptRecord, ...]]:
    """Captions of the shapes world that name a region (what a position reward can judge): ``shapes`` from the
    training split of caption combinations, ``shapes_held_out`` from the held-out one (never seen by the
    shapes-world model in training)."""
    from rlr_lightning.world.scenes import caption, split_specs

    train, held_out = split_specs()
    return {
        name: _records(tuple(caption(spec) for spec in specs if spec.region != "anywhere"))
        for name, specs in (("shapes", train), ("shapes_held_out", held_out))
    }


PROMPT_SETS.update(_shapes_world_sets())


def _motion_world_sets() -> dict[str, tuple[PromptRecord, ...]]:
    """Captions of the moving-shapes world: ``motion`` from its training split of caption combinations,
    ``motion_held_out`` from the held-out one (never seen by the moving-shapes model in training)."""
    from rlr_lightning.world.motion import motion_caption, split_motion_specs

    train, held_out = split_motion_specs()
    return {
        name: _records(tuple(motion_caption(spec) for spec in specs))
        for name, specs in (("motion", train), ("motion_held_out", held_out))
    }


PROMPT_SETS.update(_motion_world_sets())


def _parse_jsonl_line(line: str, where: str) -> PromptRecord:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        raise ValueError(f'{where}: each line must be a JSON object with a non-empty "prompt" string')
    present = [s for s in DCOT_SCALES if s in item]
    if present and len(present) != 3:
        raise ValueError(f"{where}: DCoT rewrites need all of coarse, mid and fine, got only {present}")
    coarse, mid, fine = DCOT_SCALES
    dcot = (str(item[coarse]), str(item[mid]), str(item[fine])) if present else None
    metadata = {k: v for k, v in item.items() if k not in ("prompt", *DCOT_SCALES)}
    return PromptRecord(item["prompt"], dcot=dcot, metadata=metadata)


def load_prompt_file(path: str | os.PathLike) -> list[PromptRecord]:
    """Read a ``.txt`` or ``.jsonl`` prompt file (see the module docstring for the formats).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file holds no prompt, or a line is malformed (the message names file and line).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or (path.suffix != ".jsonl" and line.startswith("#")):
                continue
            if path.suffix == ".jsonl":
                records.append(_parse_jsonl_line(line, f"{path}:{number}"))
            else:
                records.append(PromptRecord(line))
    if not records:
        raise ValueError(f"prompt file {path} holds no prompts")
    return records


class PromptDataset(Dataset):
    """Cycles over ``records`` for ``length`` items, so an epoch need not be tiny when the set is."""

    def __init__(self, records: Sequence[PromptRecord], length: int) -> None:
        self.records = list(records)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> PromptRecord:
        return self.records[index % len(self.records)]


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)`` alone.

    Unlike a sampler driven by a running generator, epoch ``e`` has the same order in a resumed process as in
    an uninterrupted one (Lightning calls :meth:`set_epoch`; under DDP it substitutes its distributed
    sampler, which is seeded by epoch the same way).
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class ConsumedBatches:
    """How many training batches of the current epoch the loop has consumed (shared by loader and module)."""

    def __init__(self) -> None:
        self.count = 0
        self.skip = 0


class ResumableDataLoader(DataLoader):
    """A DataLoader that resumes mid-epoch where the interrupted run stopped.

    Lightning stores :meth:`state_dict` in checkpoints and hands it back on resume. The count comes from
    batches the loop *consumed* (counted by :meth:`PromptDataModule.on_after_batch_transfer`), not from
    batches fetched: the loop prefetches one batch ahead, which a fetch count would skip.

    Args:
        consumed: The shared consumption counter.
    """

    def __init__(self, *args, consumed: ConsumedBatches | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.consumed = consumed if consumed is not None else ConsumedBatches()

    def __iter__(self):
        iterator = super().__iter__()
        skip, self.consumed.skip = self.consumed.skip, 0
        if skip >= len(self):  # the checkpoint was taken at the end of an epoch: start the next one whole
            skip = 0
        for _ in range(skip):
            next(iterator)
        self.consumed.count = skip
        return iterator

    def state_dict(self) -> dict:
        return {"consumed": self.consumed.count}

    def load_state_dict(self, state: dict) -> None:
        self.consumed.skip = int(state.get("consumed", 0))


class PromptDataModule(L.LightningDataModule):
    """Batches of prompts for reward fine-tuning, and an optional held-out validation set.

    Under DDP, Lightning's distributed sampler gives every rank different prompts; shuffling is seeded, so a
    run is reproducible.

    Args:
        prompt_set: Name of a built-in prompt set (``animals``, ``simple``, ``styles``, ``dcot_hands``, or the
            shapes world's captions with a region: ``shapes`` from its training split, ``shapes_held_out`` from
            its held-out split; the moving-shapes world's ``motion`` and ``motion_held_out``); ignored when
            ``prompts`` or ``prompt_file`` is given.
        prompts: An explicit list of prompts.
        prompt_file: A ``.txt`` or ``.jsonl`` file of prompts (JSONL may carry DCoT rewrites and metadata).
        val_prompts: Held-out validation prompts.
        val_prompt_file: A file of held-out validation prompts.
        val_prompt_set: A built-in prompt set as the validation prompts (e.g. ``shapes_held_out``).
        val_fraction: Hold out this fraction of the training prompts for validation (seeded), when no
            validation prompts are given.
        batch_size: Prompts per rank per micro-batch.
        val_batch_size: Prompts per validation batch; defaults to ``batch_size``.
        epoch_size: Prompts per epoch (the set is cycled); defaults to the size of the set.
        seed: Seed of the shuffling and of the validation split.
        num_workers: DataLoader workers (prompts are tiny: 0 is usually right).
    """

    def __init__(
        self,
        prompt_set: str = "animals",
        prompts: list[str] | None = None,
        prompt_file: str | None = None,
        val_prompts: list[str] | None = None,
        val_prompt_file: str | None = None,
        val_prompt_set: str | None = None,
        val_fraction: float = 0.0,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        epoch_size: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if prompts is not None and prompt_file is not None:
            raise ValueError("give either prompts or prompt_file, not both")
        if prompt_file is not None:
            records = load_prompt_file(prompt_file)
        elif prompts is not None:
            if not prompts:
                raise ValueError("the prompts list is empty")
            records = [PromptRecord(p) for p in prompts]
        elif prompt_set in PROMPT_SETS:
            records = list(PROMPT_SETS[prompt_set])
        else:
            raise ValueError(f"unknown prompt_set {prompt_set!r}; choose one of {sorted(PROMPT_SETS)}")

        if val_prompt_set is not None and val_prompt_set not in PROMPT_SETS:
            raise ValueError(
                f"unknown val_prompt_set {val_prompt_set!r}; choose one of {sorted(PROMPT_SETS)}"
            )
        if sum(v is not None for v in (val_prompts, val_prompt_file, val_prompt_set)) > 1:
            raise ValueError("give at most one of val_prompts, val_prompt_file and val_prompt_set")
        if val_prompt_file is not None:
            val_records = load_prompt_file(val_prompt_file)
        elif val_prompt_set is not None:
            val_records = list(PROMPT_SETS[val_prompt_set])
        elif val_prompts is not None:
            val_records = [PromptRecord(p) for p in val_prompts]
        elif val_fraction > 0:
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
            n_val = max(1, round(val_fraction * len(records)))
            if n_val >= len(records):
                raise ValueError(f"val_fraction={val_fraction} leaves no training prompts of {len(records)}")
            val_records = [records[i] for i in sorted(order[:n_val])]
            records = [records[i] for i in sorted(order[n_val:])]
        else:
            val_records = []
        self.records = records
        self.val_records = val_records
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.epoch_size = epoch_size or max(len(records), batch_size)
        self.seed = seed
        self.num_workers = num_workers
        self._consumed = ConsumedBatches()

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.records]

    def train_epoch_size(self) -> int:
        """Prompts per epoch: at least one full batch on every rank (the set is cycled when it is smaller),
        since the distributed sampler splits an epoch between ranks and incomplete batches are dropped."""
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        return max(self.epoch_size, self.batch_size * world)

    def train_dataloader(self) -> DataLoader:
        size = self.train_epoch_size()
        return ResumableDataLoader(
            PromptDataset(self.records, size),
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(size, self.seed),
            drop_last=True,
            collate_fn=collate_prompts,
            num_workers=self.num_workers,
            consumed=self._consumed,
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Runs when the loop takes a batch for a step (after the prefetch): the count a resume must skip.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self._consumed.count += 1
        return batch

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_records:
            return []
        # Fixed order, every prompt once: comparable across evaluations and runs.
        return DataLoader(
            PromptDataset(self.val_records, len(self.val_records)),
            batch_size=self.val_batch_size,
            shuffle=False,
            collate_fn=collate_prompts,
            num_workers=self.num_workers,
        )
