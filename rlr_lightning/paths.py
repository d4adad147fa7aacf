"""Where the project keeps what it builds or downloads."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The project's cache: ``$RLR_CACHE``, else ``~/.cache/rlr_lightning``."""
    return Path(os.environ.get("RLR_CACHE", Path.home() / ".cache" / "rlr_lightning"))
