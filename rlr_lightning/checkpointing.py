"""What a training checkpoint holds: the LoRA weights and the run's counters, never the frozen weights.

The backbone reloads from its source and the rewards from theirs, so a checkpoint of a multi-GB model is a
few MB. :class:`LoraCheckpoints` is the part of ``RLRModule`` that writes and reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlr_lightning.estimators.base import GradientEstimator
    from rlr_lightning.rewards.base import RewardModel
    from rlr_lightning.skips import UpdateSkips


class LoraCheckpoints:
    """LightningModule hooks that keep checkpoints to LoRA weights plus the estimator's state, the skip counts,
    the run id and the reward's class name (``RLRModule`` mixes it in)."""

    # Set by the module that mixes this in (RLRModule).
    estimator: GradientEstimator
    skips: UpdateSkips
    reward: RewardModel | None
    run_id: str
    checkpoint_reward: str | None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if "lora_" not in k]:
            del state[key]
        checkpoint["rlr_estimator"] = self.estimator.state_dict()
        checkpoint.update(self.skips.state_dict())
        checkpoint["rlr_run_id"] = self.run_id
        if self.reward is not None:  # named when a loaded module needs one (not restored: it may be large)
            checkpoint["rlr_reward"] = f"{type(self.reward).__module__}.{type(self.reward).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.estimator.load_state_dict(checkpoint.get("rlr_estimator", {}))
        self.skips.load_state_dict(checkpoint)
        self.run_id = checkpoint.get("rlr_run_id", self.run_id)
        self.checkpoint_reward = checkpoint.get("rlr_reward")

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load the LoRA weights of a checkpoint; the frozen weights it leaves out are not missing.

        Only LoRA keys count as missing, so ``load_from_checkpoint`` neither warns with the whole backbone's
        key list nor, with ``strict=True``, fails on it.

        Args:
            state_dict: The checkpoint's ``state_dict``.
            strict: Raise if a LoRA weight is missing or a key is unknown.
            assign: As for :meth:`torch.nn.Module.load_state_dict`.
        """
        keys = super().load_state_dict(state_dict, strict=False, assign=assign)  # type: ignore[misc]
        missing = [k for k in keys.missing_keys if "lora_" in k]
        if strict and (missing or keys.unexpected_keys):
            raise RuntimeError(
                f"the checkpoint does not fit this model: missing LoRA weights {missing}, unexpected keys "
                f"{keys.unexpected_keys}; load it with the model settings it was trained with"
            )
        return type(keys)(missing, keys.unexpected_keys)
