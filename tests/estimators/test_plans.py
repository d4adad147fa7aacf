"""Plans, laws, advantages and running statistics of the estimators (no sampling needed)."""

from __future__ import annotations

import pytest
import torch

from rlr_lightning.estimators import RLR, ScoreFunction, TruncatedBackprop, compute_advantages, derive_seed
from rlr_lightning.estimators.base import Rollout
from rlr_lightning.sampling import Plan

T = 10


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rlr_plan_has_block_and_fo_windows_and_never_overlaps():
    est = RLR(h=3)
    est.setup(T, 1.0)
    starts = set()
    for seed in range(200):
        plan = est.plan(T, gen(seed), rank_seed=seed)
        a = plan.info["block_start"]
        assert plan.windows == ((a, a + 3), (T - 1, T))
        starts.add(a)
    assert starts == set(range(T - 3))  # uniform over every valid start 0 .. T-1-h


def test_block_start_is_shared_by_ranks_and_perturbations_are_not():
    est = RLR(h=2, zo_mode="parameter", zo_scale=0.01)
    est.setup(T, 1.0)
    rank0 = est.plan(T, gen(7), rank_seed=derive_seed(0, 7, 0))
    rank1 = est.plan(T, gen(7), rank_seed=derive_seed(0, 7, 1))
    assert rank0.info["block_start"] == rank1.info["block_start"]
    assert rank0.perturbations[0].seed != rank1.perturbations[0].seed


def test_range_law_stays_in_range_and_grad_norm_law_prefers_large_norms():
    est = RLR(h=1, block_law="range", block_range=(2, 4))
    est.setup(T, 1.0)
    assert {est.plan(T, gen(s), 0).info["block_start"] for s in range(100)} == {2, 3, 4}

    est = RLR(h=1, block_law="grad_norm", grad_norm_temperature=0.2)
    est.setup(T, 1.0)
    assert torch.allclose(est.block_start_probs(T), torch.full((T - 1,), 1 / (T - 1), dtype=torch.float64))
    for a in range(T - 1):
        plan = Plan(T, info={"block_start": a})
        rollout = Rollout(plan, None, [], torch.zeros(2), torch.zeros(2), torch.zeros(2))
        est.observe(rollout, {"ho": 10.0 if a == 5 else 1.0})
    probs = est.block_start_probs(T)
    assert int(probs.argmax()) == 5 and probs[5] > 0.5 and probs.min() > 0
    # The running norms are state: a restored estimator draws from the same law.
    restored = RLR(h=1, block_law="grad_norm", grad_norm_temperature=0.2)
    restored.setup(T, 1.0)
    restored.load_state_dict(est.state_dict())
    assert torch.equal(restored.block_start_probs(T), probs)


def test_parameter_mode_perturbs_backprop_steps_only_when_asked():
    exact = RLR(h=2, block_law="range", block_range=(3, 3), zo_mode="parameter", zo_scale=0.01)
    approx = RLR(h=2, block_law="range", block_range=(3, 3), zo_mode="parameter", zo_scale=0.01,
                 perturb_backprop_steps=False)
    for est in (exact, approx):
        est.setup(T, 1.0)
    assert sorted(exact.plan(T, gen(0), 1).perturbations) == list(range(T))
    assert sorted(approx.plan(T, gen(0), 1).perturbations) == [0, 1, 2, 5, 6, 7, 8]
    assert exact.antithetic and all(p.antithetic for p in exact.plan(T, gen(0), 1).perturbations.values())
    assert not RLR(zo_mode="parameter", zo_antithetic=False).antithetic
    assert not RLR(zo_mode="score").plan(T, gen(0), 1).perturbations


def test_score_subsampling_draws_k_distinct_steps():
    est = ScoreFunction(subsample=3)
    est.setup(T, 1.0)
    steps = est.plan(T, gen(1), 0).info["steps"]
    assert len(set(steps)) == 3 and all(0 <= k < T for k in steps)
    rlr = RLR(h=2, zo_mode="score", zo_subsample=2)
    rlr.setup(T, 1.0)
    plan = rlr.plan(T, gen(2), 0)
    a = plan.info["block_start"]
    assert len(plan.info["zo_steps"]) == 2
    assert all(k < T - 1 and not a <= k < a + 2 for k in plan.info["zo_steps"])


def test_truncated_k_range_draws_within_bounds():
    est = TruncatedBackprop(k_range=(1, 3))
    est.setup(T, 1.0)
    ks = {est.plan(T, gen(s), 0).info["truncation"] for s in range(50)}
    assert ks == {1, 2, 3}
    assert est.plan(T, gen(0), 0).windows[0][1] == T


def test_leave_one_out_advantages_exclude_the_sample_itself():
    local = torch.tensor([1.0, 2.0])
    everyone = torch.tensor([1.0, 2.0, 3.0, 6.0])  # two ranks
    adv = compute_advantages(local, everyone)
    torch.testing.assert_close(adv, torch.tensor([1.0 - 11 / 3, 2.0 - 10 / 3]))
    normed = compute_advantages(local, everyone, normalize_std=True)
    torch.testing.assert_close(normed, adv / everyone.std())
    with pytest.raises(ValueError, match="at least 2"):
        compute_advantages(torch.tensor([1.0]), torch.tensor([1.0]))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(h=0), "h must be >= 1"), (dict(block_law="range"), "needs block_range"),
     (dict(block_law="range", block_range=(5, 2)), "lo <= hi"), (dict(zo_mode="exact"), "unknown zo_mode"),
     (dict(zo_subsample=0), "zo_subsample must be >= 1"), (dict(zo_mode="parameter", zo_scale=0.0), "zo_scale")],
)
def test_rlr_rejects_bad_settings_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RLR(**kwargs)


def test_rlr_rejects_settings_impossible_for_the_chain():
    with pytest.raises(ValueError, match="h=10 must be <= T-1=9"):
        RLR(h=10).setup(T, 1.0)
    with pytest.raises(ValueError, match="eta must be > 0"):
        RLR().setup(T, 0.0)
    with pytest.raises(ValueError, match="zo_subsample=8 exceeds the 7"):
        RLR(h=2, zo_subsample=8).setup(T, 1.0)
    with pytest.raises(ValueError, match="truncation K"):
        TruncatedBackprop(k=0)
