"""Scale-matched tiling: geometry, blending, one region across tile borders, auto = off when objects
are large, off = the old whole-image path bit for bit, tuning crops, bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from seggpt_model import SegGPTPredictor
from seggpt_model import processing as P
from seggpt_model import tiling as T
from seggpt_model.tuning import scale_matched_examples

CFG = T.TilingConfig(min_object=0.15, max_object=0.6, overlap=0.25, max_tiles=64, max_prompts=4)


def discs(size: tuple[int, int], centres: list[tuple[int, int]], radius: int, seed: int = 0):
    """A noisy dark image with bright discs, and their label map (all label 1)."""
    h, w = size
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 60, (h, w, 3)).astype(np.uint8))
    lab = Image.new("L", (w, h), 0)
    for y, x in centres:
        ImageDraw.Draw(img).ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 255, 255))
        ImageDraw.Draw(lab).ellipse([x - radius, y - radius, x + radius, y + radius], fill=1)
    return np.asarray(img), np.asarray(lab).astype(np.int64)


def bright_painter(pred: SegGPTPredictor):
    """A stand-in for the model that paints label 1 wherever the query tile is bright."""
    white = torch.from_numpy(P.palette()[1]).float().view(3, 1, 1) / 255

    def paint(queries, p_img, p_mask, seg_type="instance"):
        bright = (P.denormalize(queries).mean(1, keepdim=True) > 0.5).float()
        rgb = bright * white
        mean = torch.tensor(P.IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(P.IMAGENET_STD).view(3, 1, 1)
        return (rgb - mean) / std

    pred.paint = paint
    return pred


# geometry ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,side,overlap", [((500, 700), 128, 0.25), ((64, 64), 128, 0.25),
                                                ((1, 4000), 100, 0.5), ((1000, 130), 129, 0.1)])
def test_tiles_cover_the_image_with_the_overlap_asked(shape, side, overlap):
    boxes = T.tile_grid(shape, side, overlap)
    covered = np.zeros(shape, int)
    for y, x, h, w in boxes:
        assert (h, w) == (min(side, shape[0]), min(side, shape[1]))
        assert 0 <= y and y + h <= shape[0] and 0 <= x and x + w <= shape[1]
        covered[y:y + h, x:x + w] += 1
    assert covered.min() >= 1
    for axis in (0, 1):
        starts = sorted({b[axis] for b in boxes})
        size = boxes[0][2 + axis]
        assert all(b - a <= size * (1 - overlap) + 1 for a, b in zip(starts, starts[1:]))


def test_tile_count_matches_the_grid_and_the_cap_coarsens_the_scale():
    assert len(T.tile_grid((512, 512), 128, 0.25)) == 25  # ceil(384 / 96) + 1 = 5 per axis
    assert len(T.tile_grid((100, 100), 128, 0.25)) == 1
    side, reason = T.plan_query(10.0, (8000, 8000), 64, CFG)  # wants 64 px tiles: 167**2 of them
    assert reason == "tiled, coarsened to max_tiles"
    assert len(T.tile_grid((8000, 8000), side, CFG.overlap)) <= CFG.max_tiles


def test_crop_boxes_show_every_object_within_the_cap():
    lab = np.zeros((400, 400), np.int64)
    for i, (y, x) in enumerate([(20, 20), (20, 350), (350, 20), (350, 350), (200, 200)]):
        lab[y:y + 20, x:x + 20] = 1 + i % 2
    boxes = T.crop_boxes(lab, 100, max_crops=10)
    assert len(boxes) == 5 and all(b[2:] == (100, 100) for b in boxes)
    shown = np.zeros_like(lab, bool)
    for y, x, h, w in boxes:
        shown[y:y + h, x:x + w] = True
    assert shown[lab > 0].all()
    assert len(T.crop_boxes(lab, 100, max_crops=2)) == 2
    assert T.crop_boxes(np.zeros((400, 300), np.int64), 100, 3) == [(150, 100, 100, 100)]


# blending ----------------------------------------------------------------------------------------

def test_taper_is_positive_and_overlapping_ramps_sum_to_one():
    rise, fall = T.taper(16, 16, 0), T.taper(16, 0, 16)
    assert (rise > 0).all() and np.allclose(rise + fall, 1)
    assert (T.taper(10, 0, 0) == 1).all()


def test_a_constant_blends_to_the_same_constant():
    shape, side, canvas = (300, 470), 100, 64
    boxes = T.tile_grid(shape, side, 0.3)
    b = T.ScoreBlender(shape, boxes, canvas, side, channels=2)
    for _ in boxes:
        b.add(torch.tensor([0.3, 0.7]).view(2, 1, 1).expand(2, canvas, canvas))
    out = b.result()
    assert out.shape == (2, 192, 301) and (b.weight > 0).all()
    assert torch.allclose(out, torch.tensor([0.3, 0.7]).view(2, 1, 1).expand_as(out), atol=1e-6)


def test_tiles_land_where_they_belong():
    """Tiles cut from a smooth map blend back into that map at the working resolution."""
    shape, side, canvas = (400, 300), 100, 50
    yy, xx = np.mgrid[0:400, 0:300].astype(np.float32)
    truth = torch.from_numpy(np.stack([yy / 400, xx / 300]))
    boxes = T.tile_grid(shape, side, 0.25)
    b = T.ScoreBlender(shape, boxes, canvas, side, channels=2)
    for y, x, h, w in boxes:
        b.add(torch.nn.functional.interpolate(truth[None, :, y:y + h, x:x + w], size=(canvas, canvas),
                                              mode="area")[0])
    expected = torch.nn.functional.interpolate(truth[None], size=b.work, mode="area")[0]
    assert (b.result() - expected).abs().max() < 0.01


def test_the_blend_buffer_is_bounded_for_huge_images():
    side, _ = T.plan_query(10.0, (8000, 8000), 448, CFG)
    boxes = T.tile_grid((8000, 8000), side, CFG.overlap)
    b = T.ScoreBlender((8000, 8000), boxes, 448, side, channels=3)
    assert b.work[0] * b.work[1] <= CFG.max_tiles * 448 ** 2


# the predictor -----------------------------------------------------------------------------------

def test_off_is_the_old_whole_image_path_bit_for_bit(tiny_model):
    pred = SegGPTPredictor(tiny_model, tiling=CFG)
    prompt = discs((300, 300), [(40, 40), (200, 120)], 8)
    queries = [discs((300, 400), [(150, 150)], 8, seed=1)[0], discs((50, 70), [(20, 20)], 5, seed=2)[0]]
    s = tiny_model.config.image_size
    p_img = P.normalize(P.resize_image(prompt[0], s))[None]
    p_mask = P.normalize(P.resize_mask(P.colorize(prompt[1]), s))[None]
    painted = pred.paint(torch.stack([P.normalize(P.resize_image(q, s)) for q in queries]), p_img, p_mask)
    got = pred.predict_batch(queries, [prompt], tiling="off")
    for q, pq, res in zip(queries, painted, got):
        label_map, scores = P.decode(pq, 1, q.shape[:2])
        assert torch.equal(torch.from_numpy(res.scores), torch.from_numpy(scores))
        assert np.array_equal(res.label_map, label_map)
        assert (res.tiling.tiles, res.tiling.reason) == (1, "off")
    assert pred.predict(queries[0], [prompt], tiling="auto").tiling.tiles > 1  # auto would have tiled it


def test_auto_is_off_when_the_objects_are_large_for_the_image(tiny_model):
    pred = SegGPTPredictor(tiny_model, tiling=CFG)
    prompt = discs((150, 120), [(40, 40), (100, 70)], 15)
    queries = [discs((140, 160), [(70, 70)], 15, seed=1)[0], discs((40, 30), [(20, 15)], 5, seed=2)[0]]
    for refine in (False, True):  # tiling="auto" refines by default, "off" does not: compare like with like
        auto = pred.predict_batch(queries, [prompt, prompt], refine=refine)
        off = pred.predict_batch(queries, [prompt, prompt], tiling="off", refine=refine)
        for a, o in zip(auto, off):
            assert torch.equal(torch.from_numpy(a.scores), torch.from_numpy(o.scores))
            assert np.array_equal(a.label_map, o.label_map)
    assert [a.tiling.reason for a in auto] == ["objects in range", "image within canvas"]
    assert [(a.tiling.tiles, a.tiling.prompt_crops) for a in auto] == [(1, 2), (1, 2)]


def test_an_object_cut_by_a_tile_border_is_one_region():
    import cv2

    from seggpt_model.testing import random_model

    pred = bright_painter(SegGPTPredictor(random_model(), tiling=CFG))
    prompt = discs((400, 400), [(100, 100), (300, 250)], 10)
    plan = T.plan_query(T.object_size([prompt[1]]), (400, 400), 64, CFG)
    boxes = T.tile_grid((400, 400), plan[0], CFG.overlap)
    border = boxes[0][3]  # the first tile's right edge: a disc centred on it straddles two tiles
    query, truth = discs((400, 400), [(60, border)], 25, seed=3)
    res = pred.predict(query, [prompt])
    assert res.tiling.tiles == len(boxes) > 1
    n, _ = cv2.connectedComponents((res.label_map == 1).astype(np.uint8), connectivity=8)
    assert n - 1 == 1
    inter = ((res.label_map == 1) & (truth == 1)).sum()
    assert inter / ((res.label_map == 1) | (truth == 1)).sum() > 0.9


def test_prompts_are_cropped_at_scale_and_the_ensemble_is_capped(tiny_model):
    pred = SegGPTPredictor(tiny_model, tiling=CFG)
    far_apart = [(30, 30), (30, 370), (370, 30), (370, 370), (200, 200), (100, 250)]
    prompt = discs((400, 400), far_apart, 8)
    query = discs((400, 400), [(100, 100)], 8, seed=1)[0]
    res = pred.predict(query, [prompt])
    assert res.tiling.prompt_crops == CFG.max_prompts and res.tiling.tiles > 1
    assert res.tiling.scale == T.crop_side(T.object_size([prompt[1]]), 64, CFG)
    small = discs((100, 100), [(50, 50)], 8, seed=4)  # already at scale: used whole, beside the crops
    assert pred.predict(query, [small, prompt, prompt]).tiling.prompt_crops == CFG.max_prompts
    assert pred.predict(query, [small] * 6).tiling.prompt_crops == 6  # each prompt keeps its place


# tuning at the working scale ---------------------------------------------------------------------

def test_tuning_examples_are_crops_at_the_working_scale():
    big = discs((600, 600), [(100, 100), (450, 300)], 10)
    small = discs((90, 90), [(45, 45)], 10, seed=1)
    out = scale_matched_examples([big, small], CFG, canvas=64)
    side = T.crop_side(T.object_size([big[1], small[1]]), 64, CFG)
    crops, whole = out[:-1], out[-1]
    assert len(crops) == 2 and all(img.shape == (side, side, 3) and lab.shape == (side, side) for img, lab in crops)
    assert all(T.in_range(np.median(T.instance_sizes(lab)), side, CFG) for _, lab in crops)
    assert whole[0] is small[0] or np.array_equal(whole[0], small[0])
    unlabelled = [(big[0], np.zeros_like(big[1]))]
    assert len(scale_matched_examples(unlabelled, CFG, canvas=64)) == 1  # nothing to measure: whole


# bad inputs --------------------------------------------------------------------------------------

def test_unlabelled_prompts_fall_back_to_one_tile(tiny_model):
    pred = SegGPTPredictor(tiny_model, tiling=CFG)
    img = discs((500, 500), [(100, 100)], 8)[0]
    res = pred.predict(img, [(img, np.zeros((500, 500), np.int64))], refine=False)
    off = pred.predict(img, [(img, np.zeros((500, 500), np.int64))], tiling="off")
    assert (res.tiling.tiles, res.tiling.reason) == (1, "no labelled objects in the prompts")
    assert np.array_equal(res.scores, off.scores)


def test_extreme_aspect_ratio_gets_a_bounded_grid(tiny_model):
    pred = SegGPTPredictor(tiny_model, tiling=CFG)
    prompt = discs((200, 200), [(50, 50), (150, 150)], 5)
    rng = np.random.default_rng(0)
    for shape in ((1, 4000), (4000, 3)):
        res = pred.predict(rng.integers(0, 255, shape + (3,)).astype(np.uint8), [prompt])
        assert res.label_map.shape == shape and 1 < res.tiling.tiles <= CFG.max_tiles


def test_huge_image_tiles_stay_within_the_cap(tiny_model):
    cfg = T.TilingConfig(min_object=0.15, max_object=0.6, max_tiles=6)
    pred = SegGPTPredictor(tiny_model, tiling=cfg)
    prompt = discs((300, 300), [(50, 50)], 5)
    res = pred.predict(np.zeros((1500, 1100, 3), np.uint8), [prompt])
    assert res.label_map.shape == (1500, 1100) and res.tiling.tiles <= 6
    assert res.tiling.reason == "tiled, coarsened to max_tiles"


def test_bad_tiling_arguments(tiny_model):
    with pytest.raises(ValueError, match="tiling must be 'auto' or 'off'"):
        SegGPTPredictor(tiny_model).predict(np.zeros((8, 8, 3), np.uint8), [discs((20, 20), [(5, 5)], 3)],
                                            tiling="on")
    with pytest.raises(ValueError, match="min_object <= max_object"):
        T.TilingConfig(min_object=0.5, max_object=0.2)
    with pytest.raises(ValueError, match="overlap"):
        T.TilingConfig(min_object=0.1, max_object=0.2, overlap=0.9)
    with pytest.raises(ValueError, match="max_tiles"):
        T.TilingConfig(min_object=0.1, max_object=0.2, max_tiles=0)
