"""Loading, freezing, LoRA, prompt encoding, decoding, LoRA export/import and the loader's errors."""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from rlr_lightning.hub import ModelNotAvailableError, resolve_pretrained
from rlr_lightning.models import LoraSettings, StableDiffusionBackbone, load_backbone, read_lora_settings
from tests.conftest import perturb_lora_

#: The default attention-only targets, and a wide set that adds conv and linear non-attention layers (their
#: peft and diffusers key names differ from attention's).
TARGET_SETS = {
    "attention": LoraSettings().target_modules,
    "wide": ("to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv_out", "time_emb_proj"),
}


@pytest.fixture
def backbone(tiny_pipeline_dir):
    bb = StableDiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    bb.add_lora(LoraSettings(rank=4, alpha=8.0))
    return bb


def pipeline_backbone(pipe) -> StableDiffusionBackbone:
    """Our backbone around a diffusers pipeline's own components."""
    return StableDiffusionBackbone(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
    )


def unet_out(bb: StableDiffusionBackbone, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = bb.encode_prompts(["a cat", "a dog"], negative=False).cond
    with torch.no_grad():
        return bb.unet(x, torch.tensor([901, 21]), encoder_hidden_states=context).sample


def trained_backbone(tiny_pipeline_dir, settings: LoraSettings, seed: int = 5) -> StableDiffusionBackbone:
    """A backbone whose LoRA weights are moved off their initialisation (where B = 0 proves nothing)."""
    bb = StableDiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    bb.add_lora(settings)
    perturb_lora_(bb.unet, seed=seed)
    return bb


def lora_layers(unet, adapter: str | None = None) -> set[str]:
    """The UNet layers that carry a LoRA adapter (the one named ``adapter``, or any)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name
        for name, m in unet.named_modules()
        if isinstance(m, BaseTunerLayer) and (adapter in m.lora_A if adapter else len(m.lora_A) > 0)
    }


@contextmanager
def library_warnings():
    """Collect what diffusers, peft and transformers warn about: Python warnings and WARNING log records."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    # diffusers' and transformers' loggers do not propagate to the root logger, so caplog misses them.
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft", "transformers")]
    for lib_logger in loggers:
        lib_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        for lib_logger in loggers:
            lib_logger.removeHandler(handler)


def test_loaded_backbone_is_frozen_eval_with_fp32_lora_only(tiny_pipeline_dir):
    bb = StableDiffusionBackbone.from_pretrained(
        tiny_pipeline_dir, dtype=torch.bfloat16, local_files_only=True
    )
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
    [
        (dict(rank=0), "rank must be >= 1, got 0"),
        (dict(alpha=0.0), "alpha must be > 0"),
        (dict(target_modules=()), "target_modules is empty"),
    ],
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
    base = StableDiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    assert not torch.allclose(unet_out(backbone), unet_out(base))

    path = backbone.export_lora(tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()

    fresh = StableDiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    fresh.add_lora(LoraSettings(rank=4, alpha=8.0))
    fresh.load_lora(path.parent)
    assert torch.equal(unet_out(fresh), unet_out(backbone))
    for name, p in backbone.lora_parameters().items():
        assert torch.equal(p, fresh.lora_parameters()[name]), name

    # Loading the file itself works too, and a mismatched adapter is refused with a clear message.
    other = StableDiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    other.add_lora(LoraSettings(rank=4, alpha=4.0))
    with pytest.raises(ValueError, match="rank 4, alpha 8"):
        other.load_lora(path)


@pytest.mark.parametrize("targets", TARGET_SETS.values(), ids=TARGET_SETS.keys())
def test_exported_lora_loads_completely_in_a_plain_diffusers_pipeline(targets, tiny_pipeline_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    # alpha != rank: diffusers must apply the same alpha / rank scale, read from the file's metadata.
    ours = trained_backbone(tiny_pipeline_dir, LoraSettings(rank=4, alpha=8.0, target_modules=targets))
    adapted = lora_layers(ours.unet)
    assert all(
        any(n == t or n.endswith(f".{t}") for n in adapted) for t in targets
    )  # every target type adapted
    ours.export_lora(tmp_path)

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_pipeline_dir, local_files_only=True, safety_checker=None
    )
    before = unet_out(pipeline_backbone(pipe))
    with library_warnings() as messages:
        pipe.load_lora_weights(tmp_path, adapter_name="rlr")
    # diffusers says the file has no text-encoder LoRA (as for any UNet-only LoRA); nothing else may be said,
    # in particular nothing about unexpected, missing or dropped keys.
    assert [m for m in messages if "No LoRA keys associated to CLIPTextModel" not in m] == []
    assert lora_layers(pipe.unet, adapter="rlr") == adapted  # no adapter dropped, none added
    theirs = unet_out(pipeline_backbone(pipe))
    torch.testing.assert_close(theirs, unet_out(ours), rtol=0, atol=1e-5)
    assert not torch.allclose(theirs, before, rtol=0, atol=1e-3)


@pytest.mark.parametrize("targets", TARGET_SETS.values(), ids=TARGET_SETS.keys())
def test_load_lora_rebuilds_the_adapter_from_the_file(targets, tiny_pipeline_dir, tmp_path):
    settings = LoraSettings(rank=2, alpha=3.0, target_modules=targets)
    ours = trained_backbone(tiny_pipeline_dir, settings)
    path = ours.export_lora(tmp_path)
    read = read_lora_settings(path)
    assert (read.rank, read.alpha, set(read.target_modules)) == (2, 3.0, set(targets))

    bare = StableDiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    loaded = bare.load_lora(tmp_path)
    assert loaded is bare.lora_settings and (loaded.rank, loaded.alpha) == (2, 3.0)
    assert lora_layers(bare.unet) == lora_layers(ours.unet)
    assert set(bare.lora_parameters()) == set(ours.lora_parameters())
    assert torch.equal(unet_out(bare), unet_out(ours))


def test_third_party_lora_without_metadata_takes_rank_from_shapes_and_alpha_from_the_caller(
    tiny_pipeline_dir, tmp_path
):
    """What diffusers' LoRA training script writes: ``lora.down`` / ``lora.up`` names, no adapter config."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    ours = trained_backbone(tiny_pipeline_dir, LoraSettings(rank=2, alpha=2.0))
    weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(ours.unet))
    assert any(".lora.down." in k for k in weights)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=weights, safe_serialization=True)

    settings = read_lora_settings(tmp_path)
    assert (settings.rank, settings.alpha) == (2, 2.0)  # alpha defaults to the rank: scale 1, as in diffusers
    assert set(settings.target_modules) == lora_layers(ours.unet)
    bare = StableDiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    bare.load_lora(tmp_path)
    assert torch.equal(unet_out(bare), unet_out(ours))

    # A caller who knows the file's alpha gives it; the scale alpha / rank changes the output.
    scaled = StableDiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    assert scaled.load_lora(tmp_path, alpha=4.0).alpha == 4.0
    assert not torch.allclose(unet_out(scaled), unet_out(ours))


def export_lora_of_another_model(tiny_pipeline_dir, directory) -> Path:
    """A LoRA trained on another model: a UNet whose cross-attention reads 16-wide text features, not 32."""
    from diffusers import UNet2DConditionModel

    bb = StableDiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    other = UNet2DConditionModel.from_config({**bb.unet.config, "cross_attention_dim": 16})
    other = StableDiffusionBackbone(
        unet=other, vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, scheduler=bb.scheduler
    )
    other.add_lora(LoraSettings())
    return other.export_lora(directory)


def test_a_lora_of_another_model_is_refused_naming_the_file_and_the_shapes(tiny_pipeline_dir, tmp_path):
    path = export_lora_of_another_model(tiny_pipeline_dir, tmp_path / "other")
    bare = StableDiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    with pytest.raises(ValueError) as info:
        bare.load_lora(path)
    message = str(info.value)
    assert str(path) in message
    assert re.search(
        r"attn2\.to_[kv]\.lora_A\.weight is \(4, 16\) in the file but \(4, 32\) in this unet", message
    )
    # Nothing changed: no adapter layers are left behind, and a fitting file still loads.
    assert bare.lora_settings is None and not lora_layers(bare.unet)
    ours = trained_backbone(tiny_pipeline_dir, LoraSettings(rank=2, alpha=3.0))
    bare.load_lora(ours.export_lora(tmp_path / "ours"))
    assert torch.equal(unet_out(bare), unet_out(ours))


def test_a_given_alpha_must_agree_with_the_one_the_file_records(tiny_pipeline_dir, tmp_path):
    path = trained_backbone(tiny_pipeline_dir, LoraSettings(rank=2, alpha=3.0)).export_lora(tmp_path)
    assert read_lora_settings(path, alpha=3.0).alpha == 3.0
    with pytest.raises(ValueError, match="records LoRA alpha 3, but alpha 5 was given"):
        read_lora_settings(path, alpha=5.0)


def test_long_prompts_warn_once_naming_the_token_limit(backbone, caplog):
    long_prompt = "a very long prompt about a cat " * 10
    with caplog.at_level("WARNING", logger="rlr_lightning"):
        backbone.encode_prompts(["a cat", "a dog"])
        assert not caplog.records  # prompts that fit say nothing
        embeds = backbone.encode_prompts(["a cat", long_prompt])
        backbone.encode_prompts(["a very long prompt about a dog"])  # cut too, but said once is enough
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert caplog.records[0].levelname == "WARNING"
    assert f"at most {backbone.tokenizer.model_max_length} tokens" in message
    assert "'a very long prompt about a cat a very long" in message and len(message) < 250  # shortened
    # The prompt really is cut: only its first tokens reach the text encoder.
    cut = backbone.encode_prompts([long_prompt[:60]], negative=False).cond
    torch.testing.assert_close(embeds.cond[1], cut[0])


def test_load_lora_errors(backbone, tmp_path, tiny_pipeline_dir):
    with pytest.raises(FileNotFoundError, match="LoRA weights not found"):
        backbone.load_lora(tmp_path / "nope")
    bare = StableDiffusionBackbone.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    with pytest.raises(RuntimeError, match="add_lora"):
        bare.export_lora(tmp_path)


def test_missing_local_directory_names_it(tmp_path):
    missing = tmp_path / "models" / "sd15"
    with pytest.raises(FileNotFoundError, match="model directory .*sd15 does not exist"):
        StableDiffusionBackbone.from_pretrained(missing)


def test_incomplete_local_directory_names_missing_components(tiny_pipeline_dir, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(tiny_pipeline_dir, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(FileNotFoundError, match="missing vae/"):
        resolve_pretrained(partial, StableDiffusionBackbone.components())


def test_hub_id_unavailable_offline_says_what_to_download(tmp_path):
    repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(ModelNotAvailableError) as info:
        StableDiffusionBackbone.from_pretrained(repo, cache_dir=tmp_path, local_files_only=True)
    message = str(info.value)
    assert repo in message and "hf download" in message and "HF_HUB_OFFLINE" in message
    # Picking the family reads the pipeline's model_index.json first: the same error, before any component.
    with pytest.raises(ModelNotAvailableError) as info:
        load_backbone(repo, cache_dir=tmp_path, local_files_only=True)
    assert repo in str(info.value) and "hf download" in str(info.value)


def test_local_path_goes_through_from_pretrained_offline(tiny_pipeline_dir, monkeypatch):
    """The tiny model takes the same loading path as real ones: each component's from_pretrained."""
    from diffusers import UNet2DConditionModel

    calls = []
    real = UNet2DConditionModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(spy))
    StableDiffusionBackbone.from_pretrained(tiny_pipeline_dir)  # local_files_only follows HF_HUB_OFFLINE=1
    assert calls and calls[0]["subfolder"] == "unet" and calls[0]["local_files_only"] is True
