"""Callbacks: sample images rendered during training, logged to whatever loggers the run has."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from torchvision.utils import make_grid

from rlr_lightning.data import PROMPT_SETS, PromptBatch

logger = logging.getLogger(__name__)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], ``(B, 3, H, W)``, as rounded 0-255 ``uint8`` on the CPU (the same pixels in every sink)."""
    return images.detach().float().cpu().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


class SampleImageLogger(L.Callback):
    """Render a fixed set of prompts with fixed seeds every N optimizer steps, on rank zero only.

    Logs the images and a (step, prompt, reward) table: to Weights & Biases with ``WandbLogger`` (images
    captioned with prompt and reward, plus a table), as an image grid and text with ``TensorBoardLogger``,
    and as PNG grids plus a CSV table under ``<log dir>/samples`` with any other logger (or none). Every sink
    gets the same 8-bit pixels. It uses no collective, so other ranks never wait on it.

    Args:
        prompts: Prompts to render; defaults to the first ``num_prompts`` validation prompts of the
            DataModule, or of the built-in ``simple`` set.
        num_prompts: How many default prompts to take.
        every_n_steps: Render every this many optimizer steps (and once before training).
        seed: Seed of the initial noise and step noises: identical at every render, so steps compare.
    """

    def __init__(
        self, prompts: list[str] | None = None, num_prompts: int = 4, every_n_steps: int = 100, seed: int = 0
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if prompts is not None and not prompts:
            raise ValueError("prompts is empty; give at least one prompt or leave it unset")
        self.prompts = prompts
        self.num_prompts = num_prompts
        self.every_n_steps = every_n_steps
        self.seed = seed
        self._last_step: int | None = None

    def _prompts(self, trainer: L.Trainer) -> list[str]:
        if self.prompts is None:
            records = getattr(trainer.datamodule, "val_records", None) or PROMPT_SETS["simple"]
            self.prompts = [r.prompt for r in records[: self.num_prompts]]
        return self.prompts

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_render(trainer, pl_module, force=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_render(trainer, pl_module)

    def _maybe_render(self, trainer: L.Trainer, pl_module: L.LightningModule, force: bool = False) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step:
            return
        if not force and step % self.every_n_steps:
            return
        self._last_step = step
        self.render(trainer, pl_module, step)

    @torch.no_grad()
    def render(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        prompts = self._prompts(trainer)
        batch = PromptBatch.from_prompts(prompts)
        images = pl_module.generate(batch, torch.Generator().manual_seed(self.seed))
        rewards = pl_module.reward(images, prompts).float().cpu().tolist()
        pixels = to_uint8(images)
        rows = [[step, p, r] for p, r in zip(prompts, rewards)]
        for run_logger in trainer.loggers or [None]:
            if isinstance(run_logger, WandbLogger):
                captions = [f"{p} (reward {r:.3f})" for p, r in zip(prompts, rewards)]
                # PIL images, not tensors: wandb.Image casts float tensors to uint8 without scaling, so
                # images in [0, 1] would arrive as 0s and 1s (black).
                pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]
                run_logger.log_image(key="samples", images=pil_images, step=step, caption=captions)
                run_logger.log_table(key="samples_table", columns=["step", "prompt", "reward"], data=rows, step=step)
            elif isinstance(run_logger, TensorBoardLogger):
                # uint8 NCHW is taken as 0-255 as is, so TensorBoard shows the same pixels as the other sinks.
                run_logger.experiment.add_images("samples", pixels, step)
                text = "\n".join(f"{p}: {r:.4f}" for p, r in zip(prompts, rewards))
                run_logger.experiment.add_text("samples_rewards", text, step)
            else:
                self._write_files(trainer, run_logger, pixels, rows, step)

    def _write_files(self, trainer, run_logger, pixels: torch.Tensor, rows: list, step: int) -> None:
        root = Path((run_logger.log_dir if run_logger is not None else None) or trainer.default_root_dir)
        directory = root / "samples"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"step_{step:06d}.png"
        grid = make_grid(pixels, nrow=min(len(rows), 4))
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
        table = directory / "samples.csv"
        new = not table.exists()
        with table.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "prompt", "reward"])
            writer.writerows(rows)
        logger.info("Sample images of step %d written to %s", step, path)
