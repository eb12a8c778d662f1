"""Loading official and Hugging Face checkpoints, inferring the configuration, strict errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from seggpt_model import SegGPTConfig, WeightsError, load_seggpt, save_checkpoint
from seggpt_model.testing import random_model
from seggpt_model.weights import model_fingerprint


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name,layout", [
    ("w.pth", "official"), ("w.safetensors", "official"), ("hf", "hf"),
])
def test_round_trip_each_layout(tmp_path, tiny_model, name, layout):
    path = save_checkpoint(tiny_model, tmp_path / name, layout=layout)
    loaded = load_seggpt(path)
    assert loaded.config == tiny_model.config
    assert same_weights(loaded, tiny_model)
    assert not loaded.training


def test_hf_folder_with_pytorch_model_bin(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path / "hf", layout="hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert any(k.startswith("model.encoder.layers.0.mlp.lin1") for k in state)
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_size"] == 64
    assert same_weights(load_seggpt(tmp_path / "hf"), tiny_model)


def test_folder_with_official_pth(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path / "ckpt" / "seggpt_vit_large.pth")
    assert same_weights(load_seggpt(tmp_path / "ckpt"), tiny_model)


def test_env_var_is_the_default_source(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("SEGGPT_WEIGHTS", str(tiny_checkpoint))
    assert load_seggpt().config == SegGPTConfig.tiny()


def test_config_is_inferred_from_shapes(tmp_path):
    cfg = SegGPTConfig(img_size=(192, 96), patch_size=8, embed_dim=96, depth=16, num_heads=3,
                       mlp_ratio=2.0, decoder_embed_dim=24, pretrain_grid=6)
    model = random_model(cfg)
    for layout, name in (("official", "a.pth"), ("hf", "b")):
        loaded = load_seggpt(save_checkpoint(model, tmp_path / name, layout=layout))
        assert loaded.config == cfg and loaded.config.out_indices == (3, 7, 11, 15)
        x = torch.randn(1, 3, 192, 96)
        with torch.no_grad():
            assert torch.equal(loaded(x, x), model(x, x))


def test_dtype_and_device(tiny_checkpoint):
    model = load_seggpt(tiny_checkpoint, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_fingerprint_tracks_shape_and_weights(tiny_model):
    assert model_fingerprint(tiny_model) == model_fingerprint(random_model())
    assert model_fingerprint(tiny_model) != model_fingerprint(random_model(seed=1))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("norm.weight"), "missing keys: norm.weight"),
    (lambda s: s.__setitem__("extra.weight", torch.zeros(3)), "unexpected keys: extra.weight"),
    (lambda s: s.__setitem__("norm.bias", torch.zeros(7)), "wrong shapes: norm.bias"),
    (lambda s: s.pop("pos_embed"), "missing pos_embed"),
    (lambda s: s["mask_token"].fill_(float("nan")), "non-finite"),
])
def test_strict_loading_names_the_problem(tmp_path, tiny_model, edit, match):
    state = _state(tiny_model)
    edit(state)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=match):
        load_seggpt(tmp_path / "bad.pth")


def test_another_model_is_rejected(tmp_path):
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)},
              str(tmp_path / "resnet.safetensors"))
    with pytest.raises(WeightsError, match="not a SegGPT checkpoint"):
        load_seggpt(tmp_path / "resnet.safetensors")


def test_truncated_and_garbage_files(tmp_path, tiny_checkpoint):
    data = tiny_checkpoint.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cannot read checkpoint cut.pth"):
        load_seggpt(tmp_path / "cut.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_seggpt(tmp_path / "junk.safetensors")


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": {"x": torch.zeros(1)}, "obj": SegGPTConfig()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="cannot read"):
        load_seggpt(tmp_path / "evil.pth")


def test_missing_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("SEGGPT_WEIGHTS", raising=False)
    assert load_seggpt().is_demo  # nothing configured: the documented default, the bundled demo
    with pytest.raises(WeightsError, match="neither a file"):
        load_seggpt(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="holds no checkpoint"):
        load_seggpt(tmp_path / "empty")


def test_hub_id_without_network_names_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    with pytest.raises(WeightsError, match="not in the local cache.*SEGGPT_WEIGHTS"):
        load_seggpt("BAAI/seggpt-vit-large")


def test_hub_id_found_in_cache(tmp_path, tiny_model, monkeypatch):
    """A hub id resolves through huggingface_hub's cache when the files are already there."""
    import huggingface_hub.constants as c
    cache = tmp_path / "hub"
    snap = cache / "models--BAAI--seggpt-vit-large" / "snapshots" / ("0" * 40)
    save_checkpoint(tiny_model, snap, layout="hf")
    (cache / "models--BAAI--seggpt-vit-large" / "refs").mkdir(parents=True)
    (cache / "models--BAAI--seggpt-vit-large" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert same_weights(load_seggpt("BAAI/seggpt-vit-large"), tiny_model)


def test_demo_source_is_the_default(monkeypatch, tmp_path, tiny_model):
    import seggpt_model.weights as W
    monkeypatch.delenv("SEGGPT_WEIGHTS", raising=False)
    fake_demo = save_checkpoint(tiny_model, tmp_path / "demo" / "seggpt_demo.safetensors")
    monkeypatch.setattr(W, "DEMO_WEIGHTS", fake_demo)
    model = load_seggpt("demo")
    assert model.is_demo and same_weights(model, tiny_model)
    default = load_seggpt()  # no argument, no SEGGPT_WEIGHTS: the demo
    assert default.is_demo and same_weights(default, tiny_model)
    assert load_seggpt(str(fake_demo)).is_demo  # the bundled file named by its path is still the demo
    own = shutil.copy(fake_demo, tmp_path / "mine.safetensors")
    assert not load_seggpt(own).is_demo  # the same weights elsewhere are a user's checkpoint
    monkeypatch.setattr(W, "DEMO_WEIGHTS", tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="demo checkpoint is missing"):
        load_seggpt("demo")
