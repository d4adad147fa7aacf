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
   parameter-mode ZO; full backprop;
4. our no-grad sampler with the denoiser compiled (``model.compile_denoiser``) at the batches from the second
   on, after one compiling sample (``compile_s``), against the eager one (``compiled_over_eager``).
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

``--family wan``: RLR at Wan 2.1 text-to-video 1.3B size, in the setting of ``configs/wan21_1p3b_rlr.yaml``:

    python benchmarks/gpu_cost.py --family wan [--out DIR]    # GPU: Wan 2.1 T2V 1.3B-size, random weights
    python benchmarks/gpu_cost.py --family wan --tiny         # the same code path on CPU, tiny-wan

The pipeline (the 1.4 B transformer, the 5.7 B UMT5-XXL encoder, Wan 2.1's causal video VAE, UniPC flow sigmas at
shift 3: 7.2 B weights) is built with random weights on the GPU in bf16, in memory (``wan21_t2v_1p3b_components``),
with LoRA rank 32 / alpha 32 on every block's self- and cross-attention projections, videos of 33 frames at
480 x 832 px (9 latent frames, 14,040 transformer tokens a video), T = 16 flow-SDE steps at noise level 0.7,
guidance 5, bf16 autocast, UMT5 prompts of 226 tokens, the ``ColorBalance`` reward on every 4th decoded frame,
3 frames at a time (``PerFrameReward``). Measured, in this order: our no-grad sample of the step's videos; RLR
h = 2 (``zo_mode=score``, ``baseline=group``, ``group_size=2``) at one prompt with ``memory_budget_gb=auto`` (the
recipe's setting), then without a budget. Writes ``gpu_cost_wan.*`` (``gpu_cost_wan_tiny.*``).

``--family sdxl``: RLR at Stable Diffusion XL base size, 1024 px, in the setting of ``configs/sdxl_aesthetic_rlr.yaml``:

    python benchmarks/gpu_cost.py --family sdxl [--out DIR]   # GPU: SDXL base 1.0-size, random weights
    python benchmarks/gpu_cost.py --family sdxl --tiny        # the same code path on CPU, tiny-sdxl

The pipeline (the 2.57 B UNet with its ``text_time`` added conditioning, CLIP-L, OpenCLIP bigG with projection, the
SDXL VAE: 3.5 B weights) is built with random weights on the GPU in bf16, in memory (``common.sdxl_base_components``),
with LoRA rank 4 / alpha 4 on the UNet's attention projections, 2 prompts of 1024 px, T = 40 DDIM steps at eta 1
(the model's leading spacing), guidance 5, bf16 autocast, the ``ColorBalance`` reward on the decoded images (the
recipe's aesthetic reward needs downloaded weights). Measured, in this order: our no-grad sample of the step's
images; the recipe's RLR step (``h=auto``, ``zo_mode=score``, leave-one-out baseline, normalised advantages) with
``memory_budget_gb`` = 24, 40 and ``auto`` (the 24, 40 and 80 GB cards, or the device's free memory); then RLR h = 2,
auto's ceiling, without a budget. Writes ``gpu_cost_sdxl.*`` (``gpu_cost_sdxl_tiny.*``).

``--family flux``: RLR at FLUX.1-dev size, 512 px, in the setting of ``configs/flux1_dev_hpsv2_rlr.yaml``:

    python benchmarks/gpu_cost.py --family flux [--out DIR]   # GPU: FLUX.1-dev-size, random weights
    python benchmarks/gpu_cost.py --family flux --tiny        # the same code path on CPU, tiny-flux

The pipeline (the 11.9 B guidance-distilled transformer, CLIP-L, the 4.76 B T5-XXL encoder, the 16-channel FLUX VAE,
the resolution-shifted flow-matching scheduler: 16.9 B weights, 34 GB in bf16) is built with random weights on the
GPU in bf16, in memory (``common.flux1_dev_components``), with LoRA rank 32 / alpha 64 on the attention projections
of both streams, 2 prompts sampled twice at 512 px, T = 10 flow-SDE steps at noise level 0.7, guidance embedding
3.5 (one transformer call a step), 512 T5 tokens a prompt, bf16 autocast, the ``ColorBalance`` reward. Measured:
our no-grad sample of the step's 4 images; the recipe's RLR step (``h=auto``, ``baseline=group``, ``group_size=2``)
with ``memory_budget_gb`` = 40 and ``auto`` (an 80 GB card is what the recipe names; a 24 GB card cannot hold the
weights, and ``--budgets 24`` gets the planner's "no fit"); then RLR h = 2 without a budget. Writes
``gpu_cost_flux.*`` (``gpu_cost_flux_tiny.*``).

``--reward pickscore`` (any family): PickScore, the reward of ``configs/sd35_medium_*.yaml``, instead of
``ColorBalance``: PickScore_v1's architecture (CLIP ViT-H/14, 0.99 B weights in float32) with random weights, saved
to the scratch directory and loaded through ``PickScoreReward(model_name_or_path, processor_name_or_path)`` as the
recipes load the released one (offline; a tiny CLIP with ``--tiny``). The files get ``_pickscore`` after the family
(``gpu_cost_sd35_pickscore.*``), so the colour-reward results stay.

    python benchmarks/gpu_cost.py --family sd35 --reward pickscore [--out DIR]

Each family is declared once, in ``FAMILIES``, and each reward in ``REWARDS``; everything else is one code path
for all of them.
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
import dataclasses  # noqa: E402
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
    build_networks,
    clear_lora_grads,
    estimator_step,
    estimator_step_peaks,
    floor_parts,
    flux1_dev_components,
    free_memory,
    is_out_of_memory,
    machine,
    markdown_table,
    measure_once,
    pickscore_dir,
    pickscore_model,
    sd15_pipeline_dir,
    sd35_medium_components,
    sdxl_base_components,
    share_backbone,
    synchronize,
    t5_xxl_config,
    weight_counts,
)

from rlr_lightning.estimators import (  # noqa: E402
    GRPO,
    RLR,
    FullBackprop,
    GradientEstimator,
    ScoreFunction,
    TruncatedBackprop,
)
from rlr_lightning.memory import MemoryBudgetError, PlannedMemory, memory_phases  # noqa: E402
from rlr_lightning.models import LoraSettings  # noqa: E402
from rlr_lightning.module import RLRModule  # noqa: E402
from rlr_lightning.rewards import ColorBalance, PerFrameReward, PickScoreReward, RewardModel  # noqa: E402
from rlr_lightning.sampling import Plan  # noqa: E402
from rlr_lightning.task import Task  # noqa: E402

logger = logging.getLogger("gpu_cost")

PROMPTS = ("a photo of a cat", "an owl at night", "a red fox", "a whale", "a horse on a hill", "a frog")

#: Predicted time of each kind of work, in units of our no-grad sample at the same batch: measured at batch 2
#: on an H100 (no-grad sample 3.7 s, RLR score 6.6 s, parameter mode 12.3 s, truncated 3.2-3.7 s, score
#: function 6.5 s, diffusers 2.5 s). Planned steps add recomputation and chunking; OOM runs stop early.
COST = {
    "sampler": 1.0,
    "diffusers": 0.7,
    "profile": 0.3,
    "rlr_score": 1.8,
    "rlr_score_h4": 2.0,
    "rlr_parameter": 3.4,
    "rlr_parameter_h4": 3.8,
    "truncated": 1.0,
    "score_function": 1.8,
    "full": 1.0,
    "planned": 2.7,
    # Not yet measured: torch.compile of an SD 1.5 UNet takes about a minute (and again at a new batch size).
    "compiled": 8.0,
}
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
#: The same at Wan 2.1 T2V 1.3B size, in units of our no-grad sample of as many videos. Not yet measured on a GPU:
#: counted in transformer passes of T = 16 steps, as for SD 3.5 (a no-grad sample is 16 forwards; RLR h = 2 adds 3
#: steps of forward and backward and 13 re-scored steps), the VAE decoder's backward through 33 frames included
#: in the margin; the planned step recomputes what it checkpoints. Replace them by the ratios of the first GPU run.
WAN_COST = dict(sampler=1.0, rlr=4.0, planned=5.5)
#: RLR's group at Wan size: ``configs/wan21_1p3b_rlr.yaml``'s ``group_size`` (videos per prompt).
WAN_RLR_GROUP = 2
#: The same at SDXL base size (1024 px, T = 40, guidance 5), in units of our no-grad sample of as many images. Not
#: yet measured on a GPU: the unbudgeted step as SD 1.5's RLR h = 2 (1.8, and 2.3 measured at 2 prompts on an
#: H100); the planned ones from SD 1.5's H100 run, where a 24 GB budget at 6 prompts cost 11 no-grad samples (chunks
#: of one sample, recomputation) and auto 3.5; planning, whose cost measurements decode and backpropagate 1024-px
#: images, is in the margin. Replace them by the ratios of the first GPU run.
SDXL_COST = dict(sampler=1.0, rlr=2.3, planned=8.0)
#: The same at FLUX.1-dev size (512 px, T = 10, no classifier-free guidance), as for SD 3.5: a no-grad sample is 10
#: transformer passes, RLR h = 2 adds 3 steps of forward and backward and 7 re-scored steps; the planned steps at a
#: budget of 40 GB, where the 34 GB of weights leave little room, chunk and recompute. Not yet measured on a GPU.
FLUX_COST = dict(sampler=1.0, rlr=4.0, planned=8.0)
#: RLR's group at FLUX size: ``configs/flux1_dev_hpsv2_rlr.yaml``'s ``group_size`` (images per prompt).
FLUX_RLR_GROUP = 2


# -- what is measured ---------------------------------------------------------------------------------------


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


def nograd_sample(images: int, cost: float) -> Config:
    return Config("ours: no-grad sample", "sampler", images, kind="sampler", cost=cost)


def rlr(h: int, zo_mode: str, batch: int, group: str = "estimators", **memory) -> Config:
    cost = COST["planned"] if memory else COST[f"rlr_{zo_mode}_h4" if h == 4 else f"rlr_{zo_mode}"]
    estimator = lambda: RLR(h=h, zo_mode=zo_mode)
    return Config(f"RLR h={h} zo={zo_mode}", group, batch, estimator=estimator, cost=cost, memory=memory, h=h)


def truncated(k: int, batch: int) -> Config:
    estimator = lambda: TruncatedBackprop(k=k)
    return Config(f"truncated K={k}", "estimators", batch, estimator=estimator, cost=COST["truncated"])


def score_function(batch: int) -> Config:
    return Config("score function", "estimators", batch, estimator=ScoreFunction, cost=COST["score_function"])


def full_backprop(batch: int) -> Config:
    return Config("full backprop", "estimators", batch, estimator=FullBackprop, cost=COST["full"])


def sd15_configurations(batches: tuple[int, ...], planned: list[dict]) -> list[Config]:
    """Every SD 1.5 configuration, most important first (duplicates, e.g. when the batches coincide, are
    dropped by the caller).

    Args:
        batches: Prompts per batch; the largest is the planned runs' batch.
        planned: ``RLRModule`` memory options of the planned runs (``memory_budget_gb=24``, ...).
    """
    small, mid, large = batches[0], batches[min(1, len(batches) - 1)], batches[-1]
    configs: list[Config] = []
    for b in sorted(set(batches), reverse=True):
        diffusers = Config(
            "diffusers StableDiffusionPipeline", "sampler", b, kind="diffusers", cost=COST["diffusers"]
        )
        configs += [nograd_sample(b, COST["sampler"]), diffusers]
    profile = "profile: 3 sampling steps, ours and diffusers"
    configs.append(Config(profile, "sampler", mid, kind="profile", cost=COST["profile"]))
    configs += [rlr(2, "score", large, "planned", **memory) for memory in planned]
    configs += [rlr(2, "score", mid), rlr(2, "score", small)]
    configs += [truncated(1, mid), truncated(2, mid), score_function(mid), rlr(1, "score", mid)]
    configs += [rlr(4, "score", mid), rlr(2, "parameter", mid), full_backprop(small), full_backprop(mid)]
    # The baselines' memory at the largest batch, next to the planned RLR steps.
    configs += [truncated(2, large), score_function(large)]
    configs += [rlr(1, "score", small), truncated(1, small), truncated(2, small), score_function(small)]
    configs += [rlr(1, "parameter", small), rlr(2, "parameter", small)]
    configs += [rlr(1, "parameter", mid), rlr(4, "parameter", mid)]
    configs += [truncated(1, large), rlr(1, "score", large)]
    # Last, for their compilation's minutes: our sampler with the denoiser compiled (model.compile_denoiser).
    compiled = "ours compiled: no-grad sample"
    configs += [
        Config(compiled, "sampler", b, kind="compiled", cost=COST["compiled"]) for b in batches if b >= mid
    ]
    return configs


def rlr_group(
    batch: int,
    group: str = "estimators",
    group_size: int = SD35_RLR_GROUP,
    costs: dict[str, float] = SD35_COST,
    **memory,
) -> Config:
    """RLR h = 2 as the SD 3.5 and Wan recipes run it: score-mode ZO, each sample's baseline the other samples
    of its prompt (``group_size`` per prompt); ``costs`` are the family's predicted ratios."""
    estimator = lambda: RLR(h=2, zo_mode="score", baseline="group", group_size=group_size)
    cost = costs["planned" if memory else "rlr"]
    name = f"RLR h=2 zo=score group={group_size}"
    return Config(
        name, group, batch, estimator=estimator, cost=cost, memory=memory, h=2, group_size=group_size
    )


def grpo(group_size: int, batch: int, group: str = "estimators", **memory) -> Config:
    """GRPO with the recipe's clip and advantages and one inner update: one gradient estimate per batch."""
    estimator = lambda: GRPO(group_size=group_size, inner_updates=1)
    name, cost = f"GRPO G={group_size}", SD35_COST["planned" if memory else "grpo"]
    return Config(name, group, batch, estimator=estimator, cost=cost, memory=memory, group_size=group_size)


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
    configs = [
        nograd_sample(n, SD35_COST["sampler"]) for n in sorted({b * g for b in batches for g in groups})
    ]
    for b in batches:
        configs += [rlr_group(b), grpo(SD35_GRPO_GROUPS[0], b)]
    configs += [grpo(g, b) for g in SD35_GRPO_GROUPS[1:] for b in batches]
    configs += [rlr_group(batches[-1], "planned", **memory) for memory in planned]
    configs += [grpo(SD35_GRPO_GROUPS[-1], batches[-1], "planned", **memory) for memory in planned]
    return configs


def planned_memory_record(planned: PlannedMemory) -> dict:
    """The planner's view of a step for its result row: the measured costs (GiB; per sample where per sample)
    and the predicted peak of every phase (GiB), the chosen plan's."""
    assert planned.costs is not None and planned.shape is not None  # plan_memory records both
    costs = {k: v / 2**30 for k, v in dataclasses.asdict(planned.costs).items() if v is not None}
    phases: dict[str, float] = {}
    for phase in memory_phases(planned.costs, planned.shape, planned.plan):
        phases[phase.name] = max(phases.get(phase.name, 0.0), phase.total / 2**30)
    return {"memory_costs_gib": costs, "predicted_phases_gib": phases}


def wan_configurations(batches: tuple[int, ...], planned: list[dict]) -> list[Config]:
    """The Wan 2.1 T2V 1.3B-size run, most important first: our no-grad sample of each step's videos (the unit
    of the predictions), RLR h = 2 with the recipe's group at the largest batch with each memory option of
    ``planned`` (the recipe plans with ``memory_budget_gb: auto``), then RLR without a budget at every batch
    (at full size its unchunked activations are what the planner is for).

    Args:
        batches: Prompts per batch; the largest is the planned runs' batch.
        planned: ``RLRModule`` memory options of the planned runs.
    """
    rlr_wan = lambda batch, group="estimators", **memory: rlr_group(
        batch, group, group_size=WAN_RLR_GROUP, costs=WAN_COST, **memory
    )
    configs = [nograd_sample(n, WAN_COST["sampler"]) for n in sorted({b * WAN_RLR_GROUP for b in batches})]
    configs += [rlr_wan(batches[-1], "planned", **memory) for memory in planned]
    configs += [rlr_wan(b) for b in batches]
    return configs


def rlr_recipe(
    batch: int, group: str = "estimators", group_size: int = 1, costs: dict[str, float] = SDXL_COST, **memory
) -> Config:
    """RLR as the SDXL and FLUX recipes configure it (``configs/sdxl_aesthetic_rlr.yaml``,
    ``configs/flux1_dev_hpsv2_rlr.yaml``): ``h: auto`` under a budget (the planner's block length, at most 2), and
    h = 2, auto's ceiling, without one (``h: auto`` needs a budget to choose by); uniform block starts, score-mode
    ZO, advantages normalised by the running reward std; each sample's baseline the other samples of its prompt when
    ``group_size`` > 1 (FLUX), else the rest of the batch (``leave_one_out``, SDXL). ``costs`` are the family's
    predicted ratios. The floor is reported for the block length the step ran with."""
    budgeted = memory.get("memory_budget_gb") is not None
    baseline = "group" if group_size > 1 else "leave_one_out"

    def estimator() -> RLR:
        return RLR(
            h="auto" if budgeted else 2,
            block_law="uniform",
            zo_mode="score",
            baseline=baseline,
            group_size=group_size,
            normalize_advantages=True,
        )

    name = f"RLR h={'auto' if budgeted else 2} zo=score" + (f" group={group_size}" if group_size > 1 else "")
    cost = costs["planned" if memory else "rlr"]
    return Config(
        name, group, batch, estimator=estimator, cost=cost, memory=memory, h=2, group_size=group_size
    )


def recipe_configurations(
    batches: tuple[int, ...], planned: list[dict], group_size: int, costs: dict[str, float]
) -> list[Config]:
    """The run of a recipe's RLR step (SDXL, FLUX), most important first: our no-grad sample of each step's images
    (the unit of the predictions), the recipe's step at the largest batch with each memory option of ``planned``
    (the budgets of the 24, 40 and 80 GB cards the README's table has rows for, then ``auto``, the recipes'
    setting), then the step without a budget at every batch.

    Args:
        batches: Prompts per batch; the largest is the planned runs' batch.
        planned: ``RLRModule`` memory options of the planned runs.
        group_size: Images per prompt.
        costs: The family's predicted ratios.
    """
    images = sorted({b * group_size for b in batches})
    configs = [nograd_sample(n, costs["sampler"]) for n in images]
    configs += [rlr_recipe(batches[-1], "planned", group_size, costs, **memory) for memory in planned]
    configs += [rlr_recipe(b, "estimators", group_size, costs) for b in batches]
    return configs


def sdxl_configurations(batches: tuple[int, ...], planned: list[dict]) -> list[Config]:
    """The SDXL base-size run: :func:`recipe_configurations` with the recipe's one image per prompt."""
    return recipe_configurations(batches, planned, 1, SDXL_COST)


def flux_configurations(batches: tuple[int, ...], planned: list[dict]) -> list[Config]:
    """The FLUX.1-dev-size run: :func:`recipe_configurations` with the recipe's group of images per prompt."""
    return recipe_configurations(batches, planned, FLUX_RLR_GROUP, FLUX_COST)


# -- the models ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """A family's model, built (the set-up's first timed part, ``build_s``).

    Attributes:
        name: Every module's ``pretrained_model_name_or_path``: a pipeline directory, or the name reported.
        load: Gives the base module (built, model not loaded) its task, the set-up's second timed part
            (``load_s``), and returns what the report says of the model besides the two times.
    """

    name: str
    load: Callable[[RLRModule], dict]


def build_sd15(bench: Benchmark) -> Model:
    """The tiny pipeline, or SD 1.5's UNet and VAE with random weights saved to the scratch directory; the
    base module loads it by name, as training does (``Task.build``: LoRA A from the module's seed)."""
    if bench.args.tiny:
        from rlr_lightning.tiny import ensure_tiny_pipeline

        name = str(ensure_tiny_pipeline())
    else:
        logger.info("Building the SD 1.5-size pipeline with random weights (bf16) in %s", bench.scratch)
        name = sd15_pipeline_dir(str(bench.scratch / "sd15"), dtype=bench.dtype, device=bench.device)

    def load(module: RLRModule) -> dict:
        module.configure_model()
        return {}

    return Model(name, load)


def build_components(
    bench: Benchmark,
    backbone_class: type,
    real: Callable[..., dict],
    hub_id: str,
    tiny: Callable[[], dict],
    tiny_name: str,
) -> tuple[str, object, dict[str, int]]:
    """A family's backbone, built in memory without LoRA: its real architectures with random weights on the device,
    or with ``--tiny`` the tiny model's weights; returns the model's name, the backbone and the real architectures'
    weight counts (:func:`common.weight_counts`).

    Args:
        bench: The run.
        backbone_class: The family's backbone, which takes the components as keywords.
        real: Builds the real components on a device, in a dtype (``common.sdxl_base_components``, ...).
        hub_id: The released model whose architectures ``real`` builds.
        tiny: Builds the tiny model's components (:mod:`rlr_lightning.tiny`).
        tiny_name: The tiny model's name.
    """
    if bench.args.tiny:
        name, components = tiny_name, tiny()
        # The real architectures on the meta device (shapes, no memory): their configuration is checked here, by
        # the backbone's own checks too, and their size reported, as a GPU run builds them.
        meta = real("meta", bench.dtype)
        backbone_class(dtype=bench.dtype, **meta)
        weights = weight_counts(meta)
    else:
        logger.info("Building %s's architectures, random weights in bf16, on %s", hub_id, bench.device)
        name, components = f"{hub_id} (architecture, random weights)", real(bench.device, bench.dtype)
        weights = weight_counts(components)
    return name, backbone_class(dtype=bench.dtype, **components), weights


def build_sd35(bench: Benchmark) -> Model:
    """SD 3.5 Medium's architectures with random weights built on the device, or the tiny SD 3, assembled into
    a backbone in memory (nothing is loaded from disk); the base module adopts it with LoRA added."""
    from rlr_lightning.models.sd3 import StableDiffusion3Backbone
    from rlr_lightning.tiny import build_tiny_sd3_components

    name, backbone, weights = build_components(
        bench,
        StableDiffusion3Backbone,
        sd35_medium_components,
        "stabilityai/stable-diffusion-3.5-medium",
        build_tiny_sd3_components,
        "tiny-sd3",
    )
    return in_memory_model(bench, name, backbone, weights, lambda b: dict(t5_tokens=b.max_sequence_length))


def build_sdxl(bench: Benchmark) -> Model:
    """SDXL base 1.0's architectures with random weights built on the device, or the tiny SDXL, assembled into a
    backbone in memory (nothing is loaded from disk); the base module adopts it with LoRA added, at the scale's
    resolution (the ``(h, w, 0, 0, h, w)`` time ids follow it)."""
    from rlr_lightning.models.sdxl import StableDiffusionXLBackbone
    from rlr_lightning.tiny import build_tiny_sdxl_components

    name, backbone, weights = build_components(
        bench,
        StableDiffusionXLBackbone,
        sdxl_base_components,
        "stabilityai/stable-diffusion-xl-base-1.0",
        build_tiny_sdxl_components,
        "tiny-sdxl",
    )
    return in_memory_model(
        bench, name, backbone, weights, lambda b: dict(clip_tokens=b.tokenizer.model_max_length)
    )


def build_flux(bench: Benchmark) -> Model:
    """FLUX.1-dev's architectures with random weights built on the device, or the tiny FLUX (guidance-distilled,
    as FLUX.1-dev), assembled into a backbone in memory (nothing is loaded from disk); the base module adopts it
    with LoRA added, at the scale's resolution (the scheduler's shift follows the image's token count)."""
    from rlr_lightning.models.flux import FluxBackbone
    from rlr_lightning.tiny import build_tiny_flux_components

    name, backbone, weights = build_components(
        bench,
        FluxBackbone,
        flux1_dev_components,
        "black-forest-labs/FLUX.1-dev",
        build_tiny_flux_components,
        "tiny-flux",
    )

    def facts(backbone: FluxBackbone) -> dict:
        h, w = backbone.latent_size
        return dict(t5_tokens=backbone.max_sequence_length, image_tokens=(h // 2) * (w // 2))

    return in_memory_model(bench, name, backbone, weights, facts)


#: UMT5 tokens per prompt at Wan size: ``configs/wan21_1p3b_rlr.yaml``'s ``max_sequence_length`` (the default of
#: ``WanPipeline.encode_prompt``).
WAN_UMT5_TOKENS = 226


def keep_fp32_modules(model: torch.nn.Module) -> None:
    """Parameters of the modules a diffusers model keeps in float32 (``_keep_in_fp32_modules``: Wan's time
    embedder, norms and modulation table) back to float32 after a cast, as ``from_pretrained`` loads them."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, param in model.named_parameters():
        if any(part in keep for part in name.split(".")):
            param.data = param.data.float()


def wan21_t2v_1p3b_components(
    device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> dict:
    """Wan 2.1 text-to-video 1.3B's components with its architectures and random weights, built in memory.

    The configurations are those of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``: the ``WanTransformer3DModel`` (30 blocks
    of 12 heads of 128, FFN 8960, ``1 x 2 x 2`` patches, RMS query/key norm across heads: 1.42 B weights), Wan 2.1's
    causal video VAE (``AutoencoderKLWan``'s defaults), the UMT5-XXL encoder (24 layers, d_model 4096, 64 heads,
    gated-GELU d_ff 10240, the 256,384-token table: 5.68 B) and ``UniPCMultistepScheduler`` with flow sigmas at
    shift 3 (the released 480p setting). The tokenizer is :mod:`rlr_lightning.tiny`'s character-level T5 one (the
    weights are random anyway) at :data:`WAN_UMT5_TOKENS`. Done as ``common.sd35_medium_components`` does for SD 3.5.

    Nothing is written to disk: give the result to ``WanBackbone(dtype=dtype, **components)``.

    Args:
        device: Where the random initialisation runs. On a GPU the 7 B weights take seconds; on a CPU the UMT5
            encoder alone would take minutes and 23 GB, so use ``meta`` there (shapes and counts, no memory).
        dtype: Dtype the weights are cast to, each network right after it is built (so the float32
            initialisation of at most one network is held at a time: UMT5's 23 GB); the transformer's
            ``_keep_in_fp32_modules`` stay in float32, as ``from_pretrained`` loads them.
        seed: Seed of the initialisation.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from rlr_lightning.tiny import tiny_t5_tokenizer

    builders = {
        "transformer": lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=12,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=8960,
            num_layers=30,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        ),
        "vae": lambda: AutoencoderKLWan(),  # its defaults are Wan 2.1's VAE
        "text_encoder": lambda: UMT5EncoderModel(t5_xxl_config(UMT5Config, vocab_size=256384)),
    }
    components = build_networks(builders, device, dtype, seed)
    keep_fp32_modules(components["transformer"])
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    return dict(components, tokenizer=tiny_t5_tokenizer(WAN_UMT5_TOKENS), scheduler=scheduler)


def build_wan(bench: Benchmark) -> Model:
    """Wan 2.1 T2V 1.3B's architectures with random weights built on the device, or the tiny Wan, assembled into
    a backbone in memory (nothing is loaded from disk); the base module adopts it with LoRA added, at the
    scale's frames and resolution."""
    from rlr_lightning.models.wan import WanBackbone

    defaults = None
    if bench.args.tiny:
        from rlr_lightning.tiny import TINY_WAN_SIZE, build_tiny_wan_components

        name, components = "tiny-wan", build_tiny_wan_components()  # the weights of tiny-wan
        resolution, num_frames = TINY_WAN_SIZE
        defaults = dict(resolution=resolution, num_frames=num_frames)  # what tiny-wan's directory records
        # Wan 2.1 T2V 1.3B's architectures on the meta device (shapes, no memory): its configuration is checked
        # here and its size reported, as a GPU run builds it.
        weights = weight_counts(wan21_t2v_1p3b_components("meta"))
    else:
        logger.info("Building Wan 2.1 T2V 1.3B's architectures, random weights in bf16, on %s", bench.device)
        name = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers (architecture, random weights)"
        components = wan21_t2v_1p3b_components(bench.device, bench.dtype)
        weights = weight_counts(components)
    backbone = WanBackbone(dtype=bench.dtype, defaults=defaults, **components)

    def facts(backbone: WanBackbone) -> dict:
        h, w = backbone.latent_size
        patch = backbone.latent_patch
        return dict(
            umt5_tokens=backbone.max_sequence_length,
            num_frames=backbone.num_frames,
            latent_frames=backbone.latent_frames,
            video_tokens=backbone.latent_frames * (h // patch) * (w // patch),
        )

    return in_memory_model(bench, name, backbone, weights, facts)


def in_memory_model(bench: Benchmark, name: str, backbone, weights: dict[str, int], facts: Callable) -> Model:
    """A family's backbone built in memory without LoRA, whose ``load`` gives the base module a task on it
    (``Task.adapt``: the settings' resolution, frames and prompt length, LoRA from the module's seed) and reports
    the model's size, ``weights`` (per network, from :func:`common.weight_counts`) and ``facts(backbone)``."""

    def load(module: RLRModule) -> dict:
        # Task.build's set-up, on a backbone it cannot load by name.
        settings, lora = module.settings, module.lora_settings
        task = Task.adapt(backbone, settings, lora, module.reward, module.seed, bench.device, name)
        module.configure_model(task)
        lora_weights = sum(p.numel() for p in backbone.lora_parameters().values())
        sizes = ", ".join(f"{k} {v / 1e9:.2f} B" for k, v in weights.items())
        logger.info(
            "%s size: %.2f B weights (%s), %s LoRA weights",
            bench.family.label,
            sum(weights.values()) / 1e9,
            sizes,
            f"{lora_weights:,}",
        )
        out = dict(weights_b={k: v / 1e9 for k, v in weights.items()}, resolution=list(backbone.resolution))
        out.update(facts(backbone), lora_weights=lora_weights)
        if bench.cuda:
            out["weights_gib"] = torch.cuda.memory_allocated() / 2**30
        return out

    return Model(name, load)


def sd15_setting(bench: Benchmark) -> str:
    guidance = f"guidance {bench.args.guidance:g}, eta 1"
    if not bench.cuda:
        return f"tiny model on CPU (float32), T = {bench.num_steps}, {guidance}, {bench.reward_text()}"
    return (
        f"SD 1.5-size UNet/VAE (random weights, bf16, bf16 autocast), LoRA r4 fp32 on attention, 512 px, "
        f"T = {bench.num_steps}, {guidance}, {bench.reward_text()} through the VAE decoder"
    )


def sd35_setting(bench: Benchmark) -> str:
    model = (
        "SD 3.5 Medium-size MMDiT, CLIP-L/G, T5-XXL and VAE (random weights, bf16, bf16 autocast), 512 px"
        if bench.cuda
        else "tiny SD 3 (tiny-sd3) on CPU (float32) at its own resolution"
    )
    return (
        f"{model}, LoRA r32 / alpha 64 fp32 on both streams' attention, flow SDE T = {bench.num_steps} at "
        f"noise level {bench.family.eta:g}, guidance {bench.args.guidance:g}, {bench.reward_text()} through "
        f"the VAE decoder; RLR h=2 group {SD35_RLR_GROUP} against GRPO"
    )


def wan_setting(bench: Benchmark) -> str:
    frames = bench.scale.num_frames
    model = (
        f"Wan 2.1 T2V 1.3B-size transformer, UMT5-XXL and video VAE (random weights, bf16, bf16 autocast), "
        f"{frames} frames at {' x '.join(map(str, bench.scale.resolution))} px"
        if bench.cuda
        else f"tiny Wan 2.1 (tiny-wan) on CPU (float32), {frames} frames at its own resolution"
    )
    reward = bench.family.reward(ColorBalance())  # the per-frame wrapping's settings
    assert isinstance(reward, PerFrameReward)
    return (
        f"{model}, LoRA r{bench.family.lora.rank} / alpha {bench.family.lora.alpha:g} fp32 on self- and "
        f"cross-attention, flow SDE T = {bench.num_steps} at noise level {bench.family.eta:g}, guidance "
        f"{bench.args.guidance:g}, {bench.reward_text('')} on every {reward.frame_stride}th "
        f"decoded frame, {reward.frame_chunk} frames at a time (PerFrameReward); RLR h=2 group {WAN_RLR_GROUP}"
    )


def lora_text(lora: LoraSettings) -> str:
    return f"LoRA r{lora.rank} / alpha {lora.alpha:g} fp32"


def sdxl_setting(bench: Benchmark) -> str:
    size = bench.scale.resolution
    model = (
        f"SDXL base-size UNet, CLIP-L, OpenCLIP bigG and VAE (random weights, bf16, bf16 autocast), {size} px"
        if bench.cuda
        else "tiny SDXL (tiny-sdxl) on CPU (float32) at its own resolution"
    )
    return (
        f"{model}, {lora_text(bench.family.lora)} on the UNet's attention, DDIM T = {bench.num_steps} at eta "
        f"{bench.family.eta:g} (the model's leading spacing), guidance {bench.args.guidance:g}, {bench.reward_text()} "
        "through the VAE decoder; RLR as configs/sdxl_aesthetic_rlr.yaml (h=auto under a budget, score-mode ZO, "
        "leave-one-out baseline, normalised advantages)"
    )


def flux_setting(bench: Benchmark) -> str:
    size = bench.scale.resolution
    model = (
        f"FLUX.1-dev-size transformer, CLIP-L, T5-XXL and VAE (random weights, bf16, bf16 autocast), {size} px"
        if bench.cuda
        else "tiny FLUX.1 (tiny-flux) on CPU (float32) at its own resolution"
    )
    return (
        f"{model}, {lora_text(bench.family.lora)} on both streams' attention, flow SDE T = {bench.num_steps} at "
        f"noise level {bench.family.eta:g}, guidance embedding {bench.args.guidance:g} (guidance-distilled: one "
        f"transformer call a step), {bench.reward_text()} through the VAE decoder; RLR as "
        f"configs/flux1_dev_hpsv2_rlr.yaml (h=auto under a budget, score-mode ZO, group {FLUX_RLR_GROUP}, "
        "normalised advantages)"
    )


# -- the benchmark ------------------------------------------------------------------------------------------


def sample_without_grad(sampler, embeds, num_steps: int) -> None:
    """Our no-grad sample of ``num_steps`` steps from a fixed seed, latents out."""
    with torch.no_grad():
        sampler.run(Plan(num_steps), embeds, generator=torch.Generator().manual_seed(0))


class Benchmark:
    """Runs the configurations on one loaded backbone, within the deadline, writing each result at once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.family = FAMILIES[args.family]
        self.cuda = torch.cuda.is_available() and not args.tiny
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.scale = self.family.tiny if args.tiny else self.family.full
        self.num_steps = args.num_steps
        self.reward_choice = REWARDS[args.reward]
        self.suffix = self.family.suffix + self.reward_choice.suffix + ("_tiny" if args.tiny else "")
        self.sample_s: dict[int, float] = {}  # our no-grad sample time by images: the unit of predictions
        self.floors: dict[tuple[int, int], dict] = {}
        self.warm: set[int] = set()
        self.pipe = None
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_cost-"))

    # -- set-up ---------------------------------------------------------------------------------------

    def reward_text(self, word: str = " reward") -> str:
        """The reward, as the settings say it: its name, ``word``, and what its weights are."""
        choice = self.reward_choice
        weights = f" ({choice.weights[1 if self.args.tiny else 0]})" if choice.weights else ""
        return f"{choice.name}{word}{weights}"

    def setup(self) -> dict:
        """Build the reward, the family's model and the base module on it, whose backbone every configuration
        shares."""
        started = time.perf_counter()
        self.reward, reward_facts = self.reward_choice.build(self)
        reward_s = time.perf_counter() - started
        started = time.perf_counter()
        model = self.family.build(self)
        self.model_name = model.name
        built = time.perf_counter()
        self.base = self.new_module(RLR(h=2))
        facts = model.load(self.base)
        self.base.to(self.device)
        self.backbone = self.base.backbone
        loaded = time.perf_counter()
        logger.info("Model ready: built in %.1f s, loaded in %.1f s", built - started, loaded - built)
        facts.update(reward_facts, reward=self.reward_choice.option, reward_build_s=reward_s)
        return dict(build_s=built - started, load_s=loaded - built, **facts)

    def autocast(self):
        # Frozen bf16 weights with fp32 LoRA, as Lightning's bf16-mixed precision runs training steps.
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def new_module(self, estimator: GradientEstimator, num_steps: int | None = None, **memory) -> RLRModule:
        """A module with this run's settings, its model not loaded yet."""
        return RLRModule(
            pretrained_model_name_or_path=self.model_name,
            estimator=estimator,
            reward=self.family.reward(self.reward),
            num_steps=num_steps or self.num_steps,
            eta=self.family.eta,
            guidance_scale=self.args.guidance,
            resolution=self.scale.resolution,
            num_frames=self.scale.num_frames,
            lora=self.family.lora,
            weight_dtype="bfloat16" if self.cuda else "float32",
            **memory,
        )

    def module(self, estimator: GradientEstimator, num_steps: int | None = None, **memory) -> RLRModule:
        """A module with this run's settings on the shared backbone."""
        return share_backbone(self.new_module(estimator, num_steps, **memory), self.backbone)

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
            sample_without_grad(module.task.sampler, embeds, 3)
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
        """Our no-grad sample time of ``images`` images: measured, or the family's prior."""
        if images in self.sample_s:
            return self.sample_s[images]
        return self.scale.sample_s_per_image * max(images, 1.2)

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

    def measure(self, config: Config) -> dict:
        """The result row of ``config``: measured, failed, or skipped (predicted to end past the deadline)."""
        row = dict(key=config.key, name=config.name, group=config.group, kind=config.kind, batch=config.batch)
        row["T"] = self.num_steps
        if self.family.counts_images:
            row.update(images=config.images, group_size=config.group_size)
        if config.memory:
            row["memory"] = config.memory_text
        row["predicted_s"] = predicted = self.predict(config)
        left = self.args.deadline_s - elapsed()
        if predicted > left:
            reason = f"{max(left, 0):.1f} s left of --deadline-s {self.args.deadline_s:g}"
            row.update(status="skipped", reason=f"deadline: predicted {predicted:.1f} s, {reason}")
            logger.info("skip %s: %s", config.key, row["reason"])
            return row
        started = time.perf_counter()
        try:
            runner = dict(
                step=self.step,
                sampler=self.sample,
                diffusers=self.diffusers,
                profile=self.profile,
                compiled=self.compiled_sample,
            )
            row.update(runner[config.kind](config))
        except Exception as error:  # one broken configuration must not lose the others' GPU time
            logger.exception("%s failed", config.key)
            row.update(status="error", reason=f"{type(error).__name__}: {error}".splitlines()[0][:300])
            clear_lora_grads(self.base)
            free_memory()
        row["wall_s"] = time.perf_counter() - started
        return row

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
                row.update(planned_memory_record(planned))
            embeds = module.task.conditioning_for(prompts)
            phase_peaks: dict[str, float] = {}
            if planned is not None and self.cuda:
                # Each phase's peak, to check the planner's phases against: a synchronize per term is the cost.
                run = lambda: phase_peaks.update(estimator_step_peaks(module, embeds, prompts, draw=0))
            else:
                run = lambda: estimator_step(module, embeds, prompts, draw=0)
            row.update(measure_once(run, exclude=list(module.parameters())))
            if phase_peaks:
                row["measured_phases_gib"] = phase_peaks
                row["peak_gib"] = max(phase_peaks.values())  # the per-phase resets hide the step's own peak
            clear_lora_grads(module)
            plan = module.task.memory_plan
            row.update(
                chunk_samples=plan.chunk_samples, activation_checkpointing=plan.activation_checkpointing
            )
            if module.estimator.block_length is not None:
                row["h"] = module.estimator.block_length
            if config.h is not None and row["status"] == "ok":
                # The rollout's images: every prompt group_size times; the block length the step ran with (the
                # planner's, for h=auto).
                floor = self.floor(module, prompts * config.group_size, row.get("h", config.h))
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
                nograd_s = self.sample_s.get(len(prompts))
                self.floors[key] = floor_parts(module, prompts, h, repeats=1, nograd_s=nograd_s)
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
        sampler = self.base.task.sampler
        with self.autocast():
            embeds = self.base.task.conditioning_for(prompts)
            row = measure_once(lambda: sample_without_grad(sampler, embeds, self.num_steps))
        if row["status"] == "ok":
            self.sample_s[config.images] = row["time_s"]
        return row

    def compiled_sample(self, config: Config) -> dict:
        """Our no-grad sample with the denoiser compiled (``model.compile_denoiser``): compiled by a first sample
        at this batch (its time, compilation included, is ``compile_s``), then timed as :meth:`sample` is."""
        prompts = self.prompts(config.images)
        self.warm_up(config.images)
        sampler = self.base.task.sampler
        sampler.denoiser.compile()
        try:
            with self.autocast():
                embeds = self.base.task.conditioning_for(prompts)
                first = measure_once(lambda: sample_without_grad(sampler, embeds, self.num_steps))
                row = measure_once(lambda: sample_without_grad(sampler, embeds, self.num_steps))
        finally:
            sampler.denoiser.compile(enabled=False)
        row["compile_s"] = first["time_s"]
        eager = self.sample_s.get(config.images)
        if row["status"] == "ok" and eager is not None:
            row["compiled_over_eager"] = row["time_s"] / eager
        return row

    def load_pipeline(self):
        """diffusers' pipeline on the same weights, with our LoRA exported and loaded the diffusers way (only
        SD 1.5's configurations compare against diffusers)."""
        if self.pipe is None:
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.set_verbosity_error()  # its notes on the disabled safety checker are not ours
            lora_dir = self.scratch / "lora"
            self.backbone.export_lora(lora_dir)
            pipe = StableDiffusionPipeline.from_pretrained(
                self.model_name, dtype=self.dtype, safety_checker=None, local_files_only=True
            ).to(self.device)
            pipe.load_lora_weights(lora_dir)
            pipe.set_progress_bar_config(disable=True)
            ours = sum(p.numel() for p in self.backbone.lora_parameters().values())
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
            embeds = self.base.task.conditioning_for(prompts)
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
        # The base task's sampler at 3 steps.
        settings = dataclasses.replace(self.base.settings, num_steps=3)
        sampler = Task.from_backbone(self.backbone, settings, name=self.model_name).sampler
        with self.autocast():
            embeds = self.base.task.conditioning_for(prompts)

        def ours():
            with self.autocast():
                sample_without_grad(sampler, embeds, 3)

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        sorts = (["self_device_time_total"] if self.cuda else []) + ["self_cpu_time_total"]
        sections, row = [], {"status": "ok", "time_s": 0.0}
        theirs = lambda: self.call_pipeline(embeds, 3)
        runs = [
            ("ours", "ours: DDIMSampler.run, no grad", ours),
            ("diffusers", "diffusers StableDiffusionPipeline", theirs),
        ]
        for who, label, fn in runs:
            fn()  # warm-up
            synchronize()
            started = time.perf_counter()
            with profile(activities=activities) as prof:
                fn()
                synchronize()
            seconds = time.perf_counter() - started
            row["time_s"] += seconds
            row[f"{who}_profiled_s"] = seconds
            averages = prof.key_averages()
            for sort in sorts:
                sections.append(
                    f"== {label}: 3 steps, batch {config.batch}, {seconds:.3f} s under the profiler; "
                    f"top 15 by {sort}\n{averages.table(sort_by=sort, row_limit=15)}"
                )
        path = self.args.out / f"gpu_profile{self.suffix}.txt"
        path.write_text(f"{machine()}\n\n" + "\n\n".join(sections) + "\n")
        row["file"] = path.name
        return row

    def release_pipeline(self) -> None:
        if self.pipe is not None:
            self.pipe = None
            free_memory()

    def close(self) -> None:
        """Free the pipeline and delete the scratch directory (the SD 1.5-size model takes 2 GB of disk)."""
        self.release_pipeline()
        shutil.rmtree(self.scratch, ignore_errors=True)


# -- the report ---------------------------------------------------------------------------------------------

Column = tuple[str, str, str]  # markdown_table's (key, header, format)
STATUS: Column = ("status", "status", "s")
STEP_TIME: Column = ("time_s", "step (s)", ".2f")
FLOOR: list[Column] = [("floor_s", "floor (s)", ".2f"), ("step_over_floor", "step / floor", ".2f")]
#: What the planner chose and predicted.
PLAN: list[Column] = [
    ("chunk_samples", "chunk_samples", "d"),
    ("activation_checkpointing", "checkpointing", ""),
    ("h", "h", "d"),
    ("predicted_peak_gib", "planned peak GiB", ".1f"),
    ("plan_s", "planning (s)", ".2f"),
]


def memory_column(payload: dict) -> Column:
    """The CUDA peak on a GPU, what autograd held with ``--tiny``."""
    return (
        ("peak_gib", "peak GiB", ".1f") if payload.get("cuda") else ("activation_mb", "activation MB", ".1f")
    )


def shown(rows: list[dict], group: str) -> list[dict]:
    """The rows of a table, times of skipped or failed configurations blank (the reasons are listed below the
    tables)."""
    return [
        dict(r, time_s=r["time_s"] if r["status"] in ("ok", "OOM") else None)
        for r in rows
        if r["group"] == group
    ]


def run_line(payload: dict) -> str:
    """Machine, versions, wall time and deadline, without the final full stop."""
    return (
        f"{payload['machine']}. {payload['versions']}. Wall time {payload.get('elapsed_s', 0):.0f} s "
        f"(deadline {payload['deadline_s']:g} s)"
    )


def report(payload: dict, parts: list[str]) -> str:
    """The title, the family's ``parts``, then what was not measured and why."""
    skipped = [r for r in payload["rows"] if r["status"] in ("skipped", "error", "no fit")]
    if skipped:
        parts = parts + [
            "Not measured:\n" + "\n".join(f"* {r['key']}: {r['status']}, {r['reason']}" for r in skipped)
        ]
    return "\n\n".join([f"# GPU cost: {payload['setting']}", *parts]) + "\n"


def render_sd15(payload: dict) -> str:
    """The SD 1.5 run's report: our sampler against diffusers per batch, the planned steps, the estimators."""
    rows, memory = payload["rows"], memory_column(payload)
    sampler: dict[int, dict] = {}
    for r in shown(rows, "sampler"):
        if r["kind"] in ("sampler", "diffusers", "compiled"):
            entry = sampler.setdefault(r["batch"], {"batch": r["batch"]})
            who = {"sampler": "ours", "diffusers": "diffusers", "compiled": "compiled"}[r["kind"]]
            entry.update({f"{who}_s": r["time_s"], f"{who}_mem": r.get(memory[0])})
            if r.get("ours_over_diffusers") is not None:
                entry["ratio"] = r["ours_over_diffusers"]
    sampler_columns = [
        ("batch", "batch", "d"),
        ("ours_s", "ours (s)", ".2f"),
        ("diffusers_s", "diffusers (s)", ".2f"),
        ("ratio", "ours / diffusers", ".2f"),
        ("compiled_s", "ours compiled (s)", ".2f"),
        ("ours_mem", f"ours {memory[1]}", ".1f"),
        ("diffusers_mem", f"diffusers {memory[1]}", ".1f"),
    ]
    planned = [("memory", "memory options", "s"), ("batch", "batch", "d"), STATUS, STEP_TIME, memory]
    estimators = [("name", "estimator", "s"), ("batch", "batch", "d"), STATUS, STEP_TIME, memory]
    parts = [
        f"{run_line(payload)}; model built in {payload.get('build_s', 0):.1f} s, "
        f"loaded in {payload.get('load_s', 0):.1f} s.",
        "## Our no-grad sampler against diffusers (same weights, same LoRA, latents out)",
        markdown_table(sorted(sampler.values(), key=lambda e: e["batch"]), sampler_columns),
        "## Memory-planned RLR steps",
        markdown_table(shown(rows, "planned"), planned + PLAN + FLOOR),
        "## Estimators",
        markdown_table(shown(rows, "estimators"), estimators + FLOOR),
    ]
    profile = [r for r in rows if r["kind"] == "profile" and r.get("file")]
    if profile:
        parts.append(f"Profiler summary (3 sampling steps, ours and diffusers): `{profile[0]['file']}`.")
    return report(payload, parts)


def render_grouped(payload: dict, model: str, steps_title: str, unit: str = "images") -> str:
    """A report of steps that sample each prompt several times (SD 3.5, Wan): ``model``, the sentence on the
    model after the run line; the sampler; the steps under ``steps_title``, each over our no-grad sample of as
    many ``unit`` (images or videos); the planned steps."""
    rows, memory = payload["rows"], memory_column(payload)
    samples = {r["images"]: r["time_s"] for r in rows if r["kind"] == "sampler" and r["status"] == "ok"}

    def steps(group: str) -> list[dict]:
        # A step's time over our no-grad sample of as many images is the share sampling is of it.
        over = lambda r: (
            r["time_s"] / samples[r["images"]] if r["status"] == "ok" and r["images"] in samples else None
        )
        return [dict(r, over_sample=over(r)) for r in shown(rows, group)]

    step = [("batch", "prompts", "d"), ("images", unit, "d"), STATUS, STEP_TIME, memory]
    step.append(("over_sample", "step / no-grad sample", ".2f"))
    estimator = ("name", "estimator", "s")
    sampler = [("images", unit, "d"), STATUS, ("time_s", "time (s)", ".2f"), memory]
    parts = [
        f"{run_line(payload)}.",
        model,
        "## Our no-grad sampler (latents out)",
        markdown_table(shown(rows, "sampler"), sampler),
        steps_title,
        markdown_table(steps("estimators"), [estimator, *step, *FLOOR]),
        "## Memory-planned steps",
        markdown_table(steps("planned"), [estimator, ("memory", "memory options", "s"), *step, *PLAN]),
    ]
    return report(payload, parts)


def model_size(payload: dict, label: str) -> str:
    """The model's size and set-up times, as the in-memory families report them."""
    weights = payload.get("weights_b", {})
    on_device = f"; {payload['weights_gib']:.1f} GiB on the device" if "weights_gib" in payload else ""
    return (
        f"{label} size: {sum(weights.values()):.2f} B weights "
        f"({', '.join(f'{k} {v:.2f} B' for k, v in weights.items())}){on_device}. "
        f"Built with random weights in memory in {payload.get('build_s', 0):.1f} s, LoRA added in "
        f"{payload.get('load_s', 0):.1f} s (loading a checkpoint from disk is not measured); "
        f"{payload.get('lora_weights', 0):,} LoRA weights{reward_size(payload)}"
    )


def reward_size(payload: dict) -> str:
    """The reward model's size, where it has weights (PickScore), as a clause of :func:`model_size`."""
    if "reward_weights_b" not in payload:
        return ""
    return (
        f"; reward model {payload['reward_weights_b']:.2f} B weights, saved and loaded from disk in "
        f"{payload.get('reward_build_s', 0):.1f} s"
    )


def render_sd35(payload: dict) -> str:
    """The SD 3.5 run's report: the sampler, RLR and GRPO per batch, the planned steps."""
    resolution = payload.get("resolution", ())
    model = (
        f"{model_size(payload, 'SD 3.5 Medium')}; images of {' x '.join(map(str, resolution))} px, "
        f"{payload.get('t5_tokens')} T5 tokens per prompt."
    )
    title = "## RLR and GRPO: one gradient estimate (rollout and every term's backward)"
    return render_grouped(payload, model, title)


def render_wan(payload: dict) -> str:
    """The Wan run's report: the sampler, RLR per batch, the planned steps (counted in videos)."""
    resolution = payload.get("resolution", ())
    model = (
        f"{model_size(payload, 'Wan 2.1 T2V 1.3B')}; videos of {payload.get('num_frames')} frames at "
        f"{' x '.join(map(str, resolution))} px ({payload.get('latent_frames')} latent frames, "
        f"{payload.get('video_tokens', 0):,} transformer tokens per video), {payload.get('umt5_tokens')} UMT5 "
        "tokens per prompt."
    )
    title = "## RLR: one gradient estimate (rollout and every term's backward)"
    return render_grouped(payload, model, title, unit="videos")


def render_sdxl(payload: dict) -> str:
    """The SDXL run's report: the sampler, the recipe's RLR step planned at each budget and unbudgeted."""
    resolution = payload.get("resolution", ())
    model = (
        f"{model_size(payload, 'SDXL base 1.0')}; images of {' x '.join(map(str, resolution))} px, "
        f"{payload.get('clip_tokens')} CLIP tokens per prompt in each text encoder."
    )
    title = "## RLR: one gradient estimate (rollout and every term's backward)"
    return render_grouped(payload, model, title)


def render_flux(payload: dict) -> str:
    """The FLUX run's report: the sampler, the recipe's RLR step planned at each budget and unbudgeted."""
    resolution = payload.get("resolution", ())
    model = (
        f"{model_size(payload, 'FLUX.1-dev')}; images of {' x '.join(map(str, resolution))} px "
        f"({payload.get('image_tokens', 0):,} image tokens), {payload.get('t5_tokens')} T5 tokens per prompt."
    )
    title = "## RLR: one gradient estimate (rollout and every term's backward)"
    return render_grouped(payload, model, title)


# -- the rewards --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reward:
    """An image reward of ``--reward``: one instance, built once, scores every configuration's images (a frozen
    reward has no state a step changes).

    Attributes:
        option: ``--reward``.
        name: The reward, as the settings name it.
        suffix: Of the output files' names, after the family's (the colour-reward runs' files keep theirs).
        build: The reward model of the run, and what the report says of it (``reward_weights_b``).
        weights: What the settings say of its weights after its name, on a GPU and with ``--tiny`` (none: no weights).
    """

    option: str
    name: str
    suffix: str
    build: Callable[[Benchmark], tuple[RewardModel, dict]]
    weights: tuple[str, str] | None = None


def build_pickscore(bench: Benchmark) -> tuple[RewardModel, dict]:
    """PickScore with PickScore_v1's architecture (CLIP ViT-H/14, float32) and random weights, saved to the scratch
    directory and loaded the way ``configs/sd35_medium_pickscore_rlr.yaml`` loads the released one
    (``PickScoreReward(model_name_or_path, processor_name_or_path)``, offline); with ``--tiny`` a tiny CLIP, and
    ViT-H/14's size counted on the meta device. Loading from disk is part of ``reward_build_s``."""
    path = bench.scratch / "pickscore"
    if bench.args.tiny:
        pickscore_dir(path, tiny=True)
        real = pickscore_model(
            "meta"
        )  # its configuration checked and its size reported, as a GPU run builds it
    else:
        logger.info("Building PickScore_v1's architecture (CLIP ViT-H/14), random weights, in %s", path)
        pickscore_dir(path, device=bench.device)
        real = None
    reward = PickScoreReward(model_name_or_path=str(path), processor_name_or_path=str(path))
    weights = weight_counts(dict(reward=real if real is not None else reward.clip))["reward"]
    logger.info("PickScore size: %.2f B weights", weights / 1e9)
    return reward, dict(reward_weights_b=weights / 1e9)


REWARDS = {
    "color": Reward("color", "ColorBalance", "", lambda bench: (ColorBalance(), {})),
    "pickscore": Reward(
        "pickscore",
        "PickScore",
        "_pickscore",
        build_pickscore,
        weights=("PickScore_v1's CLIP ViT-H/14, random weights, float32", "tiny CLIP"),
    ),
}


# -- the families -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    """A family's run at one scale: the full-size model on a GPU, or the tiny one on CPU (``--tiny``).

    Attributes:
        num_steps: ``--num-steps``'s default.
        batches: ``--batches``'s default.
        budgets: ``--budgets``'s default.
        memory: Memory options of planned steps run before the budgets' when ``--budgets`` is not given.
        resolution: Image side, or ``(height, width)``, in pixels (``None``: the model's own).
        num_frames: Frames per video (video families only; ``None``: the model's own).
        sample_s_per_image: Prior of our no-grad sample's time per image (per video), until one is measured.
    """

    num_steps: int
    batches: str
    budgets: str
    memory: tuple[dict, ...] = ()
    resolution: int | tuple[int, int] | None = None
    num_frames: int | None = None
    sample_s_per_image: float = 0.05


@dataclass(frozen=True)
class Family:
    """One model family's benchmark: all that differs between the families, declared once.

    Attributes:
        name: ``--family``.
        label: The model size, as messages name it.
        suffix: Of the output files' names (``gpu_cost{suffix}.json``; ``_tiny`` follows with ``--tiny``).
        full: The full-size run, on a GPU.
        tiny: The tiny run, on CPU (``--tiny``).
        guidance: ``--guidance``'s default.
        eta: The sampler's noise level (DDIM's eta; the flow SDE's noise level for SD 3).
        lora: LoRA adapters on the denoiser.
        unbudgeted_planned: The planned runs end with the same step without a budget, at their batch.
        counts_images: Rows carry ``images`` and ``group_size``: the steps sample each prompt several times.
        build: Builds the model (:class:`Model`).
        configurations: Every measurement, most important first, for the batches and the planned runs'
            memory options.
        setting: The run's setting, as the report's title says it.
        render: The markdown report of the results' JSON payload.
        reward: The run's reward model, from ``--reward``'s image reward (the video families score some of each
            video's decoded frames with it).
    """

    name: str
    label: str
    suffix: str
    full: Scale
    tiny: Scale
    guidance: float
    eta: float
    lora: LoraSettings
    unbudgeted_planned: bool
    counts_images: bool
    build: Callable[[Benchmark], Model]
    configurations: Callable[[tuple[int, ...], list[dict]], list[Config]]
    setting: Callable[[Benchmark], str]
    render: Callable[[dict], str]
    reward: Callable[[RewardModel], RewardModel] = lambda image_reward: image_reward


#: Explicit chunking on a CPU: there a budget counts the process's whole resident memory, so a number of GiB
#: says little.
TINY_CHUNKING = tuple(dict(chunk_samples=1, activation_checkpointing=flag) for flag in (True, False))
#: LoRA of the SD 3.5 recipes (``configs/sd35_medium_*.yaml``): Flow-GRPO's rank and alpha on every attention
#: projection of both streams.
SD35_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

FAMILIES = {
    "sd15": Family(
        name="sd15",
        label="SD 1.5",
        suffix="",
        # Prior: an H100 samples 2 images in 3.7 s.
        full=Scale(num_steps=50, batches="1,2,6", budgets="24,16,auto", sample_s_per_image=1.85),
        # T = 5: the smallest T with room for a block of h = 4.
        tiny=Scale(num_steps=5, batches="1,2", budgets="auto", memory=TINY_CHUNKING),
        guidance=5.0,
        eta=1.0,
        lora=LoraSettings(rank=4, alpha=4.0),
        unbudgeted_planned=True,
        counts_images=False,
        build=build_sd15,
        configurations=sd15_configurations,
        setting=sd15_setting,
        render=render_sd15,
    ),
    "sd35": Family(
        name="sd35",
        label="SD 3.5 Medium",
        suffix="_sd35",
        # Prior: 2 x 10 passes of the 2.5 B transformer over 256 + 333 tokens an image, at a third of an
        # H100's peak.
        full=Scale(num_steps=10, batches="1,2", budgets="auto", resolution=512, sample_s_per_image=0.25),
        # T = 10 with --tiny as well: the tiny SD 3 samples fast enough.
        tiny=Scale(num_steps=10, batches="1,2", budgets="auto"),
        guidance=4.5,
        eta=0.7,
        lora=LoraSettings(rank=32, alpha=64.0, target_modules=SD35_TARGETS),
        unbudgeted_planned=False,  # its unbudgeted steps run at every batch
        counts_images=True,
        build=build_sd35,
        configurations=sd35_configurations,
        setting=sd35_setting,
        render=render_sd35,
    ),
    "wan": Family(
        name="wan",
        label="Wan 2.1 T2V 1.3B",
        suffix="_wan",
        # The recipe's size: 33 frames at 480 x 832 (9 latent frames, 14,040 tokens a video), T = 16, one prompt
        # sampled twice. Prior: 2 x 16 passes of the 1.4 B transformer over 14,040 tokens a video (about 75 TFLOP
        # a pass, half of it attention) at a third of an H100's peak.
        full=Scale(
            num_steps=16,
            batches="1",
            budgets="auto",
            resolution=(480, 832),
            num_frames=33,
            sample_s_per_image=7.5,
        ),
        # T = 16 with --tiny as well, at tiny-wan's own 9 frames of 32 x 32 (3 of them scored per video: two
        # chunks of 3 frames for the 2 videos, so the reward's chunked checkpointing runs too).
        tiny=Scale(num_steps=16, batches="1", budgets="auto", num_frames=9),
        guidance=5.0,
        eta=0.7,
        lora=LoraSettings(rank=32, alpha=32.0, target_modules=("to_q", "to_k", "to_v", "to_out.0")),
        unbudgeted_planned=False,  # its unbudgeted steps run at every batch
        counts_images=True,
        build=build_wan,
        configurations=wan_configurations,
        setting=wan_setting,
        render=render_wan,
        # The recipe's per-frame wrapping of an image reward (HPSv2 there; ColorBalance here, as for the images).
        reward=lambda image_reward: PerFrameReward(image_reward, frame_stride=4, frame_chunk=3),
    ),
    "sdxl": Family(
        name="sdxl",
        label="SDXL base 1.0",
        suffix="_sdxl",
        # The recipe's size: 2 prompts at 1024 px (leave-one-out baselines within the batch), T = 40 with
        # classifier-free guidance; the planned runs at the budgets of the 24, 40 and 80 GB cards (auto: the
        # device's free memory). Prior: 80 UNet passes an image at about 25 ms each (5.9 TFLOP a pass at 1024 px, a
        # third of an H100's peak).
        full=Scale(num_steps=40, batches="2", budgets="24,40,auto", resolution=1024, sample_s_per_image=2.0),
        # The same T and budgets with --tiny (a CPU budget counts the whole process, so the three plans agree).
        tiny=Scale(num_steps=40, batches="1", budgets="24,40,auto"),
        guidance=5.0,
        eta=1.0,
        lora=LoraSettings(rank=4, alpha=4.0, target_modules=("to_q", "to_k", "to_v", "to_out.0")),
        unbudgeted_planned=False,  # its unbudgeted steps run at every batch
        counts_images=True,
        build=build_sdxl,
        configurations=sdxl_configurations,
        setting=sdxl_setting,
        render=render_sdxl,
    ),
    "flux": Family(
        name="flux",
        label="FLUX.1-dev",
        suffix="_flux",
        # The recipe's size: 2 prompts sampled twice at 512 px, T = 10, 512 T5 tokens. Budgets: 40 GB and auto (the
        # 80 GB card the recipe names, or the device's free memory); not 24 GB: the 12 B transformer and the T5-XXL
        # encoder alone are 33 GB in bf16, so a 24 GB card cannot hold the weights (with --budgets 24 the planner
        # answers "no fit", which is a result too). Prior: 10 passes of the 11.9 B transformer over 1,536 tokens
        # (37 TFLOP a pass) at a third of an H100's peak.
        full=Scale(num_steps=10, batches="2", budgets="40,auto", resolution=512, sample_s_per_image=1.2),
        tiny=Scale(num_steps=10, batches="1", budgets="40,auto"),
        guidance=3.5,
        eta=0.7,
        lora=LoraSettings(rank=32, alpha=64.0, target_modules=SD35_TARGETS),
        unbudgeted_planned=False,  # its unbudgeted steps run at every batch
        counts_images=True,
        build=build_flux,
        configurations=flux_configurations,
        setting=flux_setting,
        render=render_flux,
    ),
}


# -- the command --------------------------------------------------------------------------------------------


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
        "configs/sd35_medium_*.yaml); wan: RLR at Wan 2.1 text-to-video 1.3B size (33 frames at 480 x 832, "
        "the setting of configs/wan21_1p3b_rlr.yaml); sdxl: RLR at SDXL base size (1024 px, the setting of "
        "configs/sdxl_aesthetic_rlr.yaml); flux: RLR at FLUX.1-dev size (512 px, the setting of "
        "configs/flux1_dev_hpsv2_rlr.yaml) (default sd15)",
    )
    parser.add_argument(
        "--reward",
        choices=sorted(REWARDS),
        default="color",
        help="color: the ColorBalance reward (no weights); pickscore: PickScore with PickScore_v1's architecture "
        "(CLIP ViT-H/14, 0.99 B weights, random), saved to a scratch directory and loaded as the SD 3.5 recipes "
        "load it; a tiny CLIP with --tiny. Its files get a _pickscore suffix (default color)",
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU (tests this script)")
    parser.add_argument(
        "--num-steps",
        type=int,
        default=None,
        help="sampling steps T (default 50, 5 with --tiny; sd35: 10; wan: 16; sdxl: 40; flux: 10)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (default 5; sd35: 4.5; wan: 5; sdxl: 5; flux: 3.5, the value of "
        "its guidance embedding)",
    )
    parser.add_argument(
        "--batches",
        type=str,
        default=None,
        help="comma-separated prompts per batch, the last one for the planned runs "
        "(default 1,2,6, 1,2 with --tiny; sd35: 1,2, each prompt sampled group_size times; wan: 1, "
        "sampled twice; sdxl: 2, 1 with --tiny; flux: 2, 1 with --tiny, each prompt sampled twice)",
    )
    parser.add_argument(
        "--budgets",
        type=str,
        default=None,
        help="comma-separated memory_budget_gb values of the planned runs, numbers (GiB) or auto; "
        "the same step without a budget always runs after them (default 24,16,auto; with "
        "--tiny: auto, after two runs with chunk_samples=1 given: on a CPU a budget counts "
        "the process's whole resident memory, so a number of GiB says little there; sd35: auto, for RLR and "
        "the largest GRPO group, whose unbudgeted steps run at every batch; wan: auto, for RLR, whose "
        "unbudgeted step runs at every batch; sdxl: 24,40,auto; flux: 40,auto; for the recipe's RLR step with "
        "h=auto, whose unbudgeted step, h=2, runs at every batch)",
    )
    args = parser.parse_args(argv)
    family = FAMILIES[args.family]
    defaults = family.tiny if args.tiny else family.full
    if args.num_steps is None:
        args.num_steps = defaults.num_steps
    if args.guidance is None:
        args.guidance = family.guidance
    try:
        args.batches = tuple(sorted({int(b) for b in (args.batches or defaults.batches).split(",")}))
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.batches or args.batches[0] < 1:
        parser.error(f"--batches must be positive, got {args.batches!r}")
    planned = list(defaults.memory) if args.budgets is None else []
    for text in (args.budgets or defaults.budgets).split(","):
        text = text.strip()
        try:
            budget = text if text == "auto" else float(text)
            if budget != "auto" and not budget > 0:
                raise ValueError(text)
        except ValueError:
            parser.error(f"--budgets takes numbers of GiB > 0 or auto, got {text!r}")
        planned.append(dict(memory_budget_gb=budget if budget == "auto" or budget % 1 else int(budget)))
    args.planned = planned + ([dict(memory_budget_gb=None)] if family.unbudgeted_planned else [])
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
    header = dict(
        machine=machine(),
        versions=versions,
        setting=bench.family.setting(bench),
        cuda=bench.cuda,
        family=args.family,
        deadline_s=args.deadline_s,
        args={k: str(v) for k, v in vars(args).items()},
    )
    log = ResultLog(args.out, f"gpu_cost{bench.suffix}", header, bench.family.render)
    logger.info("%s; %s. Results go to %s", machine(), versions, log.json)
    try:
        failed = measure_all(bench, log)
    finally:
        bench.close()
    return 1 if failed else 0


def progress(config: Config, row: dict) -> str:
    """A measured row in one line: status, time, memory, the plan chosen and the ratio that matters."""
    memory = ""
    if "peak_gib" in row:
        memory = f", {row['peak_gib']:.1f} GiB"
    elif "activation_mb" in row:
        memory = f", {row['activation_mb']:.1f} activation MB"
    plan = ""
    if config.group == "planned" and row["status"] in ("ok", "OOM"):
        chunks, checkpointing = row.get("chunk_samples"), row.get("activation_checkpointing")
        plan = f", plan chunk_samples={chunks} checkpointing={checkpointing}"
    ratio = ""
    if row["status"] == "no fit":
        ratio = f": {row['reason']}"
    elif "step_over_floor" in row:
        ratio = f", {row['step_over_floor']:.2f}x floor"
    elif "ours_over_diffusers" in row:
        ratio = f", ours/diffusers {row['ours_over_diffusers']:.2f}"
    return f"{config.key}: {row['status']} {row.get('time_s', float('nan')):.2f} s{memory}{plan}{ratio}"


def measure_all(bench: Benchmark, log: ResultLog) -> list[str]:
    """Set up, then measure the configurations in order within the deadline; returns the failed ones."""
    log.write(**bench.setup())
    # Duplicates (e.g. when the batches coincide) are measured once, where they first come.
    unique: dict[str, Config] = {}
    for config in bench.family.configurations(bench.args.batches, bench.args.planned):
        unique.setdefault(config.key, config)
    configs = list(unique.values())
    for i, config in enumerate(configs, start=1):
        if config.group != "sampler":
            bench.release_pipeline()  # its weights would count in every later peak
        row = bench.measure(config)
        if row["status"] != "skipped":
            logger.info("[%d/%d] %s", i, len(configs), progress(config, row))
        log.add(row)
    log.write(elapsed_s=elapsed())
    skipped = [r["key"] for r in log.payload["rows"] if r["status"] == "skipped"]
    failed = [r["key"] for r in log.payload["rows"] if r["status"] == "error"]
    if skipped:
        logger.info("Skipped for the deadline (%d): %s", len(skipped), "; ".join(skipped))
    if failed:
        logger.info("Failed (%d): %s", len(failed), "; ".join(failed))
    logger.info("Done in %.0f s: %s, %s, %s", elapsed(), log.jsonl, log.json, log.markdown)
    print(log.markdown.read_text())  # the report, as the console's last word
    return failed


if __name__ == "__main__":
    sys.exit(main())
