"""Finding reward weights: a local path, a cache, a Hugging Face Hub repository or a URL, and one clear error.

Every reward resolves its weight files here *before* building any network, so a missing file fails in
the first second with a message that names the file, where it comes from and the init option that takes
a local copy, instead of deep inside a library after minutes of model construction.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rlr_lightning.hub import is_offline
from rlr_lightning.paths import cache_dir as project_cache_dir

logger = logging.getLogger(__name__)


class MissingRewardWeightsError(FileNotFoundError):
    """Reward weights that are neither on this machine nor downloadable (offline, or the download failed).

    A subclass of :class:`FileNotFoundError` (so of :class:`OSError`).

    Attributes:
        weights_file: Name of the missing file (or files).
        source: Where it is published: a Hugging Face Hub repository id or a URL.
        option: The init option of the reward that takes a local copy instead.
    """

    def __init__(
        self, weights_file: str, source: str, option: str, reason: str = "", example: str | None = None
    ) -> None:
        self.weights_file = weights_file
        self.source = source
        self.option = option
        message = (
            f"reward weights {weights_file!r} are not available: {reason.rstrip('. ') or 'not found'}. "
            f"They are published at {source}. Fetch them on a machine with network access and "
            f"pass {option}={example or '/path/to/' + weights_file}"
        )
        super().__init__(message)


def default_cache_dir() -> Path:
    """Cache of downloaded reward weights: ``$RLR_CACHE/rewards``, else ``~/.cache/rlr_lightning/rewards``."""
    return project_cache_dir() / "rewards"


def check_local_file(
    path: str | os.PathLike, source: str, option: str, weights_file: str | None = None
) -> Path:
    """Return ``path`` if it is a file, else raise :class:`MissingRewardWeightsError`.

    Args:
        path: The local path given by the user.
        source: Where the file is published, for the error.
        option: The init option ``path`` was given as.
        weights_file: The published name of the file (default: the name in ``path``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingRewardWeightsError(
            weights_file or path.name, source, option, reason=f"no file at {path} (given as {option})"
        )
    return path


def _download(url: str, destination: Path) -> None:
    """Download ``url`` to ``destination`` (written to a temporary file first, then renamed)."""
    import torch.hub

    torch.hub.download_url_to_file(url, str(destination), progress=False)


def fetch_url(url: str, filename: str, option: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cached copy of ``url`` in ``cache_dir``, downloading it first when allowed.

    Args:
        url: Public address of the file.
        filename: Name of the file in the cache.
        option: Init option that takes a local copy, named in the error.
        cache_dir: Cache directory; defaults to :func:`default_cache_dir`.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / filename
    if target.is_file():
        return target
    if is_offline():
        raise MissingRewardWeightsError(filename, url, option, reason=f"offline and not cached at {target}")
    logger.info("Downloading %s to %s", url, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _download(url, target)
    except Exception as err:  # network, proxy, HTTP and disk errors all mean the same thing here
        raise MissingRewardWeightsError(filename, url, option, reason=f"download failed ({err})") from err
    return target


def fetch_hub_file(
    repo_id: str, filename: str, option: str, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Return the local copy of ``filename`` from the Hugging Face Hub repository ``repo_id``.

    Uses the Hugging Face cache (or ``cache_dir``); never downloads when :func:`~rlr_lightning.hub.is_offline`
    (``HF_HUB_OFFLINE`` or ``RLR_OFFLINE``).
    """
    from huggingface_hub import hf_hub_download

    source = f"the Hugging Face Hub repository {repo_id} (https://huggingface.co/{repo_id})"
    try:
        path = hf_hub_download(
            repo_id,
            filename,
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=is_offline(),
        )
    except Exception as err:  # offline cache miss, HTTP error, no network: one clear error instead
        reason = f"{type(err).__name__}: {err}"
        raise MissingRewardWeightsError(filename, source, option, reason=reason) from err
    return Path(path)
