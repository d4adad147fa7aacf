"""Denoisers: the network call of a model family, given latents, per-sample times and conditioning.

The sampler calls a denoiser with the latents, one time per sample, the text-encoder sequence of one guidance
branch and that branch's *added* conditioning (:class:`~rlr_lightning.sampling.conditioning.PromptEmbeds`), and
optionally a replacement set of trainable tensors (a parameter perturbation, evaluated with
``torch.func.functional_call`` so the leaves stay the unperturbed weights). A model family whose network takes
other arguments (a transformer with pooled projections, packed latents, a guidance embedding) is a new
:class:`Denoiser` subclass here; the sampler and the estimators do not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call


class Denoiser(ABC):
    """One model family's network call.

    Args:
        module: The network. Its parameters with ``requires_grad`` (the LoRA weights) are the trainable
            parameters that perturbations act on and gradients flow to.
        dtype: Dtype the network's inputs are cast to (its frozen weights' dtype); defaults to the dtype of its
            first parameter.
        sample_size: Latent height and width ``(h, w)`` to sample at; ``None``: the network's own (its config's
            ``sample_size``, where it has one).
    """

    #: Inside a checkpointed call without a parameter perturbation, also checkpoint the network's blocks
    #: (diffusers' gradient checkpointing), so the call's recomputation in backward holds one block's
    #: activations instead of the whole network's. Worth a third forward where one call's activations are
    #: most of a step's memory (Wan at 480p: about 65 GiB per video); families measured without it keep it off.
    checkpoint_blocks: bool = False

    def __init__(
        self, module: nn.Module, dtype: torch.dtype | None = None, sample_size: tuple[int, int] | None = None
    ) -> None:
        self.module = module
        self.dtype = dtype or next(module.parameters()).dtype
        self._compiled: Callable[..., Any] | None = None
        self.sample_size = None if sample_size is None else (int(sample_size[0]), int(sample_size[1]))

    @abstractmethod
    def inputs(
        self, latents: Tensor, timesteps: Tensor, context: Tensor, added: Mapping[str, Tensor]
    ) -> tuple[tuple, dict]:
        """The network's positional and keyword arguments, already in :attr:`dtype`."""

    @abstractmethod
    def output(self, result) -> Tensor:
        """The prediction from what the network returned."""

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """Shape of a batch of latents, ``(B, C, h, w)``: the network config's ``in_channels`` at ``sample_size``
        (a network whose input is not the latent itself, such as FLUX's packed tokens, overrides this)."""
        config: Any = self.module.config  # a diffusers model's config: read by attribute
        size = config.sample_size if self.sample_size is None else self.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, config.in_channels, h, w)

    def trainable_parameters(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    @contextmanager
    def blocks_checkpointed(self, enabled: bool = True) -> Iterator[None]:
        """Run the network with its blocks checkpointed (diffusers' ``enable_gradient_checkpointing``) inside the
        context, where it supports that and ``enabled``; as it was afterwards.

        Only for calls at the module's own parameters: a block's recomputation runs in backward, after a
        ``functional_call`` at perturbed parameters has returned, so it would see the unperturbed weights.
        """
        module: Any = self.module
        if not enabled or not getattr(module, "_supports_gradient_checkpointing", False):
            yield
            return
        was_on = module.is_gradient_checkpointing
        if not was_on:
            module.enable_gradient_checkpointing()
        try:
            yield
        finally:
            if not was_on:
                module.disable_gradient_checkpointing()

    def compile(self, enabled: bool = True, **options: Any) -> None:
        """Run the no-grad calls at the module's own weights (the sampling pass: most of a step's calls)
        through ``torch.compile(module, **options)``; calls with gradient or at given parameters stay eager.
        ``enabled=False`` runs every call eagerly again.

        The compiled module shares the module's weights (LoRA updates are seen), and compiles on first use and
        again for new shapes (batch sizes). It pays where small kernels leave a GPU waiting on launches.
        """
        self._compiled = torch.compile(self.module, **options) if enabled else None

    def __call__(
        self,
        latents: Tensor,
        timesteps: Tensor,
        context: Tensor,
        added: Mapping[str, Tensor],
        params: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """The prediction for each sample, in the network's dtype.

        Args:
            latents: ``(B, ...)``.
            timesteps: ``(B,)``, the time of each sample.
            context: The text-encoder sequence, ``(B, L, D)``.
            added: The family's added conditioning, each ``(B, ...)``.
            params: Evaluate at these trainable tensors instead of the module's own (``None``: at the module's).
        """
        args, kwargs = self.inputs(latents, timesteps, context, added)
        if params is None:
            if self._compiled is not None and not torch.is_grad_enabled():
                return self.output(self._compiled(*args, **kwargs))
            return self.output(self.module(*args, **kwargs))
        # A functional call evaluates the network at theta + u without touching the parameters: the leaves stay
        # the unperturbed weights, so a gradient taken here is d f(theta + u) / d theta, and no saved tensor is
        # ever invalidated by an in-place edit.
        return self.output(functional_call(self.module, dict(params), args, kwargs, strict=False))


class UNetDenoiser(Denoiser):
    """A diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.x / 2.x, and SDXL with added conditioning).

    Called as ``unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]``; the
    ``added_cond_kwargs`` are left out when the family has none (SD 1.x / 2.x). Any module with that calling
    convention and a ``config`` with ``in_channels`` and ``sample_size`` works (the tests' toy denoiser).
    """

    def inputs(self, latents, timesteps, context, added):
        kwargs = {"encoder_hidden_states": context.to(self.dtype), "return_dict": False}
        if added:
            kwargs["added_cond_kwargs"] = {name: value.to(self.dtype) for name, value in added.items()}
        return (latents.to(self.dtype), timesteps), kwargs

    def output(self, result) -> Tensor:
        return result[0]
