"""The shapes world's scenes and captions: determinism, truth of every caption, rendering, the split."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlr_lightning.world import (
    PALETTE,
    REGION_MARGIN,
    CaptionSpec,
    Scene,
    Shape,
    ShapesWorldDataset,
    all_specs,
    caption,
    parse_caption,
    render,
    sample_example,
    sample_scene,
    split_specs,
)
from rlr_lightning.world.scenes import MAX_SHAPES

# ---- an independent reading of a scene object (geometry from the shape's corners, not the module's code) ----


def vertices_centroid(shape: Shape) -> tuple[float, float]:
    """Centre of mass from first principles: a triangle's is the mean of its corners (apex up, base down)."""
    if shape.kind == "triangle":
        h = shape.size / 2
        corners = [(shape.x, shape.y - h), (shape.x - h, shape.y + h), (shape.x + h, shape.y + h)]
        return sum(c[0] for c in corners) / 3, sum(c[1] for c in corners) / 3
    return shape.x, shape.y


def inside(point: tuple[float, float], region: str, margin: float = 0.0) -> bool:
    """The documented regions, shrunk by ``margin`` on every side that borders another region."""
    x, y = point
    return {
        "left": x < 0.5 - margin,
        "right": x > 0.5 + margin,
        "top": y < 0.5 - margin,
        "bottom": y > 0.5 + margin,
        "center": abs(x - 0.5) < 0.25 - margin and abs(y - 0.5) < 0.25 - margin,
        "anywhere": True,
    }[region]


def caption_is_true(scene: Scene, spec: CaptionSpec, margin: float = 0.0) -> bool:
    asked = [s for s in scene.shapes if s.color == spec.color]
    return (
        len(asked) == spec.count
        and all(s.kind == spec.kind for s in asked)
        and all(inside(vertices_centroid(s), spec.region, margin) for s in asked)
    )


def boxes_disjoint(a: Shape, b: Shape) -> bool:
    reach = (a.size + b.size) / 2
    return abs(a.x - b.x) > reach or abs(a.y - b.y) > reach


# ---- tests ----


def test_same_seed_gives_identical_pixels_and_captions_and_other_seeds_differ():
    first = ShapesWorldDataset("train", num_examples=50, seed=7)
    again = ShapesWorldDataset("train", num_examples=50, seed=7)
    other = ShapesWorldDataset("train", num_examples=50, seed=8)
    order = [13, 2, 49, 2, 0]  # access order must not matter: each item comes from its index alone
    for i in order:
        assert torch.equal(first[i]["image"], again[i]["image"])
        assert first[i]["caption"] == again[i]["caption"]
    assert torch.equal(first[-1]["image"], again[49]["image"])
    same = sum(torch.equal(first[i]["image"], other[i]["image"]) for i in range(20))
    assert same == 0
    a = sample_example(torch.Generator().manual_seed(3), "held_out")
    b = sample_example(torch.Generator().manual_seed(3), "held_out")
    assert torch.equal(a.image, b.image) and a.caption == b.caption and a.scene == b.scene


def test_every_caption_is_true_of_its_scene_for_every_combination():
    generator = torch.Generator().manual_seed(0)
    for spec in all_specs():
        for _ in range(2):
            scene = sample_scene(spec, generator, max_distractors=3)
            assert caption_is_true(scene, spec), (caption(spec), scene)
            # The promised margin: pixel rounding and blur cannot move a centroid out of its region.
            assert caption_is_true(scene, spec, margin=REGION_MARGIN), (caption(spec), scene)
            # The captioned shapes plus at most 3 distractors, never more than MAX_SHAPES in all.
            assert spec.count <= len(scene.shapes) <= min(MAX_SHAPES, spec.count + 3)
            for shape in scene.shapes:  # whole shapes inside the image
                assert shape.size / 2 <= shape.x <= 1 - shape.size / 2
                assert shape.size / 2 <= shape.y <= 1 - shape.size / 2
            for a, b in itertools.combinations(scene.shapes, 2):
                assert boxes_disjoint(a, b), (caption(spec), a, b)


def test_dataset_captions_are_true_of_their_scenes_and_batch_with_the_default_collate():
    data = ShapesWorldDataset("train", num_examples=64, image_size=32, max_distractors=2, seed=1)
    for i in range(len(data)):
        example = data.example(i)
        assert example.caption == caption(example.spec)
        assert caption_is_true(example.scene, example.spec)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=16)))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert len(batch["caption"]) == 16 and all(isinstance(c, str) for c in batch["caption"])
    # Scenes hold more than one colour when distractors are allowed (the captions leave those out).
    assert any(len({s.color for s in data.example(i).scene.shapes}) > 1 for i in range(len(data)))


@pytest.mark.parametrize("kind, area", [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_render_draws_each_shape_with_its_area_colour_and_centroid(kind, area):
    shape = Shape(kind, "yellow", 0.4, 0.6, 0.28)
    image = render(Scene((shape,)), size=64)
    assert image.shape == (3, 64, 64)
    # Yellow has no blue and equal red and green: the picture holds the shape's colour and nothing else.
    assert torch.equal(image[0], image[1]) and image[2].abs().max() == 0
    coverage = image[0]
    assert coverage.sum().item() / 64**2 == pytest.approx(area * shape.size**2, rel=0.03)
    coords = (torch.arange(64) + 0.5) / 64
    cx = (coverage * coords.view(1, -1)).sum() / coverage.sum()
    cy = (coverage * coords.view(-1, 1)).sum() / coverage.sum()
    expected = vertices_centroid(shape)
    assert (cx.item(), cy.item()) == pytest.approx(expected, abs=0.01)
    if kind == "triangle":  # apex up: the top half holds less of the shape than the bottom half
        assert coverage[:38].sum() < coverage[38:].sum()


def test_render_is_the_same_scene_at_any_size():
    scene = sample_scene(CaptionSpec("red", "circle", 2, "left"), torch.Generator().manual_seed(4))
    small, large = render(scene, 32), render(scene, 64)
    assert torch.allclose(torch.nn.functional.avg_pool2d(large.unsqueeze(0), 2)[0], small, atol=0.13)


def test_held_out_combinations_never_appear_in_training_and_are_reproducible():
    train, held_out = split_specs(seed=0)
    assert not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(all_specs())
    assert len(held_out) == round(0.2 * len(all_specs()))
    assert split_specs(seed=0) == (train, held_out)
    assert set(split_specs(seed=1)[1]) != set(held_out)

    # Held out are combinations: every pair of attribute values is still seen in training.
    def values(spec):
        return (spec.color, spec.kind, spec.count, spec.region)

    for spec in held_out:
        for i, j in itertools.combinations(range(4), 2):
            assert any(values(t)[i] == values(spec)[i] and values(t)[j] == values(spec)[j] for t in train)
    held_captions = {caption(s) for s in held_out}
    train_data = ShapesWorldDataset("train", num_examples=300)
    assert not {train_data[i]["caption"] for i in range(300)} & held_captions
    held_data = ShapesWorldDataset("held_out", num_examples=40)
    assert {held_data[i]["caption"] for i in range(40)} <= held_captions


def test_captions_round_trip_through_the_parser():
    captions = [caption(spec) for spec in all_specs()]
    assert len(set(captions)) == len(captions)
    for spec, text in zip(all_specs(), captions):
        assert parse_caption(text) == spec
    assert caption(CaptionSpec("red", "circle", 2, "left")) == "two red circles on the left"
    assert caption(CaptionSpec("blue", "square", 1, "top")) == "a blue square at the top"
    assert parse_caption("  Three WHITE triangles ") == CaptionSpec("white", "triangle", 3)


@pytest.mark.parametrize(
    "text, says",
    [
        ("a photo of a cat", "'a photo of a cat'"),
        ("two red circle", "needs the plural"),
        ("a purple circle", "unknown colour 'purple'"),
        ("four red hexagons", "unknown shape 'hexagons'"),
        ("a red circle on the moon", "unknown region 'on the moon'"),
    ],
)
def test_a_caption_outside_the_grammar_fails_naming_it_and_the_grammar(text, says):
    with pytest.raises(ValueError) as info:
        parse_caption(text)
    message = str(info.value)
    assert says in message and "COUNT COLOUR KIND [REGION]" in message and "on the left" in message


def test_bad_arguments_fail_early_naming_the_value():
    with pytest.raises(ValueError, match="color must be one of .*'purple'"):
        CaptionSpec("purple", "circle", 1)
    with pytest.raises(ValueError, match="count must be one of .*5"):
        CaptionSpec("red", "circle", 5)
    with pytest.raises(ValueError, match="split must be 'train' or 'held_out', got 'test'"):
        ShapesWorldDataset("test")
    with pytest.raises(ValueError, match="held_out_fraction must be in"):
        ShapesWorldDataset(held_out_fraction=1.5)
    with pytest.raises(IndexError, match="index 10 out of range"):
        ShapesWorldDataset(num_examples=10).example(10)
    assert set(PALETTE) == {"red", "green", "blue", "yellow", "white"}
