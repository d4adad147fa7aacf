"""What the ``rlr`` command adds to every run: how it shows progress, where it logs, and how it ends when interrupted.

* :class:`InterruptCheckpoint`: on SIGTERM (a scheduler's stop) or Ctrl+C the current step finishes, a
  checkpoint is saved where ``last.ckpt`` goes, and the process exits with ``128 + signal`` (143 / 130), so
  neither the work nor the failure is lost. It builds on Lightning's own SIGTERM handling, which stops the
  loops at the end of the current batch (in step on every rank) by raising ``SIGTERMException``, a
  ``SystemExit`` whose exit status would be 0. SLURM's requeue signal (SIGUSR1) stays Lightning's.
* :class:`StepProgressBar`: one bar over the run's optimizer steps (``max_steps``) instead of one per epoch.
* :class:`RunDirectory`: records in every checkpoint where the run logs, so that a resumed run continues in the
  same run directory (:func:`continue_run`: the same ``version_N`` and ``metrics.csv``, the same W&B run id).
  :class:`RunTrainer` gives loggers without a directory of their own (W&B) one per run, where their checkpoints
  already go: ``<save_dir>/<name>/<version>``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, cast

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rlr_lightning.errors import import_class

logger = logging.getLogger(__name__)


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where the run's ``last`` checkpoint goes: the (first) ``ModelCheckpoint``'s, or ``<log dir>/checkpoints``."""
    # Duck-typed: Lightning types it as any Checkpoint; one with a dirpath is read as a ModelCheckpoint.
    callback: Any = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        name = callback.format_checkpoint_name(
            {"epoch": trainer.current_epoch, "step": trainer.global_step},
            filename=callback.CHECKPOINT_NAME_LAST,
        )
        return Path(callback.dirpath) / Path(name).name
    return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class StoppedAtOnce(SystemExit):
    """A second Ctrl+C: the run stops where it is, without a checkpoint, with exit status 130.

    A ``SystemExit``, not a ``KeyboardInterrupt``: Lightning answers the latter with its own shutdown line and
    exit status 1, but lets the former through after its cleanup (callbacks' ``on_exception``, loggers
    finalised, signal handlers restored).
    """

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGINT)


class InterruptCheckpoint(Callback):
    """On SIGTERM or SIGINT during fit: finish the step, save a resumable checkpoint, exit with ``128 + signal``.

    A second Ctrl+C stops at once, without a checkpoint (:class:`StoppedAtOnce`, exit status 130).
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
                logger.warning("Ctrl+C again: stopping at once, without a checkpoint")
                raise StoppedAtOnce
            self.sigint_received = True
            logger.warning(
                "Ctrl+C: stopping after the current step and saving a checkpoint (Ctrl+C again stops at once, "
                "without one)"
            )
            # Lightning's own flag, checked at the end of every batch (and broadcast from rank zero under DDP).
            trainer._signal_connector.received_sigterm = True

        signal.signal(signal.SIGINT, on_sigint)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, StoppedAtOnce):
            # As Lightning does on Ctrl+C: processes it launched (DDP ranks) would otherwise wait for this one.
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(getattr(signal, "SIGKILL", signal.SIGTERM))
            return
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        signum = signal.SIGINT if self.sigint_received else signal.SIGTERM
        path = last_checkpoint_path(trainer)
        if trainer.is_global_zero and path.is_symlink():
            path.unlink()  # ModelCheckpoint(save_last="link"): write a file, not through the link
        callback = trainer.checkpoint_callback
        if (
            isinstance(callback, ModelCheckpoint)
            and callback.dirpath
            and Path(callback.dirpath) == path.parent
        ):
            # Saved as the ModelCheckpoint's own last checkpoint (its path is part of the saved state): the
            # resumed run, in this directory, then replaces it instead of writing last-v1.ckpt beside it.
            callback.last_model_path = os.path.join(callback.dirpath, path.name)
        trainer.save_checkpoint(path, weights_only=False)  # the full state: resume needs it
        if trainer.is_global_zero:
            logger.warning(
                "Stopped by %s at step %d. Checkpoint saved to %s; resume with --ckpt_path %s",
                signum.name,
                trainer.global_step,
                path,
                path,
            )
        # Lightning's SIGTERMException is a SystemExit without a status (0: success for a scheduler). The
        # conventional status of a process stopped by a signal is 128 + its number.
        exception.code = 128 + signum


class _StepTqdm(Tqdm):
    """Lightning's bar, with non-finite metrics shown as ``nan`` / ``inf`` and the finished bar drawn once."""

    _closing = False
    _drawn: tuple | None = None

    @staticmethod
    def format_num(n: int | float | str) -> str:
        # Lightning pads numbers to a fixed width by appending ".0"s, which turns a skipped step's NaN reward
        # into "nan.0".
        if isinstance(n, float) and not math.isfinite(n):
            return str(n)
        return Tqdm.format_num(n)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        # tqdm's close() draws the bar once more, identical but for the elapsed time: where the console is a
        # file (a log, a batch job's output) the finished bar would appear twice. Closing ends the line drawn
        # last instead, unless the bar moved since.
        state = (self.n, getattr(self, "postfix", None))
        if self._closing and msg is None and state == self._drawn:
            return True
        self._drawn = state
        return super().display(msg, pos)

    def close(self) -> None:
        self._closing = True
        super().close()


class StepProgressBar(TQDMProgressBar):
    """One bar over the run's optimizer steps: ``step/max_steps`` and steps per second, across epochs.

    Skipped updates leave the step count unchanged; the metrics beside the bar show them (``reward=nan``).
    """

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        return _StepTqdm(
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

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the bar stays open until the run ends

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar
        if bar.n != trainer.global_step:  # the last steps fell between refreshes (refresh_rate > 1)
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.close()  # draws the bar only if it moved since it was last drawn

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the version is in the run directory printed at the start
        return metrics


# -- one run, one directory ------------------------------------------------------------------------------------

#: Checkpoint entry where :class:`RunDirectory` records, per logger, where the run logs.
RUN_RECORD = "rlr_run_directories"


def run_directory(run_logger: Logger, default_root_dir: str) -> str:
    """Where a logger keeps a run's files: CSV and TensorBoard their ``log_dir``, others the folder their
    checkpoints go to (``ModelCheckpoint``'s ``<save_dir>/<name>/<version>``), one per run."""
    if isinstance(run_logger, (CSVLogger, TensorBoardLogger)):
        return run_logger.log_dir
    return os.path.join(
        run_logger.save_dir or default_root_dir, str(run_logger.name), _version_dir(run_logger.version)
    )


def _version_dir(version: int | str | None) -> str:
    """A run directory's name: Lightning's ``version_N``, or a string version (a W&B run id) as it is."""
    return version if isinstance(version, str) else f"version_{version}"


class RunTrainer(L.Trainer):
    """Lightning's Trainer, with a run directory of its own for every logger.

    ``Trainer.log_dir`` is the place of a run's files (its config, LoRA export, before/after grid). For loggers
    other than CSV and TensorBoard, Lightning's is the logger's ``save_dir``, which all runs share (``outputs/wandb``
    holds every W&B run's ``config.yaml`` and ``lora``); here it is the directory their checkpoints go to.
    """

    @property
    def log_dir(self) -> str | None:
        if not self.loggers:
            return super().log_dir
        return self.strategy.broadcast(run_directory(self.loggers[0], self.default_root_dir))


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _kind(cls: type) -> type:
    """The logger class a run directory belongs to (a subclass, such as :class:`ContinuedCSVLogger`, counts as it)."""
    return next((base for base in (CSVLogger, TensorBoardLogger, WandbLogger) if issubclass(cls, base)), cls)


class RunDirectory(Callback):
    """Records in every checkpoint where each logger of the run logs (see :func:`continue_run`)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Plain strings and numbers: the resume reads them with torch.load(weights_only=True).
        checkpoint[RUN_RECORD] = [
            {
                "logger": _qualified_name(type(run_logger)),
                "version": run_logger.version,
                "run_dir": os.path.abspath(run_directory(run_logger, trainer.default_root_dir)),
            }
            for run_logger in trainer.loggers
        ]


class _ContinuedMetricsWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing the run's ``metrics.csv``: Lightning's deletes an existing one."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                # The run's columns: new rows append under them, and a new metric widens them all.
                self.metrics_keys = next(csv.reader(f), [])


class ContinuedCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger``, appending to the ``metrics.csv`` of the version it is given.

    :func:`continue_run` puts it in place of a ``CSVLogger`` when a resumed run continues its run directory.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedMetricsWriter(log_dir=self.log_dir)
        # Lightning types the attribute as fabric's writer; this logger only ever makes the one above.
        return cast(ExperimentWriter, self._experiment)


def _configured_root(cls: type, init_args: Any, default_root_dir: str | None) -> Path | None:
    """The folder a configured logger puts its run directories in (``<save_dir>/<name>``), before it exists."""
    get = init_args.get
    if issubclass(cls, (CSVLogger, TensorBoardLogger)):
        save_dir, name = get("save_dir"), get("name", "lightning_logs")
    elif issubclass(cls, WandbLogger):
        save_dir = get("save_dir", ".") or get("dir")
        name = get("project") or os.environ.get("WANDB_PROJECT", "lightning_logs")
    else:
        return None
    return Path(os.path.abspath(save_dir or default_root_dir or ".")) / (name or "")


def _version_from_path(ckpt_path: str, root: Path) -> int | str | None:
    """The version of a checkpoint in ``<root>/<version>/checkpoints/`` (checkpoints written before
    :class:`RunDirectory` recorded it)."""
    checkpoints = Path(os.path.abspath(ckpt_path)).parent
    if checkpoints.name != "checkpoints" or checkpoints.parent.parent != root:
        return None
    version = checkpoints.parent.name
    number = re.fullmatch(r"version_(\d+)", version)
    return int(number.group(1)) if number else version


def continue_run(trainer_config: Any, ckpt_path: str, record: list[dict] | None) -> list[str]:
    """Point the configured loggers of a resumed fit at the run directory of the run it resumes.

    A CSV or TensorBoard logger gets the run's version (metrics continue in its ``metrics.csv``), a W&B logger
    its run id (W&B resumes that run). Only a logger of the same kind that the command line puts in the same
    place (``save_dir`` and ``name`` / ``project``) continues: another place asks for a new run directory, and
    an explicit version or id is kept. Changes ``trainer_config`` in place (a jsonargparse namespace);
    returns the run directories continued.

    Args:
        trainer_config: The parsed ``trainer`` section.
        ckpt_path: The checkpoint resumed from.
        record: The checkpoint's :data:`RUN_RECORD` (``None`` for a checkpoint written before it existed: CSV
            and TensorBoard runs are then recognised by the checkpoint's place, ``<run directory>/checkpoints``).
    """
    configured = trainer_config.get("logger")
    entries = configured if isinstance(configured, list) else [configured]
    continued = []
    for entry in entries:
        class_path = entry.get("class_path") if hasattr(entry, "get") else None
        cls = import_class(class_path) if class_path else None
        if cls is None:
            continue
        init_args = entry.get("init_args")
        root = _configured_root(cls, init_args, trainer_config.get("default_root_dir")) if init_args else None
        if root is None:
            continue
        version = None
        for logged in record or []:
            logged_cls = import_class(logged["logger"])
            if (
                logged_cls is not None
                and _kind(logged_cls) is _kind(cls)
                and Path(logged["run_dir"]).parent == root
            ):
                version = logged["version"]
                break
        if version is None and record is None and issubclass(cls, (CSVLogger, TensorBoardLogger)):
            version = _version_from_path(ckpt_path, root)
        if version is None:
            continue
        key = "id" if issubclass(cls, WandbLogger) else "version"
        if init_args.get(key) is not None or (key == "id" and init_args.get("version") is not None):
            continue  # the command line names the version: a new or another run, as asked
        init_args[key] = version
        run_dir = root / _version_dir(version)
        if cls is CSVLogger:
            entry.class_path = _qualified_name(ContinuedCSVLogger)
        continued.append(str(run_dir))
    return continued
