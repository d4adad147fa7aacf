"""Train a small Wan-shaped text-to-video pipeline on the moving-shapes world, on a CPU, and save it as a diffusers
``WanPipeline`` directory (the built-in ``moving-shapes`` model).

Every component is the class a Wan 2.1 checkpoint uses, so everything downstream (loading, LoRA, the flow SDE
sampler, export to ``WanPipeline``) takes the same code path as the real model:

* ``tokenizer``: the shapes world's whole-word tokenizer (:func:`rlr_lightning.world.train.build_tokenizer`) over
  the motion captions' words, loaded back with ``AutoTokenizer`` as Wan's UMT5 tokenizer is;
* ``text_encoder``: a small ``UMT5EncoderModel``, trained with the transformer on the flow-matching loss (there is
  no pretrained text encoder to freeze);
* ``vae``: a small ``AutoencoderKLWan`` (the causal 3D video VAE), 4x in space and, by default, not in time (the
  released one is 8x and 4x: at 32 px that would leave 4 x 4 latents; with its causal 2x temporal downsampling,
  ``vae_temporal_factor=2``, the later frames of an earlier recipe's reconstructions blurred further), trained
  first on reconstruction of whole clips with the shapes' pixels weighted up and the loss taken before the
  decoder's clamp (:func:`decode_unclamped`), its per-channel ``latents_mean`` / ``latents_std`` set from the
  data as Wan's are. What it keeps is measured: the exact checker on its reconstructions of held-out clips is
  written to the saved record (``reconstruction_checks``); a transformer on its latents cannot score higher.
  Each choice was measured that way (1,000 steps, held-out reconstructions): the first recipe (``base_dim`` 8,
  5-frame windows, the loss through the clamp) passed colour on 49%, its frames 5-8 drifting (red turned yellow)
  and its blue channel dead (pushed below -1 where the clamp passes no gradient: blue shapes vanished); whole
  clips stopped the drift (colour 78%, still no blue); the unclamped loss brought blue back, but ``base_dim`` 8
  blurred neighbouring shapes together (count 51%); ``base_dim`` 16 keeps colour at 100% (600 steps: 73%);
* ``transformer``: a ``WanTransformer3DModel`` (self-attention over ``1 x 2 x 2`` patches of all latent frames,
  cross-attention to the caption, 3D rotary positions), trained on rectified flow (velocity ``eps - x0``) at
  times drawn as the sampler visits them (uniform, shifted by the scheduler's shift), 10 % of captions dropped to
  the empty prompt so classifier-free guidance works;
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with that shift.

Run ``python -m rlr_lightning.world.video_train --out DIR`` (28 minutes alone on 2 CPU cores: 16 the autoencoder,
11 the transformer) or ``--smoke`` (seconds: the same code path at toy sizes, for tests). The weights this
builds ship with the package as ``moving-shapes`` (:mod:`rlr_lightning.builtin`): 5 MB, and rebuilding takes
longer than a quickstart should.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from rlr_lightning.world.motion import MotionWorldDataset, all_motion_specs, check_motion, motion_caption
from rlr_lightning.world.train import random_batches

logger = logging.getLogger(__name__)

#: Written into the saved pipeline: the recipe and what it was trained on.
VIDEO_WORLD_MARKER = "rlr_video_world_pipeline.json"


@dataclass(frozen=True)
class VideoTrainingRecipe:
    """Sizes and budgets of one training run.

    Attributes:
        image_size: Side of the frames in pixels.
        num_frames: Frames per clip: 9, 13 or 17 (the world's clip lengths; this VAE takes ``2k + 1``).
        num_examples: Training clips (each rendered once and reused).
        vae_steps: Optimizer steps of the autoencoder.
        vae_window: Frames of the windows the autoencoder trains on (``1 + 2k``).
        vae_batch_size: Windows per autoencoder step.
        transformer_steps: Optimizer steps of the transformer and text encoder.
        batch_size: Clips per transformer step.
        vae_lr: AdamW learning rate of the autoencoder.
        lr: AdamW learning rate of the transformer and text encoder (cosine decay after a 5 % warm-up).
        caption_dropout: Fraction of captions replaced by the empty prompt (for classifier-free guidance).
        vae_base_dim: ``base_dim`` of the autoencoder (its first level's channels).
        vae_temporal_factor: Frames per latent frame: 2 (Wan's causal temporal downsampling, once) or 1 (none).
        foreground_weight: Extra weight of the reconstruction error on pixels of a shape (not background): the
            shapes cover about 5 % of a frame, and without it the autoencoder settles on a black frame first.
        latent_channels: ``z_dim`` of the autoencoder: channels of the latents.
        text_width: Width of the text encoder (and the transformer's ``text_dim``).
        heads: Attention heads of the transformer.
        head_dim: Width of each head (a multiple of 6: Wan splits it into three rotary parts).
        layers: Transformer blocks.
        ffn_dim: Width of the blocks' feed-forward layers.
        shift: Time shift of the scheduler (and of the training times): more steps at high noise.
        seed: Seed of the weights, the data and the noise.
    """

    image_size: int = 32
    num_frames: int = 9
    num_examples: int = 4_000
    vae_steps: int = 1_000
    vae_window: int = 9
    vae_batch_size: int = 8
    transformer_steps: int = 2_500
    batch_size: int = 32
    vae_lr: float = 3e-3
    lr: float = 1e-3
    caption_dropout: float = 0.1
    vae_base_dim: int = 16
    vae_temporal_factor: int = 1
    foreground_weight: float = 10.0
    latent_channels: int = 8
    text_width: int = 64
    heads: int = 4
    head_dim: int = 24
    layers: int = 4
    ffn_dim: int = 192
    shift: float = 2.0
    seed: int = 0

    @classmethod
    def smoke(cls) -> VideoTrainingRecipe:
        """The same code path at toy sizes: seconds on a CPU, for tests (the samples are not meaningful)."""
        return cls(
            num_examples=16,
            vae_steps=2,
            vae_batch_size=4,
            vae_base_dim=8,
            transformer_steps=2,
            batch_size=4,
            text_width=32,
            heads=2,
            head_dim=12,
            layers=1,
            ffn_dim=32,
        )


def motion_words() -> list[str]:
    """Every word the moving-shapes captions use."""
    words: set[str] = set()
    for spec in all_motion_specs():
        words.update(motion_caption(spec).split())
    return sorted(words)


def build_components(recipe: VideoTrainingRecipe, tokenizer) -> dict:
    """Untrained components of the pipeline, seeded by the recipe."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if recipe.vae_temporal_factor not in (1, 2):
        raise ValueError(f"vae_temporal_factor must be 1 or 2, got {recipe.vae_temporal_factor}")
    if recipe.head_dim % 6:
        raise ValueError(f"head_dim must be a multiple of 6 (three rotary parts), got {recipe.head_dim}")
    torch.manual_seed(recipe.seed)
    z = recipe.latent_channels
    vae = AutoencoderKLWan(
        base_dim=recipe.vae_base_dim,
        z_dim=z,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, recipe.vae_temporal_factor == 2],
        latents_mean=[0.0] * z,
        latents_std=[1.0] * z,
        scale_factor_temporal=recipe.vae_temporal_factor,
        scale_factor_spatial=4,
    )
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=recipe.text_width,
            d_kv=recipe.text_width // 4,
            d_ff=2 * recipe.text_width,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=0,
        )
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=recipe.heads,
        attention_head_dim=recipe.head_dim,
        in_channels=z,
        out_channels=z,
        text_dim=recipe.text_width,
        freq_dim=64,
        ffn_dim=recipe.ffn_dim,
        num_layers=recipe.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=recipe.shift)
    return dict(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def render_training_set(recipe: VideoTrainingRecipe) -> tuple[Tensor, list[str]]:
    """All training clips ``(N, 3, F, H, W)`` in ``[-1, 1]`` (the VAE's layout) and their captions."""
    data = MotionWorldDataset(
        "train", recipe.num_examples, recipe.num_frames, recipe.image_size, seed=recipe.seed
    )
    items = [data[i] for i in range(len(data))]
    videos = torch.stack([item["video"] for item in items]).permute(0, 2, 1, 3, 4) * 2 - 1
    return videos.contiguous(), [item["prompt"] for item in items]


def train_vae(vae, videos: Tensor, recipe: VideoTrainingRecipe, generator: torch.Generator) -> None:
    """Reconstruction (L1 + MSE, shapes' pixels weighted up) plus a small KL on random windows, the learning
    rate decayed to zero on a cosine; then the latents' per-channel mean and standard deviation go into the
    VAE's config (``latents_mean``, ``latents_std``), as Wan's do."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    steps = recipe.vae_steps
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    frames, window = videos.shape[2], min(recipe.vae_window, videos.shape[2])
    for step, index in enumerate(
        random_batches(len(videos), recipe.vae_batch_size, recipe.vae_steps, generator)
    ):
        start = int(torch.randint(frames - window + 1, (1,), generator=generator))
        x = videos[index, :, start : start + window]
        posterior = vae.encode(x).latent_dist
        recon = decode_unclamped(vae, posterior.sample(generator=generator))
        # A shape's pixel: any channel above the black background (-1 in the VAE's range).
        weight = 1 + recipe.foreground_weight * (x > -0.9).any(dim=1, keepdim=True).float()
        error = (recon - x).abs() + (recon - x).pow(2)
        loss = (weight * error).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            logger.info("vae step %d: loss %.4f", step, loss.item())
    vae.eval()
    latents = encode_all(vae, videos[: min(len(videos), 512)])
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())


def decode_unclamped(vae, latents: Tensor) -> Tensor:
    """``vae.decode(latents)`` before its final clamp to [-1, 1]: the decoder's own outputs, frame by frame.

    The reconstruction loss is taken here because the clamp has no gradient outside [-1, 1]: on the black
    background (-1) a colour channel that overshoots below -1 everywhere gets no gradient back and stays dead
    (trained through the clamp, the autoencoder never again drew blue, and blue shapes vanished)."""
    frames: list[Tensor] = []
    hook = vae.decoder.register_forward_hook(lambda module, args, output: frames.append(output))
    try:
        vae.decode(latents)
    finally:
        hook.remove()
    return torch.cat(frames, dim=2)


@torch.no_grad()
def reconstruction_checks(vae, recipe: VideoTrainingRecipe, num_clips: int = 96) -> dict[str, float]:
    """The exact checker's accuracies on the autoencoder's reconstructions of held-out clips: the most a
    transformer on these latents can score (renders pass every check)."""
    data = MotionWorldDataset(
        "held_out", num_clips, recipe.num_frames, recipe.image_size, seed=recipe.seed + 1
    )
    items = [data[i] for i in range(num_clips)]
    videos = torch.stack([item["video"] for item in items]).permute(0, 2, 1, 3, 4) * 2 - 1
    latents = encode_all(vae, videos)
    recon = torch.cat([vae.decode(latents[i : i + 32]).sample for i in range(0, num_clips, 32)])
    result = check_motion((recon.permute(0, 2, 1, 3, 4) + 1) / 2, [item["prompt"] for item in items])
    return {name: round(float(ok.float().mean()), 4) for name, ok in result.items()}


@torch.no_grad()
def encode_all(vae, videos: Tensor, batch_size: int = 64) -> Tensor:
    """The posterior means of ``videos``, un-normalised."""
    return torch.cat(
        [vae.encode(videos[i : i + batch_size]).latent_dist.mean for i in range(0, len(videos), batch_size)]
    )


def train_transformer(
    components: dict,
    videos: Tensor,
    captions: list[str],
    recipe: VideoTrainingRecipe,
    generator: torch.Generator,
) -> None:
    """Rectified flow on the VAE's normalised latents, text encoder trained jointly, captions dropped at random."""
    vae, transformer, text_encoder, tokenizer = (
        components[k] for k in ("vae", "transformer", "text_encoder", "tokenizer")
    )
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)
    latents = (encode_all(vae, videos) - mean) / std
    tokens = tokenizer(
        captions + [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    ids, masks = tokens.input_ids, tokens.attention_mask
    transformer.train()
    text_encoder.train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-4)
    steps = recipe.transformer_steps
    warmup = max(1, steps // 20)
    lr_at = lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    for step, index in enumerate(random_batches(len(latents), recipe.batch_size, steps, generator)):
        x0 = latents[index]
        drop = torch.rand(len(index), generator=generator) < recipe.caption_dropout
        rows = torch.where(drop, len(captions), index)  # the empty prompt's row
        # As the pipeline encodes prompts: the last hidden states, zeroed past each prompt's tokens.
        mask = masks[rows]
        context = text_encoder(ids[rows], mask).last_hidden_state * mask.unsqueeze(-1)
        u = torch.rand(len(index), generator=generator)
        t = recipe.shift * u / (1 + (recipe.shift - 1) * u)
        noise = torch.randn(x0.shape, generator=generator)
        tt = t.view(-1, 1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * noise
        velocity = transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=context).sample
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            logger.info("transformer step %d: loss %.4f", step, loss.item())
    transformer.eval()
    text_encoder.eval()


def train_video_world_pipeline(out: str | Path, recipe: VideoTrainingRecipe = VideoTrainingRecipe()) -> Path:
    """Train every component on the moving-shapes world and save the pipeline at ``out``; returns ``out``."""
    from diffusers import WanPipeline

    from rlr_lightning.paths import write_video_defaults
    from rlr_lightning.world.train import build_tokenizer

    start = time.monotonic()
    generator = torch.Generator().manual_seed(recipe.seed)
    components = build_components(recipe, build_tokenizer(motion_words()))
    videos, captions = render_training_set(recipe)
    logger.info("rendered %d training clips in %.0f s", len(videos), time.monotonic() - start)
    train_vae(components["vae"], videos, recipe, generator)
    reconstruction = reconstruction_checks(components["vae"], recipe)
    logger.info(
        "autoencoder trained at %.0f s; the checker on its held-out reconstructions: %s",
        time.monotonic() - start,
        ", ".join(f"{name} {value:.1%}" for name, value in reconstruction.items()),
    )
    train_transformer(components, videos, captions, recipe, generator)
    logger.info("transformer and text encoder trained at %.0f s", time.monotonic() - start)
    out = Path(out)
    WanPipeline(**components).save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    write_video_defaults(out, (recipe.image_size, recipe.image_size), recipe.num_frames)
    record = {
        "recipe": asdict(recipe),
        "train_seconds": round(time.monotonic() - start, 1),
        "reconstruction_checks": reconstruction,
    }
    (out / VIDEO_WORLD_MARKER).write_text(json.dumps(record, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rlr_lightning.world.video_train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to save the pipeline in")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, seconds: checks the code path only")
    parser.add_argument("--transformer-steps", type=int, default=None, help="override the recipe's steps")
    parser.add_argument("--vae-steps", type=int, default=None, help="override the recipe's autoencoder steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    recipe = VideoTrainingRecipe.smoke() if args.smoke else VideoTrainingRecipe()
    overrides = {
        k: v
        for k, v in (("transformer_steps", args.transformer_steps), ("vae_steps", args.vae_steps))
        if v is not None
    }
    train_video_world_pipeline(args.out, replace(recipe, **overrides))


if __name__ == "__main__":
    main()
