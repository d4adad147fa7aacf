"""The published LAION aesthetic head loads into AestheticHead as is, and computes the linear chain."""

from __future__ import annotations

import pytest
import torch

from rlr_lightning.rewards import AestheticHead
from tests.rewards import REAL_AESTHETIC_HEAD


@pytest.fixture(scope="module")
def real_state():
    if not REAL_AESTHETIC_HEAD.is_file():
        pytest.skip(f"the real LAION aesthetic head is not at {REAL_AESTHETIC_HEAD.resolve()}")
    return torch.load(REAL_AESTHETIC_HEAD, map_location="cpu", weights_only=True)


def test_real_head_loads_strictly_without_renaming(real_state):
    head = AestheticHead()
    result = head.load_state_dict(real_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(head.state_dict()) == set(real_state)
    loaded = AestheticHead.from_file(str(REAL_AESTHETIC_HEAD))
    assert loaded.input_size == 768
    torch.testing.assert_close(loaded.layers[0].weight, real_state["layers.0.weight"])


def test_real_head_equals_hand_written_matrix_chain(real_state):
    head = AestheticHead.from_file(str(REAL_AESTHETIC_HEAD)).eval()
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 768, generator=gen, dtype=torch.float64)
    emb = emb / emb.norm(dim=-1, keepdim=True)  # the head takes L2-normalised CLIP embeddings
    x = emb
    for i in (0, 2, 4, 6, 7):  # Linear layers; 1, 3, 5 are dropouts (identity in eval); no activations
        x = x @ real_state[f"layers.{i}.weight"].double().T + real_state[f"layers.{i}.bias"].double()
    with torch.no_grad():
        got = head(emb.float()).double()
    assert got.shape == (3, 1)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    # Dropout is really in the chain: in training mode the outputs change.
    torch.manual_seed(1)
    assert not torch.allclose(head.train()(emb.float()).double(), x, atol=1e-4)
