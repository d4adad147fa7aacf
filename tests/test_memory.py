"""The memory planner: its model of a step's peak, its choices, the budget, costs measured on a real model."""

from __future__ import annotations

from dataclasses import replace

import psutil
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from rlr_lightning.memory import (
    AutogradMemoryMeter,
    GraphShape,
    MemoryBudgetError,
    MemoryCosts,
    MemoryPlan,
    measure_costs,
    memory_phases,
    per_sample_cost,
    plan_memory,
    predicted_peak,
    resolve_budget,
)
from rlr_lightning.models import load_backbone
from tests.conftest import perturb_lora_

GIB = 2**30

# Round numbers (GiB) so every peak below can be worked out by hand from the model in memory_phases.
COSTS = MemoryCosts(
    resident=10 * GIB,
    sample_step=1 * GIB,
    grad_step=8 * GIB,
    grad_step_input=1 * GIB,
    reward_path=20 * GIB,
    reward_path_checkpointed=4 * GIB,
    reward_forward=2 * GIB,
)
T = 50


def rlr_shape(h: int | None = 2, samples: int = 4) -> GraphShape:
    """RLR in score mode: the half-order block, then the first-order last step; T - 1 - h re-scored steps."""
    return GraphShape(
        samples=samples, windows=(h, 1), reward_window=1, rescoring_steps=T - 1 - h, rescore_steps_per_call=4
    )


def peak_gib(shape: GraphShape, chunk: int | None, ck: bool) -> float:
    return predicted_peak(COSTS, shape, MemoryPlan(chunk, ck)) / GIB


# -- the model ------------------------------------------------------------------------------------------


def test_predicted_peak_by_hand_unchunked():
    shape = rlr_shape()
    # The block's backward starts holding both windows (2 + 1 steps x 4 samples x 8) and the reward path
    # (4 x 20).
    assert peak_gib(shape, None, False) == 10 + (2 + 1) * 8 * 4 + 20 * 4  # 186
    # Checkpointed, the block's backward holds inputs (3 x 1 x 4), one recomputed call (8 x 4) and the
    # checkpointed reward path (4 x 4) = 70; the re-scoring call (4 steps x 4 samples x 8) now dominates.
    assert peak_gib(shape, None, True) == 10 + 4 * 4 * 8  # 138
    phases = {p.name: p.total / GIB for p in memory_phases(COSTS, shape, MemoryPlan(None, True))}
    assert phases["backward of window 1 (2 steps)"] == 10 + 3 * 1 * 4 + 8 * 4 + 4 * 4
    # Then the reward's own backward (the block is freed), then the last step's recomputation (reward freed).
    assert phases["backward of window 2 (1 step), through decode + reward"] == 10 + 1 * 1 * 4 + 4 * 4
    assert phases["backward of window 2 (1 step)"] == 10 + 1 * 1 * 4 + 8 * 4
    assert phases["sampling pass"] == 10 + 1 * 4 + 3 * 1 * 4
    # Measured recomputation and kept reward inputs replace the upper bounds.
    measured = replace(COSTS, grad_step_checkpointed=9 * GIB, reward_inputs=GIB // 2)
    phases = {p.name: p.total / GIB for p in memory_phases(measured, shape, MemoryPlan(None, True))}
    assert phases["backward of window 1 (2 steps)"] == 10 + 3 * 1 * 4 + 9 * 4 + 0.5 * 4
    # A chunk as large as the batch is no chunking (except that it caps a re-scoring call's transitions).
    assert peak_gib(shape, 4, False) == peak_gib(shape, None, False)


def test_predicted_peak_by_hand_chunked():
    shape = rlr_shape()
    # Replay of the first-order window for 2 samples: 1 x 8 x 2 plus its reward path 20 x 2.
    assert peak_gib(shape, 2, False) == 10 + 8 * 2 + 20 * 2  # 66
    # Checkpointed, the block's replay dominates: inputs of 2 steps x 2 samples, one recomputed call 8 x 2.
    assert peak_gib(shape, 2, True) == 10 + 2 * 1 * 2 + 8 * 2  # 30
    assert peak_gib(shape, 1, True) == 10 + 2 * 1 + 8  # 20
    phases = {p.name: p.total / GIB for p in memory_phases(COSTS, shape, MemoryPlan(2, True))}
    assert phases["replay of window 2 (1 step), through decode + reward"] == 10 + 1 * 2 + 4 * 2
    assert phases["replay of window 2 (1 step)"] == 10 + 1 * 2 + 8 * 2
    # Re-scoring calls hold at most c transitions: 2 x 8.
    phases = {p.name: p.total / GIB for p in memory_phases(COSTS, shape, MemoryPlan(2, False))}
    assert phases["re-scoring"] == 10 + 2 * 8
    assert phases["replay of window 1 (2 steps)"] == 10 + 2 * 8 * 2
    assert phases["sampling pass"] == 10 + 1 * 4
    assert phases["reward"] == 10 + 2 * 2  # rewards without grad, 2 images at a time


@pytest.mark.parametrize("ck", [False, True])
@pytest.mark.parametrize(
    "shape",
    [rlr_shape(2, 6), GraphShape(6, (50,), 0), GraphShape(6, (), None, 50, 4)],
    ids=["rlr", "full-backprop", "score-function"],
)
def test_predicted_peak_grows_with_the_chunk(shape, ck):
    peaks = [peak_gib(shape, c, ck) for c in (1, 2, 3, 4, 5, None)]
    assert peaks == sorted(peaks)
    assert peaks[0] < peaks[-1]


# -- the planner ----------------------------------------------------------------------------------------


def plan(budget_gib: float, **kwargs):
    kwargs.setdefault("h", 2)
    return plan_memory(COSTS, int(budget_gib * GIB), rlr_shape, headroom=0.0, num_steps=T, **kwargs)


def test_plan_shrinks_the_chunk_before_checkpointing():
    ample = plan(1000)
    assert ample.plan == MemoryPlan(None, False) and ample.h == 2 and ample.predicted_peak == 186 * GIB
    assert windows(plan(70)) == MemoryPlan(2, False)  # unchunked 186, chunks of 3: 94, of 2: 66
    assert windows(plan(40)) == MemoryPlan(1, False)  # chunks of 1 without checkpointing: 38
    # Chunks of 1 without checkpointing peak at 38; checkpointed, chunks of 3 at 40 and of 2 at 30.
    tight = plan(37)
    # Re-scoring then takes (37 - 10) // 8 = 3 transitions per call: 34.
    assert windows(tight) == MemoryPlan(2, True) and tight.predicted_peak == 34 * GIB
    assert tight.predicted_peak <= tight.usable_budget
    assert plan(37) == tight  # deterministic


def windows(planned) -> MemoryPlan:
    """The window part of a plan (chunk size, checkpointing), without the re-scoring width."""
    return replace(planned.plan, rescore_samples=None)


def test_plan_respects_user_choices():
    assert windows(plan(100, chunk_samples=3)) == MemoryPlan(3, False)
    assert plan(1000, activation_checkpointing=True).plan == MemoryPlan(None, True)
    assert windows(plan(40, activation_checkpointing=False)) == MemoryPlan(1, False)


def test_rescoring_takes_as_many_transitions_per_call_as_the_budget_allows():
    # Chunks of 2 for the windows; a re-scoring call holds resident 10 + 8 per transition: 7 fit in 70.
    planned = plan(70)
    assert planned.plan == MemoryPlan(2, False, rescore_samples=7)
    phases = {phase.name: phase.total for phase in memory_phases(COSTS, rlr_shape(), planned.plan)}
    assert phases["re-scoring"] == (10 + 7 * 8) * GIB <= planned.usable_budget
    assert "re-scoring 7 transitions per call" in planned.describe()
    # Never wider than the estimator's own re-scoring call (4 steps x 4 samples), never narrower than a chunk.
    assert plan(1000, chunk_samples=1).plan.rescore_samples == 16
    assert plan(37).plan.rescore_samples == 3  # (33 - 10) // 8


def test_plan_headroom_and_description():
    planned = plan_memory(COSTS, 26 * GIB, rlr_shape, h=2, headroom=0.1, num_steps=T)
    assert planned.usable_budget == int(26 * GIB * 0.9)
    assert planned.plan == MemoryPlan(1, True)  # 20 GiB; checkpointed chunks of 2 (30) exceed 23.4 usable
    assert planned.describe() == (
        "memory plan: budget 26.0 GiB (23.4 GiB usable), chunks of 1 sample, "
        "activation checkpointing on, h = 2: predicted peak 20.0 GiB"
    )
    with pytest.raises(MemoryBudgetError, match=r"26.0 GiB \(23.4 GiB usable after 10% headroom\)"):
        plan_memory(COSTS, 26 * GIB, rlr_shape, h=2, headroom=0.1, activation_checkpointing=False)


def test_h_auto_picks_the_largest_block_that_fits():
    # Chunks of 1 without checkpointing: max(block replay 10 + 8h, last step + reward 38).
    assert plan(1000, h="auto", h_auto_max=4).h == 4
    shrunk = plan(40, h="auto", h_auto_max=4)  # h = 4 needs 42 without checkpointing
    assert (shrunk.h, windows(shrunk)) == (3, MemoryPlan(1, False))  # no checkpointing beats a longer block
    assert plan(30, h="auto", h_auto_max=4).h == 4  # with checkpointing, h = 4 fits again (22)
    capped = plan_memory(COSTS, 1000 * GIB, rlr_shape, h="auto", h_auto_max=4, num_steps=3)
    assert capped.h == 2  # h <= T - 1


def test_impossible_budget_names_what_to_lower():
    with pytest.raises(MemoryBudgetError) as err:
        plan(18)  # h = 2 needs 20 at least, h = 1 19
    text = str(err.value)
    assert "18.0 GiB" in text and "(chunks of 1 sample, activation checkpointing on, h = 1)" in text
    assert "19.0 GiB" in text  # the smallest predicted peak
    assert "denoiser call recomputed, 1 sample 8.0 GiB" in text and "A single sample does not fit" in text
    # Sampling-bound: the no-grad pass over the batch dominates, so the batch size is what to lower.
    heavy_sampling = MemoryCosts(10 * GIB, 10 * GIB, 1 * GIB, 0, 1 * GIB, 1 * GIB)
    with pytest.raises(MemoryBudgetError) as err:
        plan_memory(heavy_sampling, 30 * GIB, rlr_shape, h=2, headroom=0.0)
    text = str(err.value)
    assert "sampling pass" in text and "`data.batch_size`" in text and "about 2 fit" in text


def test_model_that_does_not_fit():
    with pytest.raises(MemoryBudgetError, match=r"model alone .* `model.weight_dtype`"):
        plan(8)


@pytest.mark.parametrize(
    ("kwargs", "options"),
    [
        # Chunks of 3 peak at 94 (40 checkpointed); unchecked chunks of 1 fit (38).
        (dict(chunk_samples=3, budget=39), ["`model.chunk_samples`"]),
        # Unchecked chunks of 1 peak at 38; checkpointed chunks of 2 fit (30).
        (dict(activation_checkpointing=False, budget=37), ["`model.activation_checkpointing`"]),
        # h = 4 unchecked needs 42: h = 3 fits (38), and so do checkpointed chunks of 2 at h = 4 (34).
        (
            dict(h=4, activation_checkpointing=False, budget=40),
            ["`model.activation_checkpointing`", "the estimator's `h`"],
        ),
        # Neither alone is enough: chunks of 3 checkpointed need 40, unchecked chunks of 1 need 38.
        (
            dict(chunk_samples=3, activation_checkpointing=False, budget=37),
            ["`model.chunk_samples` and `model.activation_checkpointing`"],
        ),
    ],
)
def test_a_fixed_choice_that_does_not_fit_is_named(kwargs, options):
    budget = kwargs.pop("budget")
    with pytest.raises(MemoryBudgetError) as err:
        plan(budget, **kwargs)
    text = str(err.value)
    assert "It fits with" in text
    assert all(f"if the planner may choose {option}" in text for option in options)


def test_bad_planner_arguments():
    with pytest.raises(ValueError, match="h must be"):
        plan(100, h=0)
    with pytest.raises(ValueError, match="T=1"):
        plan_memory(COSTS, GIB, rlr_shape, h="auto", num_steps=1)
    with pytest.raises(ValueError, match="headroom"):
        plan_memory(COSTS, GIB, rlr_shape, headroom=1.0)
    with pytest.raises(ValueError, match="reward_window"):
        GraphShape(2, (1,), reward_window=1)


# -- the budget -----------------------------------------------------------------------------------------


def test_resolve_budget():
    assert resolve_budget(None, "cpu") is None
    assert resolve_budget(24, "cpu") == 24 * GIB
    assert resolve_budget(0.5, "cpu") == GIB // 2
    assert resolve_budget("12", "cpu") == 12 * GIB
    auto = resolve_budget("auto", "cpu")
    # "auto" covers what this process already holds (the resident model) plus what is still available.
    assert auto >= psutil.Process().memory_info().rss
    assert auto > 0


@pytest.mark.parametrize("bad", [0, -3, "lots", True, float("nan"), float("inf"), [24]])
def test_resolve_budget_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=r"memory_budget_gb must be a number of GiB > 0, 'auto'") as err:
        resolve_budget(bad, "cpu")
    assert repr(bad) in str(err.value)


def test_auto_budget_on_an_unsupported_device():
    with pytest.raises(ValueError, match="give the budget as a number of GiB"):
        resolve_budget("auto", "meta")


# -- measured costs on the tiny model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_pipeline_dir):
    backbone = load_backbone(tiny_pipeline_dir, local_files_only=True)
    backbone.add_lora()
    perturb_lora_(backbone.unet)
    sampler = backbone.make_sampler(num_steps=4, eta=1.0, guidance_scale=5.0)
    return backbone, sampler


def window(sampler, backbone, n: int, steps: int, ck: bool) -> torch.Tensor:
    """``steps`` DDIM steps with gradient for ``n`` samples, each denoiser call checkpointed when ``ck``."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 4, 8, 8, generator=gen)
    embeds = backbone.encode_prompts(["a red fox"] * n)
    for k in range(steps):
        noise = torch.randn(x.shape, generator=gen)

        def step(x, k=k, noise=noise):
            return sampler.step(k, x, embeds, noise=noise).next_latents

        x = checkpoint(step, x, use_reentrant=False) if ck else step(x)
    return x


def latent_reward(backbone):
    return lambda latents: backbone.decode(latents).mean(dim=(1, 2, 3))


def set_vae_checkpointing(backbone):
    def toggle(on: bool) -> None:
        (backbone.vae.enable_gradient_checkpointing if on else backbone.vae.disable_gradient_checkpointing)()

    return toggle


def measure(tiny, samples=(1, 2)) -> MemoryCosts:
    backbone, sampler = tiny
    return measure_costs(
        lambda n, grad, ck: window(sampler, backbone, n, 1, ck),
        latent_reward(backbone),
        set_vae_checkpointing(backbone),
        models=[backbone],
        device="cpu",
        samples=samples,
    )


def saved_bytes(backbone, forward) -> int:
    with AutogradMemoryMeter(list(backbone.parameters()) + list(backbone.buffers())) as meter:
        out = forward()
    del out
    return meter.peak


@pytest.fixture(scope="module")
def costs(tiny) -> MemoryCosts:
    return measure(tiny)


@pytest.mark.slow
def test_measured_costs_on_the_tiny_unet(tiny, costs):
    backbone, sampler = tiny
    assert costs.grad_step > costs.grad_step_input >= 0
    assert costs.reward_path > 0 and costs.reward_path_checkpointed >= 0
    # On CPU nothing measures no-grad transients; the resident memory is the process's.
    assert costs.sample_step == 0 and costs.reward_forward == 0 and costs.resident > 0
    # Nothing left behind: no gradients written, the decoder's checkpointing off.
    assert all(p.grad is None for p in backbone.parameters())
    assert not backbone.vae.is_gradient_checkpointing
    # Per-sample costs are slopes: measuring at 2 and 4 samples gives the same bytes per sample.
    again = measure(tiny, samples=(2, 4))
    assert again.grad_step == pytest.approx(costs.grad_step, rel=0.05)
    assert again.reward_path == pytest.approx(costs.reward_path, rel=0.05)


@pytest.mark.slow
def test_measured_costs_predict_real_windows(tiny, costs):
    """The model's per-window bytes match what a real 2-step window over 3 samples saves for backward."""
    backbone, sampler = tiny
    held = saved_bytes(backbone, lambda: window(sampler, backbone, 3, 2, False))
    assert held == pytest.approx(2 * costs.grad_step * 3, rel=0.1)
    held_ck = saved_bytes(backbone, lambda: window(sampler, backbone, 3, 2, True))
    assert held_ck <= 2 * costs.grad_step_input * 3 * 1.1 + 1024
    latents = torch.randn(3, 4, 8, 8, requires_grad=True)
    rewarded = saved_bytes(backbone, lambda: latent_reward(backbone)(latents))
    assert rewarded == pytest.approx(3 * costs.reward_path, rel=0.1)


def test_a_measurement_that_ran_out_of_memory_prices_the_piece_so_plans_avoid_it():
    """On a GPU a piece of the step can run out of memory while it is measured (Wan at 480p: the unplanned
    decode's backward). Measured at 1 but not 2 samples, it is priced at its 1-sample value (an upper bound of
    the slope); at neither, at the whole device, so the planner checkpoints that piece."""
    assert per_sample_cost([3 * GIB, 5 * GIB], (1, 2), 80 * GIB) == 2 * GIB  # the slope
    assert per_sample_cost([3 * GIB, None], (1, 2), 80 * GIB) == 3 * GIB
    assert per_sample_cost([6 * GIB, None], (2, 4), 80 * GIB) == 3 * GIB
    assert per_sample_cost([None, None], (1, 2), 80 * GIB) == 80 * GIB
    costs = replace(COSTS, reward_path=per_sample_cost([None, None], (1, 2), 80 * GIB))
    shape = GraphShape(samples=2, windows=(3,), reward_window=0)
    planned = plan_memory(costs, 80 * GIB, lambda h: shape)
    assert planned.plan.activation_checkpointing
    assert planned.predicted_peak <= planned.usable_budget


def test_rescoring_is_priced_at_the_checkpointed_call_where_the_family_checkpoints_blocks():
    """Re-scoring holds one call's whole activations (``grad_step``) unless the plan checkpoints and the family's
    re-scoring then checkpoints its blocks (Wan): then ``rescore_step_checkpointed``, and a step the re-scoring
    kept from fitting fits."""
    shape = GraphShape(samples=2, windows=(3,), reward_window=0, rescoring_steps=12)
    plain = replace(COSTS, grad_step=40 * GIB, grad_step_checkpointed=2 * GIB)
    blockwise = replace(plain, rescore_step_checkpointed=3 * GIB)
    checkpointed = MemoryPlan(1, True)
    assert predicted_peak(plain, shape, checkpointed) == 10 * GIB + 40 * GIB  # resident + one re-scored call
    assert predicted_peak(blockwise, shape, checkpointed) < predicted_peak(plain, shape, checkpointed)
    assert blockwise.rescore_step(False) == 40 * GIB  # without checkpointing re-scoring keeps everything
    with pytest.raises(MemoryBudgetError, match="re-scoring"):
        plan_memory(plain, 40 * GIB, lambda h: shape)
    planned = plan_memory(blockwise, 40 * GIB, lambda h: shape)
    assert planned.plan.activation_checkpointing and planned.predicted_peak <= planned.usable_budget


def test_measure_costs_needs_trainable_weights(tiny):
    backbone, sampler = tiny
    with pytest.raises(ValueError, match="trainable parameters"):
        measure_costs(
            lambda n, g, c: torch.zeros(n), lambda z: z, lambda on: None, models=[backbone.vae], device="cpu"
        )
    with pytest.raises(ValueError, match="n1 < n2"):
        measure_costs(
            lambda n, g, c: torch.zeros(n),
            lambda z: z,
            lambda on: None,
            models=[backbone],
            device="cpu",
            samples=(2, 2),
        )


# -- the module plans before its first step ---------------------------------------------------------------


def test_module_plans_at_its_first_step_and_trains_with_the_plan(tiny_pipeline_dir, tmp_path, caplog):
    from rlr_lightning.estimators import RLR
    from tests.test_module import data, make_module, make_trainer

    # On a CPU a budget counts the process's resident memory; a few MiB above it leave room for one chunk.
    budget_gib = (psutil.Process().memory_info().rss + 400 * 2**20) / GIB
    module = make_module(tiny_pipeline_dir, estimator=RLR(h="auto"), memory_budget_gb=budget_gib)
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, max_steps=1).fit(module, datamodule=data())
    assert module.planned_memory is not None and module.task.memory_plan == module.planned_memory.plan
    assert module.estimator.h in (1, 2) and module.trainer.global_step == 1
    assert any("Memory plan: budget" in r.getMessage() for r in caplog.records)


def test_a_step_that_cannot_fit_fails_before_any_sampling(tiny_pipeline_dir, tmp_path):
    from rlr_lightning.memory import MemoryBudgetError
    from rlr_lightning.rewards import TargetColor
    from tests.test_module import data, make_module, make_trainer

    calls = []

    class CountingReward(TargetColor):
        def score(self, images, prompts):
            calls.append(len(prompts))
            return super().score(images, prompts)

    module = make_module(tiny_pipeline_dir, reward=CountingReward(), memory_budget_gb=0.01)
    with pytest.raises(MemoryBudgetError, match="does not fit the memory budget of 10.2 MiB"):
        make_trainer(tmp_path, max_steps=1).fit(module, datamodule=data())
    # Only the planner's own measurement (two sample counts, with and without checkpointing) scored images.
    assert module.trainer.global_step == 0 and all(n <= 2 for n in calls)


def test_h_auto_without_a_budget_is_refused(tiny_pipeline_dir):
    from rlr_lightning.estimators import RLR
    from tests.test_module import make_module

    with pytest.raises(ValueError, match="h='auto'.*memory_budget_gb"):
        make_module(tiny_pipeline_dir, estimator=RLR(h="auto"))


# -- RLR's exact tail ------------------------------------------------------------------------------------


def test_the_planner_prices_an_exact_tail_like_the_backprop_window_it_is():
    from rlr_lightning.estimators import RLR, TruncatedBackprop

    # Unchunked, the tail of K steps holds K denoiser graphs (8 GiB per sample each) like truncated backprop's
    # window of K, and takes K steps off the re-scoring.
    for tail in (1, 2, 4):
        rlr = RLR(h=2, tail=tail)
        rlr.setup(T, 1.0)
        shape = rlr.graph_shape(T, prompts=4)
        assert shape == GraphShape(
            samples=4,
            windows=(2, tail),
            reward_window=1,
            rescoring_steps=T - tail - 2,
            rescore_steps_per_call=4,
        )
        assert peak_gib(shape, None, False) == 10 + (2 + tail) * 8 * 4 + 20 * 4
        truncated = TruncatedBackprop(k=tail).graph_shape(T, prompts=4)
        # Without its block, RLR's tail costs what truncated backprop's window costs.
        assert peak_gib(
            replace(shape, windows=(tail,), reward_window=0, rescoring_steps=0), None, False
        ) == peak_gib(truncated, None, False)


def test_h_auto_leaves_room_for_the_tail():
    from rlr_lightning.estimators import RLR

    rlr = RLR(h="auto", tail=4)
    planned = plan_memory(
        COSTS,
        10_000 * GIB,
        lambda h: rlr.graph_shape(5, 1, h),
        h="auto",
        num_steps=5,
        max_block=rlr.max_block_length(5),
    )
    assert planned.h == 1  # T - K = 1, although the budget would allow the default cap of 2
