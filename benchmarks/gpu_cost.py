"""Peak GPU memory and step time of every estimator at Stable Diffusion 1.5 size, our sampler against
diffusers' pipeline, and the memory-planned RLR steps, in one run of under 5 minutes on one H100.

    python benchmarks/gpu_cost.py [--out DIR] [--deadline-s 270]   # GPU: SD 1.5-size model, random weights
    python benchmarks/gpu_cost.py --tiny                              # the same code path on CPU, tiny model

Setting on a GPU: T = 50 DDIM steps, guidance 5, eta 1, 512 px (64 x 64 latents), frozen weights in bf16
under bf16 autocast (as ``precision: bf16-mixed`` trains), LoRA rank 4 in fp32 on the attention
projections, the ``ColorBalance`` reward on the VAE-decoded images (the decoder is what costs), 1, 2 and 6
prompts per batch. A step is one gradient estimate: rollout plus every term's backward, no optimizer step.
Each configuration is timed ONCE, after a cheap warm-up (T = 3) at each new batch size; its peak is
``torch.cuda.max_memory_allocated`` (weights included) after ``reset_peak_memory_stats``. Running out of
memory is a result ("OOM"), and so is a budget the planner finds too small ("no fit"). With ``--tiny``
(CPU, one thread): T = 5, 1 and 2 prompts, and the peak of what autograd holds for backward
(``AutogradMemoryMeter``) instead of CUDA statistics.

What runs, most important first (a run cut short keeps what it measured):
1. our no-grad sampler against diffusers' ``StableDiffusionPipeline`` on the same weights with the same LoRA
   (exported by ``DiffusionBackbone.export_lora``, loaded by ``load_lora_weights``), latents out, per
   batch; then a ``torch.profiler`` summary of 3 sampling steps of each at batch 2;
2. RLR h = 2 (``zo_mode=score``) at the largest batch with ``memory_budget_gb`` = 24, 16, ``auto`` and
   without a budget (the unchunked path), each with its memory plan and its time over the step's floor;
3. RLR h = 2 at the other batches; truncated backprop K = 1, 2; the score function; RLR h = 1, 4 and
   parameter-mode ZO; full backprop.
A configuration whose predicted time (from the measured no-grad sample time at its batch) would end past
``--deadline-s`` is skipped and listed with the reason.

The floor of an RLR step (``docs/benchmarks.md`` §2): a no-grad sample of T steps + h + 1 steps of forward
and backward + decode and reward forward and backward.

Writes to ``--out``: ``gpu_cost.jsonl`` (a line per result, as measured), ``gpu_cost.json`` and
``gpu_cost.md`` (rewritten after every result) and ``gpu_profile.txt``; ``--tiny`` writes ``gpu_cost_tiny.*``
and ``gpu_profile_tiny.txt``.

``--family sd35``: RLR against GRPO at Stable Diffusion 3.5 Medium size (flow matching), in the setting of
``configs/sd35_medium_*.yaml``:

    python benchmarks/gpu_cost.py --family sd35 [--out DIR]   # GPU: SD 3.5 Medium-size, random weights
    python benchmarks/gpu_cost.py --family sd35 --tiny        # the same code path on CPU, tiny-sd3

The pipeline (MMDiT-X transformer, CLIP-L, CLIP-G, T5-XXL encoder, 16-channel VAE: 8.1 B weights) is built
with random weights on the GPU in bf16, in memory (``common.sd35_medium_components``; loading from disk is not
measured), with LoRA rank 32 / alpha 64 on both streams' attention projections, 512 px, T = 10 flow-SDE steps
at noise level 0.7, guidance 4.5, bf16 autocast, the ``ColorBalance`` reward on the decoded images, T5
prompts of 256 tokens. Measured, in this order: our no-grad sample at every number of images a step below
samples; RLR h = 2 (``zo_mode=score``, ``baseline=group``, ``group_size=2``) and GRPO (``group_size`` 4 and 8,
one inner update) at 1 and 2 prompts per batch; then, at 2 prompts, RLR and GRPO with
``memory_budget_gb=auto`` (the recipes' setting). Writes ``gpu_cost_sd35.*`` (``gpu_cost_sd35_tiny.*``).
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: the deadline counts them too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

# Before torch is imported: configurations of different sizes one after another fragment a fixed-segment heap
# into out-of-memory errors that are not the configuration's own.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from importlib.metadata import version  # noqa: E402
from pathlib import Path  # noqa: E402

import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    ResultLog,
    clear_lora_grads,
    estimator_step,
    floor_parts,
    free_memory,
    is_out_of_memory,
    machine,
    markdown_table,
    measure_once,
    sd15_pipeline_dir,
    sd35_medium_components,
    share_backbone,
    synchronize,
    weight_counts,
)

from rlr_lightning.models import LoraSettings  # noqa: E402
from rlr_lightning.estimators import (  # noqa: E402
    GRPO,
    RLR,
    FullBackprop,
    GradientEstimator,
    ScoreFunction,
    TruncatedBackprop,
)
from rlr_lightning.memory import MemoryBudgetError  # noqa: E402
from rlr_lightning.module import RLRModule  # noqa: E402
from rlr_lightning.rewards import ColorBalance  # noqa: E402
from rlr_lightning.sampling import Plan  # noqa: E402

logger = logging.getLogger("gpu_cost")

PROMPTS = ("a photo of a cat", "an owl at night", "a red fox", "a whale", "a horse on a hill", "a frog")

#: Predicted time of each kind of work, in units of our no-grad sample at the same batch: measured at batch 2
#: on an H100 (no-grad sample 3.7 s, RLR score 6.6 s, parameter mode 12.3 s, truncated 3.2-3.7 s, score
#: function 6.5 s, diffusers 2.5 s). Planned steps add recomputation and chunking; OOM runs stop early.
COST = dict(sampler=1.0, diffusers=0.7, profile=0.3, rlr_score=1.8, rlr_score_h4=2.0, rlr_parameter=3.4,
            rlr_parameter_h4=3.8, truncated=1.0, score_function=1.8, full=1.0, planned=2.7)
WARMUP_COST = 0.25  # the T = 3 warm-up at a new batch size
FLOOR_COST = 0.3  # grad steps and decode + reward, each timed twice (the no-grad part is reused)

#: The same at SD 3.5 Medium size, in units of our no-grad sample of as many images. Not yet measured on a
#: GPU: counted in denoiser passes of T = 10 steps, a no-grad sample is 10 forwards; RLR h = 2 adds 3 steps of
#: forward and backward (about 3 forwards each), 7 re-scored steps and the decoder's backward; GRPO re-scores
#: all 10 steps and needs no reward gradient. Replace them by the ratios of the first GPU run.
SD35_COST = dict(sampler=1.0, rlr=4.0, grpo=4.5, planned=5.5)
#: RLR's group (the RLR recipe's ``group_size``) and GRPO's groups measured at SD 3.5 Medium size.
SD35_RLR_GROUP = 2
SD35_GRPO_GROUPS = (4, 8)
#: LoRA of the SD 3.5 recipes (``configs/sd35_medium_*.yaml``): Flow-GRPO's rank and alpha on every attention
#: projection of both streams.
SD35_LORA = LoraSettings(rank=32, alpha=64.0, target_modules=(
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))


@dataclass(frozen=True)
class Family:
    """The settings of one model family's run.

    Attributes:
        label: The model size, as the report names it.
        num_steps: Sampling steps T on a GPU and with ``--tiny``.
        guidance: Classifier-free guidance weight.
        eta: The sampler's noise level (DDIM's eta; the flow SDE's noise level for SD 3).
        lora: LoRA adapters on the denoiser.
        batches: ``--batches`` on a GPU and with ``--tiny``.
        budgets: ``--budgets`` on a GPU and with ``--tiny``.
        sample_s_per_image: Prior of our no-grad sample's time per image on a GPU, until one is measured.
        resolution: Image side in pixels on a GPU (``None``: the model's own); the tiny models keep theirs.
    """

    label: str
    num_steps: tuple[int, int]
    guidance: float
    eta: float
    lora: LoraSettings
    batches: tuple[str, str]
    budgets: tuple[str, str]
    sample_s_per_image: float
    resolution: int | None = None


FAMILIES = {
    # T = 5 with --tiny: the smallest T with room for a block of h = 4.
    "sd15": Family("SD 1.5", (50, 5), 5.0, 1.0, LoraSettings(rank=4, alpha=4.0), ("1,2,6", "1,2"),
                   ("24,16,auto", "auto"), 1.85),
    # Prior: 2 x 10 passes of the 2.5 B transformer over 256 + 333 tokens an image, at a third of an H100's
    # peak.
    # T = 10 with --tiny as well: the tiny SD 3 samples fast enough.
    "sd35": Family("SD 3.5 Medium", (10, 10), 4.5, 0.7, SD35_LORA, ("1,2", "1,2"), ("auto", "auto"), 0.25,
                   resolution=512),
}


@dataclass(frozen=True)
class Config:
    """One measurement.

    Attributes:
        name: What runs, e.g. ``RLR h=2 zo=score``.
        group: ``sampler``, ``planned`` or ``estimators`` (the tables of the report).
        batch: Prompts per batch.
        kind: ``step`` (one gradient estimate), ``sampler`` (our no-grad sample), ``diffusers`` (the
            pipeline) or ``profile``.
        estimator: Factory of the estimator (``step`` only).
        cost: Predicted time in units of our no-grad sample at this batch.
        memory: Memory options given to ``RLRModule`` (``memory_budget_gb`` for the planned runs).
        h: Block length whose floor is reported (RLR steps).
        group_size: Samples per prompt (the estimator's ``group_size``); ``batch * group_size`` images.
    """

    name: str
    group: str
    batch: int
    kind: str = "step"
    estimator: Callable[[], GradientEstimator] | None = None
    cost: float = 1.0
    memory: dict = field(default_factory=dict)
    h: int | None = None
    group_size: int = 1

    @property
    def images(self) -> int:
        """Images the step samples: each of its ``batch`` prompts ``group_size`` times."""
        return self.batch * self.group_size

    @property
    def memory_text(self) -> str:
        """The memory options as a user would write them, e.g. ``memory_budget_gb=24``."""
        return " ".join(f"{k}={v}" for k, v in self.memory.items())

    @property
    def key(self) -> str:
        return " ".join(part for part in (self.name, self.memory_text, f"b{self.batch}") if part)


def rlr(h: int, zo_mode: str, batch: int, group: str = "estimators", **memory) -> Config:
    cost = COST["planned"] if memory else COST[f"rlr_{zo_mode}_h4" if h == 4 else f"rlr_{zo_mode}"]
    return Config(f"RLR h={h} zo={zo_mode}", group, batch, estimator=lambda: RLR(h=h, zo_mode=zo_mode),
                  cost=cost, memory=memory, h=h)


def truncated(k: int, batch: int) -> Config:
    return Config(f"truncated K={k}", "estimators", batch, estimator=lambda: TruncatedBackprop(k=k),
                  cost=COST["truncated"])


def score_function(batch: int) -> Config:
    return Config("score function", "estimators", batch, estimator=ScoreFunction, cost=COST["score_function"])


def full_backprop(batch: int) -> Config:
    return Config("full backprop", "estimators", batch, estimator=FullBackprop, cost=COST["full"])


def configurations(batches: tuple[int, ...], planned: list[dict]) -> list[Config]:
    """Every configuration, most important first; duplicates (e.g. when the batches coincide) dropped.

    Args:
        batches: Prompts per batch; the largest is the planned runs' batch.
        planned: ``RLRModule`` memory options of the planned runs (``memory_budget_gb=24``, ...).
    """
    small, mid, large = batches[0], batches[min(1, len(batches) - 1)], batches[-1]
    configs: list[Config] = []
    for b in sorted(set(batches), reverse=True):
        configs += [Config("ours: no-grad sample", "sampler", b, kind="sampler", cost=COST["sampler"]),
                    Config("diffusers StableDiffusionPipeline", "sampler", b, kind="diffusers",
                           cost=COST["diffusers"])]
    configs.append(Config("profile: 3 sampling steps, ours and diffusers", "sampler", mid, kind="profile",
                          cost=COST["profile"]))
    configs += [rlr(2, "score", large, "planned", **memory) for memory in planned]
    configs += [rlr(2, "score", mid), rlr(2, "score", small)]
    configs += [truncated(1, mid), truncated(2, mid), score_function(mid), rlr(1, "score", mid),
                rlr(4, "score", mid), rlr(2, "parameter", mid), full_backprop(small), full_backprop(mid)]
    # The baselines' memory at the largest batch, next to the planned RLR steps.
    configs += [truncated(2, large), score_function(large)]
    configs += [rlr(1, "score", small), truncated(1, small), truncated(2, small), score_function(small),
                rlr(1, "parameter", small), rlr(2, "parameter", small), rlr(1, "parameter", mid),
                rlr(4, "parameter", mid)]
    configs += [truncated(1, large), rlr(1, "score", large)]
    unique: dict[str, Config] = {}
    for config in configs:
        unique.setdefault(config.key, config)
    return list(unique.values())


def rlr_group(batch: int, group: str = "estimators", **memory) -> Config:
    """RLR h = 2 as the SD 3.5 recipe runs it: score-mode ZO, each image's baseline the other images of its
    prompt."""
    return Config(f"RLR h=2 zo=score group={SD35_RLR_GROUP}", group, batch,
                  estimator=lambda: RLR(h=2, zo_mode="score", baseline="group", group_size=SD35_RLR_GROUP),
                  cost=SD35_COST["planned" if memory else "rlr"], memory=memory, h=2,
                  group_size=SD35_RLR_GROUP)


def grpo(group_size: int, batch: int, group: str = "estimators", **memory) -> Config:
    """GRPO with the recipe's clip and advantages and one inner update: one gradient estimate per batch."""
    return Config(f"GRPO G={group_size}", group, batch,
                  estimator=lambda: GRPO(group_size=group_size, inner_updates=1),
                  cost=SD35_COST["planned" if memory else "grpo"], memory=memory, group_size=group_size)


def sd35_configurations(batches: tuple[int, ...], planned: list[dict]) -> list[Config]:
    """The SD 3.5 Medium-size run, most important first: our no-grad sample at every number of images a step
    below samples (the unit of the predictions, and the sampling share of each step), RLR and the smaller
    GRPO group at each batch, the larger GRPO group, then RLR and the largest GRPO with each budget of
    ``planned`` at the largest batch (the recipes plan with ``memory_budget_gb: auto``).

    Args:
        batches: Prompts per batch; the largest is the planned runs' batch.
        planned: ``RLRModule`` memory options of the planned runs.
    """
    groups = (SD35_RLR_GROUP, *SD35_GRPO_GROUPS)
    images = sorted({b * g for b in batches for g in groups})
    configs = [Config("ours: no-grad sample", "sampler", n, kind="sampler", cost=SD35_COST["sampler"])
               for n in images]
    for b in batches:
        configs += [rlr_group(b), grpo(SD35_GRPO_GROUPS[0], b)]
    configs += [grpo(g, b) for g in SD35_GRPO_GROUPS[1:] for b in batches]
    configs += [rlr_group(batches[-1], "planned", **memory) for memory in planned]
    configs += [grpo(SD35_GRPO_GROUPS[-1], batches[-1], "planned", **memory) for memory in planned]
    return configs


class Benchmark:
    """Runs the configurations on one loaded backbone, within the deadline, writing each result at once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.family = FAMILIES[args.family]
        self.cuda = torch.cuda.is_available() and not args.tiny
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.num_steps = args.num_steps
        self.sample_s: dict[int, float] = {}  # our no-grad sample time by images: the unit of predictions
        self.floors: dict[tuple[int, int], dict] = {}
        self.warm: set[int] = set()
        self.pipe = None
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_cost-"))

    # -- set-up ---------------------------------------------------------------------------------------

    def setup(self) -> dict:
        if self.args.family == "sd35":
            return self.setup_sd35()
        started = time.perf_counter()
        if self.args.tiny:
            from rlr_lightning.tiny import ensure_tiny_pipeline

            self.model_name = str(ensure_tiny_pipeline())
        else:
            logger.info("Building the SD 1.5-size pipeline with random weights (bf16) in %s", self.scratch)
            self.model_name = sd15_pipeline_dir(
                str(self.scratch / "sd15"), dtype=self.dtype, device=self.device
            )
        built = time.perf_counter()
        self.base = self.module(RLR(h=2), load=True)
        self.backbone = self.base.backbone
        loaded = time.perf_counter()
        logger.info("Model ready: built in %.1f s, loaded in %.1f s", built - started, loaded - built)
        return dict(build_s=built - started, load_s=loaded - built)

    def setup_sd35(self) -> dict:
        """SD 3.5 Medium's architectures with random weights built on the device, or the tiny SD 3; the
        backbone is assembled from the components in memory and shared by every configuration (nothing is
        loaded from disk)."""
        from rlr_lightning.models.sd3 import StableDiffusion3Backbone

        started = time.perf_counter()
        if self.args.tiny:
            from rlr_lightning.tiny import build_tiny_sd3_components

            self.model_name = "tiny-sd3"
            components = build_tiny_sd3_components()  # the weights of tiny-sd3
            # SD 3.5 Medium's architectures on the meta device (shapes, no memory): its configuration is
            # checked here and its size reported, as a GPU run builds it.
            weights = weight_counts(sd35_medium_components("meta"))
        else:
            logger.info("Building SD 3.5 Medium's architectures, random weights in bf16, on %s", self.device)
            self.model_name = "stabilityai/stable-diffusion-3.5-medium (architecture, random weights)"
            components = sd35_medium_components(self.device, self.dtype)
            weights = weight_counts(components)
        built = time.perf_counter()
        backbone = StableDiffusion3Backbone(dtype=self.dtype, **components)
        backbone.set_resolution(None if self.args.tiny else self.family.resolution)
        # As RLRModule.configure_model: LoRA A from a fixed seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            backbone.add_lora(self.family.lora)
        self.backbone = backbone.to(self.device)
        self.base = self.module(RLR(h=2))
        loaded = time.perf_counter()
        out = dict(build_s=built - started, load_s=loaded - built,
                   weights_b={k: v / 1e9 for k, v in weights.items()},
                   resolution=list(backbone.resolution), t5_tokens=backbone.max_sequence_length,
                   lora_weights=sum(p.numel() for p in backbone.lora_parameters().values()))
        if self.cuda:
            out["weights_gib"] = torch.cuda.memory_allocated() / 2**30
        logger.info(
            "Model ready: built in %.1f s, LoRA added in %.1f s; SD 3.5 Medium size: %.2f B weights (%s), "
            "%s LoRA weights", built - started, loaded - built, sum(weights.values()) / 1e9,
            ", ".join(f"{k} {v / 1e9:.2f} B" for k, v in weights.items()), f"{out['lora_weights']:,}",
        )
        return out

    def autocast(self):
        # Frozen bf16 weights with fp32 LoRA, as Lightning's bf16-mixed precision runs training steps.
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def module(
        self, estimator: GradientEstimator, num_steps: int | None = None, load: bool = False, **memory
    ) -> RLRModule:
        """A module with this run's settings, on the shared backbone (``load``: load it, the first time)."""
        module = RLRModule(
            pretrained_model_name_or_path=self.model_name,
            estimator=estimator,
            reward=ColorBalance(),
            num_steps=num_steps or self.num_steps,
            eta=self.family.eta,
            guidance_scale=self.args.guidance,
            lora=self.family.lora,
            weight_dtype="bfloat16" if self.cuda else "float32",
            **memory,
        )
        if load:
            module.configure_model()
            return module.to(self.device)
        return share_backbone(module, self.backbone)

    def prompts(self, batch: int) -> list[str]:
        return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

    def warm_up(self, images: int) -> None:
        """One cheap step and sample at T = 3 for a new number of images (kernels, cuBLAS handles,
        allocator)."""
        if images in self.warm:
            return
        prompts = self.prompts(images)
        module = self.module(RLR(h=1), num_steps=3)
        with self.autocast():
            embeds = module.task.conditioning_for(prompts)
            with torch.no_grad():
                module.task.sampler.run(Plan(3), embeds, generator=torch.Generator().manual_seed(0))
            try:
                estimator_step(module, embeds, prompts, draw=10_000)
            except (torch.OutOfMemoryError, RuntimeError) as error:
                # At SD 3.5 size the sampler's 16 images decode and backpropagate too much for one graph; the
                # warm-up's sample is done, and the measurement that follows says whether its own step fits.
                if not is_out_of_memory(error):
                    raise
                logger.info("The warm-up step at %d images ran out of memory; its sample ran", images)
        clear_lora_grads(module)
        free_memory()  # outside the except block: the error's frames and their tensors are gone by now
        synchronize()
        self.warm.add(images)

    # -- predictions and the deadline -----------------------------------------------------------------

    def unit(self, images: int) -> float:
        """Our no-grad sample time of ``images`` images: measured, or a prior (SD 1.5 on an H100: 3.7 s for
        2)."""
        if images in self.sample_s:
            return self.sample_s[images]
        return (self.family.sample_s_per_image if self.cuda else 0.05) * max(images, 1.2)

    def predict(self, config: Config) -> float:
        cost = config.cost
        if config.images not in self.warm:
            cost += WARMUP_COST
        if config.h is not None and (config.images, config.h) not in self.floors:
            cost += FLOOR_COST
        if config.kind in ("diffusers", "profile") and self.pipe is None:
            cost += 0.3  # export the LoRA and load the pipeline
        return cost * self.unit(config.images)

    # -- measurements ---------------------------------------------------------------------------------

    def run(self, config: Config) -> dict:
        runner = {
            "step": self.step,
            "sampler": self.sample,
            "diffusers": self.diffusers,
            "profile": self.profile,
        }[config.kind]
        return runner(config)

    def step(self, config: Config) -> dict:
        prompts = self.prompts(config.batch)
        self.warm_up(config.images)
        module = self.module(config.estimator(), **config.memory)
        row: dict = {}
        with self.autocast():
            # As the first training step does: with a budget, measure and plan; without one, apply the given
            # options (the VAE decoder's checkpointing is a setting of the shared backbone).
            started = time.perf_counter()
            try:
                planned = module.plan_memory(prompts)
            except MemoryBudgetError as error:  # the planner's refusal is a result too
                return {"status": "no fit", "reason": str(error)}
            if planned is not None:
                row["plan_s"] = time.perf_counter() - started
                row["predicted_peak_gib"] = planned.predicted_peak / 2**30
            embeds = module.task.conditioning_for(prompts)
            row.update(
                measure_once(
                    lambda: estimator_step(module, embeds, prompts, draw=0), exclude=list(module.parameters())
                )
            )
            clear_lora_grads(module)
            plan = module.task.memory_plan
            row.update(chunk_samples=plan.chunk_samples,
                       activation_checkpointing=plan.activation_checkpointing)
            if getattr(module.estimator, "h", None) is not None:
                row["h"] = module.estimator.h
            if config.h is not None and row["status"] == "ok":
                # The rollout's images: every prompt group_size times.
                floor = self.floor(module, prompts * config.group_size, config.h)
                row.update(floor)
                if "floor_s" in floor:
                    row["step_over_floor"] = row["time_s"] / floor["floor_s"]
        return row

    def floor(self, module: RLRModule, prompts: list[str], h: int) -> dict:
        key = (len(prompts), h)
        if key not in self.floors:
            # The floor is defined without recomputation, whatever this module's plan turned on.
            module.task.set_activation_checkpointing(False)
            try:
                self.floors[key] = floor_parts(
                    module, prompts, h, repeats=1, nograd_s=self.sample_s.get(len(prompts))
                )
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not is_out_of_memory(error):
                    raise
                self.floors[key] = {"floor_reason": "OOM while timing the floor"}
            clear_lora_grads(module)
            free_memory()
        return self.floors[key]

    def sample(self, config: Config) -> dict:
        prompts = self.prompts(config.images)
        self.warm_up(config.images)
        sampler = self.base.sampler
        with self.autocast():
            embeds = self.base.conditioning_for(prompts)

            def run():
                with torch.no_grad():
                    sampler.run(Plan(self.num_steps), embeds, generator=torch.Generator().manual_seed(0))

            row = measure_once(run)
        if row["status"] == "ok":
            self.sample_s[config.images] = row["time_s"]
        return row

    def load_pipeline(self):
        """diffusers' pipeline on the same weights, with our LoRA exported and loaded the diffusers way."""
        if self.pipe is None:
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.set_verbosity_error()  # its notes on the disabled safety checker are not ours
            lora_dir = self.scratch / "lora"
            self.base.backbone.export_lora(lora_dir)
            pipe = StableDiffusionPipeline.from_pretrained(
                self.model_name, dtype=self.dtype, safety_checker=None, local_files_only=True
            ).to(self.device)
            pipe.load_lora_weights(lora_dir)
            pipe.set_progress_bar_config(disable=True)
            ours = sum(p.numel() for p in self.base.backbone.lora_parameters().values())
            theirs = sum(p.numel() for n, p in pipe.unet.named_parameters() if "lora_" in n)
            if theirs != ours:
                raise RuntimeError(f"diffusers loaded {theirs} LoRA weights from our export, we train {ours}")
            self.pipe = pipe
            self.pipe_info = dict(adapters=pipe.get_list_adapters(), lora_weights=theirs)
        return self.pipe

    def call_pipeline(self, embeds, num_steps: int) -> None:
        self.pipe(
            prompt_embeds=embeds.cond.to(self.dtype),
            negative_prompt_embeds=embeds.uncond.to(self.dtype),
            num_inference_steps=num_steps,
            guidance_scale=self.args.guidance,
            eta=1.0,
            output_type="latent",
            generator=torch.Generator(self.device).manual_seed(0),
        )

    def diffusers(self, config: Config) -> dict:
        prompts = self.prompts(config.batch)
        self.load_pipeline()
        with self.autocast():
            embeds = self.base.conditioning_for(prompts)
        # diffusers runs its own way: bf16 weights and LoRA, no autocast.
        self.call_pipeline(embeds, 2)  # warm-up at this batch
        row = measure_once(lambda: self.call_pipeline(embeds, self.num_steps))
        row.update(self.pipe_info)
        if row["status"] == "ok" and config.batch in self.sample_s:
            row["ours_over_diffusers"] = self.sample_s[config.batch] / row["time_s"]
        return row

    def profile(self, config: Config) -> dict:
        """Top ops of 3 sampling steps, ours and diffusers', by device and CPU time, into a text file."""
        from torch.profiler import ProfilerActivity, profile

        prompts = self.prompts(config.batch)
        self.load_pipeline()
        sampler = self.base.backbone.make_sampler(3, 1.0, self.args.guidance)
        with self.autocast():
            embeds = self.base.conditioning_for(prompts)

        def ours():
            with self.autocast(), torch.no_grad():
                sampler.run(Plan(3), embeds, generator=torch.Generator().manual_seed(0))

        def theirs():
            self.call_pipeline(embeds, 3)

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        sorts = (["self_device_time_total"] if self.cuda else []) + ["self_cpu_time_total"]
        sections, row = [], {"status": "ok", "time_s": 0.0}
        for label, fn in (
            ("ours: DDIMSampler.run, no grad", ours),
            ("diffusers StableDiffusionPipeline", theirs),
        ):
            fn()  # warm-up
            synchronize()
            started = time.perf_counter()
            with profile(activities=activities) as prof:
                fn()
                synchronize()
            elapsed = time.perf_counter() - started
            row["time_s"] += elapsed
            row[f"{'ours' if fn is ours else 'diffusers'}_profiled_s"] = elapsed
            averages = prof.key_averages()
            for sort in sorts:
                sections.append(
                    f"== {label}: 3 steps, batch {config.batch}, {elapsed:.3f} s under the profiler; "
                    f"top 15 by {sort}\n{averages.table(sort_by=sort, row_limit=15)}"
                )
        path = self.args.out / f"gpu_profile{self.suffix}.txt"
        path.write_text(f"{machine()}\n\n" + "\n\n".join(sections) + "\n")
        row["file"] = path.name
        return row

    @property
    def suffix(self) -> str:
        return ("_sd35" if self.args.family == "sd35" else "") + ("_tiny" if self.args.tiny else "")

    def release_pipeline(self) -> None:
        if self.pipe is not None:
            self.pipe = None
            free_memory()

    def close(self) -> None:
        """Free the pipeline and delete the scratch directory (the SD 1.5-size model takes 2 GB of disk)."""
        self.release_pipeline()
        shutil.rmtree(self.scratch, ignore_errors=True)


# -- the report ---------------------------------------------------------------------------------------------


def render(payload: dict) -> str:
    if payload.get("family") == "sd35":
        return render_sd35(payload)
    rows = payload["rows"]
    memory = (
        ("peak_gib", "peak GiB", ".1f") if payload.get("cuda") else ("activation_mb", "activation MB", ".1f")
    )
    # Times of skipped or failed configurations stay blank (the reasons are listed below the tables).
    shown = [dict(r, time_s=r["time_s"] if r["status"] in ("ok", "OOM") else None) for r in rows]

    def by_group(group: str) -> list[dict]:
        return [r for r in shown if r["group"] == group]

    sampler = {}
    for r in by_group("sampler"):
        if r["kind"] in ("sampler", "diffusers"):
            entry = sampler.setdefault(r["batch"], {"batch": r["batch"]})
            prefix = "ours" if r["kind"] == "sampler" else "diffusers"
            entry[f"{prefix}_s"] = r["time_s"]
            entry[f"{prefix}_mem"] = r.get(memory[0])
            if r.get("ours_over_diffusers") is not None:
                entry["ratio"] = r["ours_over_diffusers"]
    mem_header = memory[1]
    parts = [
        f"# GPU cost: {payload['setting']}",
        f"{payload['machine']}. {payload['versions']}. Wall time {payload.get('elapsed_s', 0):.0f} s "
        f"(deadline {payload['deadline_s']:g} s); model built in {payload.get('build_s', 0):.1f} s, "
        f"loaded in {payload.get('load_s', 0):.1f} s.",
        "## Our no-grad sampler against diffusers (same weights, same LoRA, latents out)",
        markdown_table(
            sorted(sampler.values(), key=lambda e: e["batch"]),
            [
                ("batch", "batch", "d"),
                ("ours_s", "ours (s)", ".2f"),
                ("diffusers_s", "diffusers (s)", ".2f"),
                ("ratio", "ours / diffusers", ".2f"),
                ("ours_mem", f"ours {mem_header}", ".1f"),
                ("diffusers_mem", f"diffusers {mem_header}", ".1f"),
            ],
        ),
        "## Memory-planned RLR steps",
        markdown_table(
            by_group("planned"),
            [
                ("memory", "memory options", "s"),
                ("batch", "batch", "d"),
                ("status", "status", "s"),
                ("time_s", "step (s)", ".2f"),
                memory,
                ("chunk_samples", "chunk_samples", "d"),
                ("activation_checkpointing", "checkpointing", ""),
                ("h", "h", "d"),
                ("predicted_peak_gib", "planned peak GiB", ".1f"),
                ("plan_s", "planning (s)", ".2f"),
                ("floor_s", "floor (s)", ".2f"),
                ("step_over_floor", "step / floor", ".2f"),
            ],
        ),
        "## Estimators",
        markdown_table(
            by_group("estimators"),
            [
                ("name", "estimator", "s"),
                ("batch", "batch", "d"),
                ("status", "status", "s"),
                ("time_s", "step (s)", ".2f"),
                memory,
                ("floor_s", "floor (s)", ".2f"),
                ("step_over_floor", "step / floor", ".2f"),
            ],
        ),
    ]
    profile = [r for r in rows if r["kind"] == "profile" and r.get("file")]
    if profile:
        parts.append(f"Profiler summary (3 sampling steps, ours and diffusers): `{profile[0]['file']}`.")
    skipped = [r for r in rows if r["status"] in ("skipped", "error", "no fit")]
    if skipped:
        parts.append(
            "Not measured:\n" + "\n".join(f"* {r['key']}: {r['status']}, {r['reason']}" for r in skipped)
        )
    return "\n\n".join(parts) + "\n"


def render_sd35(payload: dict) -> str:
    """The SD 3.5 run's report: the sampler, RLR and GRPO per batch, the planned steps."""
    rows = payload["rows"]
    memory = (
        ("peak_gib", "peak GiB", ".1f") if payload.get("cuda") else ("activation_mb", "activation MB", ".1f")
    )
    samples = {r["images"]: r["time_s"] for r in rows if r["kind"] == "sampler" and r["status"] == "ok"}
    # Times of skipped or failed configurations stay blank (the reasons are listed below the tables); a step's
    # time over our no-grad sample of as many images is the share sampling is of it.
    shown = [
        dict(r, time_s=r["time_s"] if r["status"] in ("ok", "OOM") else None,
             over_sample=r["time_s"] / samples[r["images"]]
             if r["kind"] == "step" and r["status"] == "ok" and r["images"] in samples else None)
        for r in rows
    ]
    weights = payload.get("weights_b", {})
    resolution = payload.get("resolution", ())
    on_device = f"; {payload['weights_gib']:.1f} GiB on the device" if "weights_gib" in payload else ""
    step_columns = [
        ("name", "estimator", "s"),
        ("batch", "prompts", "d"),
        ("images", "images", "d"),
        ("status", "status", "s"),
        ("time_s", "step (s)", ".2f"),
        memory,
        ("over_sample", "step / no-grad sample", ".2f"),
    ]
    parts = [
        f"# GPU cost: {payload['setting']}",
        f"{payload['machine']}. {payload['versions']}. Wall time {payload.get('elapsed_s', 0):.0f} s "
        f"(deadline {payload['deadline_s']:g} s).",
        f"SD 3.5 Medium size: {sum(weights.values()):.2f} B weights "
        f"({', '.join(f'{k} {v:.2f} B' for k, v in weights.items())}){on_device}. "
        f"Built with random weights in memory in {payload.get('build_s', 0):.1f} s, LoRA added in "
        f"{payload.get('load_s', 0):.1f} s (loading a checkpoint from disk is not measured); "
        f"{payload.get('lora_weights', 0):,} LoRA weights; images of {' x '.join(map(str, resolution))} px, "
        f"{payload.get('t5_tokens')} T5 tokens per prompt.",
        "## Our no-grad sampler (latents out)",
        markdown_table(
            [r for r in shown if r["group"] == "sampler"],
            [("images", "images", "d"), ("status", "status", "s"), ("time_s", "time (s)", ".2f"), memory],
        ),
        "## RLR and GRPO: one gradient estimate (rollout and every term's backward)",
        markdown_table(
            [r for r in shown if r["group"] == "estimators"],
            step_columns + [("floor_s", "floor (s)", ".2f"), ("step_over_floor", "step / floor", ".2f")],
        ),
        "## Memory-planned steps",
        markdown_table(
            [r for r in shown if r["group"] == "planned"],
            step_columns[:1] + [("memory", "memory options", "s")] + step_columns[1:] + [
                ("chunk_samples", "chunk_samples", "d"),
                ("activation_checkpointing", "checkpointing", ""),
                ("h", "h", "d"),
                ("predicted_peak_gib", "planned peak GiB", ".1f"),
                ("plan_s", "planning (s)", ".2f"),
            ],
        ),
    ]
    skipped = [r for r in rows if r["status"] in ("skipped", "error", "no fit")]
    if skipped:
        parts.append(
            "Not measured:\n" + "\n".join(f"* {r['key']}: {r['status']}, {r['reason']}" for r in skipped)
        )
    return "\n\n".join(parts) + "\n"


def elapsed() -> float:
    return time.perf_counter() - START


class _Elapsed(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"[{elapsed():6.1f} s] {record.getMessage()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="output directory (default: benchmarks/results)"
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=270.0,
        help="start no configuration predicted to end after this many seconds from launch "
        "(default 270: the whole run stays under 5 minutes)",
    )
    parser.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default="sd15",
        help="sd15: every estimator at Stable Diffusion 1.5 size, and our sampler against diffusers'; "
        "sd35: RLR against GRPO at Stable Diffusion 3.5 Medium size (flow matching, the setting of "
        "configs/sd35_medium_*.yaml) (default sd15)",
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU (tests this script)")
    parser.add_argument(
        "--num-steps", type=int, default=None,
        help="sampling steps T (default 50, 5 with --tiny; sd35: 10)",
    )
    parser.add_argument(
        "--guidance", type=float, default=None, help="classifier-free guidance scale (default 5; sd35: 4.5)"
    )
    parser.add_argument(
        "--batches",
        type=str,
        default=None,
        help="comma-separated prompts per batch, the last one for the planned runs "
        "(default 1,2,6, 1,2 with --tiny; sd35: 1,2, each prompt sampled group_size times)",
    )
    parser.add_argument(
        "--budgets",
        type=str,
        default=None,
        help="comma-separated memory_budget_gb values of the planned runs, numbers (GiB) or auto; "
        "the same step without a budget always runs after them (default 24,16,auto; with "
        "--tiny: auto, after two runs with chunk_samples=1 given: on a CPU a budget counts "
        "the process's whole resident memory, so a number of GiB says little there; sd35: auto, for RLR and "
        "the largest GRPO group, whose unbudgeted steps run at every batch)",
    )
    args = parser.parse_args(argv)
    family = FAMILIES[args.family]
    if args.num_steps is None:
        args.num_steps = family.num_steps[args.tiny]
    if args.guidance is None:
        args.guidance = family.guidance
    try:
        args.batches = tuple(sorted({int(b) for b in (args.batches or family.batches[args.tiny]).split(",")}))
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.batches or args.batches[0] < 1:
        parser.error(f"--batches must be positive, got {args.batches!r}")
    planned = []
    if args.tiny and args.budgets is None and args.family == "sd15":
        planned += [
            dict(chunk_samples=1, activation_checkpointing=True),
            dict(chunk_samples=1, activation_checkpointing=False),
        ]
    for text in (args.budgets or family.budgets[args.tiny]).split(","):
        text = text.strip()
        try:
            budget = text if text == "auto" else float(text)
        except ValueError:
            parser.error(f"--budgets takes numbers of GiB > 0 or auto, got {text!r}")
        if budget != "auto" and not budget > 0:
            parser.error(f"--budgets takes numbers of GiB > 0 or auto, got {text!r}")
        planned.append(dict(memory_budget_gb=budget if budget == "auto" or budget % 1 else int(budget)))
    # SD 1.5: the unchunked step after the planned ones, at their batch (SD 3.5 measures it at every batch).
    args.planned = planned + ([dict(memory_budget_gb=None)] if args.family == "sd15" else [])
    if not args.tiny and not torch.cuda.is_available():
        parser.error(
            f"no CUDA device: the {family.label}-size model takes minutes per step on a CPU; "
            f"use --tiny to run this script's code path on the tiny model"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        # The tiny model's ops are too small to share out; on a CPU shared with other work, idle threads
        # spinning for their share would make the timings noise.
        torch.set_num_threads(1)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Elapsed())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for noisy in ("lightning", "lightning.pytorch", "rlr_lightning.models"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A progress bar per model loaded would bury the results (the model is loaded once or twice).
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    bench = Benchmark(args)
    versions = ", ".join(f"{name} {version(name)}" for name in ("torch", "diffusers", "peft", "transformers"))
    if args.family == "sd35":
        model = (
            "SD 3.5 Medium-size MMDiT, CLIP-L/G, T5-XXL and VAE (random weights, bf16, bf16 autocast), 512 px"
            if bench.cuda else "tiny SD 3 (tiny-sd3) on CPU (float32) at its own resolution"
        )
        setting = (
            f"{model}, LoRA r32 / alpha 64 fp32 on both streams' attention, flow SDE T = {args.num_steps} at "
            f"noise level {bench.family.eta:g}, guidance {args.guidance:g}, ColorBalance reward through the "
            f"VAE decoder; RLR h=2 group {SD35_RLR_GROUP} against GRPO"
        )
    elif bench.cuda:
        setting = (
            f"SD 1.5-size UNet/VAE (random weights, bf16, bf16 autocast), LoRA r4 fp32 on attention, 512 px, "
            f"T = {args.num_steps}, guidance {args.guidance:g}, eta 1, ColorBalance reward through the VAE "
            "decoder"
        )
    else:
        setting = (f"tiny model on CPU (float32), T = {args.num_steps}, guidance {args.guidance:g}, eta 1, "
                   "ColorBalance reward")
    log = ResultLog(
        args.out,
        f"gpu_cost{bench.suffix}",
        dict(
            machine=machine(),
            versions=versions,
            setting=setting,
            cuda=bench.cuda,
            family=args.family,
            deadline_s=args.deadline_s,
            args={k: str(v) for k, v in vars(args).items()},
        ),
        render,
    )
    logger.info("%s; %s. Results go to %s", machine(), versions, log.json)
    try:
        failed = measure_all(bench, log)
    finally:
        bench.close()
    return 1 if failed else 0


def measure_all(bench: Benchmark, log: ResultLog) -> list[str]:
    """Set up, then measure the configurations in order within the deadline; returns the failed ones."""
    args = bench.args
    log.write(**bench.setup())
    build = sd35_configurations if args.family == "sd35" else configurations
    configs = build(args.batches, args.planned)
    for i, config in enumerate(configs):
        if config.group != "sampler" and bench.pipe is not None:
            bench.release_pipeline()  # its weights would count in every later peak
        row = dict(
            key=config.key,
            name=config.name,
            group=config.group,
            kind=config.kind,
            batch=config.batch,
            T=args.num_steps,
        )
        if args.family == "sd35":
            row.update(images=config.images, group_size=config.group_size)
        if config.memory:
            row["memory"] = config.memory_text
        predicted = bench.predict(config)
        left = args.deadline_s - elapsed()
        row["predicted_s"] = predicted
        if predicted > left:
            row.update(
                status="skipped",
                reason=f"deadline: predicted {predicted:.1f} s, {max(left, 0):.1f} s left "
                f"of --deadline-s {args.deadline_s:g}",
            )
            logger.info("skip %s: %s", config.key, row["reason"])
            log.add(row)
            continue
        started = time.perf_counter()
        try:
            row.update(bench.run(config))
        except Exception as error:  # one broken configuration must not lose the others' GPU time
            logger.exception("%s failed", config.key)
            row.update(status="error", reason=f"{type(error).__name__}: {error}".splitlines()[0][:300])
            clear_lora_grads(bench.base)
            free_memory()
        row["wall_s"] = time.perf_counter() - started
        memory = (
            f", {row['peak_gib']:.1f} GiB"
            if "peak_gib" in row
            else (f", {row['activation_mb']:.1f} activation MB" if "activation_mb" in row else "")
        )
        plan = (
            f", plan chunk_samples={row.get('chunk_samples')} "
            f"checkpointing={row.get('activation_checkpointing')}"
            if config.group == "planned" and row["status"] in ("ok", "OOM")
            else ""
        )
        ratio = (
            f", {row['step_over_floor']:.2f}x floor"
            if "step_over_floor" in row
            else (
                f", ours/diffusers {row['ours_over_diffusers']:.2f}" if "ours_over_diffusers" in row else ""
            )
        )
        if row["status"] == "no fit":
            ratio = f": {row['reason']}"
        logger.info(
            "[%d/%d] %s: %s %.2f s%s%s%s",
            i + 1,
            len(configs),
            config.key,
            row["status"],
            row.get("time_s", float("nan")),
            memory,
            plan,
            ratio,
        )
        log.add(row)
    log.write(elapsed_s=elapsed())
    skipped = [r["key"] for r in log.payload["rows"] if r["status"] == "skipped"]
    failed = [r["key"] for r in log.payload["rows"] if r["status"] == "error"]
    if skipped:
        logger.info("Skipped for the deadline (%d): %s", len(skipped), "; ".join(skipped))
    if failed:
        logger.info("Failed (%d): %s", len(failed), "; ".join(failed))
    logger.info("Done in %.0f s: %s, %s, %s", elapsed(), log.jsonl, log.json, log.markdown)
    print(log.markdown.read_text())
    return failed


if __name__ == "__main__":
    sys.exit(main())
