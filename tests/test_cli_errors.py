"""Errors of ``rlr sample`` and ``rlr fit`` as a user sees them: exit status, one line naming the option, the bad
value and what is valid, and nothing else (no traceback, usage block, union or ``Namespace`` dump).

Every error here fires before a model loads or a step runs, so the tests call ``main`` in-process; one test runs
the real console command to check what a terminal shows.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rlr_lightning.builtin import BUILTIN_MODELS
from rlr_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
ALIGNPROP = ROOT / "configs" / "estimators" / "alignprop.yaml"
#: What a short error must not contain: a traceback, argparse's usage block, jsonargparse's dumps.
WALLS = ("Traceback", "usage:", "Namespace(", "Subtypes", "Given value", "Does not validate")


def one_error_line(stderr: str, prog: str) -> str:
    """The one ``PROG: error: ...`` line of ``stderr``, after checking nothing but its hint follows it."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, lines
    after = lines[lines.index(errors[0]) + 1 :]
    assert after in (
        [],
        [f"({prog} --help lists the options)"],
        ["(set RLR_DEBUG=1 for the full traceback)"],
    ), lines
    assert not any(wall in stderr for wall in WALLS), stderr
    return errors[0]


def run_main(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """``rlr ARGS`` in-process: its exit status and stderr."""
    monkeypatch.setattr(sys, "argv", ["rlr"])  # LightningCLI warns when pytest's own arguments are there
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    code = exit_info.value.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # SystemExit("message"): Python prints it and exits with 1
        return 1, err + code + "\n"
    return code, err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if ``rlr sample`` loads a model: its checks must come first."""
    import rlr_lightning.models

    def refuse(*args, **kwargs):
        raise AssertionError("rlr sample loaded the model before checking its options")

    monkeypatch.setattr(rlr_lightning.models, "load_backbone", refuse)


def fit_args(tmp_path: Path, *extra: str) -> list[str]:
    """The quickstart made tiny (should an error not fire, the run is short) with its files under ``tmp_path``."""
    out = str(tmp_path / "run")
    return [
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.default_root_dir",
        out,
        "--trainer.logger.init_args.save_dir",
        out,
        "--trainer.max_steps",
        "1",
        "--data.batch_size",
        "2",
        "--model.num_steps",
        "4",
        *extra,
    ]


# -- rlr sample ----------------------------------------------------------------------------------------------


def test_sample_directory_that_is_not_a_pipeline_is_one_line(tmp_path, capsys, monkeypatch):
    not_a_pipeline = tmp_path / "notes"
    not_a_pipeline.mkdir()
    args = ["sample", "--model", str(not_a_pipeline), "--out", str(tmp_path / "x.png")]
    code, err = run_main(args, capsys, monkeypatch)
    line = one_error_line(err, "rlr sample")
    assert code == 2
    assert f"--model {not_a_pipeline}" in line and "no model_index.json" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps must be >= 1 (the number of sampling steps T), got 0"),
        (["--eta", "-1"], "--eta must be >= 0"),
        (["--resolution", "32", "32", "32"], "--resolution takes one or two numbers, got 3"),
        (["--lora", "no/such/lora"], "--lora no/such/lora: no such file or directory"),
    ],
    ids=["steps-0", "eta", "resolution", "lora"],
)
def test_sample_bad_option_is_one_line_before_the_model_loads(
    args, message, tmp_path, capsys, monkeypatch, no_model_load
):
    code, err = run_main(["sample", *args, "--out", str(tmp_path / "x.png")], capsys, monkeypatch)
    assert code == 2 and message in one_error_line(err, "rlr sample")


@pytest.mark.parametrize("kind", ["parent-is-a-file", "a-directory", "no-image-extension"])
def test_sample_unwritable_out_fails_before_sampling(kind, tmp_path, capsys, monkeypatch, no_model_load):
    afile = tmp_path / "afile"
    afile.write_text("")
    out, reason = {
        "parent-is-a-file": (afile / "grid.png", f"{afile} is a file, not a directory"),
        "a-directory": (tmp_path, "is a directory; give a file name"),
        "no-image-extension": (tmp_path / "grid", "no image file extension"),
    }[kind]
    code, err = run_main(["sample", "--out", str(out)], capsys, monkeypatch)
    line = one_error_line(err, "rlr sample")
    assert code == 2 and f"--out {out} cannot be written: " in line and reason in line


def test_sample_help_describes_every_family_and_built_in_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "DDIM only" not in text
    for family in ("Stable Diffusion 1.x / 2.x", "SDXL", "SD 3 / 3.5", "FLUX.1"):
        assert family in text, family
    assert "DDIM" in text and "SDE" in text
    for name in BUILTIN_MODELS:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), name


def test_sample_model_name_that_cannot_be_a_hub_id_lists_the_built_in_names(tmp_path, capsys, monkeypatch):
    args = ["sample", "--model", "tiny sd3?", "--out", str(tmp_path / "x.png")]
    code, err = run_main(args, capsys, monkeypatch)
    line = one_error_line(err, "rlr sample")
    assert code == 2 and "'tiny sd3?'" in line
    assert all(name in line for name in BUILTIN_MODELS)
    assert "hf download" not in err


def test_sample_unknown_bare_model_name_suggests_the_close_built_in_one(tmp_path, capsys, monkeypatch):
    # A well-formed hub id: the hub is asked (offline here), and the message still lists the built-in names.
    args = ["sample", "--model", "tiny-sd5", "--out", str(tmp_path / "x.png")]
    code, err = run_main(args, capsys, monkeypatch)
    assert code == 1 and "Traceback" not in err
    assert err.startswith("rlr sample: error: --model tiny-sd5: ")
    assert "did you mean tiny-sd3?" in err and all(name in err for name in BUILTIN_MODELS)


def test_load_backbone_of_an_impossible_name_lists_the_built_in_names():
    from rlr_lightning.models import load_backbone

    with pytest.raises(FileNotFoundError) as info:
        load_backbone("shapes world")
    message = str(info.value)
    assert (
        "'shapes world'" in message
        and "did you mean shapes-world?" in message
        and "hf download" not in message
    )


# -- rlr fit: options, classes, files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ("--model.estimator.init_args.zo_mode", "bogus"),
            ["--model.estimator.init_args.zo_mode bogus: expected one of score, parameter, none"],
        ),
        (
            ("--model.estimator.init_args.h", "x"),
            ["--model.estimator.init_args.h x: expected an integer or auto"],
        ),
        (
            ("--model.estimator.init_args.hh", "3"),
            [
                "--model.estimator.init_args.hh: rlr_lightning.estimators.RLR has no option 'hh' (did you mean h?)",
                "its options: h, tail, tail_sigma_ratio, block_law",
            ],
        ),
        (
            ("--model.reward.init_args.weight", "2"),
            [
                "--model.reward.init_args.weight: rlr_lightning.rewards.WorldCountReward has no option 'weight'",
                "its options: counter",
            ],
        ),
        (
            (
                "--model.reward",
                "rlr_lightning.rewards.JpegCompressibility",
                "--model.reward.init_args.quality",
                "0",
            ),
            ["--model.reward rlr_lightning.rewards.JpegCompressibility: quality must be in [1, 100], got 0"],
        ),
        (
            ("--model.estimator", "rlr_lightning.estimators.RLRR"),
            [
                "--model.estimator rlr_lightning.estimators.RLRR: no such class",
                "did you mean rlr_lightning.estimators.RLR?",
                "rlr_lightning.estimators.GRPO",
            ],
        ),
        (
            ("--model.estimator", "torch.nn.Linear"),
            [
                "--model.estimator torch.nn.Linear: not a GradientEstimator",
                "rlr_lightning.estimators.TruncatedBackprop",
            ],
        ),
        (
            (
                "--model.estimator",
                "rlr_lightning.estimators.GRPO",
                "--model.estimator.init_args.group_size",
                "1",
            ),
            ["--model.estimator rlr_lightning.estimators.GRPO: ", "group_size must be >= 2, got 1"],
        ),
    ],
    ids=[
        "literal",
        "union",
        "unknown-estimator-option",
        "unknown-reward-option",
        "reward-value",
        "unknown-class",
        "not-a-subclass",
        "grpo-group-size-1",
    ],
)
def test_fit_bad_estimator_or_reward_is_one_line_naming_option_value_and_valid(
    extra, expected, tmp_path, capsys, monkeypatch
):
    code, err = run_main(fit_args(tmp_path, *extra), capsys, monkeypatch)
    line = one_error_line(err, "rlr fit")
    assert code == 2
    for text in expected:
        assert text in line, (text, line)


def test_fit_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys, monkeypatch):
    broken = tmp_path / "overlay.yaml"
    broken.write_text("model:\n  num_steps: 4\n   eta: 1.0\n")
    code, err = run_main(fit_args(tmp_path, "--config", str(broken)), capsys, monkeypatch)
    line = one_error_line(err, "rlr fit")
    assert code == 2 and f"--config {broken}, line 3, column 7: not valid YAML" in line


@pytest.mark.parametrize(
    "option", ["trainer.default_root_dir", "trainer.logger.init_args.save_dir", "model.export_dir"]
)
def test_fit_unwritable_output_directory_names_its_option(option, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("")
    target = afile / "runs"
    code, err = run_main(fit_args(tmp_path, f"--{option}", str(target)), capsys, monkeypatch)
    line = one_error_line(err, "rlr fit")
    assert code == 2 and f"--{option} {target} cannot be written: {afile} is a file, not a directory" in line


def test_alignprop_overlay_at_fewer_steps_names_k_range(tmp_path, capsys, monkeypatch):
    args = fit_args(tmp_path, "--config", str(ALIGNPROP), "--model.num_steps", "5")
    code, err = run_main(args, capsys, monkeypatch)
    line = one_error_line(err, "rlr fit")
    assert code == 2
    assert "k_range [1, 10]" in line and "T=5" in line and "use k_range [1, 5]" in line


@pytest.mark.parametrize(
    "val_option, expected",
    [
        ((), "give some with --data.val_prompts, --data.val_prompt_file, --data.val_prompt_set"),
        (("--data.val_prompt_set", "shapes_held_out"), "needs a reward"),
    ],
    ids=["no-val-prompts", "val-prompt-set-counts"],
)
def test_validate_accepts_every_way_of_giving_held_out_prompts(
    val_option, expected, tmp_path, capsys, monkeypatch
):
    args = fit_args(tmp_path, *val_option, "--model.reward", "null")
    args[0] = "validate"
    args = [a for a in args if a not in ("--trainer.max_steps", "1")]
    code, err = run_main(args, capsys, monkeypatch)
    line = one_error_line(err, "rlr validate")
    assert code == 2 and expected in line, line


# -- prompts in messages -------------------------------------------------------------------------------------


def quoted_prompt_lengths(message: str) -> list[int]:
    return [len(m) for m in re.findall(r"'([^']*)'", message)]


def test_an_error_about_a_prompt_quotes_at_most_80_characters():
    from rlr_lightning.data import PromptRecord
    from rlr_lightning.world.scenes import parse_caption

    long_prompt = "three green squares at the top " + "and more words " * 30
    with pytest.raises(ValueError) as info:
        parse_caption(long_prompt)
    message = str(info.value)
    assert (
        message.startswith(repr(long_prompt[:80]) + "...") and f"({len(long_prompt)} characters)" in message
    )
    assert max(quoted_prompt_lengths(message.split(" is not")[0])) <= 80
    with pytest.raises(ValueError) as info:
        PromptRecord("a cat", dcot=(long_prompt, long_prompt, ""))
    assert len(str(info.value)) < 250 and long_prompt[:200] not in str(info.value)


# -- the real command ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_console_shows_one_line_and_exit_status_2(tmp_path):
    """As a terminal shows it: the console script's stderr, for the two errors that were walls."""
    not_a_pipeline = tmp_path / "notes"
    not_a_pipeline.mkdir()
    commands = {
        "sample": ["sample", "--model", str(not_a_pipeline), "--out", str(tmp_path / "x.png")],
        "fit": fit_args(
            tmp_path,
            "--model.estimator",
            "rlr_lightning.estimators.GRPO",
            "--model.estimator.init_args.group_size",
            "1",
        ),
    }
    started = {
        name: subprocess.Popen(
            [sys.executable, "-m", "rlr_lightning", *args],
            cwd=tmp_path,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, args in commands.items()
    }
    for name, proc in started.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (name, err)
        # Lightning's own "Seed set to 0" may precede the error; nothing but its hint follows it.
        line = one_error_line(err, f"rlr {name}")
        assert len(err.strip().splitlines()) <= 3, err
        assert ("no model_index.json" if name == "sample" else "group_size must be >= 2, got 1") in line
