"""Rewards on the shapes world: gradients reach the pixels, matching renders rank above others, and the
checker reward is the checker's verdict."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from rlr_lightning.rewards import RewardModel, WorldCheckerReward, WorldColorReward, WorldPositionReward
from rlr_lightning.world import CaptionSpec, Scene, Shape, ShapesWorldDataset, caption, render, sample_scene

REGIONS = ("left", "right", "top", "bottom", "center")


def scenes_for(region: str, n: int, seed: int = 0) -> list[tuple[CaptionSpec, Scene]]:
    """Scenes without distractors of varied colours, kinds and counts, all in ``region``."""
    generator = torch.Generator().manual_seed(seed)
    colours, kinds = ("red", "green", "blue", "yellow", "white"), ("circle", "square", "triangle")
    out = []
    for i in range(n):
        spec = CaptionSpec(colours[i % 5], kinds[i % 3], 1 + i % 2, region)
        out.append((spec, sample_scene(spec, generator, max_distractors=0)))
    return out


@pytest.mark.parametrize("reward_cls", [WorldColorReward, WorldPositionReward])
@pytest.mark.parametrize("size", [32, 64])
def test_differentiable_rewards_pass_finite_nonzero_gradients_to_every_image(reward_cls, size):
    data = ShapesWorldDataset("train", num_examples=12, image_size=size, seed=2)
    items = [data[i] for i in range(len(data))]
    captions = [item["caption"] for item in items]
    if reward_cls is WorldPositionReward:  # captions without a region have no position to reward
        captions = [
            caption(dataclasses.replace(data.example(i).spec, region=REGIONS[i % 5])) for i in range(12)
        ]
    images = torch.stack([item["image"] for item in items]).requires_grad_(True)
    rewards = reward_cls()(images, captions)
    assert rewards.shape == (12,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    rewards.sum().backward()
    assert torch.isfinite(images.grad).all()
    assert (images.grad.flatten(1).abs().sum(dim=1) > 0).all()


def test_color_reward_ranks_the_asked_colour_above_others():
    reward = WorldColorReward()
    for spec, scene in scenes_for("anywhere", 10):
        image = render(scene, 32).unsqueeze(0)
        other = "blue" if spec.color != "blue" else "red"
        recoloured = render(
            Scene(tuple(dataclasses.replace(s, color=other) for s in scene.shapes)), 32
        ).unsqueeze(0)
        text = caption(spec)
        matching, wrong_image = reward(image, [text]).item(), reward(recoloured, [text]).item()
        wrong_caption = reward(image, [caption(dataclasses.replace(spec, color=other))]).item()
        # Anti-aliased rims of yellow and white shapes count partly as red, green or background: about 0.8 at worst.
        assert matching > 0.8 and wrong_image < 0.05 and wrong_caption < 0.05, (text, matching)


def test_color_reward_is_the_asked_colours_share_of_the_coloured_pixels():
    half = Scene((Shape("square", "red", 0.25, 0.5, 0.3), Shape("square", "green", 0.75, 0.5, 0.3)))
    image = render(half, 64).unsqueeze(0)
    assert WorldColorReward()(image, ["a red square"]).item() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("region", ["left", "right", "top", "bottom"])
def test_position_reward_ranks_a_render_in_the_asked_half_above_its_mirror_image(region):
    reward = WorldPositionReward()
    for spec, scene in scenes_for(region, 6, seed=REGIONS.index(region)):
        image = render(scene, 32).unsqueeze(0)
        mirrored = image.flip(-1 if region in ("left", "right") else -2)
        inside_score, outside_score = (
            reward(image, [caption(spec)]).item(),
            reward(mirrored, [caption(spec)]).item(),
        )
        assert 0 < inside_score <= 1 and -1 <= outside_score < 0, (caption(spec), inside_score, outside_score)


def test_position_reward_ranks_a_render_in_the_center_above_one_in_a_corner():
    reward = WorldPositionReward()
    for colour, kind in zip(
        ["red", "green", "blue", "yellow", "white", "red"], ["circle", "square", "triangle"] * 2
    ):
        text = caption(CaptionSpec(colour, kind, 1, "center"))
        scores = [
            reward(render(Scene((Shape(kind, colour, x, y, 0.28),)), 32).unsqueeze(0), [text]).item()
            for x, y in [(0.5, 0.45), (0.55, 0.55), (0.2, 0.8), (0.8, 0.2)]
        ]
        # 4 x (0.25 - the centroid's larger offset from the middle): about 0.8 inside, -0.2 at (0.2, 0.8).
        assert scores[0] > 0.7 and scores[1] > 0.5 and scores[2] < -0.1 and scores[3] < -0.1, (text, scores)


def test_position_reward_is_zero_without_a_region_or_colour():
    reward = WorldPositionReward()
    image = render(Scene((Shape("circle", "red", 0.2, 0.2, 0.28),)), 32).unsqueeze(0)
    assert reward(image, ["a red circle"]).item() == 0.0
    # An absent colour sits at the centre: neither in nor out of a half.
    assert reward(image, ["a blue circle on the left"]).item() == pytest.approx(0.0, abs=0.01)
    assert reward(image, ["a red circle on the left"]).item() == pytest.approx(2 * (0.5 - 0.2), abs=0.02)


def test_checker_reward_is_one_on_matching_renders_and_zero_on_wrong_ones():
    data = ShapesWorldDataset("held_out", num_examples=16, image_size=32, max_distractors=2, seed=3)
    examples = [data.example(i) for i in range(16)]
    images = torch.stack([e.image for e in examples]).requires_grad_(True)
    right = [e.caption for e in examples]
    wrong = [caption(dataclasses.replace(e.spec, count=e.spec.count % 4 + 1)) for e in examples]
    reward = WorldCheckerReward()
    assert reward.differentiable is False and isinstance(reward, RewardModel)
    scores = reward(images, right)
    assert scores.tolist() == [1.0] * 16 and not scores.requires_grad
    assert reward(images, wrong).tolist() == [0.0] * 16
    # Partial credit: colour and position still hold when only the count is wrong.
    partial = WorldCheckerReward(partial_credit=True)(images, wrong)
    assert partial.tolist() == pytest.approx([2 / 3] * 16)


def test_a_prompt_outside_the_grammar_fails_naming_it():
    images = torch.zeros(1, 3, 32, 32)
    for reward in (WorldColorReward(), WorldPositionReward(), WorldCheckerReward()):
        with pytest.raises(
            ValueError, match="'a photo of a cat' is not a shapes-world caption; captions read"
        ):
            reward(images, ["a photo of a cat"])
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        WorldColorReward(temperature=0)
    with pytest.raises(ValueError, match="min_intensity must be in \\(0, 1\\], got 1.5"):
        WorldCheckerReward(min_intensity=1.5)


@pytest.mark.parametrize(
    "cls", [WorldColorReward, WorldPositionReward, WorldCheckerReward], ids=lambda c: c.__name__
)
def test_rewards_build_from_a_class_path_config_with_documented_arguments(cls):
    from docstring_parser import parse
    from jsonargparse import ArgumentParser

    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    documented = {p.arg_name: p.description for p in parse(inspect.getdoc(cls)).params}
    assert {p.name for p in params} == set(documented) and all(documented.values())
    assert all(p.annotation is not inspect.Parameter.empty for p in params)

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=RewardModel)
    name = params[0].name
    value = not params[0].default if isinstance(params[0].default, bool) else 0.2
    config = {"class_path": f"rlr_lightning.rewards.{cls.__name__}", "init_args": {name: value}}
    cfg = parser.parse_object({"reward": config})
    reward = parser.instantiate(cfg).reward
    assert isinstance(reward, cls) and getattr(reward, name) == value
