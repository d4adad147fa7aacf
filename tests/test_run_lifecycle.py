"""How a run ends when it is stopped: SIGTERM (schedulers) and Ctrl+C save a resumable checkpoint and exit non-zero."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from rlr_lightning.lifecycle import InterruptCheckpoint
from tests.test_fit_cli import quickstart_args, rlr
from tests.test_module import data, make_module


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes_and_exits_143(tmp_path):
    out = tmp_path / "run"
    args = [*quickstart_args(out), "--model.num_steps", "2", "--model.estimator.init_args.h", "1"]
    metrics = out / "rlr" / "version_0" / "metrics.csv"
    log = tmp_path / "console.txt"
    with open(log, "w") as console:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rlr_lightning",
                "fit",
                *args,
                "--trainer.max_steps",
                "100000",
                "--trainer.log_every_n_steps",
                "1",
                "--trainer.logger.init_args.flush_logs_every_n_steps",
                "1",
            ],
            cwd=tmp_path,
            stdout=console,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while not metrics.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # the first step's metrics are flushed: training is under way
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]

    ckpt = out / "rlr" / "version_0" / "checkpoints" / "last.ckpt"  # where ModelCheckpoint(save_last) writes
    step = torch.load(ckpt, weights_only=False)["global_step"]
    # The checkpoint holds the step the run stopped at, as the console told the user.
    assert step >= 1 and f"Stopped by SIGTERM at step {step}. Checkpoint saved to {ckpt}" in log.read_text()
    assert f"resume with --ckpt_path {ckpt}" in log.read_text()

    resumed = rlr("fit", *args, "--ckpt_path", str(ckpt), "--trainer.max_steps", str(step + 1), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # One run, one directory: the resumed run goes on in version_0, its metrics under the same header, at the
    # next step; its config beside the original.
    assert [p.name for p in (out / "rlr").iterdir()] == ["version_0"]
    assert "exists and is not empty" not in resumed.stderr  # Lightning's warnings about a used directory
    assert torch.load(ckpt, weights_only=False)["global_step"] == step + 1
    with open(metrics, newline="") as f:
        rows = list(csv.reader(f))
    assert [row[:2] for row in rows if row[0] == "epoch"] == [["epoch", "step"]]
    assert [int(row[1]) for row in rows[1:]] == list(range(step + 1))
    assert {p.name for p in metrics.parent.glob("config*.yaml")} == {"config.yaml", "config_1.yaml"}


class CtrlCAt(Callback):
    """Presses Ctrl+C (SIGINT to this process) as the given batch starts."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_exits_130(tiny_pipeline_dir, tmp_path):
    default_sigint = signal.getsignal(signal.SIGINT)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=50,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[checkpoints, InterruptCheckpoint(), CtrlCAt(batch_idx=1)],
    )
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(make_module(tiny_pipeline_dir), datamodule=data())
    assert stopped.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is default_sigint  # the run's handler is gone with the run

    # The step under way when Ctrl+C came (the second) finished and is in the checkpoint.
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2
    resumed = make_module(tiny_pipeline_dir)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(resumed, datamodule=data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.global_step == 3
    assert {int(s["step"]) for s in resumed.optimizers().optimizer.state.values()} == {3}
