"""The trainable (LoRA) weights cast once for a stretch of no-grad steps under autocast, instead of on every call.

Under mixed precision (Lightning's ``bf16-mixed``: frozen bf16 weights, float32 LoRA weights, autocast) every LoRA
layer's linear op casts its float32 weights to bf16 on every call: hundreds of small copy kernels per
denoiser step, which leave a launch-bound GPU waiting. In a stretch of steps without gradient the weights do not
change, so :func:`lora_cast_once` casts them once, to autocast's dtype, for the stretch, and puts the float32
tensors back after it. Autocast's own cast of a weight is the same rounding, so the samples are bit for bit
those of casting on every call (``tests/test_sampling.py``). Steps that need the float32 weights keep them:
steps with gradient (the weights are leaves of the graph), and steps at perturbed weights (``theta + u`` is
formed in float32 first).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def lora_cast_once(module: nn.Module, device_type: str) -> Iterator[None]:
    """Within the block, ``module``'s trainable weights are copies in autocast's dtype when autocast is on for
    ``device_type`` and gradients are off; its own parameters are back on exit. A no-op otherwise.

    The copies replace the parameters in their modules (as ``torch.func.functional_call`` does), rather than
    the parameters' ``.data``: changing a leaf's dtype through ``.data`` resets its gradient accumulator,
    which would cut it out of the graph of an earlier window of the same trajectory.

    Args:
        module: The denoiser network, whose parameters with ``requires_grad`` are its LoRA weights.
        device_type: The device type it runs on (``cuda``, ``cpu``).
    """
    if torch.is_grad_enabled() or not torch.is_autocast_enabled(device_type):
        yield
        return
    dtype = torch.get_autocast_dtype(device_type)
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for name, param in module.named_parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            path, _, attr = name.rpartition(".")
            swapped.append((module.get_submodule(path), attr, param))
    for holder, attr, param in swapped:
        holder._parameters[attr] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
    try:
        yield
    finally:
        for holder, attr, param in swapped:
            holder._parameters[attr] = param
