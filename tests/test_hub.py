"""One offline policy for backbones and reward weights: ``HF_HUB_OFFLINE`` or ``RLR_OFFLINE``."""

from __future__ import annotations

import pytest

from rlr_lightning.hub import ModelNotAvailableError, is_offline
from rlr_lightning.models import StableDiffusionXLBackbone, backbone_class, load_backbone
from rlr_lightning.rewards.weights import MissingRewardWeightsError, fetch_hub_file


@pytest.fixture
def only_rlr_offline(monkeypatch):
    """Downloads allowed as far as huggingface_hub knows; only ``RLR_OFFLINE`` says no."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("RLR_OFFLINE", "1")


def test_rlr_offline_alone_switches_downloads_off(only_rlr_offline, monkeypatch):
    assert is_offline()
    monkeypatch.setenv("RLR_OFFLINE", "0")
    assert not is_offline()


def test_rlr_offline_stops_a_backbone_download_with_what_to_get(only_rlr_offline, tmp_path):
    """Before, the backbone only read HF_HUB_OFFLINE and went to the network here (the test guard refuses)."""
    repo = "stabilityai/stable-diffusion-xl-base-1.0"
    for load in (load_backbone, StableDiffusionXLBackbone.from_pretrained):
        with pytest.raises(ModelNotAvailableError) as info:
            load(repo, cache_dir=tmp_path)
        message = str(info.value)
        assert (
            "downloads are off" in message and f"hf download {repo}" in message and "RLR_OFFLINE" in message
        )


def test_rlr_offline_stops_a_reward_weights_download(only_rlr_offline, tmp_path):
    with pytest.raises(MissingRewardWeightsError) as info:
        fetch_hub_file(
            "yuvalkirstain/PickScore_v1",
            "model.safetensors",
            "model.reward.init_args.checkpoint",
            cache_dir=tmp_path,
        )
    assert "model.reward.init_args.checkpoint" in str(info.value)


def test_family_is_read_from_model_index(tiny_pipeline_dir, tiny_sdxl_dir, tmp_path):
    assert backbone_class(tiny_pipeline_dir).__name__ == "StableDiffusionBackbone"
    assert backbone_class(tiny_sdxl_dir) is StableDiffusionXLBackbone
    other = tmp_path / "qwen"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    with pytest.raises(
        ValueError, match="QwenImagePipeline pipeline; supported pipelines: StableDiffusionPipeline"
    ):
        backbone_class(other)
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        backbone_class(tmp_path)
