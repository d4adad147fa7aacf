"""The shapes-world training script end to end in smoke mode, and what the pipeline it writes is."""

from __future__ import annotations

import json

import pytest
import torch

from rlr_lightning.world.scenes import caption, split_specs
from rlr_lightning.world.train import WORLD_MARKER, build_tokenizer, main, world_words


def test_every_world_word_is_one_token_and_other_text_still_tokenizes():
    tokenizer = build_tokenizer(world_words())
    for word in world_words():
        assert tokenizer.tokenize(word) == [f"{word}</w>"]
    text = "two red circles on the left"
    assert len(tokenizer(text).input_ids) == len(text.split()) + 2  # start and end tokens
    assert len(tokenizer.tokenize("zebra")) > 1  # unknown words fall back to characters


@pytest.fixture(scope="module")
def smoke_pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "pipeline"
    main(["--out", str(out), "--smoke"])
    return out


def test_smoke_training_writes_a_pipeline_that_loads_through_the_real_path(smoke_pipeline):
    from diffusers import StableDiffusionPipeline

    from rlr_lightning.models import StableDiffusionBackbone, load_backbone

    record = json.loads((smoke_pipeline / WORLD_MARKER).read_text())
    assert record["recipe"]["unet_steps"] == 2 and record["palette"]
    backbone = load_backbone(smoke_pipeline, local_files_only=True)
    assert isinstance(backbone, StableDiffusionBackbone)
    # The latent scale was set from the data, not left at Stable Diffusion's 0.18215.
    assert backbone.vae.config.scaling_factor != pytest.approx(0.18215)
    pipe = StableDiffusionPipeline.from_pretrained(smoke_pipeline, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_evaluation_checks_every_held_out_caption(smoke_pipeline):
    from rlr_lightning.world.evaluate import evaluate

    result = evaluate(smoke_pipeline, num_steps=2)
    assert result["n"] == len(split_specs()[1])
    assert all(0 <= result[k] <= 1 for k in ("color_ok", "count_ok", "position_ok", "all_ok"))
    assert result["all_ok"] <= min(result["count_ok"], result["position_ok"])
    assert caption(split_specs()[1][0])  # held-out captions are the grammar's


def test_evaluate_command_reports_and_writes_the_accuracies(smoke_pipeline, tmp_path, capsys):
    from rlr_lightning.eval_cli import legacy_main as evaluate_main

    out = tmp_path / "accuracy.json"
    # The older command line (a positional pipeline) still runs: it is `rlr eval --model PIPELINE`.
    evaluate_main(
        [
            str(smoke_pipeline),
            "--steps",
            "2",
            "--seeds",
            "0",
            "--samples-per-caption",
            "1",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["n"] == len(split_specs()[1]) and result["settings"]["model"] == str(smoke_pipeline)
    table = capsys.readouterr().out
    colour = next(line for line in table.splitlines() if line.startswith("colour "))
    assert f"{100 * result['mean']['color_ok']:5.1f}%" in colour
