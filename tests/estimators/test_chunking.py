"""Chunking over samples and activation checkpointing change memory, never the gradient.

Every estimator, on the tiny UNet with guidance on, gives the same gradient (to float tolerance) on the same
draw whether its windows keep their graph from the sampling pass or are replayed one sample chunk at a time,
with or without checkpointed denoiser calls, and whatever the re-scoring chunk size.
"""

from __future__ import annotations

import pytest
import torch

from rlr_lightning.estimators import (
    RLR,
    FullBackprop,
    ScoreFunction,
    TruncatedBackprop,
    estimate_gradient,
    rollout,
)
from rlr_lightning.memory import MemoryPlan
from rlr_lightning.sampling import DDIMSampler, PromptEmbeds, ScaledPromptEmbeds

T, B = 4, 4

PLANS = [
    MemoryPlan(chunk_samples=1),
    MemoryPlan(chunk_samples=3),
    MemoryPlan(activation_checkpointing=True),
    MemoryPlan(chunk_samples=2, activation_checkpointing=True),
    MemoryPlan(chunk_samples=1, rescore_samples=3),
]

ESTIMATORS = {
    "rlr-score-h1": lambda: RLR(h=1, block_law="range", block_range=(1, 1)),
    "rlr-score-h2-subsampled": lambda: RLR(h=2, block_law="range", block_range=(0, 0), zo_subsample=1),
    "rlr-parameter-antithetic": lambda: RLR(
        h=2, block_law="range", block_range=(1, 1), zo_mode="parameter", zo_scale=0.01
    ),
    "rlr-parameter-ema": lambda: RLR(
        h=1, block_law="range", block_range=(0, 0), zo_mode="parameter", zo_antithetic=False, zo_scale=0.01
    ),
    "rlr-score-tail2": lambda: RLR(h=1, tail=2, block_law="range", block_range=(1, 1)),
    "rlr-parameter-tail2": lambda: RLR(
        h=1, tail=2, block_law="range", block_range=(0, 0), zo_mode="parameter", zo_scale=0.01
    ),
    "rlr-score-tail2-muprop": lambda: RLR(
        h=1, tail=2, block_law="range", block_range=(0, 0), step_baseline="muprop"
    ),
    "rlr-score-value-prompt-mean": lambda: RLR(
        h=1, block_law="range", block_range=(1, 1), step_baseline=["prompt_mean", "value", "value", "none"]
    ),
    "full-backprop": FullBackprop,
    "full-backprop-perturbed": lambda: FullBackprop(perturbation_scale=0.01, antithetic=True),
    "truncated-k2": lambda: TruncatedBackprop(k=2),
    "score-function": ScoreFunction,
}


@pytest.fixture(scope="module")
def problem(tiny_pipeline_dir):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from tests.conftest import perturb_lora_

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet", local_files_only=True)
    unet.requires_grad_(False).eval()
    # LoRA A is drawn from the global RNG: seeded here, so the problem is the same whatever ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet.add_adapter(
            LoraConfig(
                r=4,
                lora_alpha=4,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv_in"],
            )
        )
    perturb_lora_(unet)
    scheduler = DDIMScheduler.from_pretrained(tiny_pipeline_dir, subfolder="scheduler", local_files_only=True)
    sampler = DDIMSampler(unet, scheduler, num_steps=T, eta=1.0, guidance_scale=3.0)
    gen = torch.Generator().manual_seed(0)
    embeds = PromptEmbeds(
        torch.randn(B, 16, 32, generator=gen), torch.randn(1, 16, 32, generator=gen).expand(B, -1, -1)
    )
    weight = torch.randn(4, 8, 8, generator=gen)
    return sampler, embeds, weight


def gradient(problem, estimator, memory, draw=0, embeds=None, differentiable=True):
    sampler, default_embeds, weight = problem
    embeds = embeds if embeds is not None else default_embeds

    def reward(latents, prompts):
        r = (torch.tanh(latents) * weight).flatten(1).mean(1)
        return r if differentiable else r.detach()

    estimator.setup(T, 1.0, reward_differentiable=differentiable)
    estimate = estimate_gradient(
        estimator,
        sampler,
        embeds,
        [f"p{i}" for i in range(B)],
        reward,
        step_seed=draw,
        rank_seed=100 + draw,
        memory=memory,
    )
    estimator.observe(estimate.rollout, {})
    return estimate.total, estimate.rollout


def gradients_over_draws(problem, name, memory, draws=2):
    """Gradients and rewards of consecutive draws of one estimator (the second has statistics from the first:
    running baselines, the EMA of parameter mode)."""
    estimator = ESTIMATORS[name]()
    return [gradient(problem, estimator, memory, draw) for draw in range(draws)]


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_chunking_and_checkpointing_gives_the_same_gradient(problem, name):
    reference = gradients_over_draws(problem, name, MemoryPlan())
    assert all(g.abs().sum() > 0 for g, _ in reference)
    for memory in PLANS:
        for (chunked, result), (expected, expected_result) in zip(
            gradients_over_draws(problem, name, memory), reference
        ):
            torch.testing.assert_close(result.all_rewards, expected_result.all_rewards, rtol=1e-5, atol=1e-6)
            scale = float(expected.abs().max())
            torch.testing.assert_close(
                chunked, expected, rtol=1e-4, atol=1e-5 * scale, msg=f"{name} {memory}"
            )


def test_chunks_keep_their_graph_only_while_they_run(problem):
    """A chunked window has no graph from the sampling pass, and each chunk is one term."""
    memory = MemoryPlan(chunk_samples=1)
    _, unchunked = gradient(problem, RLR(h=1, block_law="range", block_range=(1, 1)), MemoryPlan())
    estimator = RLR(h=1, block_law="range", block_range=(1, 1))
    estimator.setup(T, 1.0)
    sampler, embeds, weight = problem
    result = rollout(
        estimator,
        sampler,
        embeds,
        [f"p{i}" for i in range(B)],
        lambda x, p: (torch.tanh(x) * weight).flatten(1).mean(1),
        0,
        100,
        memory=memory,
    )
    assert not result.trajectory.final.requires_grad and not result.trajectory.window_log_probs
    names = [t.name for t in result.terms]
    assert names.count("ho") == B and names.count("fo") == B
    # Re-scoring calls hold at most chunk_samples transitions: 2 ZO steps x 4 samples in 8 calls.
    assert names.count("zo") == 2 * B
    assert [t.name for t in unchunked.terms] == ["ho", "fo", "zo"]


def test_non_differentiable_reward_and_dcot_conditioning_chunk_alike(problem):
    sampler, embeds, weight = problem
    gen = torch.Generator().manual_seed(3)
    other = PromptEmbeds(torch.randn(B, 16, 32, generator=gen), embeds.uncond)
    scaled = ScaledPromptEmbeds(((0, 1, embeds), (1, T, other)))
    for make, kwargs in (
        (lambda: RLR(h=1, block_law="range", block_range=(0, 0)), dict(differentiable=False)),
        (
            lambda: RLR(h=1, block_law="range", block_range=(0, 0), step_baseline="muprop"),
            dict(differentiable=False),
        ),
        (lambda: ScoreFunction(step_baseline="muprop"), dict(embeds=scaled)),
        (lambda: RLR(h=2, block_law="range", block_range=(1, 1)), dict(embeds=scaled)),
    ):
        reference, _ = gradient(problem, make(), MemoryPlan(), **kwargs)
        chunked, _ = gradient(
            problem, make(), MemoryPlan(chunk_samples=1, activation_checkpointing=True), **kwargs
        )
        torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


def test_module_gradient_through_the_vae_is_the_same_chunked_and_checkpointed(tiny_pipeline_dir):
    """The first-order path through the real decoder and reward: VAE block checkpointing and chunked replays
    leave the module's gradient estimate unchanged."""
    from rlr_lightning.diagnostics import gradient_samples
    from tests.conftest import perturb_lora_
    from tests.test_module import make_module

    module = make_module(tiny_pipeline_dir, guidance_scale=2.0)
    module.configure_model()
    perturb_lora_(module.backbone.unet)
    prompts = ["a cat", "a dog", "an owl"]
    reference = gradient_samples(module, prompts, num_samples=2)
    for memory in (MemoryPlan(chunk_samples=1, activation_checkpointing=True), MemoryPlan(chunk_samples=2)):
        module.task.memory_plan = memory
        module.task.set_activation_checkpointing(memory.activation_checkpointing)
        chunked = gradient_samples(module, prompts, num_samples=2)
        torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


def test_estimate_is_what_the_terms_backward_accumulates_and_leaves_grads_alone(problem):
    """``estimate_gradient`` returns minus the gradient a training step's backward passes accumulate (here
    over 2 x B chunked terms), split exactly by term, and restores whatever ``.grad`` the parameters held."""
    from rlr_lightning.estimators import flat_grad

    sampler, embeds, weight = problem
    params = list(sampler.trainable_parameters().values())
    prompts = [f"p{i}" for i in range(B)]

    def reward(latents, prompts):
        return (torch.tanh(latents) * weight).flatten(1).mean(1)

    def make():
        estimator = RLR(h=1, block_law="range", block_range=(1, 1))
        estimator.setup(T, 1.0)
        return estimator

    memory = MemoryPlan(chunk_samples=2)
    held = torch.full_like(params[0], 3.0)
    params[0].grad = held
    estimate = estimate_gradient(make(), sampler, embeds, prompts, reward, 5, 105, memory=memory)
    assert params[0].grad is held and torch.equal(held, torch.full_like(params[0], 3.0))
    assert all(p.grad is None for p in params[1:])

    params[0].grad = None
    result = rollout(make(), sampler, embeds, prompts, reward, 5, 105, memory=memory)
    assert len(result.terms) > 3  # several chunks per kind of term
    for term in result.terms:
        term.loss().backward()
    accumulated = -flat_grad(params).double()
    for p in params:
        p.grad = None
    assert estimate.total.dtype == torch.float64 and set(estimate.terms) == {"ho", "fo", "zo"}
    assert all(share.abs().sum() > 0 for share in estimate.terms.values())
    torch.testing.assert_close(sum(estimate.terms.values()), estimate.total)
    torch.testing.assert_close(
        estimate.total, accumulated, rtol=1e-5, atol=1e-6 * float(accumulated.abs().max())
    )
    torch.testing.assert_close(estimate.rollout.all_rewards, result.all_rewards)
