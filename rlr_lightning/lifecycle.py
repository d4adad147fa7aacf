"""Callbacks the ``rlr`` command adds to every run: how it shows progress and how it ends when interrupted.

* :class:`InterruptCheckpoint`: on SIGTERM (a scheduler's stop) or Ctrl+C the current step finishes, a
  checkpoint is saved where ``last.ckpt`` goes, and the process exits with ``128 + signal`` (143 / 130), so
  neither the work nor the failure is lost. It builds on Lightning's own SIGTERM handling, which stops the
  loops at the end of the current batch (in step on every rank) by raising ``SIGTERMException``, a
  ``SystemExit`` whose exit status would be 0. SLURM's requeue signal (SIGUSR1) stays Lightning's.
* :class:`StepProgressBar`: one bar over the run's optimizer steps (``max_steps``) instead of one per epoch.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities.exceptions import SIGTERMException

logger = logging.getLogger(__name__)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where the run's ``last`` checkpoint goes: the (first) ``ModelCheckpoint``'s, or ``<log dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        name = callback.format_checkpoint_name(
            {"epoch": trainer.current_epoch, "step": trainer.global_step}, filename=callback.CHECKPOINT_NAME_LAST
        )
        return Path(callback.dirpath) / Path(name).name
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class InterruptCheckpoint(Callback):
    """On SIGTERM or SIGINT during fit: finish the step, save a resumable checkpoint, exit with ``128 + signal``.

    A second Ctrl+C stops at once, without a checkpoint.
    """

    def __init__(self) -> None:
        self.sigint_received = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its SIGTERM handler right before training; Ctrl+C takes the same road (stop after
        # the current step, synchronised across ranks) instead of a KeyboardInterrupt in the middle of a step.
        # Lightning restores the previous handlers when the run ends.
        if threading.current_thread() is not threading.main_thread():
            return
        self.sigint_received = False

        def on_sigint(signum: int, frame: Any) -> None:
            if self.sigint_received:
                raise KeyboardInterrupt
            self.sigint_received = True
            logger.warning(
                "Ctrl+C: stopping after the current step and saving a checkpoint (Ctrl+C again stops at once, "
                "without one)"
            )
            # Lightning's own flag, checked at the end of every batch (and broadcast from rank zero under DDP).
            trainer._signal_connector.received_sigterm = True

        signal.signal(signal.SIGINT, on_sigint)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        signum = signal.SIGINT if self.sigint_received else signal.SIGTERM
        path = last_checkpoint_path(trainer)
        if trainer.is_global_zero and path.is_symlink():
            path.unlink()  # ModelCheckpoint(save_last="link"): write a file, not through the link
        trainer.save_checkpoint(path, weights_only=False)  # the full state: resume needs it
        if trainer.is_global_zero:
            logger.warning(
                "Stopped by %s at step %d. Checkpoint saved to %s; resume with --ckpt_path %s",
                signum.name, trainer.global_step, path, path,
            )
        # Lightning's SIGTERMException is a SystemExit without a status (0: success for a scheduler). The
        # conventional status of a process stopped by a signal is 128 + its number.
        exception.code = 128 + signum


class StepProgressBar(TQDMProgressBar):
    """One bar over the run's optimizer steps: ``step/max_steps`` and steps per second, across epochs.

    Skipped updates leave the step count unchanged; the metrics beside the bar show them (NaN rewards).
    """

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        return Tqdm(
            desc="Training",
            total=trainer.max_steps if trainer.max_steps > 0 else None,
            initial=trainer.global_step,  # a resumed run counts on from its checkpoint's step
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run, not one per epoch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the bar stays open until the run ends

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the version is in the run directory printed at the start
        return metrics
