"""Step time and activation memory of RLR against T and h, next to full and truncated backprop, plus RLR's
step time as a ratio of its floor, all measured in one run.

    python benchmarks/cost_scaling.py            # tiny model on this machine
    python benchmarks/cost_scaling.py --sd15     # Stable Diffusion 1.5 UNet size (random weights), GPU, bf16

Floor of an RLR step (the issue's definition): a no-grad sample of T steps, plus h + 1 steps of forward and
backward, plus decode and reward forward and backward. Memory: peak bytes autograd holds for backward
(``AutogradMemoryMeter``, identical on CPU and GPU) and, on a GPU, ``torch.cuda.max_memory_allocated``.
Writes benchmarks/results/cost_scaling[_sd15].json and prints markdown tables.
"""

from __future__ import annotations

import argparse

import torch
from common import machine, markdown_table, measure_step, save, synchronize, timed, tiny_module

from rlr_lightning.estimators import RLR, FullBackprop, TruncatedBackprop
from rlr_lightning.sampling import Plan


def sd15_pipeline_dir(path: str) -> str:
    """A pipeline directory with Stable Diffusion 1.5's UNet and VAE architectures and random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rlr_lightning.testing import tiny_clip_tokenizer

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the SD 1.x defaults
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, vocab_size=514, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tiny_clip_tokenizer(77), unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


def floor_seconds(module, prompts, h: int) -> float:
    sampler, backbone = module.sampler, module.backbone
    embeds = module.conditioning_for(prompts)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    def nograd_sample():
        with torch.no_grad():
            sampler.run(Plan(sampler.num_steps), embeds, generator=generator())

    x0, noises = sampler.initial_noise(len(prompts), generator(), embeds.device)

    def grad_steps():
        x = x0
        for k in range(h + 1):
            x = sampler.step(k, x, embeds, noise=noises[k]).next_latents
        x.sum().backward()
        for p in backbone.lora_parameters().values():
            p.grad = None

    def decode_reward():
        latents = x0.clone().requires_grad_(True)
        module.reward(backbone.decode(latents), prompts).sum().backward()

    return sum(timed(fn, repeats=3) for fn in (nograd_sample, grad_steps, decode_reward))


def run(configs, prompts, pretrained, dtype, precision_note):
    rows = []
    for name, estimator, T, h in configs:
        module = tiny_module(estimator, T, pretrained=pretrained, weight_dtype=dtype)
        if torch.cuda.is_available():
            module.to("cuda")
        with torch.autocast(module.device.type, dtype=torch.bfloat16, enabled=module.device.type == "cuda"):
            cost = measure_step(module, prompts, repeats=3)
            row = dict(name=name, T=T, h=h if h else "", **cost)
            if isinstance(estimator, RLR):
                row["floor_s"] = floor_seconds(module, prompts, h)
                row["ratio"] = row["time_s"] / row["floor_s"]
        rows.append(row)
        print(row, flush=True)
        del module
        synchronize()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sd15", action="store_true", help="SD 1.5-size UNet on a GPU (bf16, 512 px)")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    prompts = ["cat", "owl", "fox", "whale", "horse", "frog", "bee", "crab"][: args.batch]
    pretrained, dtype, suffix = "tiny", "float32", ""
    if args.sd15:
        if not torch.cuda.is_available():
            raise SystemExit("--sd15 needs a GPU: the SD 1.5 UNet takes seconds per call on a CPU")
        import tempfile

        pretrained, dtype, suffix = sd15_pipeline_dir(tempfile.mkdtemp()), "bfloat16", "_sd15"
    configs = []
    for T in (10, 20, 50):
        configs += [(f"RLR h=2 zo=parameter", RLR(h=2, zo_mode="parameter"), T, 2),
                    (f"RLR h=2 zo=score", RLR(h=2, zo_mode="score"), T, 2),
                    ("full backprop", FullBackprop(), T, None), ("truncated K=2", TruncatedBackprop(k=2), T, None)]
    for h in (1, 4, 8):
        configs += [(f"RLR h={h} zo=parameter", RLR(h=h, zo_mode="parameter"), 20, h),
                    (f"RLR h={h} zo=score", RLR(h=h, zo_mode="score"), 20, h)]
    rows = run(configs, prompts, pretrained, dtype, "")
    columns = [("name", "estimator", "s"), ("T", "T", "d"), ("time_s", "step time (s)", ".3f"),
               ("activation_mb", "activation MB", ".1f"), ("cuda_peak_mb", "CUDA peak MB", ".0f"),
               ("floor_s", "floor (s)", ".3f"), ("ratio", "time / floor", ".2f")]
    table = markdown_table(rows, columns)
    print(table)
    save("cost_scaling" + suffix, dict(machine=machine(), args=vars(args), rows=rows, table=table))


if __name__ == "__main__":
    main()
