"""The ``rlr`` command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rlr_lightning.cli import main


def test_rlr_sample_writes_a_grid_and_logs_log_probs(tiny_pipeline_dir, tmp_path, caplog):
    out = tmp_path / "grid.png"
    with caplog.at_level("INFO", logger="rlr_lightning"):
        main(["sample", "--model", str(tiny_pipeline_dir), "--steps", "3", "--prompt", "a cat",
              "--prompt", "a dog", "--out", str(out)])
    assert Image.open(out).size == (2 * 16 + 3 * 2, 16 + 2 * 2)  # two 16 px images with save_image padding
    steps = [r.getMessage() for r in caplog.records if "log p" in r.getMessage()]
    assert len(steps) == 3


def test_rlr_sample_is_reproducible_by_seed(tiny_pipeline_dir, tmp_path):
    args = ["sample", "--model", str(tiny_pipeline_dir), "--steps", "2", "--prompt", "a cat"]
    main(args + ["--seed", "1", "--out", str(tmp_path / "a.png")])
    main(args + ["--seed", "1", "--out", str(tmp_path / "b.png")])
    main(args + ["--seed", "2", "--out", str(tmp_path / "c.png")])
    load = lambda name: torch.from_numpy(np.asarray(Image.open(tmp_path / name)).copy())  # noqa: E731
    assert torch.equal(load("a.png"), load("b.png"))
    assert not torch.equal(load("a.png"), load("c.png"))


def test_rlr_rejects_unknown_commands_and_bad_settings(tiny_pipeline_dir, tmp_path):
    with pytest.raises(SystemExit, match="commands:"):
        main(["train"])
    with pytest.raises(ValueError, match="eta must be >= 0"):
        main(["sample", "--model", str(tiny_pipeline_dir), "--eta", "-1", "--out", str(tmp_path / "x.png")])
