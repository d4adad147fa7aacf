"""The ``LightningCLI`` behind ``rlr fit`` and ``rlr validate`` (imported only by those commands: Lightning is slow
to import, ``rlr sample`` does not need it).

On top of Lightning's CLI:

* parse errors are one message and a pointer to ``--help`` (the full usage with ``RLR_DEBUG=1``);
* ``--ckpt_path`` is checked before anything loads: a file that is not a checkpoint is named as such, and
  model options that differ from the checkpoint's (which Lightning would silently replace by the
  checkpoint's) are listed, except harmless ones (:data:`RESUME_OVERRIDABLE`), which take the new value;
* Trainer options that manual optimisation cannot honour point to the module's own;
* the resolved config is written next to the run's metrics (never over another run's) and logged as
  hyperparameters to every logger, so runs can be told apart by estimator, reward, optimizer and data;
* one run is one directory: a resumed fit logs into the run directory of the run it resumes (the same
  ``version_N`` and ``metrics.csv``, the same W&B run id; its config goes beside the original one), and a W&B
  run's files go to a directory of its own (:class:`~rlr_lightning.lifecycle.RunTrainer`);
* every fit gets :class:`~rlr_lightning.lifecycle.InterruptCheckpoint` and, unless another progress bar is
  configured, :class:`~rlr_lightning.lifecycle.StepProgressBar`; Lightning's model summary (which lists
  every submodule and cannot count FLOPs here) gives way to the module's one-line summary.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Checkpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from rlr_lightning.errors import directory_problem, short_config_error, yaml_syntax_error
from rlr_lightning.lifecycle import (
    RUN_RECORD,
    InterruptCheckpoint,
    RunDirectory,
    RunTrainer,
    StepProgressBar,
    continue_run,
)

#: Set to 1 to see full tracebacks and jsonargparse's full usage on errors.
DEBUG_ENV = "RLR_DEBUG"

#: Model options a resumed run may change: they do not alter what is trained or how.
RESUME_OVERRIDABLE = frozenset(
    {"export_dir", "log_term_grad_norms", "max_consecutive_skips", "compile_denoiser"}
)

#: Trainer options that manual optimisation rejects, and the module option that does the job.
TRAINER_TO_MODEL_OPTIONS = {
    "gradient_clip_val": ("gradient_clip_val", None),
    "accumulate_grad_batches": ("gradient_accumulation_steps", 1),
}

#: Warnings Lightning gives on rlr runs that no user can act on, matched by the start of the message.
NOT_ACTIONABLE_WARNINGS = (
    # Lightning's own use of a torch pytree API that newer torch deprecates.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # The frozen backbone and the rewards are in eval mode on purpose (no dropout, fixed statistics).
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # With manual optimization a step's checkpoint holds the weights after that step: what resume needs.
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
)
#: The same for ``rlr validate``, which only reads the LoRA weights of a training checkpoint.
NOT_ACTIONABLE_WHEN_VALIDATING = (
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
)
#: Lightning's info lines that tell an rlr user nothing: its advertisements for its cloud services, and which
#: accelerators exist (the config says which one the run uses; an unused GPU still gets Lightning's warning).
_NOT_ACTIONABLE_INFO = ("💡 Tip:", "GPU available: ", "TPU available: ")

#: ``--ckpt_path`` values Lightning resolves itself (they are not files).
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


class UsageError(ValueError):
    """A command line that cannot run as given; the message says what to change."""


class RunFailed(Exception):
    """The run failed after the command line was parsed and its objects built; the cause is the error."""


class RLRArgumentParser(LightningArgumentParser):
    """Parse errors as one line (the option, the bad value, what is valid) and a pointer to ``--help``, not 70
    lines of usage or jsonargparse's union and ``Namespace`` dumps."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or debug_enabled():
            return super().error(message, ex)  # nested parsers raise for jsonargparse to handle
        message = (short_config_error(ex) if ex is not None else None) or message
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {message}\n({prog} --help lists the options)\n")
        self.exit(2)

    def parse_path(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> Namespace:
        # jsonargparse parses the file's text and reports a YAML error at "<unicode string>": name the file.
        problem = yaml_syntax_error(path)
        if problem is not None:
            raise TypeError(problem)
        return super().parse_path(path, *args, **kwargs)


class SaveAndLogConfig(SaveConfigCallback):
    """Writes the resolved config (as ``--print_config`` shows it) into the log directory and logs it as
    hyperparameters to every logger.

    The file is ``config.yaml``, or ``config_1.yaml``, ... where the directory already holds one (a directory
    shared by runs, e.g. with the logger off): another run's config is never overwritten.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            log_dir = Path(trainer.log_dir)  # broadcasts from rank zero: every rank asks
            name = None
            if trainer.is_global_zero:
                stem, suffix = os.path.splitext(self.config_filename)
                names = [self.config_filename] + [f"{stem}_{n}{suffix}" for n in range(1, 10_000)]
                name = next(n for n in names if not (log_dir / n).exists())
                if name != self.config_filename:  # e.g. a resumed run in its run directory: say where it went
                    rank_zero_info(
                        f"{log_dir} already holds {self.config_filename}: this run's config is {name}"
                    )
            self.config_filename = trainer.strategy.broadcast(name)
            self.overwrite = True  # the name is free: nothing to overwrite
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for run_logger in trainer.loggers:
            run_logger.log_hyperparams(config)


def quiet_lightning(subcommand: str | None) -> None:
    """Silence, precisely and in this one place, Lightning's console lines that are not actionable."""
    messages = NOT_ACTIONABLE_WARNINGS + (NOT_ACTIONABLE_WHEN_VALIDATING if subcommand == "validate" else ())
    for message in messages:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        _drop_not_actionable
    )  # once: same object


def _drop_not_actionable(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOT_ACTIONABLE_INFO)


def _plain(value: Any) -> Any:
    """A parsed value as plain data (dicts, lists, scalars), for comparing and printing."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def checkpoint_hyperparameters(path: str) -> dict:
    """The module hyperparameters saved in a Lightning checkpoint; a one-line error for anything else."""
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - torch raises many types; its message suggests an unsafe load
        raise UsageError(
            f"--ckpt_path {path} is not a checkpoint written by rlr fit (torch.load failed: {type(err).__name__})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UsageError(f"--ckpt_path {path} is not a Lightning checkpoint (it has no state_dict)")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    hparams.pop("_class_path", None)
    return hparams


def output_directories(config: Namespace, subcommand: str | None) -> list[tuple[str, str]]:
    """The directories a run writes to, each with the option that sets it: ``trainer.default_root_dir``, the
    loggers' ``save_dir`` / ``dir``, callbacks' ``dirpath`` and, for fit, ``model.export_dir``."""
    found = []
    trainer = config.get("trainer") or Namespace()
    if trainer.get("default_root_dir"):
        found.append(("trainer.default_root_dir", str(trainer.default_root_dir)))
    for group, keys in (("logger", ("save_dir", "dir")), ("callbacks", ("dirpath",))):
        entries = trainer.get(group)
        listed = entries if isinstance(entries, list) else [entries]
        for i, entry in enumerate(listed):
            init_args = entry.get("init_args") if isinstance(entry, Namespace) else None
            if not isinstance(init_args, Namespace):
                continue
            where = f"trainer.{group}" if not isinstance(entries, list) else f"trainer.{group}[{i}]"
            found += [(f"{where}.init_args.{key}", str(init_args[key])) for key in keys if init_args.get(key)]
    model = config.get("model") or Namespace()
    if subcommand == "fit" and model.get("export_dir"):
        found.append(("model.export_dir", str(model.export_dir)))
    return found


class RLRCLI(LightningCLI):
    """``rlr fit`` / ``rlr validate``; see the module docstring."""

    @staticmethod
    def subcommands() -> dict:
        commands = LightningCLI.subcommands()
        return {"fit": commands["fit"], "validate": commands["validate"]}

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path:
            return
        if not Path(ckpt_path).is_file():
            if str(ckpt_path) in _SPECIAL_CKPT_PATHS or str(ckpt_path).startswith("registry:"):
                return super()._parse_ckpt_path()
            raise UsageError(f"--ckpt_path {ckpt_path}: no such file")
        saved = checkpoint_hyperparameters(ckpt_path)
        requested = self.config[subcommand].model
        changed, overridable = [], {}
        for key, value in saved.items():
            if key not in requested:
                continue
            new = _plain(requested[key])
            if _plain(value) == new:
                continue
            if key in RESUME_OVERRIDABLE:
                overridable[key] = requested[key]
            else:
                changed.append(f"  model.{key}: checkpoint {_plain(value)!r}, requested {new!r}")
        if changed:
            run_config = Path(ckpt_path).resolve().parent.parent / "config.yaml"
            hint = f" (the run's config: --config {run_config})" if run_config.is_file() else ""
            raise UsageError(
                f"--ckpt_path {ckpt_path} holds a model trained with other settings; Lightning would use the "
                "checkpoint's and ignore these requested values:\n" + "\n".join(changed) + "\n"
                f"Give the checkpoint's settings{hint} to resume or evaluate it, or start a new run without "
                "--ckpt_path to change them."
            )
        super()._parse_ckpt_path()
        for key, value in overridable.items():
            self.config[subcommand].model[key] = value

    def _continue_resumed_run(self) -> None:
        """A resumed fit logs into the run directory of the run it resumes (see :func:`continue_run`)."""
        config = self.config.fit
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return  # none, or one Lightning finds itself ("last", "hpc")
        record = torch.load(ckpt_path, weights_only=True, map_location="cpu").get(RUN_RECORD)
        for run_dir in continue_run(config.trainer, str(ckpt_path), record):
            rank_zero_info(f"Resuming {ckpt_path} in its run directory {run_dir}")
            # Its checkpoints are there: Lightning's warning about a non-empty checkpoint folder is expected.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    def _set_seed(self) -> None:
        # Lightning announces the seed before the command line is checked; the announcement is made after the
        # checks instead (in before_instantiate_classes), so that a mistake is the only line a user sees.
        seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
        level = seed_logger.level
        seed_logger.setLevel(logging.WARNING)
        try:
            super()._set_seed()
        finally:
            seed_logger.setLevel(level)

    def before_instantiate_classes(self) -> None:
        quiet_lightning(self.subcommand)
        if self.subcommand == "fit":
            self._continue_resumed_run()
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "validate" and not (
            config.data.val_prompts
            or config.data.val_prompt_file
            or config.data.get("val_prompt_set")
            or config.data.val_fraction
        ):
            raise UsageError(
                "rlr validate scores held-out prompts: give some with --data.val_prompts, --data.val_prompt_file, "
                "--data.val_prompt_set or --data.val_fraction"
            )
        from rlr_lightning.rewards import reward_class_names  # imported late like RLRModule below
        from rlr_lightning.tiny import is_tiny_model

        if (
            self.subcommand in ("fit", "validate")
            and config.model.get("reward") is None
            and not is_tiny_model(str(config.model.pretrained_model_name_or_path))
        ):
            # Checked here rather than in RLRModule.setup so that it costs no model load and exits 2 like
            # every other command-line mistake (the tiny test model has a toy default reward).

            action = "train" if self.subcommand == "fit" else "validate"
            raise UsageError(
                f"rlr {self.subcommand} needs a reward to {action} with: give --model.reward, e.g. "
                f"--model.reward rlr_lightning.rewards.AestheticReward; the rewards: {', '.join(reward_class_names())}"
            )
        trainer = config.trainer
        for trainer_key, (model_key, neutral) in TRAINER_TO_MODEL_OPTIONS.items():
            value = trainer.get(trainer_key)
            if value is not None and value != neutral:
                raise UsageError(
                    f"--trainer.{trainer_key} {value} cannot apply: rlr optimises manually (one synchronised "
                    f"backward per step); use --model.{model_key} {value}"
                )
        # Before the model loads: an unwritable directory would otherwise fail at the first log line or, for
        # the LoRA export, only after all the training.
        for option, path in output_directories(config, self.subcommand):
            problem = directory_problem(path)
            if problem is not None:
                raise UsageError(f"--{option} {path} cannot be written: {problem}; give another directory")
        seed = config.get("seed_everything")
        if seed is not None and seed is not False:
            rank_zero_info(f"Seed set to {seed}")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            # A class's own check (e.g. GRPO's group_size) arrives wrapped in jsonargparse's union dump.
            config = self.config[self.subcommand] if self.subcommand else self.config
            short = None if debug_enabled() else short_config_error(err, config)
            if short is None:
                raise
            raise UsageError(short) from err

    def instantiate_trainer(self, **kwargs: Any):
        config = self._get(self.config_init, "trainer", default={})
        configured = config.get("callbacks") or []
        extra = [InterruptCheckpoint(), RunDirectory()]
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            extra.append(StepProgressBar())
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": extra}
        if self.subcommand == "fit" and not self.datamodule.val_records:
            kwargs["limit_val_batches"] = (
                0  # no held-out prompts: no validation loop (and no empty-loader warning)
            )
        if self.subcommand == "validate":
            # The training config's checkpoint callbacks have nothing to save (and would warn about their state).
            kwargs["callbacks"] = [c for c in configured if not isinstance(c, Checkpoint)]
            kwargs["enable_checkpointing"] = False
        return super().instantiate_trainer(**kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        # Errors from here on happen during the run (exit status 1), not in the command line (status 2).
        try:
            super()._run_subcommand(subcommand)
        except Exception as err:
            raise RunFailed(str(err)) from err


def build(argv: list[str] | None, run: bool = True, prog: str | None = None) -> RLRCLI:
    """The CLI over :class:`RLRModule` and :class:`PromptDataModule` (``run=False``: parse and instantiate only,
    with no subcommand; ``prog`` names the command in its messages)."""
    from rlr_lightning.data import PromptDataModule
    from rlr_lightning.module import RLRModule

    return RLRCLI(
        RLRModule,
        PromptDataModule,
        args=argv,
        run=run,
        auto_configure_optimizers=False,
        parser_class=RLRArgumentParser,
        save_config_callback=SaveAndLogConfig,
        trainer_class=RunTrainer,
        trainer_defaults={"enable_model_summary": False},
        parser_kwargs={"prog": prog or "rlr"} if run or prog else {},
    )
