"""The sampler: runs a plan over a denoiser and a transition kernel, with log-probabilities.

Notation follows ``method.md``: steps are indexed in sampling order, ``s_0`` is the initial noise and step
``k`` maps ``s_k`` to ``s_{k+1} = m_k(theta) + sigma_k * eps_k``; step ``T - 1`` produces the decoded latent.

The sampler knows nothing about rewards or estimators, nor about a model family's network: the
:class:`~rlr_lightning.sampling.denoisers.Denoiser` makes the network call and the
:class:`~rlr_lightning.sampling.kernels.TransitionKernel` turns its output into the step's mean and sigma.
:meth:`DiffusionSampler.run` executes a :class:`Plan` in one pass; :meth:`DiffusionSampler.log_probs`
re-scores stored transitions in one batched denoiser call, for likelihood-ratio terms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from rlr_lightning.sampling.casting import lora_cast_once
from rlr_lightning.sampling.conditioning import (
    Conditioning,
    PromptEmbeds,
    ScaledPromptEmbeds,
)
from rlr_lightning.sampling.denoisers import Denoiser, UNetDenoiser
from rlr_lightning.sampling.kernels import (
    DDIMSchedule,
    TransitionKernel,
    compute_dtype,
    gaussian_log_prob,
    per_sample,
)
from rlr_lightning.sampling.plan import (
    Perturbation,
    Plan,
    StepOutput,
    Trajectory,
    WindowReplay,
)


@runtime_checkable
class Sampler(Protocol):
    """What the gradient estimators use of a sampler: every model family's sampler provides it.

    The estimators plan, run and re-score trajectories through these members only, so they work unchanged
    over any denoiser and transition kernel.
    """

    @property
    def num_steps(self) -> int: ...

    def trainable_parameters(self) -> dict[str, Tensor]: ...

    def initial_noise(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]: ...

    def run(
        self,
        plan: Plan,
        embeds: Conditioning,
        generator: torch.Generator | None = None,
        initial_latents: Tensor | None = None,
        noises: Tensor | None = None,
        record_graph: bool = True,
        checkpoint: bool = False,
    ) -> Trajectory: ...

    def replay(
        self,
        trajectory: Trajectory,
        start: int,
        stop: int,
        samples: Tensor,
        embeds: Conditioning,
        checkpoint: bool = False,
    ) -> WindowReplay: ...

    def log_probs(
        self,
        step_index: Tensor,
        latents: Tensor,
        next_latents: Tensor,
        embeds: PromptEmbeds,
        perturbation: Perturbation | None = None,
        checkpoint: bool = False,
    ) -> Tensor: ...

    def step(
        self,
        k: int | Tensor,
        latents: Tensor,
        embeds: PromptEmbeds,
        noise: Tensor | None = None,
        perturbation: Perturbation | None = None,
        prev_latents: Tensor | None = None,
    ) -> StepOutput: ...

    def base_mean(self, step_index: Tensor, latents: Tensor, embeds: PromptEmbeds) -> Tensor: ...

    def predict_x0(self, step_index: Tensor, latents: Tensor, embeds: PromptEmbeds) -> Tensor: ...


class DiffusionSampler:
    """Batched stochastic sampling with log-probabilities, classifier-free guidance and parameter perturbations,
    over any denoiser and transition kernel.

    Args:
        denoiser: The model family's network call (:class:`~rlr_lightning.sampling.denoisers.Denoiser`).
        kernel: Per-step denoiser times, sigmas and means
            (:class:`~rlr_lightning.sampling.kernels.TransitionKernel`), on the CPU.
        guidance_scale: Classifier-free guidance weight ``w``; 1 turns guidance off (one conditional denoiser
            call), above 1 runs the unconditional and conditional branches in one batched call.
    """

    def __init__(self, denoiser: Denoiser, kernel: TransitionKernel, guidance_scale: float = 1.0) -> None:
        if not guidance_scale >= 1:
            raise ValueError(
                f"guidance_scale must be >= 1 (1 turns classifier-free guidance off), got {guidance_scale!r}"
            )
        self.denoiser = denoiser
        self.kernel = kernel
        self.guidance_scale = float(guidance_scale)
        self._kernels: dict[torch.device, TransitionKernel] = {}

    @property
    def num_steps(self) -> int:
        return len(self.kernel)

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1

    def kernel_on(self, device: torch.device | str) -> TransitionKernel:
        """The kernel's tensors on ``device`` (copied once per device)."""
        device = torch.device(device)
        if device not in self._kernels:
            self._kernels[device] = self.kernel.to(device)
        return self._kernels[device]

    def trainable_parameters(self) -> dict[str, Tensor]:
        return self.denoiser.trainable_parameters()

    # -- model calls ------------------------------------------------------------------------------------

    def _call_denoiser(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        added: Mapping[str, Tensor],
        params: Mapping[str, Tensor] | None,
        checkpoint: bool = False,
    ) -> Tensor:
        if checkpoint and torch.is_grad_enabled():
            # The whole call is one checkpoint: only its inputs are kept (the added conditioning is saved through
            # the closure), and backward recomputes it with the same (possibly perturbed) parameter tensors,
            # which the closure holds. Checkpointing inside the network (diffusers' per-block option) would
            # recompute outside the functional call, at the unperturbed weights, and silently give wrong
            # gradients in parameter mode; at the module's own weights it is exact, and a family that asks for it
            # (``Denoiser.checkpoint_blocks``) gets its blocks checkpointed inside the recomputation too.
            blocks = self.denoiser.checkpoint_blocks and params is None

            def checkpointed(x: Tensor, t: Tensor, context: Tensor) -> Tensor:
                with self.denoiser.blocks_checkpointed(blocks):
                    return self.denoiser(x, t, context, added, params)

            return torch.utils.checkpoint.checkpoint(checkpointed, x, t, context, use_reentrant=False)
        return self.denoiser(x, t, context, added, params)

    def model_output(
        self,
        latents: Tensor,
        step_index: Tensor,
        embeds: PromptEmbeds,
        perturbation: Perturbation | None = None,
        minus: Tensor | None = None,
        checkpoint: bool = False,
    ) -> Tensor:
        """The (guided) model output for each sample at its own step, float32, in one denoiser call.

        Args:
            latents: ``(B, C, H, W)``.
            step_index: ``(B,)`` step of each sample.
            embeds: The samples' conditioning.
            perturbation: Run at ``theta + u`` (``None``: at ``theta``).
            minus: With an antithetic ``perturbation``, a ``(B,)`` CPU bool mask of the samples that run at
                ``theta - u``; by default the second half of the batch (the twins, see :class:`Perturbation`).
            checkpoint: Keep only the call's inputs for backward (activation checkpointing).
        """
        B = latents.shape[0]
        if embeds.batch_size != B or step_index.shape != (B,):
            raise ValueError(
                f"batch sizes differ: latents {B}, prompt embeddings {embeds.batch_size}, "
                f"step indices {tuple(step_index.shape)}"
            )
        if perturbation is None:
            return self._model_output(latents, step_index, embeds, None, checkpoint)
        params = self.trainable_parameters()
        u = replace(perturbation, antithetic=False).noise(params)
        if not perturbation.antithetic:
            return self._model_output(
                latents, step_index, embeds, {n: p + u[n] for n, p in params.items()}, checkpoint
            )
        if minus is None:
            if B % 2:
                raise ValueError(f"antithetic perturbations need an even batch size, got {B}")
            minus = torch.arange(B) >= B // 2
        parts = []
        for mask, sign in ((~minus, 1.0), (minus, -1.0)):
            rows = mask.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            rows_d = rows.to(latents.device)
            signed = {n: p + sign * u[n] for n, p in params.items()}
            parts.append(
                (
                    rows_d,
                    self._model_output(
                        latents[rows_d], step_index[rows_d], embeds.select(rows_d), signed, checkpoint
                    ),
                )
            )
        if len(parts) == 1:
            return parts[0][1]
        out = parts[0][1].new_empty((B, *parts[0][1].shape[1:]))
        for rows_d, values in parts:
            out = out.index_copy(0, rows_d, values)
        return out

    def _model_output(
        self,
        latents: Tensor,
        step_index: Tensor,
        embeds: PromptEmbeds,
        params: Mapping[str, Tensor] | None,
        checkpoint: bool = False,
    ) -> Tensor:
        t = self.kernel_on(latents.device).timesteps[step_index]
        dtype = compute_dtype(latents)
        if not self.uses_guidance:
            return self._call_denoiser(latents, t, embeds.cond, embeds.added, params, checkpoint).to(dtype)
        if embeds.uncond is None:
            raise ValueError(
                f"guidance_scale={self.guidance_scale} needs unconditional embeddings; encode the prompts with "
                "the empty negative prompt"
            )
        # Both guidance branches in one call: unconditional rows first, then conditional ones.
        both = PromptEmbeds.cat([embeds.unconditional(), embeds.conditional()])
        out = self._call_denoiser(
            torch.cat([latents, latents]), torch.cat([t, t]), both.cond, both.added, params, checkpoint
        ).to(dtype)
        uncond, cond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    # -- transitions ------------------------------------------------------------------------------------

    def step(
        self,
        k: int | Tensor,
        latents: Tensor,
        embeds: PromptEmbeds,
        noise: Tensor | None = None,
        perturbation: Perturbation | None = None,
        prev_latents: Tensor | None = None,
        minus: Tensor | None = None,
        checkpoint: bool = False,
        predict: bool = False,
    ) -> StepOutput:
        """One transition ``s_k -> s_{k+1}`` for a batch (``k`` an int or per-sample indices).

        Give ``noise`` to sample (``s_{k+1} = m_k + sigma_k * noise``) or ``prev_latents`` to score a stored
        ``s_{k+1}``; exactly one of them is needed unless sigma is 0. ``minus`` and ``checkpoint`` are passed to
        :meth:`model_output`; ``predict`` also returns the clean-latent prediction ``x0_hat_k`` (detached).
        """
        B = latents.shape[0]
        kernel = self.kernel_on(latents.device)
        if not isinstance(k, Tensor) or k.dim() == 0:  # one step for the whole batch (int-like)
            # Decided on the CPU copy of the schedule: no device-to-host sync in the sampling loop.
            sigma_k = float(self.kernel.sigma[int(k)])
            any_stochastic = all_stochastic = sigma_k > 0
            k = torch.full((B,), int(k), device=latents.device, dtype=torch.long)
        else:
            cpu_sigma = self.kernel.sigma[k.cpu()]
            any_stochastic, all_stochastic = bool((cpu_sigma > 0).any()), bool((cpu_sigma > 0).all())
        index = k
        out = self.model_output(latents, index, embeds, perturbation, minus=minus, checkpoint=checkpoint)
        mean = kernel.mean(index, latents, out)
        sigma = kernel.sigma[index]
        if prev_latents is not None:
            next_latents = prev_latents.detach().to(mean.dtype)
        elif noise is not None:
            if noise.shape != latents.shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != latents shape {tuple(latents.shape)}")
            next_latents = mean + per_sample(kernel.sigma, index, mean) * noise.to(mean.dtype)
        elif not any_stochastic:
            next_latents = mean
        else:
            raise ValueError("a stochastic step (sigma > 0) needs either noise or prev_latents")
        log_prob = gaussian_log_prob(next_latents.detach(), mean, sigma) if all_stochastic else None
        prediction = kernel.predict_x0(index, latents, out.detach()) if predict else None
        return StepOutput(
            mean=mean, sigma=sigma, next_latents=next_latents, log_prob=log_prob, prediction=prediction
        )

    def log_probs(
        self,
        step_index: Tensor,
        latents: Tensor,
        next_latents: Tensor,
        embeds: PromptEmbeds,
        perturbation: Perturbation | None = None,
        checkpoint: bool = False,
    ) -> Tensor:
        """Re-score many stored transitions ``(k, s_k, s_{k+1})`` in one denoiser call (per-sample timesteps).

        Returns ``log p_theta(s_{k+1} | s_k)``, ``(N,)`` float32, differentiable in the trainable weights when
        called with gradient enabled. Use :meth:`Trajectory.transitions` and ``embeds.for_steps`` (or
        :meth:`Trajectory.rows` and ``embeds.rows``) to build the inputs.

        ``checkpoint`` (the memory plan's activation checkpointing) checkpoints the call where the family
        checkpoints its network's blocks (``Denoiser.checkpoint_blocks``): the call's backward follows at once,
        so only checkpointed blocks lower its peak, and elsewhere it would only cost a forward.
        """
        if next_latents.shape != latents.shape:
            raise ValueError(
                f"latents {tuple(latents.shape)} and next latents {tuple(next_latents.shape)} differ in shape"
            )
        if bool((self.kernel.sigma[step_index.cpu()] == 0).any()):
            raise ValueError(
                "log-probabilities need sigma > 0 on every scored step: use eta > 0, and with a flow model's "
                "stochastic_steps, score only the steps inside it"
            )
        out = self.step(
            step_index,
            latents,
            embeds,
            perturbation=perturbation,
            prev_latents=next_latents,
            checkpoint=checkpoint and self.denoiser.checkpoint_blocks,
        )
        assert out.log_prob is not None  # every scored step has sigma > 0 (checked above)
        return out.log_prob

    @torch.no_grad()
    def predict_x0(self, step_index: Tensor, latents: Tensor, embeds: PromptEmbeds) -> Tensor:
        """The clean latent ``x0_hat`` the (guided) model at ``theta`` predicts from ``latents`` at each row's step,
        without gradient: one denoiser call (the MuProp baseline's extra forward)."""
        out = self._model_output(latents, step_index, embeds, None)
        return self.kernel_on(latents.device).predict_x0(step_index, latents, out)

    @torch.no_grad()
    def base_mean(self, step_index: Tensor, latents: Tensor, embeds: PromptEmbeds) -> Tensor:
        """``m_k`` of each row under the base model: the network with its LoRA adapters' up-projections
        (``lora_B``) at zero, which is the network without the adapters. The reference policy of a KL penalty
        (GRPO's ``kl_coefficient``); no gradient."""
        params = {
            name: torch.zeros_like(p) if "lora_B" in name else p
            for name, p in self.trainable_parameters().items()
        }
        out = self._model_output(latents, step_index, embeds, params)
        return self.kernel_on(latents.device).mean(step_index, latents, out)

    def replay(
        self,
        trajectory: Trajectory,
        start: int,
        stop: int,
        samples: Tensor,
        embeds: Conditioning,
        checkpoint: bool = False,
    ) -> WindowReplay:
        """Re-run steps ``start .. stop-1`` of a stored trajectory with gradient, for some of its samples.

        The window starts from the detached stored latent ``s_start`` and is pathwise inside, with the stored
        noises and the plan's perturbations (antithetic twins keep their sign), exactly as :meth:`run` computes
        a window: running a window sample chunk by sample chunk gives the same gradients as running it for the
        whole batch, with the memory of one chunk.

        Args:
            trajectory: A trajectory :meth:`run` sampled (its graph is not needed).
            start: First step of the window.
            stop: One past its last step.
            samples: CPU ``long`` indices of the samples to replay.
            embeds: The conditioning of the whole batch.
            checkpoint: Keep only each denoiser call's inputs for backward (activation checkpointing).
        """
        plan = trajectory.plan
        if not 0 <= start < stop <= plan.num_steps:
            raise ValueError(f"window [{start}, {stop}) is empty or outside steps [0, {plan.num_steps})")
        B = trajectory.batch_size
        samples = torch.as_tensor(samples, dtype=torch.long).cpu()
        minus = samples >= B // 2  # the antithetic twins, when a perturbation is antithetic
        device = trajectory.final.device
        rows = samples.to(device)
        x = trajectory.latents[start][rows].detach()
        means: dict[int, Tensor] = {}
        log_probs: dict[int, Tensor | None] = {}
        with torch.enable_grad():
            for k in range(start, stop):
                out = self.step(
                    k,
                    x,
                    embeds.at(k).select(rows),
                    noise=trajectory.noises[k][rows],
                    perturbation=plan.perturbations.get(k),
                    minus=minus,
                    checkpoint=checkpoint,
                )
                means[k], log_probs[k] = out.mean, out.log_prob
                x = out.next_latents
        return WindowReplay(samples=samples, means=means, log_probs=log_probs, final=x)

    # -- trajectories -----------------------------------------------------------------------------------

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        return self.denoiser.latent_shape(batch_size)

    def initial_noise(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """Draw ``s_0`` and ``eps_0 .. eps_{T-1}`` from ``generator``, in that order.

        Everything random in a trajectory comes from here, so the same generator state replays it exactly,
        whatever the plan. The draws are float32 and cast to the sampling dtype (float32, or float64 for a
        float64 denoiser), so a float64 chain samples the same trajectory, only more precisely.
        """
        shape = self.latent_shape(batch_size)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        dtype = torch.promote_types(self.denoiser.dtype, torch.float32)
        x0 = torch.randn(shape, generator=generator, device=gen_device)
        noises = torch.randn((self.num_steps, *shape), generator=generator, device=gen_device)
        return x0.to(device, dtype), noises.to(device, dtype)

    @torch.no_grad()
    def sample(self, embeds: Conditioning, generator: torch.Generator | None = None) -> Tensor:
        """Plain sampling without gradient: returns ``s_T``."""
        return self.run(Plan(self.num_steps), embeds, generator=generator).final

    def run(
        self,
        plan: Plan,
        embeds: Conditioning,
        generator: torch.Generator | None = None,
        initial_latents: Tensor | None = None,
        noises: Tensor | None = None,
        record_graph: bool = True,
        checkpoint: bool = False,
    ) -> Trajectory:
        """Sample one trajectory per prompt, recording what ``plan`` asks for.

        Steps outside the plan's windows run under ``no_grad`` and keep no graph, whatever the caller's grad
        mode; window steps run with gradient from the detached latent at their window's start.

        Args:
            plan: Windows and perturbations; ``plan.num_steps`` must equal this sampler's ``T``.
            embeds: Prompt embeddings of the batch, or per-step DCoT embeddings.
            generator: Source of ``s_0`` and the noises when they are not given.
            initial_latents: ``s_0``, ``(B, C, H, W)``, to replay a trajectory.
            noises: ``eps``, ``(T, B, C, H, W)``, to replay a trajectory.
            record_graph: Run the windows with gradient. ``False`` samples every step without a graph (the
                estimators then :meth:`replay` the windows chunk by chunk); the trajectory is the same.
            checkpoint: Keep only the inputs of the windows' denoiser calls for backward (activation
                checkpointing).
        """
        T = self.num_steps
        if plan.num_steps != T:
            raise ValueError(f"plan is for {plan.num_steps} steps but the sampler runs {T}")
        B = embeds.batch_size
        device = embeds.device
        if isinstance(embeds, ScaledPromptEmbeds) and embeds.num_steps != T:
            raise ValueError(f"DCoT scales cover {embeds.num_steps} steps but the sampler runs {T}")
        if initial_latents is None or noises is None:
            drawn_x0, drawn_noises = self.initial_noise(B, generator, device)
            initial_latents = drawn_x0 if initial_latents is None else initial_latents
            noises = drawn_noises if noises is None else noises
        if initial_latents.shape[0] != B or noises.shape[:2] != (T, B):
            raise ValueError(
                f"batch sizes differ: {B} prompts, initial latents {tuple(initial_latents.shape)}, noises "
                f"{tuple(noises.shape)} (expected ({T}, {B}, ...))"
            )
        x = initial_latents.detach().to(compute_dtype(initial_latents))
        latents = [x]
        log_probs = []
        window_means: dict[int, Tensor] = {}
        window_log_probs: dict[int, Tensor | None] = {}
        step_means: dict[int, Tensor] = {}
        predictions: dict[int, Tensor] = {}
        recorded = set(plan.predictions)
        # Runs of no-grad steps at the weights themselves use LoRA weights cast once per run (casting.py).
        with contextlib.ExitStack() as cast:
            casting = False
            for k in range(T):
                grad = record_graph and plan.grad_at(k)
                if plan.starts_window(k):
                    x = x.detach()
                at_weights_without_grad = not grad and k not in plan.perturbations
                if at_weights_without_grad and not casting:
                    with torch.no_grad():
                        cast.enter_context(lora_cast_once(self.denoiser.module, device.type))
                    casting = True
                elif casting and not at_weights_without_grad:
                    cast.close()
                    casting = False
                with torch.set_grad_enabled(grad):
                    out = self.step(
                        k,
                        x,
                        embeds.at(k),
                        noise=noises[k],
                        perturbation=plan.perturbations.get(k),
                        checkpoint=checkpoint,
                        predict=k in recorded,
                    )
                if grad:
                    window_means[k] = out.mean
                    window_log_probs[k] = out.log_prob
                if k in recorded:
                    assert out.prediction is not None  # asked for (predict)
                    step_means[k], predictions[k] = out.mean.detach(), out.prediction
                log_probs.append(
                    out.log_prob.detach()
                    if out.log_prob is not None
                    else torch.full((B,), float("nan"), device=device)
                )
                x = out.next_latents
                latents.append(x.detach())
        return Trajectory(
            plan=plan,
            latents=latents,
            noises=noises,
            sigmas=self.kernel_on(device).sigma.clone(),
            log_probs=torch.stack(log_probs),
            window_means=window_means,
            window_log_probs=window_log_probs,
            final=x,
            step_means=step_means,
            predictions=predictions,
        )


class DDIMSampler(DiffusionSampler):
    """DDIM sampling of a diffusers UNet (Stable Diffusion 1.x / 2.x, SDXL): a
    :class:`~rlr_lightning.sampling.denoisers.UNetDenoiser` with the
    :class:`~rlr_lightning.sampling.kernels.DDIMSchedule` kernel of the model's scheduler.

    Args:
        unet: The denoiser network (a diffusers ``UNet2DConditionModel``, LoRA or not), or a ready
            :class:`~rlr_lightning.sampling.denoisers.Denoiser`. Its parameters with ``requires_grad`` are the
            ones perturbations act on.
        scheduler: A diffusers scheduler (or its config holder) of the model; interpreted as DDIM.
        num_steps: Number of denoising steps ``T``.
        eta: DDIM eta; must be > 0 on steps whose log-probability is used.
        guidance_scale: Classifier-free guidance weight ``w``; 1 turns guidance off.
        model_dtype: Dtype the network's inputs are cast to (its frozen weights' dtype); defaults to the dtype
            of its first parameter.
        timestep_spacing: Override of the scheduler's timestep spacing (``leading``, ``trailing``,
            ``linspace``).
    """

    kernel: DDIMSchedule

    def __init__(
        self,
        unet: nn.Module | Denoiser,
        scheduler,
        num_steps: int,
        eta: float,
        guidance_scale: float = 1.0,
        model_dtype: torch.dtype | None = None,
        timestep_spacing: str | None = None,
    ) -> None:
        denoiser = unet if isinstance(unet, Denoiser) else UNetDenoiser(unet, model_dtype)
        kernel = DDIMSchedule.from_scheduler(scheduler, num_steps, eta, timestep_spacing)
        super().__init__(denoiser, kernel, guidance_scale)

    @property
    def schedule(self) -> DDIMSchedule:
        """The DDIM kernel, on the CPU."""
        return self.kernel
