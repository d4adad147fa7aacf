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


@pytest.mark.parametrize("h, tail", [(1, 2), (2, 3), (3, 7)])
def test_rlr_exact_tail_takes_the_last_k_steps_and_the_block_and_likelihood_ratios_the_rest(h, tail):
    est = RLR(h=h, tail=tail)
    est.setup(T, 1.0)
    starts = set()
    for seed in range(200):
        plan = est.plan(T, gen(seed), rank_seed=seed)
        a = plan.info["block_start"]
        assert plan.windows == ((a, a + h), (T - tail, T)) and plan.info["tail"] == tail
        # Every step is covered exactly once: block, tail, or a likelihood ratio.
        covered = sorted([*range(a, a + h), *range(T - tail, T), *est.zo_steps(T, a)])
        assert covered == list(range(T))
        starts.add(a)
    assert starts == set(range(T - tail - h + 1))
    assert len(est.block_norms) == T - tail - h + 1
    shape = est.graph_shape(T, prompts=2)
    assert shape.windows == (h, tail) and shape.reward_window == 1 and shape.rescoring_steps == T - tail - h


@pytest.mark.parametrize(
    "sigmas, expected",
    [
        # shapes-world, leading spacing, eta 1: the two sharp final steps
        ([0.776, 0.726, 0.668, 0.601, 0.528, 0.448, 0.362, 0.261, 0.041, 0.021], 2),
        # the quickstart's trailing spacing: only the last step is sharp
        ([0.817, 0.775, 0.725, 0.667, 0.6, 0.526, 0.446, 0.36, 0.259, 0.029], 1),
        # no sharp step: the paper's one-step first-order term
        ([0.5, 0.5, 0.5, 0.5], 1),
        # deterministic final steps (a mixed SDE/ODE flow sampler) have no likelihood ratio: they join
        ([0.3, 0.3, 0.3, 0.0, 0.0, 0.0], 3),
    ],
    ids=["world-leading", "quickstart-trailing", "flat", "ode-tail"],
)
def test_auto_tail_takes_the_final_steps_of_small_sigma(sigmas, expected):
    est = RLR(h=1, tail="auto")
    est.setup(len(sigmas), 1.0)
    est.configure_schedule(sigmas)
    assert est.tail_steps == expected
    plan = est.plan(len(sigmas), gen(0), rank_seed=0)
    assert plan.windows[1] == (len(sigmas) - expected, len(sigmas))


def test_auto_tail_leaves_room_for_the_block_and_needs_the_schedule():
    est = RLR(h=6, tail="auto")
    est.setup(9, 1.0)
    with pytest.raises(ValueError, match="configure_schedule"):
        est.plan(9, gen(0), rank_seed=0)
    est.configure_schedule([0.5] * 5 + [0.01] * 4)
    assert est.tail_steps == 3  # 4 sharp steps, capped at T - h
    assert est.max_block_length(9) == 6


def test_exact_tail_settings_that_cannot_run_are_refused():
    with pytest.raises(ValueError, match="tail .exact tail K. must be an integer >= 1"):
        RLR(tail=0)
    with pytest.raises(ValueError, match="tail_sigma_ratio must be in"):
        RLR(tail="auto", tail_sigma_ratio=1.5)
    with pytest.raises(ValueError, match=r"h=2 must be <= T-9=1: .* exact tail \(K=9"):
        RLR(h=2, tail=9).setup(T, 1.0)
    with pytest.raises(ValueError, match="reward is not differentiable: use tail=1"):
        RLR(h=1, tail=2).setup(T, 1.0, reward_differentiable=False)
    with pytest.raises(ValueError, match=r"valid block starts \[0, 5\] for T=10, h=2, tail K=3"):
        RLR(h=2, tail=3, block_law="range", block_range=(0, 6)).setup(T, 1.0)
    # A reward without gradient: auto falls back to the one-step term, scored by likelihood ratio.
    est = RLR(h=1, tail="auto")
    est.setup(T, 1.0, reward_differentiable=False)
    est.configure_schedule([0.5] * 8 + [0.01, 0.01])
    assert est.tail_steps == 1


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
    approx = RLR(
        h=2,
        block_law="range",
        block_range=(3, 3),
        zo_mode="parameter",
        zo_scale=0.01,
        perturb_backprop_steps=False,
    )
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
    # Nothing else in the global batch: the running mean of earlier iterations, or 0 before there is one.
    torch.testing.assert_close(
        compute_advantages(torch.tensor([1.0]), torch.tensor([1.0]), fallback=0.25), torch.tensor([0.75])
    )
    torch.testing.assert_close(
        compute_advantages(torch.tensor([1.0]), torch.tensor([1.0])), torch.tensor([1.0])
    )


@pytest.mark.parametrize("prompts_per_rank, ranks", [(1, 1), (1, 2), (2, 1), (2, 3)])
def test_antithetic_advantages_leave_the_twin_out_of_the_baseline(prompts_per_rank, ranks):
    """A twin shares the sample's noise, so its reward must not enter the sample's baseline (issue 9.1)."""
    B = prompts_per_rank
    gen = torch.Generator().manual_seed(0)
    everyone = torch.randn(ranks, 2 * B, generator=gen)  # each rank: [theta + u half, theta - u half]
    local = everyone[0].clone()
    adv = compute_advantages(local, everyone.reshape(-1), antithetic_pairs=True, fallback=0.5)
    for i in range(2 * B):
        twin = (i + B) % (2 * B)
        others = [everyone[0, j] for j in range(2 * B) if j not in (i, twin)] + list(everyone[1:].reshape(-1))
        expected = local[i] - (torch.stack(others).mean() if others else torch.tensor(0.5))
        torch.testing.assert_close(adv[i], expected)
        # Moving the twin's reward leaves the advantage alone.
        moved = everyone.clone()
        moved[0, twin] += 10.0
        again = compute_advantages(moved[0], moved.reshape(-1), antithetic_pairs=True, fallback=0.5)
        torch.testing.assert_close(again[i], adv[i])


def test_rlr_antithetic_half_order_term_survives_one_prompt_per_rank():
    """With one prompt per rank the twin's reward was the whole baseline: A(+) = -A(-), and the half-order
    term of the pair cancelled to zero on every draw (issue 9.1)."""
    from tests.estimators.harness import ToyProblem

    problem = ToyProblem(batch=1)
    rlr = RLR(h=1, block_law="range", block_range=(0, 0), zo_mode="parameter", zo_scale=0.05)
    rlr.setup(problem.num_steps, problem.eta)
    problem.term_gradients(rlr, 0)  # one completed iteration: the running mean exists
    ho = problem.term_gradients(rlr, 1)["ho"]
    fo = problem.term_gradients(rlr, 2)["fo"]
    assert ho.norm() > 1e-3 * fo.norm()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(h=0), "h must be an integer >= 1 or .auto."),
        (dict(block_law="range"), "needs block_range"),
        (dict(block_law="range", block_range=(5, 2)), "lo <= hi"),
        (dict(zo_mode="exact"), "unknown zo_mode"),
        (dict(zo_subsample=0), "zo_subsample must be >= 1"),
        (dict(zo_mode="parameter", zo_scale=0.0), "zo_scale"),
    ],
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


@pytest.mark.parametrize("zo_mode", ["score", "parameter"])
def test_normalized_advantages_scale_every_term_alike_by_a_std_from_earlier_iterations(zo_mode):
    """The whole estimate is divided by the running reward std, FO included (issue 9.2): on the same draw,
    every term equals the unnormalised one over that std, and the current batch does not enter the scale."""
    from tests.estimators.harness import ToyProblem

    problem = ToyProblem(batch=4)
    settings = dict(h=1, block_law="range", block_range=(1, 1), zo_mode=zo_mode, zo_scale=0.05)
    plain, normalized = RLR(**settings), RLR(**settings, normalize_advantages=True)
    for est in (plain, normalized):
        est.setup(problem.num_steps, problem.eta)
    # No history yet: nothing to scale by, so the first iteration is not scaled.
    first_plain, first_normalized = problem.term_gradients(plain, 0), problem.term_gradients(normalized, 0)
    for name in ("fo", "ho", "zo"):
        torch.testing.assert_close(first_normalized[name], first_plain[name], rtol=1e-4, atol=1e-6)
    for draw in range(1, 4):  # some history for the running statistics, identical for both
        problem.term_gradients(plain, draw), problem.term_gradients(normalized, draw)
    std = normalized.reward_stats.std
    assert std is not None and std > 0 and std != pytest.approx(1.0)
    g_plain, g_normalized = problem.term_gradients(plain, 10), problem.term_gradients(normalized, 10)
    for name in ("fo", "ho", "zo", "total"):
        expected = g_plain[name] / std  # float32 backward passes: compare at float32 precision
        torch.testing.assert_close(
            g_normalized[name], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())
        )


def test_running_reward_statistics_travel_with_the_estimator_state():
    rlr = RLR()
    rlr.reward_stats.update(torch.tensor([1.0, 3.0]))
    rlr.reward_stats.update(torch.tensor([2.0]))
    restored = RLR()
    restored.load_state_dict(rlr.state_dict())
    assert restored.reward_stats.mean == pytest.approx(0.9 * 2.0 + 0.1 * 2.0)
    assert restored.reward_stats.std == pytest.approx(rlr.reward_stats.std)
    assert rlr.reward_stats.std == pytest.approx((0.9 * 5.0 + 0.1 * 4.0 - 2.0**2) ** 0.5)


def test_grad_norm_law_restored_from_another_tail_starts_afresh():
    before = RLR(h=2, block_law="grad_norm")
    before.setup(T, 1.0)
    before.block_norms = [float(i + 1) for i in range(T - 2)]  # 8 starts at tail 1
    after = RLR(h=2, tail=3, block_law="grad_norm")
    after.setup(T, 1.0)
    after.load_state_dict(before.state_dict())  # as a resume does: the module is set up, then the state loads
    probs = after.block_start_probs(T)
    assert probs.numel() == T - 3 - 2 + 1 and torch.allclose(probs, torch.full_like(probs, 1 / probs.numel()))
    assert all(after.plan(T, gen(s), rank_seed=s).info["block_start"] <= T - 3 - 2 for s in range(50))
