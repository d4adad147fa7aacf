"""The CLIP-based rewards on tiny random backbones, loaded through the same code as the real weights.

Each reward is checked for its contract (shape (B,), float32, frozen, gradients reach the images) and
against the reference pipeline of its model (PIL / image-processor preprocessing, then the published
scoring formula). The reference tolerance comes from the preprocessing (see test_preprocess.py): pixel
differences of a few 1/255 move the scores of these random models by well under 1 %.
"""

from __future__ import annotations

import pytest
import torch

from rlr_lightning.rewards import (
    AestheticHead,
    AestheticReward,
    CLIPScoreReward,
    HPSv2Reward,
    PickScoreReward,
    RewardModel,
)
from tests.rewards import (
    save_tiny_aesthetic_head,
    save_tiny_open_clip,
    save_tiny_pickscore,
    smooth_uint8_image,
    to_pil,
)

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night"]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-rewards")
    files = save_tiny_open_clip(root / "open_clip")
    files["head"] = save_tiny_aesthetic_head(root / "head.pth", input_size=16)
    files["pickscore"] = save_tiny_pickscore(root / "pickscore")
    return files


@pytest.fixture(scope="module")
def rewards(tiny_files) -> dict[str, RewardModel]:
    f = tiny_files
    return {
        "aesthetic": AestheticReward(
            head_path=f["head"], clip_model=f["config"], clip_pretrained=f["checkpoint"]
        ),
        "clip_score": CLIPScoreReward(clip_model=f["config"], pretrained=f["checkpoint"]),
        "hps": HPSv2Reward(checkpoint_path=f["hps_checkpoint"], clip_model=f["config"]),
        "pickscore": PickScoreReward(
            model_name_or_path=f["pickscore"], processor_name_or_path=f["pickscore"]
        ),
    }


def _images(batch: int = 2) -> torch.Tensor:
    # Non-square and larger than the 32-px models, so resize and crop both act.
    return torch.cat([smooth_uint8_image(45, 61, seed=i) for i in range(batch)]).float() / 255


@pytest.mark.parametrize("name", ["aesthetic", "clip_score", "hps", "pickscore"])
def test_contract_shape_dtype_frozen_and_gradient(rewards, name):
    reward = rewards[name]
    assert reward.differentiable
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    reward.train()
    assert not reward.training  # pinned to eval: dropout of the aesthetic head stays off
    images = _images().requires_grad_(True)
    out = reward(images, PROMPTS)
    assert out.shape == (2,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    # Deterministic (eval mode): the same call gives the same rewards.
    torch.testing.assert_close(reward(images.detach(), PROMPTS), out.detach())


def test_aesthetic_matches_reference_pipeline(rewards, tiny_files):
    import open_clip

    from rlr_lightning.rewards.openclip_loader import resolve_model_name

    name = resolve_model_name(tiny_files["config"])
    clip, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=tiny_files["checkpoint"], force_quick_gelu=True
    )
    clip.eval()
    head = AestheticHead.from_file(tiny_files["head"]).eval()
    images = _images()
    with torch.no_grad():
        pixels = torch.stack([preprocess(to_pil((im * 255).round().to(torch.uint8))) for im in images])
        emb = clip.encode_image(pixels)
        expected = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
        got = rewards["aesthetic"](images, PROMPTS)
    # Observed difference 1e-5 (pixel rounding); a GELU instead of QuickGELU tower is 8e-5 off, the spread of
    # the scores of these images 2e-3.
    torch.testing.assert_close(got, expected, rtol=0, atol=3e-5)


def test_clip_score_matches_reference_and_hps_reads_its_checkpoint_format(rewards, tiny_files):
    import open_clip

    from rlr_lightning.rewards.openclip_loader import resolve_model_name

    name = resolve_model_name(tiny_files["config"])
    clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tiny_files["checkpoint"])
    clip.eval()
    tokenizer = open_clip.get_tokenizer(name)
    images = _images()
    with torch.no_grad():
        pixels = torch.stack([preprocess(to_pil((im * 255).round().to(torch.uint8))) for im in images])
        img = clip.encode_image(pixels, normalize=True)
        txt = clip.encode_text(tokenizer(PROMPTS), normalize=True)
        cosine = (img @ txt.T).diagonal()  # one score per image with its own prompt
        clip_score = rewards["clip_score"](images, PROMPTS)
        hps = rewards["hps"](images, PROMPTS)
    # Observed difference 0.015 on scores of order 30; resizing without normalisation is off by 1 to 4.
    torch.testing.assert_close(clip_score, 100 * cosine, rtol=1e-3, atol=0.05)
    # HPS saved as {"state_dict": {"module.*": ...}} loads into the same weights: the same cosine, unscaled.
    torch.testing.assert_close(hps, clip_score / 100, rtol=1e-5, atol=1e-6)
    # Prompts matter: swapping them changes each image's score.
    assert not torch.allclose(rewards["clip_score"](images, PROMPTS[::-1]), clip_score)


def test_pickscore_matches_transformers_pipeline(rewards, tiny_files):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_files["pickscore"], local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(tiny_files["pickscore"], local_files_only=True)
    images = _images()
    pil = [to_pil((im * 255).round().to(torch.uint8)) for im in images]
    inputs = processor(
        images=pil, text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.diagonal()  # logit_scale.exp() * cosine, own prompt
        got = rewards["pickscore"](images, PROMPTS)
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=0.05)


def test_rewards_follow_dtype_and_state_dict_holds_the_model(tiny_files):
    reward = CLIPScoreReward(clip_model=tiny_files["config"], pretrained=tiny_files["checkpoint"])
    # Registered as submodules: moving the reward moves the CLIP model and the preprocessing constants.
    assert any(k.startswith("clip.") for k in reward.state_dict())
    reward = reward.to(torch.bfloat16)
    assert reward.preprocess.mean.dtype == torch.bfloat16
    out = reward(_images(), PROMPTS)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_aesthetic_head_width_must_match_clip(tmp_path, tiny_files):
    wide_head = save_tiny_aesthetic_head(tmp_path / "head768.pth", input_size=768)
    with pytest.raises(ValueError, match="768"):
        AestheticReward(
            head_path=wide_head, clip_model=tiny_files["config"], clip_pretrained=tiny_files["checkpoint"]
        )


def test_unknown_model_and_tag_are_explained(tiny_files):
    with pytest.raises(ValueError, match="unknown open_clip model"):
        CLIPScoreReward(clip_model="No-Such-Model", pretrained=tiny_files["checkpoint"])
    with pytest.raises(ValueError, match="pretrained tag"):
        CLIPScoreReward(clip_model="ViT-B-32", pretrained="no_such_tag")


@pytest.mark.parametrize("name", ["aesthetic", "clip_score", "hps", "pickscore"])
def test_bf16_autocast_keeps_float32_rewards_and_gradients(rewards, name):
    images = _images().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rewards[name](images, PROMPTS)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # bf16 matmuls move the scores a little, not their meaning.
    reference = rewards[name](images.detach(), PROMPTS)
    torch.testing.assert_close(out.detach(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["aesthetic", "clip_score", "hps", "pickscore"])
def test_diversity_features_are_the_embedding_the_reward_scores(rewards, tiny_files, name):
    """Diversity is measured on the image embedding the reward itself scores: fed to the reward's own
    scoring formula (the head, the cosine with the prompt), the features give back the reward."""
    import torch.nn.functional as F

    from rlr_lightning.evaluation import image_features

    reward = rewards[name]
    images = _images()
    with torch.no_grad():
        features = image_features(images, reward)
        expected = reward(images, PROMPTS)
        if name == "aesthetic":
            rescored = reward.head(features).squeeze(-1)
        elif name == "pickscore":
            tokens = reward.tokenizer(PROMPTS, padding=True, return_tensors="pt")
            text = reward.clip.get_text_features(**tokens)
            text = F.normalize(text if isinstance(text, torch.Tensor) else text.pooler_output, dim=-1)
            rescored = reward.clip.logit_scale.exp() * (features * text).sum(-1)
        else:
            text = reward.clip.encode_text(reward.tokenizer(PROMPTS), normalize=True)
            rescored = reward.scale * (features * text).sum(-1)
    assert features.shape == (2, 16) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(rescored, expected, rtol=1e-5, atol=1e-5)
    # Not the pixel fallback, which would have 3 x 16 x 16 dimensions.
    assert image_features(images).shape == (2, 768)


def test_weighted_sum_measures_diversity_with_its_first_embedding_and_pixel_rewards_fall_back(rewards):
    from rlr_lightning.evaluation import image_features
    from rlr_lightning.rewards import (
        ColorBalance,
        JpegCompressibility,
        TargetColor,
        WeightedSum,
    )

    images = _images()
    pixels = image_features(images)
    with torch.no_grad():
        clip = image_features(images, rewards["clip_score"])
        mixed = WeightedSum([TargetColor(), rewards["clip_score"], rewards["pickscore"]], [1.0, 0.1, 0.1])
        torch.testing.assert_close(image_features(images, mixed), clip)
    for reward in (TargetColor(), JpegCompressibility(), WeightedSum([TargetColor(), ColorBalance()])):
        assert reward.image_embedding(images) is None
        torch.testing.assert_close(image_features(images, reward), pixels)
