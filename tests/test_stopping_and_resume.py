"""Stopping at once on a second Ctrl+C, and one run directory per run, resumed or not (W&B included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlr_lightning.rewards import TargetColor

ROOT = Path(__file__).resolve().parents[1]
#: Where :class:`StallingReward` says that the second training step is under way.
MARKER_ENV = "RLR_TEST_STEP_MARKER"


class StallingReward(TargetColor):
    """The toy reward; on the second training step it touches ``$RLR_TEST_STEP_MARKER`` and stalls, so that a
    signal sent then arrives in the middle of a step."""

    trained_calls = 0

    def score(self, images, prompts):
        if images.requires_grad:  # a training step (grid renders have no gradient)
            type(self).trained_calls += 1
            if type(self).trained_calls == 2:
                Path(os.environ[MARKER_ENV]).touch()
                time.sleep(120)
        return super().score(images, prompts)


def tiny_fit_args(tiny_dir: Path, out: Path) -> list[str]:
    """``rlr fit`` of a tiny model: a few seconds a step on a CPU."""
    return [
        "--seed_everything",
        "0",
        "--model.pretrained_model_name_or_path",
        str(tiny_dir),
        "--model.num_steps",
        "3",
        "--model.estimator",
        "RLR",
        "--model.estimator.h",
        "1",
        "--data.batch_size",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.default_root_dir",
        str(out),
    ]


def wait_for(condition, proc: subprocess.Popen, console: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, console.read_text()[-3000:]
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint_and_exits_130(tiny_pipeline_dir, tmp_path):
    out, marker, console = tmp_path / "run", tmp_path / "second_step", tmp_path / "console.txt"
    args = [
        *tiny_fit_args(tiny_pipeline_dir, out),
        "--trainer.max_steps",
        "100",
        "--model.reward",
        "tests.test_stopping_and_resume.StallingReward",
    ]
    env = {**os.environ, MARKER_ENV: str(marker), "PYTHONPATH": str(ROOT)}
    with open(console, "w") as stream:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlr_lightning", "fit", *args],
            cwd=tmp_path,
            env=env,
            stdout=stream,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(marker.exists, proc, console)  # the second step is under way
            proc.send_signal(signal.SIGINT)
            wait_for(lambda: "Ctrl+C: stopping after the current step" in console.read_text(), proc, console)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=120) == 128 + signal.SIGINT, console.read_text()[-3000:]
        finally:
            proc.kill()
    text = console.read_text()
    assert "Ctrl+C again: stopping at once, without a checkpoint" in text
    assert "Detected KeyboardInterrupt" not in text and "Traceback" not in text, text[-3000:]
    assert not list(out.rglob("last.ckpt"))  # no checkpoint of the interrupted step


@pytest.mark.slow
def test_wandb_runs_get_a_directory_each_and_a_resume_continues_the_same_run(tiny_pipeline_dir, tmp_path):
    save_dir = tmp_path / "wandb"
    args = [
        *tiny_fit_args(tiny_pipeline_dir, tmp_path / "root"),
        "--config",
        str(ROOT / "configs" / "wandb_offline.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.save_last=true",
    ]
    # Without WANDB_SERVICE: a W&B test run in-process before this one leaves the variable pointing at the
    # pytest process's own wandb service, which would keep the first run registered ("run ID ... is in use").
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "WANDB_MODE": "offline"}

    def fit(*extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "rlr_lightning", "fit", *args, *extra],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    fit("--trainer.max_steps", "1")
    (offline,) = (save_dir / "wandb").glob("offline-run-*")
    run_id = offline.name.rsplit("-", 1)[1]
    run_dir = save_dir / "rlr-lightning" / run_id  # <save_dir>/<project>/<run id>, where its checkpoints go
    assert {p.name for p in run_dir.iterdir()} == {"checkpoints", "config.yaml", "lora"}
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (save_dir / "config.yaml").exists() and not (save_dir / "lora").exists()

    resumed = fit("--trainer.max_steps", "2", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"))
    assert (
        sorted(p.name.rsplit("-", 1)[1] for p in (save_dir / "wandb").glob("offline-run-*")) == [run_id] * 2
    )
    assert [p.name for p in (save_dir / "rlr-lightning").iterdir()] == [run_id]
    # The original config stays; the resumed run's is beside it, and the console says where it went.
    assert {p.name for p in run_dir.glob("config*.yaml")} == {"config.yaml", "config_1.yaml"}
    assert (
        f"Resuming {run_dir / 'checkpoints' / 'last.ckpt'} in its run directory {run_dir}" in resumed.stderr
    )
    assert "this run's config is config_1.yaml" in resumed.stderr
