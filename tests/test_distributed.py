"""Multi-process DDP on CPU (gloo) through the CLI, and SLURM detection with the requeue plugin."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_ddp_keeps_lora_identical_and_block_starts_shared(tiny_pipeline_dir, tmp_path):
    probe = tmp_path / "probe"
    cmd = [
        sys.executable,
        "-m",
        "rlr_lightning",
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_steps",
        "4",
        "--model.num_steps",
        "6",
        "--data.batch_size",
        "2",
        "--model.pretrained_model_name_or_path",
        str(tiny_pipeline_dir),
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "run"),
        "--trainer.callbacks+=tests.ddp_probe.RankProbe",
        "--trainer.callbacks.directory",
        str(probe),
        # Per-step baselines whose statistics are gathered over ranks (the prompts' running means).
        "--model.estimator.init_args.step_baseline",
        "[prompt_mean, prompt_mean, muprop, muprop, none, none]",
    ]
    # From the repository root, so the launcher's re-run of this command imports the tests package too.
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [4, 4]
    # Gradients are synchronised: different data, same weights, to the last bit.
    assert ranks[0]["lora"] == ranks[1]["lora"] and ranks[0]["lora_norm"] > 0
    # The block start shapes the graph: identical on every rank at every step.
    assert ranks[0]["block_starts"] == ranks[1]["block_starts"] and len(ranks[0]["block_starts"]) == 4
    # Every rank keeps the running mean of every prompt of the global batch, the same to the last bit.
    assert ranks[0]["prompt_means"] == ranks[1]["prompt_means"]
    assert len(ranks[0]["prompt_means"]) == len({p for r in ranks for batch in r["prompts"] for p in batch})
    # Prompts and noises differ between ranks (no duplicated trajectories).
    assert all(set(a).isdisjoint(b) for a, b in zip(ranks[0]["prompts"], ranks[1]["prompts"]))
    assert all(a != b for a, b in zip(ranks[0]["noise_sums"], ranks[1]["noise_sums"]))
    assert len(list((tmp_path / "run").rglob("pytorch_lora_weights.safetensors"))) == 1  # rank zero exports
    # The quickstart's before/after grid: rank zero renders it, and asking for the log directory (a broadcast)
    # on rank zero alone would hang the run.
    assert len(list((tmp_path / "run").rglob("before_after.png"))) == 1


def test_simulated_slurm_environment_is_detected_with_requeue(monkeypatch, tiny_pipeline_dir, tmp_path):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from rlr_lightning.cli import build_cli

    env = dict(
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NNODES="1",
        SLURM_JOB_NUM_NODES="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="rlr",
        SLURM_NODELIST="node1",
        MASTER_PORT="29533",
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cli = build_cli(
        [
            "--config",
            str(ROOT / "configs/quickstart.yaml"),
            "--config",
            str(ROOT / "configs/slurm/ddp.yaml"),
            "--trainer.devices",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--model.pretrained_model_name_or_path",
            str(tiny_pipeline_dir),
        ],
        run=False,
    )
    environment = cli.trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and SLURMEnvironment.detect()
    assert environment.auto_requeue and environment.requeue_signal == signal.SIGUSR1
    assert environment.job_id() == 4242 and environment.global_rank() == 0


def test_sbatch_template_matches_the_ddp_overlay():
    sbatch = (ROOT / "configs/slurm/rlr_multinode.sbatch").read_text()
    assert "#SBATCH --signal=SIGUSR1@90" in sbatch and "srun rlr fit" in sbatch
    assert "--config configs/slurm/ddp.yaml" in sbatch
    # tasks per node and nodes are handed to the trainer, which refuses mismatches.
    assert '--trainer.num_nodes "$NODES" --trainer.devices "$GPUS"' in sbatch
