"""Multi-process DDP and a sharded base (FSDP2) on CPU (gloo) through the CLI, and SLURM detection with the
requeue plugin."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def fit_on_two_ranks(tiny_dir: Path, out: Path, *extra: str, steps: int = 4) -> list[dict]:
    """``rlr fit`` of the quickstart on two CPU processes (gloo) with ``extra`` options; each rank's probe report."""
    cmd = [
        sys.executable,
        "-m",
        "rlr_lightning",
        "fit",
        "--config",
        "configs/quickstart.yaml",
        *extra,
        "--trainer.devices",
        "2",
        "--trainer.max_steps",
        str(steps),
        "--model.num_steps",
        "6",
        "--data.batch_size",
        "2",
        "--model.pretrained_model_name_or_path",
        str(tiny_dir),
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.callbacks+=tests.ddp_probe.RankProbe",
        "--trainer.callbacks.directory",
        str(out / "probe"),
        # The memory planner measures on every rank (under sharding each forward is a collective), and every
        # rank runs rank zero's plan.
        "--model.memory_budget_gb",
        "auto",
        # Per-step baselines whose statistics are gathered over ranks (the prompts' running means).
        "--model.estimator.init_args.step_baseline",
        "[prompt_mean, prompt_mean, muprop, muprop, none, none]",
    ]
    # From the repository root, so the launcher's re-run of this command imports the tests package too.
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out / "console.txt").write_text(proc.stderr)
    return [json.loads((out / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]


def exported_lora(out: Path) -> dict[str, torch.Tensor]:
    (path,) = out.rglob("pytorch_lora_weights.safetensors")  # rank zero exports, once
    return load_file(path)


def logged(out: Path, key: str) -> list[float]:
    (path,) = out.rglob("metrics.csv")
    with path.open() as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


@pytest.mark.slow
def test_two_process_ddp_and_a_sharded_base_train_the_same_lora_and_a_sharded_run_resumes_exactly(
    tiny_pipeline_dir, tmp_path
):
    ranks = fit_on_two_ranks(tiny_pipeline_dir, tmp_path / "ddp", "--trainer.strategy", "ddp")
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
    # The quickstart's before/after grid: rank zero renders it, and asking for the log directory (a broadcast)
    # on rank zero alone would hang the run.
    assert len(list((tmp_path / "ddp").rglob("before_after.png"))) == 1

    # The same run with the frozen base sharded over the two ranks (FSDP2): the same samples, rewards and
    # gradients, so the same LoRA, to float tolerance (the all-reduce sums in another order than DDP's).
    fsdp = ("--config", "configs/strategies/fsdp.yaml")
    sharded = fit_on_two_ranks(tiny_pipeline_dir, tmp_path / "fsdp", *fsdp)
    assert sharded[0]["lora"] == sharded[1]["lora"]
    for key in ("prompts", "block_starts", "noise_sums"):
        assert [r[key] for r in sharded] == [r[key] for r in ranks], key
    for key in ("train/reward", "train/grad_norm", "train/grad_norm_zo"):
        assert logged(tmp_path / "fsdp", key) == pytest.approx(logged(tmp_path / "ddp", key), rel=1e-5), key
    ddp_lora, fsdp_lora = exported_lora(tmp_path / "ddp"), exported_lora(tmp_path / "fsdp")
    assert ddp_lora.keys() == fsdp_lora.keys() and len(ddp_lora) > 0
    # The weights differ from DDP's by float rounding only: a gathered block's weights are the same numbers in
    # another buffer (matrix kernels may round differently), and Adam divides each gradient by its running
    # size, so a rounding difference moves a weight by up to about 1e-6 against 4e-3 moved in four steps.
    for name, weight in ddp_lora.items():
        torch.testing.assert_close(fsdp_lora[name], weight, rtol=1e-5, atol=1e-5, msg=name)
    # ... while training moved LoRA B (zero at the start) far beyond that tolerance.
    assert min(w.abs().max().item() for n, w in ddp_lora.items() if "lora_B" in n) > 1e-3
    # The planner counted the gathered blocks as resident memory.
    assert "of it sharded weights gathered for a block" in (tmp_path / "fsdp" / "console.txt").read_text()
    # Every rank renders (each forward is a collective over the shards); rank zero writes.
    assert len(list((tmp_path / "fsdp").rglob("before_after.png"))) == 1

    # Stopped after two steps and resumed: the last two steps draw what the uninterrupted run drew, and end at
    # its weights, to the last bit.
    fit_on_two_ranks(tiny_pipeline_dir, tmp_path / "first", *fsdp, steps=2)
    (checkpoint,) = (tmp_path / "first").rglob("last.ckpt")
    # One file of LoRA weights and counters, written by rank zero: no frozen weight, no shard.
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all("lora_" in key for key in state)
    resumed = fit_on_two_ranks(tiny_pipeline_dir, tmp_path / "resumed", *fsdp, "--ckpt_path", str(checkpoint))
    assert [r["global_step"] for r in resumed] == [4, 4]
    assert [r["block_starts"] for r in resumed] == [r["block_starts"][2:] for r in sharded]
    assert resumed[0]["lora"] == sharded[0]["lora"]
    second = exported_lora(tmp_path / "resumed")
    assert second.keys() == fsdp_lora.keys()
    assert all(torch.equal(second[name], fsdp_lora[name]) for name in fsdp_lora)


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
