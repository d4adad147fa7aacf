"""Callbacks: sample images rendered during training, logged to whatever loggers the run has."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torchvision.utils import save_image

from rlr_lightning.data import PROMPT_SETS, PromptBatch

logger = logging.getLogger(__name__)


class SampleImageLogger(L.Callback):
    """Render a fixed set of prompts with fixed seeds every N optimizer steps, on rank zero only.

    Logs an image grid and a (step, prompt, reward) table: to Weights & Biases with ``WandbLogger``, as
    images with ``TensorBoardLogger``, and as PNG grids plus a CSV table under ``<log dir>/samples`` with any
    other logger (or none). It uses no collective, so other ranks never wait on it.

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
        images = pl_module.generate(batch, torch.Generator().manual_seed(self.seed)).cpu()
        rewards = pl_module.reward(images.to(pl_module.device), prompts).float().cpu().tolist()
        rows = [[step, p, r] for p, r in zip(prompts, rewards)]
        for run_logger in trainer.loggers or [None]:
            if isinstance(run_logger, WandbLogger):
                captions = [f"{p} (reward {r:.3f})" for p, r in zip(prompts, rewards)]
                run_logger.log_image(key="samples", images=list(images), step=step, caption=captions)
                run_logger.log_table(key="samples_table", columns=["step", "prompt", "reward"], data=rows, step=step)
            elif isinstance(run_logger, TensorBoardLogger):
                run_logger.experiment.add_images("samples", images, step)
                text = "\n".join(f"{p}: {r:.4f}" for p, r in zip(prompts, rewards))
                run_logger.experiment.add_text("samples_rewards", text, step)
            else:
                self._write_files(trainer, run_logger, images, rows, step)

    def _write_files(self, trainer, run_logger, images: torch.Tensor, rows: list, step: int) -> None:
        root = Path((run_logger.log_dir if run_logger is not None else None) or trainer.default_root_dir)
        directory = root / "samples"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"step_{step:06d}.png"
        save_image(images, path, nrow=min(len(rows), 4))
        table = directory / "samples.csv"
        new = not table.exists()
        with table.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "prompt", "reward"])
            writer.writerows(rows)
        logger.info("Sample images of step %d written to %s", step, path)
