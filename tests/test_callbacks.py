"""Sample-image logging with offline loggers."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from rlr_lightning.callbacks import SampleImageLogger
from tests.test_module import data, make_module, make_trainer


def test_sample_images_written_for_configured_prompts_with_csv_logger(tiny_pipeline_dir, tmp_path):
    prompts = ["a cat", "a dog", "an owl"]
    callback = SampleImageLogger(prompts=prompts, every_n_steps=2, seed=5)
    module = make_module(tiny_pipeline_dir)
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(tmp_path, max_steps=4, logger=logger, callbacks=[callback])
    trainer.fit(module, datamodule=data())
    samples = tmp_path / "run" / "version_0" / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == ["step_000000.png", "step_000002.png", "step_000004.png"]
    grid = np.asarray(Image.open(samples / "step_000000.png"))
    assert grid.shape[:2] == (16 + 4, 3 * 16 + 4 * 2)  # three 16 px images in one row, save_image padding
    with (samples / "samples.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows[:3]] == prompts and {r["step"] for r in rows} == {"0", "2", "4"}
    # Fixed seeds: training moved the weights, so the same prompts and noise now give other images.
    before = np.asarray(Image.open(samples / "step_000000.png"))
    after = np.asarray(Image.open(samples / "step_000004.png"))
    assert not np.array_equal(before, after)


def test_sample_images_go_to_wandb_offline(tiny_pipeline_dir, tmp_path, monkeypatch):
    logged = []
    logger = WandbLogger(mode="disabled", save_dir=tmp_path)
    monkeypatch.setattr(logger, "log_image", lambda **kw: logged.append(("image", kw)))
    monkeypatch.setattr(logger, "log_table", lambda **kw: logged.append(("table", kw)))
    callback = SampleImageLogger(prompts=["a cat", "a dog"], every_n_steps=10)
    trainer = make_trainer(tmp_path, max_steps=1, logger=logger, callbacks=[callback])
    trainer.fit(make_module(tiny_pipeline_dir), datamodule=data())
    kinds = [k for k, _ in logged]
    assert kinds == ["image", "table"]
    image_call, table_call = logged[0][1], logged[1][1]
    assert len(image_call["images"]) == 2 and image_call["step"] == 0 and "a cat" in image_call["caption"][0]
    assert table_call["columns"] == ["step", "prompt", "reward"] and len(table_call["data"]) == 2


def test_sample_logger_validates_its_settings():
    with pytest.raises(ValueError, match="every_n_steps"):
        SampleImageLogger(every_n_steps=0)
    with pytest.raises(ValueError, match="prompts is empty"):
        SampleImageLogger(prompts=[])
