"""Train a small Stable-Diffusion-shaped pipeline on the shapes world, on a CPU, and save it as a diffusers
``StableDiffusionPipeline`` directory.

Every component is the real class a Stable Diffusion checkpoint uses, so everything downstream (loading,
LoRA, sampling, export) takes the same code path as real models:

* ``tokenizer``: a ``CLIPTokenizer`` whose byte-pair merges make every word of the world's grammar one token
  (any other text still tokenizes, character by character);
* ``text_encoder``: a small ``CLIPTextModel``, trained with the UNet on the denoising loss (there is no
  pretrained text encoder to freeze);
* ``vae``: a small ``AutoencoderKL`` (32 px images to 4 x 8 x 8 latents), trained first on reconstruction, and
  its latent ``scaling_factor`` set from the data as Stable Diffusion's was;
* ``unet``: a ``UNet2DConditionModel`` with cross-attention on its coarse levels and the attention-pooled caption
  embedding added to its time embedding, epsilon prediction on Stable Diffusion's noise schedule with Min-SNR
  loss weighting, and 10 % of captions dropped (the empty prompt) so classifier-free guidance works;
* ``scheduler``: Stable Diffusion 1.x's ``DDIMScheduler`` config.

Run ``python -m rlr_lightning.world.train --out DIR`` (about 11 minutes alone on 2 CPU cores, ``docs/world.md``)
or ``--smoke`` (seconds: the same code path at toy sizes, for tests). The weights this builds ship with the
package as the ``shapes-world`` model (:mod:`rlr_lightning.builtin`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from rlr_lightning.world.scenes import COUNTS, KINDS, PALETTE, ShapesWorldDataset, all_specs, caption

logger = logging.getLogger(__name__)

#: Written into the saved pipeline: the recipe and what it was trained on.
WORLD_MARKER = "rlr_world_pipeline.json"


@dataclass(frozen=True)
class TrainingRecipe:
    """Sizes and budgets of one training run.

    Attributes:
        image_size: Side of the world's images in pixels.
        num_examples: Training examples drawn (each is rendered once and reused every epoch).
        vae_steps: Optimizer steps of the autoencoder.
        unet_steps: Optimizer steps of the UNet and text encoder.
        batch_size: Examples per UNet step.
        vae_batch_size: Examples per autoencoder step (reconstruction needs fewer than denoising; half the
            autoencoder's time at 32).
        vae_lr: AdamW learning rate of the autoencoder.
        unet_lr: AdamW learning rate of the UNet and text encoder.
        caption_dropout: Fraction of captions replaced by the empty prompt (for classifier-free guidance).
        vae_channels: ``block_out_channels`` of the autoencoder (three levels: 4 x 4 pixels per latent).
        unet_channels: ``block_out_channels`` of the UNet.
        attention_levels: How many of the UNet's levels, from the coarsest, have cross-attention to the caption
            (2 of 3: attention at the finest level too gave worse position accuracy, 28% against 45%).
        text_width: Width of the text encoder.
        pooled_text_embedding: Also add an attention-pooled caption embedding to the UNet's time embedding
            (diffusers' ``addition_embed_type="text"``), so every level, the finest included, sees the caption.
        snr_gamma: Min-SNR loss weighting (Hang et al., 2023, arXiv 2303.09556): each timestep's loss weighted
            by ``min(SNR, gamma) / SNR``, which stops the nearly clean timesteps from dominating training;
            ``None`` weights all timesteps equally.
        seed: Seed of the weights, the data and the noise.
    """

    image_size: int = 32
    num_examples: int = 6_000
    vae_steps: int = 800
    unet_steps: int = 3800
    batch_size: int = 32
    vae_batch_size: int = 16
    vae_lr: float = 2e-3
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    vae_channels: tuple[int, ...] = (16, 32, 32)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: int = 2
    text_width: int = 64
    pooled_text_embedding: bool = True
    snr_gamma: float | None = 5.0
    seed: int = 0

    @classmethod
    def smoke(cls) -> TrainingRecipe:
        """The same code path at toy sizes: seconds on a CPU, for tests (the samples are not meaningful)."""
        return cls(
            num_examples=32,
            vae_steps=2,
            unet_steps=2,
            batch_size=8,
            vae_batch_size=8,
            vae_channels=(8, 8, 8),
            unet_channels=(32, 32, 32),
            text_width=32,
        )


def world_words() -> list[str]:
    """Every word the world's captions use."""
    words: set[str] = set()
    for spec in all_specs():
        words.update(caption(spec).split())
    return sorted(words)


def build_tokenizer(words: list[str], model_max_length: int = 12):
    """A ``CLIPTokenizer`` in which each of ``words`` is one token.

    The vocabulary holds every byte character (alone and word-final), so any text tokenizes; merges join the
    characters of each world word into one token. Merges are added until every word comes out whole: a merge
    appended later never splits a word that already is one token, so the loop ends.
    """
    from rlr_lightning.tiny import byte_vocab, clip_tokenizer

    vocab = byte_vocab()
    merges: list[tuple[str, str]] = []
    tokenizer = clip_tokenizer(vocab, merges, model_max_length)
    for _ in range(10 * len(words)):
        pieces = {word: tokenizer.tokenize(word) for word in words}
        split = {word: p for word, p in pieces.items() if len(p) > 1}
        if not split:
            return tokenizer
        for p in split.values():
            left = p[0]
            for right in p[1:]:
                merged = left + right
                if (left, right) not in merges:
                    merges.append((left, right))
                vocab.setdefault(merged, len(vocab))
                left = merged
        tokenizer = clip_tokenizer(vocab, merges, model_max_length)
    raise RuntimeError("could not build whole-word merges for the world's vocabulary")


def build_components(recipe: TrainingRecipe, tokenizer) -> dict:
    """Untrained components of the pipeline, seeded by the recipe."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(recipe.seed)
    latent = recipe.image_size // 2 ** (len(recipe.vae_channels) - 1)
    vae = AutoencoderKL(
        block_out_channels=list(recipe.vae_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(recipe.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(recipe.vae_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=min(recipe.vae_channels),
        sample_size=recipe.image_size,
    )
    channels = recipe.unet_channels
    levels = recipe.attention_levels
    if not 0 <= levels <= len(channels):
        raise ValueError(f"attention_levels must be in [0, {len(channels)}], got {levels}")
    unet = UNet2DConditionModel(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) * (len(channels) - levels) + ("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels + ("UpBlock2D",) * (len(channels) - levels),
        cross_attention_dim=recipe.text_width,
        attention_head_dim=8,
        norm_num_groups=min(32, channels[0]),
        **(
            dict(addition_embed_type="text", addition_embed_type_num_heads=4)
            if recipe.pooled_text_embedding
            else {}
        ),
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=recipe.text_width,
            intermediate_size=2 * recipe.text_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # Stable Diffusion 1.x's noise schedule and sampler settings.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def render_training_set(recipe: TrainingRecipe) -> tuple[Tensor, list[str]]:
    """All training images in ``[-1, 1]`` and their captions (rendered once: rendering costs more than a step)."""
    data = ShapesWorldDataset("train", recipe.num_examples, recipe.image_size, seed=recipe.seed)
    items = [data[i] for i in range(len(data))]
    images = torch.stack([item["image"] for item in items]) * 2 - 1
    return images, [item["caption"] for item in items]


def random_batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` batches of ``batch_size`` indices into ``n`` examples, drawn with replacement."""
    for _ in range(steps):
        yield torch.randint(n, (batch_size,), generator=generator)


def train_vae(vae, images: Tensor, recipe: TrainingRecipe, generator: torch.Generator) -> float:
    """Reconstruction (L1 + MSE) plus a small KL; returns the latent scale ``1 / std`` of the data's latents."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    for step, index in enumerate(
        random_batches(len(images), recipe.vae_batch_size, recipe.vae_steps, generator)
    ):
        x = images[index]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 250 == 0:
            logger.info("vae step %d: loss %.4f", step, loss.item())
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, min(len(images), 2048), 256)]
        )
    return float(1.0 / latents.std())


def train_unet(
    components: dict, images: Tensor, captions: list[str], recipe: TrainingRecipe, generator: torch.Generator
) -> None:
    """Epsilon prediction on the VAE's scaled latents, text encoder trained jointly, captions dropped at random."""
    vae, unet, text_encoder, tokenizer = (components[k] for k in ("vae", "unet", "text_encoder", "tokenizer"))
    scheduler = components["scheduler"]
    scale = vae.config.scaling_factor
    with torch.no_grad():
        latents = (
            torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
            * scale
        )
    ids = tokenizer(
        captions + [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    empty = ids[-1]
    ids = ids[:-1]
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=1e-4)
    warmup = max(1, recipe.unet_steps // 20)
    lr_at = lambda step: (
        min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / recipe.unet_steps))
    )  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    alphas = scheduler.alphas_cumprod
    T = scheduler.config.num_train_timesteps
    for step, index in enumerate(
        random_batches(len(latents), recipe.batch_size, recipe.unet_steps, generator)
    ):
        z0 = latents[index]
        tokens = ids[index].clone()
        drop = torch.rand(len(index), generator=generator) < recipe.caption_dropout
        tokens[drop] = empty
        t = torch.randint(T, (len(index),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        a = alphas[t].reshape(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        context = text_encoder(tokens, return_dict=False)[0]
        error = (
            (unet(zt, t, encoder_hidden_states=context, return_dict=False)[0] - noise)
            .pow(2)
            .mean(dim=(1, 2, 3))
        )
        if recipe.snr_gamma is not None:
            snr = a.flatten() / (1 - a.flatten())
            error = error * snr.clamp(max=recipe.snr_gamma) / snr
        loss = error.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            logger.info("unet step %d: loss %.4f", step, loss.item())
    unet.eval()
    text_encoder.eval()


def train_world_pipeline(out: str | Path, recipe: TrainingRecipe = TrainingRecipe()) -> Path:
    """Train every component on the shapes world and save the pipeline at ``out``; returns ``out``."""
    from diffusers import StableDiffusionPipeline

    start = time.monotonic()
    generator = torch.Generator().manual_seed(recipe.seed)
    tokenizer = build_tokenizer(world_words())
    components = build_components(recipe, tokenizer)
    images, captions = render_training_set(recipe)
    logger.info("rendered %d training examples in %.0f s", len(images), time.monotonic() - start)
    scale = train_vae(components["vae"], images, recipe, generator)
    components["vae"].register_to_config(scaling_factor=scale)
    logger.info("autoencoder trained (latent scale %.3f) at %.0f s", scale, time.monotonic() - start)
    train_unet(components, images, captions, recipe, generator)
    logger.info("UNet and text encoder trained at %.0f s", time.monotonic() - start)
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    out = Path(out)
    # mypy sees diffusers' dummy objects for its top-level names (StableDiffusionPipeline has no methods there).
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    record = {
        "recipe": asdict(recipe),
        "train_seconds": round(time.monotonic() - start, 1),
        "palette": list(PALETTE),
        "kinds": list(KINDS),
        "counts": list(COUNTS),
    }
    (out / WORLD_MARKER).write_text(json.dumps(record, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rlr_lightning.world.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to save the pipeline in")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, seconds: checks the code path only")
    parser.add_argument("--unet-steps", type=int, default=None, help="override the recipe's UNet steps")
    parser.add_argument("--vae-steps", type=int, default=None, help="override the recipe's autoencoder steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    recipe = TrainingRecipe.smoke() if args.smoke else TrainingRecipe()
    overrides = {
        k: v for k, v in (("unet_steps", args.unet_steps), ("vae_steps", args.vae_steps)) if v is not None
    }
    if overrides:
        from dataclasses import replace

        recipe = replace(recipe, **overrides)
    train_world_pipeline(args.out, recipe)


if __name__ == "__main__":
    main()
