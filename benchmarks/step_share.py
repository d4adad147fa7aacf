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

    python benchmarks/step_share.py --score-variance --problems world --draws 96

measures instead where the score function's variance comes from: on the draws the estimators use
(``estimator_quality.py``'s draw ``i``), the score function's estimate (leave-one-out baseline) is the sum of
one likelihood-ratio term per step, ``A . grad log p(s_{k+1} | s_k)``; reported per step are ``sigma_k``, the
total variance ``tr Cov`` of its term over the draws (with the standard error of that variance) and its share
of the variance of the whole estimate (with a jackknife standard error). Writes
benchmarks/results/step_share_score_variance.json.
"""

from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import (
    RESULTS,
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

from rlr_lightning.estimators import (
    FullBackprop,
    ScoreFunction,
    derive_seed,
    estimate_gradient,
    flat_grad,
    rollout,
)
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
    sampler = module.task.sampler
    params = sampler.trainable_parameters()
    embeds = module.task.conditioning_for(prompts)
    generator = torch.Generator().manual_seed(derive_seed(0, draw, 1))
    x, noises = sampler.initial_noise(len(prompts), generator, embeds.device)
    offsets = [
        {n: torch.zeros_like(p, requires_grad=True) for n, p in params.items()}
        for _ in range(sampler.num_steps)
    ]
    with torch.enable_grad():
        for k in range(sampler.num_steps):
            copy = _StepCopy(seed=0, scale=1.0, offsets=offsets[k])
            x = sampler.step(k, x, embeds.at(k), noise=noises[k], perturbation=copy).next_latents
        reward = module.task.latent_reward(x, prompts).float().mean()
        flat = [o[n] for o in offsets for n in params]
        grads = torch.autograd.grad(reward, flat, allow_unused=True)
    rows = []
    for k in range(sampler.num_steps):
        chunk = grads[k * len(params) : (k + 1) * len(params)]
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).flatten().double()
                    for g, p in zip(chunk, params.values(), strict=True)
                ]
            )
        )
    return torch.stack(rows)


def check_against_full_backprop(module, prompts: list[str], per_step: Tensor, draw: int) -> float:
    """Relative difference between ``sum_k g_k`` and full backprop's estimate of the same draw; a mismatch
    means the per-step split is wrong, and the run stops rather than report it."""
    full = estimate_gradient(
        FullBackprop(),
        module.task.sampler,
        module.task.conditioning_for(prompts),
        prompts,
        module.task.latent_reward,
        derive_seed(0, draw, 0),
        derive_seed(0, draw, 1),
    ).total
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
    leave_one_out = torch.stack([statistic(torch.cat([samples[:i], samples[i + 1 :]])) for i in range(n)])
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
    steps = [
        dict(
            step=k,
            timestep=timesteps[k],
            share=float(per_draw[:, k].mean()),
            share_se=float(per_draw[:, k].std() / N**0.5),
            share_of_mean=float(of_mean[k]),
            share_of_mean_se=float(of_mean_se[k]),
        )
        for k in range(T)
    ]
    truncations = []
    for K in TRUNCATIONS:
        if K > T:
            continue
        last = G[:, T - K :].sum(1)  # what truncated backprop computes on each draw
        single = _cos(last, g)
        value, se = _jackknife(lambda x, K=K: _cos(x[:, T - K :].sum(1).mean(0), x.sum(1).mean(0)), G)
        truncations.append(
            dict(
                K=K,
                cosine_of_mean=float(value),
                cosine_of_mean_se=float(se),
                single_cosine=float(single.mean()),
                single_cosine_se=float(single.std() / N**0.5),
                share=float(per_draw[:, T - K :].sum(1).mean()),
            )
        )
    return steps, truncations


def score_step_terms(module, prompts: list[str], draw: int) -> Tensor:
    """``(T, D)`` float64: the score function's likelihood-ratio term of every step on draw ``draw`` (the seeds
    of ``diagnostics.gradient_samples``' draw, so the same noise as the estimators' draw), ascent direction;
    their sum is ``ScoreFunction()``'s estimate of that draw (leave-one-out baseline over the batch)."""
    estimator = ScoreFunction()
    module.task.prepare(estimator)
    sampler = module.task.sampler
    params = list(sampler.trainable_parameters().values())
    saved = [p.grad for p in params]
    embeds = module.task.conditioning_for(prompts)
    result = rollout(
        estimator,
        sampler,
        embeds,
        prompts,
        module.task.latent_reward,
        derive_seed(0, draw, 0),
        derive_seed(0, draw, 1),
        memory=module.task.memory_plan,
    )
    rows = []
    try:
        for k in range(sampler.num_steps):
            total = None
            for term in estimator.score_terms(result, sampler, result.embeds, [k], 1.0, "zo"):
                for p in params:
                    p.grad = None
                term.loss().backward()
                share = -flat_grad(params).double()  # losses are negated objectives
                total = share if total is None else total + share
            rows.append(total)
    finally:
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad
    return torch.stack(rows)


def check_score_terms(module, prompts: list[str], per_step: Tensor, draw: int) -> float:
    """Relative difference between the sum of the per-step terms and ``ScoreFunction()``'s estimate of the same
    draw; a mismatch stops the run."""
    estimator = ScoreFunction()
    module.task.prepare(estimator)
    whole = estimate_gradient(
        estimator,
        module.task.sampler,
        module.task.conditioning_for(prompts),
        prompts,
        module.task.latent_reward,
        derive_seed(0, draw, 0),
        derive_seed(0, draw, 1),
        memory=module.task.memory_plan,
    ).total
    error = float((per_step.sum(0) - whole).norm() / whole.norm().clamp(min=1e-30))
    if error > 1e-3:
        raise RuntimeError(
            f"sum of per-step score terms differs from the score function by {error:.2e} (relative)"
        )
    return error


def _total_variance(x: Tensor) -> Tensor:
    """``tr Cov`` over the first dimension (draws), per remaining leading index: ``(N, ..., D) -> (...)``."""
    return (x - x.mean(0)).pow(2).sum(-1).sum(0) / (x.shape[0] - 1)


def summarize_score_variance(S: Tensor, timesteps: list[int], sigmas: list[float]) -> tuple[list[dict], dict]:
    """Per-step rows and the whole estimate's variance from ``S``, ``(N, T, D)`` per-step score terms."""
    N, T, _ = S.shape
    per_step = _total_variance(S)  # (T,)
    total = float(_total_variance(S.sum(1)))
    # Standard error of a total variance: spread of the per-draw squared deviations (loose for heavy tails).
    squares = (S - S.mean(0)).pow(2).sum(-1)  # (N, T)
    _, share_se = _jackknife(lambda x: _total_variance(x) / _total_variance(x.sum(1)), S)
    rows = [
        dict(
            step=k,
            timestep=timesteps[k],
            sigma=sigmas[k],
            variance=float(per_step[k]),
            variance_se=float(squares[:, k].std() / N**0.5),
            share=float(per_step[k]) / total,
            share_se=float(share_se[k]),
            share_of_sum=float(per_step[k] / per_step.sum()),
        )
        for k in range(T)
    ]
    whole = (S.sum(1) - S.sum(1).mean(0)).pow(2).sum(-1)
    return rows, dict(
        total_variance=total,
        total_variance_se=float(whole.std() / N**0.5),
        sum_of_step_variances=float(per_step.sum()),
    )


def run_score_variance(problem: str, args) -> dict:
    module, prompts, timesteps, S = collect_draws(
        problem,
        args,
        score_step_terms,
        check_score_terms,
        "sum of per-step score terms matches the score function",
    )
    sigmas = [float(v) for v in module.task.sampler.kernel.sigma]
    steps, whole = summarize_score_variance(S, timesteps, sigmas)
    return dict(problem=problem, prompts=prompts, timesteps=timesteps, steps=steps, **whole)


def score_variance_table(result: dict) -> str:
    table = markdown_table(
        result["steps"],
        [
            ("step", "step", "d"),
            ("timestep", "timestep", "d"),
            ("sigma", "sigma", ".3f"),
            ("variance", "variance of its term", ".3g"),
            ("variance_se", "SE", ".2g"),
            ("share", "share of the estimate's variance", ".3f"),
            ("share_se", "SE", ".3f"),
        ],
    )
    return (
        f"### {result['problem']}: the score function's variance by step\n\n{table}\n\nwhole estimate: "
        f"{result['total_variance']:.4g} (SE {result['total_variance_se']:.2g}); sum of the steps' "
        f"{result['sum_of_step_variances']:.4g}\n"
    )


def problem_module(problem: str, model: str, num_steps: int, lora_noise: float):
    if problem == "world":
        module = world_module(FullBackprop(), num_steps, model=model)
        prompts = world_prompts()
    else:
        module = tiny_module(FullBackprop(), num_steps)
        prompts = TINY_PROMPTS
    move_lora_off_init(module, lora_noise)
    return module, prompts


def collect_draws(problem: str, args, measure, check, checked: str):
    """``measure(module, prompts, draw)`` stacked over ``args.draws`` draws; the first draw is ``check``-ed."""
    module, pool = problem_module(problem, args.model, args.num_steps, args.lora_noise)
    # A fixed batch of distinct prompts, the same for every draw (as estimator_quality.py uses).
    prompts = random.Random(0).sample(pool, args.batch)
    timesteps = [int(t) for t in module.task.sampler.kernel.timesteps]
    values = []
    for draw in range(args.draws):
        values.append(measure(module, prompts, draw))
        if draw == 0:
            error = check(module, prompts, values[0], draw)
            logger.info("%s: %s (relative difference %.1e)", problem, checked, error)
    return module, prompts, timesteps, torch.stack(values)


def run_problem(problem: str, args) -> dict:
    _, prompts, timesteps, G = collect_draws(
        problem,
        args,
        step_gradients,
        check_against_full_backprop,
        "sum of per-step gradients matches full backprop",
    )
    steps, truncations = summarize(G, timesteps)
    return dict(problem=problem, prompts=prompts, timesteps=timesteps, steps=steps, truncations=truncations)


def tables(result: dict) -> str:
    step_table = markdown_table(
        result["steps"],
        [
            ("step", "step", "d"),
            ("timestep", "timestep", "d"),
            ("share", "share per draw", ".3f"),
            ("share_se", "SE", ".3f"),
            ("share_of_mean", "share of mean gradient", ".3f"),
            ("share_of_mean_se", "SE", ".3f"),
        ],
    )
    truncation_table = markdown_table(
        result["truncations"],
        [
            ("K", "last K steps", "d"),
            ("share", "share per draw", ".3f"),
            ("cosine_of_mean", "cosine of mean", ".3f"),
            ("cosine_of_mean_se", "SE", ".3f"),
            ("single_cosine", "cosine per draw", ".3f"),
            ("single_cosine_se", "SE", ".3f"),
        ],
    )
    return f"### {result['problem']}\n\n{step_table}\n\n{truncation_table}\n"


def plot(results: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        steps = result["steps"]
        x = torch.arange(len(steps)).float()
        ax.bar(
            x - 0.2,
            [s["share"] for s in steps],
            0.4,
            yerr=[2 * s["share_se"] for s in steps],
            label="per draw (mean, 2 SE)",
            color="C0",
        )
        ax.bar(
            x + 0.2,
            [s["share_of_mean"] for s in steps],
            0.4,
            yerr=[2 * s["share_of_mean_se"] for s in steps],
            label="of the mean gradient (2 SE)",
            color="C1",
        )
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problems", nargs="+", choices=("world", "tiny"), default=["world", "tiny"])
    parser.add_argument("--model", default=WORLD_MODEL, help="world pipeline: a model name or directory")
    parser.add_argument("--num-steps", type=int, default=10, help="DDIM steps T of both problems")
    parser.add_argument("--draws", type=int, default=32, help="independent draws (noise) per problem")
    parser.add_argument("--batch", type=int, default=4, help="prompts per draw (a fixed set)")
    parser.add_argument(
        "--lora-noise",
        type=float,
        default=0.05,
        help="std of the noise added to the LoRA weights (a mid-training adapter; 0 keeps B = 0)",
    )
    parser.add_argument(
        "--score-variance",
        action="store_true",
        help="measure the variance of the score function's per-step terms instead of the shares "
        "(writes step_share_score_variance.json)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS,
        help="where the results are written (default: %(default)s)",
    )
    args = parser.parse_args()
    if args.draws < 2:
        parser.error(f"--draws must be >= 2 for standard errors, got {args.draws}")
    if "world" in args.problems:
        check_world_model(parser, args.model)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    record = {k: v for k, v in vars(args).items() if k != "results_dir"}
    if args.score_variance:
        results = [run_score_variance(problem, args) for problem in args.problems]
        text = "\n".join(score_variance_table(r) for r in results)
        logger.info("%s", text)
        path = save(
            "step_share_score_variance",
            dict(machine=machine(), args=record, results=results, tables=text),
            args.results_dir,
        )
        logger.info("wrote %s", path)
        return
    results = [run_problem(problem, args) for problem in args.problems]
    text = "\n".join(tables(r) for r in results)
    logger.info("%s", text)
    path = save(
        "step_share", dict(machine=machine(), args=record, results=results, tables=text), args.results_dir
    )
    plot(results, path.with_suffix(".png"))
    logger.info("wrote %s and %s", path, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
