"""Wan 2.1 text-to-video through the model seam, on a tiny Wan built in code and loaded with ``from_pretrained``.

Each piece compared with diffusers' own ``WanPipeline``: the conditioning (UMT5, the encoded negative prompt),
the flow-matching step with guidance, whole sampling, the UniPC scheduler the released checkpoints ship (the
kernel takes its times), frames and resolution checked against the VAE's factors, decoding to videos, LoRA files
in both directions; then the estimators' mean gradient against full backprop on video latents.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from rlr_lightning.estimators import RLR, FullBackprop, TruncatedBackprop, estimate_gradient
from rlr_lightning.models import LoraSettings, WanBackbone, load_backbone
from rlr_lightning.sampling import Plan
from tests.conftest import perturb_lora_
from tests.families import WarningRecords, check_rescoring_reproduces_the_sampling_log_probs

PROMPTS = ["a red square moving right", "two blue circles staying still"]


@pytest.fixture(scope="module")
def pipe(tiny_wan_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def backbone(tiny_wan_dir, lora: bool = True, seed: int = 3, **kwargs) -> WanBackbone:
    bb = load_backbone(tiny_wan_dir, local_files_only=True, **kwargs)
    assert isinstance(bb, WanBackbone)
    if lora:
        # peft draws the A weights from the global generator: seeded, the problem does not depend on test order.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            bb.add_lora(LoraSettings(rank=2, alpha=4.0))
        perturb_lora_(bb.transformer, seed=seed, scale=0.3)
    return bb


def test_load_backbone_picks_wan_and_loads_every_component(tiny_wan_dir):
    bb = backbone(tiny_wan_dir, lora=False)
    for name, (_, class_name) in WanBackbone.component_classes.items():
        if name != "tokenizer":  # AutoTokenizer picks the saved class
            assert type(getattr(bb, name)).__name__ == class_name, name
    assert not any(p.requires_grad for p in bb.parameters())
    # The size the tiny directory records, its latents, and the tiny tokenizer's limit under the pipeline's 512.
    assert (bb.resolution, bb.num_frames) == ((32, 32), 9)
    assert (bb.latent_size, bb.latent_frames) == ((4, 4), 3)
    assert bb.max_sequence_length == 32
    assert bb.video


@pytest.mark.parametrize("negative", [True, False], ids=["with-negative", "no-negative"])
def test_conditioning_equals_the_pipelines_encode_prompt(pipe, tiny_wan_dir, negative):
    bb = backbone(tiny_wan_dir, lora=False)
    ours = bb.encode_prompts(PROMPTS, negative=negative)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(
            PROMPTS, None, do_classifier_free_guidance=negative, max_sequence_length=32, device="cpu"
        )
    torch.testing.assert_close(ours.cond, cond, rtol=0, atol=0)
    assert not ours.added
    if not negative:
        assert ours.uncond is None
        return
    torch.testing.assert_close(ours.uncond, uncond, rtol=0, atol=0)
    # Wan zero-pads each prompt's embedding after its own tokens, and the negative prompt is the encoded "".
    assert ours.uncond[:, 0].abs().amax() > 0 and ours.cond[0, -1].abs().amax() == 0


@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_step_at_noise_level_zero_equals_the_flow_match_scheduler_step(tiny_wan_dir, guidance):
    """Our step against FlowMatchEulerDiscreteScheduler.step fed by transformer calls written as the pipeline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    bb = backbone(tiny_wan_dir)
    embeds = bb.encode_prompts(PROMPTS, negative=guidance > 1)
    sampler = bb.make_sampler(4, eta=0.0, guidance_scale=guidance)
    reference = FlowMatchEulerDiscreteScheduler.from_config(bb.scheduler.config)
    reference.set_timesteps(4)
    torch.testing.assert_close(sampler.kernel.timesteps, reference.timesteps, rtol=0, atol=0)
    x = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for k, t in enumerate(reference.timesteps):
        ours = sampler.step(k, x, embeds)
        with torch.no_grad():  # as WanPipeline does it: two calls, the negative one second
            velocity = bb.transformer(
                hidden_states=x, timestep=t.expand(2), encoder_hidden_states=embeds.cond
            )
            velocity = velocity.sample
            if guidance > 1:
                uncond = bb.transformer(
                    hidden_states=x, timestep=t.expand(2), encoder_hidden_states=embeds.uncond
                ).sample
                velocity = uncond + guidance * (velocity - uncond)
            expected = reference.step(velocity, t, x).prev_sample
        # Without guidance the same call and the same arithmetic: bit for bit. With it, our sampler runs both
        # branches in one batched call, the pipeline in two, and attention rounds differently (1e-6 relative).
        torch.testing.assert_close(ours.next_latents, expected, rtol=0, atol=0 if guidance == 1 else 1e-5)
        assert ours.log_prob is None  # a deterministic step has no log-probability
        x = expected


@pytest.mark.parametrize(
    ("resolution", "num_frames"), [(None, None), ((32, 48), 13)], ids=["default", "32x48-13-frames"]
)
def test_sampling_at_noise_level_zero_equals_the_pipeline_with_guidance(
    pipe, tiny_wan_dir, resolution, num_frames
):
    """The same initial latents: our whole chain ends where WanPipeline's does, at the default size and at a
    non-square one with more frames; the decoded videos agree too."""
    bb = backbone(tiny_wan_dir, lora=False)
    bb.set_resolution(resolution)
    bb.set_num_frames(num_frames)
    (height, width), frames = bb.resolution, bb.num_frames
    sampler = bb.make_sampler(4, eta=0.0, guidance_scale=5.0)
    x0, noises = sampler.initial_noise(2, torch.Generator().manual_seed(1))
    assert x0.shape == (2, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    ours = sampler.run(Plan(4), bb.encode_prompts(PROMPTS), initial_latents=x0, noises=noises).final
    common = dict(
        prompt=PROMPTS,
        num_inference_steps=4,
        guidance_scale=5.0,
        height=height,
        width=width,
        num_frames=frames,
        latents=x0,
        max_sequence_length=32,
    )
    theirs = pipe(**common, output_type="latent").frames
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (ours - x0).abs().mean() > 0.1  # the transformer moved the latents: the comparison is not vacuous
    video = bb.decode(ours)
    assert video.shape == (2, frames, 3, height, width)
    torch.testing.assert_close(video, pipe(**common, output_type="pt").frames, rtol=0, atol=1e-5)


def test_the_checkpointed_decode_recomputes_one_latent_frame_at_a_time_with_the_same_video_and_gradient(
    tiny_wan_dir,
):
    """Decoder checkpointing (the memory plan's, on the first-order path) decodes each latent frame under its own
    checkpoint: the same videos and the same gradient in the latents as diffusers' decode, and backward
    re-runs the decoder once per latent frame (not the whole video at once), at 13 frames (4 latent frames)."""
    bb = backbone(tiny_wan_dir, lora=False)
    bb.set_num_frames(13)
    z = torch.randn(2, 16, 4, *bb.latent_size, generator=torch.Generator().manual_seed(5), requires_grad=True)
    weights = torch.rand(2, 13, 3, *bb.resolution, generator=torch.Generator().manual_seed(6))

    def decode_and_grad(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        bb.set_decoder_checkpointing(checkpointing)
        video = bb.decode(z)
        calls: list[int] = []
        # A pre-hook: the recomputation stops once it has what backward needs, before forward hooks would run.
        hook = bb.vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[2]))
        try:
            (grad,) = torch.autograd.grad((video * weights).sum(), z)
        finally:
            hook.remove()
            bb.set_decoder_checkpointing(False)
        return video.detach(), grad, calls

    video, grad, calls = decode_and_grad(False)
    assert calls == []  # without checkpointing backward runs no decoder forward
    with torch.no_grad():
        torch.testing.assert_close(video, bb.decode(z), rtol=0, atol=0)
    video_ck, grad_ck, calls_ck = decode_and_grad(True)
    assert calls_ck == [1, 1, 1, 1]  # one recomputation per latent frame, each of one latent frame
    torch.testing.assert_close(video_ck, video, rtol=0, atol=0)
    torch.testing.assert_close(grad_ck, grad, rtol=1e-5, atol=1e-6)
    assert grad.abs().mean() > 0  # the comparison is not vacuous


@pytest.mark.parametrize("perturbed", [False, True], ids=["own-weights", "perturbed-weights"])
def test_a_checkpointed_call_checkpoints_the_transformers_blocks_only_at_its_own_weights(
    tiny_wan_dir, perturbed
):
    """A checkpointed denoiser call (the memory plan's activation checkpointing) gives the gradient of the plain
    call. At the module's own weights its recomputation also checkpoints every transformer block (one block's
    activations at a time); at perturbed weights (parameter-mode ZO) it must not, since a block's recomputation
    would run after the functional call, at the unperturbed weights. Checkpointing is off again afterwards."""
    from rlr_lightning.sampling import Perturbation

    bb = backbone(tiny_wan_dir)
    sampler = bb.make_sampler(4, eta=0.7, guidance_scale=5.0)
    x = torch.randn(2, 16, 3, *bb.latent_size, generator=torch.Generator().manual_seed(8))
    step_index = torch.tensor([1, 2])
    embeds = bb.encode_prompts(PROMPTS)
    perturbation = Perturbation(seed=4, scale=0.05) if perturbed else None
    params = list(sampler.trainable_parameters().values())
    seen: list[bool] = []  # at each run of the first block: were the blocks checkpointed?
    hook = bb.transformer.blocks[0].register_forward_pre_hook(
        lambda module, args: seen.append(bool(bb.transformer.gradient_checkpointing))
    )

    def grads(checkpoint: bool) -> list[torch.Tensor]:
        seen.clear()
        out = sampler.model_output(x, step_index, embeds, perturbation, checkpoint=checkpoint)
        return list(torch.autograd.grad(out.square().sum(), params))

    plain = grads(False)
    assert seen and not any(seen)
    checkpointed = grads(True)
    hook.remove()
    # Forward, then the recomputation (and, blockwise, each block's own) in backward.
    assert len(seen) >= 2 and any(seen) != perturbed
    assert not bb.transformer.is_gradient_checkpointing
    for ours, reference in zip(checkpointed, plain, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in plain) > 0


def test_checkpointed_rescoring_checkpoints_the_blocks_with_the_same_log_prob_gradient(tiny_wan_dir):
    """Re-scoring under the plan's activation checkpointing (likelihood-ratio terms: one call, its backward at
    once) runs with the transformer's blocks checkpointed, and its log-probabilities and their gradient are the
    plain call's. At 480p this is what lets Wan's re-scoring fit an 80 GB card."""
    bb = backbone(tiny_wan_dir)
    sampler = bb.make_sampler(4, eta=0.7, guidance_scale=5.0)
    x = torch.randn(2, 16, 3, *bb.latent_size, generator=torch.Generator().manual_seed(9))
    x_next = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(10))
    step_index = torch.tensor([0, 2])
    embeds = bb.encode_prompts(PROMPTS)
    params = list(sampler.trainable_parameters().values())
    seen: list[bool] = []
    hook = bb.transformer.blocks[0].register_forward_pre_hook(
        lambda module, args: seen.append(bool(bb.transformer.gradient_checkpointing))
    )
    results = []
    for checkpoint in (False, True):
        seen.clear()
        log_p = sampler.log_probs(step_index, x, x_next, embeds, checkpoint=checkpoint)
        results.append((log_p.detach(), torch.autograd.grad(log_p.sum(), params)))
        assert any(seen) == checkpoint
    hook.remove()
    (plain, plain_grads), (ours, our_grads) = results
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    for ours_g, plain_g in zip(our_grads, plain_grads, strict=True):
        torch.testing.assert_close(ours_g, plain_g, rtol=1e-5, atol=1e-7)
    assert not bb.transformer.is_gradient_checkpointing


def test_the_released_unipc_scheduler_gives_the_kernel_its_times(tiny_wan_dir):
    """Wan 2.1's checkpoints ship UniPC with flow sigmas at shift 3 (480p): the kernel samples at its sigmas and
    calls the transformer with its integer timesteps, and a directory shipping it loads."""
    from diffusers import UniPCMultistepScheduler

    bb = backbone(tiny_wan_dir, lora=False)
    bb.scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    kernel = bb.make_sampler(6, eta=0.7, guidance_scale=5.0).kernel
    reference = UniPCMultistepScheduler.from_config(bb.scheduler.config)
    reference.set_timesteps(6)
    torch.testing.assert_close(kernel.timesteps, reference.timesteps.float(), rtol=0, atol=0)
    # UniPC nudges its first sigma 1e-6 below 1 (for its logarithms); the Euler kernel has no logarithm.
    torch.testing.assert_close(kernel.times, reference.sigmas.float(), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="must use flow sigmas"):
        WanBackbone(**{**bb_components(bb), "scheduler": UniPCMultistepScheduler()})


def bb_components(bb: WanBackbone) -> dict:
    return {name: getattr(bb, name) for name in WanBackbone.components()}


def test_a_pipeline_saved_with_unipc_loads_with_it(tiny_wan_dir, tmp_path):
    import shutil

    from diffusers import UniPCMultistepScheduler

    directory = tmp_path / "wan-unipc"
    shutil.copytree(tiny_wan_dir, directory)
    shutil.rmtree(directory / "scheduler")
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    ).save_pretrained(directory / "scheduler")
    index = (directory / "model_index.json").read_text()
    (directory / "model_index.json").write_text(
        index.replace("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")
    )
    bb = load_backbone(directory, local_files_only=True)
    assert type(bb.scheduler).__name__ == "UniPCMultistepScheduler"
    assert bb.scheduler.config.flow_shift == 3.0


def test_frames_and_resolution_are_checked_against_the_vae_and_patches(tiny_wan_dir):
    bb = backbone(tiny_wan_dir, lora=False)
    for bad, hint in ((8, "e.g. 9"), (10, "e.g. 9"), (0, "")):
        with pytest.raises(
            ValueError, match=f"num_frames must be a multiple of the VAE's temporal factor 4 plus one.*{hint}"
        ):
            bb.set_num_frames(bad)
    with pytest.raises(ValueError, match="resolution 40x32 is not a positive multiple of 16x16.*e.g. 32x32"):
        bb.set_resolution((40, 32))
    bb.set_num_frames(17)
    bb.set_resolution((48, 64))
    assert (bb.latent_frames, bb.latent_size) == (5, (6, 8))


def test_timestep_spacing_is_refused_with_the_reason(tiny_wan_dir):
    bb = backbone(tiny_wan_dir, lora=False)
    with pytest.raises(ValueError, match="timestep_spacing='trailing' is a DDIM option; Wan"):
        bb.make_sampler(4, eta=0.7, timestep_spacing="trailing")


def test_rescoring_stacked_rows_reproduces_the_sampling_log_probs(tiny_wan_dir):
    bb = backbone(tiny_wan_dir)
    check_rescoring_reproduces_the_sampling_log_probs(
        bb, bb.make_sampler(4, eta=1.0, guidance_scale=2.0), True
    )


def test_lora_exports_to_the_wan_pipeline_without_key_warnings_and_round_trips(tiny_wan_dir, tmp_path):
    from diffusers import WanPipeline

    ours = backbone(tiny_wan_dir)
    path = ours.export_lora(tmp_path / "lora")
    embeds = ours.encode_prompts(PROMPTS, negative=False)
    x = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([500.0, 500.0])

    def transformer_out(transformer):
        with torch.no_grad():
            return transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds.cond).sample

    ours_adapted = {
        n.rsplit(".lora_A", 1)[0] for n, _ in ours.transformer.named_parameters() if ".lora_A." in n
    }
    # Self- and cross-attention of both blocks, every projection the default targets name.
    assert {name.split(".", 2)[2] for name in ours_adapted} == {
        f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
    }

    fresh = load_backbone(tiny_wan_dir, local_files_only=True)
    settings = fresh.load_lora(path)
    assert (settings.rank, settings.alpha) == (2, 4.0)
    assert torch.equal(transformer_out(fresh.transformer), transformer_out(ours.transformer))

    theirs = WanPipeline.from_pretrained(tiny_wan_dir, local_files_only=True)
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
    assert not [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()], messages
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


#: Paired draws per estimator in the mean-gradient tests.
DRAWS = 50


class WanProblem:
    """The tiny Wan in float64 with LoRA off its initialisation, guidance on, the flow SDE at noise level 1 over
    T = 4 steps of 9-frame video latents, and a smooth reward of the final latent (every latent frame weighted)."""

    T, eta, guidance = 4, 1.0, 2.0

    def __init__(
        self, tiny_wan_dir, batch: int = 4, eta: float | None = None, guidance: float | None = None
    ) -> None:
        self.eta = self.eta if eta is None else eta
        self.guidance = self.guidance if guidance is None else guidance
        bb = backbone(tiny_wan_dir, dtype=torch.float64)
        bb.transformer.to(torch.float64)  # the LoRA weights too (kept in float32 for training otherwise)
        self.prompts = [f"prompt number {i}" for i in range(batch)]
        self.embeds = bb.encode_prompts(self.prompts)
        self.sampler = bb.make_sampler(self.T, self.eta, self.guidance)
        self.weight = torch.randn(
            16, 3, 4, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64
        )

    def reward(self, latents, _prompts):
        return (torch.tanh(latents) * self.weight).flatten(1).mean(1)

    def gradient(self, estimator, draw: int, copies: int = 1) -> torch.Tensor:
        """One draw; ``copies`` samples every prompt that many times (a group estimator's layout)."""
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
def wan_problem(tiny_wan_dir):
    """The problem, the true-gradient direction (full backprop's mean over draws no test uses), a random
    direction, and full backprop's gradient on each test draw projected on both."""
    problem = WanProblem(tiny_wan_dir)
    full = problem.setup(FullBackprop())
    direction = torch.stack([problem.gradient(full, 10_000 + i) for i in range(20)]).mean(0)
    direction /= direction.norm()
    random_direction = torch.randn(
        direction.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    directions = torch.stack([direction, random_direction / random_direction.norm()], dim=1)
    reference = torch.stack([problem.gradient(full, draw) @ directions for draw in range(DRAWS)])
    return problem, directions, reference


def paired_z(wan_problem, estimator) -> tuple[float, float]:
    problem, directions, reference = wan_problem
    problem.setup(estimator)
    differences = (
        torch.stack([problem.gradient(estimator, draw) @ directions for draw in range(DRAWS)]) - reference
    )
    z = differences.mean(0) / (differences.std(0) / DRAWS**0.5)
    return float(z[0]), float(z[1])


@pytest.mark.slow
def test_rlr_mean_gradient_matches_full_backprop_on_video_latents(wan_problem):
    """Paired draws: RLR minus full backprop has mean zero along the true gradient and a random direction."""
    along, across = paired_z(wan_problem, RLR(h=2, zo_mode="score"))
    assert abs(along) < 4 and abs(across) < 4, (along, across)


@pytest.mark.slow
def test_the_same_comparison_detects_truncated_backprop_on_video_latents(wan_problem):
    """The test above has power: truncated backprop keeping the last step falls short along the true gradient."""
    along, _ = paired_z(wan_problem, TruncatedBackprop(k=1))
    assert along < -6, along


@pytest.mark.slow
def test_rlr_with_a_group_baseline_at_the_recipes_settings_matches_full_backprop(tiny_wan_dir):
    """configs/wan21_1p3b_rlr.yaml's sampler and batch on tiny-wan: noise level 0.7 (smaller sigmas than
    above), guidance 5, one prompt per rank sampled twice with the group baseline. Paired with full backprop on
    the same two videos, along the true gradient and a random direction; the same comparison sees truncated
    backprop's bias."""
    problem = WanProblem(tiny_wan_dir, batch=1, eta=0.7, guidance=5.0)
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
