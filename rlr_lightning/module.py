"""``RLRModule``: the LightningModule that wires backbone, sampler, reward and gradient estimator.

One training step: encode prompts, let the estimator plan, sample one trajectory per prompt, score the
final images, compute advantages over the global batch, then backpropagate the estimator's surrogate terms
one at a time (manual optimization). Every backward except the last one of an optimizer step runs without
gradient synchronisation, so each rank makes exactly one synchronised backward per step.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import CatMetric, MeanMetric

from rlr_lightning import rewards as reward_models
from rlr_lightning.data import DCOT_SCALES, PromptBatch
from rlr_lightning.estimators import RLR, GradientEstimator, derive_seed, flat_grad, rollout
from rlr_lightning.estimators.regularizers import kl_terms
from rlr_lightning.evaluation import image_features, mean_pairwise_distance
from rlr_lightning.hub import DTYPES
from rlr_lightning.memory import (
    MemoryPlan,
    PlannedMemory,
    measure_costs,
    plan_memory,
    resolve_budget,
)
from rlr_lightning.models import DiffusionBackbone, FlowMatchingBackbone, LoraSettings, load_backbone
from rlr_lightning.rewards import RewardModel, TargetColor
from rlr_lightning.sampling import (
    Conditioning,
    DiffusionSampler,
    Plan,
    ScaledPromptEmbeds,
)
from rlr_lightning.tiny import TINY_MODELS, TINY_PIPELINE_MARKER

logger = logging.getLogger(__name__)

#: The model name that builds the tiny offline pipeline into the cache instead of loading one.
TINY_MODEL = "tiny"
#: Written next to an exported ``pytorch_lora_weights.safetensors``: which run wrote it (see ``export_dir``).
EXPORT_RECORD = "rlr_export.json"


class TrainingStalledError(RuntimeError):
    """Too many consecutive updates were skipped (non-finite rewards or gradients): the run cannot progress."""


class ExportConflictError(FileExistsError):
    """The requested ``export_dir`` already holds LoRA weights exported by another run."""


def is_tiny_model(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a tiny offline model: ``tiny``, or a directory ``rlr_lightning.tiny`` built."""
    return name_or_path in TINY_MODELS or (Path(name_or_path) / TINY_PIPELINE_MARKER).is_file()


def reward_class_names() -> list[str]:
    """The reward models ``rlr_lightning.rewards`` offers (class names for ``model.reward``)."""
    return sorted(
        name for name in reward_models.__all__
        if isinstance(cls := getattr(reward_models, name), type) and issubclass(cls, RewardModel)
        and cls is not RewardModel
    )


def export_owner(directory: Path) -> str | None:
    """The run id that exported the LoRA weights in ``directory``; ``None`` if it holds no export.

    An export without a readable record (written by hand or by an older version) belongs to an unknown run.
    """
    record = directory / EXPORT_RECORD
    if record.is_file():
        try:
            return str(json.loads(record.read_text())["run_id"])
        except (ValueError, KeyError, TypeError):
            return "unknown"
    return "unknown" if (directory / "pytorch_lora_weights.safetensors").exists() else None


def _default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW with the RLR paper's settings (lr 1e-3, weight decay 1e-4)."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


class RLRModule(L.LightningModule):
    """Reward fine-tuning of a diffusion model's LoRA adapters with a gradient estimator (RLR by default).

    Args:
        pretrained_model_name_or_path: Hub id or diffusers pipeline directory of the backbone (Stable Diffusion
            1.x / 2.x, SDXL, SD 3 / 3.5 or FLUX.1, told apart by the pipeline's ``model_index.json``); ``tiny``,
            ``tiny-sdxl``, ``tiny-sd3`` and ``tiny-flux`` build a tiny offline model of that family with random
            weights into ``~/.cache/rlr_lightning``; ``shapes-world`` is the small pipeline trained on the shapes
            world that ships with the package (the CPU quickstart).
        estimator: The gradient estimator: ``RLR`` (default), ``FullBackprop``, ``TruncatedBackprop``,
            ``ScoreFunction`` or the ``GRPO`` baseline from ``rlr_lightning.estimators``.
        reward: The reward model (a class of ``rlr_lightning.rewards``, e.g. ``AestheticReward``). Required to
            train and to validate, for every model except the tiny offline ones, where it defaults to the toy
            ``TargetColor``; sampling (:meth:`generate`) and exporting the LoRA need none. Checkpoints hold no
            reward (it is left out of the hyperparameters), so ``RLRModule.load_from_checkpoint(path)`` loads
            without one; pass ``reward=...`` there to train or validate further.
        num_steps: Sampling steps ``T``.
        eta: The sampler's noise level, > 0 wherever likelihood ratios are used: DDIM's eta for Stable Diffusion
            and SDXL (1 is DDPM-like), the SDE noise level ``a`` of Flow-GRPO's sampler for SD 3 and FLUX (0 is
            the ODE sampler; Flow-GRPO trains with 0.7).
        guidance_scale: Guidance weight: classifier-free guidance (1 turns it off), or for guidance-distilled
            models (FLUX.1-dev) the guidance embedding's value (3.5 in its pipeline).
        timestep_spacing: Override the scheduler's DDIM timestep spacing (``leading``, ``trailing``,
            ``linspace``); ``None`` keeps the model's own.
        resolution: Height and width of the generated images in pixels (one number for square images, or
            ``[height, width]``); ``None``: the model's own (Stable Diffusion and SDXL: the UNet's sample size,
            SD 3: the transformer's, FLUX: the VAE's, 1024 for FLUX.1). Flow-GRPO trains SD 3.5 and FLUX at 512.
        stochastic_steps: SD 3 and FLUX only: run the SDE on the steps ``[start, stop)`` and the deterministic ODE
            on the others (MixGRPO, Flow-GRPO-Fast), e.g. ``[0, 2]``; pair it with ``GRPO(step_range=...)``, which
            trains only those steps. Estimators that score every step by likelihood ratio (RLR, the score function)
            need every step stochastic: ``None``.
        max_sequence_length: SD 3 and FLUX only: T5 tokens per prompt, as their pipelines' argument of that name
            (at most 512); ``None``: the pipeline's default (256 for SD 3, 512 for FLUX). Fewer tokens make every
            transformer call cheaper; longer prompts are cut (and said so once).
        dcot_split: For prompts with DCoT rewrites: the fractions of ``T`` where the mid and the fine scales
            begin (the coarse rewrite conditions the steps before the first, in sampling order).
        lora: LoRA rank, alpha and target modules on the UNet.
        weight_dtype: Dtype of the frozen backbone weights (``bfloat16`` on GPUs; LoRA stays float32).
        gradient_accumulation_steps: Micro-batches per optimizer step.
        gradient_clip_val: Clip the LoRA gradient norm to this value (``None`` to disable).
        optimizer: Optimizer factory over the LoRA parameters (default AdamW, lr 1e-3, weight decay 1e-4).
        lr_scheduler: Optional learning-rate scheduler factory, stepped after every optimizer step.
        seed: Seed of block starts, noises and perturbations (combined with the step and the rank).
        log_term_grad_norms: Log the gradient norm of each estimator term (FO / HO / ZO) separately; costs
            one copy of the LoRA gradients per term.
        export_dir: Where the LoRA weights are exported at the end of fit; defaults to ``<log dir>/lora``
            (with the logger off, ``<default_root_dir>/lora``, or ``lora_1``, ``lora_2``, ... if that holds
            another run's export). An export is never overwritten by another run: each carries a record of
            the run that wrote it (``rlr_export.json``), a run resumed from its checkpoint replaces its own,
            and an ``export_dir`` that holds another run's export is refused before training starts.
        max_consecutive_skips: Stop with an error after this many updates in a row were skipped for a
            non-finite reward or gradient (a broken reward or a diverged model never recovers by itself).
        memory_budget_gb: Device memory one training step may use, in GiB, or ``auto`` for the device's free
            memory. Before the first step the module measures what one denoiser call and the decode + reward
            path cost on the real model, then picks ``chunk_samples``, ``activation_checkpointing`` and, for
            ``RLR(h="auto")``, the block length, and logs the plan; a configuration that cannot fit fails at
            once, saying what to lower. ``None``: no planning (the two options below, as given).
        chunk_samples: At most this many samples (prompts) per graph-carrying model call group: likelihood-ratio
            re-scoring calls and replays of the first- and half-order windows run chunk by chunk, each
            chunk's backward before the next one's forward. Gradients are the same for every chunk size;
            memory falls with it, speed too. ``None``: chosen by the planner, or no chunking without a budget.
        activation_checkpointing: Recompute, in backward, the denoiser calls of multi-step gradient windows,
            the VAE decoder's blocks and the reward model on the first-order path instead of keeping their
            activations (about one extra forward of those). ``None``: chosen by the planner, or off without a
            budget.
        metrics: Extra reward models reported on the validation prompts (e.g. train on aesthetic, also
            report HPSv2); they are never trained on.
        kl_coefficient: Weight ``beta`` of a KL penalty toward the base model (LoRA off), with any estimator:
            per stochastic step, ``mean_d (m_theta - m_base)^2 / (2 sigma^2)`` at the sampled states, summed over
            steps (:mod:`rlr_lightning.estimators.regularizers`); logged as ``train/kl``. It keeps what the base
            model does well from drifting while the reward pulls elsewhere. Needs eta > 0. 0 turns it off.
        kl_steps: Stochastic steps drawn per batch for the KL penalty (their sum scaled to all steps: unbiased);
            each costs two network calls per sample.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str = TINY_MODEL,
        estimator: GradientEstimator | None = None,
        reward: RewardModel | None = None,
        num_steps: int = 20,
        eta: float = 1.0,
        guidance_scale: float = 1.0,
        timestep_spacing: Literal["leading", "trailing", "linspace"] | None = None,
        resolution: int | tuple[int, int] | None = None,
        stochastic_steps: tuple[int, int] | None = None,
        max_sequence_length: int | None = None,
        dcot_split: tuple[float, float] = (1 / 3, 2 / 3),
        lora: LoraSettings = LoraSettings(),
        weight_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_accumulation_steps: int = 1,
        gradient_clip_val: float | None = 1.0,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        log_term_grad_norms: bool = True,
        export_dir: str | None = None,
        max_consecutive_skips: int = 20,
        memory_budget_gb: float | Literal["auto"] | None = None,
        chunk_samples: int | None = None,
        activation_checkpointing: bool | None = None,
        metrics: list[RewardModel] | None = None,
        kl_coefficient: float = 0.0,
        kl_steps: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["estimator", "reward", "optimizer", "lr_scheduler", "metrics"])
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1 turns guidance off), got {guidance_scale}")
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        if not 0 <= dcot_split[0] <= dcot_split[1] <= 1:
            raise ValueError(f"dcot_split must be two fractions 0 <= mid <= fine <= 1, got {dcot_split}")
        if weight_dtype not in DTYPES:
            raise ValueError(f"weight_dtype must be one of {sorted(DTYPES)}, got {weight_dtype!r}")
        inner_updates = getattr(estimator, "inner_updates", 1)
        if inner_updates > 1 and gradient_accumulation_steps > 1:
            raise ValueError(
                f"the estimator takes {inner_updates} optimizer steps per batch (inner_updates), which cannot be "
                f"combined with gradient_accumulation_steps={gradient_accumulation_steps}: raise data.batch_size or "
                "the estimator's group_size instead, or set inner_updates to 1"
            )
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        if not kl_coefficient >= 0:
            raise ValueError(f"kl_coefficient must be >= 0 (0 turns the KL penalty off), got {kl_coefficient!r}")
        if not isinstance(kl_steps, int) or kl_steps < 1:
            raise ValueError(f"kl_steps must be an integer >= 1, got {kl_steps!r}")
        if kl_coefficient > 0 and eta == 0:
            raise ValueError(
                "kl_coefficient > 0 needs a stochastic sampler: eta is 0, and deterministic transitions have no KL "
                "divergence; set eta > 0, or kl_coefficient 0 (weight decay on the LoRA regularises any sampler)"
            )
        if kl_coefficient > 0 and getattr(estimator, "kl_coefficient", 0.0) > 0:
            raise ValueError(
                "both model.kl_coefficient and the GRPO estimator's kl_coefficient are set: the penalty would count "
                "twice; keep one (model.kl_coefficient works with every estimator)"
            )
        if reward is None and is_tiny_model(pretrained_model_name_or_path):
            # The toy default only makes sense for the tiny model: a real model would silently learn to paint
            # one colour, so it gets none and training asks for one (see ``setup``).
            reward = TargetColor()
        self.automatic_optimization = False
        # Checkpoints hold only LoRA weights; the frozen backbone is reloaded from its source.
        self.strict_loading = False
        self.pretrained_model_name_or_path = pretrained_model_name_or_path
        self.estimator = estimator if estimator is not None else RLR()
        # No reward is allowed here: sampling and export need none, and a checkpoint has none to restore
        # (save_hyperparameters leaves it out). Training and validation ask for one in ``setup``.
        self.reward: RewardModel | None = reward.freeze() if reward is not None else None
        #: The checkpoint's reward class (``on_load_checkpoint``), named when training asks for a reward.
        self.checkpoint_reward: str | None = None
        # Impossible settings (h >= T, eta = 0 with likelihood ratios, a reward without gradient for a
        # backprop estimator) fail here, before any model is loaded. Without a reward its differentiability
        # is checked in ``setup``, once there is one.
        self.estimator.setup(num_steps, eta, self._reward_differentiable)
        # Which reward the estimator was set up with, by identity (a module attribute would register the
        # reward a second time as a submodule).
        self._estimator_reward_id = None if self.reward is None else id(self.reward)
        self.num_steps = num_steps
        self.eta = eta
        self.guidance_scale = guidance_scale
        self.timestep_spacing = timestep_spacing
        self.resolution = resolution
        self.stochastic_steps = None if stochastic_steps is None else (int(stochastic_steps[0]), int(stochastic_steps[1]))
        self.max_sequence_length = max_sequence_length
        self.dcot_split = (float(dcot_split[0]), float(dcot_split[1]))
        self.lora_settings = lora
        self.weight_dtype = DTYPES[weight_dtype]
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.gradient_clip_val = gradient_clip_val
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.seed = seed
        self.log_term_grad_norms = log_term_grad_norms
        self.export_dir = export_dir
        self.max_consecutive_skips = max_consecutive_skips
        self.kl_coefficient = float(kl_coefficient)
        self.kl_steps = kl_steps
        if memory_budget_gb is not None and memory_budget_gb != "auto" and not float(memory_budget_gb) > 0:
            raise ValueError(f"memory_budget_gb must be > 0 GiB or 'auto', got {memory_budget_gb!r}")
        if chunk_samples is not None and chunk_samples < 1:
            raise ValueError(f"chunk_samples must be >= 1 (or null to let the planner choose), got {chunk_samples}")
        if getattr(self.estimator, "h", None) == "auto" and memory_budget_gb is None:
            raise ValueError(
                "RLR(h='auto') chooses the block length from the memory budget: set model.memory_budget_gb "
                "(a number of GiB, or auto), or give h a number"
            )
        self.memory_budget_gb = memory_budget_gb
        self.chunk_samples = chunk_samples
        self.activation_checkpointing = activation_checkpointing
        self.planned_memory: PlannedMemory | None = None
        self._memory_planned = False
        # Until the planner runs (first step): the user's choices, unchunked and without checkpointing otherwise.
        self.memory_plan = MemoryPlan(chunk_samples, bool(activation_checkpointing))
        self.metrics = nn.ModuleList([m.freeze() for m in metrics or []])
        self.metric_names = [type(m).__name__ for m in self.metrics]
        # Validation aggregates, synchronised across ranks by torchmetrics.
        self.val_rewards = CatMetric()
        self.val_metric_values = nn.ModuleList([CatMetric() for _ in self.metrics])
        self.val_diversity = MeanMetric()
        self.backbone: DiffusionBackbone | None = None
        self.sampler: DiffusionSampler | None = None
        self.skipped_updates = 0
        self.consecutive_skips = 0
        #: Why an earlier micro-batch of the current optimizer step was dropped (``None``: none was).
        self._window_skip_cause: str | None = None
        # Identifies this run's LoRA export (checkpointed, so a resumed run recognises its own export).
        self.run_id = uuid.uuid4().hex
        self.export_target: Path | None = None
        self.exported_lora: Path | None = None

    # -- model ---------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Ask for the reward before anything loads: training and validation score samples with it.

        Args:
            stage: Lightning's stage (``fit``, ``validate``, ``test``, ``predict``).
        """
        if stage not in ("fit", "validate"):
            return
        if self.reward is None:
            raise ValueError(self.missing_reward_message("train" if stage == "fit" else "validate"))
        if id(self.reward) != self._estimator_reward_id:
            # A reward given after construction (``module.reward = ...``): the estimator's checks and choices
            # that depend on it (a backprop estimator needs a gradient; RLR scores the last step of a
            # non-differentiable reward by likelihood ratio) have not seen it yet.
            self.reward.freeze()
            self.estimator.setup(self.num_steps, self.eta, self.reward.differentiable)
            self._estimator_reward_id = id(self.reward)

    @property
    def _reward_differentiable(self) -> bool:
        # Without a reward yet, the estimator's reward checks wait for one (``setup``).
        return True if self.reward is None else self.reward.differentiable

    def prepare_estimator(self, estimator: GradientEstimator | None = None) -> GradientEstimator:
        """Check ``estimator`` (default: the module's) against this module's steps, eta and reward, and let it
        read the sampler's schedule (``RLR(tail="auto")``); benchmarks and diagnostics call it for estimators
        other than the module's. Needs the model loaded (``configure_model``)."""
        estimator = self.estimator if estimator is None else estimator
        estimator.setup(self.num_steps, self.eta, self._reward_differentiable)
        estimator.configure_schedule(self.sampler.kernel.sigma.tolist())
        return estimator

    def missing_reward_message(self, action: str) -> str:
        """What to do when there is no reward to ``action`` (``train`` or ``validate``) with."""
        trained = (f" (this checkpoint was trained with {self.checkpoint_reward})"
                   if self.checkpoint_reward else "")
        return (
            f"model.reward is required to {action} {self.pretrained_model_name_or_path!r}: choose one of "
            f"rlr_lightning.rewards ({', '.join(reward_class_names())}), e.g. --model.reward "
            "rlr_lightning.rewards.AestheticReward on the command line, or RLRModule(reward=...) from "
            f"Python. Checkpoints hold no reward{trained}: give it to "
            "RLRModule.load_from_checkpoint(path, reward=...). Sampling (generate) and export_lora need none."
        )

    def configure_model(self) -> None:
        if self.backbone is not None:  # idempotent: load_from_checkpoint and fit both call it
            return
        backbone = load_backbone(self.pretrained_model_name_or_path, dtype=self.weight_dtype)
        backbone.set_resolution(self.resolution)
        if self.max_sequence_length is not None:
            if not isinstance(backbone, FlowMatchingBackbone):
                raise ValueError(
                    f"model.max_sequence_length={self.max_sequence_length} sets the T5 prompt length of SD 3 and FLUX; "
                    f"{type(backbone).__name__} has no T5 encoder: leave it unset (null)"
                )
            backbone.max_sequence_length = self.max_sequence_length
        # LoRA A is initialised randomly: seed it from the run's seed, not from whatever state the global
        # RNG is in, so every rank and every rerun starts from the same adapter.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            backbone.add_lora(self.lora_settings)
        self.backbone = backbone.to(self.device)
        self.sampler = self.backbone.make_sampler(
            self.num_steps, self.eta, self.guidance_scale, self.timestep_spacing, stochastic_steps=self.stochastic_steps
        )
        self.estimator.configure_schedule(self.sampler.kernel.sigma.tolist())
        # The model summary of the rlr command: what trains and what is frozen (Lightning's table lists
        # every submodule, FLOPs it cannot measure and train/eval modes that are intended).
        trainable = sum(p.numel() for p in self.backbone.lora_parameters().values())
        frozen = sum(p.numel() for p in self.backbone.parameters()) - trainable
        rank_zero_info(
            f"Backbone {self.pretrained_model_name_or_path} ({type(backbone).__name__}) ready: "
            f"{trainable:,} trainable LoRA weights, {frozen:,} frozen; {'x'.join(map(str, backbone.resolution))} images"
        )

    # -- memory ------------------------------------------------------------------------------------------

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Checkpointing of the first-order path's VAE decoder and reward model (the sampler's windows follow
        ``memory_plan``)."""
        self.backbone.set_decoder_checkpointing(enabled)
        self.reward.set_activation_checkpointing(enabled)

    def plan_memory(self, prompts: list[str]) -> PlannedMemory | None:
        """Measure the real model's memory costs and choose the memory plan for ``memory_budget_gb``.

        Runs once, before the first sampling (the first training step calls it; benchmarks may call it
        first). Under data parallelism rank zero's plan is used everywhere, so every rank runs the same block
        length. Raises :class:`~rlr_lightning.memory.MemoryBudgetError` when nothing fits.
        """
        self._memory_planned = True
        if self.memory_budget_gb is None:
            self.set_activation_checkpointing(self.memory_plan.activation_checkpointing)
            return None
        budget = resolve_budget(self.memory_budget_gb, self.device)
        sampler, T = self.sampler, self.num_steps
        prompt = [prompts[0]]
        step = T // 2  # a middle step: every step costs the same, and its sigma is > 0 wherever eta is

        def step_fn(n: int, grad: bool, checkpoint: bool) -> Tensor:
            embeds = self.conditioning_for(prompt * n)
            x, noise = sampler.initial_noise(n, torch.Generator().manual_seed(0), self.device)
            with torch.set_grad_enabled(grad):
                return sampler.step(step, x, embeds.at(step), noise=noise[step], checkpoint=checkpoint).next_latents

        def reward_fn(latents: Tensor) -> Tensor:
            return self.latent_reward(latents, prompt * latents.shape[0])

        costs = measure_costs(step_fn, reward_fn, self.set_activation_checkpointing, [self.backbone, self.reward],
                              self.device)
        h = getattr(self.estimator, "h", None)
        local_prompts = len(prompts)
        planned = plan_memory(
            costs, budget, lambda block: self.estimator.graph_shape(T, local_prompts, block), h=h,
            chunk_samples=self.chunk_samples, activation_checkpointing=self.activation_checkpointing, num_steps=T,
            max_block=self.estimator.max_block_length(T),
        )
        if self._trainer is not None and self.trainer.world_size > 1:
            planned = self.trainer.strategy.broadcast(planned)
        self.planned_memory = planned
        self.memory_plan = planned.plan
        if h == "auto":
            self.estimator.h = planned.h
            self.estimator.setup(T, self.eta, self.reward.differentiable)
        self.set_activation_checkpointing(planned.plan.activation_checkpointing)
        rank_zero_info(f"Measured {costs.describe()}")
        description = planned.describe()
        rank_zero_info(description[0].upper() + description[1:])
        return planned

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.lora_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    # -- one step ----------------------------------------------------------------------------------------

    def dcot_ranges(self) -> list[tuple[int, int]]:
        """Step ranges ``[start, stop)`` of the coarse, mid and fine scales (some may be empty)."""
        T = self.num_steps
        mid, fine = (round(f * T) for f in self.dcot_split)
        return [(0, mid), (mid, fine), (fine, T)]

    def conditioning(self, batch: PromptBatch) -> Conditioning:
        """Prompt embeddings of a batch: one per step range when its prompts carry DCoT rewrites."""
        negative = self.sampler.uses_guidance
        if not batch.has_dcot:
            return self.backbone.encode_prompts(batch.prompts, negative=negative)
        scales = tuple(
            (start, stop, self.backbone.encode_prompts(batch.scale_prompts(name), negative=negative))
            for (start, stop), name in zip(self.dcot_ranges(), DCOT_SCALES)
            if stop > start
        )
        return ScaledPromptEmbeds(scales)

    def conditioning_for(self, prompts: list[str]) -> Conditioning:
        """Prompt embeddings of plain prompts (no DCoT rewrites)."""
        return self.conditioning(PromptBatch.from_prompts(prompts))

    def latent_reward(self, latents: Tensor, prompts) -> Tensor:
        """Rewards of final latents: decode, then score (the ``reward_fn`` estimators take)."""
        return self.reward(self.backbone.decode(latents), prompts)

    def _gather(self, x: Tensor) -> Tensor:
        return self.all_gather(x).reshape(-1)

    def _no_sync(self, sync: bool):
        strategy = self.trainer.strategy
        if sync or not isinstance(strategy, ParallelStrategy):
            return contextlib.nullcontext()
        return strategy.block_backward_sync()

    def _lora_grad(self) -> Tensor:
        return flat_grad(self.lora_parameters())

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        started = time.perf_counter()
        optimizer = self.optimizers()
        micro = batch_idx % self.gradient_accumulation_steps
        last_micro = micro == self.gradient_accumulation_steps - 1
        if micro == 0:
            self._window_skip_cause = None
        if self._window_skip_cause is not None:
            # An earlier micro-batch of this optimizer step was dropped: stepping on the others' partial sum
            # would be a biased update. The flag comes from gathered rewards, so every rank agrees here.
            if last_micro:
                self._skip(optimizer, self._window_skip_cause, reward_at_fault=True)
            return
        embeds = self.conditioning(batch)
        # The block start (and everything else that shapes the graph) is drawn from a seed shared by all
        # ranks; noises and perturbations from one that differs per rank. Both derive from checkpointed
        # counters (not batch_idx), so a resumed run draws what the uninterrupted run would have drawn, and
        # a skipped update is retried with fresh noise.
        step_seed = derive_seed(self.seed, self.global_step, micro, self.skipped_updates)
        rank_seed = derive_seed(self.seed, self.global_step, micro, self.skipped_updates, self.global_rank, 1)
        if not self._memory_planned:
            self.plan_memory(batch.prompts)
        result = rollout(
            self.estimator, self.sampler, embeds, batch.prompts, self.latent_reward, step_seed, rank_seed,
            gather=self._gather, memory=self.memory_plan,
        )
        rewards = result.all_rewards
        if not bool(torch.isfinite(rewards).all()):
            # Log this step's metrics as NaN: a logger or progress bar would otherwise repeat the last
            # finite values, as if training went on normally.
            nan = {term.name: float("nan") for term in result.terms}
            self._log_step(result, nan, nan if self.log_term_grad_norms else {}, started)
            self.log("train/grad_norm", float("nan"))
            # Every rank sees the same gathered rewards, so every rank skips together.
            bad = int((~torch.isfinite(rewards)).sum())
            cause = f"non-finite reward ({bad} of {rewards.numel()})"
            if last_micro:
                self._skip(optimizer, cause, reward_at_fault=True)
            else:  # the whole optimizer step is dropped, once, at its last micro-batch
                optimizer.zero_grad(set_to_none=True)
                self._window_skip_cause = cause
            return

        term_losses, term_norms = self._backward_terms(result.terms + self._penalty_terms(result, step_seed),
                                                       last_micro)
        if not last_micro:
            self._log_step(result, term_losses, term_norms, started)
            return
        try:
            stepped = self._optimizer_step(optimizer)
            # GRPO: more optimizer steps on the same samples, each re-scoring them at the updated weights (the
            # logged losses and clip statistics are the last update's).
            for _ in range(1, self.estimator.inner_updates if stepped else 1):
                terms = self.estimator.terms(result, self.sampler, result.embeds)
                terms += self._penalty_terms(result, step_seed)
                term_losses, term_norms = self._backward_terms(terms, True)
                if not self._optimizer_step(optimizer):
                    break
        finally:  # logged even when a skip stops the run
            self._log_step(result, term_losses, term_norms, started)
        if stepped:
            self.estimator.observe(result, self._mean_over_ranks(term_norms))

    def _penalty_terms(self, result, step_seed: int) -> list:
        """The KL penalty's terms (none when it is off): the same drawn steps on every rank and inner update."""
        if self.kl_coefficient == 0:
            return []
        return kl_terms(result, self.sampler, result.embeds, self.kl_coefficient, self.kl_steps, step_seed)

    def _backward_terms(self, terms, last_micro: bool) -> tuple[dict[str, float], dict[str, float]]:
        """Backpropagate the surrogate terms one at a time; their losses and (optionally) gradient norms by name.

        A memory plan splits one kind of term (``fo``, ``ho``, ``zo``) into chunks of samples or steps. The
        norm of a kind is that of the sum of its chunks' gradients, as unchunked: the per-chunk gradients are
        summed first (a norm of a sum is not a sum of norms), so the logged norms and the ``grad_norm``
        block law see the same numbers whatever the plan.
        """
        term_grads: dict[str, Tensor] = {}
        term_losses: dict[str, float] = {}
        for i, term in enumerate(terms):
            before = self._lora_grad() if self.log_term_grad_norms else None
            loss = term.loss() / self.gradient_accumulation_steps
            with self._no_sync(last_micro and i == len(terms) - 1):
                self.manual_backward(loss)
            term_losses[term.name] = term_losses.get(term.name, 0.0) + float(loss.detach())
            if before is not None:
                share = self._lora_grad() - before
                term_grads[term.name] = term_grads[term.name] + share if term.name in term_grads else share
            del loss
        term_norms = {name: float(grad.norm()) for name, grad in term_grads.items()}
        return term_losses, term_norms

    def _optimizer_step(self, optimizer) -> bool:
        """Step on the accumulated gradient (clipped), or skip a non-finite one; whether the step was taken."""
        grads = self._lora_grad()
        self.log("train/grad_norm", grads.norm(), prog_bar=False)
        if not bool(torch.isfinite(grads).all()):
            self._skip(optimizer, "non-finite gradient", reward_at_fault=False)
            return False
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        optimizer.step()
        self.consecutive_skips = 0
        self.log("train/skipped_updates", float(self.skipped_updates))
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return True

    def _skip(self, optimizer, why: str, reward_at_fault: bool) -> None:
        """Drop this update entirely: gradients cleared, weights and optimizer state untouched.

        ``max_steps`` counts real updates only, so a run whose every update is skipped would never end: after
        ``max_consecutive_skips`` in a row it stops with :class:`TrainingStalledError`.
        """
        optimizer.zero_grad(set_to_none=True)
        self.skipped_updates += 1
        self.consecutive_skips += 1
        self.log("train/skipped_updates", float(self.skipped_updates))
        if self.consecutive_skips >= self.max_consecutive_skips:
            if reward_at_fault:
                advice = ("check the reward model (model.reward): it returns NaN or inf for these images; if it "
                          "did so only after training started, the model diverged: lower the learning rate")
            else:
                advice = ("lower the learning rate (model.optimizer, e.g. --model.optimizer.init_args.lr) or set "
                          "model.gradient_clip_val; check that the reward has a finite gradient")
            raise TrainingStalledError(
                f"Stopped at step {self.global_step}: the last {self.consecutive_skips} updates were all skipped "
                f"(last cause: {why}); {advice}. The LoRA weights are those of the last real update. "
                f"model.max_consecutive_skips={self.max_consecutive_skips} sets how many skips in a row are "
                "tolerated."
            )
        logger.warning(
            "Skipping update at step %d: %s (%d in a row; the run stops at %d)",
            self.global_step, why, self.consecutive_skips, self.max_consecutive_skips,
        )

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        # Running statistics that shape later plans (the grad-norm block law) must agree on every rank.
        if not values or self.trainer.world_size == 1:
            return values
        keys = sorted(values)
        mean = self.all_gather(torch.tensor([values[k] for k in keys], device=self.device)).reshape(-1, len(keys))
        return dict(zip(keys, mean.mean(0).tolist()))

    def _log_step(self, result, term_losses, term_norms, started: float) -> None:
        r = result.all_rewards
        self.log("train/reward", r.mean(), prog_bar=True)
        self.log_dict(
            {"train/reward_std": r.std() if r.numel() > 1 else torch.zeros(()),
             "train/reward_min": r.min(), "train/reward_max": r.max()}
        )
        # Per-term statistics are rank-local before the gradient all-reduce: log their mean over ranks. Every
        # rank logs the same keys here (the plan, hence the terms, is shared), so the reductions line up.
        for name, value in term_losses.items():
            self.log(f"train/loss_{name}", value, sync_dist=True)
        for name, value in term_norms.items():
            self.log(f"train/grad_norm_{name}", value, sync_dist=True)
        for name, value in {**result.plan.info, **result.info}.items():
            if isinstance(value, (int, float)):
                self.log(f"train/{name}", float(value))
        elapsed = time.perf_counter() - started
        images = len(result.prompts) * self.trainer.world_size  # antithetic pairs sample each prompt twice
        self.log("train/images_per_sec", images / max(elapsed, 1e-9), prog_bar=True)
        if self.estimator.inner_updates > 1:
            # max_steps counts optimizer steps, inner updates included: how many batches were sampled for them.
            self.log("train/sampled_batches", float(self.trainer.fit_loop.total_batch_idx + 1))

    # -- sampling and evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, batch: PromptBatch, generator: torch.Generator) -> Tensor:
        """Images in [0, 1] for a batch of prompts, without gradient (evaluation and sample logging)."""
        embeds = self.conditioning(batch)
        final = self.sampler.run(Plan(self.num_steps), embeds, generator=generator).final
        return self.backbone.decode(final)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        # Fixed seeds per validation batch: every evaluation sees the same noise, so curves are comparable.
        generator = torch.Generator().manual_seed(derive_seed(self.seed, 0x5EED, batch_idx, self.global_rank))
        images = self.generate(batch, generator)
        with torch.no_grad():
            self.val_rewards.update(self.reward(images, batch.prompts))
            for metric, values in zip(self.metrics, self.val_metric_values):
                values.update(metric(images, batch.prompts))
            if len(batch) > 1:
                self.val_diversity.update(mean_pairwise_distance(image_features(images, self.reward)))

    def on_validation_epoch_end(self) -> None:
        rewards = self.val_rewards.compute().float().reshape(-1)
        stats = {"val/reward_mean": rewards.mean(), "val/reward_std": rewards.std() if rewards.numel() > 1 else 0.0}
        for name, values in zip(self.metric_names, self.val_metric_values):
            v = values.compute().float().reshape(-1)
            stats[f"val/{name}_mean"] = v.mean()
            stats[f"val/{name}_std"] = v.std() if v.numel() > 1 else 0.0
            values.reset()
        if self.val_diversity.update_called:
            stats["val/diversity"] = self.val_diversity.compute()
        self.val_diversity.reset()
        self.val_rewards.reset()
        # Already aggregated over all ranks: every rank logs the same values.
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in stats.items()}, prog_bar=False)

    # -- checkpoints and export ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if "lora_" not in k]:
            del state[key]
        checkpoint["rlr_estimator"] = self.estimator.state_dict()
        checkpoint["rlr_skipped_updates"] = self.skipped_updates
        checkpoint["rlr_consecutive_skips"] = self.consecutive_skips
        checkpoint["rlr_run_id"] = self.run_id
        if self.reward is not None:  # named when a loaded module needs one (not restored: it may be large)
            checkpoint["rlr_reward"] = f"{type(self.reward).__module__}.{type(self.reward).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.estimator.load_state_dict(checkpoint.get("rlr_estimator", {}))
        self.skipped_updates = checkpoint.get("rlr_skipped_updates", 0)
        self.consecutive_skips = checkpoint.get("rlr_consecutive_skips", 0)
        self.run_id = checkpoint.get("rlr_run_id", self.run_id)
        self.checkpoint_reward = checkpoint.get("rlr_reward")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load the LoRA weights of a checkpoint; the frozen weights it leaves out are not missing.

        Checkpoints hold only LoRA weights (``on_save_checkpoint``): the backbone reloads from its source and
        the rewards from theirs. Only LoRA keys count as missing, so ``load_from_checkpoint`` neither warns
        with the whole backbone's key list nor, with ``strict=True``, fails on it.

        Args:
            state_dict: The checkpoint's ``state_dict``.
            strict: Raise if a LoRA weight is missing or a key is unknown.
            assign: As for :meth:`torch.nn.Module.load_state_dict`.
        """
        keys = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in keys.missing_keys if "lora_" in k]
        if strict and (missing or keys.unexpected_keys):
            raise RuntimeError(
                f"the checkpoint does not fit this model: missing LoRA weights {missing}, unexpected keys "
                f"{keys.unexpected_keys}; load it with the model settings it was trained with"
            )
        return type(keys)(missing, keys.unexpected_keys)

    def _export_base(self, log_dir: str | None) -> Path:
        return Path(self.export_dir) if self.export_dir else Path(log_dir or self.trainer.default_root_dir) / "lora"

    def _export_directory(self, log_dir: str | None, explicit_conflict: str) -> Path:
        """Where this run's LoRA export goes: see ``export_dir``. Runs on rank zero only (no collectives).

        Args:
            log_dir: The trainer's log directory.
            explicit_conflict: What to do when ``export_dir`` holds another run's export: ``raise`` (before
                training, when nothing is lost yet) or ``fallback`` to a fresh sibling (after training).
        """
        base = self._export_base(log_dir)
        if self.export_dir:
            if explicit_conflict == "raise" and export_owner(base) not in (None, self.run_id):
                raise ExportConflictError(
                    f"model.export_dir {base} already holds LoRA weights exported by another run "
                    f"(see {base / EXPORT_RECORD}); choose another --model.export_dir, or delete or move that "
                    "export, then start again"
                )
        name = base.absolute().name  # "." has no name of its own
        candidates = itertools.chain([base], (base.parent / f"{name}_{n}" for n in itertools.count(1)))
        return next(c for c in candidates if export_owner(c) in (None, self.run_id))

    def on_fit_start(self) -> None:
        # Say at once where everything goes (trainer.log_dir broadcasts from rank zero: every rank asks).
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        where = [f"Run directory {run_dir}"]
        checkpoint_dir = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        if checkpoint_dir and not Path(checkpoint_dir).resolve().is_relative_to(run_dir.resolve()):
            where.append(f"checkpoints in {checkpoint_dir}")
        if self.export_dir and not Path(self.export_dir).resolve().is_relative_to(run_dir.resolve()):
            where.append(f"LoRA export to {self.export_dir}")
        rank_zero_info("; ".join(where))

    def on_train_start(self) -> None:
        # Decided after the checkpoint is restored (a resumed run recognises its own export by the run id),
        # before training, so a conflict costs nothing. Rank zero decides; every rank gets the answer.
        log_dir = self.trainer.log_dir
        target, error = None, None
        if self.trainer.is_global_zero:
            try:
                target = self._export_directory(log_dir, explicit_conflict="raise")
            except ExportConflictError as conflict:
                error = str(conflict)
            if target is not None and target != self._export_base(log_dir):
                logger.info("%s holds another run's LoRA export: this run will export to %s",
                            self._export_base(log_dir), target)
        target, error = self.trainer.strategy.broadcast((target, error))
        if error is not None:
            raise ExportConflictError(error)
        self.export_target = target

    def on_fit_end(self) -> None:
        # trainer.log_dir broadcasts from rank zero: every rank must ask for it, before the rank check.
        log_dir = self.trainer.log_dir
        if not self.trainer.is_global_zero or self.backbone is None:
            return
        # Decided at the start of training; checked again, since another run may have exported there since.
        planned = self.export_target
        directory = self._export_directory(log_dir, explicit_conflict="fallback")
        if planned is not None and directory != planned:
            logger.warning("%s now holds another run's LoRA export: exporting to %s instead", planned, directory)
        # The backbone logs where the file went (once).
        self.exported_lora = self.backbone.export_lora(directory)
        record = {
            "run_id": self.run_id,
            "global_step": self.global_step,
            "pretrained_model_name_or_path": self.pretrained_model_name_or_path,
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (directory / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")

