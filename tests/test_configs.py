"""Every shipped config parses with the real CLI (``--print_config``) and says what method.md §7 says."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from rlr_lightning.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def resolved(*configs: Path) -> dict:
    """The config ``rlr fit`` composes from these files, in order, as ``--print_config`` prints it."""
    out = io.StringIO()
    args = [arg for config in configs for arg in ("--config", str(config))]
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_configs_exist():
    names = {c.name for c in CONFIGS}
    assert {"quickstart.yaml", "sd15_aesthetic_rlr.yaml", "sd15_hpsv2_rlr.yaml", "sd15_pickscore_rlr.yaml",
            "sd15_aesthetic_alignprop.yaml", "sd15_aesthetic_ddpo.yaml"} <= names


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.name.startswith("sd15_")], ids=lambda c: c.stem)
def test_real_model_configs_parse_and_match_the_paper_settings(config):
    cfg = resolved(config)
    model = cfg["model"]
    assert model["num_steps"] == 50 and model["guidance_scale"] == 5.0
    assert model["lora"]["rank"] == 4 and model["lora"]["alpha"] == 4.0
    assert model["lora"]["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert model["optimizer"]["init_args"]["lr"] == 1e-3 and model["optimizer"]["init_args"]["weight_decay"] == 1e-4
    assert model["weight_dtype"] == "bfloat16" and cfg["trainer"]["precision"] == "bf16-mixed"
    estimator = model["estimator"]
    if config.stem.endswith("_rlr"):
        assert estimator["class_path"] == "rlr_lightning.estimators.RLR" and estimator["init_args"]["h"] == 2
    reward = model["reward"]["class_path"]
    expected = {"aesthetic": "AestheticReward", "hpsv2": "HPSv2Reward", "pickscore": "PickScoreReward"}
    assert reward == "rlr_lightning.rewards." + expected[config.stem.split("_")[1]]


def test_every_config_key_is_commented():
    """In the style of litgpt's config hub: every setting line of the real-model configs has a comment."""
    for config in CONFIGS:
        if not config.name.startswith("sd15_"):
            continue
        for number, line in enumerate(config.read_text().splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.endswith(":") or stripped.startswith("- class_path"):
                continue
            assert "#" in line, f"{config.name}:{number} has no comment: {line!r}"


@pytest.mark.parametrize("base", ["quickstart.yaml", "sd15_aesthetic_rlr.yaml"])
def test_sample_images_overlay_adds_its_callback_and_keeps_the_base_checkpointing(base):
    configs = CONFIGS[0].parent
    base_callbacks = resolved(configs / base)["trainer"]["callbacks"]
    cfg = resolved(configs / base, configs / "wandb.yaml", configs / "sample_images.yaml")
    callbacks = cfg["trainer"]["callbacks"]
    assert callbacks[: len(base_callbacks)] == base_callbacks  # the ModelCheckpoint and its settings survive
    assert [c["class_path"] for c in callbacks] == [
        "lightning.pytorch.callbacks.ModelCheckpoint", "rlr_lightning.callbacks.SampleImageLogger"]
    assert callbacks[-1]["init_args"]["every_n_steps"] == 50
    assert cfg["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"


@pytest.mark.parametrize("card, budget", [("24gb", 23), ("40gb", 39), ("80gb", "auto")])
def test_gpu_recipes_compose_with_a_model_config_and_plan_memory(card, budget):
    configs = CONFIGS[0].parent
    recipe = configs / "gpu" / f"{card}.yaml"
    cfg = resolved(configs / "sd15_aesthetic_rlr.yaml", recipe)
    assert cfg["model"]["memory_budget_gb"] == budget and cfg["data"]["batch_size"] == 6
    assert cfg["model"]["estimator"]["init_args"]["h"] == 2  # the paper's settings stay
    for number, line in enumerate(recipe.read_text().splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line, f"{recipe.name}:{number} has no comment: {line!r}"
