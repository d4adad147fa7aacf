"""What every gradient estimator shares: a plan, surrogate terms, advantages and one rollout.

An estimator is two things (``docs/architecture.md``): a :class:`~rlr_lightning.sampling.Plan` for the sampler
and a list of :class:`SurrogateTerm` whose autograd gradients add up to the estimate. Each term builds its
loss lazily, so a caller can backpropagate the terms one at a time and free each graph before the next
(the likelihood-ratio re-scoring of many steps would otherwise hold every chunk's activations at once).
Losses are *negated* objectives: minimising them ascends the reward.

:func:`rollout` runs one estimator step without Lightning; the ``LightningModule``, the tests and the
diagnostics all call it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from rlr_lightning.estimators.baselines import (
    PREDICTIVE,
    PromptRewardMeans,
    check_step_baseline,
    prompt_keys,
    resolve_step_baselines,
    step_baseline_values,
)
from rlr_lightning.memory.plan import GraphShape, MemoryPlan, PlannedMemory
from rlr_lightning.sampling import Conditioning, Perturbation, Plan, Sampler, Trajectory

#: ``reward_fn(final_latents, prompts) -> (B,)`` rewards; differentiable in the latents when FO needs it.
RewardFn = Callable[[Tensor, Sequence[str]], Tensor]
#: Gathers a detached per-rank tensor from all ranks (identity on one process).
GatherFn = Callable[[Tensor], Tensor]

_BASELINES = ("leave_one_out", "group", "none")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, ...), stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class SurrogateTerm:
    """One part of the estimate: ``loss()`` builds a scalar whose gradient is minus that part.

    Attributes:
        name: ``fo``, ``ho`` or ``zo``: the share of the gradient it carries, for per-term logging.
        loss: Builds the loss; called once, right before its backward.
    """

    name: str
    loss: Callable[[], Tensor]


@dataclass
class Rollout:
    """One sampled batch and everything an estimator derived from it.

    Attributes:
        plan: The plan the trajectory ran.
        trajectory: The sampled trajectory.
        prompts: The prompts of the (possibly doubled) batch.
        rewards: ``(B,)`` rewards; carry a graph to the FO window when there is one.
        all_rewards: Detached rewards of the global batch (all ranks), ``(N,)``.
        advantages: ``(B,)`` detached advantages ``r - b`` against the batch baseline alone.
        terms: The surrogate terms to backpropagate.
        info: Scalars worth logging (block start, truncation, ...).
        reward_fn: The reward function, for first-order terms that replay their window chunk by chunk.
        memory: How the terms run: chunk sizes and activation checkpointing.
        cache: What an estimator keeps between the inner updates of one batch (GRPO's old log-probabilities).
        embeds: The conditioning of the sampled batch (the prompts' repeated for groups and antithetic pairs):
            what later calls of ``estimator.terms`` take.
        step_advantages: ``(T, B)`` detached advantages per (step, sample) when a step baseline is in use: the
            rows of steps with a step baseline hold ``r - b_k`` against the batch baseline, the others
            ``advantages``. ``None``: every step's advantages are ``advantages``.
        step_baselines: Step index to the ``(B,)`` step baselines ``b_k`` that were subtracted (diagnostics).
    """

    plan: Plan
    trajectory: Trajectory
    prompts: list[str]
    rewards: Tensor
    all_rewards: Tensor
    advantages: Tensor
    terms: list[SurrogateTerm] = field(default_factory=list)
    info: dict[str, float] = field(default_factory=dict)
    reward_fn: RewardFn | None = None
    memory: MemoryPlan = field(default_factory=MemoryPlan)
    cache: dict = field(default_factory=dict)
    embeds: Conditioning | None = None
    step_advantages: Tensor | None = None
    step_baselines: dict[int, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.trajectory.batch_size

    def advantages_at(self, steps: Tensor | int, samples: Tensor) -> Tensor:
        """The advantages of (step, sample) rows: ``steps`` an int or a CPU index tensor like ``samples``."""
        samples = samples.to(self.advantages.device)
        if self.step_advantages is None:
            return self.advantages[samples]
        if isinstance(steps, Tensor):
            steps = steps.to(self.advantages.device)
        return self.step_advantages[steps, samples]

    @property
    def chunked(self) -> bool:
        """Whether windows are replayed chunk by chunk (else they kept their graph from sampling)."""
        return self.memory.chunks(self.batch_size)

    def sample_chunks(self) -> list[Tensor]:
        """CPU index tensors of the sample chunks the windows run in (one chunk of all when unchunked)."""
        B = self.batch_size
        c = self.memory.chunk_samples if self.chunked else B
        assert c is not None  # chunked: a chunk size is set
        return [torch.arange(i, min(i + c, B)) for i in range(0, B, c)]


@dataclass
class WindowView:
    """One sample chunk of a gradient window, as a term's loss sees it.

    Attributes:
        samples: CPU indices of the chunk's samples in the (local) batch.
        log_probs: Step index to the graph-carrying ``log p(sg(s_{k+1}) | s_k)`` of those samples (``None`` on
            a deterministic step).
        rewards: Builds the chunk's rewards with a graph through the window (first-order path).
    """

    samples: Tensor
    log_probs: dict[int, Tensor | None]
    rewards: Callable[[], Tensor]


@dataclass
class RewardStatistics:
    """Running mean and standard deviation of the rewards of earlier iterations (exponential moving averages).

    They come from completed iterations only, so they are independent of the current samples: a baseline or
    a scale taken from them keeps every likelihood-ratio term unbiased (``method.md`` section 3).

    Attributes:
        decay: Weight of the old value in each update, in ``[0, 1)``.
        mean: Running mean reward, ``None`` before the first update.
        mean_square: Running mean of the squared rewards, ``None`` before the first update.
    """

    decay: float = 0.9
    mean: float | None = None
    mean_square: float | None = None

    def update(self, rewards: Tensor) -> None:
        """Fold in the (global, detached) rewards of a completed iteration."""
        r = rewards.detach().double().reshape(-1)
        mean, mean_square = float(r.mean()), float(r.pow(2).mean())
        if self.mean is None:
            self.mean, self.mean_square = mean, mean_square
        else:
            assert self.mean_square is not None  # set together with the mean
            self.mean = self.decay * self.mean + (1 - self.decay) * mean
            self.mean_square = self.decay * self.mean_square + (1 - self.decay) * mean_square

    @property
    def std(self) -> float | None:
        if self.mean is None:
            return None
        assert self.mean_square is not None  # set together with the mean
        return max(self.mean_square - self.mean**2, 0.0) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "mean_square": self.mean_square}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.mean_square = state.get("mean"), state.get("mean_square")


def compute_advantages(
    rewards: Tensor,
    all_rewards: Tensor,
    baseline: str = "leave_one_out",
    antithetic_pairs: bool = False,
    fallback: float | None = None,
    group_size: int = 1,
) -> Tensor:
    """Advantages ``r - b`` of the local samples against a baseline independent of each sample.

    ``group`` is the leave-one-out mean of the sample's *group*: the other samples of the same prompt (the local
    batch is ``group_size`` copies of the prompts, ``[p_0 .. p_{B-1}, p_0 .. p_{B-1}, ...]``, each with its own
    noise). It removes the between-prompt share of the reward variance (GRPO's group-relative advantage), and
    stays unbiased because no other member of the group depends on the sample's noise.

    The leave-one-out mean excludes every sample that shares the sample's noise: the sample itself and, with
    ``antithetic_pairs``, its twin (the local batch is ``[theta + u half, theta - u half]`` on common random
    numbers, so sample ``i``'s twin is ``i +/- B/2``). A twin's reward depends on the sample's own noise, so
    keeping it in the baseline would bias the likelihood-ratio terms (it cancels them outright at one prompt
    per rank). When the global batch holds no other independent sample, the baseline is ``fallback`` (a
    running mean from earlier iterations), or 0 when there is none yet: both independent of the sample.

    Args:
        rewards: ``(B,)`` local rewards (``B`` even with ``antithetic_pairs``).
        all_rewards: ``(N,)`` detached rewards of the global batch, the local ones included.
        baseline: ``leave_one_out`` or ``none``.
        antithetic_pairs: The local batch is two halves of twins on common random numbers.
        fallback: Baseline to use when no independent sample is left out of the global batch.
        group_size: Samples per prompt in the local batch (before antithetic doubling), for ``group``.
    """
    r = rewards.detach().float()
    if baseline == "none":
        return r
    if baseline not in _BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {_BASELINES}")
    if antithetic_pairs:
        if r.numel() % 2:
            raise ValueError(f"antithetic pairs need an even local batch, got {r.numel()} rewards")
        # A sample's twin shares its noise: it leaves the baseline together with the sample.
        shared_sum, shared = r + r.roll(r.numel() // 2), 2
    else:
        shared_sum, shared = r, 1
    if baseline == "group":
        copies = group_size * shared
        if r.numel() % copies:
            raise ValueError(
                f"{r.numel()} local rewards do not split into groups of {copies} samples per prompt"
            )
        others = copies - shared
        if others < 1:
            return r - (0.0 if fallback is None else fallback)
        per_prompt = r.reshape(copies, -1).sum(0)  # row j is copy j of every prompt
        return r - (per_prompt.repeat(copies) - shared_sum) / others
    others = all_rewards.numel() - shared
    if others < 1:
        return r - (0.0 if fallback is None else fallback)
    return r - (all_rewards.float().sum() - shared_sum) / others


class GradientEstimator(ABC):
    """Base class: subclasses decide the plan and the surrogate terms.

    Args:
        baseline: Baseline of the likelihood-ratio advantages: ``leave_one_out`` (mean of the other samples
            of the global batch, all ranks, leaving out every sample that shares the sample's noise) or
            ``none``. With no other independent sample in the global batch (one prompt per rank on one rank,
            in antithetic pairs), it falls back to the running mean reward of earlier iterations.
        normalize_advantages: Divide the whole estimate (every term alike) by the running standard deviation
            of the rewards of earlier iterations. The scale is independent of the current samples, so the
            estimate stays unbiased for ``grad J / std``: same direction, reward-scale-free step size. The first
            iteration, with no history yet, is not scaled.
        score_chunk_steps: How many steps' transitions one batched re-scoring UNet call covers (memory).
        reward_ema_decay: Decay of the running reward mean and standard deviation (baseline fallback,
            ``normalize_advantages``, and the zeroth-order baseline of ``RLR``'s parameter mode).
        group_size: Samples per prompt: every prompt of the batch is sampled this many times, each with its own
            noise (``data.batch_size`` prompts give ``batch_size * group_size`` images per rank). With
            ``baseline="group"`` each sample's baseline is the mean reward of the other samples of its prompt.
        step_baseline: Per-step baseline subtracted from the reward before the batch baseline, on the
            likelihood-ratio steps (``rlr_lightning.estimators.baselines``): ``none``, ``prompt_mean`` (running
            mean reward of the prompt), ``value`` (reward of the x0 prediction at the step; one reward call per
            step) or ``muprop`` (the same one step further, at the step's mean; one more network call), or a
            list of them, one per step. ``rlr diagnose`` measures which wins where.
        step_baseline_sigma_ratio: With one ``step_baseline`` name: use it on the steps whose sigma is at most
            this share of the largest step sigma (1: every step), ``none`` on the others.
    """

    #: Whether the estimator backpropagates through the reward model.
    requires_reward_grad: bool = True
    #: Whether the batch runs as antithetic pairs (each prompt twice, at theta + u and theta - u).
    antithetic: bool = False

    def __init__(
        self,
        baseline: str = "leave_one_out",
        normalize_advantages: bool = False,
        score_chunk_steps: int = 4,
        reward_ema_decay: float = 0.9,
        group_size: int = 1,
        step_baseline: str | Sequence[str] = "none",
        step_baseline_sigma_ratio: float = 1.0,
    ) -> None:
        if baseline not in _BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {_BASELINES}")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size (samples per prompt) must be an integer >= 1, got {group_size!r}")
        if baseline == "group" and group_size < 2:
            raise ValueError(
                "baseline='group' compares each sample with the other samples of its prompt: it needs "
                f"group_size >= 2, got {group_size}"
            )
        if score_chunk_steps < 1:
            raise ValueError(f"score_chunk_steps must be >= 1, got {score_chunk_steps}")
        if not 0 <= reward_ema_decay < 1:
            raise ValueError(f"reward_ema_decay must be in [0, 1), got {reward_ema_decay}")
        self.baseline = baseline
        self.normalize_advantages = normalize_advantages
        self.score_chunk_steps = score_chunk_steps
        self.reward_stats = RewardStatistics(reward_ema_decay)
        self.group_size = group_size
        self.step_baseline = check_step_baseline(step_baseline, step_baseline_sigma_ratio)
        self.step_baseline_sigma_ratio = float(step_baseline_sigma_ratio)
        self.prompt_means = PromptRewardMeans(reward_ema_decay)
        #: The step baseline of every step (``configure_schedule``); ``None`` before the schedule is known.
        self.step_baselines: list[str] | None = None

    @property
    def samples_per_prompt(self) -> int:
        """Trajectories sampled per prompt of the batch: the group, doubled for antithetic pairs."""
        return self.group_size * (2 if self.antithetic else 1)

    @property
    def name(self) -> str:
        return type(self).__name__

    # -- to override -------------------------------------------------------------------------------------

    def setup(self, num_steps: int, eta: float, reward_differentiable: bool = True) -> None:
        """Check the estimator can run with ``T = num_steps``, this ``eta`` and this reward; raise otherwise.

        Called once the sampler and reward are known (at the module's construction), before any sampling.
        """
        self._check_eta(num_steps, eta)
        self._check_step_baseline(num_steps)
        if self.requires_reward_grad and not reward_differentiable:
            raise ValueError(
                f"{self.name} backpropagates through the reward, but the reward is not differentiable; use RLR "
                "(which then scores the last step by its likelihood ratio) or ScoreFunction"
            )

    def configure_schedule(self, sigmas: Sequence[float]) -> None:
        """Called once the sampler exists, with its step sigmas in sampling order (choices read from the
        schedule: the step baselines, ``RLR(tail="auto")``). They may depend on the schedule, never on a sample.
        Subclasses that read the schedule too extend it and call ``super().configure_schedule``."""
        self.step_baselines = resolve_step_baselines(
            self.step_baseline, sigmas, self.step_baseline_sigma_ratio
        )

    def likelihood_ratio_steps(self, plan: Plan) -> list[int]:
        """The steps whose likelihood ratio this iteration's terms use (where step baselines act)."""
        return []

    def step_baseline_kinds(self, plan: Plan) -> dict[int, str]:
        """Step index to its step baseline, for the likelihood-ratio steps of ``plan`` that have one."""
        if self.step_baseline == "none":
            return {}
        schedule = self.step_baselines
        if not isinstance(self.step_baseline, str):
            schedule = resolve_step_baselines(self.step_baseline, [1.0] * plan.num_steps)  # checks the length
        elif self.step_baseline_sigma_ratio == 1:
            schedule = [self.step_baseline] * plan.num_steps  # every step: no schedule needed
        elif schedule is None or len(schedule) != plan.num_steps:
            raise ValueError(
                f"{self.name}'s step baselines are chosen from the sampler's sigmas: call "
                "configure_schedule(sampler.kernel.sigma.tolist()) first (RLRModule does when it loads the model)"
            )
        kinds = {k: schedule[k] for k in self.likelihood_ratio_steps(plan)}
        return {k: v for k, v in kinds.items() if v != "none"}

    def max_block_length(self, num_steps: int) -> int:
        """The longest half-order block ``T`` steps leave room for (the memory planner's cap on ``h="auto"``)."""
        return num_steps - 1

    @property
    def block_length(self) -> int | Literal["auto"] | None:
        """The half-order block length the memory planner prices: a number, ``"auto"`` (the planner chooses
        it) or ``None`` for estimators without a block (every one but ``RLR``)."""
        return None

    def apply_memory_plan(  # noqa: B027 - a hook: only estimators with a block length adopt anything
        self, planned: PlannedMemory, num_steps: int, eta: float, reward_differentiable: bool
    ) -> None:
        """Adopt what the memory planner chose for this estimator (``RLR(h="auto")``: the block length); the
        arguments are those of :meth:`setup`, which runs again when a choice changes the plan's checks."""

    def uses_likelihood_ratios(self, num_steps: int) -> bool:
        return False

    def graph_shape(self, num_steps: int, prompts: int, h: int | None = None) -> GraphShape:
        """What one step keeps a graph of, for the memory planner (``rlr_lightning.memory``).

        Only needed with the module's ``memory_budget_gb``; every estimator of this package implements it.

        Args:
            num_steps: ``T``.
            prompts: Prompts of the local batch.
            h: The block length to price, for estimators that have one (``RLR``); others ignore it.
        """
        # A configuration error for estimators written outside this package, not a missing piece of it.
        raise ValueError(
            f"{self.name} does not describe its gradient windows (graph_shape), so the memory planner cannot "
            "price it: implement graph_shape, or run without model.memory_budget_gb"
        )

    @abstractmethod
    def plan(self, num_steps: int, step_generator: torch.Generator, rank_seed: int) -> Plan:
        """The plan of one iteration.

        Args:
            num_steps: ``T``.
            step_generator: Seeded from the global step only, identical on all ranks: draw everything that
                decides the graph (block start, truncation length) from it.
            rank_seed: Per-rank seed for what must differ across ranks (parameter perturbations).
        """

    @abstractmethod
    def terms(self, rollout: Rollout, sampler: Sampler, embeds: Conditioning) -> list[SurrogateTerm]:
        """The surrogate terms of a sampled and scored rollout."""

    #: Optimizer steps taken on each sampled batch (GRPO's inner updates; 1 for the unbiased estimators).
    inner_updates: int = 1
    #: The estimator's own KL penalty weight (GRPO's ``beta``); 0 for those without one.
    kl_coefficient: float = 0.0

    def check_accumulation(self, gradient_accumulation_steps: int) -> None:
        """Refuse gradient accumulation with several optimizer steps per batch (``inner_updates``)."""
        if self.inner_updates > 1 and gradient_accumulation_steps > 1:
            raise ValueError(
                f"the estimator takes {self.inner_updates} optimizer steps per batch (inner_updates), which cannot "
                f"be combined with gradient_accumulation_steps={gradient_accumulation_steps}: raise data.batch_size "
                "or the estimator's group_size instead, or set inner_updates to 1"
            )

    def shape_advantages(self, advantages: Tensor, rewards: Tensor) -> Tensor:
        """A last transformation of the advantages ``r - b`` (local, detached); the identity here.

        GRPO scales them by its group's standard deviation; the unbiased estimators keep them as they are.
        """
        return advantages

    def observe(self, rollout: Rollout, grad_norms: dict[str, float]) -> None:
        """Update running statistics after the backward passes (called only on a completed update).

        Subclasses that keep statistics of their own extend it and call ``super().observe``.
        """
        keys = rollout.cache.get("all_prompt_keys")
        if keys is not None:
            self.prompt_means.update(keys, rollout.all_rewards)
        self.reward_stats.update(rollout.all_rewards)

    def state_dict(self) -> dict:
        state = {"reward_stats": self.reward_stats.state_dict()}
        if self.prompt_means.means:
            state["prompt_means"] = self.prompt_means.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (resume)."""
        self.reward_stats.load_state_dict(state.get("reward_stats", {}))
        self.prompt_means.load_state_dict(state.get("prompt_means", {}))

    def term_scale(self) -> float:
        """The factor every surrogate term of the next iteration is multiplied by (``normalize_advantages``)."""
        std = self.reward_stats.std
        if not self.normalize_advantages or std is None or not std > 0:
            return 1.0
        return 1.0 / std

    # -- shared pieces ---------------------------------------------------------------------------------

    def _check_step_baseline(self, num_steps: int) -> None:
        if not isinstance(self.step_baseline, str):
            resolve_step_baselines(self.step_baseline, [1.0] * num_steps)  # raises on a wrong length

    def _check_eta(self, num_steps: int, eta: float) -> None:
        if self.uses_likelihood_ratios(num_steps) and not eta > 0:
            raise ValueError(
                f"{self.name} uses likelihood-ratio terms, which need a stochastic sampler: eta must be > 0, "
                f"got {eta}"
            )

    def score_terms(
        self,
        rollout: Rollout,
        sampler: Sampler,
        embeds: Conditioning,
        steps: Sequence[int],
        weight: float,
        name: str,
    ) -> list[SurrogateTerm]:
        """Likelihood-ratio terms ``weight * mean_b A_b * log p(s_{k+1} | s_k)`` for ``steps``.

        The (step, sample) transitions are re-scored in batched calls of ``score_chunk_steps`` steps of the
        whole batch, or of ``memory.rescore_samples`` (else ``memory.chunk_samples``) transitions when that is
        smaller: one UNet call and one backward each, so the memory is that of one call.
        """
        B = rollout.batch_size
        steps_t = torch.as_tensor(list(steps), dtype=torch.long).repeat_interleave(B)
        samples_t = torch.arange(B).repeat(len(steps))
        per_call = self.score_chunk_steps * B
        if (cap := rollout.memory.rescore_cap()) is not None:
            per_call = min(per_call, cap)

        def make(rows: slice) -> Callable[[], Tensor]:
            def loss() -> Tensor:
                k, s = steps_t[rows], samples_t[rows]
                index, x, x_next = rollout.trajectory.rows(k, s)
                log_p = sampler.log_probs(
                    index, x, x_next, embeds.rows(k, s), checkpoint=rollout.memory.activation_checkpointing
                )
                return -weight * (rollout.advantages_at(k, s) * log_p).sum() / B

            return loss

        return [SurrogateTerm(name, make(slice(i, i + per_call))) for i in range(0, len(steps_t), per_call)]

    def window_terms(
        self,
        rollout: Rollout,
        sampler: Sampler,
        embeds: Conditioning,
        window: tuple[int, int],
        name: str,
        loss: Callable[[WindowView], Tensor],
    ) -> list[SurrogateTerm]:
        """Terms of one gradient window: ``loss(view)`` for each sample chunk, summed over chunks.

        Unchunked, the view is the window's graph from the sampling pass (and the rewards computed on it);
        chunked, each term replays the window for its chunk (:meth:`Sampler.replay`), so only one chunk's
        graph exists at a time. ``loss`` must be a sum over the view's samples (divided by the batch size, not
        the chunk's), so that the chunks add up to the whole batch's term.
        """
        start, stop = window
        T = rollout.plan.num_steps
        if not rollout.chunked:
            trajectory = rollout.trajectory
            view = WindowView(
                torch.arange(rollout.batch_size), trajectory.window_log_probs, lambda: rollout.rewards
            )
            return [SurrogateTerm(name, lambda: loss(view))]

        def make(samples: Tensor) -> Callable[[], Tensor]:
            def chunk_loss() -> Tensor:
                replay = sampler.replay(
                    rollout.trajectory,
                    start,
                    stop,
                    samples,
                    embeds,
                    checkpoint=rollout.memory.activation_checkpointing,
                )

                def rewards() -> Tensor:
                    if stop != T:
                        raise RuntimeError(
                            f"window [{start}, {stop}) does not end at the last step: no reward"
                        )
                    prompts = [rollout.prompts[i] for i in samples.tolist()]
                    assert rollout.reward_fn is not None  # rollout() records it
                    return rollout.reward_fn(replay.final, prompts).float()

                return loss(WindowView(samples, replay.log_probs, rewards))

            return chunk_loss

        return [SurrogateTerm(name, make(samples)) for samples in rollout.sample_chunks()]


def _identity(x: Tensor) -> Tensor:
    return x


def rollout(
    estimator: GradientEstimator,
    sampler: Sampler,
    embeds: Conditioning,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    step_seed: int,
    rank_seed: int,
    gather: GatherFn = _identity,
    memory: MemoryPlan | None = None,
) -> Rollout:
    """Plan, sample, score and build the surrogate terms of one iteration; no backward yet.

    Args:
        estimator: The gradient estimator.
        sampler: The DDIM sampler over the trainable UNet.
        embeds: Prompt embeddings of the local batch.
        prompts: The local prompts (passed to the reward).
        reward_fn: ``(final_latents, prompts) -> rewards``.
        step_seed: Identical on all ranks (derive it from the run seed and the global step).
        rank_seed: Different on every rank (derive it from the run seed, the global step and the rank).
        gather: All-gather of a detached tensor over ranks (identity on one process).
        memory: Chunk sizes and activation checkpointing of the terms (default: unchunked, none).
    """
    T = sampler.num_steps
    step_generator = torch.Generator().manual_seed(step_seed)
    plan = estimator.plan(T, step_generator, rank_seed)
    baseline_kinds = estimator.step_baseline_kinds(plan)
    predicted = [k for k, kind in baseline_kinds.items() if kind in PREDICTIVE]
    if predicted:
        plan.predictions = tuple(sorted(set(plan.predictions) | set(predicted)))
    device = embeds.device
    prompts = list(prompts)
    if estimator.group_size > 1:
        # Each prompt sampled group_size times, each copy with noise of its own: [batch, batch, ...].
        embeds = embeds.repeat(estimator.group_size)
        prompts = prompts * estimator.group_size
    x0, noises = sampler.initial_noise(embeds.batch_size, torch.Generator().manual_seed(rank_seed), device)
    if estimator.antithetic:
        # Common random numbers: both members of a pair share prompt, initial noise and step noises, and
        # differ only in the sign of the parameter perturbation.
        embeds = embeds.repeat(2)
        prompts = prompts * 2
        x0 = torch.cat([x0, x0])
        noises = torch.cat([noises, noises], dim=1)
    memory = memory if memory is not None else MemoryPlan()
    chunked = memory.chunks(len(prompts))
    # Chunked: the whole pass runs without a graph and the terms replay their windows chunk by chunk.
    trajectory = sampler.run(
        plan,
        embeds,
        initial_latents=x0,
        noises=noises,
        record_graph=not chunked,
        checkpoint=memory.activation_checkpointing,
    )
    if trajectory.final.requires_grad:
        rewards = reward_fn(trajectory.final, prompts).float()  # first order: keeps the graph to the window
    else:
        with torch.no_grad():
            step = memory.chunk_samples if chunked else len(prompts)
            assert step is not None  # chunked: a chunk size is set
            rewards = torch.cat(
                [
                    reward_fn(trajectory.final[i : i + step], prompts[i : i + step]).float().reshape(-1)
                    for i in range(0, len(prompts), step)
                ]
            )
    if rewards.shape != (len(prompts),):
        raise ValueError(f"the reward returned shape {tuple(rewards.shape)}, expected ({len(prompts)},)")
    all_rewards = gather(rewards.detach()).reshape(-1)
    advantages = compute_advantages(
        rewards,
        all_rewards,
        estimator.baseline,
        estimator.antithetic,
        fallback=estimator.reward_stats.mean,
        group_size=estimator.group_size,
    )
    advantages = estimator.shape_advantages(advantages, rewards.detach().float())
    result = Rollout(
        plan,
        trajectory,
        prompts,
        rewards,
        all_rewards,
        advantages,
        reward_fn=reward_fn,
        memory=memory,
        embeds=embeds,
    )
    if any(kind == "prompt_mean" for kind in baseline_kinds.values()):
        keys = result.cache["prompt_keys"] = prompt_keys(prompts)
        result.cache["all_prompt_keys"] = gather(keys.to(device)).reshape(-1).cpu()
    if baseline_kinds:
        _add_step_advantages(result, estimator, sampler, baseline_kinds, gather)
    terms = estimator.terms(result, sampler, embeds)
    scale = estimator.term_scale()
    if scale != 1.0:
        # Every term alike, by a scale from earlier iterations: the estimate keeps its direction in
        # expectation (scaling only the likelihood-ratio terms would change what is estimated).
        terms = [_scaled(term, scale) for term in terms]
        result.info["term_scale"] = scale
    result.terms = terms
    return result


def _add_step_advantages(
    result: Rollout, estimator: GradientEstimator, sampler: Sampler, kinds: dict[int, str], gather: GatherFn
) -> None:
    """Per-(step, sample) advantages of the steps with a step baseline: the residual ``r - b_k`` against the
    estimator's batch baseline over the other samples' residuals (gathered over ranks, one call for all steps),
    shaped as the estimator shapes advantages."""
    r = result.rewards.detach().float()
    B = r.numel()
    prompt_means = None
    if any(kind == "prompt_mean" for kind in kinds.values()):
        prompt_means = estimator.prompt_means.lookup(result.cache["prompt_keys"], estimator.reward_stats.mean)
    chunk = result.memory.chunk_samples if result.chunked else B
    assert chunk is not None  # chunked: a chunk size is set
    values = step_baseline_values(
        kinds,
        result.trajectory,
        sampler,
        result.embeds,
        result.prompts,
        result.reward_fn,
        chunk,
        prompt_means,
    )
    steps = sorted(values)
    residuals = torch.stack([r - values[k].to(r.device) for k in steps])  # (S, B)
    S = len(steps)
    all_residuals = gather(residuals.reshape(-1)).reshape(-1, S, B).transpose(0, 1).reshape(S, -1)
    step_advantages = result.advantages.expand(result.plan.num_steps, B).clone()
    for i, k in enumerate(steps):
        # No fallback: with no other independent sample, r - b_k alone is the advantage.
        a = compute_advantages(
            residuals[i],
            all_residuals[i],
            estimator.baseline,
            estimator.antithetic,
            group_size=estimator.group_size,
        )
        step_advantages[k] = estimator.shape_advantages(a, r)
    result.step_advantages = step_advantages
    result.step_baselines = values


def _scaled(term: SurrogateTerm, scale: float) -> SurrogateTerm:
    return SurrogateTerm(term.name, lambda: scale * term.loss())


def perturbations_for(
    steps: Sequence[int], rank_seed: int, scale: float, antithetic: bool
) -> dict[int, Perturbation]:
    """One independent seeded perturbation per step (seeds derived from the rank seed and the step)."""
    # The constant separates these seeds from the rank seed's other uses (the noise generator).
    return {k: Perturbation(derive_seed(rank_seed, 7919, k), scale, antithetic) for k in steps}
