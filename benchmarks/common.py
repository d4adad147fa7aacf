"""Shared pieces of the benchmark scripts: the tiny problem, timing, memory, tables."""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from rlr_lightning.diagnostics import AutogradMemoryMeter
from rlr_lightning.estimators import derive_seed, rollout
from rlr_lightning.module import RLRModule
from rlr_lightning.rewards import ColorBalance

RESULTS = Path(__file__).resolve().parent / "results"
QUICKSTART_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv_out", "time_emb_proj")


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return f"{platform.node() or 'host'}: {device}, torch {torch.__version__}, {date.today().isoformat()}"


def tiny_module(estimator, num_steps: int, pretrained: str = "tiny", **kwargs) -> RLRModule:
    """The quickstart problem: tiny model, trailing spacing, red-minus-blue reward, wide LoRA targets."""
    from rlr_lightning.backbone import LoraSettings

    defaults = dict(pretrained_model_name_or_path=pretrained, estimator=estimator, reward=ColorBalance(),
                    num_steps=num_steps, eta=1.0, timestep_spacing="trailing",
                    lora=LoraSettings(rank=4, alpha=4.0, target_modules=QUICKSTART_TARGETS))
    defaults.update(kwargs)
    module = RLRModule(**defaults)
    module.configure_model()
    return module


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def estimator_step(module: RLRModule, embeds, prompts, draw: int) -> None:
    """One gradient estimate: rollout plus every term's backward (no optimizer step)."""
    result = rollout(module.estimator, module.sampler, embeds, prompts, module.latent_reward,
                     derive_seed(0, draw, 0), derive_seed(0, draw, 1))
    for term in result.terms:
        term.loss().backward()
    for p in module.backbone.lora_parameters().values():
        p.grad = None


def measure_step(module: RLRModule, prompts, repeats: int = 5, warmup: int = 1) -> dict:
    """Median step time (s) and peak activation bytes of one estimator step (+ CUDA peak when on GPU)."""
    embeds = module.conditioning_for(prompts)
    for i in range(warmup):
        estimator_step(module, embeds, prompts, 10_000 + i)
    times = []
    for i in range(repeats):
        gc.collect()
        synchronize()
        start = time.perf_counter()
        estimator_step(module, embeds, prompts, i)
        synchronize()
        times.append(time.perf_counter() - start)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with AutogradMemoryMeter(exclude=module.parameters()) as meter:
        estimator_step(module, embeds, prompts, 99)
        gc.collect()
    out = {"time_s": statistics.median(times), "activation_mb": meter.peak / 2**20}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def timed(fn, repeats: int = 5) -> float:
    for _ in range(1):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format(row[k], f) if k in row else "" for k, _, f in columns) + " |")
    return "\n".join(lines)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
