"""Rebuild the packaged counter network from the world model's own samples, and measure its agreement with the
exact checker on held-out model samples.

    python benchmarks/build_counter.py --out /tmp/counter          # about 30 minutes on 2 CPU cores
    python benchmarks/build_counter.py --out /tmp/counter --measure-only rlr_lightning/world/pretrained/counter

The steps (each one's output lands in ``--work``, default ``/tmp/rlr_counter_build``, and is reused when there):

1. **Images that fool a counter trained on renders only.** Full backprop toward the count reward read by that
   counter (``benchmarks/data/counter_renders``) from ``shapes-world``: 60 steps of 16 training captions, 10 DDIM
   steps, trailing spacing, eta 1, guidance 3, AdamW 3e-3; the LoRA exported after 15, 30 and 60 steps.
2. **Labelled model samples** (``python -m rlr_lightning.world.model_samples``): the base model under five
   samplers (10 trailing steps at eta 1 / guidance 3 and at eta 1 / guidance 1 and at eta 0 / guidance 3; 20
   leading steps at eta 0 and at eta 1, guidance 3), two samples per caption; each LoRA of step 1 at strengths
   0.5, 1 and 1.5 under the two 10-step guidance-3 samplers. Training captions for training, held-out captions
   (other sampling seeds) for measuring.
3. **The counter**: each colour's soft checker mask through one shared network (``inputs=mask_per_colour``), 16
   channels, dilations 1 1 2 4 8, 3000 steps of 32 images, three quarters of each batch model samples.
4. **Agreement** on the held-out samples, per source: how often the rounded count of the asked colour (what the
   reward reads) and of every colour equals the checker's. Written to ``benchmarks/results/counter_agreement.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch
from common import RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]
RENDERS_ONLY = ROOT / "benchmarks" / "data" / "counter_renders"
SAMPLERS = {
    "base": [
        ("10", "1", "3", "trailing"),
        ("10", "1", "1", "trailing"),
        ("20", "0", "3", "default"),
        ("10", "0", "3", "trailing"),
        ("20", "1", "3", "default"),
    ],
    "lora": [("10", "1", "3", "trailing"), ("10", "0", "3", "trailing")],
}
MARKS = (15, 30, 60)
logger = logging.getLogger("build_counter")


def adversarial_loras(work: Path) -> list[Path]:
    """Step 1: LoRAs that fool the render-only counter (full backprop toward its count reward)."""
    import lightning as L
    from common import world_module, world_prompts

    from rlr_lightning.data import PromptDataModule
    from rlr_lightning.estimators import FullBackprop
    from rlr_lightning.rewards import WorldCountReward

    out = [work / f"lora_step{k}" for k in MARKS]
    if all((path / "pytorch_lora_weights.safetensors").is_file() for path in out):
        return out

    class Export(L.Callback):
        def on_train_batch_end(self, trainer, module, *args) -> None:
            if trainer.global_step in MARKS:
                module.backbone.export_lora(work / f"lora_step{trainer.global_step}")

    module = world_module(
        FullBackprop(),
        10,
        timestep_spacing="trailing",
        reward=WorldCountReward(str(RENDERS_ONLY)),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=1e-4),
        export_dir=str(work / "lora_final"),
    )
    data = PromptDataModule(prompts=world_prompts("train"), batch_size=16, seed=0)
    L.Trainer(
        accelerator="cpu",
        max_steps=max(MARKS),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=work,
        callbacks=[Export()],
    ).fit(module, datamodule=data)
    return out


def sample_sets(work: Path, loras: list[Path]) -> dict[str, list[Path]]:
    """Step 2: labelled model samples, training and held-out captions."""
    sets: dict[str, list[Path]] = {"train": [], "held_out": []}
    jobs = [("base", None, SAMPLERS["base"], [])] + [
        (lora.name, lora, SAMPLERS["lora"], ["--lora-strengths", "0.5", "1", "1.5"]) for lora in loras
    ]
    for name, lora, samplers, extra in jobs:
        for split, seed in (("train", 100), ("held_out", 200)):
            path = work / f"{name}_{split}.pt"
            sets[split].append(path)
            if path.is_file():
                continue
            command = [
                sys.executable,
                "-m",
                "rlr_lightning.world.model_samples",
                "--out",
                str(path),
                "--split",
                split,
                "--seed",
                str(seed + (0 if lora is None else 200)),
            ]
            if lora is None:
                command += ["--samples-per-caption", "2"]
            else:
                command += ["--lora", str(lora), *extra]
            for sampler in samplers:
                command += ["--sampler", *sampler]
            subprocess.run(command, check=True)
    return sets


def train(out: Path, train_sets: list[Path]) -> None:
    """Step 3: the counter."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "rlr_lightning.world.counter",
            "--out",
            str(out),
            "--steps",
            "3000",
            "--channels",
            "16",
            "--dilations",
            "1",
            "1",
            "2",
            "4",
            "8",
            "--inputs",
            "mask_per_colour",
            "--model-fraction",
            "0.75",
            "--model-samples",
            *map(str, train_sets),
        ],
        check=True,
    )


def agreement(counter: Path, held_out: list[Path]) -> dict:
    """Step 4: agreement with the checker on held-out model samples, per source and pooled."""
    from rlr_lightning.world.counter import checker_agreement, load_counter
    from rlr_lightning.world.model_samples import load_sets

    networks = {"counter": load_counter(counter), "renders only": load_counter(RENDERS_ONLY)}
    data = load_sets(held_out)
    rows = []
    for i, source in enumerate(data["sources"]):
        mask = data["source_index"] == i
        part = dict(
            images=data["images"][mask],
            counts=data["counts"][mask],
            captions=[c for c, m in zip(data["captions"], mask.tolist()) if m],
        )
        row = dict(source)
        for name, network in networks.items():
            row[name] = checker_agreement(network, part)
        rows.append(row)
    pooled = {name: checker_agreement(network, data) for name, network in networks.items()}
    where = counter.resolve()
    name = str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else str(counter)
    return dict(machine=machine(), counter=name, pooled=pooled, per_source=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to save the counter in")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/rlr_counter_build"),
        help="where the LoRAs and sample sets go (reused when present)",
    )
    parser.add_argument(
        "--measure-only",
        type=Path,
        default=None,
        metavar="COUNTER",
        help="skip training: measure this counter directory on the held-out samples",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    loras = adversarial_loras(args.work)
    sets = sample_sets(args.work, loras)
    counter = args.measure_only
    if counter is None:
        train(args.out, sets["train"])
        counter = args.out
    result = agreement(counter, sets["held_out"])
    (RESULTS / "counter_agreement.json").write_text(json.dumps(result, indent=1))
    for name, value in result["pooled"].items():
        logger.info(
            "%s: asked colour %.1f%%, every colour %.1f%% of %d held-out model samples",
            name,
            100 * value["asked"],
            100 * value["all_colours"],
            value["n"],
        )


if __name__ == "__main__":
    main()
