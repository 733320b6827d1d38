"""Loading skips random init and the second copy of the weights: the model must still be whole."""

from __future__ import annotations

import torch

from minigpt.checkpoints import load_model, save_model
from minigpt.interop.hf import export_hf
from minigpt.model import GPT, weights_left_uninitialized
from tests.conftest import tiny_config


def test_loaded_models_equal_the_saved_one_with_the_head_tied(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    save_model(tmp_path / "ckpt", model, step=1)
    export_hf(model, tmp_path / "hf")
    x = torch.randint(0, 50257, (2, 9))
    for path in (tmp_path / "ckpt", tmp_path / "hf"):
        loaded = load_model(path).eval()
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        assert len(list(loaded.parameters())) == len(list(model.parameters()))
        assert all(p.requires_grad for p in loaded.parameters())
        with torch.no_grad():
            assert torch.equal(loaded(x)[0][..., :50260], model(x)[0][..., :50260])


def test_init_is_restored_after_an_uninitialized_build():
    with weights_left_uninitialized():
        GPT(tiny_config())
    torch.manual_seed(0)
    w = torch.nn.init.normal_(torch.zeros(1000), std=0.02)
    assert 0.015 < w.std().item() < 0.025  # real draws again, not a no-op
