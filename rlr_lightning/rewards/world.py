"""Rewards on the procedural shapes world (:mod:`rlr_lightning.world`): prompts are the world's captions.

``WorldColorReward`` and ``WorldPositionReward`` are differentiable functions of a soft colour membership of
every pixel; ``WorldCountReward`` is differentiable through a small counter network trained on the world
(:mod:`rlr_lightning.world.counter`); ``WorldCheckerReward`` is the exact checker's verdict
(non-differentiable: RLR scores its last step by a likelihood ratio). A prompt that is not a caption of the
world fails with the caption grammar.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rlr_lightning.rewards.base import RewardModel
from rlr_lightning.world.checker import COLOR_THRESHOLD, MIN_AREA, MIN_INTENSITY, check
from rlr_lightning.world.scenes import BACKGROUND, PALETTE, CaptionSpec, parse_caption

# Mass (fraction of the image's area) added where a ratio divides by a colour's mass: about one pixel at 32
# px, far above what the softmax leaks onto a black background (about 1e-4 at temperature 0.1), so an image
# without the colour scores as if it had a speck of it at the centre instead of dividing by nearly zero.
_EPS = 1e-3
_COLOR_INDEX = {name: i for i, name in enumerate(PALETTE)}


def color_membership(images: Tensor, temperature: float = 0.1) -> Tensor:
    """Soft colour of every pixel: softmax over the palette colours and the background of minus the squared
    RGB distance divided by ``temperature``.

    Args:
        images: ``(B, 3, H, W)`` in [0, 1].
        temperature: Softness; at 0.1 a pure colour's pixel is 1e-4 short of full membership and a pixel
            halfway between two colours is split between them.
    Returns:
        ``(B, K + 1, H, W)``: the palette colours in :data:`PALETTE` order, then the background.
    """
    colours = torch.tensor([*PALETTE.values(), BACKGROUND], dtype=torch.float32, device=images.device)
    distances = (images.float().unsqueeze(1) - colours.view(1, -1, 3, 1, 1)).pow(2).sum(dim=2)
    return torch.softmax(-distances / temperature, dim=1)


class _WorldReward(RewardModel):
    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def _asked(self, images: Tensor, prompts: Sequence[str]) -> tuple[list[CaptionSpec], Tensor, Tensor]:
        """The prompts' specs, the colour membership ``(B, K + 1, H, W)`` and each image's membership of its
        asked colour ``(B, H, W)``."""
        specs = [parse_caption(prompt) for prompt in prompts]
        membership = color_membership(images, self.temperature)
        index = torch.tensor([_COLOR_INDEX[spec.color] for spec in specs], device=images.device)
        return specs, membership, membership[torch.arange(len(specs), device=images.device), index]

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class WorldColorReward(_WorldReward):
    """The share of the asked colour in the image's coloured pixels: the soft mass of the caption's colour
    over the soft mass of all palette colours (plus about one pixel), in [0, 1]. Differentiable.

    1 when every coloured pixel is the asked colour (whatever the shapes, counts or positions), near 0 when
    the colour is absent. Soft masses are means over pixels of :func:`color_membership`.

    Args:
        temperature: Softness of the colour membership (smaller is closer to hard thresholds, with smaller
            gradients on pixels far from every colour).
    """

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        _, membership, asked = self._asked(images, prompts)
        foreground = membership[:, : len(PALETTE)].sum(dim=1)
        return asked.mean(dim=(1, 2)) / (foreground.mean(dim=(1, 2)) + _EPS)


class WorldPositionReward(_WorldReward):
    """How far the asked colour's soft mass centroid lies inside the asked region, in [-1, 1]. Differentiable.

    The signed distance of the centroid into the region (:func:`rlr_lightning.world.scenes.region_distance`)
    divided by its largest value (0.5 for the halves, 0.25 for the center): 1 at the far edge of the region,
    0 on its boundary, negative outside. An absent colour's centroid is the image centre. Captions without a
    region score 0 (no gradient). Several shapes are judged by their common centroid.

    Args:
        temperature: Softness of the colour membership that weights the centroid.
    """

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        specs, _, weights = self._asked(images, prompts)
        height, width = weights.shape[-2:]
        xs = (torch.arange(width, device=images.device, dtype=torch.float32) + 0.5) / width
        ys = (torch.arange(height, device=images.device, dtype=torch.float32) + 0.5) / height
        mass = weights.mean(dim=(1, 2))
        # Pulled toward the centre by _EPS of mass, so an image without the colour has a defined centroid.
        cx = ((weights * xs.view(1, 1, -1)).mean(dim=(1, 2)) + 0.5 * _EPS) / (mass + _EPS)
        cy = ((weights * ys.view(1, -1, 1)).mean(dim=(1, 2)) + 0.5 * _EPS) / (mass + _EPS)
        rewards = []
        for i, spec in enumerate(specs):
            if spec.region == "left":
                rewards.append(2.0 * (0.5 - cx[i]))
            elif spec.region == "right":
                rewards.append(2.0 * (cx[i] - 0.5))
            elif spec.region == "top":
                rewards.append(2.0 * (0.5 - cy[i]))
            elif spec.region == "bottom":
                rewards.append(2.0 * (cy[i] - 0.5))
            elif spec.region == "center":
                rewards.append(4.0 * (0.25 - torch.maximum((cx[i] - 0.5).abs(), (cy[i] - 0.5).abs())))
            else:
                rewards.append(torch.zeros((), device=images.device))
        return torch.stack(rewards)


class WorldCheckerReward(RewardModel):
    """The exact checker's verdict on each image for its caption (:func:`rlr_lightning.world.check`).
    Not differentiable.

    1 when the caption holds (exactly the asked number of shapes of the asked colour, all in the asked
    region), else 0; with ``partial_credit``, the mean of the colour, count and position checks (0, 1/3,
    2/3 or 1).

    Args:
        partial_credit: Score the mean of the three checks instead of all of them at once.
        color_threshold: Largest RGB distance of a pixel to a palette colour's shades that counts as that
            colour (below 0.5; see :mod:`rlr_lightning.world.checker`).
        min_intensity: Lowest intensity of a palette colour's shades (in (0, 1]).
        min_area: Smallest shape the checker counts, as a fraction of the image's area.
    """

    differentiable = False
    #: The checks that, with partial credit, count a third each.
    partial_checks: tuple[str, ...] = ("color_ok", "count_ok", "position_ok")

    def __init__(
        self,
        partial_credit: bool = False,
        color_threshold: float = COLOR_THRESHOLD,
        min_intensity: float = MIN_INTENSITY,
        min_area: float = MIN_AREA,
    ) -> None:
        super().__init__()
        self.partial_credit = partial_credit
        self.color_threshold = color_threshold
        self.min_intensity = min_intensity
        self.min_area = min_area
        # Checked here too, so a bad config fails when the reward is built rather than at the first step.
        self.verdicts(*self.probe())

    @staticmethod
    def probe() -> tuple[Tensor, list[str]]:
        """A blank input and a caption of the grammar, to check the thresholds on at construction."""
        return torch.zeros(1, 3, 8, 8), ["a red circle"]

    def verdicts(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The checker's verdicts (``all_ok`` and :attr:`partial_checks`) at this reward's thresholds."""
        return check(images, list(prompts), self.color_threshold, self.min_intensity, self.min_area)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        results = self.verdicts(images, prompts)
        if self.partial_credit:
            verdict = sum(results[name].float() for name in self.partial_checks) / len(self.partial_checks)
        else:
            verdict = results["all_ok"].float()
        return torch.as_tensor(verdict).to(images.device)

    def extra_repr(self) -> str:
        return (
            f"partial_credit={self.partial_credit}, color_threshold={self.color_threshold}, "
            f"min_intensity={self.min_intensity}, min_area={self.min_area}"
        )


class WorldCountReward(RewardModel):
    """Minus the squared error of the asked colour's count, ``-(predicted - asked)^2``, with the prediction of
    the shapes world's counter network (:class:`rlr_lightning.world.counter.CountNetwork`). Differentiable.

    0 when the counter sees exactly the caption's number of shapes of its colour, about -1 when it sees one
    more or one fewer, -4 for two. Only the count of the asked colour is judged: the shapes' kind, their
    region and shapes of other colours are not (``WorldPositionReward`` and ``WorldCheckerReward`` judge
    positions). The packaged counter was trained on the world model's own samples labelled by the exact
    checker: on held-out model samples its rounded count of the asked colour is the checker's for 97 % of
    them, so raising this reward raises the checker's count accuracy rather than fooling the counter
    (``docs/world.md``).

    Args:
        counter: Directory of a counter saved by ``CountNetwork.save_pretrained``, e.g. one built by
            ``python benchmarks/build_counter.py --out DIR``; None uses the counter packaged with rlr_lightning.
    """

    def __init__(self, counter: str | None = None) -> None:
        super().__init__()
        from rlr_lightning.world.counter import load_counter

        self.counter = counter
        # A submodule, so .to(device) moves it; frozen and kept in eval mode (its batch normalisation uses the
        # running statistics, so an image's reward does not depend on the rest of its batch).
        self.network = load_counter(counter)
        self.freeze()

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        specs = [parse_caption(prompt) for prompt in prompts]
        index = torch.tensor([_COLOR_INDEX[spec.color] for spec in specs], device=images.device)
        asked = torch.tensor([float(spec.count) for spec in specs], device=images.device)
        predicted = self.network(images.float()).float()
        return -(predicted.gather(1, index.unsqueeze(1)).squeeze(1) - asked).square()

    def extra_repr(self) -> str:
        return f"counter={self.counter!r}"
