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
@pytest.mark.parametrize("band", [256, 12])  # one attention band, or uneven bands of a few patch rows
def test_fast_equals_reference_in_fp32(config, k, q, seg_type, band):
    model = random_model(CONFIGS[config])
    s = model.config.image_size
    g = torch.Generator().manual_seed(k * 10 + q)
    p_img, p_mask = torch.randn(k, 3, s, s, generator=g), torch.randn(k, 3, s, s, generator=g)
    queries = torch.randn(q, 3, s, s, generator=g)
    ref = reference(model, p_img, p_mask, queries, seg_type)
    fast = FastPainter(model, band=band)(p_img, p_mask, queries, seg_type=seg_type)
    assert ref.std() > 0.05
    assert (fast - ref).abs().max() < 1e-4


def test_bf16_fast_labels_match_fp32_reference_on_demo_episodes():
    """The issue's bar: IoU >= 0.99 between bf16 fast and fp32 reference label maps (demo model)."""
    from seggpt_model import load_seggpt
    from seggpt_model.episodes import EVAL_SEED, make_episode
    from seggpt_model.metrics import label_agreement

    ref = SegGPTPredictor(load_seggpt("demo"), fast=False)
    low = SegGPTPredictor(load_seggpt("demo"), dtype=torch.bfloat16)
    episodes = [make_episode(EVAL_SEED + i, absent_prob=0.0, num_prompts=1 + i % 3) for i in range(24)]
    scores, labelled = zip(*label_agreement(ref, low, episodes))
    assert sum(scores) / len(scores) >= 0.99 and min(scores) >= 0.9
    assert min(labelled) > 0.01  # the maps agree on painted objects, not on empty canvases
