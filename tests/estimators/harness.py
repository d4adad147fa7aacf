"""A toy problem on which estimator means are compared with the exact full-backprop gradient.

Draw ``i`` of every estimator sees the same prompts, initial noise, step noises and parameter perturbations
(the same seeds), so the paired difference ``G_est - G_ref`` has mean zero exactly when the estimator is
unbiased for what the reference computes, with far less variance than either alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlr_lightning.estimators import GradientEstimator, SurrogateTerm, estimate_gradient
from rlr_lightning.estimators.base import perturbations_for
from rlr_lightning.sampling import DDIMSampler, DiffusionSampler, Plan, PromptEmbeds
from tests.toy_denoiser import toy_denoiser_with_lora


def toy_scheduler(timestep_spacing: str = "trailing"):
    """Stable Diffusion's betas and offset, with the given timestep spacing."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing=timestep_spacing,
    )


class ToyProblem:
    """The toy denoiser with LoRA, a batch of random prompt embeddings and a smooth latent reward.

    Args:
        num_steps: ``T``.
        eta: DDIM eta (smaller: smaller sigmas, noisier likelihood ratios).
        guidance_scale: Classifier-free guidance; above 1 the batch gets a shared unconditional embedding.
        timestep_spacing: ``trailing`` keeps sigmas large; ``leading`` (Stable Diffusion's) makes them small.
        batch: Prompts per draw (one rank's batch).
    """

    def __init__(
        self,
        num_steps: int = 6,
        eta: float = 1.0,
        guidance_scale: float = 1.0,
        timestep_spacing: str = "trailing",
        batch: int = 64,
    ) -> None:
        self.num_steps, self.eta = num_steps, eta
        self.sampler = DDIMSampler(
            toy_denoiser_with_lora(seed=0),
            toy_scheduler(timestep_spacing),
            num_steps=num_steps,
            eta=eta,
            guidance_scale=guidance_scale,
        )
        gen = torch.Generator().manual_seed(5)
        cond = torch.randn(batch, 3, 8, generator=gen)
        uncond = torch.randn(1, 3, 8, generator=gen).expand(batch, -1, -1).contiguous()
        self.embeds = PromptEmbeds(cond, uncond if guidance_scale > 1 else None)
        self.prompts = [f"p{i}" for i in range(batch)]
        self.reward_weight = torch.randn(2, 2, 2, generator=gen)
        self.params = self.sampler.trainable_parameters()

    @property
    def num_weights(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def reward(self, latents: Tensor, prompts) -> Tensor:
        return (torch.tanh(latents) * self.reward_weight).flatten(1).sum(1)

    def term_gradients(self, estimator: GradientEstimator, draw: int) -> dict[str, Tensor]:
        """The ascent direction of each term (summed by name) and their ``total``, for draw ``draw``.

        The estimator's running statistics are updated after the draw, as a training step would.
        """
        estimate = estimate_gradient(
            estimator,
            self.sampler,
            self.embeds,
            self.prompts,
            self.reward,
            step_seed=draw,
            rank_seed=10_000 + draw,
        )
        estimator.observe(estimate.rollout, {})
        return {**estimate.terms, "total": estimate.total}

    def gradient(self, estimator: GradientEstimator, draw: int) -> Tensor:
        return self.term_gradients(estimator, draw)["total"]

    def true_gradient_direction(self, reference: GradientEstimator, draws: int = 100) -> Tensor:
        """Unit vector along the mean of ``reference`` (exact per draw) over draws no test uses."""
        reference.setup(self.num_steps, self.eta)
        mean = torch.stack([self.gradient(reference, 1_000_000 + i) for i in range(draws)]).mean(0)
        return mean / mean.norm()


class Pathwise(GradientEstimator):
    """Backpropagate from step ``start`` to the end: the pathwise shares of steps ``start .. T-1``.

    The difference of two of these on the same draw (``start = a`` minus ``start = a + h``) is the exact
    share of the block ``a .. a+h-1``: what RLR's half-order term estimates. With ``perturbation_scale`` every
    step runs at ``RLR(zo_mode="parameter")``'s perturbed points (same seeds, same antithetic pairs).
    """

    def __init__(self, start: int, perturbation_scale: float = 0.0, antithetic: bool = False) -> None:
        super().__init__(baseline="none")
        self.start, self.scale = start, perturbation_scale
        self.antithetic = antithetic and perturbation_scale > 0

    def plan(self, num_steps: int, step_generator: torch.Generator, rank_seed: int) -> Plan:
        perturbations = {}
        if self.scale > 0:
            perturbations = perturbations_for(range(num_steps), rank_seed, self.scale, self.antithetic)
        return Plan(num_steps, windows=((self.start, num_steps),), perturbations=perturbations)

    def terms(self, rollout, sampler, embeds) -> list[SurrogateTerm]:
        return [SurrogateTerm("fo", lambda: -rollout.rewards.mean())]


def z_score(differences: Tensor) -> float:
    """Mean over standard error of paired scalar differences."""
    n = differences.numel()
    return float(differences.mean() / (differences.std() / n**0.5))


def base_kl_gradient(sampler: DDIMSampler, result, beta: float) -> Tensor:
    """The loss gradient of ``beta * sum_rows mean_d (m - m_base)^2 / (2 sigma^2) / B`` over every (step, sample)
    of a rollout, with the base means from an independent copy of the denoiser (every ``lora_B`` at zero): what a
    KL penalty toward the base model must add. Float64, flattened over the sampler's trainable parameters."""
    import copy

    params = list(sampler.trainable_parameters().values())
    base_module = copy.deepcopy(sampler.denoiser.module)
    with torch.no_grad():
        for name, p in base_module.named_parameters():
            if "lora_B" in name:
                p.zero_()
    base = DiffusionSampler(type(sampler.denoiser)(base_module), sampler.kernel, sampler.guidance_scale)
    T, B = result.plan.num_steps, result.batch_size
    k, s = torch.arange(T).repeat_interleave(B), torch.arange(B).repeat(T)
    index, x, x_next = result.trajectory.rows(k, s)
    embeds = result.embeds.rows(k, s)
    with torch.no_grad():
        m_base = base.step(index, x, embeds, prev_latents=x_next).mean
    for p in params:
        p.grad = None
    out = sampler.step(index, x, embeds, prev_latents=x_next)
    kl = ((out.mean - m_base) ** 2 / (2 * out.sigma.reshape(-1, 1, 1, 1) ** 2)).flatten(1).mean(1)
    (beta * kl.sum() / B).backward()
    grad = torch.cat([p.grad.flatten() for p in params]).double()
    for p in params:
        p.grad = None
    return grad
