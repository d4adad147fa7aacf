"""The moving-shapes world: its caption grammar and split, clips that keep their shapes in frame and move as
asked, an exact motion checker, and video rewards that rank the asked motion first."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from rlr_lightning.rewards.world_video import WorldMotionCheckerReward, WorldMotionReward
from rlr_lightning.world import (
    CLIP_LENGTHS,
    DIRECTIONS,
    MAX_CROSS_DISPLACEMENT,
    MAX_STILL_DISPLACEMENT,
    MIN_DISPLACEMENT,
    MOTION_CHECKS,
    MOTION_COUNTS,
    MOTIONS,
    PALETTE,
    SPEED,
    Clip,
    MotionSpec,
    MotionWorldDataset,
    Scene,
    Shape,
    all_motion_specs,
    check_motion,
    motion_caption,
    motion_ok,
    net_displacement,
    parse_motion_caption,
    render_clip,
    sample_clip,
    split_motion_specs,
)
from rlr_lightning.world.scenes import BORDER, KINDS

ATTRIBUTES = ("color", "kind", "count", "motion")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Render and check on one thread: the frames are small, and with ``-n 0`` torch's second thread spins
    against the other processes of a loaded 2-core machine, making these tests several times slower (the
    xdist workers of the suite already run on one thread each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clip_of(spec: MotionSpec, seed: int, num_frames: int = 9, max_distractors: int = 1) -> Clip:
    return sample_clip(spec, torch.Generator().manual_seed(seed), num_frames, max_distractors=max_distractors)


def failures(result: dict[str, torch.Tensor], specs: list[MotionSpec]) -> dict[str, list[str]]:
    return {
        name: [motion_caption(specs[i]) for i in (~ok).nonzero().flatten().tolist()]
        for name, ok in result.items()
    }


# -- grammar ---------------------------------------------------------------------------------------------------


def test_every_caption_round_trips_and_the_vocabulary_is_small():
    specs = all_motion_specs()
    assert len(specs) == len(set(specs)) == 5 * 3 * 3 * 5
    captions = [motion_caption(spec) for spec in specs]
    assert len(set(captions)) == len(captions)
    for spec, text in zip(specs, captions):
        assert parse_motion_caption(text) == spec
        assert parse_motion_caption("  " + text.upper().replace(" ", "   ") + " ") == spec
    assert motion_caption(MotionSpec("red", "square", 1, "right")) == "a red square moving right"
    assert motion_caption(MotionSpec("blue", "circle", 2, "up")) == "two blue circles moving up"
    assert motion_caption(MotionSpec("green", "triangle", 1, "still")) == "a green triangle staying still"
    vocabulary = {word for text in captions for word in text.split()}
    assert len(vocabulary) == 21, sorted(vocabulary)


@pytest.mark.parametrize(
    "text",
    [
        "a red square",  # no motion
        "a red square moving",
        "a red square moving sideways",
        "four red squares moving left",  # counts stop at three
        "a red square on the left moving up",  # no regions
        "a purple square moving left",
        "two red square moving left",  # plural
        "a red moving left",
        "moving left",
        "",
    ],
)
def test_text_outside_the_grammar_is_refused_by_name(text):
    with pytest.raises(ValueError, match="is not a moving-shapes caption") as error:
        parse_motion_caption(text)
    assert repr(text) in str(error.value) and "COUNT COLOUR KIND MOTION" in str(error.value)


def test_motion_spec_validates_its_fields():
    MotionSpec("red", "circle", 3, "still")
    for field, bad in [("color", "purple"), ("kind", "star"), ("count", 4), ("motion", "around")]:
        with pytest.raises(ValueError, match=field):
            dataclasses.replace(MotionSpec("red", "circle", 1, "left"), **{field: bad})


# -- split -----------------------------------------------------------------------------------------------------


def test_split_is_disjoint_complete_deterministic_and_covers_every_pair_in_training():
    train, held_out = split_motion_specs()
    assert (len(train), len(held_out)) == (180, 45)
    assert not set(train) & set(held_out)
    assert set(train) | set(held_out) == set(all_motion_specs())
    values = {"color": tuple(PALETTE), "kind": KINDS, "count": MOTION_COUNTS, "motion": MOTIONS}
    for name in ATTRIBUTES:
        assert {getattr(spec, name) for spec in train} == set(values[name]), name
    for a, b in itertools.combinations(ATTRIBUTES, 2):
        seen = {(getattr(spec, a), getattr(spec, b)) for spec in train}
        assert seen == set(itertools.product(values[a], values[b])), (a, b)
    split_motion_specs.cache_clear()
    assert split_motion_specs() == (train, held_out)
    assert split_motion_specs(seed=1)[1] != held_out
    assert split_motion_specs(held_out_fraction=0.0)[1] == ()
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_motion_specs(held_out_fraction=1.0)


# -- clips -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", CLIP_LENGTHS)
def test_clips_move_as_asked_and_stay_in_frame(num_frames):
    for seed, spec in itertools.product((0, 1), all_motion_specs()):
        clip = clip_of(spec, seed + 100 * num_frames, num_frames)
        assert clip.num_frames == num_frames and clip.spec == spec
        assert clip.velocity == (SPEED * DIRECTIONS[spec.motion][0], SPEED * DIRECTIONS[spec.motion][1])
        first = clip.frames[0].shapes
        asked = [s for s in first if s.color == spec.color]
        assert len(asked) == spec.count and all(s.kind == spec.kind for s in asked)
        assert len(first) - len(asked) <= 1  # at most one distractor, of another colour
        for t, scene in enumerate(clip.frames):
            assert len(scene.shapes) == len(first)
            for start, shape in zip(first, scene.shapes):
                half = shape.size / 2
                assert BORDER - 1e-9 <= shape.x - half and shape.x + half <= 1 - BORDER + 1e-9, (spec, t)
                assert BORDER - 1e-9 <= shape.y - half and shape.y + half <= 1 - BORDER + 1e-9, (spec, t)
                moved = clip.velocity if shape.color == spec.color else (0.0, 0.0)  # distractors stay still
                assert shape.x == pytest.approx(start.x + moved[0] * t)
                assert shape.y == pytest.approx(start.y + moved[1] * t)
            for a, b in itertools.combinations(scene.shapes, 2):  # never overlapping
                reach = (a.size + b.size) / 2
                assert abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach, (spec, t)


def test_clips_and_datasets_are_deterministic_and_render_as_videos():
    spec = MotionSpec("yellow", "triangle", 2, "down")
    assert clip_of(spec, 3) == clip_of(spec, 3) != clip_of(spec, 4)
    video = render_clip(clip_of(spec, 3))
    assert video.shape == (9, 3, 32, 32) and video.dtype == torch.float32
    assert 0.0 <= video.min() and video.max() <= 1.0
    assert render_clip(clip_of(spec, 3), size=64).shape == (9, 3, 64, 64)

    data = MotionWorldDataset("train", num_examples=6, num_frames=13, seed=5)
    again = MotionWorldDataset("train", num_examples=6, num_frames=13, seed=5)
    other = MotionWorldDataset("train", num_examples=6, num_frames=13, seed=6)
    for i in range(6):
        item = data[i]
        assert set(item) == {"prompt", "video"} and item["video"].shape == (13, 3, 32, 32)
        assert item["prompt"] == again[i]["prompt"] and torch.equal(item["video"], again[i]["video"])
    assert [data[i]["prompt"] for i in range(6)] != [other[i]["prompt"] for i in range(6)]
    batch = next(iter(DataLoader(data, batch_size=3)))
    assert batch["video"].shape == (3, 13, 3, 32, 32) and len(batch["prompt"]) == 3

    train, held_out = split_motion_specs()
    held = MotionWorldDataset("held_out", num_examples=8, seed=1)
    assert all(held.example(i).spec in held_out for i in range(8))
    assert all(MotionWorldDataset("train", num_examples=8).example(i).spec in train for i in range(8))
    with pytest.raises(ValueError, match="num_frames"):
        MotionWorldDataset(num_frames=8)
    with pytest.raises(ValueError, match="num_frames"):
        sample_clip(spec, torch.Generator(), num_frames=10)


# -- checker ---------------------------------------------------------------------------------------------------


def test_checker_is_exact_on_every_spec_and_clip_length():
    # Every spec at the default 9 frames (with a distractor where drawn), then a third of them, shifted so
    # that each spec meets each length, at 13 and 17 frames.
    specs = list(all_motion_specs())
    cases = [(spec, 9, 0) for spec in specs]
    cases += [(spec, 13, 1) for spec in specs[0::3]] + [(spec, 17, 2) for spec in specs[1::3]]
    for num_frames in CLIP_LENGTHS:
        batch = [(spec, seed) for spec, frames, seed in cases if frames == num_frames]
        videos = torch.stack([render_clip(clip_of(spec, seed, num_frames)) for spec, seed in batch])
        result = check_motion(videos, [motion_caption(spec) for spec, _ in batch])
        assert set(result) == set(MOTION_CHECKS)
        for ok in result.values():
            assert ok.dtype == torch.bool and ok.shape == (len(batch),)
        failed = failures(result, [spec for spec, _ in batch])
        assert not any(failed.values()), (num_frames, failed)


def test_checker_rejects_wrong_motion_colour_and_count():
    base = [MotionSpec("red", "square", 1, "right"), MotionSpec("white", "triangle", 3, "up")]
    base += [MotionSpec("blue", "circle", 2, "still"), MotionSpec("yellow", "triangle", 2, "left")]
    for spec in base:
        # One clip per motion, without distractors (a distractor of the caption's colour would be a shape of
        # it): each is checked against the caption of every motion.
        videos = {
            m: render_clip(clip_of(dataclasses.replace(spec, motion=m), seed=7, max_distractors=0))
            for m in MOTIONS
        }
        for shown, asked in itertools.product(MOTIONS, MOTIONS):
            result = check_motion(videos[shown][None], [dataclasses.replace(spec, motion=asked)])
            assert bool(result["motion_ok"]) == (shown == asked), (spec, shown, asked)
            assert bool(result["all_ok"]) == (shown == asked) and result["count_ok"].item()
        video = videos[spec.motion][None]
        other_colour = next(c for c in PALETTE if c != spec.color)
        wrong = check_motion(video, [dataclasses.replace(spec, color=other_colour)])
        assert (
            not wrong["color_ok"] and not wrong["count_ok"] and not wrong["motion_ok"] and not wrong["all_ok"]
        )
        for count in MOTION_COUNTS:
            result = check_motion(video, [dataclasses.replace(spec, count=count)])
            assert bool(result["count_ok"]) == bool(result["all_ok"]) == (count == spec.count)
            assert result["color_ok"] and result["motion_ok"]
        # Played backwards, it moves the other way (or still stays still).
        backwards = check_motion(video.flip(1), [spec])
        assert bool(backwards["motion_ok"]) == (spec.motion == "still")
        # A frame without the shapes fails colour, count and motion.
        blank = video.clone()
        blank[:, 4] = 0
        assert not any(check_motion(blank, [spec])[name] for name in MOTION_CHECKS)


def test_checker_thresholds_reject_diagonal_and_slow_motion():
    def moving(dx: float, dy: float, frames: int = 9) -> torch.Tensor:
        shape = Shape("circle", "green", 0.3, 0.3, 0.28)
        scenes = tuple(
            Scene((dataclasses.replace(shape, x=shape.x + dx * t, y=shape.y + dy * t),))
            for t in range(frames)
        )
        return render_clip(Clip(MotionSpec("green", "circle", 1, "right"), scenes, (dx, dy)))[None]

    assert check_motion(moving(SPEED, 0.0), ["a green circle moving right"])["all_ok"]
    # Diagonal: right enough, but as far down.
    assert not check_motion(moving(SPEED, SPEED), ["a green circle moving right"])["motion_ok"]
    # Too slow to move (a third of the least displacement), too fast to stay still.
    slow = moving(MIN_DISPLACEMENT / 3 / 8, 0.0)
    assert not check_motion(slow, ["a green circle moving right"])["motion_ok"]
    assert check_motion(slow, ["a green circle staying still"])["motion_ok"]
    assert not check_motion(moving(SPEED, 0.0), ["a green circle staying still"])["motion_ok"]

    track = torch.tensor([[0.2 + 0.03 * t, 0.5 - 0.01 * t] for t in range(9)])
    assert net_displacement(track).tolist() == pytest.approx([0.24, -0.08])
    assert motion_ok((MIN_DISPLACEMENT, MAX_CROSS_DISPLACEMENT), "right")
    assert not motion_ok((MIN_DISPLACEMENT - 1e-3, 0.0), "right")
    assert not motion_ok((MIN_DISPLACEMENT, MAX_CROSS_DISPLACEMENT + 1e-3), "right")
    assert motion_ok((0.0, -MIN_DISPLACEMENT), "up") and not motion_ok((0.0, MIN_DISPLACEMENT), "up")
    assert motion_ok((MAX_STILL_DISPLACEMENT * 0.6, MAX_STILL_DISPLACEMENT * 0.6), "still")
    assert not motion_ok((MAX_STILL_DISPLACEMENT * 0.8, MAX_STILL_DISPLACEMENT * 0.8), "still")


def test_checker_refuses_bad_input():
    with pytest.raises(ValueError, match="is not a moving-shapes caption"):
        check_motion(torch.zeros(1, 9, 3, 8, 8), ["a red circle on the left"])
    with pytest.raises(ValueError, match=r"\(B, F, 3, H, W\)"):
        check_motion(torch.zeros(1, 3, 8, 8), ["a red circle moving left"])
    with pytest.raises(ValueError, match="2 videos but 1 captions"):
        check_motion(torch.zeros(2, 9, 3, 8, 8), ["a red circle moving left"])


# -- rewards ---------------------------------------------------------------------------------------------------

REWARD_SPECS = [
    MotionSpec("red", "square", 1, "right"),
    MotionSpec("white", "triangle", 3, "up"),
    MotionSpec("yellow", "circle", 2, "down"),
    MotionSpec("blue", "triangle", 1, "left"),
    MotionSpec("green", "square", 3, "still"),
]


DIRECTION_NAMES = [m for m in MOTIONS if m != "still"]


def rendered_by_motion(spec: MotionSpec, seed: int) -> torch.Tensor:
    """``(5, F, 3, H, W)``: a render of ``spec``'s shapes for each motion, in MOTIONS order (with distractors)."""
    return torch.stack([render_clip(clip_of(dataclasses.replace(spec, motion=m), seed)) for m in MOTIONS])


def test_motion_reward_verdict_is_the_checkers_motion_verdict_on_renders():
    reward = WorldMotionReward()
    assert reward.video and reward.differentiable and reward.form == "verdict"
    for seed, spec in itertools.product((0, 1), REWARD_SPECS):
        videos = rendered_by_motion(spec, seed)
        captions = [motion_caption(spec)] * len(MOTIONS)
        scores = reward(videos, captions)
        passed = check_motion(videos, captions)["motion_ok"]
        assert passed.tolist() == [m == spec.motion for m in MOTIONS]
        # About 0.9 where the checker passes the clip, about 0 where it fails it: for a moving caption, a
        # still clip scores no better than one moving another way, so stillness is no refuge.
        assert (scores[passed] > 0.85).all() and (scores[~passed] < 0.02).all(), (spec, scores)


def test_motion_reward_verdict_needs_the_colour_in_every_frame():
    spec = REWARD_SPECS[0]
    video = render_clip(clip_of(spec, 4)).unsqueeze(0)
    caption = [motion_caption(spec)]
    reward = WorldMotionReward()
    assert reward(video, caption).item() > 0.85
    gone = video.clone()
    gone[:, 6] = 0.0  # one black frame: the checker fails the clip, and so does the reward
    assert not check_motion(gone, caption)["motion_ok"].item()
    assert reward(gone, caption).item() < 0.05


def test_motion_reward_displacement_ranks_the_asked_motion_first():
    reward = WorldMotionReward(form="displacement")
    for seed, spec in itertools.product((0, 1), REWARD_SPECS):
        videos = rendered_by_motion(spec, seed)
        scores = reward(videos, [motion_caption(spec)] * len(MOTIONS))
        asked = MOTIONS.index(spec.motion)
        others = torch.cat([scores[:asked], scores[asked + 1 :]])
        assert scores[asked] > others.max(), (spec, scores)
        if spec.motion == "still":  # still scores about 0, moving about -1
            assert scores[asked].abs() < 0.01 and (others < -0.8).all(), scores
        else:  # about 1 for the asked way, 0 for still, -1 for the other ways
            assert 0.85 < scores[asked] < 1.1 and scores[MOTIONS.index("still")].abs() < 0.01, scores
            wrong_ways = [scores[i] for i, m in enumerate(MOTIONS) if m not in (spec.motion, "still")]
            assert all(score < -0.8 for score in wrong_ways), scores


def test_motion_reward_along_scores_the_asked_way_and_leaves_stillness_no_better_than_a_random_way():
    reward = WorldMotionReward(form="along")
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    for seed, spec in itertools.product((0, 1), REWARD_SPECS):
        if spec.motion == "still":
            continue
        scores = dict(
            zip(MOTIONS, reward(rendered_by_motion(spec, seed), [motion_caption(spec)] * len(MOTIONS)))
        )
        assert 0.85 < scores[spec.motion] < 1.1 and -1.1 < scores[opposite[spec.motion]] < -0.85, scores
        across = [scores[m] for m in MOTIONS if m not in (spec.motion, opposite[spec.motion])]
        assert all(abs(score) < 0.05 for score in across), scores  # still and both cross ways: about 0
        # A clip moving one of the four ways at random scores 0 on average, as a still clip does.
        assert abs(sum(scores[m] for m in DIRECTION_NAMES) / 4 - scores["still"]) < 0.05, scores


@pytest.mark.parametrize("form", ["verdict", "displacement", "along"])
def test_motion_reward_passes_finite_gradients_to_the_pixels(form):
    videos = torch.stack([render_clip(clip_of(spec, 2)) for spec in REWARD_SPECS])
    videos = (0.9 * videos + 0.05).requires_grad_(True)  # off the palette, where the soft mask is flat
    rewards = WorldMotionReward(form=form)(videos, [motion_caption(spec) for spec in REWARD_SPECS])
    assert rewards.shape == (len(REWARD_SPECS),) and rewards.dtype == torch.float32
    rewards.sum().backward()
    assert videos.grad is not None and torch.isfinite(videos.grad).all()
    per_video = videos.grad.abs().flatten(1).sum(dim=1)
    assert (per_video[:-1] > 0).all(), per_video  # the moving ones (the still render sits at its optimum)
    # Every frame but the middle one, whose weight in the least-squares slope is 0, gets a gradient through
    # the displacement; the verdict's presence factor reaches only the sparsest frame.
    per_frame = videos.grad[0].abs().flatten(1).sum(dim=1)
    assert (torch.cat([per_frame[:4], per_frame[5:]]) > 0).all(), per_frame
    if form != "verdict":
        assert per_frame[4] == 0, per_frame


def test_motion_reward_refuses_a_bad_form_or_width():
    with pytest.raises(ValueError, match="form must be 'verdict', 'displacement' or 'along', got 'hinge'"):
        WorldMotionReward(form="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width must be > 0"):
        WorldMotionReward(width=0.0)


def test_checker_reward_is_the_checkers_verdict():
    reward = WorldMotionCheckerReward()
    assert reward.video and not reward.differentiable
    spec = REWARD_SPECS[0]
    videos = rendered_by_motion(spec, 3)
    captions = [motion_caption(spec)] * len(MOTIONS)
    result = check_motion(videos, captions)
    assert torch.equal(reward(videos, captions), result["all_ok"].float())
    assert reward(videos, captions).tolist() == [float(m == spec.motion) for m in MOTIONS]
    partial = WorldMotionCheckerReward(partial_credit=True)(videos, captions)
    expected = (result["color_ok"].float() + result["count_ok"].float() + result["motion_ok"].float()) / 3
    assert torch.allclose(partial, expected) and partial.tolist()[MOTIONS.index("left")] == pytest.approx(
        2 / 3
    )
    with pytest.raises(ValueError, match="color_threshold"):
        WorldMotionCheckerReward(color_threshold=0.6)


@pytest.mark.parametrize("reward_cls", [WorldMotionReward, WorldMotionCheckerReward])
def test_rewards_refuse_prompts_outside_the_grammar_and_images(reward_cls):
    reward = reward_cls()
    videos = torch.zeros(2, 9, 3, 16, 16)
    with pytest.raises(ValueError, match="'a red circle on the left' is not a moving-shapes caption"):
        reward(videos, ["a red circle moving left", "a red circle on the left"])
    with pytest.raises(ValueError, match=r"videos of shape \(B, F, 3, H, W\)"):
        reward(torch.zeros(2, 3, 16, 16), ["a red circle moving left"] * 2)
