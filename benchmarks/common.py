"""Shared pieces of the benchmark scripts: the tiny and SD 1.5-size problems, timing, memory, floors,
tables."""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from rlr_lightning.estimators import derive_seed, estimate_gradient
from rlr_lightning.memory import AutogradMemoryMeter
from rlr_lightning.module import RLRModule
from rlr_lightning.rewards import ColorBalance
from rlr_lightning.sampling import Plan
from rlr_lightning.task import Task

RESULTS = Path(__file__).resolve().parent / "results"
#: The count reward's counter before issue 21 (trained on renders only): what docs/benchmarks.md section 6 measured.
RENDERS_ONLY_COUNTER = Path(__file__).resolve().parent / "data" / "counter_renders"
QUICKSTART_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv_out", "time_emb_proj")


def machine() -> str:
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    return f"{platform.node() or 'host'}: {device}, torch {torch.__version__}, {date.today().isoformat()}"


def tiny_module(estimator, num_steps: int, pretrained: str = "tiny", **kwargs) -> RLRModule:
    """The quickstart problem: tiny model, trailing spacing, red-minus-blue reward, wide LoRA targets."""
    from rlr_lightning.models import LoraSettings

    defaults = dict(
        pretrained_model_name_or_path=pretrained,
        estimator=estimator,
        reward=ColorBalance(),
        num_steps=num_steps,
        eta=1.0,
        timestep_spacing="trailing",
        lora=LoraSettings(rank=4, alpha=4.0, target_modules=QUICKSTART_TARGETS),
    )
    defaults.update(kwargs)
    module = RLRModule(**defaults)
    module.configure_model()
    return module


#: The trained shapes-world pipeline (``rlr_lightning.builtin``); benchmarks take ``--model`` to use another.
WORLD_MODEL = "shapes-world"
#: The world problem's sampling: as the world is sampled (guidance 3, the model's own leading spacing), with
#: eta 1 because likelihood ratios need noise, T = 10 steps.
WORLD_STEPS = 10
WORLD_GUIDANCE = 3.0


def world_reward():
    """The world problem's reward: the count reward (``WorldCountReward``, minus the squared error of the counter
    network's count of the asked colour). Count is the composition skill the shipped model half has (sampled as
    :func:`world_module` samples, 55.3% +- 0.9 of held-out samples have the asked number of shapes, against
    98.1% +- 0.6 in the asked region and 99.1% +- 0.2 in the asked colour; mean +- standard error over sampling
    seeds 0 to 2, ``docs/benchmarks.md`` section 6.3), so fine-tuning has room; the number of shapes is decided
    by the early, noisy steps.

    The counter is the one trained on renders only (``benchmarks/data/counter_renders``), with which every
    measurement of ``docs/benchmarks.md`` section 6 was made; the packaged counter has since been retrained on the
    model's own samples (issue 21, ``docs/world.md``), so these benchmarks keep measuring what they documented."""
    from rlr_lightning.rewards.world import WorldCountReward

    return WorldCountReward(str(RENDERS_ONLY_COUNTER))


def world_prompts(split: str = "train") -> list[str]:
    """The world's captions of ``split`` (``train`` or ``held_out``: combinations never seen in training)."""
    from rlr_lightning.world import caption, split_specs

    train, held_out = split_specs()
    return [caption(spec) for spec in {"train": train, "held_out": held_out}[split]]


def check_world_model(parser, model: str) -> None:
    """Stop with a usage error (no traceback) when ``--model`` is neither ``shapes-world`` nor a diffusers
    pipeline directory, before any time is spent."""
    from rlr_lightning.builtin import resolve_model

    try:
        path = Path(resolve_model(model))
    except FileNotFoundError as error:
        parser.error(str(error))
    if not (path / "model_index.json").is_file():
        parser.error(
            f"--model {model!r} is not a diffusers pipeline directory (no model_index.json there); "
            f"give {WORLD_MODEL} or the directory of a trained world pipeline "
            "(python -m rlr_lightning.world.train)"
        )


def world_module(estimator, num_steps: int = WORLD_STEPS, model: str = WORLD_MODEL, **kwargs) -> RLRModule:
    """The composition problem on the trained shapes world: its pipeline, the differentiable count reward
    (:func:`world_reward`), DDIM with eta 1 and guidance 3 at the model's own (leading) spacing, rank-4 LoRA on
    the attention projections. Prompts: :func:`world_prompts` (the training split's captions).

    A LoRA trained here samples as trained: evaluate it with the same steps, eta and guidance
    (``python -m rlr_lightning.world.evaluate DIR --lora LORA --steps 10 --eta 1 --guidance 3``).
    """
    from rlr_lightning.models import LoraSettings

    defaults = dict(
        pretrained_model_name_or_path=model,
        estimator=estimator,
        reward=world_reward(),
        num_steps=num_steps,
        eta=1.0,
        guidance_scale=WORLD_GUIDANCE,
        lora=LoraSettings(rank=4, alpha=4.0),
    )
    defaults.update(kwargs)
    module = RLRModule(**defaults)
    module.configure_model()
    return module


def world_accuracy(
    model: str,
    caption_sets: dict[str, list[str]],
    lora: str | Path | None = None,
    samples_per_caption: int = 1,
    num_steps: int = WORLD_STEPS,
    guidance_scale: float = WORLD_GUIDANCE,
    eta: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, dict[str, float]]:
    """Per caption set: the exact checker's accuracies (``color_ok``, ``count_ok``, ``position_ok``,
    ``all_ok``), the mean reward (:func:`world_reward`) of the samples and their number ``n``
    (``rlr_lightning.world.evaluate``); with a LoRA file or without (the base model). The defaults sample as
    :func:`world_module` trains (a LoRA samples as trained). Every set is sampled from ``seed``, so two models
    compare on the same noise.
    """
    from rlr_lightning.world.evaluate import evaluate

    reward = world_reward()
    return {
        name: evaluate(
            model,
            samples_per_caption=samples_per_caption,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            seed=seed,
            lora=lora,
            batch_size=batch_size,
            captions=captions,
            reward=reward,
        )
        for name, captions in caption_sets.items()
    }


def world_accuracy_seeds(
    model: str,
    caption_sets: dict[str, list[str]],
    seeds: list[int],
    lora: str | Path | None = None,
    samples_per_caption: int = 1,
    num_steps: int = WORLD_STEPS,
    guidance_scale: float = WORLD_GUIDANCE,
    eta: float = 1.0,
    batch_size: int = 64,
) -> dict[str, dict]:
    """:func:`world_accuracy` over several sampling ``seeds`` (``rlr_lightning.world.evaluate.evaluate_seeds``):
    per caption set, the pooled means at the top level (as one seed's evaluation has them; ``n`` all samples),
    and ``per_seed``, ``se`` (standard error of the mean over the seeds), ``se_samples``, ``n_seeds``."""
    from rlr_lightning.world.evaluate import evaluate_seeds

    reward = world_reward()
    out = {}
    for name, captions in caption_sets.items():
        result = evaluate_seeds(
            model,
            seeds,
            samples_per_caption=samples_per_caption,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            lora=lora,
            batch_size=batch_size,
            captions=captions,
            reward=reward,
        )
        out[name] = dict(result, **result["mean"])
    return out


def move_lora_off_init(module: RLRModule, scale: float, seed: int = 1) -> None:
    """Add ``N(0, scale^2)`` to every LoRA weight: a mid-training adapter. At initialisation ``B = 0``, which
    makes every LoRA ``A`` gradient exactly zero and would hide half the parameters from a gradient comparison."""
    if scale <= 0:
        return
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in module.backbone.lora_parameters().values():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def estimator_step(module: RLRModule, embeds, prompts, draw: int) -> None:
    """One gradient estimate: rollout plus every term's backward (no optimizer step), run as the module's
    memory plan says (chunks, activation checkpointing)."""
    estimate_gradient(
        module.estimator,
        module.task.sampler,
        embeds,
        prompts,
        module.task.latent_reward,
        derive_seed(0, draw, 0),
        derive_seed(0, draw, 1),
        memory=module.task.memory_plan,
    )


def estimator_step_peaks(module: RLRModule, embeds, prompts, draw: int) -> dict[str, float]:
    """:func:`estimator_step` on a GPU, with the peak memory (GiB, weights included) of each of its phases: the
    rollout (the sampling pass, and in an unchunked plan the windows and the rewards with their graphs), then
    each surrogate term's forward and backward, by term kind (``fo``, ``ho``, ``zo``: the largest chunk). What
    the memory planner's predicted phases are checked against; a ``torch.cuda.synchronize`` per term is its
    only cost."""
    from rlr_lightning.estimators.base import rollout
    from rlr_lightning.estimators.step import backward_terms

    peaks: dict[str, float] = {}

    def record(name: str) -> None:
        torch.cuda.synchronize()
        peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
        torch.cuda.reset_peak_memory_stats()

    params = [p for p in module.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    task = module.task
    try:
        result = rollout(
            module.estimator,
            task.sampler,
            embeds,
            prompts,
            task.latent_reward,
            derive_seed(0, draw, 0),
            derive_seed(0, draw, 1),
            memory=task.memory_plan,
        )
        record("rollout")
        names = iter([term.name for term in result.terms])

        def backward(loss: torch.Tensor) -> None:
            loss.backward()
            record(f"term {next(names)}")

        backward_terms(result.terms, params, backward=backward, record_grads=False, isolate=True)
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad
    return peaks


def measure_step(module: RLRModule, prompts, repeats: int = 5, warmup: int = 1) -> dict:
    """Median step time (s) and peak activation bytes of one estimator step (+ CUDA peak when on GPU)."""
    embeds = module.task.conditioning_for(prompts)
    for i in range(warmup):
        estimator_step(module, embeds, prompts, 10_000 + i)
    times = []
    for i in range(repeats):
        gc.collect()
        synchronize()
        start = time.perf_counter()
        estimator_step(module, embeds, prompts, i)
        synchronize()
        times.append(time.perf_counter() - start)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with AutogradMemoryMeter(exclude=module.parameters()) as meter:
        estimator_step(module, embeds, prompts, 99)
        gc.collect()
    out = {"time_s": statistics.median(times), "activation_mb": meter.peak / 2**20}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def interleaved_times(
    module: RLRModule, jobs: list[tuple], repeats: int = 7, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of one gradient estimate of every ``(name, estimator, prompts)`` job, ``repeats`` times each,
    round-robin: round ``r`` times every job once (on draw ``r``), starting from job ``r mod len(jobs)``, so
    slow phases of a shared machine fall on every estimator alike instead of on whichever ran then. Report the
    median of each list. Every job is warmed up ``warmup`` times first (all jobs before any is timed).

    A job may carry a fourth element, a ``MemoryPlan``: it then runs under that plan (the module's plan and the
    decoder's checkpointing, as a training run with it has them), and the module's own plan is restored after.
    """
    if repeats < 1 or not jobs:
        raise ValueError(f"need jobs and repeats >= 1, got {len(jobs)} jobs and repeats={repeats}")
    saved_plan = module.task.memory_plan
    prepared = []
    for name, estimator, prompts, *plan in jobs:
        module.task.prepare(estimator)
        prepared.append(
            (name, estimator, prompts, module.task.conditioning_for(prompts), plan[0] if plan else None)
        )

    def run(estimator, prompts, embeds, plan, draw: int) -> float:
        module.estimator = estimator
        if plan is not None:
            use_memory_plan(module, plan)
        gc.collect()
        synchronize()
        start = time.perf_counter()
        estimator_step(module, embeds, prompts, draw)
        synchronize()
        return time.perf_counter() - start

    try:
        for i in range(warmup):
            for _, estimator, prompts, embeds, plan in prepared:
                run(estimator, prompts, embeds, plan, 10_000 + i)
        times: dict[str, list[float]] = {name: [] for name, *_ in prepared}
        for r in range(repeats):
            shift = r % len(prepared)
            for name, estimator, prompts, embeds, plan in prepared[shift:] + prepared[:shift]:
                times[name].append(run(estimator, prompts, embeds, plan, r))
    finally:
        use_memory_plan(module, saved_plan)
    return times


def use_memory_plan(module: RLRModule, plan) -> None:
    """Run the module's estimates under ``plan``: its chunking and the checkpointing of the denoiser calls and
    of the decoder, as a training run with that plan has them."""
    module.task.memory_plan = plan
    module.task.set_activation_checkpointing(plan.activation_checkpointing)


def activation_mb(module: RLRModule, prompts) -> float:
    """Peak activation memory (MB) of one estimate of the module's estimator (``AutogradMemoryMeter``)."""
    embeds = module.task.conditioning_for(prompts)
    gc.collect()
    with AutogradMemoryMeter(exclude=module.parameters()) as meter:
        estimator_step(module, embeds, prompts, 99)
        gc.collect()
    return meter.peak / 2**20


def timed(fn, repeats: int = 5) -> float:
    for _ in range(1):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (format(row[k], f) if row.get(k) is not None else "" for k, _, f in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(name: str, payload: dict, directory: str | Path = RESULTS) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


# -- Stable Diffusion 1.5 size, GPU runs ------------------------------------------------------------------


def sd15_pipeline_dir(
    path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> str:
    """A pipeline directory with Stable Diffusion 1.5's UNet and VAE architectures and random weights.

    Args:
        path: Where to save it (a diffusers pipeline directory).
        dtype: Dtype of the saved weights (``bfloat16`` halves the bytes written and read back).
        device: Where the random initialisation runs: on a GPU it takes a fraction of a second instead of
            about 10 s of CPU time for the 860 M UNet weights.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    from rlr_lightning.tiny import tiny_clip_tokenizer

    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the SD 1.x defaults
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            latent_channels=4,
            sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                vocab_size=514,
                max_position_embeddings=77,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tiny_clip_tokenizer(77),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    verbosity = diffusers_logging.get_verbosity()
    # Its note on casting with to() is for checkpoints with float32-only modules; these random ones have none.
    diffusers_logging.set_verbosity_error()
    try:
        pipe.to("cpu", dtype).save_pretrained(path)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return path


# -- Stable Diffusion 3.5 Medium size, GPU runs -----------------------------------------------------------

#: T5 tokens per prompt: ``StableDiffusion3Pipeline``'s default ``max_sequence_length`` (with CLIP's 77, a
#: prompt is a 333-token sequence in every transformer block).
SD35_T5_TOKENS = 256


def sd35_medium_components(
    device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> dict:
    """Stable Diffusion 3.5 Medium's components with its architectures and random weights, built in memory.

    The configurations are those of ``stabilityai/stable-diffusion-3.5-medium``: the MMDiT-X transformer
    (24 blocks of 24 heads of 64, dual attention in blocks 0-12, RMS query/key norm, 384 x 384 position
    embeddings: 2.47 B weights with them), CLIP-L and CLIP-G text encoders with projections (12 x 768 and
    32 x 1280), the T5 v1.1 XXL encoder (24 layers, d_model 4096, 64 heads, gated-GELU d_ff 10240: 4.76 B),
    the 16-channel SD 3 VAE and the flow-matching scheduler with shift 3. The vocabularies are the real sizes
    (the embedding tables count in memory); the tokenizers are :mod:`rlr_lightning.tiny`'s character-level
    ones (the weights are random anyway), at CLIP's 77 tokens and the pipeline's :data:`SD35_T5_TOKENS`.

    Nothing is written to disk: give the result to ``StableDiffusion3Backbone(dtype=dtype, **components)``.

    Args:
        device: Where the random initialisation runs. On a GPU the 8 B weights take seconds; on a CPU the T5
            encoder alone would take minutes and 19 GB, so use ``meta`` there (shapes and counts, no memory).
        dtype: Dtype the weights are cast to, each network right after it is built (so the float32
            initialisation of at most one network is held at a time: T5's 19 GB).
        seed: Seed of the initialisation.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from rlr_lightning.tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    def clip(width: int, layers: int, heads: int, act: str) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(clip_text_config(width, layers, heads, act, projection_dim=width))

    builders = {
        "transformer": lambda: SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        ),
        "vae": lambda: AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=16,
            sample_size=1024,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        "text_encoder": lambda: clip(768, 12, 12, "quick_gelu"),  # CLIP ViT-L/14's text tower
        "text_encoder_2": lambda: clip(1280, 32, 20, "gelu"),  # OpenCLIP ViT-bigG/14's text tower
        "text_encoder_3": lambda: T5EncoderModel(t5_xxl_config()),
    }
    components = build_networks(builders, device, dtype, seed)
    return dict(
        components,
        tokenizer=tiny_clip_tokenizer(77),
        tokenizer_2=tiny_clip_tokenizer(77),
        tokenizer_3=tiny_t5_tokenizer(SD35_T5_TOKENS),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )


def clip_text_config(width: int, layers: int, heads: int, act: str, **extra):
    """A CLIP text tower's configuration with CLIP's 49,408-token table and 77 positions, and the special tokens of
    :mod:`rlr_lightning.tiny`'s character-level tokenizers (start 0, end 1, which also pads): the real tables count
    in memory, the tokenizers index their first 514 rows."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act=act,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


# -- Stable Diffusion XL base size, GPU runs --------------------------------------------------------------


def sdxl_base_components(
    device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> dict:
    """Stable Diffusion XL base 1.0's components with its architectures and random weights, built in memory.

    The configurations are those of ``stabilityai/stable-diffusion-xl-base-1.0``: the UNet (320/640/1280 channels,
    1, 2 and 10 transformer layers at the three levels, heads of 64, 2048-wide cross-attention over both text
    encoders' sequences, ``text_time`` added conditioning of 6 time ids at 256 features each plus the 1280-wide
    pooled text embedding: 2.57 B weights), CLIP ViT-L/14's text tower (12 x 768, no projection: SDXL uses its
    penultimate hidden states only), OpenCLIP ViT-bigG/14's text tower with its projection (32 x 1280), the SDXL
    VAE (the SD VAE's architecture with SDXL's latent scale 0.13025; ``force_upcast`` as released, which matters
    only in float16) and the base model's Euler scheduler configuration, read as DDIM with ``leading`` spacing.
    The tokenizers are :mod:`rlr_lightning.tiny`'s character-level ones at CLIP's 77 tokens (the weights are
    random anyway). Done as :func:`sd35_medium_components` does for SD 3.5.

    Nothing is written to disk: give the result to ``StableDiffusionXLBackbone(dtype=dtype, **components)``.

    Args:
        device: Where the random initialisation runs. On a GPU the 3.5 B weights take seconds; on a CPU use
            ``meta`` (shapes and counts, no memory).
        dtype: Dtype the weights are cast to, each network right after it is built.
        seed: Seed of the initialisation.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from rlr_lightning.tiny import tiny_clip_tokenizer

    builders = {
        "unet": lambda: UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(
                5,
                10,
                20,
            ),  # diffusers' historical name: the number of heads (of 64) per level
            cross_attention_dim=2048,  # CLIP-L's 768 and bigG's 1280 side by side
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=6 * 256 + 1280,
            norm_num_groups=32,
        ),
        "vae": lambda: AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
        "text_encoder": lambda: CLIPTextModel(clip_text_config(768, 12, 12, "quick_gelu")),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(
            clip_text_config(1280, 32, 20, "gelu", projection_dim=1280)
        ),
    }
    components = build_networks(builders, device, dtype, seed)
    # The released scheduler_config.json: an Euler scheduler with the SD training schedule's DDIM keys.
    scheduler = EulerDiscreteScheduler.from_config(
        dict(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            steps_offset=1,
            timestep_spacing="leading",
            interpolation_type="linear",
            use_karras_sigmas=False,
            clip_sample=False,
            set_alpha_to_one=False,
            skip_prk_steps=True,
            sample_max_value=1.0,
        )
    )
    return dict(
        components,
        tokenizer=tiny_clip_tokenizer(77),
        tokenizer_2=tiny_clip_tokenizer(77),
        scheduler=scheduler,
    )


# -- FLUX.1-dev size, GPU runs ------------------------------------------------------------------------------

#: T5 tokens per prompt: ``FluxPipeline``'s default ``max_sequence_length`` (``configs/flux1_dev_hpsv2_rlr.yaml``
#: leaves it at that): with 1,024 image tokens at 512 px, a 1,536-token sequence in every block.
FLUX_T5_TOKENS = 512


def t5_xxl_config(config_class=None, vocab_size: int = 32128):
    """The T5 v1.1 XXL encoder's configuration (SD 3 and FLUX): 24 layers, d_model 4096, 64 heads, gated-GELU
    d_ff 10240, the 32,128-token table (4.76 B weights). UMT5-XXL (Wan 2.1) is the same network with its own
    class (``UMT5Config``) and a 256,384-token table.

    Args:
        config_class: The transformers configuration class (``T5Config`` by default).
        vocab_size: Rows of the token table.
    """
    from transformers import T5Config

    return (config_class or T5Config)(
        vocab_size=vocab_size,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def flux1_dev_components(
    device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> dict:
    """FLUX.1-dev's components with its architectures and random weights, built in memory.

    The configurations are those of ``black-forest-labs/FLUX.1-dev``: the ``FluxTransformer2DModel`` (19
    double-stream and 38 single-stream blocks of 24 heads of 128 over 2x2-packed 16-channel latents, rotary axes
    16/56/56, 4096-wide T5 context, 768-wide pooled CLIP embedding, the guidance embedding of a guidance-distilled
    model: 11.9 B weights), CLIP ViT-L/14's text tower (its pooled output), the T5 v1.1 XXL encoder
    (:func:`t5_xxl_config`, 4.76 B), the 16-channel FLUX VAE (latent scale 0.3611, shift 0.1159, no quant
    convolutions) and the flow-matching Euler scheduler with FLUX's resolution-dependent shift (``mu`` from 0.5 at
    256 image tokens to 1.15 at 4,096). The tokenizers are :mod:`rlr_lightning.tiny`'s character-level ones, at
    CLIP's 77 tokens and :data:`FLUX_T5_TOKENS`. Done as :func:`sd35_medium_components` does for SD 3.5.

    Nothing is written to disk: give the result to ``FluxBackbone(dtype=dtype, **components)``.

    Args:
        device: Where the random initialisation runs. On a GPU the 17 B weights take seconds (the transformer's
            float32 initialisation holds 48 GB until it is cast); on a CPU use ``meta`` (shapes and counts, no
            memory).
        dtype: Dtype the weights are cast to, each network right after it is built.
        seed: Seed of the initialisation.
    """
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from rlr_lightning.tiny import flux1_dev_scheduler, tiny_clip_tokenizer, tiny_t5_tokenizer

    builders = {
        "transformer": lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        "vae": lambda: AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=16,
            sample_size=1024,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        "text_encoder": lambda: CLIPTextModel(clip_text_config(768, 12, 12, "quick_gelu")),
        "text_encoder_2": lambda: T5EncoderModel(t5_xxl_config()),
    }
    components = build_networks(builders, device, dtype, seed)
    scheduler = flux1_dev_scheduler()
    return dict(
        components,
        tokenizer=tiny_clip_tokenizer(77),
        tokenizer_2=tiny_t5_tokenizer(FLUX_T5_TOKENS),
        scheduler=scheduler,
    )


# -- PickScore, the reward of the SD 3.5 recipes ----------------------------------------------------------


def pickscore_config(tiny: bool = False):
    """PickScore v1's ``CLIPConfig`` (``yuvalkirstain/PickScore_v1``, OpenCLIP ViT-H/14 converted to transformers:
    a 32 x 1280 vision tower on 224-px images in 14-px patches, a 24 x 1024 text tower, 1024-wide projections,
    0.99 B weights), or with ``tiny`` a one-layer CLIP on 32-px images with a 514-token table (40 k weights). The
    text towers take :mod:`rlr_lightning.tiny`'s character-level tokenizer's special tokens."""
    from transformers import CLIPConfig

    if tiny:  # the character-level tokenizer's table: 40 k weights in all
        vocab, projection = 514, 16
        text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=2, num_hidden_layers=1)
        vision = dict(text, image_size=32, patch_size=8)
    else:
        vocab, projection = 49408, 1024
        text = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24)
        vision = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32)
        vision.update(image_size=224, patch_size=14)
    special = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPConfig(
        text_config=dict(text, vocab_size=vocab, max_position_embeddings=77, hidden_act="gelu", **special),
        vision_config=dict(vision, hidden_act="gelu", layer_norm_eps=1e-5),
        projection_dim=projection,
        logit_scale_init_value=4.6052,  # exp = 100: the trained PickScore's scale
    )


def pickscore_model(device: str | torch.device = "meta", tiny: bool = False, seed: int = 0):
    """A ``CLIPModel`` of :func:`pickscore_config` with random weights from ``seed``, in float32 (as PickScore_v1
    is stored), built on ``device`` (``meta``: shapes and counts, no memory)."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    with torch.device(device):
        return CLIPModel(pickscore_config(tiny)).eval()


def pickscore_dir(
    path: str | Path, device: str | torch.device = "cpu", tiny: bool = False, seed: int = 0
) -> str:
    """A directory with a random-weight PickScore (:func:`pickscore_model`) and its ``CLIPProcessor``, saved with
    ``save_pretrained``: ``PickScoreReward(model_name_or_path=path, processor_name_or_path=path)`` loads it as it
    loads the released one, offline. The processor is the released one's image side (``CLIPImageProcessor``'s
    defaults are OpenAI CLIP's 224-px resize, crop and normalisation, which the laion ViT-H/14 processor uses; 32 px
    with ``tiny``) with :mod:`rlr_lightning.tiny`'s character-level tokenizer at 77 tokens (the weights are random
    anyway).

    Args:
        path: The directory (created).
        device: Where the random initialisation runs (on a GPU a fraction of a second instead of about 10 s of CPU
            time for the 0.99 B weights); they are saved in float32, 3.9 GB.
        tiny: The tiny configuration.
        seed: Seed of the initialisation.
    """
    from transformers import CLIPImageProcessor, CLIPProcessor

    from rlr_lightning.tiny import tiny_clip_tokenizer

    side = 32 if tiny else 224
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_clip_tokenizer(77)).save_pretrained(path)
    model = pickscore_model(device, tiny, seed)
    model.save_pretrained(path)
    del model
    free_memory()
    return str(path)


def build_networks(builders: dict, device, dtype: torch.dtype, seed: int) -> dict:
    """Each network of ``builders`` (name -> constructor) built with random weights from ``seed`` directly on
    ``device`` (the meta device counts weights without memory), cast to ``dtype``, in eval mode."""
    from diffusers.utils import logging as diffusers_logging

    torch.manual_seed(seed)
    components = {}
    verbosity = diffusers_logging.get_verbosity()
    # diffusers' note on casting with to() is for checkpoints with float32-only modules: callers that have them
    # restore them (gpu_cost.keep_fp32_modules).
    diffusers_logging.set_verbosity_error()
    try:
        with torch.device(device):
            for name, build in builders.items():
                components[name] = build().to(dtype).eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return components


def weight_counts(components: dict) -> dict[str, int]:
    """Weights per network of a pipeline's components: parameters and buffers (the SD 3 transformer keeps its
    position embeddings, 0.23 B numbers at 384 x 384, as a buffer that its checkpoint stores)."""
    return {
        name: sum(t.numel() for t in (*model.parameters(), *model.buffers()))
        for name, model in components.items()
        if isinstance(model, torch.nn.Module)
    }


def share_backbone(module: RLRModule, backbone) -> RLRModule:
    """Give ``module`` an already loaded backbone (LoRA included) instead of loading its own.

    Loading the SD 1.5-size model again for each of a few dozen configurations would cost minutes of GPU
    time; the backbone's frozen weights and LoRA are the same for all of them. The module's task is built on
    it from the module's own settings (``Task.from_backbone``), after turning off any diffusers gradient
    checkpointing an earlier module's memory plan left on the shared models.
    """
    for model in (backbone.network, backbone.vae):  # the UNet, or the transformer of SD 3 / FLUX
        if getattr(model, "is_gradient_checkpointing", False):
            model.disable_gradient_checkpointing()
    task = Task.from_backbone(backbone, module.settings, module.reward, module.pretrained_model_name_or_path)
    module.configure_model(task)
    return module.to(backbone.device)


def clear_lora_grads(module: RLRModule) -> None:
    for p in module.backbone.lora_parameters().values():
        p.grad = None


def free_memory() -> None:
    """Drop garbage and cached CUDA blocks, so the next configuration's peak is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA out-of-memory, including the forms cuBLAS / cuDNN report as plain ``RuntimeError``."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in ("out of memory", "ALLOC_FAILED"))


def measure_once(fn: Callable[[], object], exclude=()) -> dict:
    """One timed call of ``fn`` and the memory it took; an out-of-memory error is a result, not a crash.

    On a GPU: ``time_s`` and ``peak_gib`` (``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats``: everything, weights included). On a CPU: ``time_s`` and ``activation_mb``
    (the peak of what autograd holds for backward, ``AutogradMemoryMeter``; its hooks add to the time).
    ``status`` is ``ok`` or ``OOM`` (then ``time_s`` is the time until the failure).

    Args:
        fn: The work to measure.
        exclude: Tensors whose storages are not activations (the model's parameters), for the CPU meter.
    """
    free_memory()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out: dict = {"status": "ok"}
    synchronize()
    start = time.perf_counter()
    try:
        if cuda:
            fn()
        else:
            with AutogradMemoryMeter(exclude=exclude) as meter:
                fn()
            out["activation_mb"] = meter.peak / 2**20
        synchronize()
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        out.update(status="OOM", reason=str(error).splitlines()[0][:200])
    out["time_s"] = time.perf_counter() - start
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # Outside the except block: the exception's frames (and the tensors they hold) are gone by now.
    free_memory()
    return out


def floor_parts(module: RLRModule, prompts, h: int, repeats: int = 3, nograd_s: float | None = None) -> dict:
    """The floor of an RLR step with block length ``h`` (``docs/benchmarks.md`` §2), in seconds, by part.

    Floor = a no-grad sample of ``T`` steps + ``h + 1`` steps of forward and backward + decode and reward
    forward and backward. Each part is timed after one warm-up call (median of ``repeats``).

    Args:
        module: A configured module (its sampler, backbone and reward).
        prompts: The local batch.
        h: The block length.
        repeats: Timed calls per part.
        nograd_s: An already measured no-grad sample time of this module and batch (skips re-measuring it).
    """
    sampler, backbone = module.task.sampler, module.backbone
    embeds = module.task.conditioning_for(prompts)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    def nograd_sample():
        with torch.no_grad():
            sampler.run(Plan(sampler.num_steps), embeds, generator=generator())

    x0, noises = sampler.initial_noise(len(prompts), generator(), embeds.device)

    def grad_steps():
        x = x0
        for k in range(h + 1):
            x = sampler.step(k, x, embeds.at(k), noise=noises[k]).next_latents
        x.sum().backward()
        clear_lora_grads(module)

    def decode_reward():
        latents = x0.clone().requires_grad_(True)
        module.reward(backbone.decode(latents), prompts).sum().backward()

    parts = {
        "nograd_sample_s": nograd_s if nograd_s is not None else timed(nograd_sample, repeats),
        "grad_steps_s": timed(grad_steps, repeats),
        "decode_reward_s": timed(decode_reward, repeats),
    }
    parts["floor_s"] = sum(parts.values())
    return parts


class ResultLog:
    """Results written as they come: ``<name>.jsonl`` gets a line per row at once, ``<name>.json`` and
    ``<name>.md`` are rewritten after every row, so a run cut short still leaves all it measured.

    Args:
        directory: Output directory (created).
        name: File stem.
        header: What the run was (machine, settings); saved in the JSON.
        render: Markdown of the JSON payload.
    """

    def __init__(self, directory: str | Path, name: str, header: dict, render: Callable[[dict], str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.directory / f"{name}.jsonl"
        self.json = self.directory / f"{name}.json"
        self.markdown = self.directory / f"{name}.md"
        self.jsonl.write_text("")
        self.payload = dict(header, rows=[])
        self.render = render

    def add(self, row: dict) -> None:
        self.payload["rows"].append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.write()

    def write(self, **extra) -> None:
        self.payload.update(extra)
        self.json.write_text(json.dumps(self.payload, indent=2))
        self.markdown.write_text(self.render(self.payload))
