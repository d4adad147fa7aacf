"""Missing weights offline: one clear error, early, naming the file, its source and the option to use."""

from __future__ import annotations

import time

import pytest
import torch

from rlr_lightning.rewards import (
    AestheticReward,
    CLIPScoreReward,
    HPSv2Reward,
    MissingRewardWeightsError,
    PickScoreReward,
)
from rlr_lightning.rewards import weights as weights_module
from rlr_lightning.rewards.aesthetic import AESTHETIC_HEAD_FILE, AESTHETIC_HEAD_URL
from tests.rewards import save_tiny_aesthetic_head, save_tiny_open_clip, save_tiny_pickscore


def _assert_names(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def test_error_type_is_an_oserror():
    assert issubclass(MissingRewardWeightsError, FileNotFoundError)
    err = MissingRewardWeightsError("w.pt", "https://example.org/w.pt", "weights_path")
    assert (err.weights_file, err.source, err.option) == ("w.pt", "https://example.org/w.pt", "weights_path")
    assert "weights_path=/path/to/w.pt" in str(err)


def test_aesthetic_head_missing_offline_fails_before_building_clip(tmp_path):
    start = time.perf_counter()
    with pytest.raises(MissingRewardWeightsError) as err:
        AestheticReward(cache_dir=str(tmp_path))  # default ViT-L-14: would take seconds to build
    _assert_names(err, AESTHETIC_HEAD_FILE, AESTHETIC_HEAD_URL, "head_path=")
    assert err.value.option == "head_path"
    assert time.perf_counter() - start < 5


def test_aesthetic_head_path_that_does_not_exist(tmp_path):
    with pytest.raises(MissingRewardWeightsError) as err:
        AestheticReward(head_path=str(tmp_path / "nope.pth"))
    _assert_names(err, str(tmp_path / "nope.pth"), AESTHETIC_HEAD_FILE, "head_path")


def test_aesthetic_head_download_failure_and_success(tmp_path, monkeypatch):
    # Pretend to be online, with a downloader that fails, then one that "downloads" a tiny head.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("RLR_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    urls = []

    def failing(url, destination):
        urls.append(url)
        raise ConnectionError("no route to host")

    monkeypatch.setattr(weights_module, "_download", failing)
    with pytest.raises(MissingRewardWeightsError) as err:
        AestheticReward(cache_dir=str(tmp_path / "cache"))
    _assert_names(err, "download failed", "no route to host", AESTHETIC_HEAD_URL, "head_path")
    assert urls == [AESTHETIC_HEAD_URL]

    files = save_tiny_open_clip(tmp_path / "clip")
    tiny_head = tmp_path / "tiny_head.pth"
    save_tiny_aesthetic_head(tiny_head)
    monkeypatch.setattr(weights_module, "_download", lambda url, dst: dst.write_bytes(tiny_head.read_bytes()))
    kwargs = dict(
        clip_model=files["config"], clip_pretrained=files["checkpoint"], cache_dir=str(tmp_path / "cache")
    )
    reward = AestheticReward(**kwargs)
    assert (tmp_path / "cache" / AESTHETIC_HEAD_FILE).is_file()
    monkeypatch.setattr(weights_module, "_download", failing)  # the cached copy is used from now on
    again = AestheticReward(**kwargs)
    torch.testing.assert_close(again.head.layers[0].weight, reward.head.layers[0].weight)


@pytest.mark.parametrize(
    "version, filename", [("v2.0", "HPS_v2_compressed.pt"), ("v2.1", "HPS_v2.1_compressed.pt")]
)
def test_hps_missing_offline(tmp_path, version, filename):
    with pytest.raises(MissingRewardWeightsError) as err:
        HPSv2Reward(version=version, cache_dir=str(tmp_path))
    _assert_names(err, filename, "xswu/HPSv2", "checkpoint_path=")


def test_hps_checkpoint_path_that_does_not_exist(tmp_path):
    with pytest.raises(MissingRewardWeightsError) as err:
        HPSv2Reward(checkpoint_path=str(tmp_path / "hps.pt"))
    _assert_names(err, "HPS_v2_compressed.pt", "xswu/HPSv2", "checkpoint_path")


def test_clip_score_missing_offline(tmp_path):
    with pytest.raises(MissingRewardWeightsError) as err:
        CLIPScoreReward(cache_dir=str(tmp_path))  # ViT-L-14 "openai", from timm's hub copy
    _assert_names(err, "open_clip_pytorch_model.bin", "timm/vit_large_patch14_clip_224.openai", "pretrained=")
    with pytest.raises(MissingRewardWeightsError) as err:
        CLIPScoreReward(clip_model="ViT-B-32", pretrained=str(tmp_path / "missing.pt"))
    _assert_names(err, "missing.pt", "pretrained")


def test_pickscore_missing_offline(tmp_path):
    with pytest.raises(MissingRewardWeightsError) as err:
        PickScoreReward(cache_dir=str(tmp_path))  # the processor is loaded (and missed) first
    _assert_names(
        err, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "preprocessor_config.json", "processor_name_or_path="
    )
    local = save_tiny_pickscore(tmp_path / "tiny")
    with pytest.raises(MissingRewardWeightsError) as err:
        PickScoreReward(processor_name_or_path=local, cache_dir=str(tmp_path))
    _assert_names(err, "yuvalkirstain/PickScore_v1", "config.json", "model_name_or_path=")
    with pytest.raises(MissingRewardWeightsError) as err:
        PickScoreReward(model_name_or_path=str(tmp_path / "no-such-dir"), processor_name_or_path=local)
    _assert_names(err, "no-such-dir", "model_name_or_path=")
