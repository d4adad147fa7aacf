"""JPEG size rewards and WeightedSum."""

from __future__ import annotations

import pytest
import torch

from rlr_lightning.rewards import (
    ColorBalance,
    JpegCompressibility,
    JpegIncompressibility,
    TargetColor,
    WeightedSum,
)
from rlr_lightning.rewards.jpeg import jpeg_size_kb

PROMPTS = ["flat", "noise"]


def _flat_and_noise(size: int = 64) -> torch.Tensor:
    flat = torch.tensor([0.8, 0.4, 0.2]).view(3, 1, 1).expand(3, size, size)
    noise = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    return torch.stack([flat, noise])


def test_jpeg_ranks_flat_above_noise_and_is_not_differentiable():
    images = _flat_and_noise().requires_grad_(True)
    comp, incomp = JpegCompressibility(), JpegIncompressibility()
    assert comp.differentiable is False and incomp.differentiable is False
    c, i = comp(images, PROMPTS), incomp(images, PROMPTS)
    assert c.shape == (2,) and c.dtype == torch.float32
    assert c[0] > c[1]  # the flat image compresses better
    assert i[1] > i[0]
    torch.testing.assert_close(c, -i)
    assert not c.requires_grad and not i.requires_grad  # no gradient reaches the images
    # Sizes in kB: a 64x64 noise image at quality 95 is several kB, a flat one well under 2 kB.
    assert i[1] > 4 and i[0] < 2


def test_jpeg_quality_changes_the_size():
    images = _flat_and_noise()
    assert (jpeg_size_kb(images[1:], 30) < jpeg_size_kb(images[1:], 95)).all()
    torch.testing.assert_close(JpegIncompressibility(quality=30)(images, PROMPTS), jpeg_size_kb(images, 30))
    with pytest.raises(ValueError):
        JpegCompressibility(quality=0)


def test_weighted_sum_equals_sum_of_parts_and_passes_gradients():
    parts = [TargetColor(), ColorBalance()]
    total = WeightedSum(parts, [0.5, -2.0])
    assert total.differentiable
    images = torch.rand(3, 3, 8, 8, requires_grad=True)
    prompts = ["a", "b", "c"]
    out = total(images, prompts)
    expected = 0.5 * parts[0](images, prompts) - 2.0 * parts[1](images, prompts)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert WeightedSum(parts)(images, prompts).allclose(parts[0](images, prompts) + parts[1](images, prompts))


def test_weighted_sum_with_a_non_differentiable_part():
    total = WeightedSum([TargetColor(), JpegCompressibility()], [1.0, 0.1])
    assert total.differentiable is False
    images = _flat_and_noise().requires_grad_(True)
    out = total(images, PROMPTS)
    assert not out.requires_grad
    expected = TargetColor()(images, PROMPTS) + 0.1 * JpegCompressibility()(images, PROMPTS)
    torch.testing.assert_close(out, expected.detach())


def test_weighted_sum_validates_and_registers_parts():
    with pytest.raises(ValueError, match="weights"):
        WeightedSum([TargetColor()], [1.0, 2.0])
    with pytest.raises(ValueError):
        WeightedSum([])
    total = WeightedSum([TargetColor(), ColorBalance()])
    assert len(list(total.children())[0]) == 2  # parts are submodules: they move with the sum
    assert total.to(torch.float64).rewards[0].color.dtype == torch.float64
