"""The LoRA export at the end of fit, as a callback: where it goes, and that no run overwrites another's.

``RLRModule`` adds :class:`LoraExport` to every trainer it is fitted by (``configure_callbacks``), so the CLI,
the Python API and the benchmarks all export the same way. Each export carries a record of the run that wrote
it (``rlr_export.json``): a run resumed from its checkpoint replaces its own export, and an ``export_dir`` that
holds another run's export is refused before training starts (or, when it appeared during training, the
export goes to a fresh sibling directory).
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, cast

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

if TYPE_CHECKING:
    from rlr_lightning.module import RLRModule

logger = logging.getLogger(__name__)

#: Written next to an exported ``pytorch_lora_weights.safetensors``: which run wrote it.
EXPORT_RECORD = "rlr_export.json"


class ExportConflictError(FileExistsError):
    """The requested ``export_dir`` already holds LoRA weights exported by another run."""


def export_owner(directory: Path) -> str | None:
    """The run id that exported the LoRA weights in ``directory``; ``None`` if it holds no export.

    An export without a readable record (written by hand or by an older version) belongs to an unknown run.
    """
    record = directory / EXPORT_RECORD
    if record.is_file():
        try:
            return str(json.loads(record.read_text())["run_id"])
        except (ValueError, KeyError, TypeError):
            return "unknown"
    return "unknown" if (directory / "pytorch_lora_weights.safetensors").exists() else None


class LoraExport(L.Callback):
    """Export the module's LoRA weights at the end of fit (rank zero), with a record of the run.

    Args:
        export_dir: Where to export; ``None``: ``<log dir>/lora`` (with the logger off,
            ``<default_root_dir>/lora``), or ``lora_1``, ``lora_2``, ... if that holds another run's export.
    """

    def __init__(self, export_dir: str | None = None) -> None:
        self.export_dir = export_dir
        #: Where this run will export (decided at the start of training).
        self.target: Path | None = None

    def _base(self, trainer: L.Trainer, log_dir: str | None) -> Path:
        return (
            Path(self.export_dir) if self.export_dir else Path(log_dir or trainer.default_root_dir) / "lora"
        )

    def _directory(
        self, trainer: L.Trainer, log_dir: str | None, run_id: str, explicit_conflict: str
    ) -> Path:
        """Where this run's export goes. Runs on rank zero only (no collectives).

        Args:
            explicit_conflict: What to do when ``export_dir`` holds another run's export: ``raise`` (before
                training, when nothing is lost yet) or ``fallback`` to a fresh sibling (after training).
        """
        base = self._base(trainer, log_dir)
        if self.export_dir and explicit_conflict == "raise" and export_owner(base) not in (None, run_id):
            raise ExportConflictError(
                f"model.export_dir {base} already holds LoRA weights exported by another run (see "
                f"{base / EXPORT_RECORD}); choose another --model.export_dir, or delete or move that export, "
                "then start again"
            )
        name = base.absolute().name  # "." has no name of its own
        candidates = itertools.chain([base], (base.parent / f"{name}_{n}" for n in itertools.count(1)))
        return next(c for c in candidates if export_owner(c) in (None, run_id))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Say at once where everything goes (trainer.log_dir broadcasts from rank zero: every rank asks).
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        where = [f"Run directory {run_dir}"]
        checkpoint_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
        if checkpoint_dir and not Path(checkpoint_dir).resolve().is_relative_to(run_dir.resolve()):
            where.append(f"checkpoints in {checkpoint_dir}")
        if self.export_dir and not Path(self.export_dir).resolve().is_relative_to(run_dir.resolve()):
            where.append(f"LoRA export to {self.export_dir}")
        rank_zero_info("; ".join(where))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Decided after the checkpoint is restored (a resumed run recognises its own export by the run id),
        # before training, so a conflict costs nothing. Rank zero decides; every rank gets the answer.
        log_dir = trainer.log_dir
        run_id = cast("RLRModule", pl_module).run_id  # RLRModule's own callback (configure_callbacks)
        target, error = None, None
        if trainer.is_global_zero:
            try:
                target = self._directory(trainer, log_dir, run_id, explicit_conflict="raise")
            except ExportConflictError as conflict:
                error = str(conflict)
            if target is not None and target != self._base(trainer, log_dir):
                logger.info(
                    "%s holds another run's LoRA export: this run will export to %s",
                    self._base(trainer, log_dir),
                    target,
                )
        target, error = trainer.strategy.broadcast((target, error))
        if error is not None:
            raise ExportConflictError(error)
        self.target = target

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # trainer.log_dir broadcasts from rank zero: every rank must ask for it, before the rank check.
        log_dir = trainer.log_dir
        module = cast("RLRModule", pl_module)  # RLRModule's own callback (configure_callbacks)
        if not trainer.is_global_zero or module.backbone is None:
            return
        # Decided at the start of training; checked again, since another run may have exported there since.
        directory = self._directory(trainer, log_dir, module.run_id, explicit_conflict="fallback")
        if self.target is not None and directory != self.target:
            logger.warning(
                "%s now holds another run's LoRA export: exporting to %s instead", self.target, directory
            )
        # The backbone logs where the file went (once).
        module.exported_lora = module.backbone.export_lora(directory)
        record = {
            "run_id": module.run_id,
            "global_step": pl_module.global_step,
            "pretrained_model_name_or_path": pl_module.hparams.get("pretrained_model_name_or_path"),
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (directory / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
