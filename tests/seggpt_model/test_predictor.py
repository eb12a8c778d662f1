"""SegGPTPredictor: any-size images in, label maps at the query's size out."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from seggpt_model import SegGPTPredictor
from seggpt_model import processing as P
from seggpt_model.testing import random_model


def scene(seed: int, h: int = 60, w: int = 90):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    lm = np.zeros((h, w), np.int64)
    lm[5:25, 10:40] = 1
    lm[30:50, 50:80] = 2
    return img, lm


def test_predict_returns_a_label_map_of_the_query_size(tiny_model):
    pred = SegGPTPredictor(tiny_model)
    img, lm = scene(0)
    query = scene(1, h=37, w=101)[0]
    res = pred.predict(query, [(img, lm)])
    assert res.label_map.shape == (37, 101) and res.label_map.dtype == np.int32
    assert res.scores.shape == (3, 37, 101)
    assert np.allclose(res.scores.sum(0), 1, atol=1e-4)
    assert (res.label_map == res.scores.argmax(0)).all()


def test_predictor_paints_what_the_model_paints(tiny_model):
    """The predictor's canvas is exactly the official layout: prompt above query."""
    pred = SegGPTPredictor(tiny_model)
    img, lm = scene(0)
    query = scene(1)[0]
    s = tiny_model.config.image_size
    imgs = torch.cat([P.normalize(P.resize_image(img, s)), P.normalize(P.resize_image(query, s))], 1)[None]
    m = P.normalize(P.resize_mask(P.colorize(lm), s))
    tgts = torch.cat([m, m], 1)[None]
    with torch.no_grad():
        expected = tiny_model(imgs, tgts)[0, :, s:]
    label_map, _ = P.decode(expected, 2, query.shape[:2])
    assert (pred.predict(query, [(img, lm)]).label_map == label_map).all()


def test_batch_equals_single_queries_with_several_prompts(tiny_model):
    pred = SegGPTPredictor(tiny_model, batch_size=4)
    prompts = [scene(0), scene(2), scene(3)]
    queries = [scene(10 + i)[0] for i in range(3)]
    batch = pred.predict_batch(queries, prompts)
    for q, r in zip(queries, batch):
        single = pred.predict(q, prompts)
        assert np.abs(single.scores - r.scores).max() < 1e-4


def test_deterministic_and_accepts_pil(tiny_model):
    pred = SegGPTPredictor(tiny_model)
    img, lm = scene(0)
    q = scene(1)[0]
    a = pred.predict(Image.fromarray(q), [(Image.fromarray(img), lm)])
    b = pred.predict(q, [(img, lm)])
    assert np.array_equal(a.scores, b.scores)


def test_bf16_agrees_with_fp32(tiny_model):
    img, lm = scene(0)
    q = scene(1)[0]
    ref = SegGPTPredictor(tiny_model).predict(q, [(img, lm)]).label_map
    model16 = type(tiny_model)(tiny_model.config)
    model16.load_state_dict(tiny_model.state_dict())
    low = SegGPTPredictor(model16, dtype=torch.bfloat16).predict(q, [(img, lm)]).label_map
    assert (low == ref).mean() > 0.9


def test_dtype_choice_and_one_fingerprint_per_weights(tiny_model):
    from seggpt_model.predictor import resolve_dtype, supports_bf16

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if supports_bf16(cpu) else torch.float32)
    assert (resolve_dtype("fp32", cpu), resolve_dtype("bf16", cpu)) == (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("fp16", cpu)
    full = SegGPTPredictor(tiny_model, dtype="fp32")
    half = SegGPTPredictor(random_model(), dtype="bf16")  # same seed, same weights
    assert half.model.pos_embed.dtype == torch.bfloat16 and half.fingerprint == full.fingerprint


def test_num_labels_widens_the_palette(tiny_model):
    img, lm = scene(0)
    res = SegGPTPredictor(tiny_model).predict(scene(1)[0], [(img, lm)], num_labels=5)
    assert res.scores.shape[0] == 6


@pytest.mark.parametrize("prompts,match", [
    ([], "at least one"),
    ([(np.zeros((10, 10, 3), np.uint8), np.zeros((11, 10), int))], "label map is 10x11 but its image is 10x10"),
    ([(np.zeros((10, 10, 3), np.uint8), np.full((10, 10), 40))], r"0\.\.32"),
    ([np.zeros((10, 10, 3), np.uint8)], "pair"),
])
def test_bad_prompts(tiny_model, prompts, match):
    with pytest.raises(ValueError, match=match):
        SegGPTPredictor(tiny_model).predict(np.zeros((8, 8, 3), np.uint8), prompts)


def test_bad_query_and_seg_type(tiny_model):
    pred = SegGPTPredictor(tiny_model)
    with pytest.raises(ValueError, match="zero size"):
        pred.predict(np.zeros((0, 8, 3), np.uint8), [scene(0)])
    with pytest.raises(ValueError, match="seg_type"):
        pred.predict(scene(1)[0], [scene(0)], seg_type="panoptic")
