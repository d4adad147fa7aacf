"""Tiny, offline models of every supported family for tests, docs, benchmarks and the CPU quickstart.

Nothing here touches the network: every component (UNet or transformer, VAE, CLIP and T5 text encoders,
character-level CLIP and T5 tokenizers and the scheduler) is built in code from a fixed seed and saved as an
ordinary diffusers pipeline directory (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline`` or ``WanPipeline``). Everything downstream loads that
directory through the same ``from_pretrained(..., local_files_only=True)`` path that real models take, so the
loading code is tested for real.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from rlr_lightning.paths import cache_dir as cache_dir_default

logger = logging.getLogger(__name__)

#: Bump when the recipe below changes, so cached copies are rebuilt instead of silently reused.
TINY_PIPELINE_VERSION = 1

#: Written into every directory this module builds: what marks a tiny model (and its recipe version).
TINY_PIPELINE_MARKER = "rlr_tiny_pipeline.json"


def byte_vocab() -> dict[str, int]:
    """CLIP's special tokens (``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1) then the 256 byte characters and the
    same characters with the end-of-word marker ``</w>``: any text tokenizes, character by character."""
    from open_clip.tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    return vocab


def clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], model_max_length: int):
    """A ``CLIPTokenizer`` built in memory from a vocabulary and merges, with CLIP's special tokens (the end token
    pads, as in CLIP)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=cast(Any, list(merges)),  # BPE takes (a, b) pairs; transformers annotates str | list[str]
        model_max_length=model_max_length,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def tiny_clip_tokenizer(model_max_length: int = 16):
    """A character-level CLIP tokenizer built in memory (514 tokens, no merges, no download): :func:`byte_vocab`."""
    return clip_tokenizer(byte_vocab(), [], model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 32):
    """A character-level T5 tokenizer built in memory (no download): a ``tokenizers`` Unigram model over the printable
    ASCII characters, each alone and with SentencePiece's word-start marker, with T5's special tokens (``<pad>`` = 0,
    ``</s>`` = 1 appended to every sequence, ``<unk>`` = 2). ``save_pretrained`` writes a ``tokenizer.json`` that
    ``T5TokenizerFast.from_pretrained`` reads back, as for the real SD 3 and FLUX tokenizers."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast  # type: ignore[attr-defined]  # resolved lazily (transformers 5)

    chars = string.ascii_letters + string.digits + string.punctuation
    # Unigram scores: a word-start piece beats the bare marker followed by the bare character.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -2.5) for c in chars]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


def _tiny_vae(
    sample_size: int, scaling_factor: float = 0.18215, flow: bool = False, shift_factor: float | None = None
):
    """A two-level ``AutoencoderKL``: images twice the latent size.

    Args:
        sample_size: Latent height and width (the VAE's ``sample_size`` is the image's, twice that).
        scaling_factor: The family's latent scale.
        flow: The flow-matching families' VAE (SD 3, FLUX): 16 latent channels, no quant convolutions.
        shift_factor: Their latent shift.
    """
    from diffusers import AutoencoderKL

    extra = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift_factor) if flow else {}
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=16 if flow else 4,
        sample_size=2 * sample_size,
        scaling_factor=scaling_factor,
        **extra,
    )


def build_tiny_components(seed: int = 0, sample_size: int = 8) -> dict:
    """Build the tiny components (about 1.3 M parameters in all) with deterministic random weights.

    Args:
        seed: Seed of the weight initialisation; the same seed gives bit-identical weights.
        sample_size: Latent height and width. The VAE doubles it, so 8 gives 16 x 16 images.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    vae = _tiny_vae(sample_size)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=514,
            max_position_embeddings=77,
        )
    )
    # The scheduler settings of Stable Diffusion 1.x.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(
        unet=unet.eval(),  # type: ignore[attr-defined]  # mypy sees diffusers' dummy objects
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tiny_clip_tokenizer(),
        scheduler=scheduler,
    )


def build_tiny_sdxl_components(seed: int = 0, sample_size: int = 8) -> dict:
    """Build a tiny SDXL (about 1.5 M parameters in all): two CLIP text encoders, the second with a projection,
    and a UNet with SDXL's ``text_time`` added conditioning (pooled text embedding + 6 time ids).

    Args:
        seed: Seed of the weight initialisation; the same seed gives bit-identical weights.
        sample_size: Latent height and width. The VAE doubles it, so 8 gives 16 x 16 images.
    """
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_width, projection, time_width = 32, 32, 8
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        # The two encoders' sequences side by side, as in SDXL (768 + 1280 there).
        cross_attention_dim=2 * text_width,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_width,
        projection_class_embeddings_input_dim=6 * time_width + projection,
        transformer_layers_per_block=(1, 1),
        norm_num_groups=32,
    )
    vae = _tiny_vae(sample_size, scaling_factor=0.13025)  # SDXL's latent scale

    def text_config(**extra) -> CLIPTextConfig:
        return CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=text_width,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=514,
            max_position_embeddings=77,
            hidden_act="gelu",
            **extra,
        )

    # SDXL base ships an Euler scheduler whose config also carries the DDIM keys of the SD training schedule
    # (clip_sample, set_alpha_to_one); the sampler reads it as DDIM.
    scheduler = EulerDiscreteScheduler.from_config(
        dict(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
            clip_sample=False,
            set_alpha_to_one=False,
            skip_prk_steps=True,
            sample_max_value=1.0,
        )
    )
    return dict(
        unet=unet.eval(),  # type: ignore[attr-defined]  # mypy sees diffusers' dummy objects
        vae=vae.eval(),
        text_encoder=CLIPTextModel(text_config()).eval(),
        text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=projection)).eval(),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        scheduler=scheduler,
    )


def build_tiny_sd3_components(seed: int = 0, sample_size: int = 8) -> dict:
    """Build a tiny Stable Diffusion 3.5 (about 0.9 M parameters in all): an ``SD3Transformer2DModel`` with SD 3.5's
    dual attention and RMS query/key norm, a 16-channel VAE with SD 3's latent scale and shift, two CLIP text
    encoders with projections (CLIP-L and CLIP-G in SD 3, of different widths here too), a T5 encoder, and the
    flow-matching Euler scheduler with SD 3's shift 3.

    Args:
        seed: Seed of the weight initialisation; the same seed gives bit-identical weights.
        sample_size: Latent height and width (even: the transformer embeds 2 x 2 patches). The VAE doubles it,
            so 8 gives 16 x 16 images.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_widths, t5_width = (32, 48), 96
    tokenizer_3 = tiny_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        # The T5 sequence's width; the CLIP sequences are zero-padded to it (4096 in SD 3).
        joint_attention_dim=t5_width,
        caption_projection_dim=32,
        # Both CLIP projections side by side (768 + 1280 in SD 3).
        pooled_projection_dim=sum(clip_widths),
        # Position embeddings for up to this many patches a side: latents up to 4x the default side (SD 3 has 96
        # for its default 64).
        pos_embed_max_size=2 * sample_size,
        # SD 3.5 medium's extra attention over the image tokens (layers 0-12 there) and its RMS query/key norm.
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    # SD 3's VAE: 16 latent channels, its latent scale and shift, no quant convolutions.
    vae = _tiny_vae(sample_size, scaling_factor=1.5305, flow=True, shift_factor=0.0609)

    def clip(width: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                hidden_size=width,
                intermediate_size=37,
                layer_norm_eps=1e-05,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=514,
                max_position_embeddings=77,
                hidden_act="gelu",
                projection_dim=width,
            )
        ).eval()

    text_encoder, text_encoder_2 = clip(clip_widths[0]), clip(clip_widths[1])
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=t5_width,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,  # type: ignore[call-arg]  # a config key T5Config's signature omits
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    return dict(
        transformer=transformer.eval(),  # type: ignore[attr-defined]  # mypy sees diffusers' dummy objects
        vae=vae.eval(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        text_encoder_3=text_encoder_3,
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(),
        tokenizer_3=tokenizer_3,
        # SD 3 / 3.5's scheduler: rectified-flow Euler with its time shift 3.
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )


def flux1_dev_scheduler():
    """FLUX.1-dev's scheduler: flow-matching timesteps shifted by the image's token count
    (``use_dynamic_shifting``), as its ``scheduler_config.json`` sets them."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_tiny_flux_components(seed: int = 0, image_size: int = 16, guidance_embeds: bool = True) -> dict:
    """Build a tiny FLUX.1 (about 0.8 M parameters in all, most of them the VAE): a ``FluxTransformer2DModel`` with
    one double-stream and one single-stream block over 2x2-packed 16-channel latents, a 16-channel VAE with
    FLUX.1's scaling and shift factors, CLIP for the pooled embedding, T5 for the token sequence, and
    FLUX.1-dev's resolution-shifted flow-matching scheduler.

    Args:
        seed: Seed of the weight initialisation; the same seed gives bit-identical weights.
        image_size: Image height and width in pixels (the VAE's ``sample_size``, the model's default resolution);
            latents are half of it and must be even, so a multiple of 4.
        guidance_embeds: A guidance-distilled transformer with a guidance embedding (FLUX.1-dev); ``False`` is
            FLUX.1-schnell's kind.
    """
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    text_width, latent_channels = 32, 16
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # 2x2 patches of the latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_width,
        pooled_projection_dim=text_width,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(
            4,
            6,
            6,
        ),  # rotary dimensions of (text index, row, column); they add up to the head width
    )
    # FLUX.1's latent scale and shift.
    vae = _tiny_vae(image_size // 2, scaling_factor=0.3611, flow=True, shift_factor=0.1159)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=text_width,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=514,
            max_position_embeddings=77,
        )
    )
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=text_width,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,  # type: ignore[call-arg]  # a config key T5Config's signature omits
        )
    )
    scheduler = flux1_dev_scheduler()
    return dict(
        transformer=transformer.eval(),  # type: ignore[attr-defined]  # mypy sees diffusers' dummy objects
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
    )


def build_tiny_wan_components(seed: int = 0) -> dict:
    """Build a tiny Wan 2.1 (about 60 k parameters in all): a ``WanTransformer3DModel`` with two blocks of self-
    and cross-attention over ``1 x 2 x 2`` patches, Wan's causal video VAE (``AutoencoderKLWan``: 4x in time and 8x
    in space, as the released one) at a few channels, a UMT5 text encoder with a character-level tokenizer, and
    the flow-matching Euler scheduler at Wan 2.1's 480p shift 3 (the released checkpoints ship UniPC at the same
    shift; ``WanBackbone`` samples at either's times). Its default videos are 9 frames of 32 x 32 pixels
    (:data:`TINY_WAN_SIZE`).

    Args:
        seed: Seed of the weight initialisation; the same seed gives bit-identical weights.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_width = 32
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=text_width,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        # Divisible into Wan's three rotary parts (time, height, width).
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=text_width,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    # Four levels with the released VAE's temporal downsampling: 8x in space, 4x in time.
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    return dict(
        transformer=transformer.eval(),  # type: ignore[attr-defined]  # mypy sees diffusers' dummy objects
        vae=vae.eval(),  # type: ignore[attr-defined]
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )


#: Default video size of tiny-wan: ``(height, width)`` in pixels and frames.
TINY_WAN_SIZE = ((32, 32), 9)


#: The tiny model families: how each is built and which diffusers pipeline saves it.
TINY_FAMILIES: dict[str, tuple[Callable[..., dict], str, str]] = {
    "sd": (build_tiny_components, "StableDiffusionPipeline", "Stable Diffusion"),
    "sdxl": (build_tiny_sdxl_components, "StableDiffusionXLPipeline", "Stable Diffusion XL"),
    "sd3": (build_tiny_sd3_components, "StableDiffusion3Pipeline", "Stable Diffusion 3"),
    "flux": (build_tiny_flux_components, "FluxPipeline", "FLUX.1"),
    "wan": (build_tiny_wan_components, "WanPipeline", "Wan 2.1"),
}


#: Model names (``model.pretrained_model_name_or_path``, ``rlr sample --model``) of the tiny pipelines, by family.
TINY_MODELS = {"tiny": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux", "tiny-wan": "wan"}


def save_tiny_pipeline(path: str | os.PathLike, seed: int = 0, family: str = "sd") -> Path:
    """Build a tiny pipeline and save it as a normal diffusers pipeline directory at ``path``.

    Args:
        path: Target directory.
        seed: Weight seed.
        family: ``sd`` (Stable Diffusion 1.x-shaped), ``sdxl``, ``sd3``, ``flux`` or ``wan`` (:data:`TINY_FAMILIES`).
    """
    import diffusers

    if family not in TINY_FAMILIES:
        raise ValueError(f"tiny model family must be one of {sorted(TINY_FAMILIES)}, got {family!r}")
    build, pipeline_name, _ = TINY_FAMILIES[family]
    path = Path(path)
    extra = (
        dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if family == "sd"
        else {}
    )
    pipe = getattr(diffusers, pipeline_name)(**build(seed=seed), **extra)
    pipe.save_pretrained(path, safe_serialization=True)
    if family == "wan":
        from rlr_lightning.paths import write_video_defaults

        write_video_defaults(path, *TINY_WAN_SIZE)
    marker = {"version": TINY_PIPELINE_VERSION, "seed": seed, "family": family}
    (path / TINY_PIPELINE_MARKER).write_text(json.dumps(marker))
    return path


def ensure_tiny_pipeline(
    cache_dir: str | os.PathLike | None = None, seed: int = 0, family: str = "sd"
) -> Path:
    """Return the directory of a tiny pipeline, building it there first if it is missing or stale.

    This is what the CPU quickstart uses, so a fresh clone needs no download at all.

    Args:
        cache_dir: Parent directory of the cached model; defaults to ``$RLR_CACHE`` or
            ``~/.cache/rlr_lightning``.
        seed: Weight seed of the tiny model.
        family: ``sd``, ``sdxl``, ``sd3``, ``flux`` or ``wan``.
    """
    if family not in TINY_FAMILIES:
        raise ValueError(f"tiny model family must be one of {sorted(TINY_FAMILIES)}, got {family!r}")
    root = Path(cache_dir) if cache_dir is not None else cache_dir_default()
    path = root / f"tiny-{family}-v{TINY_PIPELINE_VERSION}-seed{seed}"
    marker = path / TINY_PIPELINE_MARKER

    def built() -> bool:
        return marker.is_file() and json.loads(marker.read_text()).get("version") == TINY_PIPELINE_VERSION

    if built():
        return path
    import shutil

    logger.info(
        "Building the tiny offline %s pipeline in %s (first use only)", TINY_FAMILIES[family][2], path
    )
    # Build into a temporary sibling and rename, so an interrupted build never leaves a half-written model
    # that a later run would trust.
    tmp = root / f".{path.name}.tmp-{os.getpid()}"
    save_tiny_pipeline(tmp, seed=seed, family=family)
    if path.exists() and not built():
        shutil.rmtree(path, ignore_errors=True)  # stale (another version) or half-deleted
    try:
        tmp.rename(path)
    except OSError:
        # Another process (a parallel test worker, a second run) finished the same build first: keep theirs,
        # which a reader may already have open.
        shutil.rmtree(tmp, ignore_errors=True)
        if not built():
            raise
    return path


def is_tiny_model(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a tiny offline model: ``tiny``, or a directory :func:`build_tiny_pipeline`
    built (its marker file)."""
    return name_or_path in TINY_MODELS or (Path(name_or_path) / TINY_PIPELINE_MARKER).is_file()


def tiny_family(name_or_path: str) -> str | None:
    """The family code (``sd``, ``wan``, ...) of a tiny model's name or directory; ``None`` for other models."""
    if name_or_path in TINY_MODELS:
        return TINY_MODELS[name_or_path]
    marker = Path(name_or_path) / TINY_PIPELINE_MARKER
    return json.loads(marker.read_text()).get("family") if marker.is_file() else None
