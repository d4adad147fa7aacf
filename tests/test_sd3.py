"""Stable Diffusion 3 / 3.5 through the model seam, on a tiny SD 3.5 built in code and loaded with ``from_pretrained``.

What a user of SD 3 relies on, each compared with diffusers' own ``StableDiffusion3Pipeline``: the conditioning
(three encoders, pooled projections, the encoded empty negative prompt), the flow-matching step with guidance,
whole sampling at the default and another resolution, LoRA files on every attention projection in both
directions; then the estimators' mean gradient against full backprop on the flow SDE, and ``rlr fit`` on the
tiny SD 3 through the CLI. The tiny transformer has SD 3.5's dual attention layer and RMS query/key norm, so
those code paths run too.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch

from rlr_lightning.estimators import RLR, FullBackprop, TruncatedBackprop, estimate_gradient
from rlr_lightning.models import LoraSettings, StableDiffusion3Backbone, load_backbone
from rlr_lightning.sampling import Plan
from tests.conftest import perturb_lora_
from tests.families import (
    WarningRecords,
    check_rescoring_reproduces_the_sampling_log_probs,
    fit_and_sample_through_the_cli,
)

PROMPTS = ["a cat", "a red fox on a hill"]
#: Every attention projection of SD 3's joint blocks: the image stream's and the text stream's (Flow-GRPO's targets).
ALL_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@pytest.fixture(scope="module")
def pipe(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def backbone(tiny_sd3_dir, lora: bool = True, seed: int = 3, targets=ALL_ATTENTION, **kwargs):
    bb = load_backbone(tiny_sd3_dir, local_files_only=True, **kwargs)
    if lora:
        # peft draws the A weights from the global generator: seeded, the problem does not depend on test order.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            bb.add_lora(LoraSettings(rank=2, alpha=4.0, target_modules=targets))
        perturb_lora_(bb.transformer, seed=seed, scale=0.3)
    return bb


def test_load_backbone_picks_sd3_and_loads_every_component(tiny_sd3_dir):
    bb = backbone(tiny_sd3_dir, lora=False)
    assert isinstance(bb, StableDiffusion3Backbone)
    for name, (_, class_name) in StableDiffusion3Backbone.component_classes.items():
        assert type(getattr(bb, name)).__name__.removesuffix("Fast") == class_name.removesuffix("Fast"), name
    assert not any(p.requires_grad for p in bb.parameters())
    # The tiny T5 tokenizer's own limit (32) is below the pipeline's default 256, and the default image size is
    # the transformer's sample size times the VAE's scale.
    assert bb.max_sequence_length == 32
    assert bb.resolution == (16, 16) and bb.latent_size == (8, 8)
    # SD 3.5's extra paths are there: a second image attention with RMS query/key norm.
    block = bb.transformer.transformer_blocks[0]
    assert block.attn2 is not None and type(block.attn2.norm_q).__name__ == "RMSNorm"


@pytest.mark.parametrize("negative", [True, False], ids=["with-negative", "no-negative"])
def test_conditioning_equals_the_pipelines(pipe, tiny_sd3_dir, negative):
    bb = backbone(tiny_sd3_dir, lora=False)
    ours = bb.encode_prompts(PROMPTS, negative=negative)
    with torch.no_grad():  # as the pipeline's __call__ runs it (attention takes another kernel with gradient)
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=negative, max_sequence_length=32
        )
    assert set(ours.added) == {"pooled_projections"}
    torch.testing.assert_close(ours.cond, cond, rtol=0, atol=0)
    torch.testing.assert_close(ours.added["pooled_projections"], pooled, rtol=0, atol=0)
    if not negative:
        assert ours.uncond is None and not ours.uncond_added
        return
    torch.testing.assert_close(ours.uncond, uncond, rtol=0, atol=0)
    torch.testing.assert_close(ours.uncond_added["pooled_projections"], uncond_pooled, rtol=0, atol=0)
    assert ours.uncond.abs().amax() > 0  # SD 3 encodes the empty prompt: no zeroed negatives


def test_max_sequence_length_sets_the_t5_tokens_and_rejects_bad_values(tiny_sd3_dir):
    bb = backbone(tiny_sd3_dir, lora=False)
    clip_tokens = bb.tokenizer.model_max_length
    assert bb.encode_prompts(PROMPTS).cond.shape[1] == clip_tokens + 32
    bb.max_sequence_length = 20
    assert bb.encode_prompts(PROMPTS).cond.shape[1] == clip_tokens + 20
    for bad in (0, 513, 2.5):
        with pytest.raises(ValueError, match=f"max_sequence_length must be an integer from 1 to 512.*{bad}"):
            bb.max_sequence_length = bad


def test_the_module_sets_the_t5_length_and_a_family_without_t5_refuses_it(tiny_sd3_dir, tiny_pipeline_dir):
    from rlr_lightning.module import RLRModule
    from rlr_lightning.rewards import TargetColor

    module = RLRModule(str(tiny_sd3_dir), reward=TargetColor(), num_steps=3, max_sequence_length=12)
    module.configure_model()
    clip_tokens = module.backbone.tokenizer.model_max_length
    assert module.task.conditioning_for(PROMPTS).cond.shape[1] == clip_tokens + 12
    with pytest.raises(ValueError, match="has no T5 encoder"):
        RLRModule(str(tiny_pipeline_dir), num_steps=3, max_sequence_length=12).configure_model()


def test_a_cut_prompt_is_reported_once_however_often_it_is_encoded(tiny_sd3_dir, caplog):
    """Training encodes the batch's prompts every step: diffusers' pipeline and transformers' tokenizers would
    warn on each encoding; the backbone says it once, naming the prompt."""
    bb = backbone(tiny_sd3_dir, lora=False)
    long = "a red fox on a hill under the moon"  # over the tiny CLIP's 16 tokens and T5's 32
    records = WarningRecords()
    for name in ("diffusers", "transformers"):  # neither library's loggers propagate to the root logger
        logging.getLogger(name).addHandler(records)
    caplog.clear()  # only the encodings' records: not the loading's, whatever level an earlier test left
    try:
        with caplog.at_level(logging.WARNING, logger="rlr_lightning"):
            for _ in range(3):
                bb.encode_prompts([long, "a cat"])
    finally:
        for name in ("diffusers", "transformers"):
            logging.getLogger(name).removeHandler(records)
    assert records.messages == []
    ours = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("rlr_lightning") and r.levelno >= logging.WARNING
    ]
    assert len(ours) == 1 and "longer prompts are cut" in ours[0] and "a red fox" in ours[0], ours


@pytest.mark.parametrize("guidance", [1.0, 4.5], ids=["no-cfg", "cfg"])
def test_step_at_noise_level_zero_equals_the_flow_match_scheduler_step(tiny_sd3_dir, guidance):
    """Our step against FlowMatchEulerDiscreteScheduler.step fed by a transformer call written as the pipeline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    bb = backbone(tiny_sd3_dir)
    embeds = bb.encode_prompts(PROMPTS, negative=guidance > 1)
    sampler = bb.make_sampler(4, eta=0.0, guidance_scale=guidance)
    reference = FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler.config)
    reference.set_timesteps(4)
    torch.testing.assert_close(sampler.kernel.timesteps, reference.timesteps, rtol=0, atol=0)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    for k, t in enumerate(reference.timesteps):
        ours = sampler.step(k, x, embeds)
        with torch.no_grad():
            if guidance > 1:  # as StableDiffusion3Pipeline does it: both branches in one call, negative first
                both = bb.transformer(
                    hidden_states=torch.cat([x, x]),
                    timestep=t.expand(4),
                    encoder_hidden_states=torch.cat([embeds.uncond, embeds.cond]),
                    pooled_projections=torch.cat(
                        [embeds.uncond_added["pooled_projections"], embeds.added["pooled_projections"]]
                    ),
                ).sample
                uncond, cond = both.chunk(2)
                velocity = uncond + guidance * (cond - uncond)
            else:
                velocity = bb.transformer(
                    hidden_states=x,
                    timestep=t.expand(2),
                    encoder_hidden_states=embeds.cond,
                    pooled_projections=embeds.added["pooled_projections"],
                ).sample
            expected = reference.step(velocity, t, x).prev_sample
        torch.testing.assert_close(ours.next_latents, expected, rtol=0, atol=1e-6)
        assert ours.log_prob is None  # a deterministic step has no log-probability
        x = expected


@pytest.mark.parametrize(
    ("resolution", "dynamic_shift"),
    [(None, False), ((24, 32), False), ((24, 32), True)],
    ids=["default", "24x32", "24x32-dynamic-shift"],
)
def test_sampling_at_noise_level_zero_equals_the_pipeline_with_guidance(
    pipe, tiny_sd3_dir, resolution, dynamic_shift
):
    """The same initial latents: our whole chain ends where StableDiffusion3Pipeline's does, at the default
    resolution and at a larger non-square one (the transformer crops its position embeddings there), and with a
    scheduler that shifts its times by the number of image patches (``use_dynamic_shifting``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    bb = backbone(tiny_sd3_dir, lora=False)
    bb.set_resolution(resolution)
    height, width = bb.resolution
    fixed_times = bb.make_sampler(4, eta=0.0).kernel.times
    scheduler = pipe.scheduler
    if dynamic_shift:  # a sequence-length range around the tiny model's 16 to 48 patches
        bb.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            bb.scheduler.config, use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64
        )
    sampler = bb.make_sampler(4, eta=0.0, guidance_scale=4.5)
    assert torch.equal(sampler.kernel.times, fixed_times) != dynamic_shift
    x0, noises = sampler.initial_noise(2, torch.Generator().manual_seed(1))
    assert x0.shape == (2, 16, height // 2, width // 2)
    ours = sampler.run(Plan(4), bb.encode_prompts(PROMPTS), initial_latents=x0, noises=noises).final
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler.config)
    try:
        theirs = pipe(
            prompt=PROMPTS,
            num_inference_steps=4,
            guidance_scale=4.5,
            height=height,
            width=width,
            latents=x0,
            max_sequence_length=32,
            output_type="latent",
        ).images
    finally:
        pipe.scheduler = scheduler
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - x0).abs().mean() > 0.1  # the transformer moved the latents: the comparison is not vacuous


def test_resolution_must_fit_the_patches_and_position_embeddings(tiny_sd3_dir):
    bb = backbone(tiny_sd3_dir, lora=False)
    with pytest.raises(ValueError, match="18x16 is not a multiple of 4 on each side"):
        bb.set_resolution((18, 16))
    with pytest.raises(ValueError, match="at most 64 pixels a side"):
        bb.set_resolution(68)
    bb.set_resolution(64)  # the largest the tiny transformer's position embeddings cover
    assert bb.latent_size == (32, 32)


def test_timestep_spacing_is_refused_with_the_reason(tiny_sd3_dir):
    bb = backbone(tiny_sd3_dir, lora=False)
    with pytest.raises(ValueError, match="timestep_spacing='trailing' is a DDIM option.*shift 3"):
        bb.make_sampler(4, eta=0.7, timestep_spacing="trailing")


def test_rescoring_stacked_rows_reproduces_the_sampling_log_probs(tiny_sd3_dir):
    """The pooled projections follow each re-scored row of the flow SDE, with guidance."""
    bb = backbone(tiny_sd3_dir)
    check_rescoring_reproduces_the_sampling_log_probs(
        bb, bb.make_sampler(4, eta=1.0, guidance_scale=2.0), True
    )


def test_lora_on_every_attention_projection_exports_to_the_sd3_pipeline_and_round_trips(
    tiny_sd3_dir, tmp_path
):
    import warnings

    from diffusers import StableDiffusion3Pipeline

    ours = backbone(tiny_sd3_dir)
    path = ours.export_lora(tmp_path / "lora")
    embeds = ours.encode_prompts(PROMPTS, negative=False)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([500.0, 500.0])

    def transformer_out(transformer):
        with torch.no_grad():
            return transformer(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=embeds.cond,
                pooled_projections=embeds.added["pooled_projections"],
            ).sample

    ours_adapted = {
        n.rsplit(".lora_A", 1)[0] for n, _ in ours.transformer.named_parameters() if ".lora_A." in n
    }
    # Both streams of both blocks, and SD 3.5's second image attention: every projection the targets name.
    assert {re.sub(r"^.*\.attn2?\.", "", name) for name in ours_adapted} == set(ALL_ATTENTION)
    assert any(".attn2." in name for name in ours_adapted)

    # Import: a fresh backbone rebuilds the adapter from the file and gives the same outputs, bit for bit.
    fresh = load_backbone(tiny_sd3_dir, local_files_only=True)
    settings = fresh.load_lora(path)
    assert (settings.rank, settings.alpha, set(settings.target_modules)) == (2, 4.0, set(ALL_ATTENTION))
    assert torch.equal(transformer_out(fresh.transformer), transformer_out(ours.transformer))

    # Export: diffusers' SD 3 pipeline loads every layer without complaint and computes the same transformer.
    theirs = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, local_files_only=True)
    before = transformer_out(theirs.transformer)
    records = WarningRecords()
    diffusers_logger = logging.getLogger(
        "diffusers"
    )  # diffusers' loggers do not propagate to the root logger
    diffusers_logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            theirs.load_lora_weights(path.parent, adapter_name="rlr")
    finally:
        diffusers_logger.removeHandler(records)
    messages = [str(w.message) for w in caught] + records.messages
    # diffusers notes that the file has no text-encoder LoRA (true, and harmless): the handler hears diffusers.
    assert any("No LoRA keys associated to CLIPTextModelWithProjection" in m for m in messages)
    assert not [m for m in messages if "unexpected keys" in m or "missing keys" in m], messages
    adapted = {
        n.rsplit(".lora_A", 1)[0] for n, _ in theirs.transformer.named_parameters() if ".lora_A.rlr" in n
    }
    assert adapted == ours_adapted
    torch.testing.assert_close(
        transformer_out(theirs.transformer), transformer_out(ours.transformer), rtol=0, atol=1e-5
    )
    assert not torch.allclose(
        transformer_out(theirs.transformer), before, atol=1e-3
    )  # the LoRA is off its init


#: Paired draws per estimator in the mean-gradient tests (each about 0.1-0.2 s of the tiny SD 3 in float64).
DRAWS = 50


class SD3Problem:
    """The tiny SD 3 in float64 with LoRA off its initialisation, guidance on, the flow SDE at noise level 1 over
    T = 4 steps, and a smooth reward of the final latent.

    SD 3's shifted times (1, 0.86, 0.60, 0.009, 0) put almost all of the flow in the first three steps: the
    last step moves the latent by less than 1% of the path, so the gradient lives in the early steps, which is
    what a truncated estimator drops and what RLR's likelihood-ratio terms must get right. float64 keeps the
    parameter-mode finite differences (zo_scale 1e-3) far above rounding.
    """

    T, eta, guidance = 4, 1.0, 2.0

    def __init__(
        self, tiny_sd3_dir, batch: int = 4, eta: float | None = None, guidance: float | None = None
    ) -> None:
        self.eta = self.eta if eta is None else eta
        self.guidance = self.guidance if guidance is None else guidance
        bb = backbone(tiny_sd3_dir, targets=LoraSettings().target_modules, dtype=torch.float64)
        bb.transformer.to(torch.float64)  # the LoRA weights too (kept in float32 for training otherwise)
        self.prompts = [f"prompt number {i}" for i in range(batch)]
        self.embeds = bb.encode_prompts(self.prompts)
        self.sampler = bb.make_sampler(self.T, self.eta, self.guidance)
        self.weight = torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def reward(self, latents, _prompts):
        return (torch.tanh(latents) * self.weight).flatten(1).mean(1)

    def gradient(self, estimator, draw: int, copies: int = 1) -> torch.Tensor:
        """One draw; ``copies`` samples every prompt that many times (how a group estimator lays out its batch,
        so a reference drawn with the same seeds sees the same images)."""
        estimate = estimate_gradient(
            estimator,
            self.sampler,
            self.embeds.repeat(copies),
            self.prompts * copies,
            self.reward,
            step_seed=draw,
            rank_seed=50_000 + draw,
        )
        estimator.observe(estimate.rollout, {})
        return estimate.total

    def setup(self, estimator):
        estimator.setup(self.T, self.eta)
        return estimator


@pytest.fixture(scope="module")
def sd3_problem(tiny_sd3_dir):
    """The problem, the true-gradient direction (full backprop's mean over draws no test uses), a random
    direction, and full backprop's gradient on each test draw projected on both."""
    problem = SD3Problem(tiny_sd3_dir)
    full = problem.setup(FullBackprop())
    direction = torch.stack([problem.gradient(full, 10_000 + i) for i in range(20)]).mean(0)
    direction /= direction.norm()
    random_direction = torch.randn(
        direction.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    random_direction /= random_direction.norm()
    directions = torch.stack([direction, random_direction], dim=1)
    reference = torch.stack([problem.gradient(full, draw) @ directions for draw in range(DRAWS)])
    return problem, directions, reference


def paired_z(sd3_problem, estimator) -> tuple[float, float]:
    """z-scores of the mean paired difference (estimator minus full backprop, same seeds) along the true
    gradient and along the random direction."""
    problem, directions, reference = sd3_problem
    problem.setup(estimator)
    differences = (
        torch.stack([problem.gradient(estimator, draw) @ directions for draw in range(DRAWS)]) - reference
    )
    z = differences.mean(0) / (differences.std(0) / DRAWS**0.5)
    return float(z[0]), float(z[1])


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda: RLR(h=2, zo_mode="score"),
        lambda: RLR(h=1, zo_mode="parameter", zo_antithetic=True, perturb_backprop_steps=True),
    ],
    ids=["rlr-score-h2", "rlr-parameter-antithetic"],
)
def test_rlr_mean_gradient_matches_full_backprop_on_the_flow_sde(sd3_problem, make):
    """Paired draws: RLR minus full backprop has mean zero along the true gradient and a random direction, with
    guidance on (both branches carry their pooled projections) and likelihood ratios of the flow SDE."""
    along, across = paired_z(sd3_problem, make())
    assert abs(along) < 4 and abs(across) < 4, (along, across)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2], ids=["last-step", "last-two-steps"])
def test_the_same_comparison_detects_truncated_backprop(sd3_problem, k):
    """The test above has power: truncated backprop falls short along the true gradient, keeping the last step
    only (K = 1, DRaFT-1: measured z = -34) or the last two (K = 2: z = -19). Even dropping only the first step
    (K = 3) gives z = -10 on this problem (seed-dependent: -5 on another LoRA draw, so not asserted)."""
    along, _ = paired_z(sd3_problem, TruncatedBackprop(k=k))
    assert along < -6, along


@pytest.mark.slow
def test_rlr_with_a_group_baseline_at_the_recipes_settings_matches_full_backprop(tiny_sd3_dir):
    """configs/sd35_medium_pickscore_rlr.yaml's sampler and batch on the tiny SD 3: noise level 0.7 (smaller
    sigmas than above), guidance 4.5, one prompt per rank sampled twice with the group baseline. Paired with full
    backprop on the same two images, along the true gradient and a random direction; the same comparison sees
    truncated backprop's bias (measured with 80 draws: RLR z = 0.83 / 0.32, truncated z = -25)."""
    problem = SD3Problem(tiny_sd3_dir, batch=1, eta=0.7, guidance=4.5)
    full = problem.setup(FullBackprop())
    truth = torch.stack([problem.gradient(full, 10_000 + i, copies=2) for i in range(20)]).mean(0)
    random_direction = torch.randn(
        truth.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    directions = torch.stack([truth / truth.norm(), random_direction / random_direction.norm()], dim=1)
    draws = 60
    reference = torch.stack([problem.gradient(full, draw, copies=2) @ directions for draw in range(draws)])

    def z(estimator, copies: int) -> torch.Tensor:
        problem.setup(estimator)
        d = (
            torch.stack([problem.gradient(estimator, draw, copies) @ directions for draw in range(draws)])
            - reference
        )
        return d.mean(0) / (d.std(0) / draws**0.5)

    rlr = z(
        RLR(h=2, zo_mode="score", baseline="group", group_size=2), copies=1
    )  # it repeats the prompt itself
    assert float(rlr.abs().max()) < 4, rlr
    truncated = z(TruncatedBackprop(k=1), copies=2)
    assert float(truncated[0]) < -6, truncated


@pytest.mark.slow
def test_rlr_fit_on_the_tiny_sd3_through_the_cli(tiny_sd3_dir, tmp_path):
    # The quickstart's DDIM spacing does not apply: SD 3 takes its times from its scheduler's shift.
    fit_and_sample_through_the_cli(
        tiny_sd3_dir,
        tmp_path,
        "StableDiffusion3",
        [
            "--model.num_steps",
            "4",
            "--model.eta",
            "0.7",
            "--model.guidance_scale",
            "2",
            "--model.timestep_spacing",
            "null",
        ],
        ["--steps", "4", "--guidance", "2", "--eta", "0"],
    )


def test_grpo_trains_the_sde_window_of_a_mixed_sde_ode_sampler(tiny_sd3_dir, tmp_path):
    """MixGRPO / Flow-GRPO-Fast: the SDE on the first 2 of 4 steps, the ODE after; GRPO trains the window only
    and moves the LoRA. RLR, which scores the other steps by likelihood ratio, stops naming the setting."""
    import lightning as L

    from rlr_lightning.data import PromptDataModule
    from rlr_lightning.estimators import GRPO
    from rlr_lightning.module import RLRModule
    from rlr_lightning.rewards import TargetColor

    def fit(estimator):
        module = RLRModule(
            str(tiny_sd3_dir),
            estimator=estimator,
            reward=TargetColor(),
            num_steps=4,
            eta=0.7,
            stochastic_steps=(0, 2),
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        )
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, datamodule=PromptDataModule(prompt_set="animals", batch_size=2))
        return module

    module = fit(GRPO(group_size=2, step_range=(0, 2), clip_range=0.2))
    sigma = module.task.sampler.kernel.sigma
    assert bool((sigma[:2] > 0).all()) and bool((sigma[2:] == 0).all())
    assert (
        max(float(p.abs().max()) for n, p in module.backbone.lora_parameters().items() if "lora_B" in n) > 0
    )
    with pytest.raises(ValueError, match="stochastic_steps"):
        fit(RLR(h=1))
