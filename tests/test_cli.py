"""The ``rlr`` command."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rlr_lightning.cli import main
from rlr_lightning.models import LoraSettings
from rlr_lightning.sampling import Plan


def test_rlr_sample_writes_a_grid_and_logs_log_probs(tiny_pipeline_dir, tmp_path, caplog):
    out = tmp_path / "grid.png"
    with caplog.at_level("INFO", logger="rlr_lightning"):
        main(
            [
                "sample",
                "--model",
                str(tiny_pipeline_dir),
                "--steps",
                "3",
                "--prompt",
                "a cat",
                "--prompt",
                "a dog",
                "--out",
                str(out),
            ]
        )
    assert Image.open(out).size == (2 * 16 + 3 * 2, 16 + 2 * 2)  # two 16 px images with save_image padding
    steps = [r.getMessage() for r in caplog.records if "log p" in r.getMessage()]
    assert len(steps) == 3
    # A deterministic sampler has no transition density: its steps say so instead of logging NaN.
    caplog.clear()
    with caplog.at_level("INFO", logger="rlr_lightning"):
        main(["sample", "--model", str(tiny_pipeline_dir), "--steps", "3", "--eta", "0", "--out", str(out)])
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(steps) == 3 and all(m.endswith("deterministic") and "nan" not in m for m in steps)


def test_rlr_sample_is_reproducible_by_seed(tiny_pipeline_dir, tmp_path):
    args = ["sample", "--model", str(tiny_pipeline_dir), "--steps", "2", "--prompt", "a cat"]
    main(args + ["--seed", "1", "--out", str(tmp_path / "a.png")])
    main(args + ["--seed", "1", "--out", str(tmp_path / "b.png")])
    main(args + ["--seed", "2", "--out", str(tmp_path / "c.png")])
    load = lambda name: torch.from_numpy(np.asarray(Image.open(tmp_path / name)).copy())  # noqa: E731
    assert torch.equal(load("a.png"), load("b.png"))
    assert not torch.equal(load("a.png"), load("c.png"))


def test_rlr_rejects_unknown_commands_and_bad_settings(tiny_pipeline_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="commands:"):
        main(["train"])
    # A bad sampler setting is a usage error naming the value, not a traceback.
    for args, message in (
        (["--eta", "-1"], "eta must be >= 0"),
        (["--resolution", "15"], "resolution 15x15"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", "--model", str(tiny_pipeline_dir), *args, "--out", str(tmp_path / "x.png")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def sample_grid(argv: list[str]) -> torch.Tensor:
    """Run ``rlr sample`` and read back the image grid it writes."""
    out = argv[argv.index("--out") + 1]
    main(["sample", *argv])
    return torch.from_numpy(np.asarray(Image.open(out)).copy())


def test_rlr_sample_applies_an_exported_lora_with_its_own_rank_alpha_and_targets(
    tiny_pipeline_dir, tmp_path, caplog
):
    from torchvision.utils import save_image

    from tests.test_backbone import TARGET_SETS, trained_backbone

    # Conv and linear layers besides attention, with rank != alpha.
    settings = LoraSettings(rank=2, alpha=3.0, target_modules=TARGET_SETS["wide"])
    trained = trained_backbone(tiny_pipeline_dir, settings)
    lora_dir = tmp_path / "lora"
    trained.export_lora(lora_dir)

    prompts = ["a cat", "a dog"]
    args = [
        "--model",
        str(tiny_pipeline_dir),
        "--steps",
        "3",
        "--eta",
        "1.0",
        "--guidance",
        "5.0",
        "--seed",
        "3",
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
    ]
    tuned = sample_grid(args + ["--lora", str(lora_dir), "--out", str(tmp_path / "tuned.png")])
    base = sample_grid(args + ["--out", str(tmp_path / "base.png")])
    assert not torch.equal(tuned, base)

    # The same images as the trained backbone draws itself: the LoRA is applied on every layer, at alpha / rank.
    sampler = trained.make_sampler(3, eta=1.0, guidance_scale=5.0)
    with torch.no_grad():
        trajectory = sampler.run(
            Plan(3), trained.encode_prompts(prompts), generator=torch.Generator().manual_seed(3)
        )
        save_image(trained.decode(trajectory.final), tmp_path / "reference.png", nrow=2)
    reference = torch.from_numpy(np.asarray(Image.open(tmp_path / "reference.png")).copy())
    assert torch.equal(tuned, reference)

    # --lora-rank is no longer needed; old command lines still run and are told to drop it.
    with caplog.at_level("WARNING", logger="rlr_lightning"):
        again = sample_grid(
            args + ["--lora", str(lora_dir), "--lora-rank", "4", "--out", str(tmp_path / "again.png")]
        )
    assert torch.equal(again, tuned)
    assert any("--lora-rank is deprecated and ignored" in r.getMessage() for r in caplog.records)


def test_rlr_sample_timestep_spacing_sets_the_logged_timesteps(tiny_pipeline_dir, tmp_path, caplog):
    from diffusers import DDIMScheduler

    logged = {}
    for spacing in ("leading", "trailing"):
        caplog.clear()
        with caplog.at_level("INFO", logger="rlr_lightning"):
            main(
                [
                    "sample",
                    "--model",
                    str(tiny_pipeline_dir),
                    "--steps",
                    "3",
                    "--prompt",
                    "a cat",
                    "--timestep-spacing",
                    spacing,
                    "--out",
                    str(tmp_path / "x.png"),
                ]
            )
        logged[spacing] = [
            int(re.search(r"t=\s*(\d+)", r.getMessage()).group(1))
            for r in caplog.records
            if "log p" in r.getMessage()
        ]
        expected = DDIMScheduler.from_pretrained(
            tiny_pipeline_dir, subfolder="scheduler", timestep_spacing=spacing
        )
        expected.set_timesteps(3)
        assert logged[spacing] == expected.timesteps.tolist(), spacing
    assert logged["leading"] != logged["trailing"]


def test_rlr_sample_refuses_a_lora_of_another_model_naming_the_file(tiny_pipeline_dir, tmp_path):
    from tests.test_backbone import export_lora_of_another_model

    path = export_lora_of_another_model(tiny_pipeline_dir, tmp_path / "other")
    with pytest.raises(SystemExit) as info:
        main(
            [
                "sample",
                "--model",
                str(tiny_pipeline_dir),
                "--lora",
                str(path),
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
    message = str(info.value.code)
    assert message.startswith("rlr sample: cannot apply --lora: ") and str(path) in message
    assert "in the file but" in message and "in this unet" in message
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_rlr_sample_bad_lora_exits_with_one_clear_line(tiny_pipeline_dir, tmp_path):
    """As a user sees it: exit status 1 and the reason, without a traceback."""
    from tests.test_backbone import export_lora_of_another_model

    path = export_lora_of_another_model(tiny_pipeline_dir, tmp_path / "other")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlr_lightning",
            "sample",
            "--model",
            str(tiny_pipeline_dir),
            "--lora",
            str(path),
            "--out",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert f"rlr sample: cannot apply --lora: {path} does not fit this unet" in proc.stderr
    assert "Traceback" not in proc.stderr
