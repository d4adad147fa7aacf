"""Training and sampling a video model through the module, the memory planner and the command line, on tiny-wan.

What a user of the Wan family sees: the frames and size they ask for, a clear refusal of an image reward, the
memory planner pricing longer videos higher, and ``rlr fit`` then ``rlr sample`` writing an MP4 whose frames are
the model's (decoded back from the file and compared frame by frame with the same samples drawn in Python).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlr_lightning.data import PromptBatch
from rlr_lightning.estimators import RLR
from rlr_lightning.module import RLRModule
from rlr_lightning.rewards import PerFrameReward, TargetColor

ROOT = Path(__file__).resolve().parents[1]


def test_the_module_samples_the_asked_frames_and_resolution(tiny_wan_dir):
    module = RLRModule(str(tiny_wan_dir), num_steps=3, eta=0.7, num_frames=13, resolution=(32, 48))
    assert isinstance(module.reward, PerFrameReward)  # the tiny model's toy default, per frame
    module.configure_model()
    videos = module.generate(PromptBatch.from_prompts(["a cat", "a dog"]), torch.Generator().manual_seed(0))
    assert videos.shape == (2, 13, 3, 32, 48)
    assert float(videos.min()) >= 0 and float(videos.max()) <= 1


def test_bad_frames_and_an_image_reward_are_refused_before_training(tiny_wan_dir, tiny_pipeline_dir):
    with pytest.raises(
        ValueError, match="num_frames must be a multiple of the VAE's temporal factor 4 plus one.*e.g. 9"
    ):
        RLRModule(str(tiny_wan_dir), num_frames=10).configure_model()
    with pytest.raises(
        ValueError, match="makes videos, and TargetColor scores images: wrap it as .*PerFrameReward"
    ):
        RLRModule(str(tiny_wan_dir), reward=TargetColor()).configure_model()
    with pytest.raises(ValueError, match="model.num_frames=9 is for video models.*makes images"):
        RLRModule(str(tiny_pipeline_dir), num_frames=9).configure_model()
    with pytest.raises(ValueError, match="makes images, and PerFrameReward scores videos"):
        RLRModule(str(tiny_pipeline_dir), reward=PerFrameReward(TargetColor())).configure_model()


def test_the_memory_planner_prices_longer_videos_higher(tiny_wan_dir):
    """Costs are measured on the real model: a denoiser step with gradient and the decode + reward path of a
    17-frame video (5 latent frames) hold more than those of a 9-frame one (3 latent frames)."""
    from rlr_lightning.memory.measure import measure

    def costs(frames: int):
        module = RLRModule(str(tiny_wan_dir), num_steps=3, eta=0.7, num_frames=frames, estimator=RLR(h=1))
        module.configure_model()
        return measure(module.task, "a red square moving right")

    short, long = costs(9), costs(17)
    assert long.grad_step > 1.3 * short.grad_step, (short, long)
    assert long.reward_path > 1.5 * short.reward_path, (short, long)


@pytest.mark.slow
def test_rlr_fit_then_sample_through_the_cli_writes_a_playable_mp4(tiny_wan_dir, tmp_path):
    """`rlr fit` (the quickstart config on tiny-wan, 2 steps) in a subprocess, then `rlr sample --lora` of its
    export writing an MP4 and a GIF: both decode back to the frames the same LoRA draws in Python."""
    from rlr_lightning.cli import main
    from rlr_lightning.models import load_backbone
    from rlr_lightning.sampling import Plan
    from rlr_lightning.video import read_video

    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlr_lightning",
            "fit",
            "--config",
            str(ROOT / "configs/quickstart.yaml"),
            "--model.pretrained_model_name_or_path",
            str(tiny_wan_dir),
            "--model.num_steps",
            "3",
            "--model.eta",
            "0.7",
            "--model.guidance_scale",
            "2",
            "--model.timestep_spacing",
            "null",
            "--model.reward",
            "rlr_lightning.rewards.PerFrameReward",
            "--model.reward.reward",
            "rlr_lightning.rewards.TargetColor",
            "--data.batch_size",
            "2",
            "--trainer.max_steps",
            "2",
            "--trainer.callbacks",
            "[]",
            "--trainer.default_root_dir",
            str(out),
            "--trainer.logger.init_args.save_dir",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WanBackbone" in proc.stderr + proc.stdout and "9-frame 32x32 videos" in proc.stderr + proc.stdout
    exported = next(out.rglob("pytorch_lora_weights.safetensors")).parent
    prompts = ["a cat", "a fox"]
    args = ["--model", str(tiny_wan_dir), "--lora", str(exported), "--steps", "3", "--eta", "0.7"]
    args += ["--guidance", "2", "--seed", "5", "--prompt", prompts[0], "--prompt", prompts[1]]
    main(["sample", *args, "--out", str(tmp_path / "samples.mp4")])
    main(["sample", *args, "--out", str(tmp_path / "samples.gif")])

    backbone = load_backbone(tiny_wan_dir, local_files_only=True)
    backbone.load_lora(exported)
    sampler = backbone.make_sampler(3, 0.7, 2.0)
    with torch.no_grad():
        final = sampler.run(
            Plan(3), backbone.encode_prompts(prompts), generator=torch.Generator().manual_seed(5)
        )
        videos = backbone.decode(final.final)
    from torchvision.utils import make_grid

    expected = torch.stack([make_grid(videos[:, k], nrow=2) for k in range(videos.shape[1])])
    expected = (expected * 255).round()
    for name, tolerance in (("samples.mp4", 6.0), ("samples.gif", 6.0)):
        decoded = read_video(tmp_path / name).float()
        assert decoded.shape == expected.shape, name  # every frame, at the grid's size
        # Lossy both (H.264 at yuv420p halves the colour resolution; a GIF has 256 colours), and these tiny
        # random-weight videos are all fine detail: close on average, in 0-255 steps.
        error = float((decoded - expected).abs().mean())
        # Frame by frame: each decoded frame is nearer its own frame than the next one is (order and count kept).
        shifted = float((decoded[1:] - expected[:-1]).abs().mean())
        assert error <= tolerance and shifted > 1.5 * error, (name, error, shifted)
    assert float(expected.std()) > 1  # not blank: the comparison has something to compare
