"""Video out: MP4 and GIF files, before/after strips, and videos logged to the run's loggers.

Videos in this package are float tensors ``(B, F, 3, H, W)`` in [0, 1], frames along the second axis (what a video
family's ``task.generate`` returns); one video is ``(F, 3, H, W)``. Every writer here also takes ``uint8`` frames
(0-255), and :func:`~rlr_lightning.grids.to_uint8` makes the same 8-bit pixels for every sink, as for images.

- MP4: H.264 (libx264) in yuv420p through PyAV, the maintained FFmpeg bindings whose wheels bundle libx264, so
  no ``ffmpeg`` executable or subprocess is needed. PyAV is optional (``pip install 'rlr_lightning[video]'``); it
  is imported when an MP4 is written or read, so the package imports without it and only video output fails,
  with a message naming the extra.
- GIF: Pillow (a dependency already), with an exact palette per frame where a frame has at most 256 colours.
  TensorBoard shows GIFs in its images dashboard, which is how ``SummaryWriter.add_video`` logs videos; that
  method needs moviepy, so :func:`log_videos` builds the same summary itself.

yuv420p keeps colour at half resolution (what browsers play; W&B plays the MP4 in the browser), so a decoded MP4
is close to its frames, not equal: smooth content comes back within a few levels, sharp colour edges further off.
"""

from __future__ import annotations

import io
import logging
import tempfile
import textwrap
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from rlr_lightning.grids import BeforeAfterLayout, to_uint8

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

logger = logging.getLogger(__name__)

#: x264's constant rate factor of :func:`write_mp4`: 0 is lossless (which browsers do not play), 23 its default.
#: 10 keeps the compression error below the colour subsampling's on smooth content; files stay small at the
#: sizes rewarded videos have.
DEFAULT_CRF = 10

#: GIF frame delays are whole hundredths of a second, and players stretch delays under 2 hundredths to 10.
MAX_GIF_FPS = 50

_MISSING_AV = "video output needs PyAV: pip install 'rlr_lightning[video]'"


def _require_av() -> Any:
    """PyAV, imported on first use so that the package imports without it."""
    try:
        import av
    except ImportError as err:
        raise ImportError(_MISSING_AV) from err
    return av


def _scaler_flags(av: Any) -> Any:
    """Scaler flags of the RGB <-> YUV conversions: bicubic, exact rounding and full-resolution chroma on input
    and output. With FFmpeg's defaults (bilinear, chroma from every other pixel) the mean error of a decoded MP4
    of smooth colourful frames is 4 levels instead of 1. (The flags need PyAV 18.)"""
    flags = av.video.reformatter.Interpolation
    return flags.BICUBIC | flags.ACCURATE_RND | flags.FULL_CHR_H_INT | flags.FULL_CHR_H_INP


def _frames_hwc(frames: torch.Tensor) -> np.ndarray:
    """One video ``(F, 3, H, W)`` (float in [0, 1] or ``uint8``) as a ``uint8`` array ``(F, H, W, 3)``."""
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"a video is frames of shape (F, 3, H, W), got {tuple(frames.shape)}")
    if frames.shape[0] < 1:
        raise ValueError("a video needs at least one frame, got 0")
    pixels = frames.detach().cpu() if frames.dtype == torch.uint8 else to_uint8(frames)
    return np.ascontiguousarray(pixels.permute(0, 2, 3, 1).numpy())


def _check_fps(fps: float) -> None:
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")


def write_mp4(frames: torch.Tensor, path: str | Path, fps: float = 8, crf: int = DEFAULT_CRF) -> Path:
    """Write one video as H.264 MP4 (libx264, yuv420p, BT.709 colours), playable in browsers.

    yuv420p needs an even height and width: a video with an odd one is padded by repeating its last row or
    column, so its file (and :func:`read_video` of it) is one pixel taller or wider. Refusing instead would
    stop a training run's logging over a resolution the model itself accepts.

    Args:
        frames: ``(F, 3, H, W)``, float in [0, 1] or ``uint8``.
        path: The file to write (its parent folder must exist).
        fps: Frames per second of playback.
        crf: x264's constant rate factor: lower is closer to the frames and larger (see :data:`DEFAULT_CRF`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ImportError: PyAV is not installed.
    """
    av = _require_av()
    _check_fps(fps)
    pixels = _frames_hwc(frames)
    height, width = pixels.shape[1:3]
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    if any(after for _, after in pad):
        logger.debug("Padding a %dx%d video to even sides for yuv420p", height, width)
        pixels = np.pad(pixels, pad, mode="edge")
    if "libx264" not in av.codecs_available:
        raise RuntimeError(
            "this PyAV's FFmpeg has no libx264 encoder; PyAV's wheels from PyPI bundle it "
            "(pip install --force-reinstall 'rlr_lightning[video]')"
        )
    reformatter = av.video.reformatter
    colorspace, color_range = reformatter.Colorspace.ITU709, reformatter.ColorRange.MPEG
    flags = _scaler_flags(av)
    path = Path(path)
    # faststart: the index goes before the frames, so a browser starts playing before it has the whole file.
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        options = {
            "crf": str(crf),
            # x264's psychovisual tuning trades fidelity for perceived sharpness; these files are for judging
            # what the model made, so the pixels should stay as close as the bitrate allows.
            "tune": "psnr",
            # FFmpeg's scaler puts the subsampled colour between pixels (centre), while H.264 decoders assume
            # it at the left pixel unless told: untagged, FFmpeg decodes colour half a pixel off (a mean error
            # of about 5 levels instead of about 1 on smooth colourful frames). Players that ignore the tag
            # show that shift, which is hard to see.
            "chroma_sample_location": "center",
        }
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.width, stream.height = pixels.shape[2], pixels.shape[1]
        stream.pix_fmt = "yuv420p"
        # Tagged, so players convert back with the matrix the frames were converted with.
        context = stream.codec_context
        context.colorspace, context.color_range = colorspace, color_range
        context.color_primaries, context.color_trc = (
            reformatter.ColorPrimaries.BT709,
            reformatter.ColorTrc.BT709,
        )
        for image in pixels:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=colorspace, dst_color_range=color_range, interpolation=flags
            )
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # the frames the encoder still holds (look-ahead)
    return path


def gif_bytes(frames: torch.Tensor, fps: float = 8) -> bytes:
    """One video as an animated GIF that loops forever, as bytes (see :func:`write_gif`)."""
    _check_fps(fps)
    if fps > MAX_GIF_FPS:
        raise ValueError(
            f"GIF frame delays are whole hundredths of a second and players slow down delays under 2: fps must "
            f"be <= {MAX_GIF_FPS}, got {fps}"
        )
    images = []
    for pixels in _frames_hwc(frames):
        image = Image.fromarray(pixels)
        # An adaptive palette is built from the frame's own colours, so a frame of at most 256 colours is kept
        # exactly; richer frames get median-cut colours without dithering (dither noise flickers from frame to
        # frame). Quantised here rather than by the GIF writer so that choice is this module's, not Pillow's.
        images.append(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256))
    # Delays are hundredths of a second: spread the rounding so the video keeps its length (8 fps: 13, 12, ...).
    ticks = [round(i * 100 / fps) for i in range(len(images) + 1)]
    durations = [10 * (b - a) for a, b in zip(ticks, ticks[1:])]
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=durations,
        loop=0,
        optimize=False,
    )
    return buffer.getvalue()


def write_gif(frames: torch.Tensor, path: str | Path, fps: float = 8) -> Path:
    """Write one video as an animated GIF (Pillow) that loops forever.

    Each frame gets its own palette: frames of at most 256 colours are stored exactly, richer ones with 256
    median-cut colours. The GIF writer stores consecutive identical frames once, showing it for their summed
    time, so such a video plays the same but holds (and :func:`read_video` returns) fewer frames.

    Args:
        frames: ``(F, 3, H, W)``, float in [0, 1] or ``uint8``.
        path: The file to write (its parent folder must exist).
        fps: Frames per second of playback, at most :data:`MAX_GIF_FPS`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.write_bytes(gif_bytes(frames, fps))
    return path


def read_video(path: str | Path) -> torch.Tensor:
    """The frames of an MP4 (or any video FFmpeg reads, through PyAV) or animated GIF (through Pillow).

    Args:
        path: The video file; GIFs are recognised by their signature, not their name.

    Returns:
        ``(F, 3, H, W)`` ``uint8``: for an MP4 written by :func:`write_mp4` of odd sides, the padded (even) size.

    Raises:
        ImportError: The file is not a GIF and PyAV is not installed.
    """
    path = Path(path)
    with path.open("rb") as f:
        is_gif = f.read(4) == b"GIF8"
    if is_gif:
        with Image.open(path) as gif:
            frames = []
            for index in range(getattr(gif, "n_frames", 1)):
                gif.seek(index)
                # convert("RGB") of a later frame is the frame as shown: drawn over the ones before it.
                frames.append(np.asarray(gif.convert("RGB")))
    else:
        av = _require_av()
        flags = _scaler_flags(av)
        with av.open(str(path)) as container:
            # The frames carry the stream's colour tags, which the conversion back to RGB follows.
            frames = [
                frame.to_ndarray(format="rgb24", interpolation=flags) for frame in container.decode(video=0)
            ]
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def video_strip(
    before: torch.Tensor,
    after: torch.Tensor,
    captions: Sequence[str],
    scale: int = 1,
    max_frames: int = 8,
) -> list[Image.Image]:
    """One before/after picture per caption: the caption on top, then a row of the "before" video's frames
    above a row of the "after" video's, in the layout of the before/after image grid
    (:class:`~rlr_lightning.grids.BeforeAfterLayout`), each column headed by its frame number.

    Args:
        before: ``(B, F, 3, H, W)`` videos (float in [0, 1] or ``uint8``), e.g. the base model's.
        after: Videos of the same shape, e.g. the fine-tuned model's.
        captions: One caption (prompt) per video.
        scale: Enlargement of each frame (nearest neighbour); 1 for videos already large enough to read.
        max_frames: At most this many frames per row, evenly spaced from the first to the last, so long videos
            give readable strips.

    Returns:
        ``B`` RGB images.
    """
    if before.dim() != 5 or before.shape[2] != 3:
        raise ValueError(f"videos are (B, F, 3, H, W), got {tuple(before.shape)}")
    if before.shape != after.shape:
        raise ValueError(
            f"before {tuple(before.shape)} and after {tuple(after.shape)} videos differ in shape"
        )
    if len(captions) != before.shape[0]:
        raise ValueError(f"{before.shape[0]} videos but {len(captions)} captions")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    layout = BeforeAfterLayout(scale)
    count = before.shape[1]
    shown = torch.linspace(0, count - 1, min(count, max_frames)).round().long().unique()
    labels = [f"frame {int(i)}" for i in shown]
    strips = []
    for first, second, caption in zip(before, after, captions):
        rows = [
            frames[shown] if frames.dtype == torch.uint8 else to_uint8(frames[shown])
            for frames in (first, second)
        ]
        grid = layout.grid(rows[0].cpu(), rows[1].cpu(), labels)
        strips.append(_with_caption(grid, caption))
    return strips


def _with_caption(image: Image.Image, caption: str) -> Image.Image:
    """``image`` under ``caption``, wrapped to its width (the grid's own headers are one column wide)."""
    from PIL import ImageDraw, ImageFont

    line, pad = BeforeAfterLayout._LINE, 4
    lines = textwrap.wrap(caption, width=max(8, (image.width - 2 * pad) // 7)) or [""]
    canvas = Image.new("RGB", (image.width, line * len(lines) + pad + image.height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    for i, text in enumerate(lines):
        draw.text((pad, 2 + line * i), text, fill="black", font=font)
    canvas.paste(image, (0, canvas.height - image.height))
    return canvas


def _tensorboard_image(writer: Any, gif: bytes, height: int, width: int, tag: str, caption: str) -> Any:
    """A TensorBoard summary of one animated GIF: what ``SummaryWriter.add_video`` logs, without moviepy."""
    # Lightning's TensorBoardLogger writes with tensorboardX when TensorBoard itself is not installed; each
    # writer takes summaries of its own protobuf classes.
    if type(writer).__module__.startswith("tensorboardX"):
        from tensorboardX.proto import summary_pb2
    else:
        from tensorboard.compat.proto import summary_pb2
    image = summary_pb2.Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    # The caption becomes the card's description in TensorBoard (images carry no caption of their own).
    metadata = summary_pb2.SummaryMetadata(summary_description=caption)
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=image, metadata=metadata)])


def log_videos(
    run_logger: Logger | None,
    key: str,
    videos: torch.Tensor,
    captions: Sequence[str],
    step: int,
    fps: float = 8,
    directory: str | Path | None = None,
) -> list[Path]:
    """Log videos to one of the run's loggers, each with its caption.

    - ``WandbLogger``: one ``wandb.Video`` per video under ``key``, from MP4s (wandb's own encoding of arrays
      needs moviepy).
    - ``TensorBoardLogger``: one animated GIF per video in the images dashboard, tagged ``<key>/<index>`` with
      the caption as its description (how ``SummaryWriter.add_video`` logs videos, without its moviepy).
    - Any other logger, or ``None``: MP4 files ``<directory>/<key>/step_<step>_<index>.mp4``.

    Args:
        run_logger: The logger, or ``None`` for files only.
        key: Name of the logged videos (W&B key, TensorBoard tag prefix, folder of the files).
        videos: ``(B, F, 3, H, W)``, ``uint8`` (or float in [0, 1]).
        captions: One caption per video.
        step: The training step they belong to.
        fps: Frames per second of playback.
        directory: Where the files go for loggers other than W&B and TensorBoard (required for them).

    Returns:
        The files written (none for W&B and TensorBoard, which keep their own copies).

    Raises:
        ImportError: PyAV is not installed and the logger is not TensorBoard (TensorBoard gets GIFs).
    """
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos are (B, F, 3, H, W), got {tuple(videos.shape)}")
    if len(captions) != videos.shape[0]:
        raise ValueError(f"{videos.shape[0]} videos but {len(captions)} captions")
    pixels = videos.detach().cpu() if videos.dtype == torch.uint8 else to_uint8(videos)
    if isinstance(run_logger, WandbLogger):
        with tempfile.TemporaryDirectory() as tmp:
            # Given as bytes, wandb moves its own copy into the run; a file path it may link to instead (its
            # allow_media_symlink setting), which would leave the run pointing at files this function owns.
            data = [
                io.BytesIO(write_mp4(video, Path(tmp) / f"{i}.mp4", fps).read_bytes())
                for i, video in enumerate(pixels)
            ]
        run_logger.log_video(
            key=key, videos=data, step=step, caption=list(captions), format=["mp4"] * len(data)
        )
        return []
    if isinstance(run_logger, TensorBoardLogger):
        writer = run_logger.experiment
        height, width = pixels.shape[-2:]
        for i, (video, caption) in enumerate(zip(pixels, captions)):
            summary = _tensorboard_image(writer, gif_bytes(video, fps), height, width, f"{key}/{i}", caption)
            # SummaryWriter has no public call for a ready-made summary; add_video itself goes through the
            # file writer like this.
            writer._get_file_writer().add_summary(summary, step)
        return []
    if directory is None:
        raise ValueError(
            "log_videos needs a directory for the files of loggers other than W&B and TensorBoard"
        )
    folder = Path(directory) / key
    folder.mkdir(parents=True, exist_ok=True)
    return [write_mp4(video, folder / f"step_{step:06d}_{i:02d}.mp4", fps) for i, video in enumerate(pixels)]
