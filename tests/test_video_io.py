"""Video out: MP4 and GIF files read back, before/after strips, and videos logged to real TensorBoard and
(offline) W&B runs, read back from what those loggers wrote."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rlr_lightning.grids import BeforeAfterLayout, to_uint8
from rlr_lightning.video import gif_bytes, log_videos, read_video, video_strip, write_gif, write_mp4

pytest.importorskip("av")

# Errors of decoded MP4 pixels (0-255) on the smooth frames below, measured with PyAV 18.1 over 30 seeds and
# sizes 15x17 to 48x80 (plus margin for other FFmpeg builds):
#: Largest error. Measured: at most 22, on the frame's rim, where the half-resolution colour has no neighbour
#: (converting to yuv420p and back without encoding alone gives 15 to 17 there).
MP4_MAX_ERROR = 32
#: Mean error. Measured: 1.0 to 1.65, about 0.8 of it from the half-resolution colour alone.
MP4_MEAN_ERROR = 2.5
#: Largest error inside a 2-pixel rim. Measured: at most 9.
MP4_INNER_ERROR = 12


def smooth_video(frames: int = 6, height: int = 32, width: int = 48, seed: int = 0) -> torch.Tensor:
    """A float video ``(F, 3, H, W)`` in [0.1, 0.9]: colour waves moving across the frame, smooth like a
    model's output (noise would only measure the colour subsampling, which loses it by design)."""
    phase = torch.rand(3, generator=torch.Generator().manual_seed(seed)) * 2 * math.pi
    y = torch.arange(height).view(1, 1, height, 1).float()
    x = torch.arange(width).view(1, 1, 1, width).float()
    t = torch.arange(frames).view(frames, 1, 1, 1).float()
    return 0.5 + 0.4 * torch.sin(x / 7 + y / 11 + t / 2 + phase.view(1, 3, 1, 1))


def noise_video(frames: int = 5, height: int = 16, width: int = 16, seed: int = 0) -> torch.Tensor:
    """A ``uint8`` video of independent random pixels: 16x16 frames have at most 256 colours (GIF-exact), and
    consecutive frames differ (the GIF writer keeps every frame)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (frames, 3, height, width), generator=generator, dtype=torch.uint8)


def mp4_errors(decoded: torch.Tensor, frames: torch.Tensor) -> tuple[int, float, int]:
    """Largest, mean and inner (2-pixel rim left out) absolute error of ``decoded`` against ``frames``."""
    error = (decoded.int() - frames.int()).abs()
    return int(error.max()), float(error.float().mean()), int(error[..., 2:-2, 2:-2].max())


@pytest.mark.parametrize("size", [(32, 48), (16, 16), (64, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_mp4_round_trip_keeps_frames_shape_and_pixels_close(tmp_path, size):
    video = smooth_video(frames=7, height=size[0], width=size[1], seed=sum(size))
    path = write_mp4(video, tmp_path / "video.mp4", fps=8)
    assert path == tmp_path / "video.mp4" and path.read_bytes()[4:8] == b"ftyp"
    decoded = read_video(path)
    assert decoded.dtype == torch.uint8 and decoded.shape == (7, 3, *size)
    largest, mean, inner = mp4_errors(decoded, to_uint8(video))
    assert largest <= MP4_MAX_ERROR and mean <= MP4_MEAN_ERROR and inner <= MP4_INNER_ERROR, (
        largest,
        mean,
        inner,
    )


def test_mp4_of_uint8_frames_is_the_mp4_of_their_float_frames(tmp_path):
    video = smooth_video(frames=3, height=16, width=16)
    from_float = read_video(write_mp4(video, tmp_path / "float.mp4"))
    from_uint8 = read_video(write_mp4(to_uint8(video), tmp_path / "uint8.mp4"))
    assert torch.equal(from_float, from_uint8)


def test_mp4_single_frame_and_stream_settings(tmp_path):
    import av

    video = smooth_video(frames=1, height=16, width=16)
    path = write_mp4(video, tmp_path / "one.mp4", fps=12)
    assert read_video(path).shape == (1, 3, 16, 16)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 12


def test_mp4_of_odd_sides_is_padded_by_repeating_the_last_row_and_column(tmp_path):
    video = smooth_video(frames=4, height=15, width=17, seed=3)
    decoded = read_video(write_mp4(video, tmp_path / "odd.mp4"))
    assert decoded.shape == (4, 3, 16, 18)
    expected = torch.nn.functional.pad(to_uint8(video).float(), (0, 1, 0, 1), mode="replicate")
    largest, mean, _ = mp4_errors(decoded, expected.to(torch.uint8))
    assert largest <= MP4_MAX_ERROR and mean <= MP4_MEAN_ERROR, (largest, mean)
    # The padding repeats the edge: the added row and column match the ones they copy, within the error.
    assert (decoded[..., -1, :].int() - decoded[..., -2, :].int()).abs().max() <= MP4_MAX_ERROR
    assert (decoded[..., :, -1].int() - decoded[..., :, -2].int()).abs().max() <= MP4_MAX_ERROR


def test_gif_round_trip_is_exact_for_frames_of_at_most_256_colours(tmp_path):
    video = noise_video(frames=5)
    assert all(len(torch.unique(frame.reshape(3, -1), dim=1).T) <= 256 for frame in video)
    path = write_gif(video, tmp_path / "video.gif", fps=8)
    assert torch.equal(read_video(path), video)
    with Image.open(path) as gif:
        assert gif.info["loop"] == 0  # loops forever
        durations = []
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
    # 8 fps is 12.5 hundredths per frame: the delays alternate so five frames last 0.62 s, not 0.6 s.
    assert sum(durations) == 620 and set(durations) == {120, 130}


def test_gif_of_float_frames_is_the_gif_of_their_uint8_frames():
    video = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert gif_bytes(video) == gif_bytes(to_uint8(video))


def test_gif_of_rich_frames_is_quantised_close(tmp_path):
    video = smooth_video(frames=3, height=32, width=48)
    decoded = read_video(write_gif(video, tmp_path / "rich.gif"))
    error = (decoded.int() - to_uint8(video).int()).abs()
    assert decoded.shape == (3, 3, 32, 48) and float(error.float().mean()) < 4


def test_gif_stores_repeated_frames_once_for_their_summed_time(tmp_path):
    first, second = noise_video(frames=2, seed=4)
    path = write_gif(torch.stack([first, first, second]), tmp_path / "still.gif", fps=10)
    assert torch.equal(read_video(path), torch.stack([first, second]))
    with Image.open(path) as gif:
        assert gif.info["duration"] == 200


def test_writers_reject_bad_frames_and_rates(tmp_path):
    with pytest.raises(ValueError, match=r"\(F, 3, H, W\)"):
        write_mp4(torch.zeros(2, 16, 16, 3), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="at least one frame"):
        write_gif(torch.zeros(0, 3, 8, 8), tmp_path / "x.gif")
    with pytest.raises(ValueError, match="fps must be > 0"):
        write_mp4(torch.zeros(1, 3, 8, 8), tmp_path / "x.mp4", fps=0)
    with pytest.raises(ValueError, match="fps must be <= 50"):
        write_gif(torch.zeros(1, 3, 8, 8), tmp_path / "x.gif", fps=60)


def test_without_pyav_mp4s_fail_with_the_extra_to_install_and_gifs_still_work(tmp_path, monkeypatch):
    video = noise_video(frames=2)
    mp4 = write_mp4(video, tmp_path / "before.mp4")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    message = re.escape("video output needs PyAV: pip install 'rlr_lightning[video]'")
    with pytest.raises(ImportError, match=message):
        write_mp4(video, tmp_path / "x.mp4")
    with pytest.raises(ImportError, match=message):
        read_video(mp4)
    with pytest.raises(ImportError, match=message):
        log_videos(None, "samples", video[None], ["a cat"], step=0, directory=tmp_path)
    assert torch.equal(read_video(write_gif(video, tmp_path / "x.gif")), video)


def test_package_and_callbacks_import_without_pyav():
    # In a fresh interpreter: this one has already imported whatever it imported.
    code = "import sys; sys.modules['av'] = None; import rlr_lightning.video, rlr_lightning.callbacks"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_video_strip_puts_each_prompts_before_frames_above_its_after_frames():
    before = torch.stack([noise_video(frames=12, height=8, width=12, seed=s) for s in (0, 1)])
    after = torch.stack([noise_video(frames=12, height=8, width=12, seed=s) for s in (2, 3)])
    captions = ["a cat chasing a ball across a sunny lawn", "a dog"]
    strips = video_strip(before, after, captions, scale=2, max_frames=4)
    assert len(strips) == 2
    shown = [0, 4, 7, 11]  # four frames evenly from the first to the last
    layout = BeforeAfterLayout(scale=2)
    boxes = layout.tile_boxes([f"frame {i}" for i in shown], (8, 12))
    for strip, first, second in zip(strips, before, after):
        # The caption band sits on top of the layout's grid: its height is what the strip adds.
        grid_height = boxes[1][-1][3]
        assert strip.mode == "RGB" and strip.width == boxes[1][-1][2] and strip.height > grid_height
        grid = strip.crop((0, strip.height - grid_height, strip.width, strip.height))
        for row, video in enumerate((first, second)):
            for box, index in zip(boxes[row], shown):
                tile = np.asarray(grid.crop(box).resize((12, 8), Image.Resampling.NEAREST))
                assert np.array_equal(tile, video[index].permute(1, 2, 0).numpy())


def test_video_strip_takes_float_videos_and_checks_shapes():
    video = torch.rand(1, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    (strip,) = video_strip(video, video, ["a cat"])
    assert strip.size == video_strip(to_uint8(video), to_uint8(video), ["a cat"])[0].size
    assert np.array_equal(
        np.asarray(strip), np.asarray(video_strip(to_uint8(video), to_uint8(video), ["a cat"])[0])
    )
    with pytest.raises(ValueError, match="differ in shape"):
        video_strip(video, video[:, :2], ["a cat"])
    with pytest.raises(ValueError, match="1 videos but 2 captions"):
        video_strip(video, video, ["a cat", "a dog"])


def test_log_videos_without_a_logger_writes_mp4s_under_the_directory(tmp_path):
    videos = torch.stack([smooth_video(frames=3, height=16, width=16, seed=s) for s in (0, 1)])
    paths = log_videos(None, "samples", videos, ["a cat", "a dog"], step=7, fps=8, directory=tmp_path)
    assert paths == [tmp_path / "samples" / f"step_000007_{i:02d}.mp4" for i in range(2)]
    for path, video in zip(paths, videos):
        largest, mean, _ = mp4_errors(read_video(path), to_uint8(video))
        assert largest <= MP4_MAX_ERROR and mean <= MP4_MEAN_ERROR
    with pytest.raises(ValueError, match="needs a directory"):
        log_videos(None, "samples", videos, ["a cat", "a dog"], step=7)
    with pytest.raises(ValueError, match=r"\(B, F, 3, H, W\)"):
        log_videos(None, "samples", videos[0], ["a cat"], step=7, directory=tmp_path)


def test_tensorboard_event_file_holds_one_looping_gif_per_video_with_the_logged_pixels(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    videos = torch.stack([noise_video(frames=4, seed=s) for s in (0, 1)])
    captions = ["a cat (reward 0.500)", "a dog (reward 0.250)"]
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    assert log_videos(tb_logger, "samples", videos, captions, step=3, fps=8) == []
    tb_logger.experiment.flush()

    events = EventAccumulator(tb_logger.log_dir, size_guidance={IMAGES: 0})
    events.Reload()
    assert sorted(events.Tags()[IMAGES]) == ["samples/0", "samples/1"]
    for index, (video, caption) in enumerate(zip(videos, captions)):
        (event,) = events.Images(f"samples/{index}")
        assert (event.step, event.width, event.height) == (3, 16, 16)
        with Image.open(io.BytesIO(event.encoded_image_string)) as gif:
            assert gif.format == "GIF" and gif.n_frames == 4 and gif.info["loop"] == 0
        decoded = read_video_bytes(event.encoded_image_string, tmp_path / f"{index}.gif")
        assert torch.equal(decoded, video)
        assert events.SummaryMetadata(f"samples/{index}").summary_description == caption


def read_video_bytes(data: bytes, path: Path) -> torch.Tensor:
    path.write_bytes(data)
    return read_video(path)


def wandb_video_captions(record_file: Path, count: int, timeout: float = 30) -> dict[str, str]:
    """The caption of each logged video file (``media/videos/...``), from the history in an offline run's
    record file, once it holds ``count`` of them: W&B's service may still be writing it after ``finish()``
    returns (seen: about one run in ten read just then found it empty)."""
    deadline = time.monotonic() + timeout
    while True:
        records = record_file.read_bytes().decode("utf-8", "replace")
        entries = [json.loads(m) for m in re.findall(r'\{[^{}]*"_type":"video-file"[^{}]*\}', records)]
        caption_of = {entry["path"]: entry["caption"] for entry in entries}
        if len(caption_of) >= count or time.monotonic() > deadline:
            return caption_of
        time.sleep(0.1)


def test_wandb_offline_run_holds_mp4s_of_the_logged_videos_with_their_captions(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest disables W&B; offline writes files, reaches no one
    videos = torch.stack([smooth_video(frames=5, height=16, width=16, seed=s) for s in (0, 1)])
    captions = ["a cat (reward 0.500)", "a dog (reward 0.250)"]
    wandb_logger = WandbLogger(mode="offline", save_dir=tmp_path)
    assert log_videos(wandb_logger, "samples", to_uint8(videos), captions, step=0, fps=8) == []
    run_dir = Path(wandb_logger.experiment.dir).parent
    wandb_logger.experiment.finish()

    files = sorted((run_dir / "files" / "media" / "videos").glob("samples_*.mp4"))
    assert len(files) == 2
    caption_of = wandb_video_captions(run_dir / f"run-{wandb_logger.version}.wandb", count=2)
    assert sorted(caption_of.values()) == sorted(captions)
    for file in files:
        video = videos[captions.index(caption_of[f"media/videos/{file.name}"])]
        decoded = read_video(file)
        assert decoded.shape == (5, 3, 16, 16)
        largest, mean, _ = mp4_errors(decoded, to_uint8(video))
        assert largest <= MP4_MAX_ERROR and mean <= MP4_MEAN_ERROR
