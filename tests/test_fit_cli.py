"""``rlr fit`` / ``rlr validate`` end to end, as a user runs them: console, exit status, files, resume, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def rlr(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlr_lightning", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def rlr_many(commands: dict[str, tuple], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run several short ``rlr`` commands at once (each mostly waits for imports)."""
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "rlr_lightning", *args],
            cwd=cwd,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env} if env else None,
        )
        for name, (args, env) in (
            (n, c if isinstance(c[-1], dict) else (c, None)) for n, c in commands.items()
        )
    }
    done = {}
    for name, proc in started.items():
        out, err = proc.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def quickstart_args(out: Path) -> list[str]:
    """The quickstart (its shapes-world model) made small: the model options a resumed or validated run must
    repeat, and where files go."""
    return [
        "--config",
        str(QUICKSTART),
        "--model.num_steps",
        "4",
        "--data.batch_size",
        "2",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger.init_args.save_dir",
        str(out),
    ]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """``rlr fit`` on the quickstart config for 3 steps, in a subprocess: (process, output dir)."""
    cwd = tmp_path_factory.mktemp("quickstart")
    out = cwd / "run"
    proc = rlr("fit", *quickstart_args(out), "--trainer.max_steps", "3", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


@pytest.mark.slow
def test_fit_quickstart_writes_checkpoint_and_lora_a_pipeline_loads(quickstart_run):
    from diffusers import StableDiffusionPipeline

    from rlr_lightning.builtin import WORLD_PIPELINE_DIR

    proc, out = quickstart_run
    checkpoints = list(out.rglob("last.ckpt"))
    exported = list(out.rglob("pytorch_lora_weights.safetensors"))
    assert len(checkpoints) == 1 and len(exported) == 1
    ckpt = torch.load(checkpoints[0], weights_only=False)
    assert ckpt["global_step"] == 3 and all("lora_" in k for k in ckpt["state_dict"])

    pipe = StableDiffusionPipeline.from_pretrained(
        WORLD_PIPELINE_DIR, local_files_only=True, safety_checker=None
    )
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    context = torch.randn(1, 12, 64)
    with torch.no_grad():
        base = pipe.unet(x, t, context).sample
        pipe.load_lora_weights(exported[0].parent, adapter_name="rlr")
        tuned = pipe.unet(x, t, context).sample
    assert not torch.allclose(base, tuned)  # three steps moved the weights, and diffusers applies them
    run_dir = checkpoints[0].parent.parent
    metrics = (run_dir / "metrics.csv").read_text()
    # The before/after grid lies next to the metrics: 8 captions, base model above, fine-tuned below.
    with Image.open(run_dir / "before_after.png") as grid:
        assert grid.size[0] > 8 * 32 * 4 and grid.size[1] > 2 * 32 * 4
    assert len((run_dir / "before_after.csv").read_text().splitlines()) == 1 + 8
    for column in (
        "train/reward",
        "train/grad_norm_fo",
        "train/grad_norm_ho",
        "train/block_start",
        "train/images_per_sec",
    ):
        assert column in metrics


@pytest.mark.slow
def test_fit_console_says_where_things_go_once_and_nothing_unactionable(quickstart_run):
    proc, out = quickstart_run
    console = proc.stdout + proc.stderr
    run_dir = out / "rlr" / "version_0"
    export = run_dir / "lora" / "pytorch_lora_weights.safetensors"
    assert f"Run directory {run_dir}\n" in console.replace("\r", "\n")
    assert console.count(str(export)) == 1
    for noise in (
        "LeafSpec",
        "Total length of",
        "smaller than the logging interval",
        "in eval mode",
        "AFTER optimization",
        "FLOPs",
        "Epoch",
        "/-2",
        "v_num",
        "litlogger",
        "0.00it/s",
    ):
        assert noise not in console, noise
    # One progress bar over the run's optimizer steps.
    assert re.search(r"Training: 100%\S* *\S* 3/3 ", console)


@pytest.mark.slow
def test_fit_logs_the_resolved_config_as_hyperparameters(quickstart_run):
    _, out = quickstart_run
    hparams = yaml.safe_load((out / "rlr" / "version_0" / "hparams.yaml").read_text())
    model = hparams["model"]
    assert model["estimator"]["class_path"] == "rlr_lightning.estimators.RLR"
    assert model["estimator"]["init_args"]["h"] == 2
    assert model["reward"]["class_path"] == "rlr_lightning.rewards.WorldCountReward"
    quickstart = yaml.safe_load(QUICKSTART.read_text())["model"]
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert model["optimizer"]["init_args"]["lr"] == quickstart["optimizer"]["init_args"]["lr"]
    assert hparams["data"]["batch_size"] == 2
    assert (out / "rlr" / "version_0" / "config.yaml").is_file()


@pytest.mark.slow
def test_resume_refuses_changed_model_options_and_applies_harmless_ones(quickstart_run, tmp_path):
    from rlr_lightning.cli import build_cli
    from rlr_lightning.lightning_cli import UsageError

    _, out = quickstart_run
    ckpt = out / "rlr" / "version_0" / "checkpoints" / "last.ckpt"
    elsewhere = quickstart_args(tmp_path / "resumed")
    with pytest.raises(UsageError) as refused:
        build_cli(
            ["fit", *elsewhere, "--ckpt_path", str(ckpt), "--model.num_steps", "8", "--model.lora.rank", "8"]
        )
    message = str(refused.value)
    assert "model.num_steps: checkpoint 4, requested 8" in message
    assert re.search(r"model\.lora: checkpoint \{.*'rank': 4.*\}, requested \{.*'rank': 8.*\}", message)
    assert f"--config {ckpt.parent.parent / 'config.yaml'}" in message

    # A new export_dir is harmless: the resumed run takes it (Lightning would restore the checkpoint's null).
    export = tmp_path / "export"
    cli = build_cli(
        [
            "fit",
            *elsewhere,
            "--ckpt_path",
            str(ckpt),
            "--trainer.max_steps",
            "4",
            "--model.export_dir",
            str(export),
        ]
    )
    assert cli.trainer.global_step == 4 and cli.model.hparams.num_steps == 4
    assert (export / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_validate_scores_the_checkpoints_lora_weights(quickstart_run, tmp_path):
    import lightning as L

    from rlr_lightning.cli import build_cli
    from rlr_lightning.data import PromptDataModule

    _, out = quickstart_run
    ckpt = out / "rlr" / "version_0" / "checkpoints" / "last.ckpt"
    prompts = ["a red circle on the left", "two blue squares at the top", "a green triangle in the center"]
    val = ["--data.val_prompts", json.dumps(prompts)]
    cli = build_cli(["validate", *quickstart_args(tmp_path), *val, "--ckpt_path", str(ckpt)])
    reported = float(cli.trainer.callback_metrics["val/reward_mean"])

    def validate(load_export: bool) -> float:
        module = build_cli(quickstart_args(tmp_path), run=False).model
        module.configure_model()
        if load_export:  # the diffusers file the same run exported, not the checkpoint
            module.backbone.load_lora(out / "rlr" / "version_0" / "lora")
        trainer = L.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        data = PromptDataModule(batch_size=2, val_prompts=prompts)
        return trainer.validate(module, datamodule=data, verbose=False)[0]["val/reward_mean"]

    assert reported == pytest.approx(validate(load_export=True), abs=1e-6)
    assert reported != pytest.approx(validate(load_export=False), abs=1e-6)


@pytest.mark.slow
def test_command_line_errors_are_short_and_exit_2(tmp_path):
    garbage = tmp_path / "last.ckpt"
    garbage.write_text("not a checkpoint\n")
    q = ("--config", str(QUICKSTART))
    procs = rlr_many(
        {
            "h": ("fit", *q, "--model.estimator.init_args.h", "10"),  # raised while building the module
            "unknown": ("fit", *q, "--model.foo", "1"),  # raised by the parser
            "garbage": ("fit", *q, "--ckpt_path", str(garbage)),
            "version": ("--version",),
        },
        cwd=tmp_path,
    )
    expected = {
        "h": "h=10 must be <= T-1=9",
        "unknown": "unrecognized arguments: --model.foo 1",
        "garbage": f"--ckpt_path {garbage} is not a checkpoint written by rlr fit",
    }
    for name, text in expected.items():
        proc = procs[name]
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) <= 3 and any(
            line.startswith("rlr fit: error: ") and text in line for line in lines
        ), lines
        assert "Traceback" not in proc.stderr and "weights_only" not in proc.stderr
    assert "RLR_DEBUG=1" in procs["h"].stderr
    assert (
        procs["version"].returncode == 0
        and procs["version"].stdout.strip() == f"rlr {version('rlr_lightning')}"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--model.num_steps", "-1"], "num_steps must be >= 1, got -1"),
        (["fit", "--trainer.gradient_clip_val", "0.5"], "use --model.gradient_clip_val 0.5"),
        (["fit", "--trainer.accumulate_grad_batches", "2"], "use --model.gradient_accumulation_steps 2"),
        (["validate"], "give some with --data.val_prompts"),
    ],
    ids=["num-steps", "trainer-clip", "trainer-accumulate", "validate-without-prompts"],
)
def test_settings_that_cannot_run_fail_with_a_message_and_status_2(args, message, capsys):
    from rlr_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([args[0], "--config", str(QUICKSTART), *args[1:]])
    assert exit_info.value.code == 2
    *_, error, hint = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"rlr {args[0]}: error: ") and message in error
    assert hint == "(set RLR_DEBUG=1 for the full traceback)"


def test_rlr_debug_shows_the_traceback_and_help_lists_validate(monkeypatch, capsys):
    from rlr_lightning.cli import main

    main(["--help"])  # returns: the console script exits 0
    assert "validate" in capsys.readouterr().out
    monkeypatch.setenv("RLR_DEBUG", "1")
    with pytest.raises(ValueError, match="h=10 must be <= T-1=9"):
        main(["fit", "--config", str(QUICKSTART), "--model.estimator.init_args.h", "10"])


def test_print_config_and_help_document_the_arguments(capsys):
    from rlr_lightning.cli import main

    def run(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        assert exit_info.value.code in (0, None)
        return capsys.readouterr().out

    printed = run("fit", "--config", str(QUICKSTART), "--print_config")
    assert "class_path: rlr_lightning.estimators.RLR" in printed and "zo_mode: score" in printed
    help_text = run("fit", "--help")
    assert "--model.num_steps" in help_text and "Sampling steps" in help_text  # docstrings become help
    assert "Stop with an error after this many updates" in help_text
    estimator_help = run("fit", "--model.estimator.help", "rlr_lightning.estimators.RLR")
    assert "Block length (half-order sub-chain)" in estimator_help
