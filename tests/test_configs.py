"""The shipped configs, composed the way users compose them, through the real CLI (``--print_config``).

One base config per model is a complete recipe; overlays after it (estimators, rewards, GPUs, W&B, sample
images, DDP) change only what they name. Parsing only: no model or reward is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlr_lightning.cli import main
from rlr_lightning.models import LoraSettings

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
SD15 = CONFIG_DIR / "sd15_aesthetic_rlr.yaml"
SDXL = CONFIG_DIR / "sdxl_aesthetic_rlr.yaml"
SD35 = CONFIG_DIR / "sd35_medium_pickscore_rlr.yaml"
SD35_GRPO = CONFIG_DIR / "sd35_medium_grpo.yaml"
FLUX = CONFIG_DIR / "flux1_dev_hpsv2_rlr.yaml"
BASES = [SD15, SDXL, SD35, SD35_GRPO, FLUX]
ESTIMATORS = sorted((CONFIG_DIR / "estimators").glob("*.yaml"))
REWARDS = sorted((CONFIG_DIR / "rewards").glob("*.yaml"))
GPUS = sorted((CONFIG_DIR / "gpu").glob("*.yaml"))
OVERLAYS = ESTIMATORS + REWARDS + GPUS

PAPER_ESTIMATOR = {  # the class each estimator overlay selects
    "alignprop": "rlr_lightning.estimators.TruncatedBackprop",
    "draft": "rlr_lightning.estimators.TruncatedBackprop",
    "ddpo": "rlr_lightning.estimators.ScoreFunction",
}
REWARD_CLASS = {
    "aesthetic": "rlr_lightning.rewards.AestheticReward",
    "hpsv2": "rlr_lightning.rewards.HPSv2Reward",
    "pickscore": "rlr_lightning.rewards.PickScoreReward",
    "remote": "rlr_lightning.rewards.RemoteReward",
}


def name(path: Path) -> str:
    return str(path.relative_to(CONFIG_DIR))


def resolved(*configs: Path) -> dict:
    """The config ``rlr fit`` composes from these files, in order, as ``--print_config`` prints it."""
    return yaml.safe_load(_printed_config(*configs))


@functools.cache
def _printed_config(*configs: Path) -> str:
    out = io.StringIO()
    args = [arg for config in configs for arg in ("--config", str(config))]
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return out.getvalue()


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a.b.c": leaf}``; lists are leaves."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def uncommented_keys(path: Path) -> list[str]:
    """Key lines that neither carry a comment nor sit right under a whole-line comment."""
    missing, previous = [], ""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        commented = stripped.startswith("#") or re.search(r"\s#", line) or previous.startswith("#")
        if stripped and not commented:
            missing.append(f"{name(path)}:{number}: {line.rstrip()}")
        if stripped:
            previous = stripped
    return missing


def test_one_base_per_model_and_the_overlays_exist():
    assert {c.name for c in CONFIGS} >= {"quickstart.yaml", *(base.name for base in BASES)}
    assert {c.stem for c in ESTIMATORS} == set(PAPER_ESTIMATOR)
    assert {c.stem for c in REWARDS} == set(REWARD_CLASS)


def test_every_config_path_the_docs_and_configs_name_exists():
    """Composition replaced the per-combination files: no README line, doc, sbatch or comment may still send
    a user to one."""
    texts = [
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "notebooks").glob("*.ipynb"),
        *CONFIG_DIR.rglob("*.yaml"),
        *CONFIG_DIR.rglob("*.sbatch"),
        *(ROOT / "benchmarks").glob("*"),
    ]
    named = {}
    for text in texts:
        if text.is_file():
            for match in re.findall(r"configs/[\w./{},-]*?\.(?:yaml|sbatch)", text.read_text()):
                named.setdefault(match, text.relative_to(ROOT))
    assert len(named) > 10
    for path, where in named.items():
        # configs/gpu/{24,40,80}gb.yaml names three files
        brace = re.fullmatch(r"(.*)\{(.*)\}(.*)", path)
        paths = [brace[1] + part + brace[3] for part in brace[2].split(",")] if brace else [path]
        for one in paths:
            assert (ROOT / one).is_file(), f"{where} names {one}, which does not exist"


@pytest.mark.parametrize(
    "overlay",
    [
        None,
        "rewards/hpsv2.yaml",
        "rewards/pickscore.yaml",
        "estimators/alignprop.yaml",
        "estimators/ddpo.yaml",
    ],
    ids=str,
)
def test_sd15_recipes_keep_the_paper_settings(overlay):
    """The base alone and the four recipes that used to be files of their own."""
    cfg = resolved(SD15, *([CONFIG_DIR / overlay] if overlay else []))
    model = cfg["model"]
    assert model["pretrained_model_name_or_path"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert model["num_steps"] == 50 and model["guidance_scale"] == 5.0
    assert model["lora"]["rank"] == 4 and model["lora"]["alpha"] == 4.0
    assert model["lora"]["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW"
    optimizer = model["optimizer"]["init_args"]
    assert optimizer["lr"] == 1e-3 and optimizer["weight_decay"] == 1e-4
    assert model["weight_dtype"] == "bfloat16" and cfg["trainer"]["precision"] == "bf16-mixed"
    assert model["gradient_accumulation_steps"] == 3 and cfg["data"]["batch_size"] == 6
    stem = Path(overlay).stem if overlay else None
    estimator = model["estimator"]
    if stem in PAPER_ESTIMATOR:
        assert estimator["class_path"] == PAPER_ESTIMATOR[stem]
    else:
        assert estimator["class_path"] == "rlr_lightning.estimators.RLR" and estimator["init_args"]["h"] == 2
    assert model["reward"]["class_path"] == REWARD_CLASS.get(stem, REWARD_CLASS["aesthetic"])
    if stem == "alignprop":
        assert estimator["init_args"]["k_range"] == [1, 10]
    if stem == "ddpo":
        assert model["eta"] == 1.0 and estimator["init_args"]["normalize_advantages"] is True


def test_sdxl_base_is_a_memory_planned_sdxl_recipe():
    cfg = resolved(SDXL)
    model, data = cfg["model"], cfg["data"]
    assert model["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert model["weight_dtype"] == "bfloat16" and cfg["trainer"]["precision"] == "bf16-mixed"
    assert (model["num_steps"], model["guidance_scale"]) == (40, 5.0)
    assert model["eta"] > 0  # RLR's likelihood ratios need a stochastic sampler
    assert model["estimator"]["class_path"] == "rlr_lightning.estimators.RLR"
    assert model["estimator"]["init_args"]["h"] == "auto" and model["memory_budget_gb"] == "auto"
    assert model["lora"]["target_modules"] == list(LoraSettings().target_modules)
    assert (data["batch_size"], model["gradient_accumulation_steps"]) == (2, 4)
    assert model["reward"]["class_path"] == REWARD_CLASS["aesthetic"]
    # Its own output directory: SDXL runs never share a run family with SD 1.5 ones.
    sd15_logger = resolved(SD15)["trainer"]["logger"]["init_args"]
    assert cfg["trainer"]["logger"]["init_args"]["save_dir"] != sd15_logger["save_dir"]


def test_flow_recipes_follow_flow_grpo_and_compare_rlr_with_grpo_on_equal_terms():
    rlr, grpo, flux = resolved(SD35), resolved(SD35_GRPO), resolved(FLUX)
    for cfg in (rlr, grpo, flux):
        model = cfg["model"]
        assert model["resolution"] == 512 and model["num_steps"] == 10 and model["eta"] == 0.7
        assert model["timestep_spacing"] is None and model["memory_budget_gb"] == "auto"
        assert {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"} <= set(
            model["lora"]["target_modules"]
        )
    assert rlr["model"]["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-3.5-medium"
    assert flux["model"]["pretrained_model_name_or_path"] == "black-forest-labs/FLUX.1-dev"
    assert rlr["model"]["guidance_scale"] == 4.5 and flux["model"]["guidance_scale"] == 3.5
    assert rlr["model"]["reward"]["class_path"] == REWARD_CLASS["pickscore"]
    assert flux["model"]["reward"]["class_path"] == REWARD_CLASS["hpsv2"]
    for cfg in (rlr, flux):
        estimator = cfg["model"]["estimator"]
        assert estimator["class_path"] == "rlr_lightning.estimators.RLR"
        assert estimator["init_args"]["baseline"] == "group" and estimator["init_args"]["group_size"] == 2
    # The GRPO baseline differs from the RLR recipe in its estimator (and what that implies) only.
    estimator = grpo["model"]["estimator"]
    assert estimator["class_path"] == "rlr_lightning.estimators.GRPO"
    assert (estimator["init_args"]["group_size"], estimator["init_args"]["clip_range"]) == (8, 1e-4)
    assert grpo["model"]["gradient_accumulation_steps"] == 1  # inner updates cannot accumulate
    differ = {
        k for k in flatten(rlr).keys() | flatten(grpo).keys() if flatten(rlr).get(k) != flatten(grpo).get(k)
    }
    assert {k for k in differ if not k.startswith("model.estimator.")} == {
        "model.gradient_accumulation_steps",
        "trainer.logger.init_args.name",
    }


@pytest.mark.parametrize("config", [*BASES, *ESTIMATORS, *REWARDS], ids=name)
def test_every_key_of_the_bases_and_overlays_is_commented(config):
    assert uncommented_keys(config) == []


@pytest.mark.parametrize("base", BASES, ids=name)
@pytest.mark.parametrize("overlay", OVERLAYS, ids=name)
def test_an_overlay_changes_only_what_it_names(base, overlay):
    before = resolved(base)
    after = resolved(base, overlay)
    own = yaml.safe_load(overlay.read_text())
    # What the overlay says wins.
    for key, value in flatten(own).items():
        assert flatten(after).get(key) == value, f"{name(overlay)} sets {key}: {value!r}"
    # A class it selects keeps nothing from the base's class: every init argument is the overlay's own.
    estimator = own.get("model", {}).get("estimator")
    if estimator:
        assert after["model"]["estimator"] == estimator
    # Everything else is the base's.
    owned = tuple(flatten(own))
    subtrees = tuple(k.rsplit(".class_path", 1)[0] + "." for k in owned if k.endswith(".class_path"))
    changed = {
        k
        for k in flatten(before).keys() | flatten(after).keys()
        if flatten(before).get(k, "<absent>") != flatten(after).get(k, "<absent>")
    }
    assert {k for k in changed if k not in owned and not k.startswith(subtrees)} == set()


@pytest.mark.parametrize("base", BASES, ids=name)
def test_estimator_overlays_give_their_runs_a_directory_of_their_own(base):
    """Same save_dir, so the logger's name tells the run families apart (CSV: <save_dir>/<name>/version_N)."""
    names = {"base": resolved(base)["trainer"]["logger"]["init_args"]}
    for overlay in ESTIMATORS:
        names[overlay.stem] = resolved(base, overlay)["trainer"]["logger"]["init_args"]
    assert len({(args["save_dir"], args["name"]) for args in names.values()}) == len(names)
    for stem, args in names.items():
        if stem != "base":
            assert args["name"] == stem and args["save_dir"] == names["base"]["save_dir"]
    # After the W&B overlay the name moves to the W&B run.
    wandb = resolved(base, CONFIG_DIR / "wandb.yaml", CONFIG_DIR / "estimators" / "ddpo.yaml")
    assert wandb["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert wandb["trainer"]["logger"]["init_args"]["name"] == "ddpo"


@pytest.mark.parametrize("base", BASES, ids=name)
def test_reward_and_estimator_overlays_compose_in_either_order(base):
    reward, estimator = CONFIG_DIR / "rewards" / "pickscore.yaml", CONFIG_DIR / "estimators" / "ddpo.yaml"
    cfg = resolved(base, reward, estimator)
    assert cfg == resolved(base, estimator, reward)
    assert cfg["model"]["reward"]["class_path"] == REWARD_CLASS["pickscore"]
    assert cfg["data"]["prompt_set"] == "styles"
    assert cfg["model"]["estimator"]["class_path"] == PAPER_ESTIMATOR["ddpo"]
    assert cfg["trainer"]["logger"]["init_args"]["name"] == "ddpo"
    base_cfg = resolved(base)
    assert cfg["model"]["num_steps"] == base_cfg["model"]["num_steps"]
    assert cfg["model"]["pretrained_model_name_or_path"] == base_cfg["model"]["pretrained_model_name_or_path"]


def test_the_aesthetic_overlay_switches_back():
    rewards = CONFIG_DIR / "rewards"
    assert resolved(SD15, rewards / "hpsv2.yaml", rewards / "aesthetic.yaml") == resolved(SD15)


@pytest.mark.parametrize("base", ["quickstart.yaml", SD15.name, SDXL.name])
def test_sample_images_overlay_adds_its_callback_and_keeps_the_base_checkpointing(base):
    base_callbacks = resolved(CONFIG_DIR / base)["trainer"]["callbacks"]
    cfg = resolved(CONFIG_DIR / base, CONFIG_DIR / "wandb.yaml", CONFIG_DIR / "sample_images.yaml")
    callbacks = cfg["trainer"]["callbacks"]
    assert callbacks[: len(base_callbacks)] == base_callbacks  # the ModelCheckpoint and its settings survive
    assert [c["class_path"] for c in callbacks] == [
        *(c["class_path"] for c in base_callbacks),
        "rlr_lightning.callbacks.SampleImageLogger",
    ]
    assert callbacks[0]["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"
    assert callbacks[-1]["init_args"]["every_n_steps"] == 50
    assert cfg["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"


@pytest.mark.parametrize("card, budget", [("24gb", 23), ("40gb", 39), ("80gb", "auto")])
def test_gpu_recipes_set_the_memory_budget_and_keep_the_base_recipe(card, budget):
    recipe = CONFIG_DIR / "gpu" / f"{card}.yaml"
    for base in BASES:
        cfg, base_cfg = resolved(base, recipe), resolved(base)
        assert cfg["model"]["memory_budget_gb"] == budget
        assert cfg["data"]["batch_size"] == base_cfg["data"]["batch_size"]  # 6 for SD 1.5, 2 for the others
        assert cfg["model"]["estimator"] == base_cfg["model"]["estimator"]
    for number, line in enumerate(recipe.read_text().splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line, f"{recipe.name}:{number} has no comment: {line!r}"


@pytest.mark.slow
def test_sbatch_composes_its_config_arguments_and_gives_each_job_its_checkpoint_directory(tmp_path):
    """The sbatch script run as SLURM would, with `srun` printing the config `rlr fit` would run with."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@" --print_config\n')
    (bin_dir / "rlr").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m rlr_lightning "$@"\n')
    for tool in ("srun", "rlr"):
        (bin_dir / tool).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NTASKS_PER_NODE": "1",
    }
    proc = subprocess.run(
        [
            "bash",
            "configs/slurm/rlr_multinode.sbatch",
            "configs/sdxl_aesthetic_rlr.yaml",
            "configs/estimators/ddpo.yaml",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["pretrained_model_name_or_path"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert cfg["model"]["estimator"]["class_path"] == PAPER_ESTIMATOR["ddpo"]
    assert cfg["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.DDPStrategy"
    # Requeued, the job keeps its id and finds its hpc_ckpt_N.ckpt; no other job resumes from it.
    assert cfg["trainer"]["default_root_dir"] == "outputs/slurm/job_4242"
    assert cfg["trainer"]["num_nodes"] == 1 and str(cfg["trainer"]["devices"]) == "1"
