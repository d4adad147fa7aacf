"""``benchmarks/checkpointed_backprop.py``: its measurement of one T, run in-process on the tiny model (the
same code path as the world run, at T = 4 with 2 draws and 1 timed round)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_one_t_measures_every_configuration_and_the_gradient_norm(monkeypatch, tiny_pipeline_dir):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import checkpointed_backprop as script
    from common import move_lora_off_init, tiny_module

    from rlr_lightning.estimators import FullBackprop

    torch.manual_seed(0)
    module = tiny_module(FullBackprop(), 4, pretrained=str(tiny_pipeline_dir))
    move_lora_off_init(module, 0.05)
    rows, norms = script.measure(module, ["cat", "owl"], draws=2, repeats=1, num_steps=4)

    by_name = {row["name"]: row for row in rows}
    assert list(by_name) == [name for name, *_ in script.configs()]
    for row in rows:
        assert row["steps"] == 4 and row["activation_mb"] > 0
        assert row["time_s"] > 0 and len(row["times_s"]) == 1
    plain, checkpointed, chunked = (by_name[n] for n in (script.PLAIN, script.CHECKPOINTED, script.CHUNKED))
    # Checkpointing keeps less for backward, chunking less still, and neither changes the gradient.
    assert chunked["activation_mb"] < checkpointed["activation_mb"] < plain["activation_mb"]
    assert checkpointed["grad_max_rel_diff"] < 1e-4 and chunked["grad_max_rel_diff"] < 1e-4
    assert plain["vs_plain"] == 1.0 and by_name[script.RLR_NAME]["vs_rlr"] == 1.0
    rlr_time = by_name[script.RLR_NAME]["time_s"]
    assert math.isclose(checkpointed["vs_rlr"], checkpointed["time_s"] / rlr_time)

    assert norms["steps"] == 4 and norms["draws"] == 2 and norms["finite"]
    assert len(norms["norms"]) == 2 and norms["norm_mean"] > 0 and norms["max_over_median"] >= 1
    assert 0 <= norms["mean_norm_debiased"] <= norms["mean_norm"] <= norms["norm_mean"] + 1e-12
    # The module is left as it was built: plain full backprop, no checkpointing.
    assert isinstance(module.estimator, FullBackprop) and not module.task.memory_plan.activation_checkpointing
