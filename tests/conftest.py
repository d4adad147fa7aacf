"""Shared fixtures: tiny offline models, and a guard that no test reaches the network."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads these once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
# The suite runs on pytest-xdist workers, one per core (setup.cfg). A worker, and every command it starts, then
# uses one thread: two torch processes with a thread per core each spin against each other and run several
# times slower than one, while the tiny models here gain little from a second thread.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import logging  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Imported before the first test's logging snapshot (below), so the handlers these libraries add to their own
# loggers on import belong to the session, not to whichever test happens to import them first.
import diffusers  # noqa: E402, F401
import lightning.pytorch  # noqa: E402, F401
import transformers  # noqa: E402, F401

# Lightning gives its logger a stderr handler and stops propagation when the root logger has no handler at
# import time, as here (pytest adds its capture handlers later); tests read rank_zero_info lines (the memory
# plan, the run directory) through caplog, so they propagate as they do when pytest is already capturing.
for _name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).propagate = True

#: Loggers that code under test configures (``rlr`` commands run in-process set up the package's logger; the
#: libraries set their verbosity), created here if nothing has created them yet, so they are snapshotted too.
_CONFIGURED_LOGGERS = (
    "rlr_lightning",
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "diffusers",
    "transformers",
    "huggingface_hub",
    "py.warnings",
)

_LOOPBACK = ("127.", "::1", "localhost")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail loudly if a test tries to reach anything but this machine (DDP tests use loopback)."""
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.family != socket.AF_UNIX and not str(host).startswith(_LOOPBACK):
            raise RuntimeError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)


@pytest.fixture(autouse=True)
def _isolated_logging():
    """Every test starts with the session's logging configuration, whichever tests ran before it.

    ``rlr`` commands run in-process give the package's logger a stderr handler at INFO, and libraries change
    their loggers' levels; left in place, a later test that inspects log records would see messages (e.g. an
    INFO "Loading ..." line) that it sees only when run after those tests, so the suite would pass in one
    order and fail in another.
    """
    for name in _CONFIGURED_LOGGERS:
        logging.getLogger(name)
    loggers = [logging.root] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    saved = [(lg, lg.level, list(lg.handlers), list(lg.filters), lg.propagate, lg.disabled) for lg in loggers]
    yield
    for lg, level, handlers, filters, propagate, disabled in saved:
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.filters[:] = filters
        lg.propagate, lg.disabled = propagate, disabled


@pytest.fixture(autouse=True)
def _no_inherited_wandb_service():
    """A W&B run in the pytest process sets WANDB_SERVICE to its service; a later test's ``rlr fit`` subprocess
    would inherit it and register its runs there, where they outlive the subprocess (a resume then fails with
    "run ID ... is in use")."""
    yield
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A tiny Stable-Diffusion-shaped pipeline saved as a normal diffusers directory."""
    from rlr_lightning.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A tiny SDXL pipeline saved as a normal diffusers directory."""
    from rlr_lightning.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), family="sdxl")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny Stable Diffusion 3.5 pipeline saved as a normal diffusers directory."""
    from rlr_lightning.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd3"), family="sd3")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny FLUX.1-dev-shaped pipeline (guidance-distilled) saved as a normal diffusers directory."""
    from rlr_lightning.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-flux"), family="flux")


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    """A tiny Wan 2.1 text-to-video pipeline saved as a normal diffusers directory."""
    from rlr_lightning.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-wan"), family="wan")


@pytest.fixture
def tiny_scheduler(tiny_pipeline_dir):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_pretrained(tiny_pipeline_dir, subfolder="scheduler", local_files_only=True)


def perturb_lora_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move every LoRA weight away from its initialisation (where LoRA B is zero and proves nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


@pytest.fixture
def tiny_unet(tiny_pipeline_dir):
    """The tiny UNet, frozen, with a rank-4 LoRA adapter whose weights are moved off their initialisation."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet", local_files_only=True)
    unet.requires_grad_(False).eval()
    # LoRA A is drawn from the global RNG: seeded here, so the problem is the same whatever ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet.add_adapter(
            LoraConfig(
                r=4,
                lora_alpha=4,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
    perturb_lora_(unet)
    return unet
