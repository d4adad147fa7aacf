"""Loading open_clip models for rewards: a built-in or JSON-configured architecture plus a tag or local file.

One path for real and tiny models: the tests save a tiny architecture as a JSON config and its weights as
a checkpoint, and load them exactly as a user loads ViT-L/14 from a local copy of the OpenAI weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, cast

from torch import Tensor, nn

from rlr_lightning.hub import is_offline
from rlr_lightning.rewards.weights import MissingRewardWeightsError, check_local_file

logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def resolve_model_name(model: str) -> str:
    """An open_clip model name for ``model``.

    ``model`` is a built-in name (``open_clip.list_models()``), a schema name (``hf-hub:org/repo``,
    ``local-dir:/path``), or the path of a JSON model config (``embed_dim``, ``vision_cfg``, ``text_cfg``),
    which is registered under its file stem with ``open_clip.add_model_config``.
    """
    import open_clip

    if model.startswith(("hf-hub:", "local-dir:")):
        return model
    if model.endswith(".json"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config {path} does not exist")
        if path.stem in open_clip.list_models() and open_clip.get_model_config(path.stem) is not None:
            logger.debug("open_clip config %s replaces the registered config of the same name", path)
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(model) is None:
        raise ValueError(
            f"unknown open_clip model {model!r}: give a built-in name (see open_clip.list_models()) or the "
            "path of a JSON model config with embed_dim, vision_cfg and text_cfg"
        )
    return model


def _fetch_tag(name: str, tag: str, cfg: dict[str, Any], option: str, cache_dir: str | None) -> str:
    """Local path of the weights of an open_clip pretrained tag, downloading them when allowed."""
    import open_clip

    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub:
        # open_clip's convention: "org/repo/file" names a file, "org/repo/" the default weights file.
        repo_id, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        source = f"the Hugging Face Hub repository {repo_id} (https://huggingface.co/{repo_id})"
    else:
        filename, source = os.path.basename(url), url
        cached = Path(cache_dir or Path.home() / ".cache" / "clip") / filename
        if is_offline() and not cached.is_file():
            reason = f"offline and not cached at {cached}"
            raise MissingRewardWeightsError(filename, source, option, reason=reason)
    try:
        return open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as err:  # offline cache miss, HTTP error, no network: one clear error instead
        raise MissingRewardWeightsError(
            filename, source, option, reason=f"open_clip {name} pretrained={tag!r}: {err}"
        ) from err


def load_open_clip(
    model: str,
    pretrained: str,
    *,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
    pretrained_option: str = "pretrained",
    model_option: str = "clip_model",
) -> tuple[nn.Module, Any]:
    """Build a frozen open_clip model and its tokenizer, weights resolved (or a clear error) first.

    Args:
        model: Architecture, as :func:`resolve_model_name` takes it.
        pretrained: An open_clip pretrained tag of ``model`` (``"openai"``, ``"laion2b_s32b_b79k"``, ...) or
            the path of a checkpoint (a state dict, optionally under ``"state_dict"``, as open_clip loads it).
            Ignored for ``hf-hub:`` and ``local-dir:`` models, which carry their weights.
        quick_gelu: True forces QuickGELU activations (OpenAI CLIP weights need them). None follows the
            pretrained tag, or the architecture's config for a checkpoint file.
        cache_dir: Download cache of open_clip (its default when None).
        pretrained_option: Name of the caller's init option that takes a checkpoint path (for errors).
        model_option: Name of the caller's init option that takes the architecture (for errors).

    Returns:
        The model (eval mode, no gradients) and its tokenizer.
    """
    import open_clip

    name = resolve_model_name(model)
    kwargs: dict[str, Any] = {}
    checkpoint: str | None = None
    if name.startswith(("hf-hub:", "local-dir:")):
        pass
    elif os.path.isfile(os.path.expanduser(pretrained)):
        checkpoint = os.path.expanduser(pretrained)
    elif open_clip.get_pretrained_cfg(name, pretrained):
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        checkpoint = _fetch_tag(name, pretrained, cfg, pretrained_option, cache_dir)
        kwargs["force_preprocess_cfg"] = {
            k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg
        }
        if quick_gelu is None:
            quick_gelu = bool(cfg.get("quick_gelu", False))
    elif os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        check_local_file(pretrained, f"open_clip model {name} checkpoints", pretrained_option)
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(
            f"{pretrained_option}={pretrained!r} is neither a file nor a pretrained tag of open_clip model "
            f"{name!r} (tags: {tags})"
        )
    # Building and loading a ViT-H takes a while on first use: say so before, not only after.
    logger.info("Loading open_clip %s from %s", name, checkpoint or model)
    try:
        clip = open_clip.create_model(
            name, pretrained=checkpoint, force_quick_gelu=bool(quick_gelu), require_pretrained=True, **kwargs
        )
    except RuntimeError as err:
        if not name.startswith("hf-hub:"):
            raise
        repo_id = name[len("hf-hub:") :]
        raise MissingRewardWeightsError(
            "open_clip_config.json and weights",
            f"https://huggingface.co/{repo_id}",
            model_option,
            reason=str(err),
            example="local-dir:/path/to/a/copy/of/the/repository",
        ) from err
    clip.requires_grad_(False).eval()
    tokenizer = open_clip.get_tokenizer(name)
    return clip, tokenizer


def encode_text(clip: nn.Module, tokenizer: Any, prompts: list[str], device: Any) -> Tensor:
    """L2-normalised text features of ``prompts`` (one row per prompt)."""
    tokens = tokenizer(list(prompts)).to(device)
    # open_clip has no types (and torch types the attributes it does not know as Tensor | Module).
    return cast(Any, clip).encode_text(tokens, normalize=True)


def encode_image(clip: nn.Module, pixels: Tensor) -> Tensor:
    """L2-normalised image features of preprocessed ``pixels``, computed in the model's weight dtype."""
    dtype = next(clip.parameters()).dtype
    # open_clip has no types (and torch types the attributes it does not know as Tensor | Module).
    return cast(Any, clip).encode_image(pixels.to(dtype), normalize=True)
