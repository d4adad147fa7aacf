"""``rlr serve-reward``: serve a reward model over HTTP for :class:`~rlr_lightning.rewards.RemoteReward`.

    rlr serve-reward --reward rlr_lightning.rewards.TargetColor --reward.init_args.scale 50 --port 8000
    rlr serve-reward --config reward_server.yaml          # reward: {class_path: ..., init_args: ...}, port: ...

The reward is given as ``rlr fit`` takes ``model.reward`` (a class path of this package or any importable
``RewardModel`` subclass, and its init args), parsed by jsonargparse. The server runs until Ctrl+C or SIGTERM
(:func:`rlr_lightning.rewards.server.serve`); ``--port 0`` picks a free port, and the URL it serves on is
logged once it listens.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from rlr_lightning.errors import short_config_error, yaml_syntax_error
from rlr_lightning.rewards import RewardModel

logger = logging.getLogger(__name__)

PROG = "rlr serve-reward"
#: Set to 1 for full tracebacks: the switch of ``rlr fit`` (``rlr_lightning.lightning_cli.DEBUG_ENV``), read
#: here without importing Lightning, which would double the server's start-up time.
DEBUG_ENV = "RLR_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


class ServeArgumentParser(ArgumentParser):
    """Errors as one line (the option, the bad value, what is valid) and a pointer to ``--help``."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or debug_enabled():
            return super().error(message, ex)  # nested parsers raise for jsonargparse to handle
        message = (short_config_error(ex) if ex is not None else None) or message.splitlines()[0]
        sys.stderr.write(f"{PROG}: error: {message}\n({PROG} --help lists the options)\n")
        self.exit(2)

    def parse_path(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        problem = yaml_syntax_error(path)
        if problem is not None:
            raise TypeError(problem)
        return super().parse_path(path, *args, **kwargs)


def parser() -> ServeArgumentParser:
    from rlr_lightning.rewards.server import DEFAULT_MAX_REQUEST_MB

    p = ServeArgumentParser(
        prog=PROG,
        description="Serve a reward model over HTTP (POST /score, GET /info) for training with "
        "rlr_lightning.rewards.RemoteReward. Runs until Ctrl+C or SIGTERM.",
    )
    p.add_argument(
        "--config", action=ActionConfigFile, help="a YAML file of these options (reward:, host:, ...)"
    )
    p.add_argument(
        "--reward",
        type=RewardModel,
        required=True,
        help="the reward model to serve: a class path (rlr_lightning.rewards.TargetColor, or your own "
        "RewardModel subclass) and its init args (--reward.init_args.NAME VALUE); --reward.help CLASS lists them",
    )
    p.add_argument(
        "--host",
        type=str,
        default="127.0.0.1",
        help="the address to listen on: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface: anyone who "
        "can reach the port can use the server)",
    )
    p.add_argument("--port", type=int, default=8000, help="the port to listen on; 0 picks a free one")
    p.add_argument(
        "--device",
        type=str,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the reward runs: cpu, cuda, cuda:1, ... (default: cuda when there is one)",
    )
    p.add_argument(
        "--max_request_mb",
        type=float,
        default=DEFAULT_MAX_REQUEST_MB,
        help="the largest request accepted, in MiB (RemoteReward's batch_size bounds its requests)",
    )
    return p


def serve_reward(argv: list[str]) -> None:
    """Run ``rlr serve-reward`` until Ctrl+C or SIGTERM."""
    from rlr_lightning.rewards.server import serve

    p = parser()
    cfg = p.parse_args(argv)
    if not 0 <= cfg.port < 65536:
        p.error(f"--port must be in 0-65535 (0 picks a free one), got {cfg.port}")
    try:
        device = torch.device(cfg.device)
    except RuntimeError as err:
        p.error(f"--device {cfg.device}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu")
    try:
        reward = p.instantiate(cfg).reward
    except (ValueError, OSError, ImportError, TypeError) as err:  # the reward's own check of its init args
        if debug_enabled():
            raise
        message = short_config_error(err, cfg) or f"--reward {cfg.reward.class_path}: {err}"
        sys.stderr.write(f"{PROG}: error: {message}\n(set {DEBUG_ENV}=1 for the full traceback)\n")
        sys.exit(2)
    try:
        serve(reward, cfg.host, cfg.port, device, cfg.max_request_mb)
    except OSError as err:  # the port is taken, the host is not this machine's
        if debug_enabled():
            raise
        sys.stderr.write(f"{PROG}: error: {err}\n(set {DEBUG_ENV}=1 for the full traceback)\n")
        sys.exit(1)
