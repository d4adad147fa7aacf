"""Loading, freezing, LoRA, prompt encoding, decoding, LoRA export/import and the loader's errors."""

from __future__ import annotations

import pytest
import torch

from rlr_lightning.backbone import (
    DiffusionBackbone,
    LoraSettings,
    ModelNotAvailableError,
    resolve_pretrained,
)
from tests.conftest import perturb_lora_


@pytest.fixture
def backbone(tiny_pipeline_dir):
    bb = DiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    bb.add_lora(LoraSettings(rank=4, alpha=8.0))
    return bb


def unet_out(bb: DiffusionBackbone, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = bb.encode_prompts(["a cat", "a dog"], negative=False).cond
    with torch.no_grad():
        return bb.unet(x, torch.tensor([901, 21]), encoder_hidden_states=context).sample


def test_loaded_backbone_is_frozen_eval_with_fp32_lora_only(tiny_pipeline_dir):
    bb = DiffusionBackbone.from_pretrained(tiny_pipeline_dir, dtype=torch.bfloat16, local_files_only=True)
    assert not any(p.requires_grad for p in bb.parameters())
    bb.add_lora(LoraSettings(rank=2, alpha=2.0, target_modules=("to_q", "to_v")))
    bb.train()  # Lightning calls this during fit: the backbone must stay in eval mode
    assert not any(m.training for m in bb.modules())
    trainable = {n: p for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for n, p in bb.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    # Only the targeted projections got adapters: 2 layers x (A, B) x (attn1, attn2) x attention blocks.
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"to_q", "to_v"}
    assert set(bb.lora_parameters()) == {n.removeprefix("unet.") for n in trainable}


def test_add_lora_is_idempotent_and_refuses_conflicting_settings(backbone):
    before = dict(backbone.lora_parameters())
    backbone.add_lora(LoraSettings(rank=4, alpha=8.0))
    assert backbone.lora_parameters().keys() == before.keys()
    with pytest.raises(ValueError, match="already has LoRA"):
        backbone.add_lora(LoraSettings(rank=8))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(rank=0), "rank must be >= 1, got 0"), (dict(alpha=0.0), "alpha must be > 0"),
     (dict(target_modules=()), "target_modules is empty")],
)
def test_lora_settings_validate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraSettings(**kwargs)


def test_prompt_encoding_with_and_without_negative_prompt(backbone):
    with_neg = backbone.encode_prompts(["a cat", "a dog"], negative=True)
    without = backbone.encode_prompts(["a cat", "a dog"], negative=False)
    assert without.uncond is None
    assert with_neg.cond.shape == (2, backbone.tokenizer.model_max_length, 32)
    torch.testing.assert_close(with_neg.cond, without.cond)
    # The negative prompt is the empty prompt, identical for every sample and unlike the prompts.
    empty = backbone.encode_prompts([""], negative=False).cond
    torch.testing.assert_close(with_neg.uncond, empty.expand(2, -1, -1))
    assert not torch.allclose(with_neg.cond[0], with_neg.cond[1])
    with pytest.raises(TypeError, match="sequence of prompts"):
        backbone.encode_prompts("a cat")


def test_decode_gives_images_in_unit_range_and_is_differentiable(backbone):
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    images = backbone.decode(latents)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    # Same as the diffusers pipeline's own post-processing of a VAE decode.
    with torch.no_grad():
        ref = backbone.vae.decode(latents / backbone.vae.config.scaling_factor).sample
    torch.testing.assert_close(images.detach(), (ref / 2 + 0.5).clamp(0, 1))


def test_lora_export_import_round_trip_is_exact(backbone, tiny_pipeline_dir, tmp_path):
    perturb_lora_(backbone.unet, seed=3)  # at initialisation LoRA B is 0 and a round trip proves nothing
    base = DiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    assert not torch.allclose(unet_out(backbone), unet_out(base))

    path = backbone.export_lora(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()

    fresh = DiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    fresh.add_lora(LoraSettings(rank=4, alpha=8.0))
    fresh.load_lora(path.parent)
    assert torch.equal(unet_out(fresh), unet_out(backbone))
    for name, p in backbone.lora_parameters().items():
        assert torch.equal(p, fresh.lora_parameters()[name]), name

    # Loading the file itself works too, and a mismatched adapter is refused with a clear message.
    other = DiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    other.add_lora(LoraSettings(rank=4, alpha=4.0))
    with pytest.raises(ValueError, match="rank 4, alpha 8"):
        other.load_lora(path)


def test_exported_lora_loads_in_a_plain_diffusers_pipeline(backbone, tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    perturb_lora_(backbone.unet, seed=4)
    backbone.export_lora(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True, safety_checker=None)
    before = unet_out(DiffusionBackbone(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler))
    pipe.load_lora_weights(tmp_path, adapter_name="rlr")
    # alpha != rank: diffusers must apply the same alpha / rank scale, read from the file's metadata.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 8, 8, generator=gen)
        context = backbone.encode_prompts(["a cat", "a dog"], negative=False).cond
        theirs = pipe.unet(x, torch.tensor([901, 21]), encoder_hidden_states=context).sample
    torch.testing.assert_close(theirs, unet_out(backbone), rtol=0, atol=1e-6)
    assert not torch.allclose(theirs, before)


def test_load_lora_errors(backbone, tmp_path, tiny_pipeline_dir):
    with pytest.raises(FileNotFoundError, match="LoRA weights not found"):
        backbone.load_lora(tmp_path / "nope")
    bare = DiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    with pytest.raises(RuntimeError, match="add_lora"):
        bare.export_lora(tmp_path)


def test_missing_local_directory_names_it(tmp_path):
    missing = tmp_path / "models" / "sd15"
    with pytest.raises(FileNotFoundError, match="model directory .*sd15 does not exist"):
        DiffusionBackbone.from_pretrained(missing)


def test_incomplete_local_directory_names_missing_components(tiny_pipeline_dir, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(tiny_pipeline_dir, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(FileNotFoundError, match="missing vae/"):
        resolve_pretrained(partial)


def test_hub_id_unavailable_offline_says_what_to_download(tmp_path):
    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(ModelNotAvailableError) as info:
        DiffusionBackbone.from_pretrained(repo, cache_dir=tmp_path, local_files_only=True)
    message = str(info.value)
    assert repo in message and "hf download" in message and "HF_HUB_OFFLINE" in message


def test_local_path_goes_through_from_pretrained_offline(tiny_pipeline_dir, monkeypatch):
    """The tiny model takes the same loading path as real ones: each component's from_pretrained."""
    from diffusers import UNet2DConditionModel

    calls = []
    real = UNet2DConditionModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(spy))
    DiffusionBackbone.from_pretrained(tiny_pipeline_dir)  # local_files_only follows HF_HUB_OFFLINE=1
    assert calls and calls[0]["subfolder"] == "unet" and calls[0]["local_files_only"] is True
