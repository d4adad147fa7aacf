"""Model names that need no download: ``tiny``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux`` and ``tiny-wan``
(random weights, built in code into the cache on first use), ``shapes-world`` (a small Stable Diffusion
pipeline trained on the shapes world) and ``moving-shapes`` (a small Wan 2.1 trained on the moving-shapes
world), both shipped with the package. Anything else is a hub id or a diffusers directory, passed on as it is.
"""

from __future__ import annotations

from pathlib import Path

from rlr_lightning.tiny import TINY_MODELS

#: The shapes-world pipeline shipped with the package (``python -m rlr_lightning.world.train`` rebuilds it).
WORLD_MODEL = "shapes-world"
WORLD_PIPELINE_DIR = Path(__file__).resolve().parent / "world" / "pretrained" / WORLD_MODEL

#: The moving-shapes video pipeline (a small Wan 2.1) shipped with the package
#: (``python -m rlr_lightning.world.video_train`` rebuilds it).
MOTION_WORLD_MODEL = "moving-shapes"
MOTION_WORLD_PIPELINE_DIR = Path(__file__).resolve().parent / "world" / "pretrained" / MOTION_WORLD_MODEL

BUILTIN_MODELS: tuple[str, ...] = (*TINY_MODELS, WORLD_MODEL, MOTION_WORLD_MODEL)

#: The shapes-world LoRA aligned to its captions (configs/world_align.yaml), shipped with the package: a
#: diffusers LoRA directory (``pytorch_lora_weights.safetensors``) of ``shapes-world``.
ALIGNED_WORLD_LORA = "shapes-world-aligned"
BUILTIN_LORAS = {
    ALIGNED_WORLD_LORA: Path(__file__).resolve().parent / "world" / "pretrained" / ALIGNED_WORLD_LORA
}


def describe_builtin_loras() -> str:
    """The built-in LoRA names and what each is, for help texts."""
    return (
        f"{ALIGNED_WORLD_LORA} (shapes-world fine-tuned toward its captions by configs/world_align.yaml, shipped "
        "with the package)"
    )


def resolve_lora(name_or_path: str) -> str:
    """The directory behind a built-in LoRA name, or ``name_or_path`` unchanged when it is not one."""
    if name_or_path in BUILTIN_LORAS:
        directory = BUILTIN_LORAS[name_or_path]
        if not (directory / "pytorch_lora_weights.safetensors").is_file():
            raise FileNotFoundError(
                f"the {name_or_path} LoRA is missing from this installation ({directory}); rebuild it with "
                f"`rlr fit --config configs/world_align.yaml --model.export_dir {directory}`"
            )
        return str(directory)
    return name_or_path


#: The model family of each tiny model's code in :data:`rlr_lightning.tiny.TINY_MODELS`, in words.
_FAMILY_NAMES = {
    "sd": "Stable Diffusion 1.x / 2.x",
    "sdxl": "SDXL",
    "sd3": "SD 3 / 3.5",
    "flux": "FLUX.1",
    "wan": "Wan 2.1",
}


def describe_builtin_models() -> str:
    """The built-in names and what each is, for help texts (``tiny (Stable Diffusion 1.x / 2.x), ...``)."""
    tiny = ", ".join(f"{name} ({_FAMILY_NAMES.get(family, family)})" for name, family in TINY_MODELS.items())
    return (
        f"{tiny}: random weights, built offline on first use; {WORLD_MODEL} (Stable Diffusion, trained on "
        f"the shapes world) and {MOTION_WORLD_MODEL} (Wan 2.1, trained on the moving-shapes world), shipped "
        "with the package"
    )


def builtin_models_hint(name: str) -> str:
    """A sentence listing the built-in names, with the closest one to ``name`` when there is one, for errors
    about a model name that did not resolve."""
    import difflib

    close = difflib.get_close_matches(name, BUILTIN_MODELS, n=1)
    guess = f"; did you mean {close[0]}?" if close else ""
    return f"built-in models (no download): {', '.join(BUILTIN_MODELS)}{guess}"


def resolve_model(name_or_path: str) -> str:
    """The diffusers directory behind a built-in model name (building a tiny model on first use) or LoRA name
    (:data:`BUILTIN_LORAS`), or ``name_or_path`` unchanged when it is not one."""
    if name_or_path in BUILTIN_LORAS:
        return resolve_lora(name_or_path)
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
    if name_or_path == MOTION_WORLD_MODEL:
        if not (MOTION_WORLD_PIPELINE_DIR / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the moving-shapes weights are missing from this installation ({MOTION_WORLD_PIPELINE_DIR}); "
                f"rebuild them with `python -m rlr_lightning.world.video_train --out {MOTION_WORLD_PIPELINE_DIR}` "
                "(about 25 minutes on a CPU) or pass the directory of a trained video world pipeline instead"
            )
        return str(MOTION_WORLD_PIPELINE_DIR)
    return name_or_path
