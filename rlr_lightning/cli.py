"""The ``rlr`` command.

``rlr fit`` and ``rlr validate`` are a ``LightningCLI`` over :class:`~rlr_lightning.module.RLRModule` and
:class:`~rlr_lightning.data.PromptDataModule` (see :mod:`rlr_lightning.lightning_cli`; optimizers are injected
into the module because LoRA weights exist only after ``configure_model``). ``rlr sample`` draws images from
a backbone (optionally with trained LoRA weights) with the project's own sampler of the model's family (DDIM for
Stable Diffusion 1.x / 2.x and SDXL, Flow-GRPO's SDE for SD 3 / 3.5 and FLUX.1) and reports each step's sigma and
transition log-probability. Its options are checked, the model directory and ``--out`` included, before the
model loads. Without ``--model`` it uses the tiny offline model, built into the cache on first use, so it runs
anywhere in seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from rlr_lightning.argparsing import HelpFormatter, SampleArgumentParser
from rlr_lightning.dtypes import DTYPES

logger = logging.getLogger("rlr_lightning")

DEFAULT_PROMPTS = ("a photo of a cat", "a watercolour of a fox", "a red bicycle", "a lighthouse at dusk")


#: ``--out`` suffixes that write a video (for video models).
VIDEO_SUFFIXES = (".mp4", ".gif")


def _sample_parser() -> SampleArgumentParser:
    from rlr_lightning.builtin import describe_builtin_models

    p = SampleArgumentParser(
        prog="rlr sample",
        formatter_class=HelpFormatter,
        description="Sample images (or videos) with the sampler of the model's family and log each step's sigma "
        "and transition log-probability: DDIM for Stable Diffusion 1.x / 2.x and SDXL, Flow-GRPO's SDE (on the "
        "scheduler's shifted times) for SD 3 / 3.5, FLUX.1 and Wan 2.1. The family comes from the pipeline's "
        "model_index.json.",
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="a built-in model (no download): "
        + describe_builtin_models()
        + "; default tiny. Or the hub id or "
        "diffusers pipeline directory of a Stable Diffusion 1.x / 2.x, SDXL, SD 3 / 3.5, FLUX.1 or Wan 2.1 pipeline",
    )
    p.add_argument(
        "--lora",
        default=None,
        help="LoRA weights exported by training (directory or .safetensors), another diffusers LoRA of the "
        "model's family, or a built-in one (shapes-world-aligned, for --model shapes-world); rank, alpha and "
        "adapted layers are read from the file",
    )
    p.add_argument(
        "--lora-alpha",
        type=float,
        default=None,
        help="alpha of a --lora file that does not record it (third-party files without adapter metadata; "
        "default: its rank, i.e. scale 1); files written by rlr record it",
    )
    # Deprecated: the rank is read from the file. Still accepted (and ignored) so old command lines run.
    p.add_argument("--lora-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--steps", type=int, default=20, help="number of sampling steps T (>= 1)")
    p.add_argument(
        "--eta",
        type=float,
        default=1.0,
        help="the sampler's noise level (> 0 for log-probabilities): DDIM eta for Stable Diffusion and SDXL, the SDE "
        "noise level for SD 3 and FLUX (0 = the ODE sampler)",
    )
    p.add_argument(
        "--resolution",
        type=int,
        nargs="+",
        default=None,
        metavar="PIXELS",
        help="image size: one number (square) or height and width (default: the model's own)",
    )
    p.add_argument(
        "--frames",
        type=int,
        default=None,
        help="video models (Wan 2.1) only: frames per video, a multiple of the VAE's temporal factor plus one "
        "(default: the model's own)",
    )
    p.add_argument("--fps", type=float, default=8.0, help="video models only: playback frames per second")
    p.add_argument(
        "--timestep-spacing",
        choices=("leading", "trailing", "linspace"),
        default=None,
        help="DDIM timestep spacing, Stable Diffusion and SDXL only (default: the model's scheduler config; SD 3 and "
        "FLUX take their times from the scheduler's shift); use the one the LoRA was trained with "
        "(model.timestep_spacing, e.g. trailing in configs/quickstart.yaml)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=5.0,
        help="guidance scale: classifier-free (1 = off), or the guidance embedding of a guidance-distilled "
        "model (FLUX.1-dev)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initial latents and step noises")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the frozen weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the image grid (.png, .jpg, ...), or for a video model the video of the samples "
        "side by side (.mp4 or .gif); checked before sampling. Default samples.png, or samples.mp4 for videos",
    )
    return p


def _check_sample_args(parser: SampleArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before the model loads, what no model can run: minutes of loading and sampling would be lost."""
    from rlr_lightning.errors import directory_problem, image_file_problem

    if args.lora is None and (args.lora_alpha is not None or args.lora_rank is not None):
        parser.error("--lora-alpha and --lora-rank apply to LoRA weights; pass them with --lora")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1 (the number of sampling steps T), got {args.steps}")
    if args.eta < 0:
        parser.error(f"--eta must be >= 0 (0: the deterministic sampler), got {args.eta}")
    if args.resolution is not None and len(args.resolution) > 2:
        parser.error(f"--resolution takes one or two numbers, got {len(args.resolution)}")
    if args.resolution is not None and min(args.resolution) < 1:
        parser.error(f"--resolution must be positive pixels, got {' '.join(map(str, args.resolution))}")
    if args.lora is not None:
        from rlr_lightning.builtin import BUILTIN_LORAS, resolve_lora

        try:
            args.lora = resolve_lora(args.lora)
        except FileNotFoundError as err:
            parser.error(f"--lora {args.lora}: {err}")
        if not Path(args.lora).expanduser().exists():
            parser.error(
                f"--lora {args.lora}: no such file or directory (built-in LoRAs: {', '.join(BUILTIN_LORAS)})"
            )
    if args.frames is not None and args.frames < 1:
        parser.error(f"--frames must be a positive number of frames, got {args.frames}")
    if not args.fps > 0:
        parser.error(f"--fps must be > 0, got {args.fps}")
    if args.out is not None:
        mp4 = args.out.suffix.lower() == ".mp4"  # PIL writes every other accepted suffix
        problem = directory_problem(args.out.expanduser().parent) if mp4 else image_file_problem(args.out)
        if problem is not None:
            parser.error(f"--out {args.out} cannot be written: {problem}")


def sample(argv: list[str]) -> Path:
    """Run ``rlr sample``; returns the path of the written image grid (or video)."""
    from torchvision.utils import save_image

    from rlr_lightning.builtin import resolve_model
    from rlr_lightning.hub import ModelNotAvailableError
    from rlr_lightning.models import load_backbone
    from rlr_lightning.sampling import Plan

    parser = _sample_parser()
    args = parser.parse_args(argv)
    _check_sample_args(parser, args)
    if args.lora_rank is not None:
        logger.warning(
            "--lora-rank is deprecated and ignored: the rank is read from the --lora file; drop the option"
        )
    try:
        # The family is read from model_index.json before any weights load: a wrong directory fails at once.
        backbone = load_backbone(resolve_model(args.model), dtype=DTYPES[args.dtype]).to(args.device)
    except ModelNotAvailableError as err:  # may work later (network, cache): a failed run, status 1
        raise SystemExit(f"rlr sample: error: --model {args.model}: {err}") from None
    except (OSError, ValueError) as err:  # not a model this command can load: a usage error, status 2
        parser.error(f"--model {args.model}: {err}")
    if args.lora:
        try:
            backbone.load_lora(args.lora, alpha=args.lora_alpha)
        except (OSError, ValueError) as err:
            # The message names the file and what does not fit; a traceback would only bury it.
            raise SystemExit(f"rlr sample: cannot apply --lora: {err}") from None
    video = backbone.video
    out = args.out or Path("samples.mp4" if video else "samples.png")
    if video and out.suffix.lower() not in VIDEO_SUFFIXES:
        parser.error(f"--out {out}: {args.model} is a video model: --out must end in .mp4 or .gif")
    if not video and out.suffix.lower() == ".mp4":
        parser.error(f"--out {out}: {args.model} is an image model: give an image file (.png, .jpg, ...)")
    if args.frames is not None and not video:
        parser.error(f"--frames is for video models (Wan 2.1); {args.model} makes images")
    try:
        size = args.resolution
        backbone.set_resolution(None if size is None else (size[0], size[-1]))
        if video:
            backbone.set_num_frames(args.frames)
        sampler = backbone.make_sampler(args.steps, args.eta, args.guidance, args.timestep_spacing)
    except ValueError as err:
        parser.error(str(err))
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    embeds = backbone.encode_prompts(prompts, negative=sampler.uses_guidance)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        trajectory = sampler.run(Plan(sampler.num_steps), embeds, generator=generator)
        images = backbone.decode(trajectory.final)
    for k in range(sampler.num_steps):
        t, sigma = float(sampler.kernel.timesteps[k]), float(trajectory.sigmas[k])
        if sigma > 0:
            logger.info(
                "step %2d  t=%7.2f  sigma=%.4f  mean log p(s_k+1 | s_k)=%.1f",
                k,
                t,
                sigma,
                float(trajectory.log_probs[k].mean()),
            )
        else:  # no transition density: a deterministic step (eta 0, or outside a flow model's SDE steps)
            logger.info("step %2d  t=%7.2f  deterministic", k, t)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not video:
        save_image(images, out, nrow=min(len(prompts), 4))
        return out
    from torchvision.utils import make_grid

    from rlr_lightning.video import write_gif, write_mp4

    # One video of the samples side by side, as the image grid lays them out: frame k is the grid of frame k.
    frames = torch.stack([make_grid(images[:, k], nrow=min(len(prompts), 4)) for k in range(images.shape[1])])
    (write_gif if out.suffix.lower() == ".gif" else write_mp4)(frames, out, fps=args.fps)
    logger.info("Wrote %d videos of %d frames to %s", len(prompts), images.shape[1], out)
    return out


COMMANDS = {
    "fit": "fine-tune LoRA weights toward a reward (LightningCLI: rlr fit --config configs/quickstart.yaml)",
    "validate": "score a checkpoint on held-out prompts (rlr validate --config ... --ckpt_path .../last.ckpt)",
    "sample": "sample images or videos and per-step log-probabilities (SD 1.x / 2.x, SDXL, SD 3 / 3.5, FLUX.1, "
    "Wan 2.1)",
    "eval": "score a shapes-world model (and LoRA) against its captions, skill by skill, over seeds "
    "(rlr eval --lora shapes-world-aligned --config configs/world_align.yaml)",
    "diagnose": "map where the gradient noise lives, step by step, and recommend RLR's tail and baselines "
    "(rlr diagnose --config configs/quickstart.yaml)",
    "serve-reward": "serve a reward model over HTTP for RemoteReward (rlr serve-reward --reward "
    "rlr_lightning.rewards.TargetColor --port 8000)",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:{width}s} {what}" for name, what in COMMANDS.items())
    return (
        f"usage: rlr COMMAND [options]\n\ncommands:\n{listing}\n\n"
        "rlr COMMAND --help lists a command's options; rlr --version prints the version."
    )


def _configure_logging() -> None:
    """Our INFO messages on stderr, once; Lightning keeps its own handler for its own messages."""
    package = logging.getLogger("rlr_lightning")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)


def _quiet_progress_bars() -> None:
    """No progress bars of transformers and diffusers ("Loading weights", "Writing model shards", ...): they
    draw for every model loaded or saved and say nothing the run's own messages do not. Downloads from the
    hub keep theirs (minutes for a real model), unless HF_HUB_DISABLE_PROGRESS_BARS turns them off."""
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    hub_bars = not huggingface_hub.utils.are_progress_bars_disabled()
    transformers.utils.logging.disable_progress_bar()  # turns off the hub's too
    diffusers.utils.logging.disable_progress_bar()
    if hub_bars:
        huggingface_hub.utils.enable_progress_bars()


def build_cli(argv: list[str] | None, run: bool = True):
    """The ``rlr fit`` / ``rlr validate`` LightningCLI (``run=False`` parses and instantiates only: for tests)."""
    from rlr_lightning.lightning_cli import build

    return build(argv, run=run)


def _lightning_cli(argv: list[str] | None) -> None:
    """Run ``rlr fit`` / ``rlr validate``: errors as a message, not a traceback (``RLR_DEBUG=1`` shows it).

    Exit status 2 for a command line that cannot run (bad option, impossible setting, unreadable checkpoint),
    1 for a run that failed, 128 + signal for a run stopped by SIGTERM / Ctrl+C (after saving a checkpoint).
    """
    import traceback

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from rlr_lightning.lightning_cli import DEBUG_ENV, RunFailed, debug_enabled
    from rlr_lightning.module import TrainingStalledError

    # Errors a user fixes from the message alone; anything else during a run is a bug: keep its traceback.
    user_errors = (ValueError, OSError, ImportError, MisconfigurationException, TrainingStalledError)
    prog = "rlr " + (argv[0] if argv else sys.argv[1])
    try:
        build_cli(argv)
    except Exception as err:
        if debug_enabled():
            raise
        run_failed = isinstance(err, RunFailed)
        cause = err.__cause__ if run_failed and err.__cause__ is not None else err
        if run_failed and not isinstance(cause, user_errors):
            traceback.print_exception(cause)
            sys.exit(1)
        sys.stderr.write(f"{prog}: error: {cause}\n(set {DEBUG_ENV}=1 for the full traceback)\n")
        sys.exit(1 if run_failed else 2)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``rlr`` console script (returns ``None`` so the script exits with status 0)."""
    argv = sys.argv[1:] if args is None else list(args)
    _configure_logging()
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return
    if argv and argv[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(f"rlr {version('rlr_lightning')}")
        return
    if not argv or argv[0] not in COMMANDS:
        sys.exit(_usage())
    try:
        # Not for a reward server: it loads its reward once, and importing diffusers would double its start-up.
        if argv[0] != "serve-reward":
            _quiet_progress_bars()
        if argv[0] == "sample":
            out = sample(argv[1:])
            print(f"wrote {len(out.read_bytes())} bytes of samples to {out}")
        elif argv[0] == "eval":
            from rlr_lightning.eval_cli import evaluate_command

            evaluate_command(argv[1:])
        elif argv[0] == "diagnose":
            from rlr_lightning.diagnose_cli import diagnose

            diagnose(argv[1:])
        elif argv[0] == "serve-reward":
            from rlr_lightning.serve_cli import serve_reward

            serve_reward(argv[1:])
        else:
            # LightningCLI reads sys.argv itself when run as the console script (its DDP launcher re-runs it).
            _lightning_cli(None if args is None else argv)
    except KeyboardInterrupt:
        # Ctrl+C outside a training loop (during training the run stops after its step, with a checkpoint).
        sys.stderr.write("rlr: interrupted\n")
        sys.exit(130)
