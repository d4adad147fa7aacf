"""What ``rlr fit`` prints: its own lines, one progress bar drawn to its end once, and no other library's noise."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger

from rlr_lightning.estimators import GRPO
from rlr_lightning.rewards import TargetColor

ROOT = Path(__file__).resolve().parents[1]

#: Longer than the tiny model's text encoder reads (16 tokens): cut when trained on.
LONG_TRAINING_PROMPT = (
    "a watercolour painting of a red fox asleep under a tall pine tree beside a frozen lake at dawn"
)
#: Longer too, but only a before/after grid caption: never trained on.
LONG_GRID_CAPTION = (
    "an oil painting of three sailing boats in a harbour at sunset with seagulls and fishermen"
)


class NaNOnceReward(TargetColor):
    """The toy reward, NaN for the first batch trained on (a skipped step), finite for renders and later steps."""

    trained_calls = 0

    def score(self, images, prompts):
        rewards = super().score(images, prompts)
        if not images.requires_grad:  # a grid render, without gradient
            return rewards
        type(self).trained_calls += 1
        return rewards + float("nan") if type(self).trained_calls == 1 else rewards


@pytest.fixture(scope="module")
def tiny_fit_console(tmp_path_factory):
    """``rlr fit`` of the tiny model for 2 steps after a skipped one, building the model on first use (an empty
    cache), with a cut training prompt and a cut grid caption: (process, run directory)."""
    tmp = tmp_path_factory.mktemp("console")
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "log_every_n_steps": 1,
            "default_root_dir": str(tmp / "run"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp / "run"), "name": "rlr"},
            },
            "callbacks": [
                {
                    "class_path": "rlr_lightning.callbacks.BeforeAfterGrid",
                    "init_args": {"prompts": [LONG_GRID_CAPTION, "a red circle"], "scale": 1},
                }
            ],
        },
        "model": {
            "pretrained_model_name_or_path": "tiny",
            "num_steps": 2,
            "estimator": {"class_path": "rlr_lightning.estimators.RLR", "init_args": {"h": 1}},
            "reward": {"class_path": "tests.test_console.NaNOnceReward"},
        },
        "data": {"prompts": [LONG_TRAINING_PROMPT, "a blue square"], "batch_size": 2},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "RLR_CACHE": str(tmp / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "rlr_lightning", "fit", "--config", str(path)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, tmp / "run" / "rlr" / "version_0"


@pytest.mark.slow
def test_fit_console_shows_no_other_librarys_bars_or_accelerator_lines(tiny_fit_console):
    proc, _ = tiny_fit_console
    console = proc.stdout + proc.stderr
    assert "Backbone tiny" in console  # the model was built and loaded in this run
    for noise in (
        "Loading weights",
        "Writing model shards",
        "Loading pipeline components",
        "GPU available",
        "TPU available",
        "💡 Tip",
    ):
        assert noise not in console, noise


@pytest.mark.slow
def test_progress_bar_ends_once_and_shows_a_skipped_steps_reward_as_nan(tiny_fit_console):
    proc, _ = tiny_fit_console
    # Where the console is not a terminal every redraw stays: the finished bar must be there once.
    assert len(re.findall(r"Training: 100%\S* *\S* 2/2 ", proc.stdout)) == 1, proc.stdout
    assert "train/reward=nan," in proc.stdout and "nan.0" not in proc.stdout
    assert "Skipping update at step 0: non-finite reward" in proc.stderr


@pytest.mark.slow
def test_truncation_warning_names_the_cut_training_prompt_not_a_grid_caption(tiny_fit_console):
    proc, run_dir = tiny_fit_console
    lines = proc.stderr.splitlines()
    training = [line for line in lines if "longer prompts are cut" in line]
    assert len(training) == 1 and "a watercolour painting of a red fox" in training[0], proc.stderr[-3000:]
    assert "an oil painting" not in training[0]
    # The grid says itself that its caption is drawn cut, as the grid's.
    grid = [line for line in lines if line.startswith("WARNING rlr_lightning.callbacks: BeforeAfterGrid")]
    assert (
        len(grid) == 1 and "1 of its 2 prompts" in grid[0] and "an oil painting of three sailing" in grid[0]
    )
    assert (run_dir / "before_after.png").is_file()


def test_grpo_logs_sampled_batches_beside_optimizer_steps(tiny_pipeline_dir, tmp_path):
    from tests.test_module import data, make_module

    module = make_module(
        tiny_pipeline_dir, num_steps=2, estimator=GRPO(group_size=2, inner_updates=2, clip_range=0.2)
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path, name="grpo"),
    )
    trainer.fit(module, datamodule=data(batch_size=1))
    assert trainer.global_step == 4  # max_steps: optimizer steps, two per sampled batch
    with open(Path(trainer.log_dir) / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/reward")]
    assert [float(row["train/sampled_batches"]) for row in rows] == [1.0, 2.0]
