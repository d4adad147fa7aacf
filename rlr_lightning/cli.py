"""The ``rlr`` command.

``rlr fit`` is a ``LightningCLI`` over :class:`~rlr_lightning.module.RLRModule` and
:class:`~rlr_lightning.data.PromptDataModule` (fit only; optimizers are injected into the module because
LoRA weights exist only after ``configure_model``). ``rlr sample`` draws images from a backbone (optionally with trained LoRA weights) with the project's own
DDIM sampler and reports each step's sigma and transition log-probability. Without ``--model`` it uses the
tiny offline model, built into the cache on first use, so it runs anywhere in seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger("rlr_lightning")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_PROMPTS = ("a photo of a cat", "a watercolour of a fox", "a red bicycle", "a lighthouse at dusk")


def _sample_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlr sample",
        description="Sample images with the DDIM sampler and report per-step log-probabilities.",
    )
    p.add_argument("--model", default=None, help="hub id or diffusers pipeline directory (default: tiny offline model)")
    p.add_argument("--lora", default=None, help="LoRA weights exported by training (directory or .safetensors)")
    p.add_argument("--lora-rank", type=int, default=4, help="rank of the LoRA weights given with --lora")
    p.add_argument("--lora-alpha", type=float, default=4.0, help="alpha of the LoRA weights given with --lora")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--steps", type=int, default=20, help="number of DDIM steps T")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (> 0 for log-probabilities)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial latents and step noises")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype of the frozen weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="where to write the image grid")
    return p


def sample(argv: list[str]) -> Path:
    """Run ``rlr sample``; returns the path of the written image grid."""
    from torchvision.utils import save_image

    from rlr_lightning.backbone import DiffusionBackbone, LoraSettings
    from rlr_lightning.sampling import Plan
    from rlr_lightning.testing import ensure_tiny_pipeline

    args = _sample_parser().parse_args(argv)
    model = args.model if args.model is not None else ensure_tiny_pipeline()
    backbone = DiffusionBackbone.from_pretrained(model, dtype=_DTYPES[args.dtype]).to(args.device)
    if args.lora:
        backbone.add_lora(LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha))
        backbone.load_lora(args.lora)
    sampler = backbone.make_sampler(args.steps, args.eta, args.guidance)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    embeds = backbone.encode_prompts(prompts, negative=sampler.uses_guidance)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        trajectory = sampler.run(Plan(sampler.num_steps), embeds, generator=generator)
        images = backbone.decode(trajectory.final)
    for k in range(sampler.num_steps):
        logger.info(
            "step %2d  t=%4d  sigma=%.4f  mean log p(s_k+1 | s_k)=%.1f",
            k, int(sampler.schedule.timesteps[k]), float(trajectory.sigmas[k]), float(trajectory.log_probs[k].mean()),
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, args.out, nrow=min(len(prompts), 4))
    return args.out


COMMANDS = {
    "fit": "fine-tune LoRA weights toward a reward (LightningCLI: rlr fit --config configs/quickstart.yaml)",
    "sample": "sample images and per-step log-probabilities",
}


def _configure_logging() -> None:
    """Our INFO messages on stderr, once; Lightning keeps its own handler for its own messages."""
    package = logging.getLogger("rlr_lightning")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def build_cli(argv: list[str] | None, run: bool = True):
    """The ``rlr fit`` LightningCLI (``run=False`` parses and instantiates without fitting: for tests)."""
    from lightning.pytorch.cli import LightningCLI

    from rlr_lightning.data import PromptDataModule
    from rlr_lightning.module import RLRModule

    class RLRCLI(LightningCLI):
        @staticmethod
        def subcommands() -> dict:
            return {"fit": LightningCLI.subcommands()["fit"]}

    return RLRCLI(
        RLRModule,
        PromptDataModule,
        args=argv,
        run=run,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "rlr"} if run else {},
    )


def _lightning_cli(argv: list[str] | None) -> None:
    build_cli(argv)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``rlr`` console script (returns ``None`` so the script exits with status 0)."""
    argv = sys.argv[1:] if args is None else list(args)
    _configure_logging()
    if not argv or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:8s} {what}" for name, what in COMMANDS.items())
        sys.exit(f"usage: rlr COMMAND [options]\n\ncommands:\n{listing}")
    if argv[0] == "sample":
        out = sample(argv[1:])
        print(f"wrote {len(out.read_bytes())} bytes of samples to {out}")
    else:
        # LightningCLI reads sys.argv itself when run as the console script (its DDP launcher re-runs it).
        _lightning_cli(None if args is None else argv)
