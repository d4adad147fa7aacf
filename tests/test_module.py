"""RLRModule under a real Lightning Trainer on the tiny model: updates, skips, checkpoints, resume."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from rlr_lightning.data import PromptDataModule
from rlr_lightning.estimators import GRPO, RLR, FullBackprop, ScoreFunction, TruncatedBackprop
from rlr_lightning.module import EXPORT_RECORD, ExportConflictError, RLRModule, TrainingStalledError
from rlr_lightning.rewards import QuantizedBrightness, RewardModel, TargetColor


class NaNReward(RewardModel):
    def score(self, images, prompts):
        return torch.full((images.shape[0],), float("nan")) + 0 * images.mean()


class InfiniteGradientReward(RewardModel):
    """Finite value (0), infinite gradient: sqrt at 0."""

    def score(self, images, prompts):
        return (images - images.detach()).abs().add(0).sqrt().mean(dim=(1, 2, 3))


def make_module(tiny_pipeline_dir, **kwargs) -> RLRModule:
    defaults = dict(
        pretrained_model_name_or_path=str(tiny_pipeline_dir),
        num_steps=4,
        eta=1.0,
        estimator=RLR(h=1),
        reward=TargetColor(),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    defaults.update(kwargs)
    return RLRModule(**defaults)


def make_trainer(tmp_path, max_steps: int, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def data(batch_size: int = 2) -> PromptDataModule:
    return PromptDataModule(prompt_set="animals", batch_size=batch_size)


def snapshot(module: RLRModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.backbone.state_dict().items()}


def test_one_step_changes_only_lora_weights(tiny_pipeline_dir, tmp_path):
    module = make_module(tiny_pipeline_dir, export_dir=str(tmp_path / "lora"))
    module.configure_model()
    before = snapshot(module)
    make_trainer(tmp_path, max_steps=1).fit(module, datamodule=data())
    after = snapshot(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    frozen = [k for k in before if "lora_" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert module.trainer.global_step == 1
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize(
    "reward", [NaNReward(), InfiniteGradientReward()], ids=["nan-reward", "inf-gradient"]
)
def test_non_finite_reward_or_gradient_skips_the_update(tiny_pipeline_dir, tmp_path, reward):
    module = make_module(tiny_pipeline_dir, reward=reward, gradient_clip_val=None)
    module.configure_model()
    before = snapshot(module)
    # max_epochs bounds the run: skipped updates never advance global_step.
    trainer = make_trainer(tmp_path, max_steps=2, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, datamodule=data())
    after = snapshot(module)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert module.skips.total == 2 and trainer.global_step == 0
    assert not module.optimizers().optimizer.state  # the optimizer never stepped


def test_lora_only_checkpoint_and_resume_continue_step_and_optimizer_state(tiny_pipeline_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_dir = tmp_path / "ckpt"
    first = make_module(tiny_pipeline_dir)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1, save_last=True)
    make_trainer(tmp_path, 2, enable_checkpointing=True, callbacks=[checkpoint]).fit(first, datamodule=data())
    saved = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2
    assert saved["state_dict"] and all("lora_" in k for k in saved["state_dict"])
    assert "rlr_estimator" in saved

    resumed = make_module(tiny_pipeline_dir)
    trainer = make_trainer(
        tmp_path,
        4,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2", save_last=True)],
    )
    trainer.fit(resumed, datamodule=data(), ckpt_path=ckpt_dir / "last.ckpt")
    assert trainer.global_step == 4
    state = resumed.optimizers().optimizer.state
    assert {int(s["step"]) for s in state.values()} == {4}  # Adam's own step count went on from 2

    # Interrupted-and-resumed equals uninterrupted: same prompts, noises and block starts after the resume
    # (the data loader continues mid-epoch, seeds derive from checkpointed counters), deterministic on CPU.
    straight = make_module(tiny_pipeline_dir)
    make_trainer(tmp_path, 4).fit(straight, datamodule=data())
    for (name, a), b in zip(
        straight.backbone.lora_parameters().items(), resumed.backbone.lora_parameters().values()
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            straight.backbone.lora_parameters().values(), first.backbone.lora_parameters().values()
        )
    )

    # The estimator's running statistics (reward EMA, per-start gradient norms) travel with the checkpoint.
    assert saved["rlr_estimator"]["reward_stats"]["mean"] is not None
    fresh = make_module(tiny_pipeline_dir)
    fresh.on_load_checkpoint(saved)
    assert fresh.estimator.state_dict() == saved["rlr_estimator"]


def test_non_differentiable_reward_rlr_uses_last_step_likelihood_ratio(tiny_pipeline_dir, tmp_path):
    module = make_module(tiny_pipeline_dir, reward=QuantizedBrightness(levels=1000))
    assert module.estimator.fo_by_likelihood_ratio and not module.estimator.requires_reward_grad
    module.configure_model()
    before = snapshot(module)
    make_trainer(tmp_path, 1).fit(module, datamodule=data(4))
    after = snapshot(module)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_" in k)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(estimator=RLR(h=4), num_steps=4), "h=4 must be <= T-1=3"),
        (dict(estimator=RLR(h=1), eta=0.0), "eta must be > 0"),
        (dict(estimator=ScoreFunction(), eta=0.0), "eta must be > 0"),
        (dict(estimator=RLR(h=1, block_law="range", block_range=(0, 5))), r"block_range \[0, 5\] is outside"),
        (dict(estimator=TruncatedBackprop(k=5)), "K=5 exceeds the number of steps T=4"),
        (dict(estimator=FullBackprop(), reward=QuantizedBrightness()), "not differentiable"),
        (dict(num_steps=0), "num_steps must be >= 1"),
        (dict(guidance_scale=0.5), "guidance_scale must be >= 1"),
        (dict(kl_coefficient=-0.1), "kl_coefficient must be >= 0"),
        (dict(kl_steps=0), "kl_steps must be an integer >= 1"),
        (dict(estimator=FullBackprop(), eta=0.0, kl_coefficient=0.1), "needs a stochastic sampler: eta is 0"),
        (dict(estimator=GRPO(group_size=2, kl_coefficient=0.1), kl_coefficient=0.1), "would count twice"),
    ],
)
def test_impossible_settings_fail_at_construction(tiny_pipeline_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_module(tiny_pipeline_dir, **kwargs)


def test_optimizer_sees_only_lora_and_clipping_bounds_the_update(tiny_pipeline_dir, tmp_path):
    # Plain SGD with lr 1: the weight change equals the (clipped) gradient, so the clip is visible.
    module = make_module(
        tiny_pipeline_dir, gradient_clip_val=1e-4, optimizer=lambda p: torch.optim.SGD(p, lr=1.0)
    )
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.backbone.lora_parameters().items()}
    trainer = make_trainer(tmp_path, 1)
    trainer.fit(module, datamodule=data())
    (group,) = module.optimizers().optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in module.backbone.lora_parameters().values()}
    delta = torch.cat(
        [(p.detach() - before[n]).flatten() for n, p in module.backbone.lora_parameters().items()]
    )
    assert 0 < delta.norm() <= 1e-4 * (1 + 1e-4)


def test_gradient_accumulation_and_lr_scheduler_step_per_optimizer_step(tiny_pipeline_dir, tmp_path):
    module = make_module(
        tiny_pipeline_dir,
        gradient_accumulation_steps=2,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    trainer = make_trainer(tmp_path, max_steps=2, log_every_n_steps=1)
    trainer.fit(module, datamodule=data())
    assert trainer.global_step == 2
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4  # two micro-batches per step
    assert module.optimizers().optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)


def test_progress_bar_shows_reward_and_throughput_and_logs_every_term(tiny_pipeline_dir, tmp_path):
    module = make_module(tiny_pipeline_dir)
    trainer = make_trainer(tmp_path, max_steps=1, log_every_n_steps=1)
    trainer.fit(module, datamodule=data())
    assert {"train/reward", "train/images_per_sec"} <= set(trainer.progress_bar_metrics)
    logged = set(trainer.callback_metrics)
    for name in ("fo", "ho", "zo"):
        assert {f"train/loss_{name}", f"train/grad_norm_{name}"} <= logged
    assert {
        "train/reward_std",
        "train/reward_min",
        "train/reward_max",
        "train/block_start",
        "train/grad_norm",
    } <= logged


def test_grpo_takes_its_inner_updates_on_each_sampled_batch(tiny_pipeline_dir, tmp_path):
    """Two batches of 2 prompts x 3 images, 2 inner updates each: 4 optimizer steps, 2 reward calls, and the clip
    statistics of the second update (ratios moved off 1) in the logs."""

    class CountingReward(TargetColor):
        calls: int = 0

        def score(self, images, prompts):
            type(self).calls += 1
            assert images.shape[0] == 6  # each prompt sampled group_size times
            return super().score(images, prompts)

    module = make_module(
        tiny_pipeline_dir,
        estimator=GRPO(group_size=3, inner_updates=2, clip_range=0.2),
        reward=CountingReward(),
    )
    trainer = make_trainer(tmp_path, max_steps=4, log_every_n_steps=1)
    trainer.fit(module, datamodule=data())
    assert trainer.global_step == 4 and CountingReward.calls == 2
    metrics = trainer.callback_metrics
    assert metrics["train/inner_update"] == 1.0
    assert (
        float(metrics["train/approx_kl"]) > 0
        and "train/clip_fraction" in metrics
        and "train/loss_grpo" in metrics
    )


@pytest.mark.parametrize(
    "estimator",
    [FullBackprop(), GRPO(group_size=2, inner_updates=2)],
    ids=["full_backprop", "grpo_inner_updates"],
)
def test_the_kl_penalty_trains_with_any_estimator_and_pulls_toward_the_base(
    tiny_pipeline_dir, tmp_path, estimator
):
    """With a reward that carries no signal (constant), a LoRA moved off the base model is pulled back by the KL
    penalty alone: the logged KL falls, and the penalty's term is logged with its gradient norm."""

    class Constant(TargetColor):
        def score(self, images, prompts):
            return 0 * images.mean(dim=(1, 2, 3))

    module = make_module(
        tiny_pipeline_dir,
        estimator=estimator,
        reward=Constant(),
        kl_coefficient=10.0,
        kl_steps=4,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
    )
    module.configure_model()
    with torch.no_grad():
        for name, p in module.backbone.lora_parameters().items():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))

    def distance_to_base() -> float:
        """Mean squared gap between the tuned and the base transition means at a fixed state and step."""
        sampler = module.task.sampler
        channels = module.backbone.unet.config.in_channels
        x = torch.randn(2, channels, *module.backbone.latent_size, generator=torch.Generator().manual_seed(1))
        embeds = module.backbone.encode_prompts(["a cat", "a dog"], negative=sampler.uses_guidance)
        index = torch.tensor([1, 1])
        with torch.no_grad():
            tuned = sampler.step(index, x, embeds, prev_latents=x).mean
            return float((tuned - sampler.base_mean(index, x, embeds)).pow(2).mean())

    before = distance_to_base()
    kls = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            kls.append(float(trainer.callback_metrics["train/kl"]))

    trainer = make_trainer(tmp_path, max_steps=6, log_every_n_steps=1, callbacks=[Record()])
    trainer.fit(module, datamodule=data())
    assert "train/loss_kl" in trainer.callback_metrics and "train/grad_norm_kl" in trainer.callback_metrics
    # The KL of each batch is measured on that batch's own states (noisy); the LoRA's update shrinks steadily.
    assert kls[0] > 0 and kls[-1] < kls[0], kls
    assert distance_to_base() < 0.7 * before


def test_a_ddim_model_refuses_stochastic_steps_naming_the_families_they_are_for(tiny_pipeline_dir):
    module = make_module(tiny_pipeline_dir, stochastic_steps=(0, 2))
    with pytest.raises(ValueError, match="flow-matching families"):
        module.configure_model()


def test_inner_updates_refuse_gradient_accumulation(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="inner_updates"):
        make_module(
            tiny_pipeline_dir, estimator=GRPO(group_size=2, inner_updates=2), gradient_accumulation_steps=2
        )


class ScheduledNaNReward(RewardModel):
    """Mean brightness, NaN on the calls marked ``n`` in ``pattern`` (one call per training step here)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern, self.calls = pattern, 0

    def score(self, images, prompts):
        bad = self.pattern[min(self.calls, len(self.pattern) - 1)] == "n"
        self.calls += 1
        rewards = images.mean(dim=(1, 2, 3))
        return rewards + float("nan") if bad else rewards


@pytest.mark.parametrize(
    "reward, advice",
    [(NaNReward(), "check the reward model"), (InfiniteGradientReward(), "lower the learning rate")],
    ids=["nan-reward", "inf-gradient"],
)
def test_consecutive_skipped_updates_stop_the_run_with_the_cause(tiny_pipeline_dir, tmp_path, reward, advice):
    module = make_module(tiny_pipeline_dir, reward=reward, gradient_clip_val=None, max_consecutive_skips=3)
    # max_steps counts real updates only: without the cap this run would never end (max_epochs bounds it here).
    trainer = make_trainer(tmp_path, max_steps=5, max_epochs=1, limit_train_batches=6)
    with pytest.raises(TrainingStalledError, match=f"last 3 updates were all skipped .*{advice}"):
        trainer.fit(module, datamodule=data())
    assert module.skips.total == 3 and trainer.global_step == 0


def test_skipped_steps_log_nan_and_a_real_update_resets_the_count(tiny_pipeline_dir, tmp_path):
    # Two skips in all but never two in a row: a cap of 2 only holds if a real update resets the count.
    module = make_module(tiny_pipeline_dir, reward=ScheduledNaNReward("ynyny"), max_consecutive_skips=2)
    trainer = make_trainer(
        tmp_path,
        max_steps=3,
        max_epochs=1,
        limit_train_batches=6,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="run"),
    )
    trainer.fit(module, datamodule=data())
    assert trainer.global_step == 3 and module.skips.total == 2
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    train = [r for r in rows if r["train/reward"]]
    assert len(train) == 5
    for row, pattern in zip(train, "ynyny"):
        for key in (
            "train/reward",
            "train/reward_std",
            "train/loss_fo",
            "train/grad_norm_ho",
            "train/grad_norm",
        ):
            assert (row[key] == "nan") == (pattern == "n"), (row["step"], key, row[key])
    assert [float(r["train/skipped_updates"]) for r in train] == [0, 1, 1, 2, 2]
    checkpoint: dict = {"state_dict": {}}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["rlr_skipped_updates"] == 2 and checkpoint["rlr_consecutive_skips"] == 0


def test_a_dropped_micro_batch_drops_its_whole_optimizer_step(tiny_pipeline_dir, tmp_path):
    """Stepping on the other micro-batches' partial sum would be a biased update: the step is skipped, once."""
    # Accumulation 2, the reward NaN on every other call from the first: the first optimizer step loses its
    # first micro-batch (the second, finite one must not step alone), the later ones their second.
    module = make_module(
        tiny_pipeline_dir, reward=ScheduledNaNReward("ny" * 3), gradient_accumulation_steps=2
    )
    module.configure_model()
    before = snapshot(module)
    trainer = make_trainer(tmp_path, max_steps=3, max_epochs=1, limit_train_batches=6)
    trainer.fit(module, datamodule=data())
    assert trainer.global_step == 0 and module.skips.total == 3
    assert all(torch.equal(before[k], v) for k, v in snapshot(module).items())
    assert not module.optimizers().optimizer.state


def test_a_real_model_needs_a_reward_to_train_the_tiny_one_defaults_to_a_toy(tiny_pipeline_dir, tmp_path):
    for model in ("stable-diffusion-v1-5/stable-diffusion-v1-5", str(tmp_path)):
        module = RLRModule(pretrained_model_name_or_path=model)  # sampling and export need no reward
        with pytest.raises(ValueError, match=r"model\.reward is required to train .*AestheticReward"):
            make_trainer(tmp_path, 1).fit(module, datamodule=data())
        assert module.backbone is None  # refused before loading anything
    assert isinstance(RLRModule(pretrained_model_name_or_path=str(tiny_pipeline_dir)).reward, TargetColor)


def _exported(directory) -> tuple[bytes, dict]:
    """The exported weights (bytes) and the record of the run that wrote them."""
    weights = (directory / "pytorch_lora_weights.safetensors").read_bytes()
    return weights, json.loads((directory / EXPORT_RECORD).read_text())


def test_runs_with_the_logger_off_never_overwrite_each_others_export(tiny_pipeline_dir, tmp_path):
    first, second = make_module(tiny_pipeline_dir, seed=1), make_module(tiny_pipeline_dir, seed=2)
    make_trainer(tmp_path, 1).fit(first, datamodule=data())
    before = _exported(tmp_path / "lora")
    make_trainer(tmp_path, 1).fit(second, datamodule=data())
    assert (
        first.exported_lora.parent == tmp_path / "lora" and second.exported_lora.parent == tmp_path / "lora_1"
    )
    assert _exported(tmp_path / "lora") == before
    assert _exported(tmp_path / "lora_1")[0] != before[0]


def test_an_explicit_export_dir_is_refused_to_another_run_and_replaced_by_a_resumed_one(
    tiny_pipeline_dir, tmp_path
):
    export = tmp_path / "export"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = make_module(tiny_pipeline_dir, export_dir=str(export))
    make_trainer(tmp_path, 1, enable_checkpointing=True, callbacks=[ckpt]).fit(first, datamodule=data())
    weights, record = _exported(export)
    assert record["global_step"] == 1

    other = make_module(tiny_pipeline_dir, export_dir=str(export))
    trainer = make_trainer(tmp_path, 1)
    with pytest.raises(ExportConflictError, match=f"model.export_dir {export} already holds LoRA weights"):
        trainer.fit(other, datamodule=data())
    assert trainer.global_step == 0 and _exported(export) == (weights, record)  # refused before training

    resumed = make_module(tiny_pipeline_dir, export_dir=str(export))
    make_trainer(tmp_path, 2).fit(resumed, datamodule=data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    new_weights, new_record = _exported(export)
    assert (
        new_record["run_id"] == record["run_id"] and new_record["global_step"] == 2 and new_weights != weights
    )


def test_auto_tail_is_read_from_the_loaded_sampler_and_trains(tiny_pipeline_dir, tmp_path, caplog):
    from rlr_lightning.estimators.rlr import auto_tail

    # Leading spacing at T = 6 ends with sharp steps; the module resolves the tail when the model loads.
    module = make_module(
        tiny_pipeline_dir, num_steps=6, timestep_spacing="leading", estimator=RLR(h=1, tail="auto")
    )
    with caplog.at_level("INFO", logger="rlr_lightning"):
        module.configure_model()
    sigmas = module.task.sampler.kernel.sigma.tolist()
    expected = auto_tail(sigmas, 0.25, max_tail=5)
    assert module.estimator.tail_steps == expected >= 2, sigmas
    assert any("tail='auto': the last" in r.getMessage() for r in caplog.records)
    before = snapshot(module)
    make_trainer(tmp_path, max_steps=1).fit(module, datamodule=data())
    changed = [k for k, v in module.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("lora" in k for k in changed)


def test_step_baselines_train_and_their_running_means_resume(tiny_pipeline_dir, tmp_path):
    """The prompts' running means are kept in the checkpoint with the rest of the estimator's state."""
    estimator = RLR(h=1, step_baseline=["prompt_mean", "muprop", "value", "none"])
    module = make_module(tiny_pipeline_dir, estimator=estimator)
    before = snapshot(module.configure_model() or module)
    trainer = make_trainer(
        tmp_path,
        max_steps=2,
        enable_checkpointing=True,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    trainer.fit(module, datamodule=data())
    changed = [k for k, v in module.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("lora" in k for k in changed)
    means = dict(module.estimator.prompt_means.means)
    assert len(means) >= 2  # two steps of two prompts each
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["rlr_estimator"]
    restored = RLR(h=1, step_baseline=["prompt_mean", "muprop", "value", "none"])
    restored.load_state_dict(saved)
    assert restored.prompt_means.means == means
