"""Callbacks: sample images (or videos) rendered during training, logged to whatever loggers the run has.

A task whose ``generate`` returns videos ``(B, F, 3, H, W)`` gets its samples logged as videos
(:mod:`rlr_lightning.video`); that needs PyAV (``pip install 'rlr_lightning[video]'``) except for TensorBoard.
"""

from __future__ import annotations

import csv
import logging
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, cast

import lightning as L
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from PIL import Image
from torchvision.utils import make_grid

from rlr_lightning.data import PROMPT_SETS, PromptBatch
from rlr_lightning.grids import BeforeAfterLayout, to_uint8
from rlr_lightning.ranks import renders
from rlr_lightning.video import log_videos, video_strip, write_mp4

if TYPE_CHECKING:
    from rlr_lightning.module import RLRModule

logger = logging.getLogger(__name__)


@torch.no_grad()
def render_samples(
    pl_module: L.LightningModule, prompts: list[str], seed: int
) -> tuple[torch.Tensor, list[float]]:
    """The module's images ``(B, 3, H, W)`` (or videos ``(B, F, 3, H, W)``) of ``prompts`` from ``seed`` as
    ``uint8`` (what every sink gets) and their rewards."""
    module = cast("RLRModule", pl_module)  # the callbacks of this file render an RLRModule's samples
    assert module.backbone is not None and module.reward is not None  # loaded and given before training
    # The backbone warns once about cut prompts, for the training prompts: rendered first, a grid's captions
    # would take that warning, and the training prompts would go unnamed (see warn_if_cut for the grid's).
    with module.backbone.prompt_limit_unchecked():
        images = module.task.generate(PromptBatch.from_prompts(prompts), torch.Generator().manual_seed(seed))
    return to_uint8(images), module.reward(images, prompts).float().cpu().tolist()


def warn_if_cut(pl_module: L.LightningModule, prompts: list[str], owner: str) -> None:
    """Warn, naming the callback, that some of its prompts are longer than a text encoder reads (they are
    rendered cut)."""
    backbone = cast("RLRModule", pl_module).backbone
    assert backbone is not None  # loaded before training starts
    for tokenizer in backbone.tokenizers:
        limit = backbone.token_limit(tokenizer)
        lengths = [len(ids) for ids in tokenizer(prompts, verbose=False).input_ids]
        cut = [prompt for prompt, n in zip(prompts, lengths) if n > limit]
        if cut:
            named = "; ".join(repr(textwrap.shorten(p, width=60, placeholder=" ...")) for p in cut[:3])
            logger.warning(
                "%s: %d of its %d prompts are longer than the text encoder reads (%d tokens) and are rendered cut: "
                "%s%s",
                owner,
                len(cut),
                len(prompts),
                limit,
                named,
                "; ..." if len(cut) > 3 else "",
            )
            return


class SampleImageLogger(L.Callback):
    """Render a fixed set of prompts with fixed seeds every N optimizer steps, on rank zero only.

    Logs the images and a (step, prompt, reward) table: to Weights & Biases with ``WandbLogger`` (images
    captioned with prompt and reward, plus a table), as an image grid and text with ``TensorBoardLogger``,
    and as PNG grids plus a CSV table under ``<log dir>/samples`` with any other logger (or none). Every sink
    gets the same 8-bit pixels. It uses no collective, so other ranks never wait on it.

    Videos (a task whose ``generate`` returns ``(B, F, 3, H, W)``) are logged as videos, not frames: MP4s
    captioned like the images to W&B, one animated GIF per prompt to TensorBoard's images dashboard (tags
    ``samples/<index>``), and MP4s ``<log dir>/samples/step_<step>_<index>.mp4`` otherwise; the table and text
    are the same as for images.

    Args:
        prompts: Prompts to render; defaults to the first ``num_prompts`` validation prompts of the
            DataModule, else its training prompts (prompts the run's reward scores, whatever the model), or
            of the built-in ``simple`` set without a DataModule.
        num_prompts: How many default prompts to take.
        every_n_steps: Render every this many optimizer steps (and once before training).
        seed: Seed of the initial noise and step noises: identical at every render, so steps compare.
        fps: Frames per second of logged videos (unused for images).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        num_prompts: int = 4,
        every_n_steps: int = 100,
        seed: int = 0,
        fps: float = 8,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if prompts is not None and not prompts:
            raise ValueError("prompts is empty; give at least one prompt or leave it unset")
        self.prompts = prompts
        self.num_prompts = num_prompts
        self.every_n_steps = every_n_steps
        self.seed = seed
        self.fps = fps
        self._last_step: int | None = None
        self._checked_prompts = False

    def _prompts(self, trainer: L.Trainer) -> list[str]:
        if self.prompts is None:
            datamodule = getattr(trainer, "datamodule", None)  # set by Lightning's data connector
            # The run's own prompts: a reward may only score its prompt set (the shapes world's count reward
            # parses captions), so a fixed fallback set would fail such runs.
            records = (
                getattr(datamodule, "val_records", None)
                or getattr(datamodule, "records", None)
                or PROMPT_SETS["simple"]
            )
            self.prompts = [r.prompt for r in records[: self.num_prompts]]
        return self.prompts

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_render(trainer, pl_module, force=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_render(trainer, pl_module)

    def _maybe_render(self, trainer: L.Trainer, pl_module: L.LightningModule, force: bool = False) -> None:
        step = trainer.global_step
        if not renders(trainer) or step == self._last_step:
            return
        if not force and step % self.every_n_steps:
            return
        self._last_step = step
        self.render(trainer, pl_module, step)

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        prompts = self._prompts(trainer)
        if not self._checked_prompts:
            self._checked_prompts = True
            warn_if_cut(pl_module, prompts, type(self).__name__)
        pixels, rewards = render_samples(pl_module, prompts, self.seed)
        if not trainer.is_global_zero:  # a sharded model's other ranks took part in the forwards only
            return
        rows = [[step, p, r] for p, r in zip(prompts, rewards)]
        sinks: list[Logger | None] = [*trainer.loggers] or [None]
        if pixels.dim() == 5:
            self._log_videos(trainer, sinks, pixels, prompts, rewards, rows, step)
            return
        for run_logger in sinks:
            if isinstance(run_logger, WandbLogger):
                captions = [f"{p} (reward {r:.3f})" for p, r in zip(prompts, rewards)]
                # PIL images, not tensors: wandb.Image casts float tensors to uint8 without scaling, so
                # images in [0, 1] would arrive as 0s and 1s (black).
                pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]
                run_logger.log_image(key="samples", images=pil_images, step=step, caption=captions)
                run_logger.log_table(
                    key="samples_table", columns=["step", "prompt", "reward"], data=rows, step=step
                )
            elif isinstance(run_logger, TensorBoardLogger):
                # uint8 NCHW is taken as 0-255 as is, so TensorBoard shows the same pixels as the other sinks.
                run_logger.experiment.add_images("samples", pixels, step)
                text = "\n".join(f"{p}: {r:.4f}" for p, r in zip(prompts, rewards))
                run_logger.experiment.add_text("samples_rewards", text, step)
            else:
                self._write_files(trainer, run_logger, pixels, rows, step)

    def _log_videos(
        self,
        trainer: L.Trainer,
        sinks: list[Logger | None],
        videos: torch.Tensor,
        prompts: list[str],
        rewards: list[float],
        rows: list,
        step: int,
    ) -> None:
        """Log ``uint8`` videos ``(B, F, 3, H, W)`` to each sink, with the same table and text as images."""
        captions = [f"{p} (reward {r:.3f})" for p, r in zip(prompts, rewards)]
        for run_logger in sinks:
            if isinstance(run_logger, WandbLogger):
                log_videos(run_logger, "samples", videos, captions, step, self.fps)
                run_logger.log_table(
                    key="samples_table", columns=["step", "prompt", "reward"], data=rows, step=step
                )
            elif isinstance(run_logger, TensorBoardLogger):
                log_videos(run_logger, "samples", videos, captions, step, self.fps)
                text = "\n".join(f"{p}: {r:.4f}" for p, r in zip(prompts, rewards))
                run_logger.experiment.add_text("samples_rewards", text, step)
            else:
                root = self._log_root(trainer, run_logger)
                # The videos go where the images would: <log dir>/samples, next to the table.
                paths = log_videos(run_logger, "samples", videos, captions, step, self.fps, root)
                self._append_table(root / "samples", rows)
                logger.info("Sample videos of step %d written to %s", step, ", ".join(map(str, paths)))

    @staticmethod
    def _log_root(trainer: L.Trainer, run_logger: Logger | None) -> Path:
        return Path((run_logger.log_dir if run_logger is not None else None) or trainer.default_root_dir)

    @staticmethod
    def _append_table(directory: Path, rows: list) -> None:
        table = directory / "samples.csv"
        new = not table.exists()
        with table.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "prompt", "reward"])
            writer.writerows(rows)

    def _write_files(self, trainer, run_logger, pixels: torch.Tensor, rows: list, step: int) -> None:
        directory = self._log_root(trainer, run_logger) / "samples"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"step_{step:06d}.png"
        grid = make_grid(pixels, nrow=min(len(rows), 4))
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
        self._append_table(directory, rows)
        logger.info("Sample images of step %d written to %s", step, path)


class BeforeAfterGrid(BeforeAfterLayout, L.Callback):
    """Render fixed prompts with fixed seeds by the base model (LoRA off) when training starts and by the
    fine-tuned model when it ends, and write them side by side to ``<log dir>/before_after.png`` (next to the
    metrics), with the rewards in ``before_after.csv``. On rank zero only (every rank renders when the weights are
    sharded; rank zero writes); a resumed run's "before" is still
    the base model.

    The grid has one column per prompt (its text above), the base model's image in the top row and the
    fine-tuned model's below, enlarged ``scale`` times without smoothing so small images stay readable.

    Videos (a task whose ``generate`` returns ``(B, F, 3, H, W)``) get one picture per prompt instead, under
    ``<log dir>/before_after/``: ``<index>.png`` is a strip of the prompt with the base model's frames above the
    fine-tuned model's (:func:`~rlr_lightning.video.video_strip`, up to 8 frames), and ``<index>_before.mp4``
    and ``<index>_after.mp4`` are the two videos; the rewards stay in ``before_after.csv``.

    Args:
        prompts: Prompts to render; defaults to the first ``num_prompts`` training prompts of the DataModule
            (or of the built-in ``simple`` set).
        num_prompts: How many default prompts to take.
        seed: Seed of the initial noise and step noises, the same for both renders: only the model differs.
        scale: Enlargement of each image (or video frame) in the grid (nearest neighbour).
        fps: Frames per second of the MP4s of videos (unused for images).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        num_prompts: int = 8,
        seed: int = 0,
        scale: int = 4,
        fps: float = 8,
    ) -> None:
        if prompts is not None and not prompts:
            raise ValueError("prompts is empty; give at least one prompt or leave it unset")
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        super().__init__(scale)
        self.prompts = prompts
        self.num_prompts = num_prompts
        self.seed = seed
        self.fps = fps
        self._before: tuple[torch.Tensor, list[float]] | None = None

    def _prompts(self, trainer: L.Trainer) -> list[str]:
        if self.prompts is None:
            datamodule = getattr(trainer, "datamodule", None)
            records = getattr(datamodule, "records", None) or PROMPT_SETS["simple"]
            self.prompts = [r.prompt for r in records[: self.num_prompts]]
        return self.prompts

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if renders(trainer):
            if trainer.is_global_zero:
                warn_if_cut(pl_module, self._prompts(trainer), type(self).__name__)
            backbone = cast("RLRModule", pl_module).backbone
            assert backbone is not None  # loaded before training starts
            with backbone.lora_disabled():
                self._before = render_samples(pl_module, self._prompts(trainer), self.seed)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir broadcasts from rank zero under DDP: every rank asks, before the rank check.
        log_dir = trainer.log_dir
        if not renders(trainer) or self._before is None:
            return
        after = render_samples(pl_module, self._prompts(trainer), self.seed)
        if not trainer.is_global_zero:  # a sharded model's other ranks took part in the forwards only
            return
        root = Path(log_dir or trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        if after[0].dim() == 5:
            path = self._write_videos(root, self._before[0], after[0], self._prompts(trainer))
        else:
            path = root / "before_after.png"
            self.grid(self._before[0], after[0], self._prompts(trainer)).save(path)
        with (root / "before_after.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["prompt", "reward_before", "reward_after"])
            writer.writerows(zip(self._prompts(trainer), self._before[1], after[1]))
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        logger.info(
            "Before/after %s written to %s (mean reward %.3f before, %.3f after)",
            "videos" if after[0].dim() == 5 else "images",
            path,
            mean(self._before[1]),
            mean(after[1]),
        )

    def _write_videos(
        self, root: Path, before: torch.Tensor, after: torch.Tensor, prompts: list[str]
    ) -> Path:
        """One strip PNG and a before and an after MP4 per prompt under ``root/before_after``; that folder."""
        folder = root / "before_after"
        folder.mkdir(exist_ok=True)
        for i, strip in enumerate(video_strip(before, after, prompts, scale=self.scale)):
            strip.save(folder / f"{i:02d}.png")
            write_mp4(before[i], folder / f"{i:02d}_before.mp4", self.fps)
            write_mp4(after[i], folder / f"{i:02d}_after.mp4", self.fps)
        return folder
