"""What the flow-matching families (SD 3 / 3.5, FLUX.1) share: LoRA on a transformer, prompts encoded by their
diffusers pipeline with a T5 prompt length, and Flow-GRPO's SDE sampler on their scheduler's (shifted) times.

A flow family subclasses :class:`FlowMatchingBackbone` and says which tokenizer is its T5's, its pipeline's
default T5 length, how its prompts become ``PromptEmbeds``, and its denoiser (``docs/flow_matching.md``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from rlr_lightning.models.base import DiffusionBackbone
from rlr_lightning.sampling import DiffusionSampler
from rlr_lightning.sampling.kernels import FlowMatchSDE

#: The flow-matching pipelines' limit on T5 tokens per prompt (their ``max_sequence_length``).
T5_MAX_SEQUENCE_LENGTH = 512


@contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Inside the block the loggers ``names`` report errors only.

    The flow-matching pipelines' ``encode_prompt`` warns about cut prompts on every call (every training step),
    and tokenizes untruncated to find them, which makes transformers warn of indexing errors that cannot happen;
    :meth:`DiffusionBackbone.encode_prompts` says it once instead.
    """
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


class FlowMatchingBackbone(DiffusionBackbone):
    """A frozen rectified-flow pipeline with LoRA on its transformer, sampled by Flow-GRPO's SDE.

    ``eta`` of :meth:`make_sampler` (``model.eta``) is the SDE's noise level, Flow-GRPO's ``a`` (DanceGRPO's eta):
    0 is the pipeline's deterministic sampler, and likelihood-ratio estimators need it above 0 (Flow-GRPO trains
    with 0.7).

    Args:
        max_sequence_length: T5 tokens per prompt (prompts are padded or cut to it), as the pipeline's argument
            of that name; at most 512. ``None``: the pipeline's default, or the T5 tokenizer's own limit where
            that is smaller (the tiny test models').
        components: As for :class:`~rlr_lightning.models.base.DiffusionBackbone`.
    """

    lora_component = "transformer"
    # The family's transformer (a component, see DiffusionBackbone).
    transformer: Any
    #: The component that is T5's tokenizer.
    t5_tokenizer: ClassVar[str] = ""
    #: The pipeline's default T5 prompt length.
    default_max_sequence_length: ClassVar[int] = T5_MAX_SEQUENCE_LENGTH
    #: Loggers that warn about cut prompts inside the pipeline's ``encode_prompt``.
    truncation_loggers: ClassVar[tuple[str, ...]] = ("transformers.tokenization_utils_base",)

    def __init__(
        self, dtype: torch.dtype = torch.float32, max_sequence_length: int | None = None, **components
    ) -> None:
        super().__init__(dtype=dtype, **components)
        self.max_sequence_length = max_sequence_length

    # -- prompts -----------------------------------------------------------------------------------------

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt (see the class's arguments)."""
        return self._max_sequence_length

    @max_sequence_length.setter
    def max_sequence_length(self, value: int | None) -> None:
        default = self.default_max_sequence_length
        if value is None:
            value = min(default, int(getattr(self, self.t5_tokenizer).model_max_length))
        elif (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= T5_MAX_SEQUENCE_LENGTH
        ):
            raise ValueError(
                f"max_sequence_length must be an integer from 1 to {T5_MAX_SEQUENCE_LENGTH} (T5 tokens per prompt; "
                f"the {self.pipeline_class_name}'s default is {default}), got {value!r}"
            )
        self._max_sequence_length = value

    def token_limit(self, tokenizer) -> int:
        # T5 reads max_sequence_length tokens, whatever its tokenizer's own limit.
        if tokenizer is getattr(self, self.t5_tokenizer):
            return self.max_sequence_length
        return tokenizer.model_max_length

    def encode_with_pipeline(self, *args, **kwargs):
        """The pipeline's ``encode_prompt`` at this backbone's device and T5 length, its truncation warnings
        silenced (:meth:`DiffusionBackbone.encode_prompts` warns once instead)."""
        with quiet_loggers(*self.truncation_loggers):
            return self.pipeline().encode_prompt(
                *args, device=self.device, max_sequence_length=self.max_sequence_length, **kwargs
            )

    # -- sampling ----------------------------------------------------------------------------------------

    @property
    def latent_patch(self) -> int:
        """Latent pixels per side of one transformer token (2 for both families)."""
        return 2

    def timestep_shift(self) -> float | None:
        """``mu``, the resolution-dependent shift of a scheduler with ``use_dynamic_shifting`` (FLUX), from the
        image's token count as the pipelines compute it (diffusers' ``calculate_shift``); ``None`` for a fixed
        shift (SD 3 / 3.5's 3.0)."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        h, w = self.latent_size
        return calculate_shift(
            (h // self.latent_patch) * (w // self.latent_patch),
            config.base_image_seq_len,
            config.max_image_seq_len,
            config.base_shift,
            config.max_shift,
        )

    def flow_scheduler(self) -> Any:
        """The flow-matching Euler scheduler whose ``set_timesteps`` gives the pipeline's times (the
        backbone's own; Wan translates the UniPC scheduler it ships)."""
        return self.scheduler

    def pipeline_timesteps(self, num_steps: int) -> torch.Tensor | None:
        """What the pipeline calls its network with at each step, where that is not the Euler scheduler's
        ``times * 1000``; ``None``: it is."""
        return None

    def schedule_sigmas(self, num_steps: int):
        """The unshifted times the pipeline passes to ``set_timesteps``; ``None``: the scheduler's own."""
        return None

    def timestep_spacing_refusal(self) -> str:
        """Why a DDIM ``timestep_spacing`` does not apply to this family (the error's middle)."""
        return "is a DDIM option; flow-matching models take their times from their scheduler's shift"

    def make_sampler(
        self,
        num_steps: int,
        eta: float,
        guidance_scale: float = 1.0,
        timestep_spacing: str | None = None,
        stochastic_steps: tuple[int, int] | None = None,
    ) -> DiffusionSampler:
        """Flow-GRPO's SDE sampler over the transformer, on the pipeline's timesteps for ``num_steps``.

        Args:
            num_steps: Sampling steps ``T``.
            eta: The SDE's noise level ``a`` (0: the deterministic flow-matching Euler sampler).
            guidance_scale: The family's guidance (classifier-free for SD 3, the guidance embedding for FLUX.1-dev).
            timestep_spacing: Must be ``None``: flow-matching models take their times from the scheduler's shift.
            stochastic_steps: The ``[start, stop)`` steps that run the SDE, the others the ODE (MixGRPO /
                Flow-GRPO-Fast); ``None``: every step is stochastic.
        """
        if timestep_spacing is not None:
            raise ValueError(
                f"timestep_spacing={timestep_spacing!r} {self.timestep_spacing_refusal()}: leave it unset "
                "(model.timestep_spacing: null)"
            )
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        kernel = FlowMatchSDE.from_scheduler(
            self.flow_scheduler(),
            num_steps,
            eta,
            sigmas=self.schedule_sigmas(num_steps),
            mu=self.timestep_shift(),
            stochastic_steps=stochastic_steps,
        )
        timesteps = self.pipeline_timesteps(num_steps)
        if timesteps is not None:
            kernel = dataclasses.replace(kernel, timesteps=timesteps)
        return self.sampler_over(kernel, guidance_scale)

    def sampler_over(self, kernel: FlowMatchSDE, guidance_scale: float) -> DiffusionSampler:
        """The sampler of ``kernel`` over this family's denoiser (classifier-free guidance by default)."""
        return DiffusionSampler(self.make_denoiser(), kernel, guidance_scale)
