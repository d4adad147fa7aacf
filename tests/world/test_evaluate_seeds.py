"""``rlr_lightning.world.evaluate`` over several sampling seeds: what it reports (per seed, mean, standard error
of the mean over seeds) is what the single-seed evaluations give, and the seeds really draw other noise.

Cheap: the shipped ``shapes-world`` pipeline, 2 DDIM steps, no guidance, a few captions. The command, ``rlr eval``,
is tested in ``test_eval_cli.py``."""

from __future__ import annotations

import math
import statistics

import pytest

from rlr_lightning.rewards.world import WorldCountReward
from rlr_lightning.world.checker import CHECKS
from rlr_lightning.world.evaluate import evaluate, evaluate_seeds, pool_seeds

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
