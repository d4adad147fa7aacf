"""What a reward server and :class:`~rlr_lightning.rewards.remote.RemoteReward` say to each other over HTTP.

* ``POST /score``: the body is a safetensors file (``safetensors.torch.save``) holding the images as
  ``images``, ``(B, 3, H, W)`` or videos ``(B, F, 3, H, W)``, at their own floating precision (no PNG or 8-bit
  quantisation: the server's rewards equal the in-process reward's bit for bit), and the prompts as a JSON
  list in the file's metadata (``prompts``). The answer is JSON ``{"rewards": [...]}``, one number per image,
  ``null`` for a non-finite reward (JSON has no NaN). A request the server cannot read is answered with HTTP
  400 and ``{"error": "..."}``; a reward that raised, with HTTP 500 and the same.
* ``GET /info``: JSON ``{"reward": class name, "video": bool, "differentiable": bool, "protocol": 1}``.

Only the standard library, torch and safetensors: the client (``requests``) and the server (``aiohttp``) both
use this module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

#: Where images are scored.
SCORE_PATH = "/score"
#: Where the server describes the reward it serves.
INFO_PATH = "/info"
#: The version of this protocol, in ``/info``'s answer.
PROTOCOL_VERSION = 1
#: The safetensors key of the images.
IMAGES_KEY = "images"
#: The safetensors metadata key of the prompts (a JSON list of strings).
PROMPTS_KEY = "prompts"
#: The content type of a ``/score`` request.
CONTENT_TYPE = "application/octet-stream"


def encode_request(images: Tensor, prompts: Sequence[str]) -> bytes:
    """The body of a ``/score`` request: ``images`` (on any device, at their own floating precision) and
    ``prompts``, one per image."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    tensor = images.detach().to("cpu").contiguous()
    return save({IMAGES_KEY: tensor}, metadata={PROMPTS_KEY: json.dumps(list(prompts))})


def decode_request(body: bytes, video: bool) -> tuple[Tensor, list[str]]:
    """The images and prompts of a ``/score`` request body; ``ValueError`` saying what is wrong with it.

    Args:
        body: The request body.
        video: Whether the served reward takes videos ``(B, F, 3, H, W)`` rather than images ``(B, 3, H, W)``.
    """
    if not body:
        raise ValueError(
            "empty request: POST the images as a safetensors file (see rlr_lightning.rewards.protocol)"
        )
    try:
        tensors = load(body)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"the request body is not a safetensors file ({err})") from None
    if IMAGES_KEY not in tensors:
        raise ValueError(
            f"the safetensors file has no {IMAGES_KEY!r} tensor (it has: {', '.join(tensors) or 'none'})"
        )
    images = tensors[IMAGES_KEY]
    expected = "videos of shape (B, F, 3, H, W)" if video else "images of shape (B, 3, H, W)"
    if images.dim() != (5 if video else 4) or images.shape[-3] != 3:
        raise ValueError(f"the served reward takes {expected}, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    prompts = _prompts(body)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    return images, prompts


def _prompts(body: bytes) -> list[str]:
    # safetensors.torch.load drops the metadata: read it from the header (8-byte length, then JSON).
    size = int.from_bytes(body[:8], "little")
    header = json.loads(body[8 : 8 + size])
    text = (header.get("__metadata__") or {}).get(PROMPTS_KEY)
    if text is None:
        raise ValueError(f"the safetensors file has no {PROMPTS_KEY!r} metadata (a JSON list of prompts)")
    try:
        prompts = json.loads(text)
    except ValueError as err:
        raise ValueError(f"the {PROMPTS_KEY!r} metadata is not JSON ({err})") from None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"the {PROMPTS_KEY!r} metadata must be a JSON list of strings, got {text[:80]!r}")
    return prompts


def encode_rewards(rewards: Tensor) -> dict[str, list[float | None]]:
    """The JSON answer for ``rewards`` ``(B,)``: float32 values as Python floats (exact in JSON), ``None`` for
    non-finite ones."""
    values = rewards.detach().to("cpu", torch.float32).reshape(-1).tolist()
    return {"rewards": [v if math.isfinite(v) else None for v in values]}
