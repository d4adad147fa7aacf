"""The variance map: its per-step pieces add up to the estimators they decompose, on the same draws, and
``rlr diagnose`` prints it, recommends, and fails as one line."""

from __future__ import annotations

import json

import pytest
import torch

from rlr_lightning.diagnostics import gradient_samples
from rlr_lightning.estimators import RLR, FullBackprop, ScoreFunction
from rlr_lightning.estimators.baselines import STEP_BASELINES, PromptRewardMeans
from rlr_lightning.rewards import ColorBalance
from rlr_lightning.variance_map import CountSketch, StepRow, _best, _draw, recommend, variance_map
from tests.test_cli_errors import QUICKSTART, one_error_line, run_main
from tests.test_module import make_module

PROMPTS = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def module(tiny_pipeline_dir):
    module = make_module(tiny_pipeline_dir, num_steps=4, reward=ColorBalance(), guidance_scale=3.0)
    module.configure_model()
    from tests.conftest import perturb_lora_

    perturb_lora_(module.backbone.unet, seed=1, scale=0.05)
    return module


def test_per_step_terms_add_up_to_full_backprop_and_to_the_score_function_of_each_baseline(module):
    """Draw by draw: the pathwise shares sum to full backprop's gradient, and the likelihood-ratio terms of one
    baseline sum to ``ScoreFunction`` with that step baseline, on the same seeds (guidance on)."""
    dim = sum(p.numel() for p in module.task.sampler.trainable_parameters().values())
    exact = CountSketch(dim, dim)
    for draw in range(2):
        path, lr, _ = _draw(
            module.task, PROMPTS, 3, draw, ["none", "value", "muprop"], exact, PromptRewardMeans(), None
        )
        full = gradient_samples(module, PROMPTS, FullBackprop(), draw + 1, 3)[draw]
        torch.testing.assert_close(path.sum(0), full, rtol=1e-4, atol=1e-6 * float(full.abs().max()))
        for kind in ("none", "value", "muprop"):
            expected = gradient_samples(module, PROMPTS, ScoreFunction(step_baseline=kind), draw + 1, 3)[draw]
            got = torch.stack(lr[kind]).sum(0)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5 * float(expected.abs().max()))


def test_count_sketch_keeps_inner_products_in_expectation():
    gen = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(5000, generator=gen, dtype=torch.float64),
        torch.randn(5000, generator=gen, dtype=torch.float64),
    )
    y = y + x  # correlated: <x, y> about 5000
    products = torch.tensor(
        [float(CountSketch(5000, 256, seed)(x) @ CountSketch(5000, 256, seed)(y)) for seed in range(200)]
    )
    se = float(products.std() / 200**0.5)
    assert abs(float(products.mean()) - float(x @ y)) < 4 * se
    assert torch.equal(CountSketch(10, 256)(x[:10]), x[:10])  # no sketch when the vector is small


def row(step, sigma, variances):
    best = min(variances, key=variances.get)
    return StepRow(step, sigma, 0.1, 0.01, 1.0, variances, best)


def test_recommendation_takes_the_sharp_final_steps_into_the_tail_and_the_best_baseline_elsewhere():
    # The world's per-step likelihood-ratio variances (leave-one-out, then MuProp) from the variance notes.
    loo = [66, 71, 115, 119, 148, 204, 319, 489, 28700, 1010]
    muprop = [124, 102, 126, 88, 75, 43, 38, 13, 43, 0.22]
    sigmas = [0.78, 0.73, 0.67, 0.60, 0.53, 0.45, 0.36, 0.26, 0.041, 0.021]
    only_loo = [
        StepRow(k, s, 0.1, 0.01, 1.0, {"none": v}, "none") for k, (s, v) in enumerate(zip(sigmas, loo))
    ]
    # 28,700 and 489 stand out against the steps before them (> 4x their median); 319 does not.
    assert recommend(only_loo) == (3, ["none"] * 10)
    both = [
        StepRow(k, s, 0.1, 0.01, 1.0, {"none": a, "muprop": b}, "muprop" if b < 0.9 * a else "none")
        for k, (s, a, b) in enumerate(zip(sigmas, loo, muprop))
    ]
    tail, schedule = recommend(both)
    assert tail == 1  # with MuProp, step 8 (43) no longer dominates
    assert schedule == ["none"] * 3 + ["muprop"] * 6 + ["none"]
    # The block and its likelihood ratios keep at least h + 1 steps.
    sharp = [StepRow(k, 0.5, 0.1, 0.01, 1.0, {"none": 10.0**k}, "none") for k in range(5)]
    assert recommend(sharp, RLR(h=2))[0] == 2


@pytest.mark.slow
def test_map_shares_add_up_to_one_and_the_recommendation_runs(module):
    vmap = variance_map(module, PROMPTS, num_samples=6, seed=0)
    assert [r.step for r in vmap.steps] == [0, 1, 2, 3]
    assert sum(r.share for r in vmap.steps) == pytest.approx(1.0, abs=1e-6)
    assert all(set(r.lr_variance) == set(STEP_BASELINES) for r in vmap.steps)
    estimators = vmap.estimators
    assert estimators["full backprop"]["bias_sq"] == 0.0
    assert estimators["full backprop"]["variance"] < estimators["score function (none baseline)"]["variance"]
    assert estimators["truncated backprop K=1"]["bias_sq"] > 0
    assert vmap.recommended in estimators and len(vmap.step_baseline) == 4
    assert vmap.step_baseline[-vmap.tail :] == ["none"] * vmap.tail
    # The recommendation is a valid RLR configuration.
    rlr = RLR(h=1, tail=vmap.tail, step_baseline=vmap.step_baseline)
    module.task.prepare(rlr)
    assert "| step | sigma |" in vmap.table() and "step_baseline: [" in vmap.recommendation()


@pytest.mark.slow
def test_rlr_diagnose_prints_the_map_and_writes_it(tmp_path, capsys, monkeypatch):
    out = tmp_path / "map.json"
    monkeypatch.setattr("sys.argv", ["rlr"])
    from rlr_lightning.cli import main

    main(
        [
            "diagnose",
            "--config",
            str(QUICKSTART),
            "--model.num_steps",
            "4",
            "--draws",
            "4",
            "--batch",
            "2",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "| step | sigma | share of gradient |" in printed and "recommended for RLR" in printed
    assert "RLR, recommended:" in printed and "the config's estimator (RLR)" in printed
    written = json.loads(out.read_text())
    assert len(written["steps"]) == 4 and written["tail"] >= 1 and set(written["measured"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--draws", "2"], "--draws must be >= 4"),
        (["--batch", "1"], "--batch must be >= 2"),
        ([], "give the training config to diagnose: --config FILE"),
        (["--model.num_steps", "zero"], "model.num_steps"),
        (
            ["--model.reward", "rlr_lightning.rewards.JpegCompressibility"],
            "needs a differentiable reward; JpegCompressibility is not",
        ),
    ],
)
def test_rlr_diagnose_bad_options_are_one_line(args, message, capsys, monkeypatch):
    config = ["--config", str(QUICKSTART)] if args else []
    code, err = run_main(["diagnose", *config, *args], capsys, monkeypatch)
    line = one_error_line(err, "rlr diagnose")
    assert code == 2 and message in line, line


def test_a_costlier_baseline_is_chosen_only_when_it_saves_significantly():
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(24, 50, generator=gen, dtype=torch.float64)
    # The same term drawn with other noise: as good, and by chance a little better on these 24 draws.
    same = 0.97 * torch.randn(24, 50, generator=gen, dtype=torch.float64)
    assert _best({"none": noise, "value": same}) == "none"
    # Half the spread on every draw: clearly better, and MuProp better again.
    assert _best({"none": noise, "value": 0.5 * noise, "muprop": 0.2 * noise}) == "muprop"
    # A cheaper baseline that is better wins over a costlier one that is not better still.
    assert _best({"none": noise, "prompt_mean": 0.5 * noise, "muprop": 0.49 * noise}) == "prompt_mean"
