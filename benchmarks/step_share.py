"""How much of the true reward gradient each DDIM step carries, on the world and the tiny problems: why
truncated backprop is biased.

    python benchmarks/step_share.py [--problems world tiny] [--draws 32] [--model shapes-world]

The exact (full-backprop) gradient of one draw is a sum over the sampling steps, ``g = sum_k g_k``, where
``g_k`` is the gradient through the LoRA weights' use at step ``k`` only. One forward pass in which every step
runs on its own copy of the LoRA weights (a zero offset per step, through the sampler's parameter-perturbation
path) gives every ``g_k`` in one backward. Reported per step: the share ``<g_k, g> / ||g||^2`` (per draw, then
mean and standard error over draws; the shares of one draw sum to 1), and the same share of the mean gradient
(what the expected update is made of). Truncated backprop through the last ``K`` steps computes exactly
``sum_{k >= T-K} g_k`` on the same draw, so its cosine to ``g`` is given for K = 1, 2, 5. Writes
benchmarks/results/step_share.{json,png} and prints markdown tables.
"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass, field

import torch
from common import (
    WORLD_MODEL,
    check_world_model,
    machine,
    markdown_table,
    move_lora_off_init,
    save,
    tiny_module,
    world_module,
    world_prompts,
)
from torch import Tensor

from rlr_lightning.estimators import FullBackprop, derive_seed, estimate_gradient
from rlr_lightning.sampling import Perturbation

logger = logging.getLogger("step_share")
TRUNCATIONS = (1, 2, 5)
TINY_PROMPTS = ["cat", "owl", "fox", "whale", "horse", "frog", "bee", "crab"]


@dataclass(frozen=True)
class _StepCopy(Perturbation):
    """A step's own copy of the LoRA weights: the sampler runs the step at ``theta + offsets`` (offsets are
    zero, so the trajectory is unchanged), and the gradient with respect to the offsets is ``g_k``."""

    offsets: dict = field(default_factory=dict, compare=False, hash=False)

    def noise(self, params):
        return self.offsets


def step_gradients(module, prompts: list[str], draw: int) -> Tensor:
    """``(T, D)`` float64: ``g_k`` of draw ``draw`` for every step, ascent direction of the batch mean reward,
    flattened in the order of ``sampler.trainable_parameters()`` (as the estimators' vectors are).

    The draw's initial latent and noises come from the seed the estimators use for draw ``draw``
    (``diagnostics.gradient_samples``), so ``sum_k g_k`` is full backprop's estimate of that draw.
    """
    sampler = module.sampler
    params = sampler.trainable_parameters()
    embeds = module.conditioning_for(prompts)
    generator = torch.Generator().manual_seed(derive_seed(0, draw, 1))
    x, noises = sampler.initial_noise(len(prompts), generator, embeds.device)
    offsets = [{n: torch.zeros_like(p, requires_grad=True) for n, p in params.items()}
               for _ in range(sampler.num_steps)]
    with torch.enable_grad():
        for k in range(sampler.num_steps):
            copy = _StepCopy(seed=0, scale=1.0, offsets=offsets[k])
            x = sampler.step(k, x, embeds.at(k), noise=noises[k], perturbation=copy).next_latents
        reward = module.latent_reward(x, prompts).float().mean()
        flat = [o[n] for o in offsets for n in params]
        grads = torch.autograd.grad(reward, flat, allow_unused=True)
    rows = []
    for k in range(sampler.num_steps):
        chunk = grads[k * len(params):(k + 1) * len(params)]
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().double()
                               for g, p in zip(chunk, params.values(), strict=True)]))
    return torch.stack(rows)


def check_against_full_backprop(module, prompts: list[str], per_step: Tensor, draw: int) -> float:
    """Relative difference between ``sum_k g_k`` and full backprop's estimate of the same draw; a mismatch
    means the per-step split is wrong, and the run stops rather than report it."""
    full = estimate_gradient(FullBackprop(), module.sampler, module.conditioning_for(prompts), prompts,
                             module.latent_reward, derive_seed(0, draw, 0), derive_seed(0, draw, 1)).total
    error = float((per_step.sum(0) - full).norm() / full.norm().clamp(min=1e-30))
    if error > 1e-3:
        raise RuntimeError(f"sum of per-step gradients differs from full backprop by {error:.2e} (relative)")
    return error


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def _jackknife(statistic, samples: Tensor) -> tuple[Tensor, Tensor]:
    """``statistic(samples)`` and its jackknife standard error over the first dimension (draws)."""
    n = samples.shape[0]
    value = statistic(samples)
    leave_one_out = torch.stack([statistic(torch.cat([samples[:i], samples[i + 1:]])) for i in range(n)])
    se = ((n - 1) / n * (leave_one_out - leave_one_out.mean(0)).pow(2).sum(0)).sqrt()
    return value, se


def summarize(G: Tensor, timesteps: list[int]) -> tuple[list[dict], list[dict]]:
    """Per-step rows and per-truncation rows from ``G``, ``(N, T, D)`` per-step gradients of ``N`` draws."""
    N, T, _ = G.shape
    g = G.sum(1)  # (N, D): each draw's exact gradient
    per_draw = (G * g.unsqueeze(1)).sum(-1) / g.pow(2).sum(-1, keepdim=True)  # (N, T)

    def mean_share(x: Tensor) -> Tensor:
        m_k = x.mean(0)
        m = m_k.sum(0)
        return (m_k @ m) / m.dot(m)

    of_mean, of_mean_se = _jackknife(mean_share, G)
    steps = [dict(step=k, timestep=timesteps[k], share=float(per_draw[:, k].mean()),
                  share_se=float(per_draw[:, k].std() / N**0.5), share_of_mean=float(of_mean[k]),
                  share_of_mean_se=float(of_mean_se[k])) for k in range(T)]
    truncations = []
    for K in TRUNCATIONS:
        if K > T:
            continue
        last = G[:, T - K:].sum(1)  # what truncated backprop computes on each draw
        single = _cos(last, g)
        value, se = _jackknife(lambda x, K=K: _cos(x[:, T - K:].sum(1).mean(0), x.sum(1).mean(0)), G)
        truncations.append(dict(K=K, cosine_of_mean=float(value), cosine_of_mean_se=float(se),
                                single_cosine=float(single.mean()), single_cosine_se=float(single.std() / N**0.5),
                                share=float(per_draw[:, T - K:].sum(1).mean())))
    return steps, truncations


def problem_module(problem: str, model: str, num_steps: int, lora_noise: float):
    if problem == "world":
        module = world_module(FullBackprop(), num_steps, model=model)
        prompts = world_prompts()
    else:
        module = tiny_module(FullBackprop(), num_steps)
        prompts = TINY_PROMPTS
    move_lora_off_init(module, lora_noise)
    return module, prompts


def run_problem(problem: str, args) -> dict:
    module, pool = problem_module(problem, args.model, args.num_steps, args.lora_noise)
    # A fixed batch of distinct prompts, the same for every draw (as estimator_quality.py uses).
    prompts = random.Random(0).sample(pool, args.batch)
    timesteps = [int(t) for t in module.sampler.kernel.timesteps]
    G = []
    for draw in range(args.draws):
        G.append(step_gradients(module, prompts, draw))
        if draw == 0:
            error = check_against_full_backprop(module, prompts, G[0], draw)
            logger.info("%s: sum of per-step gradients matches full backprop (relative difference %.1e)",
                        problem, error)
    steps, truncations = summarize(torch.stack(G), timesteps)
    return dict(problem=problem, prompts=prompts, timesteps=timesteps, steps=steps, truncations=truncations)


def tables(result: dict) -> str:
    step_table = markdown_table(result["steps"], [
        ("step", "step", "d"), ("timestep", "timestep", "d"), ("share", "share per draw", ".3f"),
        ("share_se", "SE", ".3f"), ("share_of_mean", "share of mean gradient", ".3f"),
        ("share_of_mean_se", "SE", ".3f")])
    truncation_table = markdown_table(result["truncations"], [
        ("K", "last K steps", "d"), ("share", "share per draw", ".3f"),
        ("cosine_of_mean", "cosine of mean", ".3f"), ("cosine_of_mean_se", "SE", ".3f"),
        ("single_cosine", "cosine per draw", ".3f"), ("single_cosine_se", "SE", ".3f")])
    return f"### {result['problem']}\n\n{step_table}\n\n{truncation_table}\n"


def plot(results: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        steps = result["steps"]
        x = torch.arange(len(steps)).float()
        ax.bar(x - 0.2, [s["share"] for s in steps], 0.4, yerr=[2 * s["share_se"] for s in steps],
               label="per draw (mean, 2 SE)", color="C0")
        ax.bar(x + 0.2, [s["share_of_mean"] for s in steps], 0.4, yerr=[2 * s["share_of_mean_se"] for s in steps],
               label="of the mean gradient (2 SE)", color="C1")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x.tolist(), [f"{s['step']}\nt={s['timestep']}" for s in steps], fontsize=7)
        ax.set_xlabel("DDIM step (sampling order) and timestep")
        ax.set_ylabel("share of the true gradient")
        cos = {t["K"]: t["cosine_of_mean"] for t in result["truncations"]}
        ax.set_title(f"{result['problem']}: truncated K=1 cosine {cos.get(1, float('nan')):.2f}", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", choices=("world", "tiny"), default=["world", "tiny"])
    parser.add_argument("--model", default=WORLD_MODEL, help="world pipeline: a model name or directory")
    parser.add_argument("--num-steps", type=int, default=10, help="DDIM steps T of both problems")
    parser.add_argument("--draws", type=int, default=32, help="independent draws (noise) per problem")
    parser.add_argument("--batch", type=int, default=4, help="prompts per draw (a fixed set)")
    parser.add_argument("--lora-noise", type=float, default=0.05,
                        help="std of the noise added to the LoRA weights (a mid-training adapter; 0 keeps B = 0)")
    args = parser.parse_args()
    if args.draws < 2:
        parser.error(f"--draws must be >= 2 for standard errors, got {args.draws}")
    if "world" in args.problems:
        check_world_model(parser, args.model)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    results = [run_problem(problem, args) for problem in args.problems]
    text = "\n".join(tables(r) for r in results)
    logger.info("%s", text)
    path = save("step_share", dict(machine=machine(), args=vars(args), results=results, tables=text))
    plot(results, path.with_suffix(".png"))
    logger.info("wrote %s and %s", path, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
