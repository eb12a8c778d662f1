"""Palette, image conversion, label maps and decoding paintings back to labels."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from seggpt_model import processing as P


def test_palette_is_distinct_and_starts_with_black():
    pal = P.palette().astype(int)
    assert pal.shape == (P.MAX_LABELS + 1, 3) and (pal[0] == 0).all()
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(pal, 2)]
    assert min(dists) >= 85
    assert len({tuple(c) for c in pal}) == len(pal)


def test_exact_palette_painting_decodes_to_the_labels():
    labels = np.random.default_rng(0).integers(0, 6, size=(24, 24))
    painted = P.normalize(P.colorize(labels))
    label_map, scores = P.decode(painted, num_labels=5, size=(24, 24))
    assert (label_map == labels).all()
    assert scores.shape == (6, 24, 24) and np.allclose(scores.sum(0), 1, atol=1e-5)
    assert scores.max(0).min() > 0.99  # pure palette colours are confident


def test_decode_resizes_to_the_original_size_and_picks_the_nearest_colour():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, 8:] = (230, 240, 250)  # near white = label 1
    label_map, scores = P.decode(P.normalize(rgb), num_labels=2, size=(30, 50))
    assert label_map.shape == (30, 50)
    assert (label_map[:, :20] == 0).all() and (label_map[:, 30:] == 1).all()


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "CMYK"])
def test_image_modes_convert(mode):
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[:, :3] = 200
    img = Image.fromarray(rgb).convert(mode)
    out = P.to_rgb_array(img)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    assert out[:, :3].mean() > 150 and out[:, 4:].max() < 30


def test_transparent_pixels_become_background_black():
    rgba = np.full((4, 4, 4), 255, np.uint8)
    rgba[:, :2, 3] = 0
    out = P.to_rgb_array(Image.fromarray(rgba, "RGBA"))
    assert (out[:, :2] == 0).all() and (out[:, 2:] == 255).all()


def test_16_bit_images_are_scaled_not_clipped():
    a = np.array([[0, 32768, 65535]], np.uint16)
    out = P.to_rgb_array(Image.fromarray(a))
    assert Image.fromarray(a).mode.startswith("I;16")
    assert out[0, :, 0].tolist() == [0, 128, 255]
    assert P.to_rgb_array(a)[0, :, 1].tolist() == [0, 128, 255]


@pytest.mark.parametrize("bad,match", [
    (np.zeros((0, 5, 3), np.uint8), "zero size"),
    (np.zeros((5, 5, 2), np.uint8), "HxW, HxWx3"),
    (np.zeros((5, 5, 3), np.float32), "uint8"),
    (Image.new("F", (3, 3)), "float"),
    (Image.new("RGB", (0, 4)), "zero size"),
])
def test_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        P.to_rgb_array(bad)


@pytest.mark.parametrize("bad,match", [
    (np.array([[0, 33]]), r"0\.\.32"),
    (np.array([[-1, 0]]), r"0\.\.32"),
    (np.array([[0.5, 1.0]]), "whole-number"),
    (np.zeros((2, 2, 3), int), "HxW"),
    (np.zeros((0, 3), int), "zero size"),
    (Image.new("RGB", (2, 2)), "mode L, P or I"),
])
def test_bad_label_maps(bad, match):
    with pytest.raises(ValueError, match=match):
        P.to_label_map(bad)


def test_mask_files_as_people_make_them():
    binary = np.zeros((6, 6), np.uint8)
    binary[2:4, 2:4] = 255
    assert P.mask_file_to_label_map(Image.fromarray(binary)).max() == 1
    ids = binary // 255 * 2
    assert P.mask_file_to_label_map(Image.fromarray(ids)).max() == 2
    colours = np.zeros((6, 6, 3), np.uint8)
    colours[0, 0] = (255, 0, 0)
    colours[5, 5] = (0, 255, 0)
    lm = P.mask_file_to_label_map(Image.fromarray(colours))
    assert lm[0, 0] != lm[5, 5] and {lm[0, 0], lm[5, 5]} == {1, 2} and lm[3, 3] == 0


def test_normalize_round_trip_and_canvas():
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    t = P.normalize(rgb)
    assert torch.allclose(P.denormalize(t) * 255, torch.from_numpy(rgb).permute(2, 0, 1).float(), atol=1e-3)
    assert P.stack_canvas(t, t).shape == (3, 16, 8)


def test_overlay_tints_only_labelled_pixels():
    img = np.full((4, 4, 3), 100, np.uint8)
    lm = np.zeros((4, 4), int)
    lm[0, 0] = 1
    out = P.overlay(img, lm)
    assert (out[0, 0] != 100).any() and (out[1:, :] == 100).all()
