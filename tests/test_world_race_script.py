"""``benchmarks/world_race.py``: how it builds each run (through ``rlr fit``'s own config parsing, with the
run's overrides and ``--fit-args`` last) and how it reports results (absolute accuracies, and changes paired
with the base model on the same sampling noise). The race itself trains for hours and never runs here."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def race(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import world_race

    monkeypatch.setattr(world_race, "RESULTS", tmp_path)
    return world_race


def _evaluation(values: list[float]) -> dict:
    """An ``evaluate_seeds`` result whose every check has ``values`` (one per sampling seed)."""
    keys = ("color_ok", "count_ok", "position_ok", "all_ok")
    return {
        "per_seed": [dict.fromkeys(keys, v) for v in values],
        "mean": dict.fromkeys(keys, statistics.fmean(values)),
    }


def _run(name: str, seed: int, values: list[float]) -> dict:
    return dict(
        run=name,
        seed=seed,
        seconds=60.0,
        images=9600,
        lora="",
        curve=[
            dict(images=0, reward=0.0, color_ok=1.0, count_ok=0.5, position_ok=1.0, all_ok=0.5),
            dict(images=9600, reward=0.1, color_ok=1.0, count_ok=0.6, position_ok=1.0, all_ok=0.6),
        ],
        final={"held_out": _evaluation(values), "train": _evaluation(values)},
    )


def test_paired_changes_are_per_sampling_seed_and_over_training_seeds(race):
    base = [0.50, 0.52, 0.48]
    one, other = "truncated backprop (K=1)", "RLR (today)"
    payload = {
        "machine": "test machine",
        "base": {"held_out": _evaluation(base), "train": _evaluation(base)},
        "runs": [
            _run(one, 0, [0.60, 0.58, 0.62]),  # +10, +6, +14 on the same noise
            _run(other, 0, [0.55, 0.57, 0.53]),  # +5 every seed: no spread
            _run(other, 1, [0.59, 0.61, 0.57]),
        ],
    }  # +9 every seed
    rows = {row["run"]: row for row in race.paired_rows(payload)}
    # One training seed: mean and standard error over the sampling seeds of (run - base) on the same seed.
    assert rows[one]["seeds"] == "0"
    assert rows[one]["held_out_all_ok"] == f"+10.0 ± {statistics.stdev([10, 6, 14]) / math.sqrt(3):.1f}"
    # Two training seeds: the spread is the training runs' (+5 and +9), not the sampling seeds' (none).
    assert rows[other]["seeds"] == "0 1"
    assert rows[other]["held_out_count_ok"] == f"+7.0 ± {statistics.stdev([5, 9]) / math.sqrt(2):.1f}"

    tables = race.report(payload, "race_test")
    written = (race.RESULTS / "race_test.md").read_text()
    assert written.startswith("test machine") and tables in written
    assert "| truncated backprop (K=1) | 0 | +10.0 ± 2.3 |" in written
    assert "| RLR (today) | 0 1 | 57.0% ± 2.0 |" in written  # absolute: the mean over training seeds
    assert (race.RESULTS / "race_test.png").stat().st_size > 0


def test_report_rewrites_the_tables_from_stored_results_and_explains_a_missing_file(tmp_path):
    script = BENCHMARKS / "world_race.py"
    missing = subprocess.run(
        [sys.executable, str(script), "--report", "--name", "no_such_race"], capture_output=True, text=True
    )
    assert missing.returncode == 2
    assert "no results at" in missing.stderr and "no_such_race.json" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_runs_are_built_by_rlr_fit_with_the_overrides_then_the_fit_args(race, tmp_path):
    from rlr_lightning.estimators import FullBackprop, TruncatedBackprop

    module, data = race.build_run(
        race.CONFIG,
        race.RUNS["truncated backprop (K=1)"],
        3,
        32,
        str(tmp_path / "lora"),
        ("--model.estimator.init_args.k", "2"),
    )
    assert isinstance(module.estimator, TruncatedBackprop) and module.estimator.k_range == (2, 2)
    assert module.seed == 3 and data.seed == 3 and data.batch_size == 32
    assert not module.memory.activation_checkpointing
    # What the run does not override comes from the config: its optimizer and learning rate.
    config = yaml.safe_load(race.CONFIG.read_text())["model"]["optimizer"]
    optimizer = module.configure_optimizers()
    assert type(optimizer).__name__ == config["class_path"].rsplit(".", 1)[1]
    assert optimizer.param_groups[0]["lr"] == config["init_args"]["lr"]
    full, _ = race.build_run(
        race.CONFIG, race.RUNS["full backprop (checkpointed)"], 0, 32, str(tmp_path / "full")
    )
    assert isinstance(full.estimator, FullBackprop) and full.memory.activation_checkpointing
    # A group of G images per caption keeps the images per batch: 32 images are 4 captions of 8.
    _, grouped = race.build_run(
        race.CONFIG, race.RUNS["GRPO (G=8, checker reward)"], 0, 32, str(tmp_path / "g")
    )
    assert grouped.batch_size == 4
