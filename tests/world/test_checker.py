"""The exact checker: counts, colours and positions of shapes recovered from pixels, clean and degraded."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur

from rlr_lightning.world import (
    PALETTE,
    CaptionSpec,
    Scene,
    Shape,
    ShapesWorldDataset,
    check,
    find_blobs,
    render,
)

OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def examples(size: int, n: int, seed: int):
    data = ShapesWorldDataset("train", num_examples=n, image_size=size, seed=seed, max_distractors=3)
    return [data.example(i) for i in range(n)]


def degrade(images: torch.Tensor, sigma_px: float, noise: float, seed: int = 0) -> torch.Tensor:
    """Gaussian blur of ``sigma_px`` pixels plus Gaussian noise: a stand-in for a generator's soft pixels."""
    kernel = 2 * round(2.5 * sigma_px) + 1
    blurred = gaussian_blur(images, [kernel, kernel], [sigma_px, sigma_px])
    return (blurred + noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))).clamp(
        0, 1
    )


def assert_blobs_match_scene(image: torch.Tensor, scene: Scene, tolerance: float) -> None:
    blobs = find_blobs(image)
    for colour in PALETTE:
        truth = sorted(s.centroid for s in scene.shapes if s.color == colour)
        found = sorted(b.centroid for b in blobs[colour])
        assert len(found) == len(truth), (colour, found, truth)
        for t in truth:  # every true shape has a found one at its centroid
            assert min(max(abs(t[0] - f[0]), abs(t[1] - f[1])) for f in found) < tolerance, (colour, t, found)


@pytest.mark.parametrize("size", [32, 64])
def test_clean_renders_are_read_exactly(size):
    batch = examples(size, 80, seed=size)
    for example in batch:
        assert_blobs_match_scene(example.image, example.scene, tolerance=0.02)
    result = check(torch.stack([e.image for e in batch]), [e.spec for e in batch])
    assert set(result) == {"color_ok", "count_ok", "position_ok", "all_ok"}
    for name, passed in result.items():
        assert passed.dtype == torch.bool and passed.shape == (80,)
        assert passed.all(), (name, [batch[i].caption for i in (~passed).nonzero().flatten().tolist()])


@pytest.mark.parametrize("size", [32, 64])
def test_blurred_noisy_renders_are_still_read_right(size):
    batch = examples(size, 80, seed=100 + size)
    # Mild: a blur of 0.8 px at 32 px (the same blur relative to the scene at 64 px) and noise of 0.05.
    images = degrade(torch.stack([e.image for e in batch]), sigma_px=0.8 * size / 32, noise=0.05)
    for image, example in zip(images, batch):
        assert_blobs_match_scene(image, example.scene, tolerance=0.03)
    result = check(images, [e.caption for e in batch])
    assert result["all_ok"].all()


def test_wrong_captions_fail_the_check_that_they_break():
    batch = [e for e in examples(32, 60, seed=5) if e.spec.region in OPPOSITE]
    images = torch.stack([e.image for e in batch])
    specs = [e.spec for e in batch]

    wrong_count = [dataclasses.replace(s, count=s.count + 1 if s.count < 4 else 3) for s in specs]
    result = check(images, wrong_count)
    assert not result["count_ok"].any() and not result["all_ok"].any()
    assert result["color_ok"].all() and result["position_ok"].all()

    wrong_side = [dataclasses.replace(s, region=OPPOSITE[s.region]) for s in specs]
    result = check(images, wrong_side)
    assert not result["position_ok"].any() and not result["all_ok"].any()
    assert result["count_ok"].all()

    absent = []
    for e in batch:
        present = {s.color for s in e.scene.shapes}
        absent.append(dataclasses.replace(e.spec, color=next(c for c in PALETTE if c not in present)))
    result = check(images, absent)
    assert not result["color_ok"].any() and not result["count_ok"].any() and not result["position_ok"].any()


def test_an_empty_or_off_palette_image_holds_no_shapes():
    grey = torch.full((1, 3, 32, 32), 0.5)
    orange = render(Scene((Shape("square", "red", 0.5, 0.5, 0.3),)), 32).unsqueeze(0)
    orange[:, 1] = orange[:, 0] * 0.5  # red with half of green mixed in: not a palette colour
    for image in (torch.zeros(1, 3, 32, 32), grey, orange):
        assert all(not blobs for blobs in find_blobs(image[0]).values())
    specks = torch.zeros(1, 3, 64, 64)
    specks[0, 0, 10:13, 10:13] = 1.0  # a 9-pixel red speck: below the smallest shape (20 px at 64 px)
    assert check(specks, ["a red circle"])["color_ok"].tolist() == [False]


def test_bad_inputs_fail_early_naming_the_value():
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"2 images but 1 captions"):
        check(images, ["a red circle"])
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\), got \(3, 32, 32\)"):
        check(images[0], ["a red circle"])
    with pytest.raises(ValueError, match="color_threshold must be an RGB distance in \\(0, 0.5\\), got 0.7"):
        check(images, ["a red circle"] * 2, color_threshold=0.7)
    with pytest.raises(ValueError, match="'a cat' is not a shapes-world caption"):
        check(images, ["a red circle", "a cat"])
    assert check(images, [CaptionSpec("red", "circle", 1)] * 2)["all_ok"].tolist() == [False, False]
