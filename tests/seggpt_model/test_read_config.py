"""read_config: a checkpoint's shape without loading its weights (prompt packs compare it)."""
from __future__ import annotations

import pytest
import torch

from seggpt_model import SegGPTConfig, WeightsError, save_checkpoint
from seggpt_model.testing import random_model
from seggpt_model.weights import read_config


@pytest.mark.parametrize("name, layout", [("m.pth", "official"), ("m.safetensors", "official"), ("hf", "hf")])
def test_read_config_matches_the_saved_model(tmp_path, name, layout) -> None:
    config = SegGPTConfig(img_size=(64, 32), patch_size=8, embed_dim=32, depth=12, num_heads=2,
                          decoder_embed_dim=8, pretrain_grid=2)
    path = save_checkpoint(random_model(config), tmp_path / name, layout=layout)
    assert read_config(path).to_dict() == config.to_dict()
    assert read_config(path) != SegGPTConfig.tiny()


def test_read_config_refuses_what_is_not_a_seggpt(tmp_path) -> None:
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="missing pos_embed"):
        read_config(tmp_path / "other.pth")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    with pytest.raises(WeightsError, match="cannot read checkpoint broken.safetensors"):
        read_config(tmp_path / "broken.safetensors")
