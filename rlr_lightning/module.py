"""``RLRModule``: the LightningModule that trains a :class:`~rlr_lightning.task.Task` with a gradient estimator.

One step: encode prompts, sample and score one trajectory per prompt (``rollout``), then backpropagate the
estimator's terms one at a time (``backward_terms``), synchronising gradients across ranks on the last only.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Literal, cast

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.types import LRSchedulerPLType

from rlr_lightning.checkpointing import LoraCheckpoints
from rlr_lightning.data import PromptBatch
from rlr_lightning.estimators import RLR, GradientEstimator, backward_terms, derive_seed, flat_grad, rollout
from rlr_lightning.estimators.regularizers import KLPenalty
from rlr_lightning.estimators.step import TermBackward
from rlr_lightning.export import EXPORT_RECORD, ExportConflictError, LoraExport, export_owner
from rlr_lightning.memory import MemoryOptions, PlannedMemory, plan_task
from rlr_lightning.models import DTYPES, DiffusionBackbone, LoraSettings
from rlr_lightning.ranks import backward_sync, mean_over_ranks
from rlr_lightning.rewards import RewardModel, missing_reward_message
from rlr_lightning.rewards.toy import tiny_default_reward
from rlr_lightning.skips import TrainingStalledError, UpdateSkips
from rlr_lightning.step_metrics import log_step
from rlr_lightning.task import SamplingSettings, Task
from rlr_lightning.tiny import is_tiny_model
from rlr_lightning.validation import ValidationRewards

__all__ = ["EXPORT_RECORD", "ExportConflictError", "RLRModule", "TrainingStalledError", "export_owner"]

#: The model name that builds the tiny offline pipeline into the cache instead of loading one.
TINY_MODEL = "tiny"


def _default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW with the RLR paper's settings (lr 1e-3, weight decay 1e-4)."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


class RLRModule(LoraCheckpoints, L.LightningModule):
    """Reward fine-tuning of a diffusion model's LoRA adapters with a gradient estimator (RLR by default).

    Args:
        pretrained_model_name_or_path: Hub id or diffusers pipeline directory of the backbone (Stable Diffusion
            1.x / 2.x, SDXL, SD 3 / 3.5, FLUX.1 or Wan 2.1, told apart by the pipeline's ``model_index.json``);
            ``tiny``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux`` and ``tiny-wan`` build a tiny model of that family
            with random weights into ``~/.cache/rlr_lightning``; ``shapes-world`` is the small pipeline trained on
            the shapes world that ships with the package (the CPU quickstart).
        estimator: The gradient estimator: ``RLR`` (default), ``FullBackprop``, ``TruncatedBackprop``,
            ``ScoreFunction`` or the ``GRPO`` baseline from ``rlr_lightning.estimators``.
        reward: The reward model (a class of ``rlr_lightning.rewards``, e.g. ``AestheticReward``), required to
            train and validate (the tiny offline models default to the toy ``TargetColor``, per frame for videos).
            Checkpoints hold none: pass ``reward=...`` to ``load_from_checkpoint`` to train or validate further.
        num_steps: Sampling steps ``T``.
        eta: The sampler's noise level, > 0 wherever likelihood ratios are used: DDIM's eta for Stable Diffusion
            and SDXL (1 is DDPM-like), the SDE noise level ``a`` of Flow-GRPO's sampler for SD 3 and FLUX (0 is
            the ODE sampler; Flow-GRPO trains with 0.7).
        guidance_scale: Guidance weight: classifier-free guidance (1 turns it off), or for guidance-distilled
            models (FLUX.1-dev) the guidance embedding's value (3.5 in its pipeline).
        timestep_spacing: Override the scheduler's DDIM timestep spacing (``leading``, ``trailing``,
            ``linspace``); ``None`` keeps the model's own.
        resolution: Image height and width in pixels (one number, or ``[height, width]``); ``None``: the
            model's own (1024 for FLUX.1). Flow-GRPO trains SD 3.5 and FLUX at 512.
        num_frames: Video models (Wan 2.1) only: frames per video, a multiple of 4 plus one; ``None``: the model's.
        stochastic_steps: SD 3 and FLUX only: the SDE on steps ``[start, stop)``, the ODE on the others (MixGRPO),
            with ``GRPO(step_range=...)``; RLR and the score function need every step stochastic: ``None``.
        max_sequence_length: SD 3 and FLUX only: T5 tokens per prompt (at most 512); ``None``: the pipeline's
            default (256 for SD 3, 512 for FLUX). Longer prompts are cut, and said so once.
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
        export_dir: Where the LoRA weights are exported at the end of fit; default ``<log dir>/lora`` (``lora_1``,
            ... if that holds another run's export). No run overwrites another's export (:mod:`rlr_lightning.export`).
        max_consecutive_skips: Stop with an error after this many updates in a row were skipped for a
            non-finite reward or gradient (a broken reward or a diverged model never recovers by itself).
        memory_budget_gb: Device memory one training step may use, in GiB, or ``auto`` (the device's free
            memory): costs are measured on the real model before the first step, and the planner picks the two
            options below and ``RLR(h="auto")``'s block length, or says what to lower. ``None``: no planning.
        chunk_samples: At most this many samples per graph-carrying model call group (re-scoring, window
            replays), each chunk's backward before the next one's forward: the same gradients in less memory,
            more slowly. ``None``: the planner's choice, or no chunking without a budget.
        activation_checkpointing: Recompute gradient windows' denoiser calls, the VAE decoder and the reward in
            backward instead of keeping their activations. ``None``: the planner's choice, or off without a budget.
        metrics: Extra reward models reported on the validation prompts (e.g. train on aesthetic, also
            report HPSv2); they are never trained on.
        kl_coefficient: Weight ``beta`` of a KL penalty toward the base model (LoRA off), with any estimator
            (:mod:`rlr_lightning.estimators.regularizers`; logged as ``train/kl``). Needs eta > 0; 0: off.
        kl_steps: Stochastic steps drawn per batch for the KL penalty (their sum scaled to all steps: unbiased);
            each costs two network calls per sample.
        compile_denoiser: Run the sampling pass's no-grad denoiser calls (most of a step's calls) through
            ``torch.compile``; calls with gradient stay eager. Pays on GPUs, where small kernels leave the device
            waiting on launches; the first steps (and the first at each new batch size) take longer while it
            compiles. Same samples to float rounding.
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
        num_frames: int | None = None,
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
        compile_denoiser: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["estimator", "reward", "optimizer", "lr_scheduler", "metrics"])
        # Every setting is checked here, once, before any model is loaded.
        self.settings = SamplingSettings.from_mapping(self.hparams)
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        if weight_dtype not in DTYPES:
            raise ValueError(f"weight_dtype must be one of {sorted(DTYPES)}, got {weight_dtype!r}")
        self.estimator = estimator if estimator is not None else RLR()
        self.estimator.check_accumulation(gradient_accumulation_steps)
        self.skips = UpdateSkips(max_consecutive_skips, log=self.log)
        self.kl = KLPenalty(kl_coefficient, kl_steps, eta, self.estimator.kl_coefficient)
        self.memory = MemoryOptions(memory_budget_gb, chunk_samples, activation_checkpointing)
        self.memory.check_block(self.estimator.block_length)
        if reward is None and is_tiny_model(pretrained_model_name_or_path):
            # The toy default only makes sense for the tiny model: a real model would silently learn to paint
            # one colour, so it gets none and training asks for one (see ``setup``).
            reward = tiny_default_reward(pretrained_model_name_or_path)
        # No reward is required here: sampling and export need none, and a checkpoint has none to restore
        # (save_hyperparameters leaves it out). Training and validation ask for one in ``setup``.
        self.reward: RewardModel | None = reward.freeze() if reward is not None else None
        self.checkpoint_reward: str | None = None  # the reward class a loaded checkpoint names
        # Impossible settings (h >= T, eta = 0 with likelihood ratios, a reward without gradient for a
        # backprop estimator) fail here, before any model is loaded; without a reward, in ``setup``.
        self.estimator.setup(num_steps, eta, True if reward is None else reward.differentiable)
        # Which reward the estimator was set up with, by identity (an attribute would register it twice).
        self._estimator_reward_id = None if self.reward is None else id(self.reward)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only LoRA weights (LoraCheckpoints)
        self.pretrained_model_name_or_path, self.lora_settings = pretrained_model_name_or_path, lora
        self.weight_dtype, self.seed = DTYPES[weight_dtype], seed
        self.gradient_accumulation_steps, self.gradient_clip_val = (
            gradient_accumulation_steps,
            gradient_clip_val,
        )
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.log_term_grad_norms, self.export_dir = log_term_grad_norms, export_dir
        self.compile_denoiser = compile_denoiser
        self.planned_memory: PlannedMemory | None = None
        self._memory_planned = False
        self.validation = ValidationRewards(metrics)
        self.backbone: DiffusionBackbone | None = None  # registered by configure_model
        self._task: Task | None = None
        # Identifies this run's LoRA export (checkpointed, so a resumed run recognises its own export).
        self.run_id = uuid.uuid4().hex
        self.exported_lora: Path | None = None

    # -- the task ------------------------------------------------------------------------------------------

    @property
    def task(self) -> Task:
        """The backbone, sampler and reward being trained (after :meth:`configure_model`)."""
        if self._task is None:
            raise RuntimeError("the model is not loaded yet: call configure_model() (Lightning's fit does)")
        # The reward may be given after construction (``module.reward = ...``).
        self._task.reward = self.reward
        return self._task

    def configure_model(self, task: Task | None = None) -> None:
        """Load the model into a :class:`Task` (once), or adopt ``task`` (built elsewhere: a shared backbone)."""
        if self._task is not None and task is None:  # idempotent: load_from_checkpoint and fit both call it
            return
        if task is None:
            name, settings = self.pretrained_model_name_or_path, self.settings
            task = Task.build(
                name, settings, self.lora_settings, self.reward, self.weight_dtype, self.seed, self.device
            )
        shard = getattr(self._trainer.strategy, "shard", None) if self._trainer is not None else None
        if shard is not None:  # FSDP2Strategy: the frozen base sharded over the ranks, LoRA whole
            task.sharding = shard(task.backbone)
        if self.compile_denoiser:
            task.sampler.denoiser.compile()
        task.memory_plan = self.memory.initial_plan()  # until the planner runs (first step)
        self.estimator.configure_schedule(task.sampler.kernel.sigma.tolist())
        self.backbone, self._task = task.backbone, task

    def configure_callbacks(self) -> list[L.Callback]:
        # Every trainer that fits this module exports its LoRA (CLI, Python API and benchmarks alike).
        return [LoraExport(self.export_dir)]

    def setup(self, stage: str) -> None:
        """Ask for the reward before anything loads: training and validation score samples with it.

        Args:
            stage: Lightning's stage (``fit``, ``validate``, ``test``, ``predict``).
        """
        if stage not in ("fit", "validate"):
            return
        if self.reward is None:
            action = "train" if stage == "fit" else "validate"
            raise ValueError(
                missing_reward_message(self.pretrained_model_name_or_path, action, self.checkpoint_reward)
            )
        if id(self.reward) != self._estimator_reward_id:
            # A reward given after construction: the estimator's checks and choices that depend on it (a
            # backprop estimator needs a gradient; RLR scores the last step of a non-differentiable reward by
            # likelihood ratio) have not seen it yet.
            self.reward.freeze()
            self.estimator.setup(self.settings.num_steps, self.settings.eta, self.reward.differentiable)
            self._estimator_reward_id = id(self.reward)

    def plan_memory(self, prompts: list[str]) -> PlannedMemory | None:
        """Measure the real model's memory costs and choose the memory plan for ``memory_budget_gb``.

        Runs once, before the first sampling (the first training step calls it; benchmarks may call it
        first). Under data parallelism rank zero's plan is used everywhere, so every rank runs the same block
        length. Raises :class:`~rlr_lightning.memory.MemoryBudgetError` when nothing fits.
        """
        self._memory_planned = True
        task = self.task
        if self.memory.budget_gb is None:
            task.set_activation_checkpointing(task.memory_plan.activation_checkpointing)
            return None
        parallel = self._trainer is not None and self.trainer.world_size > 1
        broadcast = self.trainer.strategy.broadcast if parallel else None
        self.planned_memory = plan_task(task, self.estimator, self.memory, prompts, broadcast=broadcast)
        return self.planned_memory

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.lora_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    # -- one step ----------------------------------------------------------------------------------------

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        started = time.perf_counter()
        optimizer, task, skips = cast(LightningOptimizer, self.optimizers()), self.task, self.skips
        micro = batch_idx % self.gradient_accumulation_steps
        last_micro = micro == self.gradient_accumulation_steps - 1
        if micro == 0:
            skips.window_cause = None
        if skips.window_cause is not None:
            # An earlier micro-batch of this optimizer step was dropped: stepping on the others' partial sum
            # would be a biased update. The flag comes from gathered rewards, so every rank agrees here.
            if last_micro:
                skips.skip(optimizer, skips.window_cause, reward_at_fault=True, step=self.global_step)
            return
        embeds = task.conditioning(batch)
        # The block start (and everything else that shapes the graph) is drawn from a seed shared by all
        # ranks; noises and perturbations from one that differs per rank. Both derive from checkpointed
        # counters (not batch_idx), so a resumed run draws what the uninterrupted run would have drawn, and
        # a skipped update is retried with fresh noise.
        step_seed = derive_seed(self.seed, self.global_step, micro, skips.total)
        rank_seed = derive_seed(self.seed, self.global_step, micro, skips.total, self.global_rank, 1)
        if not self._memory_planned:
            self.plan_memory(batch.prompts)
        gather = lambda x: cast(torch.Tensor, self.all_gather(x)).reshape(-1)  # noqa: E731
        sampler, estimator = task.sampler, self.estimator
        args = (batch.prompts, task.latent_reward, step_seed, rank_seed)
        result = rollout(estimator, sampler, embeds, *args, gather=gather, memory=task.memory_plan)
        if not bool(torch.isfinite(result.all_rewards).all()):
            # Logged as NaN: a logger or progress bar would otherwise repeat the last finite values.
            nan = {term.name: float("nan") for term in result.terms}
            log_step(
                self, result, TermBackward(nan, {}), started, norms=nan if self.log_term_grad_norms else {}
            )
            self.log("train/grad_norm", float("nan"))
            skips.drop_non_finite_rewards(result.all_rewards, optimizer, last_micro, self.global_step)
            return
        done = self._backward(result.terms + self.kl.terms(result, task.sampler, step_seed), last_micro)
        if not last_micro:
            log_step(self, result, done, started)
            return
        try:
            stepped = self._optimizer_step(optimizer)
            # GRPO: more optimizer steps on the same samples, each re-scoring them at the updated weights (the
            # logged losses and clip statistics are the last update's).
            for _ in range(1, self.estimator.inner_updates if stepped else 1):
                assert result.embeds is not None  # rollout() records the batch's conditioning
                terms = self.estimator.terms(result, task.sampler, result.embeds)
                done = self._backward(terms + self.kl.terms(result, task.sampler, step_seed), True)
                if not self._optimizer_step(optimizer):
                    break
        finally:  # logged even when a skip stops the run
            log_step(self, result, done, started)
        if stepped:
            self.estimator.observe(result, mean_over_ranks(self, done.norms()))

    def _backward(self, terms, last_micro: bool) -> TermBackward:
        params, divisor = self.lora_parameters(), self.gradient_accumulation_steps
        sync = lambda last: backward_sync(self.trainer, last_micro and last, params)  # noqa: E731
        return backward_terms(terms, params, divisor, self.manual_backward, sync, self.log_term_grad_norms)

    def _optimizer_step(self, optimizer) -> bool:
        """Step on the accumulated gradient (clipped), or skip a non-finite one; whether the step was taken."""
        grads = flat_grad(self.lora_parameters())
        self.log("train/grad_norm", grads.norm(), prog_bar=False)
        if not self.skips.gradient_finite(grads, optimizer, self.global_step):
            return False
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        self.skips.stepped()
        optimizer.zero_grad(set_to_none=True)
        if (scheduler := cast("LRSchedulerPLType | None", self.lr_schedulers())) is not None:
            scheduler.step()
        return True

    # -- sampling and evaluation ---------------------------------------------------------------------------

    def generate(self, batch: PromptBatch, generator: torch.Generator) -> torch.Tensor:
        """Images (or videos) in [0, 1] for a batch of prompts, without gradient (:meth:`Task.generate`)."""
        return self.task.generate(batch, generator)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        # Fixed seeds per validation batch: every evaluation sees the same noise, so curves are comparable.
        generator = torch.Generator().manual_seed(derive_seed(self.seed, 0x5EED, batch_idx, self.global_rank))
        assert self.reward is not None  # setup("validate") refuses to run without one
        self.validation.update(self.task.generate(batch, generator), batch.prompts, self.reward)

    def on_validation_epoch_end(self) -> None:
        # Already aggregated over all ranks: every rank logs the same values.
        self.log_dict(self.validation.compute(), prog_bar=False)
