"""Parity with Hugging Face's SegGptForImageSegmentation and the official feature ensemble."""
from __future__ import annotations

import pytest
import torch
from transformers import SegGptConfig, SegGptForImageSegmentation

from seggpt_model import SegGPT, SegGPTConfig
from seggpt_model.weights import hf_config, official_to_hf_key

from seggpt_model.testing import randomize


def hf_twin(model: SegGPT) -> SegGptForImageSegmentation:
    """The transformers model holding exactly ``model``'s weights."""
    cfg = SegGptConfig(**{k: v for k, v in hf_config(model.config).items()
                          if k not in ("model_type", "architectures")})
    hf = SegGptForImageSegmentation(cfg).eval()
    state = {official_to_hf_key(k): v for k, v in model.state_dict().items()}
    result = hf.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return hf


def hf_paint(hf, imgs, tgts, embedding_type="instance", feature_ensemble=False):
    s = imgs.shape[-1]
    return hf(pixel_values=imgs[:, :, s:], prompt_pixel_values=imgs[:, :, :s], prompt_masks=tgts[:, :, :s],
              embedding_type=embedding_type, feature_ensemble=feature_ensemble).pred_masks


def canvases(cfg: SegGPTConfig, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *cfg.img_size, generator=g), torch.randn(n, 3, *cfg.img_size, generator=g)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("seg_type,embedding_type", [(1, "instance"), (0, "semantic")])
def test_matches_hugging_face(tiny_model, n, seg_type, embedding_type):
    hf = hf_twin(tiny_model)
    imgs, tgts = canvases(tiny_model.config, n)
    with torch.no_grad():
        ours = tiny_model(imgs, tgts, seg_type=seg_type)
        ref = hf_paint(hf, imgs, tgts, embedding_type)
    assert ours.shape == (n, 3, *tiny_model.config.img_size)
    assert ours.std() > 0.05  # a non-degenerate output, so the comparison means something
    assert (ours - ref).abs().max() < 1e-4
    if n > 1:  # each pair is painted on its own without the ensemble
        with torch.no_grad():
            single = tiny_model(imgs[1:2], tgts[1:2], seg_type=seg_type)
        assert (single[0] - ours[1]).abs().max() < 1e-5


def test_seg_type_changes_output(tiny_model):
    imgs, tgts = canvases(tiny_model.config, 1)
    with torch.no_grad():
        assert (tiny_model(imgs, tgts, seg_type=0) - tiny_model(imgs, tgts, seg_type=1)).abs().max() > 1e-3


def reference_ensemble(model: SegGPT, imgs, tgts):
    """Official ensemble written out step by step with explicit loops over prompts."""
    cfg, n = model.config, imgs.shape[0]
    x = model.embed(imgs, tgts, model.default_masked_pos().expand(n, -1), torch.ones(n))
    taps = []
    for i, blk in enumerate(model.blocks):
        a = blk.attn(blk.norm1(x)).clone()
        half = a.shape[1] // 2
        groups = [list(range(0, n)), list(range(n, 2 * n))] if i <= cfg.merge_index else [list(range(n))]
        for group in groups:
            mean = sum(a[j, half:] for j in group) / len(group)
            for j in group:
                a[j, half:] = mean
        x = x + a
        x = x + blk.mlp(blk.norm2(x))
        if i == cfg.merge_index:
            x = (x[:n] + x[n:]) / 2
        if i in cfg.out_indices:
            taps.append(model.norm(x))
    return model.forward_decoder(taps)


def test_feature_ensemble_matches_official_semantics(tiny_model):
    imgs, tgts = canvases(tiny_model.config, 3)
    s = tiny_model.config.image_size
    imgs[:, :, s:] = imgs[:1, :, s:]  # one query, three prompts
    with torch.no_grad():
        ours = tiny_model(imgs, tgts, feature_ensemble=True)
        ref = reference_ensemble(tiny_model, imgs, tgts)
        plain = tiny_model(imgs, tgts)
    assert (ours - ref).abs().max() < 1e-5
    assert (ours - plain).abs().max() > 1e-3  # the ensemble does change the painting
    # query rows agree across prompts, except the first, which the 3x3 conv mixes with the prompt half
    assert (ours[1:, :, s + 1:] - ours[:1, :, s + 1:]).abs().max() < 1e-5


def test_ensemble_never_touches_a_single_prompt(tiny_model):
    imgs, tgts = canvases(tiny_model.config, 1)
    with torch.no_grad():
        assert torch.equal(tiny_model(imgs, tgts, feature_ensemble=True), tiny_model(imgs, tgts))


def test_grouped_ensemble_equals_separate_queries(tiny_model):
    imgs, tgts = canvases(tiny_model.config, 4)  # two queries x two prompts, laid out [q0p0, q0p1, q1p0, q1p1]
    s = tiny_model.config.image_size
    imgs[1, :, s:] = imgs[0, :, s:]
    imgs[3, :, s:] = imgs[2, :, s:]
    with torch.no_grad():
        both = tiny_model(imgs, tgts, feature_ensemble=True, prompts_per_query=2)
        first = tiny_model(imgs[:2], tgts[:2], feature_ensemble=True)
        second = tiny_model(imgs[2:], tgts[2:], feature_ensemble=True)
    assert (both - torch.cat([first, second])).abs().max() < 1e-5


def test_bad_inputs_raise_value_error(tiny_model):
    imgs, tgts = canvases(tiny_model.config, 2)
    with pytest.raises(ValueError, match="NaN"):
        tiny_model(imgs.masked_fill(torch.rand_like(imgs) < 0.01, float("nan")), tgts)
    with pytest.raises(ValueError, match="imgs must be"):
        tiny_model(imgs[:, :, :10], tgts)
    with pytest.raises(ValueError, match="batch sizes differ"):
        tiny_model(imgs, tgts[:1])
    with pytest.raises(ValueError, match="bool_masked_pos"):
        tiny_model(imgs, tgts, bool_masked_pos=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="groups"):
        tiny_model(imgs, tgts, feature_ensemble=True, prompts_per_query=3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=(100, 100)), "canvas"), (dict(embed_dim=65), "divisible"), (dict(depth=10), "multiple of 4"),
    (dict(depth=8), "taps"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegGPTConfig(**{**SegGPTConfig.tiny().__dict__, "out_indices": (), **kwargs})


def test_vit_large_shape_matches_hugging_face():
    """The released configuration, random weights: 370.7 M parameters, taps 5/11/17/23, same painting."""
    cfg = SegGPTConfig.vit_large()
    assert cfg.out_indices == (5, 11, 17, 23) and cfg.grid == (56, 28)
    torch.manual_seed(0)
    model = randomize(SegGPT(cfg), scale=0.02)
    assert sum(p.numel() for p in model.parameters()) == 370_723_203
    assert model.blocks[0].attn.rel_pos_h.shape == (111, 64) and model.blocks[0].attn.rel_pos_w.shape == (55, 64)
    hf = hf_twin(model)
    imgs, tgts = canvases(cfg, 1)
    with torch.no_grad():
        ours = model(imgs, tgts)
        ref = hf_paint(hf, imgs, tgts)
    assert ours.std() > 0.05
    assert (ours - ref).abs().max() < 1e-4
