"""``rlr_lightning.world.evaluate`` over several sampling seeds: what it reports (per seed, mean, standard error
of the mean over seeds) is what the single-seed evaluations give, and the seeds really draw other noise.

Cheap: the shipped ``shapes-world`` pipeline, 2 DDIM steps, no guidance, a few captions (the command: the 72
held-out captions once per seed)."""

from __future__ import annotations

import json
import logging
import math
import statistics

import pytest

from rlr_lightning.rewards.world import WorldCountReward
from rlr_lightning.world.checker import CHECKS
from rlr_lightning.world.evaluate import evaluate, evaluate_seeds, main, pool_seeds
from rlr_lightning.world.scenes import split_specs

CAPTIONS = ["two red circles on the left", "three green squares at the top", "a blue triangle in the center"]
FAST = dict(num_steps=2, guidance_scale=1.0, eta=1.0, samples_per_caption=2)


@pytest.fixture(scope="module")
def reward():
    return WorldCountReward()


@pytest.fixture(scope="module")
def pooled(reward):
    return evaluate_seeds("shapes-world", seeds=[0, 1, 2], captions=CAPTIONS, reward=reward, **FAST)


def test_each_seed_is_the_single_seed_evaluation(pooled, reward):
    assert pooled["seeds"] == [0, 1, 2] and [r["seed"] for r in pooled["per_seed"]] == [0, 1, 2]
    for one in pooled["per_seed"]:
        alone = evaluate("shapes-world", seed=one["seed"], captions=CAPTIONS, reward=reward, **FAST)
        assert {k: one[k] for k in alone} == pytest.approx(alone, abs=1e-12)


def test_mean_and_standard_error_are_over_the_seeds(pooled):
    assert pooled["n_seeds"] == 3 and pooled["n_per_seed"] == len(CAPTIONS) * 2 and pooled["n"] == 3 * 6
    for key in (*CHECKS, "reward"):
        values = [r[key] for r in pooled["per_seed"]]
        assert pooled["mean"][key] == pytest.approx(statistics.mean(values), abs=1e-12)
        assert pooled["se"][key] == pytest.approx(statistics.stdev(values) / math.sqrt(3), abs=1e-12)
    for key in CHECKS:  # the binomial cross-check over all samples
        p = pooled["mean"][key]
        assert pooled["se_samples"][key] == pytest.approx(math.sqrt(p * (1 - p) / 18), abs=1e-12)
    assert "reward" not in pooled["se_samples"]


def test_seeds_draw_other_noise(pooled):
    # The count reward of the samples is continuous: equal values for two seeds would mean the same images.
    rewards = [r["reward"] for r in pooled["per_seed"]]
    assert len(set(rewards)) == 3
    assert pooled["se"]["reward"] > 0


def test_pooling_one_seed_has_no_standard_error():
    one = pool_seeds([dict(color_ok=1.0, count_ok=0.5, position_ok=1.0, all_ok=0.5, n=4)])
    assert one["n_seeds"] == 1 and one["se"]["count_ok"] is None and one["mean"]["count_ok"] == 0.5
    with pytest.raises(ValueError):
        pool_seeds([])
    with pytest.raises(ValueError, match="distinct"):
        evaluate_seeds("shapes-world", seeds=[1, 1], captions=CAPTIONS, **FAST)


def test_command_reports_per_seed_mean_and_se(tmp_path, caplog):
    out = tmp_path / "accuracy.json"
    with caplog.at_level(logging.INFO, logger="rlr_lightning.world.evaluate"):
        main(["shapes-world", "--steps", "2", "--guidance", "1", "--eta", "1", "--seeds", "3", "5", "--json", str(out)])
    result = json.loads(out.read_text())
    held_out = len(split_specs()[1])
    assert result["seeds"] == [3, 5] and result["n_seeds"] == 2
    assert result["n_per_seed"] == held_out and result["n"] == 2 * held_out
    for key in CHECKS:
        values = [r[key] for r in result["per_seed"]]
        assert result[key] == result["mean"][key] == pytest.approx(statistics.mean(values))
        assert result["se"][key] == pytest.approx(statistics.stdev(values) / math.sqrt(2))
    alone = evaluate("shapes-world", num_steps=2, guidance_scale=1.0, eta=1.0, seed=5)
    assert {k: result["per_seed"][1][k] for k in alone} == pytest.approx(alone)
    lines = [r.getMessage() for r in caplog.records if r.name == "rlr_lightning.world.evaluate"]
    count = f"count {100 * result['mean']['count_ok']:.1f}% +- {100 * result['se']['count_ok']:.1f}"
    assert lines[0].startswith(f"held_out captions, {2 * held_out} samples: colour ") and count in lines[0]
    assert "over 2 seeds" in lines[0]
    assert lines[1].startswith(f"  seed 3: {held_out} samples") and lines[2].startswith(f"  seed 5: {held_out}")


def test_command_evaluates_three_seeds_by_default_and_rejects_repeated_ones(capsys):
    from rlr_lightning.world.evaluate import DEFAULT_SEEDS

    assert len(DEFAULT_SEEDS) >= 3
    with pytest.raises(SystemExit):
        main(["shapes-world", "--seeds", "0", "0"])
    assert "distinct" in capsys.readouterr().err
