"""``rlr eval``: the GenEval-style table of a shapes-world model, its JSON, its settings from a config, and its
errors. The base model's accuracies in docs/world.md come from this command; one test re-runs it."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from rlr_lightning.cli import main
from rlr_lightning.world.checker import CHECKS
from rlr_lightning.world.evaluate import COUNT_BY_NUMBER, evaluate
from rlr_lightning.world.model_samples import split_captions
from rlr_lightning.world.scenes import parse_caption, split_specs

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--steps", "2", "--guidance", "1", "--eta", "1", "--samples-per-caption", "1"]


def test_table_and_json_report_each_seed_and_their_mean_and_standard_error(tmp_path, capsys):
    out = tmp_path / "eval.json"
    main(["eval", *FAST, "--seeds", "3", "5", "--json", str(out)])
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    held_out = len(split_specs()[1])
    assert result["seeds"] == [3, 5] and result["n_per_seed"] == held_out and result["n"] == 2 * held_out
    for key in (*CHECKS, *COUNT_BY_NUMBER):
        values = [r[key] for r in result["per_seed"]]
        assert result["mean"][key] == pytest.approx(statistics.mean(values))
        assert result["se"][key] == pytest.approx(statistics.stdev(values) / math.sqrt(2))
    # Each seed is the single-seed evaluation; count by the asked number splits the count accuracy exactly.
    alone = evaluate("shapes-world", num_steps=2, guidance_scale=1.0, eta=1.0, seed=5)
    assert {k: result["per_seed"][1][k] for k in alone} == pytest.approx(alone)
    asked = [parse_caption(c).count for c in split_captions("held_out")]
    shares = [asked.count(n) / len(asked) for n in (1, 2, 3, 4)]
    for one in result["per_seed"]:
        assert sum(s * one[k] for s, k in zip(shares, COUNT_BY_NUMBER)) == pytest.approx(one["count_ok"])
    row = next(line for line in table.splitlines() if line.startswith("count "))
    assert f"{100 * result['mean']['count_ok']:5.1f}% +- {100 * result['se']['count_ok']:4.1f}" in row
    assert f"{100 * result['per_seed'][0]['count_ok']:6.1f}%" in row
    assert "all (count and position)" in table and "asked four" in table and result["table"] == table.strip()
    assert result["settings"]["steps"] == 2 and result["settings"]["split"] == "held_out"


def test_settings_come_from_a_training_config_and_explicit_options_win(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(
        "model:\n  pretrained_model_name_or_path: shapes-world\n  num_steps: 3\n  eta: 1.0\n"
        "  guidance_scale: 1.0\n  timestep_spacing: trailing\n"
    )
    out = tmp_path / "eval.json"
    main(
        [
            "eval",
            "--config",
            str(config),
            "--steps",
            "2",
            "--samples-per-caption",
            "1",
            "--seeds",
            "0",
            "1",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert result["settings"] == dict(
        model="shapes-world",
        steps=2,
        eta=1.0,
        guidance=1.0,
        timestep_spacing="trailing",
        lora=None,
        split="held_out",
        samples_per_caption=1,
    )
    alone = evaluate(
        "shapes-world", num_steps=2, guidance_scale=1.0, eta=1.0, timestep_spacing="trailing", seed=1
    )
    assert result["per_seed"][1]["count_ok"] == pytest.approx(alone["count_ok"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0", "0"], "--seeds must be distinct"),
        (["--lora", "no/such/lora"], "--lora no/such/lora: no such file or directory"),
        (["--config", "no/such.yaml"], "--config no/such.yaml: no such file"),
        (["--guidance", "0.5"], "--guidance must be >= 1"),
        (["--json", "no/such/dir/out.json"], "its directory no/such/dir does not exist"),
        (["--grid", "grid.png"], "--grid compares the base model with a LoRA: give --lora too"),
        (
            ["--lora", "shapes-world-aligned", "--grid", "no/such/dir/grid.png"],
            "its directory no/such/dir does not exist",
        ),
        (["--grid-captions", "0"], "--grid-captions must be >= 1"),
    ],
)
def test_bad_options_fail_at_once_with_exit_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _documented_base_row() -> dict[str, tuple[float, float]]:
    """colour, count, position, all of the base model's held-out row in docs/world.md: (mean, SE) in percent."""
    text = (ROOT / "docs" / "world.md").read_text()
    row = next(
        line for line in text.splitlines() if line.startswith("| held-out combinations (2 per caption)")
    )
    cells = re.findall(r"([\d.]+)% ± ([\d.]+)", row)
    return {
        key: (float(m), float(se))
        for key, (m, se) in zip(("color_ok", "count_ok", "position_ok", "all_ok"), cells)
    }


def test_the_base_model_reproduces_the_accuracies_in_the_docs(tmp_path):
    """docs/world.md's held-out row is `rlr eval`'s default (20 steps, eta 0, guidance 3, 2 samples per caption,
    seeds 0 1 2): re-run, every accuracy lies within the documented standard error of the documented mean."""
    out = tmp_path / "base.json"
    main(["eval", "--model", "shapes-world", "--json", str(out)])
    result = json.loads(out.read_text())
    documented = _documented_base_row()
    assert len(documented) == 4
    for key, (mean, se) in documented.items():
        assert abs(100 * result["mean"][key] - mean) <= max(se, 0.1), (key, result["mean"][key], mean, se)
