"""Model names that need no download: ``tiny``, ``tiny-sdxl``, ``tiny-sd3`` and ``tiny-flux`` (random weights, built
in code into the cache on first use) and ``shapes-world`` (a small Stable Diffusion pipeline trained on the shapes world, shipped with
the package). Anything else is a hub id or a diffusers directory, passed on as it is.
"""

from __future__ import annotations

from pathlib import Path

from rlr_lightning.tiny import TINY_MODELS

#: The shapes-world pipeline shipped with the package (``python -m rlr_lightning.world.train`` rebuilds it).
WORLD_MODEL = "shapes-world"
WORLD_PIPELINE_DIR = Path(__file__).resolve().parent / "world" / "pretrained" / WORLD_MODEL

BUILTIN_MODELS: tuple[str, ...] = (*TINY_MODELS, WORLD_MODEL)


def resolve_model(name_or_path: str) -> str:
    """The diffusers directory behind a built-in model name (building a tiny model on first use), or
    ``name_or_path`` unchanged when it is not one."""
    if name_or_path in TINY_MODELS:
        from rlr_lightning.tiny import ensure_tiny_pipeline

        return str(ensure_tiny_pipeline(family=TINY_MODELS[name_or_path]))
    if name_or_path == WORLD_MODEL:
        if not (WORLD_PIPELINE_DIR / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the shapes-world weights are missing from this installation ({WORLD_PIPELINE_DIR}); rebuild them "
                f"with `python -m rlr_lightning.world.train --out {WORLD_PIPELINE_DIR}` (about 15 minutes on a CPU) "
                "or pass the directory of a trained world pipeline instead"
            )
        return str(WORLD_PIPELINE_DIR)
    return name_or_path
