"""``benchmarks/gpu_cost.py``, the one-shot GPU benchmark, run as its user runs it: a subprocess, on CPU with
``--tiny`` (the same code path on the tiny model), judged by its exit status, console and the files it writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_cost.py"

#: What the issue asks the run to measure, at the tiny run's batches: 1 and 2, the planned runs at 2.
EXPECTED = {
    *(
        (name, b)
        for b in (1, 2)
        for name in (
            "ours: no-grad sample",
            "diffusers StableDiffusionPipeline",
            "RLR h=2 zo=score",
            "RLR h=1 zo=score",
            "RLR h=1 zo=parameter",
            "RLR h=2 zo=parameter",
            "truncated K=1",
            "truncated K=2",
            "score function",
            "full backprop",
        )
    ),
    ("RLR h=4 zo=score", 2),
    ("RLR h=4 zo=parameter", 2),
    ("profile: 3 sampling steps, ours and diffusers", 2),
    ("ours compiled: no-grad sample", 2),  # model.compile_denoiser, at the batches from the second on
}
PLANNED = [
    "chunk_samples=1 activation_checkpointing=True",
    "chunk_samples=1 activation_checkpointing=False",
    "memory_budget_gb=auto",
    "memory_budget_gb=None",
]


def run_script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # A private model cache: the run builds the tiny model itself, as on a fresh machine.
    env = dict(os.environ, RLR_CACHE=str(tmp_path / "cache"))
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_tiny_run_measures_every_configuration(tmp_path):
    out = tmp_path / "results"
    proc = run_script(tmp_path, "--tiny", "--out", str(out), "--deadline-s", "600")
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert "Traceback" not in console

    payload = json.loads((out / "gpu_cost_tiny.json").read_text())
    rows = payload["rows"]
    # The incremental log holds the same rows, one line each, in the order they were measured.
    assert [json.loads(line) for line in (out / "gpu_cost_tiny.jsonl").read_text().splitlines()] == rows
    # Every configuration exactly once, each with a time (nothing skipped or failed with a generous deadline).
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys))
    unplanned = {(r["name"], r["batch"]) for r in rows if r["group"] != "planned"}
    assert unplanned == EXPECTED
    assert [r["memory"] for r in rows if r["group"] == "planned"] == PLANNED
    assert all(r["batch"] == 2 for r in rows if r["group"] == "planned")
    for r in rows:
        assert r["status"] == "ok", r
        assert r["time_s"] > 0, r
    # The most important results come first: the sampler comparison, then the planned runs.
    groups = [r["group"] for r in rows]
    assert groups[:5] == ["sampler"] * 5  # ours and diffusers at 2 batches, the profile
    assert groups[5:9] == ["planned"] * 4
    # The compiled sampler comes last (its compilation takes minutes on a GPU), timed after it compiled, and
    # it samples what the eager sampler samples: its time is reported beside ours.
    (compiled,) = [r for r in rows if r["kind"] == "compiled"]
    assert rows[-1] is compiled and compiled["compile_s"] > 0 and compiled["compiled_over_eager"] > 0

    by_key = {r["key"]: r for r in rows}
    # Steps report their activation memory; chunking one sample at a time holds less than the whole batch.
    steps = [r for r in rows if r["kind"] == "step"]
    assert all(r["activation_mb"] > 0 for r in steps)
    chunked = by_key["RLR h=2 zo=score chunk_samples=1 activation_checkpointing=False b2"]
    whole = by_key["RLR h=2 zo=score memory_budget_gb=None b2"]
    assert chunked["chunk_samples"] == 1 and whole["chunk_samples"] is None
    assert chunked["activation_mb"] < whole["activation_mb"]
    # The planner's choice is recorded for the budgeted run.
    auto = by_key["RLR h=2 zo=score memory_budget_gb=auto b2"]
    assert {"chunk_samples", "activation_checkpointing", "h", "plan_s"} <= auto.keys()
    # Every RLR step has its floor and its ratio to it.
    for r in steps:
        if r["name"].startswith("RLR"):
            assert r["floor_s"] > 0 and r["step_over_floor"] == pytest.approx(r["time_s"] / r["floor_s"]), r
    # diffusers ran with our exported LoRA loaded, and the ratio ours / diffusers is there per batch.
    for b in (1, 2):
        ours, theirs = by_key[f"ours: no-grad sample b{b}"], by_key[f"diffusers StableDiffusionPipeline b{b}"]
        assert theirs["adapters"]["unet"] and theirs["lora_weights"] > 0
        assert theirs["ours_over_diffusers"] == pytest.approx(ours["time_s"] / theirs["time_s"])

    # The markdown report renders a line per measurement with its time.
    report = (out / "gpu_cost_tiny.md").read_text()
    for section in (
        "## Our no-grad sampler against diffusers",
        "## Memory-planned RLR steps",
        "## Estimators",
    ):
        assert section in report
    for b in (1, 2):
        ratio = by_key[f"diffusers StableDiffusionPipeline b{b}"]["ours_over_diffusers"]
        assert f"| {b} | {by_key[f'ours: no-grad sample b{b}']['time_s']:.2f} |" in report
        assert f"| {ratio:.2f} |" in report
    for r in steps:
        first = r["memory"] if r["group"] == "planned" else r["name"]
        assert f"| {first} | {r['batch']} | ok | {r['time_s']:.2f} | {r['activation_mb']:.1f} |" in report, r
    assert "Not measured" not in report

    # The profiler summary: top ops of ours and of diffusers.
    profile = (out / "gpu_profile_tiny.txt").read_text()
    assert "== ours: DDIMSampler.run" in profile and "== diffusers StableDiffusionPipeline" in profile
    assert profile.count("aten::") >= 20


#: The SD 3.5 run at the tiny run's batches (1 and 2 prompts): our sampler at every number of images a step
#: samples, RLR h = 2 with groups of 2 and GRPO with groups of 4 and 8 at each batch; planned runs at 2
#: prompts.
SD35_EXPECTED = {
    *(("ours: no-grad sample", images) for images in (2, 4, 8, 16)),
    *((name, b) for b in (1, 2) for name in ("RLR h=2 zo=score group=2", "GRPO G=4", "GRPO G=8")),
}
SD35_GROUPS = {"RLR h=2 zo=score group=2": 2, "GRPO G=4": 4, "GRPO G=8": 8, "ours: no-grad sample": 1}


@pytest.mark.slow
def test_sd35_tiny_run_measures_rlr_and_grpo(tmp_path):
    out = tmp_path / "results"
    proc = run_script(tmp_path, "--family", "sd35", "--tiny", "--out", str(out), "--deadline-s", "600")
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert "Traceback" not in console
    # Its own files: the SD 1.5 results next to them are not touched.
    assert not (out / "gpu_cost_tiny.json").exists()
    payload = json.loads((out / "gpu_cost_sd35_tiny.json").read_text())
    rows = payload["rows"]
    assert [json.loads(line) for line in (out / "gpu_cost_sd35_tiny.jsonl").read_text().splitlines()] == rows

    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys))
    assert {(r["name"], r["batch"]) for r in rows if r["group"] != "planned"} == SD35_EXPECTED
    assert {(r["name"], r["memory"], r["batch"]) for r in rows if r["group"] == "planned"} == {
        ("RLR h=2 zo=score group=2", "memory_budget_gb=auto", 2),
        ("GRPO G=8", "memory_budget_gb=auto", 2),
    }
    for r in rows:
        assert r["status"] == "ok", r
        assert r["time_s"] > 0, r
        assert r["group_size"] == SD35_GROUPS[r["name"]] and r["images"] == r["batch"] * r["group_size"], r
        assert r["T"] == 10
    # The samples come first: they are the unit every later prediction is made in.
    assert [r["group"] for r in rows[:4]] == ["sampler"] * 4

    by_key = {r["key"]: r for r in rows}
    steps = [r for r in rows if r["kind"] == "step"]
    assert all(r["activation_mb"] > 0 for r in steps)
    # GRPO keeps a graph per image it re-scores: twice the images, more memory.
    assert by_key["GRPO G=8 b2"]["activation_mb"] > by_key["GRPO G=4 b2"]["activation_mb"]
    for r in steps:
        if r["name"].startswith("RLR"):
            assert r["h"] == 2
            assert r["floor_s"] > 0 and r["step_over_floor"] == pytest.approx(r["time_s"] / r["floor_s"]), r
    auto = by_key["RLR h=2 zo=score group=2 memory_budget_gb=auto b2"]
    assert {"chunk_samples", "activation_checkpointing", "plan_s", "predicted_peak_gib"} <= auto.keys()

    # The GPU run's architectures, built on the meta device here: SD 3.5 Medium's published sizes (MMDiT-X
    # 2.5 B with its position embeddings, CLIP-L and CLIP-G text towers, the T5 v1.1 XXL encoder, the VAE).
    weights = payload["weights_b"]
    assert 2.4 < weights["transformer"] < 2.6
    assert 4.6 < weights["text_encoder_3"] < 4.9
    assert 0.6 < weights["text_encoder_2"] < 0.75 and 0.1 < weights["text_encoder"] < 0.15
    assert 0.07 < weights["vae"] < 0.1
    assert f"SD 3.5 Medium size: {sum(weights.values()):.2f} B weights" in proc.stdout

    report = (out / "gpu_cost_sd35_tiny.md").read_text()
    for section in ("## Our no-grad sampler", "## RLR and GRPO", "## Memory-planned steps"):
        assert section in report
    for r in rows:
        if r["kind"] == "sampler":
            assert f"| {r['images']} | ok | {r['time_s']:.2f} |" in report, r
        elif r["group"] == "planned":
            line = f"| {r['name']} | {r['memory']} | 2 | {r['images']} | ok | {r['time_s']:.2f} |"
            assert line in report, r
        else:
            over_sample = r["time_s"] / by_key[f"ours: no-grad sample b{r['images']}"]["time_s"]
            assert (
                f"| {r['name']} | {r['batch']} | {r['images']} | ok | {r['time_s']:.2f} | "
                f"{r['activation_mb']:.1f} | {over_sample:.2f} |" in report
            ), r
    assert "Not measured" not in report


#: The Wan run at its tiny defaults (the recipe's one prompt, sampled twice): our sampler at the step's 2 videos,
#: RLR h = 2 with groups of 2 planned with memory_budget_gb=auto (the recipe's setting), then without a budget.
WAN_RLR = "RLR h=2 zo=score group=2"


@pytest.mark.slow
def test_wan_tiny_run_measures_the_recipes_rlr_step(tmp_path):
    out = tmp_path / "results"
    proc = run_script(tmp_path, "--family", "wan", "--tiny", "--out", str(out), "--deadline-s", "600")
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert "Traceback" not in console
    # Its own files, and only those.
    assert sorted(p.name for p in out.iterdir()) == [
        f"gpu_cost_wan_tiny.{ext}" for ext in ("json", "jsonl", "md")
    ]
    payload = json.loads((out / "gpu_cost_wan_tiny.json").read_text())
    rows = payload["rows"]
    assert [json.loads(line) for line in (out / "gpu_cost_wan_tiny.jsonl").read_text().splitlines()] == rows

    # In order: the sample (the unit of the predictions), the recipe's planned step, the unbudgeted step.
    assert [(r["group"], r["name"], r.get("memory"), r["batch"]) for r in rows] == [
        ("sampler", "ours: no-grad sample", None, 2),
        ("planned", WAN_RLR, "memory_budget_gb=auto", 1),
        ("estimators", WAN_RLR, None, 1),
    ]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["time_s"] > 0, r
        assert r["T"] == 16
    by_key = {r["key"]: r for r in rows}
    sample = by_key["ours: no-grad sample b2"]
    assert sample["group_size"] == 1 and sample["images"] == 2
    steps = [r for r in rows if r["kind"] == "step"]
    for r in steps:
        # Steps report what autograd held for backward (the no-grad sample holds nothing).
        assert r["activation_mb"] > 0, r
        assert r["group_size"] == 2 and r["images"] == 2 and r["h"] == 2, r
        # The floor decodes 2 videos and backpropagates the per-frame reward through them.
        assert r["decode_reward_s"] > 0 and r["floor_s"] > 0, r
        assert r["step_over_floor"] == pytest.approx(r["time_s"] / r["floor_s"]), r
    auto = by_key[f"{WAN_RLR} memory_budget_gb=auto b1"]
    assert {"chunk_samples", "activation_checkpointing", "plan_s", "predicted_peak_gib"} <= auto.keys()

    # The tiny model at the scale's frames (9 frames, 3 latent frames of 2 x 2 tokens), the recipe's LoRA.
    assert payload["num_frames"] == 9 and payload["latent_frames"] == 3 and payload["video_tokens"] == 12
    assert payload["resolution"] == [32, 32] and payload["umt5_tokens"] == 32
    assert payload["lora_weights"] > 0
    assert "LoRA r32 / alpha 32" in payload["setting"]
    assert (
        "ColorBalance on every 4th decoded frame, 3 frames at a time (PerFrameReward)" in payload["setting"]
    )
    # The GPU run's architectures, built on the meta device here: every network counted and reported.
    weights = payload["weights_b"]
    assert set(weights) == {"transformer", "vae", "text_encoder"}
    assert f"Wan 2.1 T2V 1.3B size: {sum(weights.values()):.2f} B weights" in proc.stdout

    report = (out / "gpu_cost_wan_tiny.md").read_text()
    for section in ("## Our no-grad sampler", "## RLR: one gradient estimate", "## Memory-planned steps"):
        assert section in report
    assert "videos of 9 frames at 32 x 32 px (3 latent frames, 12 transformer tokens per video)" in report
    assert f"| 2 | ok | {sample['time_s']:.2f} | {sample['activation_mb']:.1f} |" in report
    for r in steps:
        over_sample = r["time_s"] / sample["time_s"]
        first = f"| {r['name']} | {r['memory']} |" if r["group"] == "planned" else f"| {r['name']} |"
        line = f"{first} 1 | 2 | ok | {r['time_s']:.2f} | {r['activation_mb']:.1f} | {over_sample:.2f} |"
        assert line in report, r
    assert "Not measured" not in report


def run_family(tmp_path: Path, stem: str, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    """Run the script with ``args`` and ``--tiny``; check that it succeeded, wrote ``stem``'s files and only those,
    and measured every configuration; return the run, its JSON payload and its markdown report."""
    out = tmp_path / "results"
    proc = run_script(tmp_path, *args, "--tiny", "--out", str(out), "--deadline-s", "600")
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    assert "Traceback" not in console
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.{ext}" for ext in ("json", "jsonl", "md")]
    payload = json.loads((out / f"{stem}.json").read_text())
    rows = payload["rows"]
    assert [json.loads(line) for line in (out / f"{stem}.jsonl").read_text().splitlines()] == rows
    for r in rows:
        assert r["status"] == "ok", r
        assert r["time_s"] > 0, r
    report = (out / f"{stem}.md").read_text()
    assert "Not measured" not in report
    return proc, payload, report


def check_recipe_steps(payload: dict, report: str, expected: list[tuple], steps: int) -> None:
    """The rows of a recipe's run (SDXL, FLUX) in order, each step with its floor and the planner's choice, and a
    line of the report per row."""
    rows = payload["rows"]
    assert [(r["group"], r["name"], r.get("memory"), r["batch"], r["images"]) for r in rows] == expected
    assert all(r["T"] == steps for r in rows)
    for r in rows[1:]:
        # h=auto planned as h = 2 (the tiny model fits anything); the floor at the block length run.
        assert r["activation_mb"] > 0 and r["h"] == 2, r
        assert r["floor_s"] > 0 and r["step_over_floor"] == pytest.approx(r["time_s"] / r["floor_s"]), r
        if r["group"] == "planned":
            assert {"chunk_samples", "activation_checkpointing", "plan_s", "predicted_peak_gib"} <= r.keys()
            line = f"| {r['name']} | {r['memory']} | {r['batch']} | {r['images']} | ok | {r['time_s']:.2f} |"
        else:
            line = f"| {r['name']} | {r['batch']} | {r['images']} | ok | {r['time_s']:.2f} |"
        assert line in report, r
    sample = rows[0]
    assert f"| {sample['images']} | ok | {sample['time_s']:.2f} |" in report
    for section in ("## Our no-grad sampler", "## RLR: one gradient estimate", "## Memory-planned steps"):
        assert section in report


def sizes(weights_b: dict) -> dict[str, str]:
    """Billions of weights per network, to 3 significant digits."""
    return {k: f"{v:.3g}" for k, v in weights_b.items()}


@pytest.mark.slow
def test_sdxl_tiny_run_measures_the_recipes_planned_steps(tmp_path):
    proc, payload, report = run_family(tmp_path, "gpu_cost_sdxl_tiny", "--family", "sdxl")
    # The sample, the recipe's RLR (h=auto) at the 24, 40 and 80 GB cards' budgets, then h = 2 without a budget.
    planned = [("planned", "RLR h=auto zo=score", f"memory_budget_gb={b}", 1, 1) for b in (24, 40, "auto")]
    expected = [
        ("sampler", "ours: no-grad sample", None, 1, 1),
        *planned,
        ("estimators", "RLR h=2 zo=score", None, 1, 1),
    ]
    check_recipe_steps(payload, report, expected, steps=40)
    for part in (
        "LoRA r4 / alpha 4",
        "DDIM T = 40 at eta 1",
        "guidance 5",
        "ColorBalance reward",
        "leave-one-out",
    ):
        assert part in payload["setting"]
    assert payload["resolution"] == [16, 16] and payload["clip_tokens"] == 16
    # SDXL base 1.0's architectures, built on the meta device here: its published UNet (2,567,463,684 weights),
    # CLIP-L and OpenCLIP bigG text towers and VAE.
    weights = payload["weights_b"]
    assert sizes(weights) == dict(unet="2.57", vae="0.0837", text_encoder="0.123", text_encoder_2="0.695")
    assert round(weights["unet"] * 1e9) == 2_567_463_684
    assert f"SDXL base 1.0 size: {sum(weights.values()):.2f} B weights" in proc.stdout


@pytest.mark.slow
def test_flux_tiny_run_measures_the_recipes_planned_steps(tmp_path):
    proc, payload, report = run_family(tmp_path, "gpu_cost_flux_tiny", "--family", "flux")
    # One prompt sampled twice: the sample of 2 images, RLR (h=auto) at 40 GB and auto, then h = 2 unbudgeted.
    rlr = "RLR h=auto zo=score group=2"
    planned = [("planned", rlr, f"memory_budget_gb={b}", 1, 2) for b in (40, "auto")]
    expected = [("sampler", "ours: no-grad sample", None, 2, 2), *planned]
    expected.append(("estimators", "RLR h=2 zo=score group=2", None, 1, 2))
    check_recipe_steps(payload, report, expected, steps=10)
    for part in (
        "LoRA r32 / alpha 64",
        "noise level 0.7",
        "guidance embedding 3.5",
        "group 2",
        "ColorBalance",
    ):
        assert part in payload["setting"]
    assert payload["t5_tokens"] == 32 and payload["image_tokens"] == 16
    assert "images of 16 x 16 px (16 image tokens), 32 T5 tokens per prompt" in report
    # FLUX.1-dev's architectures on the meta device: the 11.9 B transformer, CLIP-L, T5-XXL's encoder, the VAE.
    weights = payload["weights_b"]
    assert sizes(weights) == dict(
        transformer="11.9", vae="0.0838", text_encoder="0.123", text_encoder_2="4.76"
    )
    assert f"FLUX.1-dev size: {sum(weights.values()):.2f} B weights" in proc.stdout


@pytest.mark.slow
def test_sd35_tiny_run_with_pickscore_keeps_its_own_files(tmp_path):
    args = ("--family", "sd35", "--reward", "pickscore", "--batches", "1")
    proc, payload, report = run_family(tmp_path, "gpu_cost_sd35_pickscore_tiny", *args)
    rows = payload["rows"]
    expected = {("ours: no-grad sample", n, None) for n in (2, 4, 8)}
    expected |= {(name, 1, None) for name in ("RLR h=2 zo=score group=2", "GRPO G=4", "GRPO G=8")}
    expected |= {(name, 1, "memory_budget_gb=auto") for name in ("RLR h=2 zo=score group=2", "GRPO G=8")}
    assert {(r["name"], r["batch"], r.get("memory")) for r in rows} == expected
    # PickScore loaded from the directory saved as the released one is (a tiny CLIP here), and recorded.
    assert "Loading PickScore model" in proc.stdout
    assert payload["reward"] == "pickscore" and "PickScore reward (tiny CLIP)" in payload["setting"]
    # PickScore_v1's CLIP ViT-H/14, built on the meta device: 986,109,775 weights with its position ids.
    assert f"{payload['reward_weights_b']:.3g}" == "0.986"
    assert "reward model 0.99 B weights" in report
    for r in rows:
        if r["kind"] == "step":
            assert r["activation_mb"] > 0, r


@pytest.mark.slow
def test_deadline_skips_configurations_and_says_so(tmp_path):
    out = tmp_path / "results"
    proc = run_script(tmp_path, "--tiny", "--out", str(out), "--deadline-s", "0")
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-4000:]
    rows = json.loads((out / "gpu_cost_tiny.json").read_text())["rows"]
    assert {(r["name"], r["batch"]) for r in rows if r["group"] != "planned"} == EXPECTED
    assert all(r["status"] == "skipped" and "--deadline-s 0" in r["reason"] for r in rows)
    assert f"Skipped for the deadline ({len(rows)})" in console
    report = (out / "gpu_cost_tiny.md").read_text()
    assert "Not measured:" in report
    assert all(f"* {r['key']}: skipped, deadline" in report for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--tiny", "--budgets", "0"], "--budgets takes numbers of GiB > 0 or auto, got '0'"),
        (["--tiny", "--batches", "1,two"], "--batches must be comma-separated integers, got '1,two'"),
        pytest.param(
            [], "no CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")
        ),
        (["--tiny", "--family", "sd3"], "argument --family: invalid choice: 'sd3'"),
        # Never the 4.7 B T5 encoder on a CPU: the SD 3.5 run stops before building anything.
        pytest.param(
            ["--family", "sd35"],
            "no CUDA device: the SD 3.5 Medium-size model",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA"),
        ),
        # Nor FLUX.1-dev's 17 B weights.
        pytest.param(
            ["--family", "flux"],
            "no CUDA device: the FLUX.1-dev-size model",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA"),
        ),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    proc = run_script(tmp_path, *args, "--out", str(tmp_path / "results"))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists()
