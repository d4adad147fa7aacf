"""FLUX.1 through the model seam, on a tiny FLUX.1 built in code and loaded with ``from_pretrained``.

What a user of FLUX relies on, each compared with diffusers' own ``FluxPipeline``: the conditioning (T5 sequence
and CLIP pooled embedding), the flow-matching step with the guidance embedding (FLUX.1-dev) and without it
(FLUX.1-schnell), whole sampling at the pipeline's resolution-shifted timesteps, LoRA files in both directions;
then RLR's mean gradient against full backprop on the flow SDE, and ``rlr fit`` on the tiny FLUX through the CLI.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from rlr_lightning.estimators import RLR, FullBackprop, TruncatedBackprop, estimate_gradient
from rlr_lightning.models import FluxBackbone, LoraSettings, load_backbone
from rlr_lightning.sampling import Plan
from tests.conftest import perturb_lora_
from tests.families import (
    WarningRecords,
    check_rescoring_reproduces_the_sampling_log_probs,
    fit_and_sample_through_the_cli,
)

PROMPTS = ["a cat", "a red fox on a hill"]
#: Every attention projection of FLUX's transformer: the image stream's (double blocks) and the single blocks'
#: query, key and value (``to_q``, ``to_k``, ``to_v``), the double blocks' image output (``to_out.0``), and the
#: text stream's (``add_*_proj``, ``to_add_out``). The single blocks' attention output is fused with their MLP in
#: ``proj_out``.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
T5_TOKENS = 32  # the tiny T5 tokenizer's limit, which the backbone reads; the pipeline defaults to 512


@pytest.fixture(scope="module")
def pipe(tiny_flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def backbone(tiny_flux_dir, lora: bool = True, seed: int = 3) -> FluxBackbone:
    bb = load_backbone(tiny_flux_dir, local_files_only=True)
    if lora:
        bb.add_lora(LoraSettings(rank=2, alpha=4.0, target_modules=ATTENTION))
        perturb_lora_(bb.transformer, seed=seed, scale=0.3)
    return bb


def schnell_backbone(seed: int = 0) -> FluxBackbone:
    """A tiny FLUX.1-schnell: no guidance embedding, and schnell's unshifted scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from rlr_lightning.tiny import build_tiny_flux_components

    components = build_tiny_flux_components(seed=seed, guidance_embeds=False)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
    )
    return FluxBackbone(**components)


def transformer_call(bb, x, t, embeds, guidance):
    """The transformer called by hand as FluxPipeline calls it: packed latents, t / 1000, position ids."""
    from diffusers import FluxPipeline

    B, C, h, w = x.shape
    with torch.no_grad():
        v = bb.transformer(
            hidden_states=FluxPipeline._pack_latents(x, B, C, h, w),
            timestep=t.expand(B) / 1000,
            guidance=None if guidance is None else torch.full([B], guidance),
            pooled_projections=embeds.added["pooled_projections"],
            encoder_hidden_states=embeds.cond,
            txt_ids=torch.zeros(embeds.cond.shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, "cpu", x.dtype),
            return_dict=False,
        )[0]
    return FluxPipeline._unpack_latents(v, h, w, vae_scale_factor=1)


def test_load_backbone_picks_flux_and_loads_every_component(tiny_flux_dir):
    bb = backbone(tiny_flux_dir, lora=False)
    assert isinstance(bb, FluxBackbone)
    assert {
        name: type(getattr(bb, name)).__name__ for name in ("transformer", "text_encoder_2", "scheduler")
    } == {
        "transformer": "FluxTransformer2DModel",
        "text_encoder_2": "T5EncoderModel",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
    }
    assert bb.guidance_distilled and bb.vae.config.latent_channels == 16
    assert bb.resolution == (16, 16) and bb.latent_size == (
        8,
        8,
    )  # the VAE's sample_size, latents twice smaller
    assert bb.max_sequence_length == T5_TOKENS
    assert not any(p.requires_grad for p in bb.parameters())
    # A shorter T5 prompt length is the sequence the transformer attends to; a bad one is refused.
    bb.max_sequence_length = 12
    assert bb.encode_prompts(["a cat"], negative=False).cond.shape[1] == 12
    with pytest.raises(ValueError, match="max_sequence_length must be an integer from 1 to 512"):
        bb.max_sequence_length = 600


@pytest.mark.parametrize("negative", [False, True], ids=["prompts", "with-negative"])
def test_conditioning_equals_the_pipelines(pipe, tiny_flux_dir, negative):
    bb = backbone(tiny_flux_dir, lora=False)
    ours = bb.encode_prompts(PROMPTS, negative=negative)
    with (
        torch.no_grad()
    ):  # as in the pipeline's __call__ (with gradient, T5's attention takes another kernel)
        sequence, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=T5_TOKENS)
    assert ours.cond.shape == (2, T5_TOKENS, 32)
    torch.testing.assert_close(ours.cond, sequence, rtol=0, atol=0)
    torch.testing.assert_close(ours.added["pooled_projections"], pooled, rtol=0, atol=0)
    assert not torch.equal(ours.cond[0], ours.cond[1])
    if negative:  # the empty prompt, as the pipeline's optional true CFG encodes its default negative prompt
        with torch.no_grad():
            uncond, uncond_pooled, _ = pipe.encode_prompt(
                [""] * 2, device="cpu", max_sequence_length=T5_TOKENS
            )
        torch.testing.assert_close(ours.uncond, uncond, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.uncond_added["pooled_projections"], uncond_pooled, rtol=0, atol=1e-6)
    else:
        assert ours.uncond is None


@pytest.mark.parametrize(
    "model, guidance", [("dev", 3.5), ("schnell", 1.0)], ids=["guidance-embedding", "schnell"]
)
def test_step_at_noise_level_zero_equals_the_scheduler_step_on_the_same_transformer_call(
    tiny_flux_dir, model, guidance
):
    """Our step against FlowMatchEulerDiscreteScheduler.step on the pipeline's timesteps (sigmas linspace(1, 1/T),
    shifted by mu), fed by a hand-written transformer call, with the guidance embedding (FLUX.1-dev) and without
    (FLUX.1-schnell, whose transformer has none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    bb = backbone(tiny_flux_dir) if model == "dev" else schnell_backbone()
    embeds = bb.encode_prompts(PROMPTS, negative=False)
    sampler = bb.make_sampler(4, eta=0.0, guidance_scale=guidance)
    assert sampler.num_steps == 4 and not sampler.uses_guidance  # one transformer call per step
    reference = FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler.config)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=calculate_shift(16))  # 4x4 packed tokens
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    for k, t in enumerate(reference.timesteps):
        ours = sampler.step(k, x, embeds)
        v = transformer_call(bb, x, t, embeds, guidance if model == "dev" else None)
        expected = reference.step(v, t, x).prev_sample
        torch.testing.assert_close(ours.next_latents, expected, rtol=0, atol=1e-6)
        x = expected
    if model == "dev":  # the guidance value reaches the transformer
        other = bb.make_sampler(4, eta=0.0, guidance_scale=1.0).step(0, x, embeds).next_latents
        assert not torch.allclose(
            other,
            bb.make_sampler(4, eta=0.0, guidance_scale=guidance).step(0, x, embeds).next_latents,
            atol=1e-4,
        )


@pytest.mark.parametrize("resolution", [None, (16, 24)], ids=["default", "16x24"])
def test_sampling_equals_the_pipeline_with_guidance(pipe, tiny_flux_dir, resolution):
    """Noise level 0 and the same initial latents: our whole chain ends where FluxPipeline's does (its latents
    packed in, its output unpacked), at the default resolution and at a non-square one (other token count, so
    another timestep shift, and other position ids)."""
    from diffusers import FluxPipeline

    bb = backbone(tiny_flux_dir, lora=False)
    bb.set_resolution(resolution)
    height, width = bb.resolution
    sampler = bb.make_sampler(4, eta=0.0, guidance_scale=3.5)
    x0, noises = sampler.initial_noise(2, torch.Generator().manual_seed(1))
    assert x0.shape == (2, 16, height // 2, width // 2)
    ours = sampler.run(
        Plan(4), bb.encode_prompts(PROMPTS, negative=False), initial_latents=x0, noises=noises
    ).final
    packed = pipe(
        prompt=PROMPTS,
        num_inference_steps=4,
        guidance_scale=3.5,
        height=height,
        width=width,
        latents=FluxPipeline._pack_latents(x0, 2, 16, height // 2, width // 2),
        output_type="latent",
        max_sequence_length=T5_TOKENS,
    ).images
    theirs = FluxPipeline._unpack_latents(packed, height, width, pipe.vae_scale_factor)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - x0).abs().mean() > 0.1  # the transformer moved the latents: the comparison is not vacuous
    # The pixels: our decode (FLUX's latent scale and shift) gives the pipeline's images from the same latents.
    pixels = pipe(
        prompt=PROMPTS,
        num_inference_steps=4,
        guidance_scale=3.5,
        height=height,
        width=width,
        latents=FluxPipeline._pack_latents(x0, 2, 16, height // 2, width // 2),
        output_type="pt",
        max_sequence_length=T5_TOKENS,
    ).images
    with torch.no_grad():
        torch.testing.assert_close(bb.decode(ours), pixels, rtol=0, atol=1e-5)


def test_bad_resolution_guidance_and_timestep_spacing_fail_early_with_what_would_be_valid(tiny_flux_dir):
    bb = backbone(tiny_flux_dir, lora=False)
    with pytest.raises(ValueError, match=r"multiple of 4 pixels, got 18x16 \(e\.g\. 16x16\)"):
        bb.set_resolution((18, 16))  # latents 9 high: no 2x2 packing
    with pytest.raises(ValueError, match="timestep_spacing='trailing' applies to DDIM only"):
        bb.make_sampler(4, eta=0.7, guidance_scale=3.5, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="guidance embedding and must be > 0.*got 0"):
        bb.make_sampler(4, eta=0.7, guidance_scale=0)
    with pytest.raises(ValueError, match="no guidance embedding.*guidance_scale must be 1, got 3.5"):
        schnell_backbone().make_sampler(4, eta=0.7, guidance_scale=3.5)
    bb.set_resolution(12)  # 6x6 latents, 3x3 tokens: fine
    assert bb.make_sampler(2, eta=0.7, guidance_scale=3.5).initial_noise(1)[0].shape == (1, 16, 6, 6)


def test_rescoring_stacked_rows_reproduces_the_sampling_log_probs(tiny_flux_dir):
    """The pooled projections and the guidance embedding follow each re-scored row of the flow SDE."""
    bb = backbone(tiny_flux_dir)
    check_rescoring_reproduces_the_sampling_log_probs(
        bb, bb.make_sampler(4, eta=1.0, guidance_scale=3.5), False
    )


def test_lora_on_every_attention_projection_loads_in_the_flux_pipeline_and_round_trips_exactly(
    pipe, tiny_flux_dir, tmp_path
):
    import warnings

    from diffusers import FluxPipeline

    ours = backbone(tiny_flux_dir)
    path = ours.export_lora(tmp_path / "lora")
    embeds = ours.encode_prompts(PROMPTS, negative=False)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor(500.0)

    def transformer_out(owner):
        return transformer_call(owner, x, t, embeds, 3.5)

    # Import: a fresh backbone rebuilds the adapter from the file and gives the same outputs, bit for bit.
    fresh = load_backbone(tiny_flux_dir, local_files_only=True)
    settings = fresh.load_lora(path)
    assert (settings.rank, settings.alpha, set(settings.target_modules)) == (2, 4.0, set(ATTENTION))
    assert torch.equal(transformer_out(fresh), transformer_out(ours))
    # Export: diffusers' FLUX pipeline loads every key without complaint and computes the same transformer.
    theirs = FluxPipeline.from_pretrained(tiny_flux_dir, local_files_only=True)
    before = transformer_out(theirs)
    records = WarningRecords()
    logging.getLogger("diffusers").addHandler(records)  # diffusers' loggers do not propagate to the root
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            theirs.load_lora_weights(path.parent, adapter_name="rlr")
    finally:
        logging.getLogger("diffusers").removeHandler(records)
    # (diffusers also says that the file has no text-encoder LoRA, which is true and harmless.)
    messages = records.messages + [str(w.message) for w in caught]
    complaints = [m for m in messages if "unexpected keys" in m or "missing keys" in m]
    assert not complaints, complaints
    adapted = {
        n.rsplit(".lora_A", 1)[0] for n, _ in theirs.transformer.named_parameters() if ".lora_A.rlr" in n
    }
    assert adapted == {
        n.rsplit(".lora_A", 1)[0] for n, _ in ours.transformer.named_parameters() if ".lora_A." in n
    }
    # Both streams of the double block and the single block's query, key and value are adapted.
    assert {name.rsplit(".", 1)[-1] for name in adapted} >= {"add_q_proj", "to_add_out", "to_q"}
    assert any(name.startswith("single_transformer_blocks.") for name in adapted)
    torch.testing.assert_close(transformer_out(theirs), transformer_out(ours), rtol=0, atol=1e-5)
    assert not torch.allclose(
        transformer_out(theirs), before, atol=1e-3
    )  # the LoRA is off its initialisation


class FluxProblem:
    """The tiny FLUX.1-dev in float64 at 4x4 pixels (one 2x2 latent patch: 64 latent dimensions), LoRA on every
    attention projection off its initialisation, the flow SDE at noise level 1 over T = 3 steps, guidance
    embedding 3.5, and a smooth reward of the final latent.

    Few latent dimensions and large step sigmas keep the likelihood ratios' variance low enough for paired draws
    to test unbiasedness with power; T = 3 makes the steps before the last carry most of the gradient."""

    def __init__(self, tiny_flux_dir, batch: int = 8, num_steps: int = 3) -> None:
        bb = backbone(tiny_flux_dir, seed=5)
        bb.set_resolution(4)
        bb.transformer.to(torch.float64)
        bb.dtype = torch.float64
        self.T, self.eta = num_steps, 1.0
        self.prompts = [f"prompt number {i}" for i in range(batch)]
        self.embeds = bb.encode_prompts(self.prompts, negative=False).map(lambda t: t.to(torch.float64))
        self.sampler = bb.make_sampler(num_steps, eta=self.eta, guidance_scale=3.5)
        self.weight = torch.randn(16, 2, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def reward(self, latents, _prompts):
        return (torch.tanh(latents) * self.weight).flatten(1).sum(1)

    def setup(self, estimator):
        estimator.setup(self.T, self.eta)
        return estimator

    def gradient(self, estimator, draw):
        estimate = estimate_gradient(
            estimator,
            self.sampler,
            self.embeds,
            self.prompts,
            self.reward,
            step_seed=draw,
            rank_seed=50_000 + draw,
        )
        estimator.observe(estimate.rollout, {})
        return estimate.total


def _z(values: torch.Tensor) -> float:
    return float(values.mean() / (values.std() / len(values) ** 0.5))


@pytest.mark.slow
def test_rlr_mean_gradient_matches_full_backprop_and_truncation_shows_its_bias_on_flux(tiny_flux_dir):
    """Paired draws (same noises, same seeds): RLR minus full backprop has mean zero along the true gradient and
    along a random direction, in score mode and in antithetic parameter mode (against full backprop at the same
    perturbed weights); the same test sees truncated backprop's (K = 1) bias."""
    problem = FluxProblem(tiny_flux_dir)
    scale, draws = 0.05, 100
    full = problem.setup(FullBackprop())
    direction = torch.stack([problem.gradient(full, 10_000 + i) for i in range(40)]).mean(0)
    direction /= direction.norm()
    random_direction = torch.randn(
        direction.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    random_direction /= random_direction.norm()
    pairs = {
        "score": (RLR(h=1, zo_mode="score"), full),
        "parameter": (
            RLR(h=1, zo_mode="parameter", zo_scale=scale, zo_antithetic=True, perturb_backprop_steps=True),
            FullBackprop(perturbation_scale=scale, antithetic=True),
        ),
        "truncated": (TruncatedBackprop(k=1), full),
    }
    z = {}
    for name, (estimator, reference) in pairs.items():
        problem.setup(estimator), problem.setup(reference)
        d = torch.stack(
            [problem.gradient(estimator, i) - problem.gradient(reference, i) for i in range(draws)]
        )
        z[name] = (_z(d @ direction), _z(d @ random_direction))
    for name in ("score", "parameter"):
        assert max(abs(v) for v in z[name]) < 4, (
            f"RLR ({name} mode) differs from full backprop on FLUX: z = {z}"
        )
    assert abs(z["truncated"][0]) > 6, f"truncated backprop's bias is not seen: z = {z}"


@pytest.mark.slow
def test_rlr_fit_on_the_tiny_flux_through_the_cli(tiny_flux_dir, tmp_path):
    fit_and_sample_through_the_cli(
        tiny_flux_dir,
        tmp_path,
        "FluxBackbone",
        [
            "--model.num_steps",
            "3",
            "--model.eta",
            "0.7",
            "--model.guidance_scale",
            "3.5",
            "--model.timestep_spacing",
            "null",
            "--model.lora.target_modules",
            json.dumps(list(ATTENTION)),
        ],
        ["--steps", "3", "--eta", "0.7", "--guidance", "3.5"],
    )
