"""A callback for the DDP tests: each rank writes what it saw to ``<dir>/rank<r>.json``.

Lives in the tests package so a CLI subprocess started from the repository root can import it by class path.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


class RankProbe(L.Callback):
    """Records per rank: prompts, block starts, the initial noise of every step and the final LoRA weights.

    Args:
        directory: Where each rank writes its JSON report.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.prompts: list[list[str]] = []
        self.block_starts: list[float] = []
        self.noise_sums: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        run = pl_module.task.sampler.run

        def recording_run(plan, embeds, *args, **kwargs):
            if "block_start" in plan.info:
                self.block_starts.append(int(plan.info["block_start"]))
            initial = kwargs.get("initial_latents")
            if initial is not None:
                self.noise_sums.append(float(initial.double().sum()))
            return run(plan, embeds, *args, **kwargs)

        pl_module.task.sampler.run = recording_run

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.prompts.append(list(batch.prompts))

    def on_fit_end(self, trainer, pl_module) -> None:
        lora = {n: p.detach().double().sum().item() for n, p in pl_module.backbone.lora_parameters().items()}
        report = dict(
            rank=trainer.global_rank,
            world=trainer.world_size,
            global_step=trainer.global_step,
            prompts=self.prompts,
            block_starts=self.block_starts,
            noise_sums=self.noise_sums,
            lora=lora,
            prompt_means=sorted(pl_module.estimator.prompt_means.means.values()),
            lora_norm=float(
                torch.cat(
                    [p.detach().flatten() for p in pl_module.backbone.lora_parameters().values()]
                ).norm()
            ),
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
