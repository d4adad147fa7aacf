"""``Task``: what reward fine-tuning optimises, without the training loop.

A task is a backbone with its LoRA adapters, the sampler over it, the reward, and how to turn prompts into
conditioning and final latents into rewards. ``RLRModule`` holds one and runs the training loop around it;
the diagnostics, the variance map and the benchmarks take one directly, so none of them needs Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from rlr_lightning.data import DCOT_SCALES, PromptBatch
from rlr_lightning.estimators.base import GradientEstimator
from rlr_lightning.memory.plan import MemoryPlan
from rlr_lightning.models import DiffusionBackbone, FlowMatchingBackbone, LoraSettings, load_backbone
from rlr_lightning.rewards import RewardModel
from rlr_lightning.sampling import Conditioning, DiffusionSampler, Plan, ScaledPromptEmbeds

if TYPE_CHECKING:
    from rlr_lightning.sharding import Sharding

TimestepSpacing = Literal["leading", "trailing", "linspace"]


@dataclass(frozen=True)
class SamplingSettings:
    """How a task samples: steps, noise, guidance, resolution and the prompt-side settings. Checked once,
    here, before any model loads.

    Attributes:
        num_steps: Sampling steps ``T``.
        eta: The sampler's noise level (DDIM's eta; the SDE noise level ``a`` of the flow-matching families).
        guidance_scale: Guidance weight (classifier-free guidance; 1 turns it off), or for guidance-distilled
            models the guidance embedding's value.
        timestep_spacing: DDIM timestep spacing override; ``None`` keeps the model's own.
        resolution: Height and width in pixels (one number for square images); ``None``: the model's own.
        num_frames: Video families only (Wan 2.1): frames per video; ``None``: the model's own.
        stochastic_steps: Flow-matching families only: the ``[start, stop)`` steps that run the SDE.
        max_sequence_length: SD 3 and FLUX only: T5 tokens per prompt.
        dcot_split: Fractions of ``T`` where the DCoT mid and fine scales begin.
    """

    num_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 1.0
    timestep_spacing: TimestepSpacing | None = None
    resolution: int | tuple[int, int] | None = None
    num_frames: int | None = None
    stochastic_steps: tuple[int, int] | None = None
    max_sequence_length: int | None = None
    dcot_split: tuple[float, float] = (1 / 3, 2 / 3)

    def __post_init__(self) -> None:
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps!r}")
        if not (isinstance(self.eta, (int, float)) and math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be >= 0, got {self.eta!r}")
        if not self.guidance_scale >= 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 turns guidance off), got {self.guidance_scale}")
        if self.timestep_spacing not in (None, "leading", "trailing", "linspace"):
            raise ValueError(
                f"timestep_spacing must be leading, trailing, linspace or null, got {self.timestep_spacing!r}"
            )
        if self.num_frames is not None and (
            isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int) or self.num_frames < 1
        ):
            raise ValueError(
                f"num_frames must be a positive integer (frames per video), got {self.num_frames!r}"
            )
        mid, fine = self.dcot_split
        if not 0 <= mid <= fine <= 1:
            raise ValueError(f"dcot_split must be two fractions 0 <= mid <= fine <= 1, got {self.dcot_split}")
        # Frozen: normalised through object.__setattr__ (YAML gives lists, the CLI strings of numbers).
        object.__setattr__(self, "dcot_split", (float(mid), float(fine)))
        if self.stochastic_steps is not None:
            start, stop = self.stochastic_steps
            object.__setattr__(self, "stochastic_steps", (int(start), int(stop)))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SamplingSettings:
        """The settings named in ``values`` (e.g. ``RLRModule``'s hyperparameters); other keys are ignored."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def dcot_ranges(self) -> list[tuple[int, int]]:
        """Step ranges ``[start, stop)`` of the coarse, mid and fine scales (some may be empty)."""
        T = self.num_steps
        mid, fine = (round(f * T) for f in self.dcot_split)
        return [(0, mid), (mid, fine), (fine, T)]


class Task:
    """A backbone with LoRA, its sampler and a reward: everything one gradient estimate needs.

    Build one with :meth:`build`. ``reward`` may be ``None`` for sampling only; ``memory_plan`` is how
    graph-carrying calls run (chunks, activation checkpointing), set by the memory planner.

    Args:
        backbone: The model, LoRA adapters added.
        sampler: The sampler over it, with the settings' steps, eta and guidance.
        reward: The reward model, or ``None`` (sampling, export).
        settings: The sampling settings the sampler was made with.
        name: The model's name or path, for messages.
    """

    def __init__(
        self,
        backbone: DiffusionBackbone,
        sampler: DiffusionSampler,
        reward: RewardModel | None,
        settings: SamplingSettings,
        name: str = "",
    ) -> None:
        self.backbone = backbone
        self.sampler = sampler
        self.reward = reward
        self.settings = settings
        self.name = name
        self.memory_plan = MemoryPlan()
        #: How the backbone is sharded over ranks (:mod:`rlr_lightning.sharding`); ``None``: whole on each.
        self.sharding: Sharding | None = None

    @classmethod
    def build(
        cls,
        pretrained_model_name_or_path: str,
        settings: SamplingSettings,
        lora: LoraSettings,
        reward: RewardModel | None = None,
        weight_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> Task:
        """Load the backbone, add LoRA (initialised from ``seed``), move it to ``device`` and make the sampler.

        Args:
            pretrained_model_name_or_path: Built-in name, hub id or pipeline directory (``load_backbone``).
            settings: Sampling settings.
            lora: LoRA rank, alpha and target modules.
            reward: The reward model, or ``None``.
            weight_dtype: Dtype of the frozen weights.
            seed: Seed of LoRA A's random initialisation.
            device: Where the backbone runs.
        """
        backbone = load_backbone(pretrained_model_name_or_path, dtype=weight_dtype)
        name = str(pretrained_model_name_or_path)
        return cls.adapt(backbone, settings, lora, reward, seed, device, name)

    @classmethod
    def adapt(
        cls,
        backbone: DiffusionBackbone,
        settings: SamplingSettings,
        lora: LoraSettings,
        reward: RewardModel | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        name: str = "",
    ) -> Task:
        """A task on a backbone built without LoRA (loaded, or assembled in memory by a benchmark): the
        settings' resolution and prompt length applied, LoRA added (A drawn from ``seed``), moved to ``device``.

        Args:
            backbone: The backbone, without LoRA.
            settings: Sampling settings.
            lora: LoRA rank, alpha and target modules.
            reward: The reward model, or ``None``.
            seed: Seed of LoRA A's random initialisation.
            device: Where the backbone runs.
            name: The model's name, for messages.
        """
        backbone.set_resolution(settings.resolution)
        if settings.num_frames is not None:
            if not backbone.video:
                raise ValueError(
                    f"model.num_frames={settings.num_frames} is for video models (Wan 2.1); "
                    f"{type(backbone).__name__} makes images: leave it unset (null)"
                )
            backbone.set_num_frames(settings.num_frames)
        if settings.max_sequence_length is not None:
            if not isinstance(backbone, FlowMatchingBackbone):
                raise ValueError(
                    f"model.max_sequence_length={settings.max_sequence_length} sets the T5 prompt length of SD 3 "
                    f"and FLUX; {type(backbone).__name__} has no T5 encoder: leave it unset (null)"
                )
            backbone.max_sequence_length = settings.max_sequence_length
        # LoRA A is initialised randomly: seed it from the run's seed, not from whatever state the global
        # RNG is in, so every rank and every rerun starts from the same adapter.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone.add_lora(lora)
        return cls.from_backbone(backbone.to(device), settings, reward, name)

    @classmethod
    def from_backbone(
        cls,
        backbone: DiffusionBackbone,
        settings: SamplingSettings,
        reward: RewardModel | None = None,
        name: str = "",
    ) -> Task:
        """A task on a loaded backbone (LoRA added): its sampler made from ``settings``. Benchmarks share one
        backbone between many configurations this way.

        Args:
            backbone: The loaded backbone, with LoRA, on its device.
            settings: Sampling settings.
            reward: The reward model, or ``None``.
            name: The model's name, for messages.
        """
        check_reward_kind(reward, backbone)
        sampler = backbone.make_sampler(
            settings.num_steps,
            settings.eta,
            settings.guidance_scale,
            settings.timestep_spacing,
            stochastic_steps=settings.stochastic_steps,
        )
        # What trains and what is frozen (Lightning's model summary lists every submodule instead).
        trainable = sum(p.numel() for p in backbone.lora_parameters().values())
        frozen = sum(p.numel() for p in backbone.parameters()) - trainable
        rank_zero_info(
            f"Backbone {name} ({type(backbone).__name__}) ready: {trainable:,} trainable LoRA weights, "
            f"{frozen:,} frozen; {output_size(backbone)}"
        )
        return cls(backbone, sampler, reward, settings, name=name)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters, in the backbone's order."""
        return list(self.backbone.lora_parameters().values())

    def prepare(self, estimator: GradientEstimator) -> GradientEstimator:
        """Check ``estimator`` against the settings and the reward, and let it read the sampler's schedule
        (``RLR(tail="auto")``)."""
        differentiable = True if self.reward is None else self.reward.differentiable
        estimator.setup(self.settings.num_steps, self.settings.eta, differentiable)
        estimator.configure_schedule(self.sampler.kernel.sigma.tolist())
        return estimator

    # -- conditioning and reward ---------------------------------------------------------------------------

    def conditioning(self, batch: PromptBatch) -> Conditioning:
        """Prompt embeddings of a batch: one per step range when its prompts carry DCoT rewrites."""
        negative = self.sampler.uses_guidance
        if not batch.has_dcot:
            return self.backbone.encode_prompts(batch.prompts, negative=negative)
        scales = tuple(
            (start, stop, self.backbone.encode_prompts(batch.scale_prompts(name), negative=negative))
            for (start, stop), name in zip(self.settings.dcot_ranges(), DCOT_SCALES)
            if stop > start
        )
        return ScaledPromptEmbeds(scales)

    def conditioning_for(self, prompts: Sequence[str]) -> Conditioning:
        """Prompt embeddings of plain prompts (no DCoT rewrites)."""
        return self.conditioning(PromptBatch.from_prompts(list(prompts)))

    def latent_reward(self, latents: Tensor, prompts: Sequence[str]) -> Tensor:
        """Rewards of final latents: decode, then score (the ``reward_fn`` estimators take)."""
        if self.reward is None:
            raise ValueError(f"the task on {self.name!r} has no reward to score images with")
        return self.reward(self.backbone.decode(latents), prompts)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Checkpointing of the first-order path's VAE decoder and reward model (the sampler's windows follow
        ``memory_plan``)."""
        self.backbone.set_decoder_checkpointing(enabled)
        if self.reward is not None:
            self.reward.set_activation_checkpointing(enabled)

    @torch.no_grad()
    def generate(self, batch: PromptBatch, generator: torch.Generator) -> Tensor:
        """Images in [0, 1] for a batch of prompts, without gradient (evaluation and sample logging)."""
        final = self.sampler.run(
            Plan(self.settings.num_steps), self.conditioning(batch), generator=generator
        ).final
        return self.backbone.decode(final)


def output_size(backbone: DiffusionBackbone) -> str:
    """What the backbone samples, in words: ``32x32 images``, or ``9-frame 32x32 videos``."""
    size = "x".join(map(str, backbone.resolution))
    return f"{backbone.num_frames}-frame {size} videos" if backbone.video else f"{size} images"


def check_reward_kind(reward: RewardModel | None, backbone: DiffusionBackbone) -> None:
    """Refuse an image reward for a video model and a video reward for an image model, naming the fix."""
    if reward is None or reward.video == backbone.video:
        return
    if backbone.video:
        raise ValueError(
            f"{type(backbone).__name__} makes videos, and {type(reward).__name__} scores images: wrap it as "
            "rlr_lightning.rewards.PerFrameReward(reward=...) (its mean over frames), or use a video reward"
        )
    raise ValueError(
        f"{type(backbone).__name__} makes images, and {type(reward).__name__} scores videos: use an image reward"
    )


def as_task(task_or_module: Task | Any) -> Task:
    """``task_or_module`` itself if it is a :class:`Task`, else its ``task`` (an ``RLRModule``'s, which must
    have loaded its model: ``configure_model``)."""
    if isinstance(task_or_module, Task):
        return task_or_module
    task = getattr(task_or_module, "task", None)
    if not isinstance(task, Task):
        raise TypeError(f"expected a Task or an RLRModule, got {type(task_or_module).__name__}")
    return task
