"""Checks every model family's tests run on its tiny model: re-scoring stored transitions, and `rlr fit` then
`rlr sample` through the command line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import torch

from rlr_lightning.sampling import Plan, ScaledPromptEmbeds

ROOT = Path(__file__).resolve().parents[1]


class WarningRecords(logging.Handler):
    """Collects the warnings of the loggers it is added to (diffusers' and transformers' loggers do not
    propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def check_rescoring_reproduces_the_sampling_log_probs(backbone, sampler, negative: bool) -> None:
    """Likelihood-ratio terms re-score stored transitions in stacked calls: the family's conditioning (its added
    tensors included) must follow each row, for step-major stacks and arbitrary rows, plain and DCoT; re-scoring a
    row with another sample's conditioning must change it (so the check has teeth)."""
    plain = backbone.encode_prompts(["a cat", "a red fox on a hill"], negative=negative)
    fine = backbone.encode_prompts(["a dog", "a blue boat"], negative=negative)
    T = sampler.num_steps
    for embeds in (plain, ScaledPromptEmbeds(((0, T // 2, plain), (T // 2, T, fine)))):
        trajectory = sampler.run(Plan(T), embeds, generator=torch.Generator().manual_seed(2))
        assert bool(torch.isfinite(trajectory.log_probs).all()) and bool((trajectory.sigmas > 0).all())
        steps = list(range(T))
        index, x, x_next = trajectory.transitions(steps)
        with torch.no_grad():
            stacked = sampler.log_probs(index, x, x_next, embeds.for_steps(steps))
        torch.testing.assert_close(stacked, trajectory.log_probs.flatten(), rtol=1e-4, atol=1e-3)
        rows_steps, rows_samples = torch.tensor([T - 1, 0, T // 2, 1]), torch.tensor([1, 0, 0, 1])
        index, x, x_next = trajectory.rows(rows_steps, rows_samples)
        with torch.no_grad():
            picked = sampler.log_probs(index, x, x_next, embeds.rows(rows_steps, rows_samples))
            swapped = sampler.log_probs(index, x, x_next, embeds.rows(rows_steps, 1 - rows_samples))
        torch.testing.assert_close(
            picked, trajectory.log_probs[rows_steps, rows_samples], rtol=1e-4, atol=1e-3
        )
        assert not torch.allclose(swapped, picked, rtol=1e-4, atol=1e-3)


def fit_and_sample_through_the_cli(
    model_dir, tmp_path: Path, family: str, fit_args: list[str], sample_args: list[str]
) -> None:
    """`rlr fit` (the quickstart config, 2 steps) in a subprocess, then `rlr sample` with its LoRA export.

    Checks the exit status, that the console names the family, the metrics, the export's run record, and that
    the samples drawn with the export are not blank.
    """
    from PIL import Image

    from rlr_lightning.cli import main

    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlr_lightning",
            "fit",
            "--config",
            str(ROOT / "configs/quickstart.yaml"),
            "--model.pretrained_model_name_or_path",
            str(model_dir),
            *fit_args,
            "--data.batch_size",
            "2",
            "--trainer.max_steps",
            "2",
            "--trainer.default_root_dir",
            str(out),
            "--trainer.logger.init_args.save_dir",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert family in proc.stderr + proc.stdout  # the family was detected, and said so
    metrics = next(out.rglob("metrics.csv")).read_text().splitlines()
    assert len([line for line in metrics[1:] if line.strip()]) >= 2
    exported = next(out.rglob("pytorch_lora_weights.safetensors"))
    assert json.loads((exported.parent / "rlr_export.json").read_text())["run_id"]
    # The export is a LoRA of this family that `rlr sample` draws with, on the model it was trained on.
    png = tmp_path / "samples.png"
    main(
        [
            "sample",
            "--model",
            str(model_dir),
            "--lora",
            str(exported.parent),
            *sample_args,
            "--prompt",
            "a cat",
            "--prompt",
            "a fox",
            "--out",
            str(png),
        ]
    )
    image = Image.open(png)
    assert image.size[0] >= 2 * 16 and any(lo < hi for lo, hi in image.getextrema())  # two samples, not blank
