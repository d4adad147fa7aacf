"""Stable Diffusion XL through the model seam, on a tiny SDXL built in code and loaded with ``from_pretrained``.

What a user of SDXL relies on, each compared with diffusers' own ``StableDiffusionXLPipeline``: the conditioning
(two encoders, pooled embeddings, time ids, zeroed negatives), the DDIM step with added conditioning and
guidance, whole sampling, LoRA files in both directions; then RLR's mean gradient against full backprop, and
``rlr fit`` on the tiny SDXL through the CLI.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rlr_lightning.estimators import RLR, FullBackprop, ScoreFunction, estimate_gradient
from rlr_lightning.memory import MemoryPlan
from rlr_lightning.models import LoraSettings, StableDiffusionXLBackbone, load_backbone
from rlr_lightning.sampling import DDIMSampler, Plan, ScaledPromptEmbeds, UNetDenoiser
from tests.conftest import perturb_lora_
from tests.families import check_rescoring_reproduces_the_sampling_log_probs, fit_and_sample_through_the_cli

PROMPTS = ["a cat", "a red fox on a hill"]


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def backbone(tiny_sdxl_dir, lora: bool = True, seed: int = 3) -> StableDiffusionXLBackbone:
    bb = load_backbone(tiny_sdxl_dir, local_files_only=True)
    if lora:
        bb.add_lora(LoraSettings(rank=2, alpha=4.0))
        perturb_lora_(bb.unet, seed=seed, scale=0.3)
    return bb


def test_load_backbone_picks_sdxl_and_loads_every_component(tiny_sdxl_dir):
    bb = backbone(tiny_sdxl_dir, lora=False)
    assert isinstance(bb, StableDiffusionXLBackbone)
    assert type(bb.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert bb.force_zeros_for_empty_prompt is True  # what the saved pipeline's model_index.json says
    assert not any(p.requires_grad for p in bb.parameters())


@pytest.mark.parametrize("zeros", [True, False], ids=["zero-negative", "encoded-negative"])
def test_conditioning_equals_the_pipelines(pipe, tiny_sdxl_dir, zeros):
    bb = backbone(tiny_sdxl_dir, lora=False)
    bb.force_zeros_for_empty_prompt = zeros
    pipe.register_to_config(force_zeros_for_empty_prompt=zeros)
    ours = bb.encode_prompts(PROMPTS)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=True
    )
    torch.testing.assert_close(ours.cond, cond, rtol=0, atol=0)
    torch.testing.assert_close(ours.added["text_embeds"], pooled, rtol=0, atol=0)
    # The pipeline encodes the negative prompt once per prompt, we once for all: equal up to batched float sums.
    torch.testing.assert_close(ours.uncond, uncond, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.uncond_added["text_embeds"], uncond_pooled, rtol=0, atol=1e-6)
    assert bool((ours.uncond == 0).all()) == zeros
    height = width = pipe.default_sample_size * pipe.vae_scale_factor
    time_ids = pipe._get_add_time_ids(
        (height, width),
        (0, 0),
        (height, width),
        dtype=cond.dtype,
        text_encoder_projection_dim=bb.text_encoder_2.config.projection_dim,
    )
    for added in (ours.added, ours.uncond_added):
        torch.testing.assert_close(added["time_ids"], time_ids.expand(len(PROMPTS), -1), rtol=0, atol=0)
    pipe.register_to_config(force_zeros_for_empty_prompt=True)


@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["no-cfg", "cfg"])
def test_step_equals_ddim_scheduler_step_on_the_same_sdxl_unet_call(tiny_sdxl_dir, guidance):
    """Our step against DDIMScheduler.step fed by a hand-written SDXL UNet call with added conditioning."""
    from diffusers import DDIMScheduler

    bb = backbone(tiny_sdxl_dir)
    embeds = bb.encode_prompts(PROMPTS, negative=guidance > 1)
    sampler = bb.make_sampler(5, eta=0.8, guidance_scale=guidance)
    reference = DDIMScheduler.from_config(bb.scheduler.config)
    reference.set_timesteps(5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    for k, t in enumerate(reference.timesteps):
        noise = torch.randn(x.shape, generator=gen)
        ours = sampler.step(k, x, embeds, noise=noise)
        with torch.no_grad():
            if (
                guidance > 1
            ):  # as StableDiffusionXLPipeline does it: both branches in one call, negative first
                both = bb.unet(
                    torch.cat([x, x]),
                    t,
                    encoder_hidden_states=torch.cat([embeds.uncond, embeds.cond]),
                    added_cond_kwargs={
                        n: torch.cat([embeds.uncond_added[n], v]) for n, v in embeds.added.items()
                    },
                ).sample
                uncond, cond = both.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            else:
                eps = bb.unet(x, t, encoder_hidden_states=embeds.cond, added_cond_kwargs=embeds.added).sample
            expected = reference.step(eps, t, x, eta=0.8, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours.next_latents, expected, rtol=1e-5, atol=1e-5)
        x = expected


def test_sampling_equals_the_pipeline_with_guidance(pipe, tiny_sdxl_dir):
    """eta = 0 and the same initial latents: our whole chain ends where StableDiffusionXLPipeline's does."""
    bb = backbone(tiny_sdxl_dir, lora=False)
    sampler = bb.make_sampler(4, eta=0.0, guidance_scale=3.0)
    x0, noises = sampler.initial_noise(2, torch.Generator().manual_seed(1))
    ours = sampler.run(Plan(4), bb.encode_prompts(PROMPTS), initial_latents=x0, noises=noises).final
    theirs = pipe(
        prompt=PROMPTS,
        num_inference_steps=4,
        guidance_scale=3.0,
        eta=0.0,
        latents=x0 * pipe.scheduler.init_noise_sigma,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - x0).abs().mean() > 0.1  # the UNet moved the latents: the comparison is not vacuous


def test_rescoring_stacked_rows_reproduces_the_sampling_log_probs(tiny_sdxl_dir):
    """The added conditioning (pooled embeddings, time ids) follows each re-scored row, with guidance."""
    bb = backbone(tiny_sdxl_dir)
    check_rescoring_reproduces_the_sampling_log_probs(
        bb, bb.make_sampler(4, eta=1.0, guidance_scale=2.0), True
    )


def test_lora_export_loads_in_the_sdxl_pipeline_and_round_trips_exactly(pipe, tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    ours = backbone(tiny_sdxl_dir)
    path = ours.export_lora(tmp_path / "lora")
    embeds = ours.encode_prompts(PROMPTS, negative=False)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([500, 500])

    def unet_out(unet):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=embeds.cond, added_cond_kwargs=embeds.added).sample

    # Import: a fresh backbone rebuilds the adapter from the file and gives the same outputs, bit for bit.
    fresh = load_backbone(tiny_sdxl_dir, local_files_only=True)
    settings = fresh.load_lora(path)
    assert (settings.rank, settings.alpha, set(settings.target_modules)) == (
        2,
        4.0,
        set(LoraSettings().target_modules),
    )
    assert torch.equal(unet_out(fresh.unet), unet_out(ours.unet))
    # Export: diffusers' SDXL pipeline loads every key without complaint and computes the same UNet.
    theirs = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    before = unet_out(theirs.unet)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs.load_lora_weights(path.parent, adapter_name="rlr")
    assert not [w for w in caught if "key" in str(w.message).lower()]
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in theirs.unet.named_parameters() if ".lora_A.rlr" in n}
    assert adapted == {n.rsplit(".lora_A", 1)[0] for n, _ in ours.unet.named_parameters() if ".lora_A." in n}
    torch.testing.assert_close(unet_out(theirs.unet), unet_out(ours.unet), rtol=0, atol=1e-5)
    assert not torch.allclose(unet_out(theirs.unet), before, atol=1e-3)  # the LoRA is off its initialisation


class SDXLProblem:
    """The tiny SDXL with LoRA off its initialisation, guidance on, and a smooth reward of the final latent."""

    def __init__(
        self, tiny_sdxl_dir, batch: int = 8, num_steps: int = 4, dtype: torch.dtype = torch.float32
    ) -> None:
        bb = backbone(tiny_sdxl_dir)
        self.T = num_steps
        self.prompts = [f"prompt number {i}" for i in range(batch)]
        self.embeds = bb.encode_prompts(self.prompts).map(lambda t: t.to(dtype))
        if dtype != torch.float32:
            bb.unet.to(dtype)
        self.sampler = DDIMSampler(
            UNetDenoiser(bb.unet, dtype), bb.scheduler, num_steps, eta=1.0, guidance_scale=2.0
        )
        self.weight = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(9)).to(dtype)

    def reward(self, latents, _prompts):
        return (torch.tanh(latents) * self.weight).flatten(1).mean(1)

    def gradient(self, estimator, draw, memory=None, embeds=None):
        estimate = estimate_gradient(
            estimator,
            self.sampler,
            self.embeds if embeds is None else embeds,
            self.prompts,
            self.reward,
            step_seed=draw,
            rank_seed=50_000 + draw,
            memory=memory,
        )
        estimator.observe(estimate.rollout, {})
        return estimate.total


@pytest.mark.parametrize(
    "make",
    [
        lambda: RLR(h=2, block_law="range", block_range=(1, 1)),
        lambda: RLR(h=1, block_law="range", block_range=(0, 0), zo_mode="parameter", zo_scale=0.01),
        ScoreFunction,
    ],
    ids=["rlr-score", "rlr-parameter-antithetic", "score-function"],
)
def test_chunked_replay_and_rescoring_give_the_same_gradient_on_sdxl(tiny_sdxl_dir, make):
    """Chunked windows and re-scoring select rows of the added conditioning (pooled embeddings, time ids) for
    every sample chunk, in both guidance branches and for DCoT scales; any misplaced row changes the gradient.

    In float64: the tiny SDXL's chain amplifies float32 rounding (batched against per-sample calls) to about 1e-2
    after four steps, which would hide a misplaced row between similar prompts; in float64 they agree to 1e-10."""
    problem = SDXLProblem(tiny_sdxl_dir, batch=4, dtype=torch.float64)
    scaled = ScaledPromptEmbeds(
        ((0, 2, problem.embeds), (2, 4, problem.embeds.select(torch.tensor([2, 3, 0, 1]))))
    )
    for embeds in (problem.embeds, scaled):
        whole = problem.gradient(_setup(make(), problem), 0, embeds=embeds)
        for memory in (
            MemoryPlan(chunk_samples=1, rescore_samples=3),
            MemoryPlan(chunk_samples=3, activation_checkpointing=True),
        ):
            chunked = problem.gradient(_setup(make(), problem), 0, memory=memory, embeds=embeds)
            torch.testing.assert_close(chunked, whole, rtol=1e-7, atol=1e-9 * float(whole.abs().max()))
        assert float(whole.norm()) > 0


def _setup(estimator, problem):
    estimator.setup(problem.T, 1.0)
    return estimator


@pytest.mark.slow
def test_rlr_mean_gradient_matches_full_backprop_on_sdxl(tiny_sdxl_dir):
    """Paired draws (same noises and seeds): RLR minus full backprop has mean zero along the true gradient and
    along a random direction, with guidance on (both branches carry pooled embeddings and time ids).

    At this size the likelihood-ratio variance is large, so this catches gross errors only; the estimators'
    unbiasedness with power is tested on the toy problem (tests/estimators), and the SDXL-specific plumbing by
    the exact comparisons above."""
    problem = SDXLProblem(tiny_sdxl_dir)
    reference, rlr = _setup(FullBackprop(), problem), _setup(RLR(h=1), problem)
    direction = torch.stack([problem.gradient(reference, 10_000 + i) for i in range(30)]).mean(0)
    direction /= direction.norm()
    random_direction = torch.randn(
        direction.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    random_direction /= random_direction.norm()
    along, across = [], []
    for draw in range(60):
        d = problem.gradient(rlr, draw) - problem.gradient(reference, draw)
        along.append(d @ direction)
        across.append(d @ random_direction)
    for values in (torch.stack(along), torch.stack(across)):
        z = float(values.mean() / (values.std() / len(values) ** 0.5))
        assert abs(z) < 4, f"RLR differs from full backprop on SDXL: z = {z:.2f}"


@pytest.mark.slow
def test_rlr_fit_on_the_tiny_sdxl_through_the_cli(tiny_sdxl_dir, tmp_path):
    fit_and_sample_through_the_cli(
        tiny_sdxl_dir,
        tmp_path,
        "StableDiffusionXL",
        ["--model.num_steps", "4", "--model.guidance_scale", "2"],
        ["--steps", "4", "--guidance", "2"],
    )
