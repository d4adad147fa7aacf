"""Sample-image logging with offline loggers, and the before/after grid."""

from __future__ import annotations

import csv
import io
import json
import math
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image

from rlr_lightning.callbacks import BeforeAfterGrid, SampleImageLogger, to_uint8
from rlr_lightning.data import PromptBatch
from rlr_lightning.grids import BeforeAfterLayout
from rlr_lightning.rewards import RewardModel
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


# Videos: the callbacks' branch for a task whose `generate` returns (B, F, 3, H, W). The module below is a real
# LightningModule, minimal at the callback boundary (its backbone, reward and task.generate are what the
# callbacks call); the video families' own end-to-end tests cover real video models.


class VideoBackbone:
    """What the callbacks use of a backbone: no tokenizers (no prompt is cut) and the two switches."""

    tokenizers = ()

    def __init__(self) -> None:
        self.lora_on = True

    @contextmanager
    def lora_disabled(self):
        self.lora_on = False
        try:
            yield
        finally:
            self.lora_on = True

    @contextmanager
    def prompt_limit_unchecked(self):
        yield


class MeanBrightness(RewardModel):
    video = True
    differentiable = False

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3, 4))


class VideoModule(L.LightningModule):
    """Generates smooth 16x16 videos of 4 frames from the seed, brightened by ``shift``: its one trained
    weight, which ``lora_disabled`` leaves out (the base model). Training moves ``shift`` to 0.2."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(shift))
        self.backbone = VideoBackbone()
        self.reward = MeanBrightness().freeze()
        self.task = SimpleNamespace(generate=self.generate_videos)

    def generate_videos(self, batch: PromptBatch, generator: torch.Generator) -> torch.Tensor:
        phase = torch.rand(len(batch), 1, 3, 1, 1, generator=generator) * 2 * math.pi
        y = torch.arange(16).view(16, 1).float()
        x = torch.arange(16).view(1, 16).float()
        t = torch.arange(4).view(1, 4, 1, 1, 1).float()
        videos = 0.4 + 0.3 * torch.sin(x / 5 + y / 7 + t / 2 + phase)
        return (videos + (self.shift if self.backbone.lora_on else 0)).clamp(0, 1)

    def training_step(self, batch, batch_idx):
        return (self.shift - 0.2) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)  # one step lands on 0.2 from any start

    def train_dataloader(self):
        return torch.utils.data.DataLoader([0.0] * 8, batch_size=1)


def video_of(prompts: list[str], seed: int, shift: float) -> torch.Tensor:
    """The ``uint8`` videos a ``VideoModule`` of this ``shift`` generates."""
    module = VideoModule(shift)
    with torch.no_grad():
        return to_uint8(
            module.generate_videos(PromptBatch.from_prompts(prompts), torch.Generator().manual_seed(seed))
        )


def assert_mp4_close(path: Path, video: torch.Tensor) -> None:
    from rlr_lightning.video import read_video
    from tests.test_video_io import MP4_MAX_ERROR, MP4_MEAN_ERROR

    error = (read_video(path).int() - video.int()).abs()
    assert (
        error.shape == video.shape and error.max() <= MP4_MAX_ERROR and error.float().mean() <= MP4_MEAN_ERROR
    )


def test_sample_videos_written_as_mp4s_with_the_table_with_csv_logger(tmp_path):
    pytest.importorskip("av")
    prompts, seed = ["a cat", "a dog"], 2
    callback = SampleImageLogger(prompts=prompts, every_n_steps=2, seed=seed, fps=4)
    trainer = make_trainer(
        tmp_path, max_steps=2, logger=CSVLogger(tmp_path, name="run"), callbacks=[callback]
    )
    trainer.fit(VideoModule())
    samples = tmp_path / "run" / "version_0" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        "samples.csv",
        "step_000000_00.mp4",
        "step_000000_01.mp4",
        "step_000002_00.mp4",
        "step_000002_01.mp4",
    ]
    for step, shift in ((0, 0.0), (2, 0.2)):
        for i, video in enumerate(video_of(prompts, seed, shift)):
            assert_mp4_close(samples / f"step_{step:06d}_{i:02d}.mp4", video)
    with (samples / "samples.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["prompt"]) for r in rows] == [
        ("0", "a cat"),
        ("0", "a dog"),
        ("2", "a cat"),
        ("2", "a dog"),
    ]
    expected = [v.float().mean().item() / 255 for shift in (0.0, 0.2) for v in video_of(prompts, seed, shift)]
    assert [float(r["reward"]) for r in rows] == pytest.approx(expected, abs=0.01)


def test_sample_videos_go_to_tensorboard_as_gifs_of_the_generated_pixels(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, TENSORS, EventAccumulator

    prompts, seed = ["a cat", "a dog"], 3
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    callback = SampleImageLogger(prompts=prompts, every_n_steps=10, seed=seed)
    trainer = make_trainer(tmp_path, max_steps=1, logger=tb_logger, callbacks=[callback])
    trainer.fit(VideoModule())
    tb_logger.experiment.flush()

    events = EventAccumulator(tb_logger.log_dir, size_guidance={IMAGES: 0, TENSORS: 0})
    events.Reload()
    assert sorted(events.Tags()[IMAGES]) == ["samples/0", "samples/1"]
    for i, video in enumerate(video_of(prompts, seed, 0.0)):
        (event,) = events.Images(f"samples/{i}")
        gif = Image.open(io.BytesIO(event.encoded_image_string))
        frames = []
        for index in range(gif.n_frames):
            gif.seek(index)
            frames.append(torch.from_numpy(np.array(gif.convert("RGB"))).permute(2, 0, 1))
        # 16x16 frames have at most 256 colours: the GIF holds them exactly.
        assert event.step == 0 and torch.equal(torch.stack(frames), video)
        assert events.SummaryMetadata(f"samples/{i}").summary_description.startswith(f"{prompts[i]} (reward ")
    assert "samples_rewards/text_summary" in events.Tags()[TENSORS]


def test_sample_videos_go_to_wandb_as_mp4s_with_the_table(tmp_path, monkeypatch):
    pytest.importorskip("av")
    monkeypatch.setenv("WANDB_MODE", "offline")
    prompts, seed = ["a cat", "a dog"], 3
    wandb_logger = WandbLogger(mode="offline", save_dir=tmp_path)
    callback = SampleImageLogger(prompts=prompts, every_n_steps=10, seed=seed)
    trainer = make_trainer(tmp_path, max_steps=1, logger=wandb_logger, callbacks=[callback])
    trainer.fit(VideoModule())
    run_dir = Path(wandb_logger.experiment.dir).parent
    wandb_logger.experiment.finish()

    files = sorted((run_dir / "files" / "media" / "videos").glob("samples_0_*.mp4"))
    assert len(files) == len(prompts)
    from tests.test_video_io import wandb_video_captions

    caption_of = wandb_video_captions(run_dir / f"run-{wandb_logger.version}.wandb", count=len(prompts))
    videos = video_of(prompts, seed, 0.0)
    for file in files:
        caption = caption_of[f"media/videos/{file.name}"]
        prompt = caption.split(" (reward ")[0]
        assert_mp4_close(file, videos[prompts.index(prompt)])
    (table_file,) = (run_dir / "files" / "media" / "table").glob("samples_table_*.table.json")
    assert [row[:2] for row in json.loads(table_file.read_text())["data"]] == [[0, p] for p in prompts]


def test_before_after_of_videos_writes_a_strip_and_two_mp4s_per_prompt(tmp_path):
    pytest.importorskip("av")
    prompts, seed = ["a cat", "a dog"], 4
    callback = BeforeAfterGrid(prompts=prompts, seed=seed, scale=2)
    trainer = make_trainer(
        tmp_path, max_steps=2, logger=CSVLogger(tmp_path, name="run"), callbacks=[callback]
    )
    trainer.fit(VideoModule(shift=0.5))  # as a resumed run: the trained weight is already away from the base
    run = tmp_path / "run" / "version_0"
    folder = run / "before_after"
    assert sorted(p.name for p in folder.iterdir()) == [
        "00.png",
        "00_after.mp4",
        "00_before.mp4",
        "01.png",
        "01_after.mp4",
        "01_before.mp4",
    ]
    assert not (run / "before_after.png").exists()
    before, after = video_of(prompts, seed, 0.0), video_of(prompts, seed, 0.2)
    labels = [f"frame {i}" for i in range(4)]
    boxes = BeforeAfterLayout(scale=2).tile_boxes(labels, (16, 16))
    for i in range(len(prompts)):
        assert_mp4_close(folder / f"{i:02d}_before.mp4", before[i])
        assert_mp4_close(folder / f"{i:02d}_after.mp4", after[i])
        strip = Image.open(folder / f"{i:02d}.png").convert("RGB")
        grid = strip.crop((0, strip.height - boxes[1][-1][3], strip.width, strip.height))
        for row, video in enumerate((before[i], after[i])):
            for box, frame in zip(boxes[row], video):
                tile = np.asarray(grid.crop(box).resize((16, 16), Image.Resampling.NEAREST))
                assert np.array_equal(tile, frame.permute(1, 2, 0).numpy())
    with (run / "before_after.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == prompts
    assert [float(r["reward_before"]) for r in rows] == pytest.approx(
        [v.float().mean().item() / 255 for v in before], abs=0.01
    )
    assert [float(r["reward_after"]) for r in rows] == pytest.approx(
        [v.float().mean().item() / 255 for v in after], abs=0.01
    )


def test_video_settings_are_checked():
    with pytest.raises(ValueError, match="fps must be > 0"):
        SampleImageLogger(fps=0)
    with pytest.raises(ValueError, match="fps must be > 0"):
        BeforeAfterGrid(fps=-1)
