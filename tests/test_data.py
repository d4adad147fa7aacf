"""Prompt sources, the validation split, batches, and DCoT conditioning of the right steps."""

from __future__ import annotations

import json

import pytest
import torch

from rlr_lightning.data import PROMPT_SETS, PromptBatch, PromptDataModule, load_prompt_file
from rlr_lightning.module import RLRModule
from rlr_lightning.sampling import Plan


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_text_file_skips_blank_and_comment_lines(tmp_path):
    path = write(tmp_path / "p.txt", "# a comment\na cat\n\n  a dog  \n")
    assert [r.prompt for r in load_prompt_file(path)] == ["a cat", "a dog"]


def test_jsonl_carries_dcot_rewrites_and_metadata(tmp_path):
    lines = [
        {"prompt": "a hand", "coarse": "a person", "mid": "an arm", "fine": "five fingers", "id": 7},
        {"prompt": "a cat", "category": "animal"},
    ]
    path = write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines))
    first, second = load_prompt_file(path)
    assert first.dcot == ("a person", "an arm", "five fingers") and first.metadata == {"id": 7}
    assert second.dcot is None and second.metadata == {"category": "animal"}


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "holds no prompts"),
        ("# only a comment\n\n", "holds no prompts"),
        ('{"text": "a cat"}', r'p\.jsonl:1: .*"prompt"'),
        ('{"prompt": "a"}\nnot json', r"p\.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "coarse": "b"}', "need all of coarse, mid and fine"),
    ],
)
def test_bad_prompt_files_fail_with_file_and_line(tmp_path, content, match):
    suffix = ".jsonl" if "{" in content else ".txt"
    path = write(tmp_path / f"p{suffix}", content)
    with pytest.raises(ValueError, match=match):
        load_prompt_file(path)


def test_missing_prompt_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found: .*nope.txt"):
        PromptDataModule(prompt_file=str(tmp_path / "nope.txt"))


def test_datamodule_errors():
    with pytest.raises(ValueError, match="unknown prompt_set 'pets'; choose one of"):
        PromptDataModule(prompt_set="pets")
    with pytest.raises(ValueError, match="prompts list is empty"):
        PromptDataModule(prompts=[])
    with pytest.raises(ValueError, match="val_fraction"):
        PromptDataModule(val_fraction=1.0)


def test_validation_split_is_held_out_and_seeded():
    dm = PromptDataModule(prompt_set="animals", val_fraction=0.25, seed=3)
    train, val = set(dm.prompts), {r.prompt for r in dm.val_records}
    assert train.isdisjoint(val) and len(train) + len(val) == len(PROMPT_SETS["animals"])
    assert {
        r.prompt for r in PromptDataModule(prompt_set="animals", val_fraction=0.25, seed=3).val_records
    } == val
    assert {
        r.prompt for r in PromptDataModule(prompt_set="animals", val_fraction=0.25, seed=4).val_records
    } != val
    batches = list(dm.val_dataloader())
    assert [p for b in batches for p in b.prompts] == [r.prompt for r in dm.val_records]  # fixed order, once


def test_train_batches_are_prompt_batches_reproducible_by_seed():
    def first_batches(seed):
        loader = PromptDataModule(prompt_set="styles", batch_size=4, seed=seed).train_dataloader()
        return [b.prompts for b, _ in zip(loader, range(3))]

    batch = next(iter(PromptDataModule(prompt_set="styles", batch_size=4).train_dataloader()))
    assert isinstance(batch, PromptBatch) and len(batch) == 4 and all("style" in m for m in batch.metadata)
    assert first_batches(0) == first_batches(0) != first_batches(1)


def test_dcot_fine_prompt_conditions_only_the_late_steps(tiny_pipeline_dir):
    """Swapping the fine rewrite leaves every latent before the fine scale bit-identical, and changes after."""
    module = RLRModule(
        pretrained_model_name_or_path=str(tiny_pipeline_dir), num_steps=6, dcot_split=(1 / 3, 2 / 3)
    )
    module.configure_model()
    assert module.settings.dcot_ranges() == [(0, 2), (2, 4), (4, 6)]

    def latents(fine: str):
        batch = PromptBatch(["a hand"], [("a person", "an arm", fine)], [{}])
        with torch.no_grad():
            trajectory = module.task.sampler.run(
                Plan(6), module.task.conditioning(batch), generator=torch.Generator().manual_seed(0)
            )
        return trajectory.latents

    a, b = latents("five fingers"), latents("a fist")
    for k in range(5):  # s_0 .. s_4 come from steps 0..3, conditioned on coarse and mid only
        assert torch.equal(a[k], b[k]), k
    assert not torch.allclose(a[5], b[5]) and not torch.allclose(a[6], b[6])

    # A batch without rewrites is conditioned on its prompt at every step, as before.
    plain = module.task.conditioning(PromptBatch(["a hand"], [None], [{}]))
    torch.testing.assert_close(plain.cond, module.backbone.encode_prompts(["a hand"], negative=False).cond)


def test_dcot_rescoring_uses_each_steps_own_scale(tiny_pipeline_dir):
    """Batched re-scoring of stored transitions (likelihood-ratio terms) sees the same per-step prompts."""
    module = RLRModule(pretrained_model_name_or_path=str(tiny_pipeline_dir), num_steps=6)
    module.configure_model()
    batch = PromptBatch(["a hand", "a cup"], [("a person", "an arm", "five fingers"), None], [{}, {}])
    embeds = module.task.conditioning(batch)
    with torch.no_grad():
        trajectory = module.task.sampler.run(Plan(6), embeds, generator=torch.Generator().manual_seed(1))
        steps = [5, 0, 3]
        index, x, x_next = trajectory.transitions(steps)
        rescored = module.task.sampler.log_probs(index, x, x_next, embeds.for_steps(steps))
    torch.testing.assert_close(rescored, trajectory.log_probs[steps].reshape(-1), rtol=1e-5, atol=1e-3)


def test_an_epoch_holds_a_full_batch_for_every_rank():
    """42 prompts, batch 32, 2 ranks: a plain epoch would give each rank 21 prompts and no batch at all."""
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    dm = PromptDataModule(prompt_set="animals", batch_size=32)
    dm.trainer = SimpleNamespace(world_size=2)
    loader = dm.train_dataloader()
    for rank in (0, 1):
        per_rank = DistributedSampler(loader.dataset, num_replicas=2, rank=rank)
        assert len(per_rank) // 32 >= 1
