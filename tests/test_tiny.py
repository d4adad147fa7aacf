"""The tiny offline pipeline: deterministic, complete, loadable by plain diffusers, cached safely."""

from __future__ import annotations

import json

import torch

from rlr_lightning.tiny import TINY_PIPELINE_VERSION, ensure_tiny_pipeline, tiny_clip_tokenizer


def test_tiny_tokenizer_is_character_level_clip():
    tok = tiny_clip_tokenizer()
    assert tok("hi").input_ids == [0, 73, 330, 1]  # bos, "h", "i</w>", eos
    padded = tok("a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 16 and padded[-1] == 1  # padded with the end-of-text id, as CLIP does


def test_tiny_pipeline_loads_in_diffusers_and_is_deterministic(tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from rlr_lightning.tiny import save_tiny_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_pipeline_dir, local_files_only=True, safety_checker=None
    )
    images = pipe(
        ["a cat"], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    assert images.shape == (1, 3, 16, 16)
    again = StableDiffusionPipeline.from_pretrained(
        save_tiny_pipeline(tmp_path / "again"), local_files_only=True
    )
    for a, b in zip(pipe.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)


def test_ensure_tiny_pipeline_builds_once_and_rebuilds_stale(tmp_path):
    path = ensure_tiny_pipeline(tmp_path)
    marker = path / "rlr_tiny_pipeline.json"
    assert json.loads(marker.read_text())["version"] == TINY_PIPELINE_VERSION
    stamp = (path / "unet").stat().st_mtime_ns
    assert ensure_tiny_pipeline(tmp_path) == path
    assert (path / "unet").stat().st_mtime_ns == stamp  # reused, not rebuilt
    marker.write_text(json.dumps({"version": -1}))  # a copy from an older recipe
    assert ensure_tiny_pipeline(tmp_path) == path
    assert json.loads(marker.read_text())["version"] == TINY_PIPELINE_VERSION
    assert not list(tmp_path.glob(".*tmp*"))  # no half-built leftovers
