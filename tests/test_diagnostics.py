"""The gradient diagnostics API separates unbiased from biased estimators and leaves training state alone."""

from __future__ import annotations

import gc

import pytest
import torch

from rlr_lightning.diagnostics import (
    GradientDiagnosticsCallback,
    compare,
    diagnose,
    gradient_samples,
    reference_gradient,
)
from rlr_lightning.estimators import RLR, TruncatedBackprop
from rlr_lightning.rewards import ColorBalance
from tests.test_module import data, make_module, make_trainer

PROMPTS = ["cat", "dog", "owl", "fox"]


@pytest.fixture
def module(tiny_pipeline_dir):
    # A linear reward: its full gradient points the same way on every draw, so a truncation bias stands out.
    module = make_module(tiny_pipeline_dir, num_steps=4, reward=ColorBalance())
    module.configure_model()
    from tests.conftest import perturb_lora_

    perturb_lora_(module.backbone.unet, seed=1, scale=0.05)  # LoRA B = 0 at init hides LoRA A's gradient
    return module


def test_samples_are_paired_reproducible_and_leave_grads_untouched(module):
    params = list(module.backbone.lora_parameters().values())
    params[0].grad = torch.full_like(params[0], 7.0)
    a = gradient_samples(module, PROMPTS, RLR(h=1), num_samples=3, seed=5)
    b = gradient_samples(module, PROMPTS, RLR(h=1), num_samples=3, seed=5)
    assert a.shape == (3, sum(p.numel() for p in params)) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # independent draws
    assert torch.equal(params[0].grad, torch.full_like(params[0], 7.0)) and params[1].grad is None


def test_compare_of_exact_samples_with_themselves_and_of_a_shifted_copy():
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(64, 20, generator=gen, dtype=torch.float64)
    noise = torch.randn(64, 20, generator=gen, dtype=torch.float64)
    unbiased = compare(reference + noise, reference)
    assert 0.5 < unbiased.bias_se < 2 and unbiased.variance > unbiased.reference_variance
    biased = compare(reference + noise + 1.0, reference)
    # A shift of 1 in 20 coordinates against an SE of sqrt(20 / 64): about 8 standard errors.
    assert biased.bias_se > 5 and biased.max_abs_z > 4


@pytest.mark.slow
def test_diagnose_flags_truncated_backprop_and_not_rlr(module):
    rlr = diagnose(module, PROMPTS, RLR(h=1), num_samples=24)
    truncated = diagnose(module, PROMPTS, TruncatedBackprop(k=1), num_samples=24)
    assert rlr.bias_se < 2 and rlr.max_abs_z < 4
    assert truncated.bias_se > 2.5 and truncated.max_abs_z > 5 and truncated.cosine > 0.5
    reference = reference_gradient(module, PROMPTS, num_samples=24)
    assert truncated.reference_variance == pytest.approx(float(reference.var(0).sum()))
    assert rlr.variance > rlr.reference_variance  # likelihood ratios cost variance


def test_diagnostics_callback_logs_during_training(tiny_pipeline_dir, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    callback = GradientDiagnosticsCallback(PROMPTS[:2], every_n_steps=2, num_samples=2)
    module = make_module(tiny_pipeline_dir, num_steps=4)
    trainer = make_trainer(tmp_path, max_steps=2, logger=CSVLogger(tmp_path), callbacks=[callback])
    trainer.fit(module, datamodule=data())
    assert [step for step, _ in callback.history] == [2]
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "diag/bias_se" in metrics and "diag/cosine" in metrics


def rlr_step_peak_bytes(tiny_pipeline_dir, num_steps: int, h: int, zo_mode: str = "score") -> int:
    from rlr_lightning.estimators import estimate_gradient
    from rlr_lightning.memory import AutogradMemoryMeter

    module = make_module(
        tiny_pipeline_dir, num_steps=num_steps, estimator=RLR(h=h, zo_mode=zo_mode, zo_scale=1e-3)
    )
    module.configure_model()
    embeds = module.backbone.encode_prompts(PROMPTS, negative=False)
    with AutogradMemoryMeter(exclude=module.parameters()) as meter:
        estimate = estimate_gradient(
            module.estimator, module.task.sampler, embeds, PROMPTS, module.task.latent_reward, 1, 2
        )
        del estimate
        gc.collect()  # the terms' closures and the rollout reference each other
    assert meter.live == 0  # nothing outlives the step
    return meter.peak


def test_rlr_activation_memory_is_flat_in_T_and_grows_with_h(tiny_pipeline_dir):
    """method.md §8: peak memory of one RLR step does not grow with T at fixed h; it grows with h."""
    t6, t12 = (rlr_step_peak_bytes(tiny_pipeline_dir, T, h=2, zo_mode="parameter") for T in (6, 12))
    assert t12 == pytest.approx(t6, rel=0.02)
    h1, h2, h4 = (rlr_step_peak_bytes(tiny_pipeline_dir, 12, h=h, zo_mode="parameter") for h in (1, 2, 4))
    assert h1 < h2 < h4 and (h4 - h2) == pytest.approx(2 * (h2 - h1), rel=0.1)  # linear in h
    # score-mode re-scoring runs chunk by chunk (score_chunk_steps=4 steps per UNet call): flat in T once
    # there are full chunks.
    s12, s20 = (rlr_step_peak_bytes(tiny_pipeline_dir, T, h=2) for T in (12, 20))
    assert s20 == pytest.approx(s12, rel=0.02)
