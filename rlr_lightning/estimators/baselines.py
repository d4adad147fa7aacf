"""Per-step baselines of the likelihood-ratio terms (``docs/method.md`` section 3, "Per-step baselines").

A likelihood-ratio term of step ``k`` multiplies ``grad log p(s_{k+1} | s_k)`` by an advantage ``r - b_k``. Its
expectation is unchanged by any baseline ``b_k`` that is independent of the step's own noise ``eps_k`` given
``s_k``, because ``E[grad log p(s_{k+1} | s_k) | s_k] = 0``; so ``b_k`` may depend on everything before that
noise, and a different one may serve each step. The step baselines here:

* ``none``: only the batch baseline (leave-one-out or group over the other samples, ``GradientEstimator``);
* ``prompt_mean``: the running mean reward of the sample's prompt over earlier iterations;
* ``value``: ``r(decode(x0_hat_k))``, the reward of the clean latent the network predicts at ``s_k`` (the
  sampler computes it anyway; a function of ``s_k`` only). Late steps, where the prediction is sharp, lose most
  of their variance; early steps, where it is a blur, can gain some;
* ``muprop``: the same one step further, at the step's mean: ``r(decode(x0_hat_{k+1}(m_k)))``, one extra network
  forward (``m_k`` is a function of ``s_k`` only). At the last step it is ``r(decode(m_{T-1}))``, no forward.

Each step's residual ``r - b_k`` then gets the estimator's batch baseline (the other samples' residuals leave
out every sample that shares the sample's noise, so this stays unbiased), and the estimator's shaping (GRPO).
Which step baseline a step uses is read from the sampler's sigma schedule only (:func:`resolve_step_baselines`),
never from a sample; ``rlr diagnose`` measures which one wins per step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: The step baselines, in the order ``rlr diagnose`` reports them.
STEP_BASELINES = ("none", "prompt_mean", "value", "muprop")
#: Step baselines that call the reward on a predicted clean latent.
PREDICTIVE = ("value", "muprop")


def check_step_baseline(spec: str | Sequence[str], sigma_ratio: float) -> str | list[str]:
    """Validate a ``step_baseline`` option (one name, or one name per step) and its sigma ratio."""
    if isinstance(spec, str):
        if spec not in STEP_BASELINES:
            raise ValueError(
                f"unknown step_baseline {spec!r}; choose one of {', '.join(STEP_BASELINES)}, or give "
                "one of them per step (a list of T names)"
            )
        spec_out: str | list[str] = spec
    else:
        spec_out = [str(name) for name in spec]
        bad = [name for name in spec_out if name not in STEP_BASELINES]
        if bad or not spec_out:
            raise ValueError(
                f"step_baseline lists {bad or 'nothing'}: every entry must be one of "
                f"{', '.join(STEP_BASELINES)}"
            )
    if not 0 < sigma_ratio <= 1:
        raise ValueError(f"step_baseline_sigma_ratio must be in (0, 1], got {sigma_ratio!r}")
    return spec_out


def resolve_step_baselines(
    spec: str | Sequence[str], sigmas: Sequence[float], sigma_ratio: float = 1.0
) -> list[str]:
    """The step baseline of every step, in sampling order, from the option and the sampler's step sigmas.

    One name applies to every step whose sigma is at most ``sigma_ratio`` times the largest step sigma (1: every
    step; the value baseline helps late, small-sigma steps and can hurt the first ones); a list names each step's
    own. The choice reads the schedule only, so every term stays unbiased.
    """
    T = len(sigmas)
    if isinstance(spec, str):
        top = max((float(s) for s in sigmas), default=0.0)
        return [spec if float(s) <= sigma_ratio * top * (1 + 1e-6) else "none" for s in sigmas]
    if len(spec) != T:
        raise ValueError(
            f"step_baseline lists {len(spec)} step baselines, but the sampler runs T={T} steps "
            "(model.num_steps): give one per step, or one name for all"
        )
    return list(spec)


def prompt_keys(prompts: Sequence[str]) -> Tensor:
    """Stable 63-bit keys of prompts (the same on every rank and in every process), ``(B,)`` int64."""
    keys = [
        int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little") >> 1 for p in prompts
    ]
    return torch.tensor(keys, dtype=torch.long)


@dataclass
class PromptRewardMeans:
    """The running mean reward of each prompt over earlier iterations (exponential moving averages).

    Updated only after an iteration completes, from the global batch, so a baseline read from it is independent
    of the current samples. A prompt seen for the first time gets ``fallback`` (the running mean of all rewards).

    Attributes:
        decay: Weight of the old value in each update, in ``[0, 1)``.
        means: Prompt key (:func:`prompt_keys`) to its running mean reward.
    """

    decay: float = 0.9
    means: dict[int, float] = field(default_factory=dict)

    def lookup(self, keys: Tensor, fallback: float | None) -> Tensor:
        default = 0.0 if fallback is None else fallback
        return torch.tensor([self.means.get(int(k), default) for k in keys.tolist()], dtype=torch.float32)

    def update(self, keys: Tensor, rewards: Tensor) -> None:
        """Fold in one iteration's (global, detached) rewards: each prompt's batch mean enters its average."""
        per_prompt: dict[int, list[float]] = {}
        for key, value in zip(keys.tolist(), rewards.detach().double().reshape(-1).tolist()):
            per_prompt.setdefault(int(key), []).append(value)
        for key, values in per_prompt.items():
            mean = sum(values) / len(values)
            old = self.means.get(key)
            self.means[key] = mean if old is None else self.decay * old + (1 - self.decay) * mean

    def state_dict(self) -> dict:
        return {"means": dict(self.means)}

    def load_state_dict(self, state: dict) -> None:
        self.means = {int(k): float(v) for k, v in state.get("means", {}).items()}


@torch.no_grad()
def step_baseline_values(
    kinds: Mapping[int, str],
    trajectory,
    sampler,
    embeds,
    prompts: Sequence[str],
    reward_fn,
    chunk: int,
    prompt_means: Tensor | None = None,
) -> dict[int, Tensor]:
    """``b_k`` of every sample for each step of ``kinds`` (step to baseline name, ``none`` left out), detached.

    Args:
        kinds: Step index to its step baseline.
        trajectory: The sampled trajectory; ``value`` and ``muprop`` steps need their ``predictions`` and
            ``step_means`` recorded (the plan's ``predictions``).
        sampler: The sampler (``muprop`` calls its network once per step and sample).
        embeds: The conditioning of the sampled batch.
        prompts: The prompts of the sampled batch, for the reward.
        reward_fn: ``(latents, prompts) -> rewards``.
        chunk: Samples per reward (and network) call.
        prompt_means: ``(B,)`` running mean reward of each sample's prompt, for ``prompt_mean`` steps.
    """
    T = trajectory.plan.num_steps
    B = trajectory.batch_size
    device = trajectory.final.device
    values: dict[int, Tensor] = {}
    for k, kind in sorted(kinds.items()):
        if kind == "none":
            continue
        if kind == "prompt_mean":
            if prompt_means is None:
                raise ValueError("the prompt_mean step baseline needs the prompts' running means")
            values[k] = prompt_means.to(device).float()
            continue
        if kind not in PREDICTIVE:
            raise ValueError(f"unknown step baseline {kind!r}; choose one of {', '.join(STEP_BASELINES)}")
        if k not in trajectory.predictions:
            raise ValueError(f"step {k} has no recorded prediction: the plan must list it in 'predictions'")
        parts = []
        for start in range(0, B, chunk):
            rows = torch.arange(start, min(start + chunk, B), device=device)
            if kind == "value":
                latents = trajectory.predictions[k][rows]
            elif k == T - 1:
                latents = trajectory.step_means[k][rows]  # muprop at the last step: the final latent's mean
            else:
                index = torch.full((rows.numel(),), k + 1, dtype=torch.long, device=device)
                latents = sampler.predict_x0(
                    index, trajectory.step_means[k][rows], embeds.at(k + 1).select(rows)
                )
            chunk_prompts = [prompts[i] for i in rows.tolist()]
            parts.append(reward_fn(latents, chunk_prompts).detach().float().reshape(-1))
        values[k] = torch.cat(parts)
    return values
