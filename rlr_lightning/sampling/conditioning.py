"""What a trajectory is conditioned on: the prompts' embeddings, and per-scale embeddings for DCoT.

A model family's conditioning is a bag of per-sample tensors: the text-encoder sequence (``cond``, and
``uncond`` for classifier-free guidance) plus the family's *added* conditioning, passed to its denoiser by
name (SDXL: ``text_embeds`` (pooled) and ``time_ids``; a guidance-distilled model: its guidance scale).
Every tensor is batch-first, so selecting, tiling and stacking rows works the same for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class PromptEmbeds:
    """Text-encoder outputs for a batch of prompts, per guidance branch.

    Attributes:
        cond: Embedding sequences of the prompts, ``(B, L, D)``.
        uncond: Embedding sequences of the negative prompt, ``(B, L, D)``, or ``None`` without guidance.
        added: The model family's added conditioning of the prompts, by the name its denoiser takes, each
            ``(B, ...)`` (SDXL: ``text_embeds``, the pooled embedding, and ``time_ids``); empty for SD 1.x / 2.x.
        uncond_added: The same for the negative prompt; the same names as ``added`` whenever ``uncond`` is set.
    """

    cond: Tensor
    uncond: Tensor | None = None
    added: dict[str, Tensor] = field(default_factory=dict)
    uncond_added: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.uncond is not None and self.uncond.shape != self.cond.shape:
            raise ValueError(
                f"cond and uncond embeddings must have the same shape, got {tuple(self.cond.shape)} "
                f"and {tuple(self.uncond.shape)}"
            )
        if self.uncond is not None and set(self.uncond_added) != set(self.added):
            raise ValueError(
                f"the negative prompt's added conditioning {sorted(self.uncond_added)} must name the same tensors "
                f"as the prompts' {sorted(self.added)}"
            )
        if self.uncond is None and self.uncond_added:
            raise ValueError("uncond_added is given without uncond embeddings")
        B = self.batch_size
        for name, value in (*self.added.items(), *self.uncond_added.items()):
            if value.shape[0] != B:
                raise ValueError(f"added conditioning {name!r} has {value.shape[0]} rows for {B} prompts")

    @property
    def batch_size(self) -> int:
        return self.cond.shape[0]

    def map(self, fn: Callable[[Tensor], Tensor]) -> PromptEmbeds:
        """Apply ``fn`` to every tensor (all batch-first, so row operations stay aligned)."""
        return PromptEmbeds(
            fn(self.cond),
            None if self.uncond is None else fn(self.uncond),
            {name: fn(value) for name, value in self.added.items()},
            {name: fn(value) for name, value in self.uncond_added.items()},
        )

    @staticmethod
    def cat(parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """Stack the rows of several batches (all with or all without negative embeddings)."""
        first = parts[0]
        if any((p.uncond is None) != (first.uncond is None) for p in parts):
            raise ValueError("cannot stack prompt embeddings with and without negative embeddings")
        return PromptEmbeds(
            torch.cat([p.cond for p in parts]),
            None if first.uncond is None else torch.cat([p.uncond for p in parts if p.uncond is not None]),
            {name: torch.cat([p.added[name] for p in parts]) for name in first.added},
            {name: torch.cat([p.uncond_added[name] for p in parts]) for name in first.uncond_added},
        )

    def conditional(self) -> PromptEmbeds:
        """The prompts' branch alone, without the negative one."""
        return PromptEmbeds(self.cond, None, dict(self.added))

    def unconditional(self) -> PromptEmbeds:
        """The negative branch as a batch of its own (what classifier-free guidance runs alongside)."""
        if self.uncond is None:
            raise ValueError("these prompt embeddings have no negative (unconditional) branch")
        return PromptEmbeds(self.uncond, None, dict(self.uncond_added))

    def repeat(self, n: int) -> PromptEmbeds:
        """Tile the batch ``n`` times (``[batch, batch, ...]``), to pair with stacked transitions."""
        return self.map(lambda x: x.repeat(n, *([1] * (x.dim() - 1))))

    def select(self, index: Tensor | slice) -> PromptEmbeds:
        return self.map(lambda x: x[index])

    @property
    def device(self) -> torch.device:
        return self.cond.device

    def at(self, step: int) -> PromptEmbeds:
        """The conditioning of step ``step``: the same at every step."""
        return self

    def for_steps(self, steps: Sequence[int]) -> PromptEmbeds:
        """Rows for stacked transitions of ``steps`` (step-major), see :meth:`Trajectory.transitions`."""
        return self.repeat(len(steps))

    def rows(self, steps: Tensor, samples: Tensor) -> PromptEmbeds:
        """The conditioning of arbitrary (step, sample) rows: sample ``samples[i]`` at step ``steps[i]``."""
        return self.select(samples)


@dataclass
class ScaledPromptEmbeds:
    """Diffusive chain-of-thought conditioning: each step range is conditioned on its own prompt rewrite.

    Sampling goes coarse to fine, so a prompt may come with a layout (coarse), a geometry (mid) and a detail
    (fine) rewrite, each conditioning a contiguous range of steps in sampling order (``method.md`` §6).

    Attributes:
        scales: ``(start, stop, embeds)`` for half-open step ranges that tile ``[0, T)`` in order.
    """

    scales: tuple[tuple[int, int, PromptEmbeds], ...]

    def __post_init__(self) -> None:
        if not self.scales:
            raise ValueError("ScaledPromptEmbeds needs at least one scale")
        expected = 0
        for start, stop, embeds in self.scales:
            if start != expected or stop <= start:
                raise ValueError(
                    f"scale step ranges must tile [0, T) in order, got {[s[:2] for s in self.scales]}"
                )
            if embeds.batch_size != self.scales[0][2].batch_size:
                raise ValueError("every scale must embed the same number of prompts")
            expected = stop

    @property
    def num_steps(self) -> int:
        return self.scales[-1][1]

    @property
    def batch_size(self) -> int:
        return self.scales[0][2].batch_size

    @property
    def device(self) -> torch.device:
        return self.scales[0][2].device

    def at(self, step: int) -> PromptEmbeds:
        for start, stop, embeds in self.scales:
            if start <= step < stop:
                return embeds
        raise IndexError(f"step {step} is outside the scales' steps [0, {self.num_steps})")

    def repeat(self, n: int) -> ScaledPromptEmbeds:
        return ScaledPromptEmbeds(tuple((a, b, e.repeat(n)) for a, b, e in self.scales))

    def for_steps(self, steps: Sequence[int]) -> PromptEmbeds:
        return PromptEmbeds.cat([self.at(k) for k in steps])

    def rows(self, steps: Tensor, samples: Tensor) -> PromptEmbeds:
        """The conditioning of arbitrary (step, sample) rows: each row gets its step's scale."""
        steps, samples = steps.cpu(), samples.cpu()
        parts, positions = [], []
        for start, stop, embeds in self.scales:
            where = ((steps >= start) & (steps < stop)).nonzero().squeeze(1)
            if where.numel():
                parts.append(embeds.select(samples[where].to(embeds.device)))
                positions.append(where)
        # Rows were gathered scale by scale; put them back in the order asked for.
        order = torch.argsort(torch.cat(positions)).to(self.device)
        return PromptEmbeds.cat(parts).select(order)


#: What a trajectory is conditioned on: one embedding for all steps, or one per DCoT scale.
Conditioning = PromptEmbeds | ScaledPromptEmbeds
