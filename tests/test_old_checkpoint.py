"""A checkpoint written before the module was split into a Task, a backward loop and callbacks (commit
435a1a4: ``RLRModule("tiny", estimator=RLR(h=1), num_steps=3, seed=0)``, 2 steps on "a cat", "a dog") still
loads with its LoRA weights and counters, and a run resumes from it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from rlr_lightning.data import PromptDataModule
from rlr_lightning.estimators import RLR
from rlr_lightning.module import RLRModule

OLD = Path(__file__).parent / "data" / "checkpoint_v0.1_tiny_rlr.ckpt"


def test_an_old_checkpoint_loads_its_lora_weights_and_counters():
    saved = torch.load(OLD, map_location="cpu", weights_only=False)
    module = RLRModule.load_from_checkpoint(OLD, estimator=RLR(h=1))
    assert module.settings.num_steps == 3 and module.global_step == 0  # the step is the trainer's
    state = module.state_dict()
    lora = saved["state_dict"]
    assert lora and all("lora_" in k for k in lora)
    for key, value in lora.items():
        assert torch.equal(state[key], value), key
    assert module.run_id == saved["rlr_run_id"] and module.skips.total == saved["rlr_skipped_updates"]
    assert module.checkpoint_reward == saved["rlr_reward"]


def test_a_run_resumes_from_an_old_checkpoint(tmp_path):
    module = RLRModule("tiny", estimator=RLR(h=1), num_steps=3, seed=0, export_dir=str(tmp_path / "lora"))
    data = PromptDataModule(prompts=["a cat", "a dog"], batch_size=2)
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data, ckpt_path=OLD)
    assert trainer.global_step == 3  # two restored steps and one more
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
