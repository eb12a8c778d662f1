"""The fast path paints what the reference forward paints."""
from __future__ import annotations

import pytest
import torch

from seggpt_model import SegGPTConfig, SegGPTPredictor
from seggpt_model.fast import FastPainter
from seggpt_model.testing import random_model


def reference(model, p_img, p_mask, queries, seg_type):
    k, q, s = p_img.shape[0], queries.shape[0], model.config.image_size
    imgs = torch.cat([p_img.repeat(q, 1, 1, 1), queries.repeat_interleave(k, 0)], 2)
    tgts = torch.cat([p_mask, p_mask], 2).repeat(q, 1, 1, 1)
    with torch.no_grad():
        return model(imgs, tgts, seg_type=seg_type, feature_ensemble=k > 1, prompts_per_query=k)[::k, :, s:]


CONFIGS = {
    "tiny": SegGPTConfig.tiny(),
    "wide": SegGPTConfig(img_size=(128, 64), patch_size=8, embed_dim=96, depth=12, num_heads=3,
                         decoder_embed_dim=16, pretrain_grid=6),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("k,q", [(1, 1), (3, 1), (2, 3)])
@pytest.mark.parametrize("seg_type", [0, 1])
def test_fast_equals_reference_in_fp32(config, k, q, seg_type):
    model = random_model(CONFIGS[config])
    s = model.config.image_size
    g = torch.Generator().manual_seed(k * 10 + q)
    p_img, p_mask = torch.randn(k, 3, s, s, generator=g), torch.randn(k, 3, s, s, generator=g)
    queries = torch.randn(q, 3, s, s, generator=g)
    ref = reference(model, p_img, p_mask, queries, seg_type)
    fast = FastPainter(model)(p_img, p_mask, queries, seg_type=seg_type)
    assert ref.std() > 0.05
    assert (fast - ref).abs().max() < 1e-4


def test_bf16_fast_label_maps_agree_with_fp32_reference(tiny_model):
    import numpy as np
    from seggpt_model.episodes import make_episode
    from seggpt_model.metrics import mean_iou

    ref = SegGPTPredictor(tiny_model, fast=False)
    low = SegGPTPredictor(random_model(), dtype=torch.bfloat16)
    agree = []
    for i in range(4):
        ep = make_episode(i, size=64, num_prompts=2)
        a = ref.predict(ep.query_image, ep.prompts, num_labels=2).label_map
        b = low.predict(ep.query_image, ep.prompts, num_labels=2).label_map
        agree.append((a == b).mean())
    assert np.mean(agree) > 0.9  # random tiny weights amplify rounding; the benchmark checks real models
