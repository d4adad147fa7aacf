"""The shipped ``shapes-world-aligned`` LoRA: its name resolves offline to a small diffusers LoRA that diffusers'
own ``load_lora_weights`` reads (every key, the same network as ours), ``rlr sample`` and ``rlr eval`` take the
name, ``rlr eval`` reproduces its accuracies in docs/world.md, and the before/after grid shows what it samples."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rlr_lightning.builtin import ALIGNED_WORLD_LORA, BUILTIN_LORAS, WORLD_MODEL, resolve_model
from rlr_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "world_align.yaml"


def test_the_name_resolves_offline_to_a_small_lora_that_diffusers_loads_into_the_same_network(monkeypatch):
    from diffusers import StableDiffusionPipeline

    from rlr_lightning.models import load_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_model(ALIGNED_WORLD_LORA)
    assert path == str(BUILTIN_LORAS[ALIGNED_WORLD_LORA])
    weights = Path(path) / "pytorch_lora_weights.safetensors"
    assert weights.stat().st_size < 600_000  # a few hundred KB
    pipe = StableDiffusionPipeline.from_pretrained(resolve_model(WORLD_MODEL), local_files_only=True)
    torch.manual_seed(0)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 100])
    states = torch.randn(2, 8, pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        base = pipe.unet(latents, t, encoder_hidden_states=states).sample
        pipe.load_lora_weights(path)
        theirs = pipe.unet(latents, t, encoder_hidden_states=states).sample
        ours = load_backbone(resolve_model(WORLD_MODEL), local_files_only=True)
        settings = ours.load_lora(path)
        mine = ours.network(latents, t, encoder_hidden_states=states).sample
    assert (theirs - base).abs().max() > 1e-3, "the LoRA changes nothing"
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-5)
    trained = yaml.safe_load(CONFIG.read_text())["model"][
        "lora"
    ]  # the recipe's adapter, as recorded in the file
    assert (settings.rank, settings.alpha) == (trained["rank"], trained["alpha"])
    assert set(settings.target_modules) == set(trained["target_modules"])


def test_rlr_sample_draws_with_the_builtin_name(tmp_path):
    prompt = "three blue triangles on the left"
    common = [
        "sample",
        "--model",
        WORLD_MODEL,
        "--prompt",
        prompt,
        "--steps",
        "10",
        "--eta",
        "1",
        "--guidance",
        "3",
        "--timestep-spacing",
        "trailing",
        "--seed",
        "0",
    ]
    main([*common, "--out", str(tmp_path / "base.png")])
    main([*common, "--lora", ALIGNED_WORLD_LORA, "--out", str(tmp_path / "aligned.png")])
    base, aligned = (np.asarray(Image.open(tmp_path / name)) for name in ("base.png", "aligned.png"))
    assert base.shape == aligned.shape == (32, 32, 3)
    assert not np.array_equal(base, aligned)


def _documented_aligned_row() -> dict[str, tuple[float, float]]:
    """colour, count, position, all of the shipped LoRA's held-out row in docs/world.md: (mean, SE) in percent."""
    text = (ROOT / "docs" / "world.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| shapes-world-aligned, held-out"))
    cells = re.findall(r"([\d.]+)% ± ([\d.]+)", row)
    return {
        key: (float(m), float(se))
        for key, (m, se) in zip(("color_ok", "count_ok", "position_ok", "all_ok"), cells)
    }


@pytest.mark.slow
def test_rlr_eval_reproduces_the_shipped_loras_accuracies_in_the_docs_and_draws_its_grid(tmp_path):
    """docs/world.md's row for the shipped LoRA is `rlr eval --config configs/world_align.yaml --lora
    shapes-world-aligned` (held-out, 2 samples per caption, seeds 0 1 2): re-run, every accuracy lies within the
    documented standard error of the documented mean. Its grid shows the base model's and the LoRA's samples of
    the same noise, each framed by the checker's verdict."""
    from rlr_lightning.callbacks import to_uint8
    from rlr_lightning.sampling import Plan
    from rlr_lightning.world.checker import check
    from rlr_lightning.world.evaluate import _load, grid_captions, grid_tiles

    out, grid = tmp_path / "aligned.json", tmp_path / "grid.png"
    main(
        [
            "eval",
            "--config",
            str(CONFIG),
            "--lora",
            ALIGNED_WORLD_LORA,
            "--json",
            str(out),
            "--grid",
            str(grid),
        ]
    )
    result = json.loads(out.read_text())
    documented = _documented_aligned_row()
    assert len(documented) == 4
    for key, (mean, se) in documented.items():
        assert abs(100 * result["mean"][key] - mean) <= max(se, 0.1), (key, result["mean"][key], mean, se)

    # The grid: 24 held-out captions in bands of 8; in each, the base model's samples above the LoRA's, from the
    # first seed's noise; a green frame exactly where the checker finds every asked attribute right.
    captions = grid_captions("held_out")
    assert result["grid"]["captions"] == captions and len(captions) == 24
    model = yaml.safe_load(CONFIG.read_text())["model"]
    backbone, sampler = _load(
        WORLD_MODEL,
        resolve_model(ALIGNED_WORLD_LORA),
        model["num_steps"],
        model["eta"],
        model["guidance_scale"],
        model["timestep_spacing"],
    )
    embeds = backbone.encode_prompts(captions, negative=sampler.uses_guidance)

    def sample() -> torch.Tensor:
        with torch.no_grad():
            plan = Plan(sampler.num_steps)
            return backbone.decode(
                sampler.run(plan, embeds, generator=torch.Generator().manual_seed(0)).final
            )

    with backbone.lora_disabled():
        rows = [sample()]
    rows.append(sample())
    picture = np.asarray(Image.open(grid).convert("RGB"))
    tiles = grid_tiles(captions, 32)
    for name, images in zip(("before", "after"), rows):
        verdicts = check(images, captions)["all_ok"].tolist()
        assert result["grid"][name] == verdicts
        for tile, image, ok in zip(tiles, to_uint8(images), verdicts):
            left, top, right, bottom = tile[name]
            np.testing.assert_array_equal(picture[top:bottom:4, left:right:4], image.permute(1, 2, 0).numpy())
            assert tuple(picture[top - 2, left + 8]) == ((0, 160, 0) if ok else (200, 0, 0))
    assert result["grid"]["after"] != result["grid"]["before"]
