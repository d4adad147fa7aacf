"""The Python API as a user calls it: ``load_backbone`` with the model names the command line takes, and a
checkpoint of ``rlr fit`` loaded with ``RLRModule.load_from_checkpoint`` to sample and export without a
reward."""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from rlr_lightning.builtin import BUILTIN_MODELS, WORLD_MODEL, WORLD_PIPELINE_DIR, resolve_model
from rlr_lightning.data import PromptBatch, PromptDataModule
from rlr_lightning.models import FAMILIES, load_backbone
from rlr_lightning.module import RLRModule

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
#: One prompt: every image costs seconds on a shared CPU, and one shows what any batch would.
PROMPTS = ["three green squares at the top"]
#: The backbone's log line that names the directory it loads (what the user reads in the console).
LOADED_FROM = re.compile(r"Loading the (\w+) backbone from (\S+) \(dtype")


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory) -> Path:
    """One cache for the tiny models of this module: each family is built once, and never into ~/.cache."""
    return tmp_path_factory.mktemp("rlr-cache")


def loaded_from(caplog) -> list[tuple[str, str]]:
    """The (backbone class, directory) of every backbone loaded while ``caplog`` captured."""
    return [m.groups() for r in caplog.records if (m := LOADED_FROM.match(r.getMessage()))]


VIDEO_MODELS = ("tiny-wan", "moving-shapes")


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_load_backbone_takes_every_builtin_name_as_rlr_sample_does(
    name, builtin_cache, monkeypatch, caplog, tmp_path
):
    from rlr_lightning.cli import sample

    monkeypatch.setenv("RLR_CACHE", str(builtin_cache))
    caplog.set_level(logging.INFO, logger="rlr_lightning")
    sample(
        [
            "--model",
            name,
            "--steps",
            "1",
            "--guidance",
            "1",
            "--prompt",
            "a red circle",
            "--device",
            "cpu",
            "--out",
            # The video models write a video (an image name is refused for them).
            str(tmp_path / ("sample.mp4" if name in VIDEO_MODELS else "sample.png")),
        ]
    )
    by_cli = loaded_from(caplog)
    caplog.clear()

    backbone = load_backbone(name)

    directory = resolve_model(name)
    family = FAMILIES[json.loads((Path(directory) / "model_index.json").read_text())["_class_name"]]
    assert type(backbone) is family
    assert loaded_from(caplog) == by_cli == [(family.__name__, directory)]


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory) -> Path:
    """A one-step ``rlr fit`` of the quickstart (shapes-world, the count reward, 3 sampling steps): its run
    directory."""
    from rlr_lightning.cli import build_cli

    out = tmp_path_factory.mktemp("fit") / "run"
    # The quickstart's before/after grid renders 8 captions twice: only the checkpointing is needed here.
    only_checkpoints = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    ]
    build_cli(
        [
            "fit",
            "--config",
            str(QUICKSTART),
            "--model.num_steps",
            "3",
            "--data.batch_size",
            "2",
            "--trainer.max_steps",
            "1",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks",
            json.dumps(only_checkpoints),
            "--trainer.default_root_dir",
            str(out),
            "--trainer.logger.init_args.save_dir",
            str(out),
        ]
    )
    (run_dir,) = out.glob("rlr/version_*")
    return run_dir


def load_checkpoint(run_dir: Path, **kwargs) -> RLRModule:
    """``RLRModule.load_from_checkpoint`` of the run's last checkpoint; fails if it warns of missing keys."""
    with warnings.catch_warnings():
        # The checkpoint holds only LoRA weights by design: listing the backbone's as missing is noise.
        warnings.filterwarnings("error", message=".*not in the checkpoint")
        return RLRModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", **kwargs)


@pytest.fixture(scope="module")
def loaded(fitted_run) -> RLRModule:
    """The run's checkpoint loaded as a user would, without a reward (shared: loading costs seconds)."""
    return load_checkpoint(fitted_run)


def png_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.slow
def test_a_checkpoint_loads_without_a_reward_and_samples_as_its_runs_export(fitted_run, loaded, tmp_path):
    from torchvision.utils import save_image

    from rlr_lightning.cli import sample

    module = loaded
    assert module.reward is None and module.backbone is not None
    images = module.generate(PromptBatch.from_prompts(PROMPTS), torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 32, 32) and 0 <= float(images.min()) <= float(images.max()) <= 1
    save_image(images, tmp_path / "checkpoint.png")

    # The same images as `rlr sample` with the LoRA the run exported, sampled as trained.
    sample(
        [
            "--model",
            WORLD_MODEL,
            "--lora",
            str(fitted_run / "lora"),
            "--steps",
            "3",
            "--eta",
            "1",
            "--guidance",
            "1",
            "--timestep-spacing",
            "trailing",
            "--seed",
            "0",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "export.png"),
            "--prompt",
            PROMPTS[0],
        ]
    )
    assert np.abs(png_pixels(tmp_path / "checkpoint.png") - png_pixels(tmp_path / "export.png")).max() <= 1

    # ... and not those of the base model: the checkpoint's LoRA weights are applied.
    with module.backbone.lora_disabled():
        base_images = module.generate(PromptBatch.from_prompts(PROMPTS), torch.Generator().manual_seed(0))
    assert (images - base_images).abs().max() > 1e-3


@pytest.mark.slow
def test_a_checkpoint_loaded_without_a_reward_exports_a_lora_the_pipeline_loads(loaded, tmp_path):
    from diffusers import StableDiffusionPipeline

    module = loaded
    exported = module.backbone.export_lora(tmp_path / "lora")

    pipe = StableDiffusionPipeline.from_pretrained(
        WORLD_PIPELINE_DIR, local_files_only=True, safety_checker=None
    )
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 12, 64, generator=gen)
    t = torch.tensor([500])
    with torch.no_grad():
        base = pipe.unet(x, t, context).sample
        pipe.load_lora_weights(exported.parent, adapter_name="rlr")
        tuned = pipe.unet(x, t, context).sample
        ours = module.backbone.unet(x, t, context).sample
    torch.testing.assert_close(tuned, ours, rtol=1e-4, atol=1e-5)  # diffusers applies the checkpoint's LoRA
    assert (tuned - base).abs().max() > 1e-4


@pytest.mark.slow
def test_training_or_validating_a_checkpoint_without_a_reward_says_to_give_one(fitted_run, loaded, tmp_path):
    module = loaded
    lora = {k: v.clone() for k, v in module.backbone.lora_parameters().items()}
    data = PromptDataModule(prompt_set="shapes", batch_size=1, val_prompts=PROMPTS)
    for run, action in (("fit", "train"), ("validate", "validate")):
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        with pytest.raises(ValueError) as refused:
            getattr(trainer, run)(module, datamodule=data)
        message = str(refused.value)
        assert f"model.reward is required to {action} 'shapes-world'" in message
        assert "--model.reward rlr_lightning.rewards." in message  # the option that sets it
        assert "load_from_checkpoint(path, reward=...)" in message
        assert "trained with rlr_lightning.rewards.world.WorldCountReward" in message
        assert trainer.global_step == 0
    assert all(torch.equal(lora[k], v) for k, v in module.backbone.lora_parameters().items())

    # Given the reward, the same checkpoint validates.
    from rlr_lightning.rewards import WorldCountReward

    module = load_checkpoint(fitted_run, reward=WorldCountReward())
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    assert np.isfinite(metrics["val/reward_mean"])


def test_rlr_fit_without_a_reward_fails_before_loading_the_model(tmp_path, capsys, caplog):
    from rlr_lightning.cli import main

    caplog.set_level(logging.INFO, logger="rlr_lightning")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(QUICKSTART),
                "--model.reward",
                "null",
                "--trainer.default_root_dir",
                str(tmp_path),
                "--trainer.logger.init_args.save_dir",
                str(tmp_path),
            ]
        )
    assert exit_info.value.code == 2  # a command-line mistake, found before anything runs
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-2]
    assert error.startswith("rlr fit: error: rlr fit needs a reward to train with: give --model.reward")
    assert "--model.reward rlr_lightning.rewards." in error and "WorldCountReward" in error
    assert "Seed set" not in err  # announced only once the command line has passed its checks
    assert not loaded_from(caplog)  # refused before the backbone loads
