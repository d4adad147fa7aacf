"""``rlr fit`` end to end in a subprocess, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def rlr(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlr_lightning", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_fit_quickstart_writes_checkpoint_and_lora_a_pipeline_loads(tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    proc = rlr("fit", "--config", str(QUICKSTART), "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1", "--model.num_steps", "4",
               "--data.batch_size", "2", "--model.pretrained_model_name_or_path", str(tiny_pipeline_dir),
               "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoints = list(out.rglob("last.ckpt"))
    exported = list(out.rglob("pytorch_lora_weights.safetensors"))
    assert len(checkpoints) == 1 and len(exported) == 1
    assert f"LoRA weights exported to {exported[0]}" in proc.stderr + proc.stdout
    ckpt = torch.load(checkpoints[0], weights_only=False)
    assert ckpt["global_step"] == 3 and all("lora_" in k for k in ckpt["state_dict"])

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True, safety_checker=None)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    context = torch.randn(1, 16, 32)
    with torch.no_grad():
        base = pipe.unet(x, t, context).sample
        pipe.load_lora_weights(exported[0].parent, adapter_name="rlr")
        tuned = pipe.unet(x, t, context).sample
    assert not torch.allclose(base, tuned)  # three steps moved the weights, and diffusers applies them
    metrics = (checkpoints[0].parent.parent / "metrics.csv").read_text()
    for column in ("train/reward", "train/grad_norm_fo", "train/grad_norm_ho", "train/block_start",
                   "train/images_per_sec"):
        assert column in metrics


def test_print_config_and_help_document_the_arguments(tmp_path):
    proc = rlr("fit", "--config", str(QUICKSTART), "--print_config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "class_path: rlr_lightning.estimators.RLR" in proc.stdout and "zo_mode: score" in proc.stdout
    help_text = rlr("fit", "--help", cwd=tmp_path).stdout
    assert "--model.num_steps" in help_text and "DDIM sampling steps" in help_text  # docstrings become help
    estimator_help = rlr("fit", "--model.estimator.help", "rlr_lightning.estimators.RLR", cwd=tmp_path).stdout
    assert "Block length (half-order sub-chain)" in estimator_help


def test_bad_settings_fail_before_training(tmp_path):
    proc = rlr("fit", "--config", str(QUICKSTART), "--model.estimator.init_args.h", "10", cwd=tmp_path)
    assert proc.returncode != 0
    assert "h=10 must be <= T-1=5" in proc.stderr
