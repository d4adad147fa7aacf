"""Where models and weights come from: local directories, the Hugging Face Hub cache, and one offline policy.

Backbones (``rlr_lightning.models``) and reward weights (``rlr_lightning.rewards.weights``) both decide here
whether downloads are allowed and what to say when something is missing, so ``HF_HUB_OFFLINE`` and
``RLR_OFFLINE`` mean the same thing everywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_TRUE = ("1", "true", "yes", "on")


class ModelNotAvailableError(OSError):
    """A model could not be found locally and could not be downloaded."""


def is_offline() -> bool:
    """Whether downloads are switched off: ``HF_HUB_OFFLINE`` or ``RLR_OFFLINE`` set to a true value."""
    if any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "RLR_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of diffusers and transformers
        return False
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; a value set in code later is only seen here.
    return bool(constants.HF_HUB_OFFLINE)


def looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def could_be_hub_id(name: str) -> bool:
    """Whether ``name`` is a well-formed Hugging Face hub id (``name`` or ``owner/name``; letters, digits, ``-``,
    ``_``, ``.``): anything else can only have been meant as a built-in name or a local directory."""
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of diffusers and transformers
        return not looks_like_path(name)
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def unknown_model(name: str) -> FileNotFoundError:
    """The error for a model name that is no built-in name, no directory and cannot be a hub id (so
    downloading it is no advice)."""
    from rlr_lightning.builtin import builtin_models_hint

    return FileNotFoundError(
        f"model {name!r} is not a built-in model, a local directory or a hub id (owner/name of letters, digits, "
        f"'-', '_' and '.'); {builtin_models_hint(name)}"
    )


def _missing_directory(path: Path, components: tuple[str, ...] = ()) -> FileNotFoundError:
    subfolders = f" (with {', '.join(components)} subfolders)" if components else ""
    return FileNotFoundError(
        f"model directory {path} does not exist. Pass a diffusers pipeline directory{subfolders} or a Hugging "
        "Face hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
    )


def resolve_pretrained(name_or_path: str | os.PathLike, components: tuple[str, ...]) -> str:
    """Check a local pipeline directory early, or pass a hub id through.

    Args:
        name_or_path: A diffusers pipeline directory or a Hugging Face Hub id.
        components: The subfolders the directory must have.

    Raises:
        FileNotFoundError: naming the missing directory or the missing component subfolders.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file; pass a diffusers pipeline directory or a hub id")
        missing = [c for c in components if not (path / c).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a complete diffusers pipeline directory: missing {', '.join(missing)}/ "
                f"(expected subfolders {', '.join(components)})"
            )
        return str(path)
    if looks_like_path(name):
        raise _missing_directory(path, components)
    if not could_be_hub_id(name):
        raise unknown_model(name)
    return name


def model_unavailable(repo_id: str, offline: bool, cause: Exception) -> ModelNotAvailableError:
    """The error for a hub model that is neither cached nor downloadable: what to download and where."""
    how = (
        "is not in the local Hugging Face cache and downloads are off (HF_HUB_OFFLINE / RLR_OFFLINE or "
        "local_files_only)"
        if offline
        else "could not be downloaded"
    )
    # A bare name (no owner/) is more likely a mistyped built-in name than one of the hub's few legacy ids.
    builtin = ""
    if "/" not in repo_id:
        from rlr_lightning.builtin import builtin_models_hint

        hint = builtin_models_hint(repo_id)
        builtin = hint[0].upper() + hint[1:] + "\n"
    return ModelNotAvailableError(
        f"model '{repo_id}' {how}: {cause}\n"
        f"{builtin}"
        f"Download it on a machine with internet access, e.g.\n"
        f"    hf download {repo_id} --local-dir /path/to/models/{repo_id.split('/')[-1]}\n"
        "and pass that directory as the model path (pretrained_model_name_or_path), or allow downloads "
        "(unset HF_HUB_OFFLINE and RLR_OFFLINE) to fill the cache. If you meant a local directory: "
        f"{Path(repo_id).expanduser().resolve()} does not exist."
    )


def read_model_index(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> dict:
    """A diffusers pipeline's ``model_index.json`` (its pipeline class and components), local or from the hub.

    Raises:
        FileNotFoundError: A local directory has no ``model_index.json``.
        ModelNotAvailableError: A hub id is neither cached nor downloadable.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"{path} has no model_index.json; pass a diffusers pipeline directory (as written by "
                "save_pretrained or `hf download`)"
            )
        return json.loads(index.read_text())
    if looks_like_path(name):
        raise _missing_directory(path)
    if not could_be_hub_id(name):  # the hub client would only say what a repo id may contain
        raise unknown_model(name)
    offline = is_offline() if local_files_only is None else local_files_only
    from huggingface_hub import hf_hub_download

    try:
        downloaded = hf_hub_download(
            name,
            "model_index.json",
            revision=revision,
            local_files_only=offline,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except Exception as err:  # offline cache miss, HTTP error, no network: one clear error instead
        raise model_unavailable(name, offline, err) from err
    return json.loads(Path(downloaded).read_text())
