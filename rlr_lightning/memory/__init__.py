"""Memory: the plan types (:mod:`.plan`), the planner that chooses a plan for a budget (:mod:`.planner`), and
the measurements it plans from (:mod:`.measure`).

A :class:`MemoryPlan` says how many trajectory samples one graph-carrying model call group may hold
(``chunk_samples``) and whether activation checkpointing is on. The estimators and the sampler execute it
(``rlr_lightning.estimators.base``, ``rlr_lightning.sampling``); the planner chooses it from costs measured on
the real model before the first step.
"""

from rlr_lightning.memory.measure import (
    AutogradMemoryMeter,
    LatentRewardFn,
    StepFn,
    measure,
    measure_costs,
    per_sample_cost,
    plan_task,
    resolve_budget,
)
from rlr_lightning.memory.plan import (
    BlockLength,
    GraphShape,
    MemoryBudgetError,
    MemoryCosts,
    MemoryOptions,
    MemoryPlan,
    PlannedMemory,
    format_bytes,
)
from rlr_lightning.memory.planner import Phase, memory_phases, plan_memory, predicted_peak

__all__ = [
    "AutogradMemoryMeter",
    "BlockLength",
    "GraphShape",
    "LatentRewardFn",
    "MemoryBudgetError",
    "MemoryCosts",
    "MemoryOptions",
    "MemoryPlan",
    "Phase",
    "PlannedMemory",
    "StepFn",
    "format_bytes",
    "measure",
    "measure_costs",
    "memory_phases",
    "per_sample_cost",
    "plan_memory",
    "plan_task",
    "predicted_peak",
    "resolve_budget",
]
