"""Sample-image logging with offline loggers, and the before/after grid."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from rlr_lightning.callbacks import BeforeAfterGrid, SampleImageLogger, to_uint8
from rlr_lightning.data import PromptBatch
from tests.test_module import data, make_module, make_trainer


def test_sample_images_written_for_configured_prompts_with_csv_logger(tiny_pipeline_dir, tmp_path):
    prompts = ["a cat", "a dog", "an owl"]
    callback = SampleImageLogger(prompts=prompts, every_n_steps=2, seed=5)
    module = make_module(tiny_pipeline_dir)
    logger = CSVLogger(tmp_path, name="run")
    trainer = make_trainer(tmp_path, max_steps=4, logger=logger, callbacks=[callback])
    trainer.fit(module, datamodule=data())
    samples = tmp_path / "run" / "version_0" / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == [
        "step_000000.png",
        "step_000002.png",
        "step_000004.png",
    ]
    grid = np.asarray(Image.open(samples / "step_000000.png"))
    assert grid.shape[:2] == (16 + 4, 3 * 16 + 4 * 2)  # three 16 px images in one row, save_image padding
    with (samples / "samples.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows[:3]] == prompts and {r["step"] for r in rows} == {"0", "2", "4"}
    # Fixed seeds: training moved the weights, so the same prompts and noise now give other images.
    before = np.asarray(Image.open(samples / "step_000000.png"))
    after = np.asarray(Image.open(samples / "step_000004.png"))
    assert not np.array_equal(before, after)


def expected_pixels(tiny_pipeline_dir, prompts: list[str], seed: int) -> list[np.ndarray]:
    """What the untrained module generates for these prompts and seed, as 0-255 HWC arrays."""
    module = make_module(tiny_pipeline_dir)
    module.configure_model()
    with torch.no_grad():
        images = module.generate(PromptBatch.from_prompts(prompts), torch.Generator().manual_seed(seed))
    return [np.rint(image.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for image in images]


def grid_tiles(grid: np.ndarray, count: int, size: int = 16, padding: int = 2) -> list[np.ndarray]:
    """The images of a one-row ``make_grid`` PNG."""
    return [grid[padding : padding + size, padding + i * (size + padding) :][:, :size] for i in range(count)]


@pytest.mark.slow
def test_wandb_offline_run_holds_the_generated_pixels_and_the_reward_table(
    tiny_pipeline_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest disables W&B; offline writes files, reaches no one
    prompts, seed = ["a cat", "a dog"], 3
    wandb_logger = WandbLogger(mode="offline", save_dir=tmp_path)
    csv_logger = CSVLogger(tmp_path, name="csv")
    callback = SampleImageLogger(prompts=prompts, every_n_steps=10, seed=seed)  # renders before training only
    trainer = make_trainer(tmp_path, max_steps=1, logger=[wandb_logger, csv_logger], callbacks=[callback])
    trainer.fit(make_module(tiny_pipeline_dir), datamodule=data())
    run_dir = Path(wandb_logger.experiment.dir).parent
    wandb_logger.experiment.finish()

    pngs = sorted((run_dir / "files" / "media" / "images").glob("samples_*.png"))
    logged = [np.asarray(Image.open(p).convert("RGB")) for p in pngs]
    expected = expected_pixels(tiny_pipeline_dir, prompts, seed)
    assert len(logged) == len(prompts)
    assert all(image.std() > 10 for image in logged), "W&B images are flat (black)"
    # wandb names files by content hash, so match them as a set.
    assert sorted(a.tobytes() for a in logged) == sorted(a.tobytes() for a in expected)
    grid = np.asarray(Image.open(tmp_path / "csv" / "version_0" / "samples" / "step_000000.png"))
    assert all(np.array_equal(tile, image) for tile, image in zip(grid_tiles(grid, len(prompts)), expected))

    (table_file,) = (run_dir / "files" / "media" / "table").glob("samples_table_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["step", "prompt", "reward"]
    assert [row[:2] for row in table["data"]] == [[0, p] for p in prompts]
    assert all(np.isfinite(row[2]) for row in table["data"])


@pytest.mark.slow
def test_tensorboard_event_file_holds_the_generated_pixels(tiny_pipeline_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    prompts, seed = ["a cat", "a dog"], 3
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    callback = SampleImageLogger(prompts=prompts, every_n_steps=10, seed=seed)
    trainer = make_trainer(tmp_path, max_steps=1, logger=tb_logger, callbacks=[callback])
    trainer.fit(make_module(tiny_pipeline_dir), datamodule=data())
    tb_logger.experiment.flush()

    events = EventAccumulator(tb_logger.log_dir, size_guidance={IMAGES: 0})
    events.Reload()
    (event,) = events.Images("samples")
    grid = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    # TensorBoard tiles a batch side by side without padding.
    expected = expected_pixels(tiny_pipeline_dir, prompts, seed)
    assert event.step == 0 and np.array_equal(grid, np.concatenate(expected, axis=1))


def test_sample_logger_validates_its_settings():
    with pytest.raises(ValueError, match="every_n_steps"):
        SampleImageLogger(every_n_steps=0)
    with pytest.raises(ValueError, match="prompts is empty"):
        SampleImageLogger(prompts=[])


def generated(module, prompts: list[str], seed: int) -> torch.Tensor:
    with torch.no_grad():
        return to_uint8(
            module.generate(PromptBatch.from_prompts(prompts), torch.Generator().manual_seed(seed))
        )


def test_lora_disabled_is_the_base_model_and_keeps_the_adapter_trainable(tiny_pipeline_dir):
    prompts, seed = ["a cat", "a dog"], 1
    base = make_module(tiny_pipeline_dir)
    base.configure_model()  # LoRA B starts at zero: exactly the base model
    tuned = make_module(tiny_pipeline_dir)
    tuned.configure_model()
    with torch.no_grad():
        for p in tuned.backbone.lora_parameters().values():
            p.add_(torch.randn_like(p) * 0.5)
    trainable = set(tuned.backbone.lora_parameters())
    with tuned.backbone.lora_disabled():
        off = generated(tuned, prompts, seed)
    assert torch.equal(off, generated(base, prompts, seed))
    assert not torch.equal(generated(tuned, prompts, seed), off)
    assert set(tuned.backbone.lora_parameters()) == trainable


@pytest.mark.slow
def test_before_after_grid_shows_the_base_model_and_the_trained_one(tiny_pipeline_dir, tmp_path):
    prompts, seed = ["a cat", "a dog", "an owl"], 4
    callback = BeforeAfterGrid(prompts=prompts, seed=seed, scale=2)
    module = make_module(tiny_pipeline_dir)
    module.configure_model()
    with torch.no_grad():  # as a resumed run: the LoRA is already away from the base model
        for p in module.backbone.lora_parameters().values():
            p.add_(torch.randn_like(p) * 0.5)
    with module.backbone.lora_disabled():
        base_images = generated(module, prompts, seed)
    trainer = make_trainer(
        tmp_path,
        max_steps=2,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[callback],
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=data())
    run = tmp_path / "run" / "version_0"
    assert (run / "metrics.csv").is_file()
    grid = Image.open(run / "before_after.png").convert("RGB")
    after_images = generated(module, prompts, seed)
    assert not torch.equal(after_images, base_images)
    boxes = callback.tile_boxes(prompts, base_images.shape[-1])
    for row, images in enumerate((base_images, after_images)):
        for box, image in zip(boxes[row], images):
            tile = np.asarray(grid.crop(box).resize(image.shape[1:], Image.NEAREST))
            assert np.array_equal(tile, image.permute(1, 2, 0).numpy())
    with (run / "before_after.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == prompts
    rewards_after = module.reward(after_images.float() / 255, prompts)
    assert [float(r["reward_after"]) for r in rows] == pytest.approx(rewards_after.tolist(), abs=0.02)


def test_before_after_grid_rejects_bad_settings():
    with pytest.raises(ValueError, match="scale must be >= 1, got 0"):
        BeforeAfterGrid(scale=0)
    with pytest.raises(ValueError, match="prompts is empty"):
        BeforeAfterGrid(prompts=[])
