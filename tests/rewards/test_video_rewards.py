"""Video rewards: per-frame image rewards, temporal consistency, and weighted sums of video rewards.

Real rewards throughout: the toy pixel rewards, and a tiny random open_clip model loaded the production way
(as in test_clip_rewards.py) where a reward must depend on the prompt or have an image embedding.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from rlr_lightning.rewards import (
    CLIPScoreReward,
    ColorBalance,
    JpegCompressibility,
    PerFrameReward,
    QuantizedBrightness,
    RewardModel,
    TargetColor,
    TemporalConsistencyReward,
    WeightedSum,
)
from rlr_lightning.rewards.video import strided_frame_indices
from tests.rewards import save_tiny_open_clip

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> CLIPScoreReward:
    files = save_tiny_open_clip(tmp_path_factory.mktemp("tiny-clip"))
    return CLIPScoreReward(clip_model=files["config"], pretrained=files["checkpoint"])


def _videos(batch: int = 2, frames: int = 5, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _static(batch: int = 2, frames: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    first = torch.rand(batch, 1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return first.expand(batch, frames, 3, size, size).clone()


# --- PerFrameReward -------------------------------------------------------------------------------------------


def test_per_frame_is_the_mean_of_the_image_reward_over_frames():
    inner = TargetColor()
    reward = PerFrameReward(inner)
    assert reward.video and reward.differentiable
    videos = _videos()
    out = reward(videos, PROMPTS)
    assert out.shape == (2,) and out.dtype == torch.float32
    by_hand = torch.stack([inner(videos[:, f], PROMPTS) for f in range(videos.shape[1])], dim=1).mean(dim=1)
    torch.testing.assert_close(out, by_hand)


def test_per_frame_gives_each_frame_its_own_video_prompt(tiny_clip):
    # CLIP score depends on the prompt: frames scored with the wrong video's prompt would change the mean.
    reward = PerFrameReward(tiny_clip, frame_chunk=3)  # chunks straddle the two videos' frames
    videos = _videos(frames=4, size=32)
    with torch.no_grad():
        out = reward(videos, PROMPTS)
        by_hand = torch.stack([tiny_clip(videos[:, f], PROMPTS) for f in range(4)], dim=1).mean(dim=1)
        swapped = reward(videos, PROMPTS[::-1])
    torch.testing.assert_close(out, by_hand, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(out, swapped)


@pytest.mark.parametrize(
    ("num_frames", "stride", "max_frames", "expected"),
    [
        (6, 1, None, [0, 1, 2, 3, 4, 5]),
        (10, 3, None, [0, 3, 6, 9]),
        (10, 4, None, [0, 4, 8]),  # the last frame is not added when the stride skips it
        (16, 2, 3, [0, 8, 14]),  # strided 0, 2, ..., 14; then first, middle, last of those
        (10, 1, 4, [0, 3, 6, 9]),
        (9, 1, 5, [0, 2, 4, 6, 8]),
        (11, 1, 4, [0, 3, 7, 10]),  # positions 0, 3.33, 6.67, 10 rounded
        (7, 1, 7, [0, 1, 2, 3, 4, 5, 6]),  # max_frames not below the count: unchanged
        (7, 2, 1, [0]),
        (1, 3, 2, [0]),
    ],
)
def test_subsampling_picks_the_documented_frames(num_frames, stride, max_frames, expected):
    assert strided_frame_indices(num_frames, stride, max_frames) == expected
    reward = PerFrameReward(ColorBalance(weights=(1.0, 0.0, 0.0), scale=1.0), stride, max_frames)
    assert reward.frame_indices(num_frames) == expected
    # Frame f is flat with red = f: the reward of the video is the mean index of the frames it scored.
    videos = torch.zeros(1, num_frames, 3, 4, 4)
    videos[:, :, 0] = torch.arange(num_frames, dtype=torch.float32).view(1, -1, 1, 1) / 100
    torch.testing.assert_close(reward(videos, ["p"]), torch.tensor([sum(expected) / len(expected) / 100]))


def test_max_frames_indices_are_distinct_and_keep_first_and_last():
    for n in range(2, 40):
        for m in range(2, n + 1):
            picked = strided_frame_indices(n, 1, m)
            assert len(set(picked)) == m and picked[0] == 0 and picked[-1] == n - 1
            assert picked == sorted(picked)


def _saved_bytes(reward: RewardModel, videos: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after ``reward``'s forward (tensors packed by saved-tensor hooks)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reward(videos, PROMPTS)
    return total


def test_chunked_scores_and_gradients_equal_unchunked(tiny_clip):
    videos = _videos(frames=3, size=32)
    results = {}
    for chunk in (1, 100):
        x = videos.clone().requires_grad_(True)
        out = PerFrameReward(tiny_clip, frame_chunk=chunk)(x, PROMPTS)
        assert out.requires_grad
        out.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        results[chunk] = (out.detach(), x.grad)
    torch.testing.assert_close(results[1][0], results[100][0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(results[1][1], results[100][1], rtol=1e-4, atol=1e-6)
    # Checkpointed chunks keep none of the CLIP activations for backward, at most their inputs (the frames,
    # once); one unchunked pass keeps all its activations, several times the frames for even this tiny model.
    x = videos.clone().requires_grad_(True)
    frame_bytes = x.numel() * x.element_size()
    assert _saved_bytes(PerFrameReward(tiny_clip, frame_chunk=1), x) <= frame_bytes
    assert _saved_bytes(PerFrameReward(tiny_clip, frame_chunk=100), x) > 4 * frame_bytes


def test_chunked_gradient_equals_the_gradient_of_the_mean_by_hand():
    inner = TargetColor()
    x = _videos(frames=5).requires_grad_(True)
    PerFrameReward(inner, frame_stride=2, frame_chunk=1)(x, PROMPTS).sum().backward()
    y = x.detach().clone().requires_grad_(True)
    torch.stack([inner(y[:, f], PROMPTS) for f in (0, 2, 4)], dim=1).mean(dim=1).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    assert x.grad is not None and (x.grad[:, 1::2] == 0).all()  # frames not scored get no gradient


@pytest.mark.parametrize(
    "inner", [QuantizedBrightness(), JpegCompressibility()], ids=lambda r: type(r).__name__
)
def test_non_differentiable_inner_reward_gives_no_gradient(inner):
    reward = PerFrameReward(inner, frame_chunk=2)
    assert reward.differentiable is False
    videos = _videos(frames=3, size=16).requires_grad_(True)
    out = reward(videos, PROMPTS)
    assert not out.requires_grad
    by_hand = torch.stack([inner(videos[:, f].detach(), PROMPTS) for f in range(3)], dim=1).mean(dim=1)
    torch.testing.assert_close(out, by_hand)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(frame_stride=0), "frame_stride must be an integer >= 1, got 0"),
        (dict(frame_stride=1.5), "frame_stride must be an integer >= 1, got 1.5"),
        (dict(max_frames=0), "max_frames must be an integer >= 1, got 0"),
        (dict(frame_chunk=-2), "frame_chunk must be an integer >= 1, got -2"),
        (dict(frame_chunk=True), "frame_chunk must be an integer >= 1, got True"),
    ],
)
def test_per_frame_validates_its_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerFrameReward(TargetColor(), **kwargs)


def test_per_frame_refuses_a_video_reward_and_image_batches():
    with pytest.raises(ValueError, match=r"must be an image reward .*PerFrameReward is a video reward"):
        PerFrameReward(PerFrameReward(TargetColor()))
    with pytest.raises(ValueError, match="must be a RewardModel, got str"):
        PerFrameReward("TargetColor")  # type: ignore[arg-type]
    reward = PerFrameReward(TargetColor())
    with pytest.raises(
        ValueError, match=r"PerFrameReward takes videos of shape \(B, F, 3, H, W\), got \(2, 3, 8, 8\)"
    ):
        reward(torch.rand(2, 3, 8, 8), PROMPTS)
    with pytest.raises(ValueError, match=r"TargetColor takes images of shape \(B, 3, H, W\)"):
        TargetColor()(_videos(), PROMPTS)
    assert reward.image_embedding(torch.rand(2, 3, 8, 8)) is None


def test_activation_checkpointing_reaches_the_inner_reward(tiny_clip):
    reward = PerFrameReward(tiny_clip)
    transformer = tiny_clip.clip.visual.transformer
    try:
        reward.set_activation_checkpointing(True)
        assert transformer.grad_checkpointing and tiny_clip.clip.transformer.grad_checkpointing
    finally:
        reward.set_activation_checkpointing(False)
    assert not transformer.grad_checkpointing


# --- TemporalConsistencyReward --------------------------------------------------------------------------------


def test_temporal_consistency_pixel_default_is_one_for_static_and_lower_for_changing():
    reward = TemporalConsistencyReward()
    assert reward.video and reward.differentiable and reward.embedding is None
    static = reward(_static(), PROMPTS)
    assert static.shape == (2,) and static.dtype == torch.float32
    torch.testing.assert_close(static, torch.ones(2))
    # A brighter, higher-contrast copy of the same frame is the same content: centred cosine ignores both.
    brighter = _static(frames=2)
    brighter[:, 1] = 0.1 + 0.8 * brighter[:, 1]
    torch.testing.assert_close(reward(brighter, PROMPTS), torch.ones(2))
    changing = _videos(frames=4, size=16).requires_grad_(True)
    out = reward(changing, PROMPTS)
    assert (out < 0.5).all()  # independent noise frames are nearly uncorrelated
    out.sum().backward()
    assert changing.grad is not None and torch.isfinite(changing.grad).all() and changing.grad.abs().sum() > 0


def test_temporal_consistency_frame_stride_skips_frames():
    videos = _videos(frames=5, size=16)
    videos[:, 2] = videos[:, 0]
    videos[:, 4] = videos[:, 0]  # frames 0, 2, 4 equal; 1 and 3 differ
    torch.testing.assert_close(TemporalConsistencyReward(frame_stride=2)(videos, PROMPTS), torch.ones(2))
    assert (TemporalConsistencyReward()(videos, PROMPTS) < 0.9).all()
    with pytest.raises(ValueError, match="at least two frames after frame_stride=5, got 1"):
        TemporalConsistencyReward(frame_stride=5)(videos, PROMPTS)


def test_temporal_consistency_with_a_clip_embedding(tiny_clip):
    reward = TemporalConsistencyReward(tiny_clip)
    assert reward.differentiable and reward.embedding is tiny_clip
    # A submodule: it moves with the reward, and activation checkpointing reaches it.
    assert any(name.startswith("embedding.clip.") for name in reward.state_dict())
    try:
        reward.set_activation_checkpointing(True)
        assert tiny_clip.clip.visual.transformer.grad_checkpointing
    finally:
        reward.set_activation_checkpointing(False)
    static = reward(_static(frames=3, size=32), PROMPTS)
    torch.testing.assert_close(static, torch.ones(2), rtol=0, atol=1e-5)
    changing = _videos(frames=3, size=32)
    changing[:, 1] = 1 - changing[:, 1]
    changing = changing.requires_grad_(True)
    out = reward(changing, PROMPTS)
    assert (out < 1 - 1e-3).all()
    # By hand: cosine of consecutive frames' CLIP embeddings, averaged.
    with torch.no_grad():
        emb = torch.stack([tiny_clip.image_embedding(changing[:, f]) for f in range(3)], dim=1)
        by_hand = torch.nn.functional.cosine_similarity(emb[:, 1:], emb[:, :-1], dim=-1).mean(dim=1)
    torch.testing.assert_close(out.detach(), by_hand, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert changing.grad is not None and changing.grad.abs().sum() > 0


def test_temporal_consistency_refuses_embeddings_it_cannot_use():
    with pytest.raises(ValueError, match="TargetColor has no image embedding"):
        TemporalConsistencyReward(TargetColor())
    with pytest.raises(ValueError, match="WeightedSum has no image embedding"):
        TemporalConsistencyReward(WeightedSum([TargetColor(), ColorBalance()]))
    with pytest.raises(ValueError, match="must be an image reward"):
        TemporalConsistencyReward(TemporalConsistencyReward())
    with pytest.raises(ValueError, match="frame_stride must be an integer >= 1, got 0"):
        TemporalConsistencyReward(frame_stride=0)
    with pytest.raises(ValueError, match=r"\(B, F, 3, H, W\)"):
        TemporalConsistencyReward()(torch.rand(2, 3, 16, 16), PROMPTS)


# --- WeightedSum of video rewards ------------------------------------------------------------------------------


def test_weighted_sum_of_video_rewards_is_a_video_reward():
    parts: list[RewardModel] = [PerFrameReward(TargetColor(), frame_chunk=2), TemporalConsistencyReward()]
    total = WeightedSum(parts, [0.5, 3.0])
    assert total.video and total.differentiable
    videos = _videos(frames=3, size=16).requires_grad_(True)
    out = total(videos, PROMPTS)
    expected = 0.5 * parts[0](videos, PROMPTS) + 3.0 * parts[1](videos, PROMPTS)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert videos.grad is not None and videos.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"WeightedSum takes videos of shape \(B, F, 3, H, W\)"):
        total(torch.rand(2, 3, 16, 16), PROMPTS)
    # A non-differentiable video part makes the sum non-differentiable, as for images.
    assert (
        WeightedSum([PerFrameReward(QuantizedBrightness()), TemporalConsistencyReward()]).differentiable
        is False
    )
    # Image sums are unchanged.
    assert WeightedSum([TargetColor(), ColorBalance()]).video is False


def test_weighted_sum_refuses_to_mix_image_and_video_rewards():
    with pytest.raises(
        ValueError,
        match=r"image rewards \(TargetColor\) with video rewards \(TemporalConsistencyReward\).*PerFrameReward",
    ):
        WeightedSum([TargetColor(), TemporalConsistencyReward()])


# --- As LightningCLI sees them --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [PerFrameReward, TemporalConsistencyReward], ids=lambda c: c.__name__)
def test_init_arguments_are_typed_and_documented(cls):
    from docstring_parser import parse

    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    documented = {p.arg_name: p.description for p in parse(inspect.getdoc(cls)).params}
    for p in params:
        assert p.annotation is not inspect.Parameter.empty, f"{cls.__name__}.{p.name} has no type"
        assert documented.get(p.name), f"{cls.__name__}.{p.name} is not documented in Args"
    assert set(documented) == {p.name for p in params}


def test_video_rewards_from_a_class_path_config():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=RewardModel)
    cfg = parser.parse_object(
        {
            "reward": {
                "class_path": "rlr_lightning.rewards.WeightedSum",
                "init_args": {
                    "rewards": [
                        {
                            "class_path": "rlr_lightning.rewards.PerFrameReward",
                            "init_args": {
                                "reward": {"class_path": "rlr_lightning.rewards.TargetColor"},
                                "frame_stride": 2,
                                "max_frames": 4,
                            },
                        },
                        {"class_path": "rlr_lightning.rewards.TemporalConsistencyReward"},
                    ],
                    "weights": [1.0, 0.5],
                },
            }
        }
    )
    reward = parser.instantiate(cfg).reward
    assert isinstance(reward, WeightedSum) and reward.video
    per_frame = reward.rewards[0]
    assert isinstance(per_frame, PerFrameReward) and isinstance(per_frame.reward, TargetColor)
    assert (per_frame.frame_stride, per_frame.max_frames, per_frame.frame_chunk) == (2, 4, 8)
    assert isinstance(reward.rewards[1], TemporalConsistencyReward)
