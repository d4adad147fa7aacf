"""The Recursive Likelihood Ratio estimator (``method.md`` sections 2-4)."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
from torch import Tensor

from rlr_lightning.estimators.base import (
    GradientEstimator,
    Rollout,
    SurrogateTerm,
    WindowView,
    perturbations_for,
)
from rlr_lightning.memory.plan import GraphShape, PlannedMemory
from rlr_lightning.sampling import Conditioning, Plan, Sampler

logger = logging.getLogger(__name__)


def auto_tail(sigmas: Sequence[float], ratio: float, max_tail: int) -> int:
    """``tail="auto"``: how many final steps have a sigma below ``ratio`` times the median step sigma.

    A step's likelihood-ratio term scales as ``1 / sigma_k`` while its pathwise share does not, so the sharp
    final steps are the ones worth backpropagating exactly. Deterministic final steps (sigma 0, e.g. the ODE
    steps of a mixed flow sampler) have no likelihood ratio at all and always join. At least 1, at most
    ``max_tail``.
    """
    values = [float(v) for v in sigmas]
    threshold = ratio * statistics.median(values)
    tail = 0
    for sigma in reversed(values):
        if sigma >= threshold:
            break
        tail += 1
    return max(1, min(tail, max_tail))


class RLR(GradientEstimator):
    """RLR: first order on an exact tail of ``K`` last steps, a half-order block of ``h`` steps, zeroth order
    elsewhere.

    For one sample with tail ``K``, block ``B = {a, .., a+h-1}`` (``0 <= a <= T-K-h``) and
    ``C = {0, .., T-K-1} \\ B``::

        G = c_fo * grad r                          (backprop through steps T-K .. T-1, the decoder and the reward)
          + c_ho * grad A * log p(sg(s_{a+h}) | s_{a+h-1})   (pathwise through the block from sg(s_a))
          + c_zo * sum_{k in C} ZO_k

    Every block-start law below is independent of the current sample, so ``G`` is unbiased for each of them.
    The paper's RLR is ``tail=1``. A step's likelihood ratio scales as ``1 / sigma_k``: the last steps of a
    DDIM schedule, whose sigma is an order of magnitude below the others (0.04 and 0.02 against 0.26-0.78 on
    the shapes world), carry almost all of a score estimate's variance there, and the tail takes them
    pathwise instead (``docs/benchmarks.md`` section 6).

    Args:
        h: Block length (half-order sub-chain). Memory grows linearly with it; the paper recommends 2.
            ``auto``: the largest block the module's ``memory_budget_gb`` allows, up to 2 (the paper's Eq. 8
            evaluated with costs measured on the real model; see ``rlr_lightning.memory``).
        tail: Exact tail ``K``: the last ``K`` steps are backpropagated pathwise with the reward's gradient (the
            first-order term; memory grows with ``K`` like truncated backprop's). ``auto``: every final step
            whose sigma is below ``tail_sigma_ratio`` times the median sigma of the schedule (at least 1),
            read from the sampler once the model is loaded. A reward without gradient needs ``tail=1`` (its last
            step is then scored by likelihood ratio).
        tail_sigma_ratio: ``tail="auto"``: a final step joins the tail when its sigma is below this share of the
            median step sigma.
        block_law: How the block start ``a`` is drawn each iteration, identically on all ranks:
            ``uniform`` on ``[0, T-K-h]``; ``range``: uniform on ``block_range`` (focus a scale, e.g. the
            late steps of DCoT's fine prompt); ``grad_norm``: softmax over running estimates of the HO
            gradient norm per start, from earlier iterations only (the paper's preferred law).
        block_range: Inclusive ``[lo, hi]`` for ``block_law="range"``.
        grad_norm_temperature: Softmax temperature of ``grad_norm``, relative to the mean running norm.
        grad_norm_decay: EMA decay of the running per-start gradient norms.
        zo_mode: Zeroth-order share of the steps in ``C``: ``score`` (per-step latent likelihood ratios,
            batched re-scoring; measured far less noisy than ``parameter`` on a tiny UNet), ``parameter``
            (the paper's parameter-noise estimate ``A u_k / s^2``) or ``none`` (drop it: biased, the
            reference code's behaviour and the paper's "w/o ZO" ablation).
        zo_subsample: ``score`` mode: re-score only K random steps of ``C``, scaled by ``|C| / K`` (unbiased).
        zo_scale: ``parameter`` mode: standard deviation ``s`` of the weight perturbations.
        zo_antithetic: ``parameter`` mode: run each prompt twice with common random numbers, at
            ``theta + u_k`` and ``theta - u_k``, and use the two-point estimate
            ``(mean r(+) - mean r(-)) / 2 * u_k / s^2``. Without it the ZO term uses the running mean reward
            of earlier iterations as its baseline (a batch-mean baseline would cancel it exactly). The
            likelihood-ratio baseline of a sample then leaves out its twin too (it shares the sample's noise).
        perturb_backprop_steps: ``parameter`` mode: also run the FO and HO steps at ``theta + u_k`` (gradient
            taken at the perturbed point), which makes ``G`` exactly unbiased for the smoothed objective.
            ``False`` is the O(s) approximation of leaving them unperturbed.
        c_fo: Weight of the first-order term (the paper: 1; its reference code: 0.05).
        c_ho: Weight of the half-order term (the paper: 1; its reference code: 0.001).
        c_zo: Weight of the zeroth-order term (the paper: 1; its reference code: 0.001).
        baseline: Baseline of the likelihood-ratio advantages: ``leave_one_out`` over the global batch, ``group``
            (the other samples of the same prompt, with ``group_size >= 2``: removes the between-prompt reward
            variance), or ``none``; see :class:`~rlr_lightning.estimators.GradientEstimator`.
        normalize_advantages: Divide the whole estimate (FO, HO and ZO alike) by the running reward standard
            deviation of earlier iterations: an unbiased estimate of ``grad J / std``.
        score_chunk_steps: Steps per batched re-scoring call in ``score`` mode.
        reward_ema_decay: Decay of the running reward mean and standard deviation (the ZO baseline without
            antithetic pairs, the baseline fallback, ``normalize_advantages``).
        group_size: Samples per prompt, each with its own noise (for the ``group`` baseline).
        step_baseline: Per-step baseline of the likelihood-ratio terms (HO, ZO in score mode, and the last step
            without a reward gradient): ``none``, ``prompt_mean``, ``value``, ``muprop``, or one per step; see
            :class:`~rlr_lightning.estimators.GradientEstimator`.
        step_baseline_sigma_ratio: With one ``step_baseline`` name: the steps of sigma at most this share of the
            largest step sigma use it (1: every step).
    """

    def __init__(
        self,
        h: int | Literal["auto"] = 2,
        tail: int | Literal["auto"] = 1,
        tail_sigma_ratio: float = 0.25,
        block_law: Literal["uniform", "range", "grad_norm"] = "uniform",
        block_range: tuple[int, int] | None = None,
        grad_norm_temperature: float = 1.0,
        grad_norm_decay: float = 0.9,
        zo_mode: Literal["score", "parameter", "none"] = "score",
        zo_subsample: int | None = None,
        zo_scale: float = 1e-3,
        zo_antithetic: bool = True,
        perturb_backprop_steps: bool = True,
        c_fo: float = 1.0,
        c_ho: float = 1.0,
        c_zo: float = 1.0,
        baseline: str = "leave_one_out",
        normalize_advantages: bool = False,
        score_chunk_steps: int = 4,
        reward_ema_decay: float = 0.9,
        group_size: int = 1,
        step_baseline: str | list[str] = "none",
        step_baseline_sigma_ratio: float = 1.0,
    ) -> None:
        super().__init__(
            baseline,
            normalize_advantages,
            score_chunk_steps,
            reward_ema_decay,
            group_size=group_size,
            step_baseline=step_baseline,
            step_baseline_sigma_ratio=step_baseline_sigma_ratio,
        )
        if h != "auto" and (not isinstance(h, int) or h < 1):
            raise ValueError(f"block length h must be an integer >= 1 or 'auto', got {h!r}")
        if tail != "auto" and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 1):
            raise ValueError(f"tail (exact tail K) must be an integer >= 1 or 'auto', got {tail!r}")
        if not 0 < tail_sigma_ratio < 1:
            raise ValueError(f"tail_sigma_ratio must be in (0, 1), got {tail_sigma_ratio}")
        if block_law not in ("uniform", "range", "grad_norm"):
            raise ValueError(f"unknown block_law {block_law!r}; choose uniform, range or grad_norm")
        if block_law == "range":
            if block_range is None or len(block_range) != 2 or block_range[0] > block_range[1]:
                raise ValueError(
                    f"block_law='range' needs block_range=[lo, hi] with lo <= hi, got {block_range}"
                )
        if zo_mode not in ("score", "parameter", "none"):
            raise ValueError(f"unknown zo_mode {zo_mode!r}; choose score, parameter or none")
        if zo_subsample is not None and zo_subsample < 1:
            raise ValueError(f"zo_subsample must be >= 1 (or None for all steps), got {zo_subsample}")
        if zo_mode == "parameter" and not zo_scale > 0:
            raise ValueError(f"zo_scale must be > 0 in parameter mode, got {zo_scale}")
        if not grad_norm_temperature > 0:
            raise ValueError(f"grad_norm_temperature must be > 0, got {grad_norm_temperature}")
        if not 0 <= grad_norm_decay < 1:
            raise ValueError(f"grad_norm_decay must be in [0, 1), got {grad_norm_decay}")
        self.h = h
        self.tail = tail
        self.tail_sigma_ratio = tail_sigma_ratio
        self.block_law = block_law
        self.block_range = None if block_range is None else (int(block_range[0]), int(block_range[1]))
        self.grad_norm_temperature = grad_norm_temperature
        self.grad_norm_decay = grad_norm_decay
        self.zo_mode = zo_mode
        self.zo_subsample = zo_subsample
        self.zo_scale = zo_scale
        self.antithetic = zo_mode == "parameter" and zo_antithetic
        self.perturb_backprop_steps = perturb_backprop_steps
        self.c_fo, self.c_ho, self.c_zo = c_fo, c_ho, c_zo
        self.fo_by_likelihood_ratio = False
        #: The tail ``K`` in use: ``tail`` itself, or what ``tail="auto"`` chose (``configure_schedule``).
        self.tail_steps: int | None = None if tail == "auto" else tail
        self.block_norms: list[float | None] = []

    # -- set-up ----------------------------------------------------------------------------------------

    def uses_likelihood_ratios(self, num_steps: int) -> bool:
        return True  # the HO term is a likelihood ratio

    def setup(self, num_steps: int, eta: float, reward_differentiable: bool = True) -> None:
        self._check_eta(num_steps, eta)
        self._check_step_baseline(num_steps)
        self.fo_by_likelihood_ratio = not reward_differentiable
        if self.fo_by_likelihood_ratio and self.tail not in (1, "auto"):
            raise ValueError(
                f"RLR tail={self.tail} backpropagates the reward's gradient through the last {self.tail} steps, but "
                "the reward is not differentiable: use tail=1 (its last step is then scored by likelihood ratio)"
            )
        if self.fo_by_likelihood_ratio:
            self.tail_steps = 1
        if self.h == "auto":
            return  # checked again once the memory planner has chosen h
        self._check_steps(num_steps)
        if self.fo_by_likelihood_ratio:
            logger.info(
                "The reward is not differentiable: RLR replaces the first-order term on the last step by that "
                "step's likelihood ratio."
            )

    def _check_steps(self, num_steps: int) -> None:
        """Block, tail and block range fit in ``T`` steps (the tail counts as 1 until ``auto`` is resolved)."""
        T, h = num_steps, self.h
        assert isinstance(h, int)  # h="auto" is checked once the memory planner has chosen it
        K = self.tail_steps or 1
        if h > T - K:
            tail = "" if self.tail == 1 else f" and the exact tail (K={K}, tail={self.tail!r})"
            raise ValueError(
                f"block length h={h} must be <= T-{K}={T - K}: the block may not contain the last "
                f"{'step' if K == 1 else f'{K} steps'} (first order){tail}; lower h or the tail, or raise "
                "model.num_steps"
            )
        if self.block_range is not None and self.block_law == "range":
            lo, hi = self.block_range
            if lo < 0 or hi > T - K - h:
                raise ValueError(
                    f"block_range [{lo}, {hi}] is outside the valid block starts [0, {T - K - h}] for T={T}, h={h}"
                    + ("" if K == 1 else f", tail K={K}")
                )
        n_zo = T - K - h
        if self.zo_mode == "score" and self.zo_subsample is not None and self.zo_subsample > n_zo:
            raise ValueError(
                f"zo_subsample={self.zo_subsample} exceeds the {n_zo} zeroth-order steps (T-K-h)"
            )
        self._block_starts(T)

    def configure_schedule(self, sigmas: Sequence[float]) -> None:
        """Resolve ``tail="auto"`` from the sampler's step sigmas (sampling order) and check the steps again.

        The rule reads only the schedule, never a sample, so the estimate stays unbiased.
        """
        super().configure_schedule(sigmas)
        T = len(sigmas)
        if self.tail == "auto" and not self.fo_by_likelihood_ratio:
            self.tail_steps = auto_tail(
                sigmas, self.tail_sigma_ratio, max_tail=T - (1 if self.h == "auto" else self.h)
            )
            logger.info(
                "RLR tail='auto': the last %d step(s) (sigma %s, below %.2f x the median sigma %.3g) are "
                "backpropagated exactly",
                self.tail_steps,
                ", ".join(f"{float(v):.3g}" for v in sigmas[T - self.tail_steps :]),
                self.tail_sigma_ratio,
                statistics.median(float(v) for v in sigmas),
            )
        if self.h != "auto":
            self._check_steps(T)

    def max_block_length(self, num_steps: int) -> int:
        """The longest block that leaves room for the tail (the memory planner's cap for ``h="auto"``)."""
        return num_steps - (self.tail_steps or 1)

    @property
    def block_length(self) -> int | Literal["auto"]:
        return self.h

    def apply_memory_plan(
        self, planned: PlannedMemory, num_steps: int, eta: float, reward_differentiable: bool
    ) -> None:
        if self.h == "auto" and planned.h is not None:
            self.h = planned.h
            self.setup(num_steps, eta, reward_differentiable)

    def _block_starts(self, num_steps: int) -> int:
        """The number of block starts, ``T - K - h + 1``; running norms kept for another number (a state restored
        from a run with another ``T``, ``h`` or tail) start afresh."""
        assert isinstance(self.h, int)  # only called once h is known
        n = num_steps - (self.tail_steps or 1) - self.h + 1
        if len(self.block_norms) != n:
            self.block_norms = [None] * n
        return n

    def _tail(self) -> int:
        if self.tail_steps is None:
            raise ValueError(
                "RLR(tail='auto') reads the sampler's sigmas: call configure_schedule(sampler.kernel.sigma.tolist()) "
                "first (RLRModule does when it loads the model)"
            )
        return self.tail_steps

    @property
    def requires_reward_grad(self) -> bool:  # type: ignore[override]
        return not self.fo_by_likelihood_ratio

    def graph_shape(self, num_steps: int, prompts: int, h: int | None = None) -> GraphShape:
        length = self.h if h is None else h
        if length == "auto":
            raise ValueError("graph_shape needs a block length: pass h, or let the memory planner choose it")
        samples = prompts * self.samples_per_prompt
        K = self._tail()
        rescoring = 0
        if self.zo_mode == "score":
            rescoring = self.zo_subsample if self.zo_subsample is not None else max(num_steps - K - length, 0)
        return GraphShape(
            samples,
            windows=(length, K),  # the block's backward runs first, then the tail's
            reward_window=None if self.fo_by_likelihood_ratio else 1,
            rescoring_steps=rescoring,
            rescore_steps_per_call=self.score_chunk_steps,
        )

    # -- plan ------------------------------------------------------------------------------------------

    def zo_steps(self, num_steps: int, block_start: int) -> list[int]:
        """``C = {0, .., T-K-1}`` minus the block: the steps whose share the ZO term estimates."""
        assert isinstance(self.h, int)  # only called once h is known
        return [k for k in range(num_steps - self._tail()) if not block_start <= k < block_start + self.h]

    def block_start_probs(self, num_steps: int) -> Tensor:
        """The law of the block start ``a`` over ``0 .. T-K-h`` for the next iteration."""
        n = self._block_starts(num_steps)
        probs = torch.zeros(n, dtype=torch.float64)
        if self.block_law == "range":
            assert self.block_range is not None  # required with block_law="range" (__init__)
            lo, hi = self.block_range
            probs[lo : hi + 1] = 1.0
        elif self.block_law == "grad_norm" and any(v is not None for v in self.block_norms):
            seen = [v for v in self.block_norms if v is not None]
            # Unseen starts get the largest running norm, so every start keeps being explored.
            norms = torch.tensor(
                [max(seen) if v is None else v for v in self.block_norms], dtype=torch.float64
            )
            scale = norms.mean().clamp(min=1e-12) * self.grad_norm_temperature
            probs = torch.softmax(norms / scale, dim=0)
        else:
            probs[:] = 1.0
        return probs / probs.sum()

    def plan(self, num_steps: int, step_generator: torch.Generator, rank_seed: int) -> Plan:
        T, h = num_steps, self.h
        if h == "auto":
            raise ValueError(
                "RLR(h='auto') needs the module's memory_budget_gb: the memory planner chooses h"
            )
        K = self._tail()
        a = int(torch.multinomial(self.block_start_probs(T), 1, generator=step_generator))
        zo_steps = self.zo_steps(T, a)
        info: dict[str, Any] = {"block_start": a, "tail": K}
        if self.zo_mode == "score" and self.zo_subsample is not None:
            pick = torch.randperm(len(zo_steps), generator=step_generator)[: self.zo_subsample]
            info["zo_steps"] = sorted(zo_steps[i] for i in pick.tolist())
        perturbations = {}
        if self.zo_mode == "parameter":
            perturbed = list(range(T)) if self.perturb_backprop_steps else zo_steps
            perturbations = perturbations_for(perturbed, rank_seed, self.zo_scale, self.antithetic)
        return Plan(T, windows=((a, a + h), (T - K, T)), perturbations=perturbations, info=info)

    def likelihood_ratio_steps(self, plan: Plan) -> list[int]:
        T = plan.num_steps
        a = plan.info["block_start"]
        steps = {a + self.h - 1}
        if self.zo_mode == "score":
            steps.update(plan.info.get("zo_steps", self.zo_steps(T, a)))
        if self.fo_by_likelihood_ratio:
            steps.add(T - 1)
        return sorted(steps)

    # -- surrogate terms ---------------------------------------------------------------------------------

    def terms(self, rollout: Rollout, sampler: Sampler, embeds: Conditioning) -> list[SurrogateTerm]:
        T = rollout.plan.num_steps
        a = rollout.plan.info["block_start"]
        K = rollout.plan.info.get("tail", 1)
        B = rollout.batch_size
        last_of_block = a + self.h - 1

        def ho(view: WindowView) -> Tensor:
            A = rollout.advantages_at(last_of_block, view.samples)
            log_prob = view.log_probs[last_of_block]
            assert log_prob is not None  # a likelihood-ratio step is stochastic (sigma > 0)
            return -self.c_ho * (A * log_prob).sum() / B

        def fo(view: WindowView) -> Tensor:
            if self.fo_by_likelihood_ratio:
                A = rollout.advantages_at(T - 1, view.samples)
                log_prob = view.log_probs[T - 1]
                assert log_prob is not None  # a likelihood-ratio step is stochastic (sigma > 0)
                return -self.c_fo * (A * log_prob).sum() / B
            return -self.c_fo * view.rewards().sum() / B

        # Backward order: the block, then the tail, then the re-scoring chunks. Graphs kept from the
        # sampling pass (unchunked) are freed as early as possible, and the last term (a re-scoring chunk, or
        # the first-order term) reaches every LoRA weight, so under DDP it is the one that synchronises.
        terms = self.window_terms(rollout, sampler, embeds, (a, a + self.h), "ho", ho)
        terms += self.window_terms(rollout, sampler, embeds, (T - K, T), "fo", fo)
        zo_steps = self.zo_steps(T, a)
        if self.zo_mode == "score" and zo_steps:
            chosen = rollout.plan.info.get("zo_steps", zo_steps)
            weight = self.c_zo * len(zo_steps) / len(chosen)
            terms += self.score_terms(rollout, sampler, embeds, chosen, weight, "zo")
        elif self.zo_mode == "parameter" and zo_steps:
            zo = self._parameter_zo(rollout, sampler, zo_steps)
            if zo is not None:
                terms.append(zo)
        return terms

    def _parameter_zo(self, rollout: Rollout, sampler: Sampler, zo_steps: list[int]) -> SurrogateTerm | None:
        r = rollout.rewards.detach().float()
        if self.antithetic:
            half = r.numel() // 2
            coeff = float(r[:half].mean() - r[half:].mean()) / 2
        elif self.reward_stats.mean is None:
            # No baseline from earlier iterations yet; one from this batch would cancel the term exactly.
            logger.info(
                "RLR parameter ZO: skipping the zeroth-order term until the reward baseline has history"
            )
            rollout.info["zo_skipped"] = 1.0
            return None
        else:
            coeff = float((r - self.reward_stats.mean).mean())
        coeff /= self.zo_scale**2
        perturbations = rollout.plan.perturbations

        def loss() -> Tensor:
            params = sampler.trainable_parameters()
            direction = {n: torch.zeros_like(p) for n, p in params.items()}
            for k in zo_steps:
                for n, u in perturbations[k].noise(params).items():
                    direction[n] += u
            # <theta, sg(sum_k coeff * u_k)>: its gradient is the ZO estimate, whatever reduces it later.
            # A sum of tensors (typeshed's sum also allows its start value, 0, for no terms).
            return cast(Tensor, -self.c_zo * coeff * sum((p * direction[n]).sum() for n, p in params.items()))

        return SurrogateTerm("zo", loss)

    # -- running statistics ------------------------------------------------------------------------------

    def observe(self, rollout: Rollout, grad_norms: dict[str, float]) -> None:
        super().observe(rollout, grad_norms)
        norm = grad_norms.get("ho")
        a = rollout.plan.info["block_start"]
        if norm is not None and math.isfinite(norm) and a < len(self.block_norms):
            old = self.block_norms[a]
            self.block_norms[a] = (
                norm if old is None else self.grad_norm_decay * old + (1 - self.grad_norm_decay) * norm
            )

    def state_dict(self) -> dict:
        return {**super().state_dict(), "block_norms": list(self.block_norms)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.block_norms = list(state.get("block_norms", self.block_norms))
