"""Where the gradient noise lives: a per-step variance map of the user's own model, reward and sampler.

Every draw samples one trajectory with its whole graph and splits the exact gradient into per-step pathwise
shares ``g_k`` (the part that flows through step ``k``'s network call; they add up to full backprop), and
computes each step's likelihood-ratio term ``A_k grad log p(s_{k+1} | s_k)`` under every step baseline
(``rlr_lightning.estimators.baselines``; the batch baseline is leave-one-out). Over the draws this gives, per
step: its sigma, its share of the true gradient, the variance of its pathwise share and of its likelihood-ratio
term under each baseline. Estimators that combine per-step terms (full backprop, truncated backprop, the score
function, an exact tail with likelihood ratios before it) are composed draw by draw, so their variances include
every covariance between steps. The recommendation (:func:`recommend`): the exact tail covers the final steps
whose likelihood ratio is an outlier against the steps before it, and every other step takes the baseline that
measured least variance (a costlier one only when it saves at least 10% and two standard errors of the paired
difference).

Draw ``i`` uses the seeds of :func:`rlr_lightning.diagnostics.gradient_samples`' draw ``i``, so a measured
estimator pairs with the map's draws. Gradients are compressed by a seeded count sketch to at most
``sketch_dim`` coordinates when there are more LoRA weights: inner products, norms and variances are preserved
in expectation (exact when the LoRA is smaller).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import Tensor

from rlr_lightning.estimators import derive_seed
from rlr_lightning.estimators.base import GradientEstimator, compute_advantages
from rlr_lightning.estimators.baselines import (
    STEP_BASELINES,
    PromptRewardMeans,
    prompt_keys,
    step_baseline_values,
)
from rlr_lightning.sampling import Plan
from rlr_lightning.task import Task, as_task

logger = logging.getLogger(__name__)

#: Relative cost order of the step baselines: a costlier one is recommended only when it saves ``MIN_SAVING``.
COST_ORDER = {name: i for i, name in enumerate(STEP_BASELINES)}
MIN_SAVING = 0.10
#: A final step joins the exact tail when its best likelihood-ratio variance exceeds this many times the median
#: of the steps before it: a sharp transition whose likelihood ratio would dominate the estimate.
TAIL_OUTLIER = 4.0


class CountSketch:
    """A seeded linear map of ``D`` coordinates to ``m`` buckets with random signs: ``E[<Sx, Sy>] = <x, y>``.

    The identity when ``D <= m``.
    """

    def __init__(self, dim: int, sketch_dim: int, seed: int = 0) -> None:
        self.dim, self.out_dim = dim, min(dim, sketch_dim)
        if dim > sketch_dim:
            gen = torch.Generator().manual_seed(seed)
            self.bucket: Tensor | None = torch.randint(sketch_dim, (dim,), generator=gen)
            self.sign = torch.randint(2, (dim,), generator=gen).double() * 2 - 1
        else:
            self.bucket = None

    def __call__(self, x: Tensor) -> Tensor:
        x = x.detach().double().cpu()
        if self.bucket is None:
            return x
        return torch.zeros(self.out_dim, dtype=torch.float64).index_add_(0, self.bucket, x * self.sign)


@dataclass
class StepRow:
    """One step of the map.

    Attributes:
        step: Step index in sampling order.
        sigma: The transition's sigma.
        share: The step's pathwise share of the true gradient, projected on it (the shares add up to 1).
        share_se: Its standard error over the draws.
        pathwise_variance: Total variance of the step's pathwise share.
        lr_variance: Total variance of the step's likelihood-ratio term under each step baseline (``None`` for a
            deterministic step, which has none).
        best: The step baseline the recommendation picks for this step.
    """

    step: int
    sigma: float
    share: float
    share_se: float
    pathwise_variance: float
    lr_variance: dict[str, float] | None
    best: str | None


@dataclass
class VarianceMap:
    """The per-step map, the composed estimators and the recommendation.

    Attributes:
        num_samples: Draws ``N``.
        batch: Images per draw.
        steps: One :class:`StepRow` per step.
        estimators: Name to ``variance`` (total variance of one estimate), ``bias_sq`` (squared norm of its mean
            minus full backprop's: 0 for the unbiased ones up to noise) and ``mse`` (``variance + bias_sq``).
        tail: The recommended exact tail ``K``.
        step_baseline: The recommended step baseline of every step (``none`` inside the tail).
        baselines: The step baselines measured.
    """

    num_samples: int
    batch: int
    steps: list[StepRow]
    estimators: dict[str, dict[str, float]]
    tail: int
    step_baseline: list[str]
    baselines: list[str] = field(default_factory=list)

    @property
    def recommended(self) -> str:
        return composed_name(self.tail, "recommended")

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The per-step map and the estimators, as markdown."""
        head = (
            ["step", "sigma", "share of gradient", "pathwise var"]
            + [f"LR var, {b}" for b in self.baselines]
            + ["best"]
        )
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.steps:
            lr = [(f"{row.lr_variance[b]:.3g}" if row.lr_variance else "-") for b in self.baselines]
            cells = [
                str(row.step),
                f"{row.sigma:.3g}",
                f"{row.share:.3f} ± {row.share_se:.3f}",
                f"{row.pathwise_variance:.3g}",
                *lr,
                row.best or "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        full = self.estimators["full backprop"]["variance"]
        lines += [
            "",
            "| estimator | total variance | x full backprop | squared bias | MSE |",
            "|---|---|---|---|---|",
        ]
        for name, v in self.estimators.items():
            lines.append(
                f"| {name} | {v['variance']:.3g} | {v['variance'] / full:.3g} | {v['bias_sq']:.3g} | "
                f"{v['mse']:.3g} |"
            )
        return "\n".join(lines)

    def recommendation(self) -> str:
        """The recommended settings of ``RLR`` (and ``ScoreFunction``'s step baselines), as config lines."""
        names = ", ".join(self.step_baseline)
        return f"tail: {self.tail}\nstep_baseline: [{names}]"


def composed_name(tail: int, schedule: str) -> str:
    return f"exact tail K={tail} + likelihood ratios ({schedule} baselines)"


def _draw(
    task: Task,
    prompts: list[str],
    seed: int,
    draw: int,
    baselines: Sequence[str],
    sketch: CountSketch,
    prompt_means: PromptRewardMeans,
    reward_mean: float | None,
):
    """One draw: sketched per-step pathwise shares ``(T, m)`` and likelihood-ratio terms per baseline, and the
    rewards."""
    sampler, reward_fn = task.sampler, task.latent_reward
    embeds = task.conditioning_for(prompts)
    params = list(sampler.trainable_parameters().values())
    T, B = sampler.num_steps, len(prompts)
    device = embeds.device
    checkpoint = task.memory_plan.activation_checkpointing
    x0, noises = sampler.initial_noise(B, torch.Generator().manual_seed(derive_seed(seed, draw, 1)), device)
    plan = Plan(T, windows=((0, T),), predictions=tuple(range(T)))
    with torch.enable_grad():
        trajectory = sampler.run(plan, embeds, initial_latents=x0, noises=noises, checkpoint=checkpoint)
        rewards = reward_fn(trajectory.final, prompts).float()
        means = [trajectory.window_means[k] for k in range(T)]
        adjoints = torch.autograd.grad(rewards.sum() / B, means)
    # The sampling graph is no longer needed: free it before the per-step passes.
    trajectory.window_means, trajectory.window_log_probs, trajectory.final = {}, {}, trajectory.final.detach()
    del means
    r = rewards.detach()
    values = {}
    for kind in baselines:
        if kind == "none":
            values[kind] = {k: torch.zeros_like(r) for k in range(T)}
        else:
            means_b = (
                prompt_means.lookup(prompt_keys(prompts), reward_mean) if kind == "prompt_mean" else None
            )
            values[kind] = step_baseline_values(
                {k: kind for k in range(T)},
                trajectory,
                sampler,
                embeds,
                prompts,
                reward_fn,
                task.memory_plan.chunk_samples or B,
                means_b,
            )
    advantages = {
        kind: [
            compute_advantages(
                r - values[kind][k].to(r.device), r - values[kind][k].to(r.device), "leave_one_out"
            )
            for k in range(T)
        ]
        for kind in baselines
    }
    lr: dict[str, list[Tensor | None]]
    pathwise, lr = [], {kind: [] for kind in baselines}
    stochastic = (sampler.kernel.sigma > 0).tolist()
    for k in range(T):
        # One network call at step k from the detached latent s_k gives both the step's pathwise share (its mean
        # against the reward's adjoint) and its likelihood-ratio term under every baseline (its log-probability).
        with torch.enable_grad():
            index = torch.full((B,), k, dtype=torch.long, device=device)
            out = sampler.step(
                index,
                trajectory.latents[k],
                embeds.at(k),
                prev_latents=trajectory.latents[k + 1] if stochastic[k] else None,
                checkpoint=checkpoint,
            )
            objectives = [(adjoints[k].to(out.mean.dtype) * out.mean).sum()]
            if stochastic[k]:
                assert out.log_prob is not None  # a stochastic step has one
                objectives += [(advantages[kind][k] * out.log_prob).sum() / B for kind in baselines]
            grads = _vector_jacobian(torch.stack(objectives), params)
        pathwise.append(sketch(grads[0]))
        for i, kind in enumerate(baselines):
            lr[kind].append(sketch(grads[1 + i]) if stochastic[k] else None)
    return torch.stack(pathwise), lr, r.cpu()


def _vector_jacobian(objectives: Tensor, params: list[Tensor]) -> list[Tensor]:
    """The flat gradient of each entry of ``objectives`` with respect to ``params``: one batched backward."""
    rows = objectives.numel()
    try:
        grads = torch.autograd.grad(
            objectives,
            params,
            grad_outputs=torch.eye(rows, dtype=objectives.dtype, device=objectives.device),
            is_grads_batched=True,
            allow_unused=True,
        )
        return [_flat([g[i] if g is not None else None for g in grads], params) for i in range(rows)]
    except RuntimeError:
        # An operation without a batching rule: one backward per objective instead.
        return [
            _flat(
                torch.autograd.grad(objectives[i], params, retain_graph=i < rows - 1, allow_unused=True),
                params,
            )
            for i in range(rows)
        ]


def _flat(grads, params) -> Tensor:
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).detach().flatten() for g, p in zip(grads, params)]
    )


def _variance(x: Tensor) -> float:
    """Total variance ``tr Cov`` of the rows of ``x``."""
    return float(x.var(0).sum())


def variance_map(
    task: Task | Any,
    prompts: Sequence[str],
    num_samples: int = 32,
    seed: int = 0,
    baselines: Sequence[str] = STEP_BASELINES,
    sketch_dim: int = 8192,
    estimator: GradientEstimator | None = None,
) -> VarianceMap:
    """Measure the per-step variance map of ``task`` on a fixed batch of prompts.

    Args:
        task: The :class:`~rlr_lightning.task.Task` (model, reward, sampler and memory plan), or an
            ``RLRModule`` whose model is loaded (its task and estimator).
        prompts: The prompts of every draw (one image each).
        num_samples: Draws ``N`` (a few dozen: likelihood-ratio variances are heavy-tailed, so fewer understate
            them).
        seed: Seed of the draws (``gradient_samples``' draws of the same seed share their noise).
        baselines: The step baselines to measure (``none`` is always measured: the reference).
        sketch_dim: Largest number of coordinates kept per gradient (count sketch above it).
        estimator: The estimator whose block length bounds the recommended tail (default: the module's).
    """
    estimator = estimator if estimator is not None else getattr(task, "estimator", None)
    task = as_task(task)
    check_task(task)
    prompts = list(prompts)
    if num_samples < 4:
        raise ValueError(f"a variance map needs at least 4 draws (a few dozen are better), got {num_samples}")
    if len(prompts) < 2:
        raise ValueError(f"the leave-one-out baseline needs at least 2 prompts per draw, got {len(prompts)}")
    baselines = ["none"] + [b for b in baselines if b != "none"]
    unknown = [b for b in baselines if b not in STEP_BASELINES]
    if unknown:
        raise ValueError(f"unknown step baselines {unknown}; choose from {', '.join(STEP_BASELINES)}")
    sampler = task.sampler
    T = sampler.num_steps
    sigmas = [float(s) for s in sampler.kernel.sigma]
    dim = sum(p.numel() for p in sampler.trainable_parameters().values())
    sketch = CountSketch(dim, sketch_dim, seed)
    prompt_means = PromptRewardMeans()
    reward_mean: float | None = None
    lrs: dict[str, list[list[Tensor | None]]]  # per baseline, per draw, per step (None: a deterministic step)
    paths, lrs = [], {b: [] for b in baselines}
    keys = prompt_keys(prompts)
    for i in range(num_samples):
        path, lr, r = _draw(task, prompts, seed, i, baselines, sketch, prompt_means, reward_mean)
        paths.append(path)
        for b in baselines:
            lrs[b].append(lr[b])
        # Earlier draws only: the prompt-mean baseline of draw i reads draws 0 .. i-1.
        prompt_means.update(keys, r)
        reward_mean = float(r.mean()) if reward_mean is None else 0.9 * reward_mean + 0.1 * float(r.mean())
        if (i + 1) % max(1, num_samples // 4) == 0 or i + 1 == num_samples:
            logger.info("variance map: %d of %d draws done", i + 1, num_samples)
    path = torch.stack(paths)  # (N, T, m)
    stochastic = [s > 0 for s in sigmas]
    # Every draw has a term (not None) at a stochastic step.
    lr = {
        b: {k: torch.stack(cast("list[Tensor]", [d[k] for d in lrs[b]])) for k in range(T) if stochastic[k]}
        for b in baselines
    }
    full = path.sum(1)
    truth = full.mean(0)
    scale = max(float(truth.pow(2).sum()), 1e-300)
    rows = []
    for k in range(T):
        projected = path[:, k] @ truth / scale
        variances = {b: _variance(lr[b][k]) for b in baselines} if stochastic[k] else None
        best = _best({b: lr[b][k] for b in baselines}) if stochastic[k] else None
        rows.append(
            StepRow(
                k,
                sigmas[k],
                float(projected.mean()),
                float(projected.std() / len(projected) ** 0.5),
                _variance(path[:, k]),
                variances,
                best,
            )
        )
    tail, schedule = recommend(rows, estimator)
    estimators = _composed(path, lr, rows, tail, schedule, baselines, truth)
    return VarianceMap(num_samples, len(prompts), rows, estimators, tail, schedule, list(baselines))


def check_task(task: Task) -> None:
    """Raise when the map cannot be measured on ``task``: its pathwise shares need the reward's gradient."""
    if task.reward is not None and not task.reward.differentiable:
        raise ValueError(
            f"the variance map splits the exact gradient into per-step pathwise shares, which needs a differentiable "
            f"reward; {type(task.reward).__name__} is not (its likelihood-ratio terms alone: benchmarks/step_share.py "
            "--score-variance)"
        )


def _best(terms: dict[str, Tensor]) -> str:
    """The step baseline to use, from each baseline's ``(N, m)`` draws of the step's term: a costlier baseline
    replaces the current choice only when its variance is lower by ``MIN_SAVING`` of it *and* by two standard
    errors of the paired difference (per draw, the squared distances to each mean): a few dozen draws of
    heavy-tailed terms otherwise pick a baseline by chance."""
    spread = {name: (x - x.mean(0)).pow(2).sum(1) * len(x) / (len(x) - 1) for name, x in terms.items()}
    choice = "none" if "none" in terms else min(terms, key=COST_ORDER.__getitem__)
    for name in sorted(terms, key=COST_ORDER.__getitem__):
        diff = spread[name] - spread[choice]
        se = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else 0.0
        saving = -float(diff.mean())
        if saving > MIN_SAVING * float(spread[choice].mean()) and saving > 2 * se:
            choice = name
    return choice


def recommend(rows: Sequence[StepRow], estimator: GradientEstimator | None = None) -> tuple[int, list[str]]:
    """The recommended exact tail ``K`` and per-step baselines from a map's rows.

    The tail takes the final step (the first-order term always does), then each step before it while that step's
    best likelihood-ratio variance is more than ``TAIL_OUTLIER`` times the median over the steps before it (a
    sharp transition), leaving at least ``h + 1`` steps to RLR's block and likelihood ratios (``h`` of
    ``estimator``, 2 by default). Every step before the tail gets its best baseline.
    """
    T = len(rows)
    block = estimator.block_length if estimator is not None else None
    h = block if isinstance(block, int) else 2
    best_var = [
        row.lr_variance[row.best] if row.lr_variance and row.best is not None else math.inf for row in rows
    ]
    tail = 1
    while tail < T - h - 1:
        k = T - tail - 1
        earlier = [v for v in best_var[:k] if math.isfinite(v)]
        if not earlier or not best_var[k] > TAIL_OUTLIER * statistics.median(earlier):
            break
        tail += 1
    schedule = [(row.best or "none") if row.step < T - tail else "none" for row in rows]
    return tail, schedule


def _composed(
    path: Tensor, lr: dict, rows, tail: int, schedule: list[str], baselines: list[str], truth: Tensor
) -> dict[str, dict[str, float]]:
    """Estimators composed draw by draw from the per-step terms: variance, squared bias and MSE."""
    T = path.shape[1]

    def combined(tail_k: int, choose) -> Tensor:
        parts = [path[:, k] for k in range(T - tail_k, T)]
        for k in range(T - tail_k):
            kind = choose(k)
            parts.append(lr[kind][k] if k in lr[kind] else path[:, k])  # a deterministic step: pathwise
        return torch.stack(parts).sum(0)

    def stats(x: Tensor) -> dict[str, float]:
        variance = _variance(x)
        bias_sq = float((x.mean(0) - truth).pow(2).sum())
        return dict(variance=variance, bias_sq=bias_sq, mse=variance + bias_sq)

    out = {"full backprop": stats(path.sum(1)), "truncated backprop K=1": stats(path[:, T - 1])}
    for b in baselines:
        out[f"score function ({b} baseline)"] = stats(combined(0, lambda k, b=b: b))
    out[composed_name(1, "none")] = stats(combined(1, lambda k: "none"))
    if tail > 1:
        out[composed_name(tail, "none")] = stats(combined(tail, lambda k: "none"))
    out[composed_name(tail, "recommended")] = stats(combined(tail, lambda k: schedule[k]))
    return out
