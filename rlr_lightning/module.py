"""``RLRModule``: the LightningModule that wires backbone, sampler, reward and gradient estimator.

One training step: encode prompts, let the estimator plan, sample one trajectory per prompt, score the
final images, compute advantages over the global batch, then backpropagate the estimator's surrogate terms
one at a time (manual optimization). Every backward except the last one of an optimizer step runs without
gradient synchronisation, so each rank makes exactly one synchronised backward per step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import CatMetric, MeanMetric

from rlr_lightning.backbone import DiffusionBackbone, LoraSettings
from rlr_lightning.data import DCOT_SCALES, PromptBatch
from rlr_lightning.estimators import RLR, GradientEstimator, derive_seed, rollout
from rlr_lightning.evaluation import image_features, mean_pairwise_distance
from rlr_lightning.rewards import RewardModel, TargetColor
from rlr_lightning.sampling import Conditioning, DDIMSampler, Plan, ScaledPromptEmbeds

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The model name that builds the tiny offline pipeline into the cache instead of loading one.
TINY_MODEL = "tiny"


def _default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW with the RLR paper's settings (lr 1e-3, weight decay 1e-4)."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


class RLRModule(L.LightningModule):
    """Reward fine-tuning of a diffusion model's LoRA adapters with a gradient estimator (RLR by default).

    Args:
        pretrained_model_name_or_path: Hub id or diffusers pipeline directory of the backbone; ``tiny``
            builds the tiny offline model into ``~/.cache/rlr_lightning`` (the CPU quickstart).
        estimator: The gradient estimator: ``RLR`` (default), ``FullBackprop``, ``TruncatedBackprop`` or
            ``ScoreFunction`` from ``rlr_lightning.estimators``.
        reward: The reward model; defaults to the toy ``TargetColor``.
        num_steps: DDIM sampling steps ``T``.
        eta: DDIM eta; > 0 wherever likelihood ratios are used.
        guidance_scale: Classifier-free guidance weight; 1 turns guidance off.
        timestep_spacing: Override the scheduler's DDIM timestep spacing (``leading``, ``trailing``,
            ``linspace``); ``None`` keeps the model's own.
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
        export_dir: Where the LoRA weights are exported at the end of fit; defaults to ``<log dir>/lora``.
        metrics: Extra reward models reported on the validation prompts (e.g. train on aesthetic, also
            report HPSv2); they are never trained on.
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
        metrics: list[RewardModel] | None = None,
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
        if weight_dtype not in _DTYPES:
            raise ValueError(f"weight_dtype must be one of {sorted(_DTYPES)}, got {weight_dtype!r}")
        self.automatic_optimization = False
        # Checkpoints hold only LoRA weights; the frozen backbone is reloaded from its source.
        self.strict_loading = False
        self.pretrained_model_name_or_path = pretrained_model_name_or_path
        self.estimator = estimator if estimator is not None else RLR()
        self.reward = (reward if reward is not None else TargetColor()).freeze()
        # Impossible settings (h >= T, eta = 0 with likelihood ratios, a reward without gradient for a
        # backprop estimator) fail here, before any model is loaded.
        self.estimator.setup(num_steps, eta, self.reward.differentiable)
        self.num_steps = num_steps
        self.eta = eta
        self.guidance_scale = guidance_scale
        self.timestep_spacing = timestep_spacing
        self.dcot_split = (float(dcot_split[0]), float(dcot_split[1]))
        self.lora_settings = lora
        self.weight_dtype = _DTYPES[weight_dtype]
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.gradient_clip_val = gradient_clip_val
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.seed = seed
        self.log_term_grad_norms = log_term_grad_norms
        self.export_dir = export_dir
        self.metrics = nn.ModuleList([m.freeze() for m in metrics or []])
        self.metric_names = [type(m).__name__ for m in self.metrics]
        # Validation aggregates, synchronised across ranks by torchmetrics.
        self.val_rewards = CatMetric()
        self.val_metric_values = nn.ModuleList([CatMetric() for _ in self.metrics])
        self.val_diversity = MeanMetric()
        self.backbone: DiffusionBackbone | None = None
        self.sampler: DDIMSampler | None = None
        self.skipped_updates = 0
        self.exported_lora: Path | None = None

    # -- model ---------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.backbone is not None:  # idempotent: load_from_checkpoint and fit both call it
            return
        source = self.pretrained_model_name_or_path
        if source == TINY_MODEL:
            from rlr_lightning.testing import ensure_tiny_pipeline

            source = ensure_tiny_pipeline()
        backbone = DiffusionBackbone.from_pretrained(source, dtype=self.weight_dtype)
        # LoRA A is initialised randomly: seed it from the run's seed, not from whatever state the global
        # RNG is in, so every rank and every rerun starts from the same adapter.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            backbone.add_lora(self.lora_settings)
        self.backbone = backbone.to(self.device)
        self.sampler = self.backbone.make_sampler(
            self.num_steps, self.eta, self.guidance_scale, self.timestep_spacing
        )
        n = sum(p.numel() for p in self.backbone.lora_parameters().values())
        rank_zero_info(f"Backbone {self.pretrained_model_name_or_path} ready: {n:,} trainable LoRA weights")

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
        return torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten() for p in self.lora_parameters()]
        )

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        started = time.perf_counter()
        optimizer = self.optimizers()
        micro = batch_idx % self.gradient_accumulation_steps
        last_micro = micro == self.gradient_accumulation_steps - 1
        embeds = self.conditioning(batch)
        # The block start (and everything else that shapes the graph) is drawn from a seed shared by all
        # ranks; noises and perturbations from one that differs per rank. Both derive from checkpointed
        # counters (not batch_idx), so a resumed run draws what the uninterrupted run would have drawn, and
        # a skipped update is retried with fresh noise.
        step_seed = derive_seed(self.seed, self.global_step, micro, self.skipped_updates)
        rank_seed = derive_seed(self.seed, self.global_step, micro, self.skipped_updates, self.global_rank, 1)
        result = rollout(
            self.estimator, self.sampler, embeds, batch.prompts, self.latent_reward, step_seed, rank_seed,
            gather=self._gather,
        )
        rewards = result.all_rewards
        if not bool(torch.isfinite(rewards).all()):
            # Every rank sees the same gathered rewards, so every rank skips together.
            self._skip(optimizer, f"non-finite reward ({int((~torch.isfinite(rewards)).sum())} of {rewards.numel()})")
            return

        term_norms: dict[str, float] = {}
        term_losses: dict[str, float] = {}
        for i, term in enumerate(result.terms):
            before = self._lora_grad() if self.log_term_grad_norms else None
            loss = term.loss() / self.gradient_accumulation_steps
            with self._no_sync(last_micro and i == len(result.terms) - 1):
                self.manual_backward(loss)
            term_losses[term.name] = term_losses.get(term.name, 0.0) + float(loss.detach())
            if before is not None:
                term_norms[term.name] = float((self._lora_grad() - before).norm())
            del loss

        self._log_step(result, term_losses, term_norms, started)
        if not last_micro:
            return
        grads = self._lora_grad()
        if not bool(torch.isfinite(grads).all()):
            self._skip(optimizer, "non-finite gradient")
            return
        if self.gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        self.log("train/grad_norm", grads.norm(), prog_bar=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.estimator.observe(result, self._mean_over_ranks(term_norms))

    def _skip(self, optimizer, why: str) -> None:
        """Drop this update entirely: gradients cleared, weights and optimizer state untouched."""
        optimizer.zero_grad(set_to_none=True)
        self.skipped_updates += 1
        logger.warning("Skipping update at step %d: %s", self.global_step, why)
        self.log("train/skipped_updates", float(self.skipped_updates), prog_bar=True)

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
        for name, value in result.plan.info.items():
            if isinstance(value, (int, float)):
                self.log(f"train/{name}", float(value))
        elapsed = time.perf_counter() - started
        images = len(result.prompts) * self.trainer.world_size  # antithetic pairs sample each prompt twice
        self.log("train/images_per_sec", images / max(elapsed, 1e-9), prog_bar=True)

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

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.estimator.load_state_dict(checkpoint.get("rlr_estimator", {}))
        self.skipped_updates = checkpoint.get("rlr_skipped_updates", 0)

    def on_fit_end(self) -> None:
        # trainer.log_dir broadcasts from rank zero: every rank must ask for it, before the rank check.
        directory = Path(self.export_dir) if self.export_dir else Path(self.trainer.log_dir or ".") / "lora"
        if not self.trainer.is_global_zero or self.backbone is None:
            return
        self.exported_lora = self.backbone.export_lora(directory)
        rank_zero_info(f"LoRA weights exported to {self.exported_lora} (diffusers format: pipe.load_lora_weights)")

