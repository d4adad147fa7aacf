"""Where the project keeps what it builds or downloads, and the files it adds to a pipeline directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

#: Written by this library into a video pipeline directory it builds (tiny-wan, moving-shapes): the size the
#: model was made for, which a Wan pipeline does not record (``WanPipeline`` defaults to 480 x 832, 81 frames).
VIDEO_DEFAULTS_FILE = "rlr_video_defaults.json"


def write_video_defaults(directory: str | os.PathLike, resolution: tuple[int, int], num_frames: int) -> None:
    """Record the size a video pipeline directory's model was made for (:data:`VIDEO_DEFAULTS_FILE`)."""
    record = {"resolution": [int(resolution[0]), int(resolution[1])], "num_frames": int(num_frames)}
    (Path(directory) / VIDEO_DEFAULTS_FILE).write_text(json.dumps(record) + "\n")


def cache_dir() -> Path:
    """The project's cache: ``$RLR_CACHE``, else ``~/.cache/rlr_lightning``."""
    return Path(os.environ.get("RLR_CACHE", Path.home() / ".cache" / "rlr_lightning"))
