"""Rewards as LightningCLI sees them: typed, documented init arguments and class_path configs."""

from __future__ import annotations

import inspect

import pytest

import rlr_lightning.rewards as rewards
from rlr_lightning.rewards import JpegCompressibility, RewardModel, TargetColor, WeightedSum

REWARD_CLASSES = [
    rewards.AestheticReward,
    rewards.HPSv2Reward,
    rewards.PickScoreReward,
    rewards.CLIPScoreReward,
    rewards.JpegCompressibility,
    rewards.JpegIncompressibility,
    rewards.WeightedSum,
    rewards.TargetColor,
    rewards.ColorBalance,
    rewards.QuantizedBrightness,
    rewards.RemoteReward,
]


@pytest.mark.parametrize("cls", REWARD_CLASSES, ids=lambda c: c.__name__)
def test_every_init_argument_is_typed_and_documented(cls):
    from docstring_parser import parse

    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    documented = {p.arg_name: p.description for p in parse(inspect.getdoc(cls)).params}
    for p in params:
        assert p.annotation is not inspect.Parameter.empty, f"{cls.__name__}.{p.name} has no type"
        assert documented.get(p.name), f"{cls.__name__}.{p.name} is not documented in Args"
    assert set(documented) == {p.name for p in params}  # no stale entries either


@pytest.mark.parametrize("cls", REWARD_CLASSES, ids=lambda c: c.__name__)
def test_jsonargparse_builds_arguments_with_help(cls):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "reward")
    help_text = parser.format_help()
    for name in inspect.signature(cls.__init__).parameters:
        if name != "self":
            assert f"--reward.{name}" in help_text


def test_weighted_sum_from_a_class_path_config():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=RewardModel)
    cfg = parser.parse_object(
        {
            "reward": {
                "class_path": "rlr_lightning.rewards.WeightedSum",
                "init_args": {
                    "rewards": [
                        {"class_path": "rlr_lightning.rewards.TargetColor"},
                        {
                            "class_path": "rlr_lightning.rewards.JpegCompressibility",
                            "init_args": {"quality": 80},
                        },
                    ],
                    "weights": [1.0, 0.5],
                },
            }
        }
    )
    reward = parser.instantiate(cfg).reward
    assert isinstance(reward, WeightedSum)
    assert isinstance(reward.rewards[0], TargetColor) and isinstance(reward.rewards[1], JpegCompressibility)
    assert reward.rewards[1].quality == 80
    assert reward.weights.tolist() == [1.0, 0.5]
    assert reward.differentiable is False
