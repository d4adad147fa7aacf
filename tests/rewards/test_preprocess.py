"""The differentiable CLIP preprocessing against the PIL / image-processor pipelines it replaces.

Tolerance: the reference pipelines resize uint8 images (PIL resizes in two separable passes with fixed-point
weights and rounds to uint8 after each), ours resizes float tensors with the same antialiased bicubic
kernel. On a non-square image with noise the two differ by at most 4/255 per pixel (mean about 0.3/255,
i.e. uint8 rounding) at 224 px, so the tests allow 5/255 max and 0.5/255 mean, in [0, 1] pixel units. A
one-pixel shift of the crop gives a mean error of about 16/255, far outside this band.
"""

from __future__ import annotations

import pytest
import torch

from rlr_lightning.rewards import CLIPPreprocess
from tests.rewards import save_tiny_open_clip, smooth_uint8_image, to_pil

MAX_ERR, MEAN_ERR = 5 / 255, 0.5 / 255


def _pixel_error(ours: torch.Tensor, ref: torch.Tensor, std) -> tuple[float, float]:
    # Back to [0, 1] pixel units, where the tolerance means something independent of the normalisation.
    diff = (ours - ref).abs() * torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return diff.max().item(), diff.mean().item()


def test_matches_open_clip_preprocess_of_tiny_model(tmp_path):
    import open_clip

    from rlr_lightning.rewards.openclip_loader import resolve_model_name

    files = save_tiny_open_clip(tmp_path)
    name = resolve_model_name(files["config"])
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=files["checkpoint"])
    ours_pre = CLIPPreprocess.from_open_clip(model)
    # 45 x 61 resizes to 32 x 43 and crops 32 x 32 with an odd margin (11), where torchvision rounds.
    image = smooth_uint8_image(45, 61)
    ref = preprocess(to_pil(image[0])).unsqueeze(0)
    ours = ours_pre(image.float() / 255)
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    max_err, mean_err = _pixel_error(ours, ref, model.visual.preprocess_cfg["std"])
    assert max_err <= MAX_ERR and mean_err <= MEAN_ERR, (max_err, mean_err)
    # The crop offset matters: transformers' floor rounding is one pixel off here and fails the tolerance.
    shifted = CLIPPreprocess(32, resize=32, crop_rounding="floor")(image.float() / 255)
    assert _pixel_error(shifted, ref, model.visual.preprocess_cfg["std"])[1] > 10 * MEAN_ERR


@pytest.mark.parametrize("shape", [(300, 451), (451, 300)])
def test_matches_open_clip_image_transform_at_224(shape):
    import open_clip

    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    transform = open_clip.image_transform(
        224, is_train=False, mean=mean, std=std, interpolation="bicubic", resize_mode="shortest"
    )
    image = smooth_uint8_image(*shape, seed=1)
    ref = transform(to_pil(image[0])).unsqueeze(0)
    ours = CLIPPreprocess(224, mean, std, resize=224)(image.float() / 255)
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    max_err, mean_err = _pixel_error(ours, ref, std)
    assert max_err <= MAX_ERR and mean_err <= MEAN_ERR, (max_err, mean_err)


def test_matches_transformers_clip_image_processor():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=(0.5, 0.4, 0.3),
        image_std=(0.2, 0.25, 0.3),
    )
    ours_pre = CLIPPreprocess.from_image_processor(processor)
    assert ours_pre.crop_rounding == "floor"
    image = smooth_uint8_image(45, 61, seed=2)
    ref = processor(images=[to_pil(image[0])], return_tensors="pt")["pixel_values"]
    ours = ours_pre(image.float() / 255)
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    max_err, mean_err = _pixel_error(ours, ref, processor.image_std)
    assert max_err <= MAX_ERR and mean_err <= MEAN_ERR, (max_err, mean_err)


def test_differentiable_and_moves_with_module():
    pre = CLIPPreprocess(16, resize=16)
    assert pre.state_dict() == {}  # constants are non-persistent buffers: nothing enters checkpoints
    pre = pre.to(torch.float64)
    assert pre.mean.dtype == torch.float64
    images = torch.rand(2, 3, 20, 30, requires_grad=True)
    out = pre(images)
    assert out.shape == (2, 3, 16, 16)
    out.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_squash_resize_and_bad_config():
    pre = CLIPPreprocess((8, 12), resize=(8, 12))
    assert pre(torch.rand(1, 3, 40, 20)).shape == (1, 3, 8, 12)
    with pytest.raises(ValueError, match="interpolation"):
        CLIPPreprocess(8, interpolation="lanczos")  # type: ignore[arg-type]
