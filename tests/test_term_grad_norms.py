"""Per-term gradient norms (``train/grad_norm_{fo,ho,zo}``) are those of each term's whole gradient, whatever the
memory plan splits it into, and so are the running norms the ``grad_norm`` block law learns from.

A memory plan splits the first- and half-order terms into sample chunks (``model.chunk_samples``) and the
zeroth-order re-scoring into step chunks (``score_chunk_steps``). The norm of a kind of term must be the norm of
the sum of its chunks' gradients: the same number as unchunked. Every T = 50 recipe and every memory plan chunks.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from rlr_lightning.data import PromptDataModule
from rlr_lightning.estimators import RLR, ScoreFunction
from rlr_lightning.module import RLRModule
from rlr_lightning.rewards import TargetColor

# Chunked and unchunked gradients differ by float32 summation order only (~1e-7 relative); the bug this guards
# against logged one chunk's norm, off by tens of percent.
TOLERANCE = 1e-4


def fit(tiny_pipeline_dir, tmp_path, estimator, steps: int, chunk_samples: int | None, num_steps: int):
    module = RLRModule(
        pretrained_model_name_or_path=str(tiny_pipeline_dir),
        num_steps=num_steps,
        eta=1.0,
        estimator=estimator,
        reward=TargetColor(),
        chunk_samples=chunk_samples,
        log_term_grad_norms=True,
        optimizer=lambda p: torch.optim.SGD(p, lr=1e-3),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=PromptDataModule(prompt_set="animals", batch_size=4))
    norms = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/grad_norm_")}
    return norms, module


def test_rlr_term_norms_and_block_law_do_not_depend_on_sample_chunks(tiny_pipeline_dir, tmp_path):
    """RLR with chunks of 1 of 4 samples: the first- and half-order terms are four chunks each."""
    runs = {}
    for chunk in (None, 1):
        estimator = RLR(h=1, block_law="grad_norm", score_chunk_steps=1)
        runs[chunk] = fit(
            tiny_pipeline_dir, tmp_path / str(chunk), estimator, steps=2, chunk_samples=chunk, num_steps=4
        )
    (whole, whole_module), (chunked, chunked_module) = runs[None], runs[1]
    assert set(whole) == {"train/grad_norm_fo", "train/grad_norm_ho", "train/grad_norm_zo"}
    assert chunked.keys() == whole.keys()
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], rel=TOLERANCE), key
    # The block law's running per-start norms: the starts drawn so far and their values.
    learned = whole_module.estimator.block_norms
    assert any(v is not None for v in learned)
    assert [v is None for v in chunked_module.estimator.block_norms] == [v is None for v in learned]
    for a, b in zip(chunked_module.estimator.block_norms, learned):
        if b is not None:
            assert a == pytest.approx(b, rel=TOLERANCE)


def test_score_function_norm_is_that_of_all_its_step_chunks(tiny_pipeline_dir, tmp_path):
    """T = 6 re-scored 5 steps per call: the zeroth-order term is two step chunks (5 + 1)."""
    norms = {}
    for per_call in (6, 5):
        estimator = ScoreFunction(score_chunk_steps=per_call)
        norms[per_call], _ = fit(
            tiny_pipeline_dir, tmp_path / str(per_call), estimator, steps=1, chunk_samples=None, num_steps=6
        )
    whole, chunked = norms[6]["train/grad_norm_zo"], norms[5]["train/grad_norm_zo"]
    assert math.isfinite(whole) and whole > 0
    assert chunked == pytest.approx(whole, rel=TOLERANCE)
