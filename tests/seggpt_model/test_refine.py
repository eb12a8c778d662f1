"""Edge refinement and the boundary F-score that measures it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seggpt_model.metrics import boundary_f_score
from seggpt_model.refine import guided_filter, keep_detections, refine_edges


def square(size: int = 100, lo: int = 30, hi: int = 70) -> np.ndarray:
    lab = np.zeros((size, size), np.int64)
    lab[lo:hi, lo:hi] = 1
    return lab


def test_boundary_f_score_counts_edges_within_the_tolerance():
    t = square()
    assert boundary_f_score(t, t, 1) == 1.0
    assert boundary_f_score(np.roll(t, 2, 1), t, 1, tolerance=2) == 1.0
    assert 0.4 < boundary_f_score(np.roll(t, 2, 1), t, 1, tolerance=1) < 0.6  # left/right edges off, top/bottom ok
    assert boundary_f_score(np.zeros_like(t), t, 1) == 0.0
    assert boundary_f_score(np.zeros_like(t), np.zeros_like(t), 1) == 1.0
    full = np.ones_like(t)
    assert boundary_f_score(full, full, 1) == 1.0  # the image border is no edge
    with pytest.raises(ValueError, match="differ in size"):
        boundary_f_score(t[:5], t, 1)


def test_boundary_f_score_sees_a_ragged_edge_that_iou_hardly_notices():
    from seggpt_model.metrics import mean_iou

    t = square(200, 40, 160)
    ragged = t.copy()
    ragged[40:160:2, 160:163] = 1  # teeth along one edge
    assert mean_iou(ragged, t, 1) > 0.98
    assert boundary_f_score(ragged, t, 1, tolerance=1) < 0.95


def test_guided_filter_keeps_a_constant_and_sums_to_one():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (60, 80, 3)).astype(np.uint8)
    scores = torch.tensor([0.25, 0.75]).view(2, 1, 1).expand(2, 60, 80).contiguous()
    out = guided_filter(scores, image, radius=4)
    assert torch.allclose(out, scores, atol=1e-3)
    with pytest.raises(ValueError, match="guide is"):
        guided_filter(scores, image[:10], radius=4)


def test_refinement_moves_an_upsampled_edge_onto_the_image_edge():
    """A square painted on an 8x coarser canvas lands up to a canvas pixel off; the image knows better."""
    truth = square(128, 37, 91)
    image = np.where(truth[..., None] == 1, 220, 40).astype(np.uint8).repeat(3, -1)
    coarse = np.zeros((16, 16), np.float32)
    coarse[4:12, 4:12] = 1  # the edge at 32/96 instead of 37/91
    fg = F.interpolate(torch.from_numpy(coarse)[None, None], size=(128, 128), mode="bilinear", align_corners=False)[0]
    scores = torch.cat([1 - fg, fg])
    before = scores.argmax(0).numpy()
    after = refine_edges(scores.clone(), image, factor=8).argmax(0).numpy()
    assert boundary_f_score(after, truth, 1, tolerance=1) > boundary_f_score(before, truth, 1, tolerance=1) + 0.3
    assert (after == truth).mean() > (before == truth).mean()
    assert refine_edges(scores, image, factor=1) is scores  # nothing was upsampled: nothing to do


def test_a_region_refinement_would_erase_is_kept():
    before = torch.zeros(2, 20, 20)
    before[0] = 1
    before[:, 5:8, 5:8] = torch.tensor([0.4, 0.6]).view(2, 1, 1)  # a weak detection
    before[:, 12:18, 12:18] = torch.tensor([0.1, 0.9]).view(2, 1, 1)  # a strong one
    after = before.clone()
    after[:, 5:8, 5:8] = torch.tensor([0.7, 0.3]).view(2, 1, 1)  # refinement erased the weak one
    after[:, 12, 12:18] = torch.tensor([1.0, 0.0]).view(2, 1)  # and trimmed the strong one: allowed
    kept = keep_detections(before, after.clone())
    assert torch.equal(kept[:, 5:8, 5:8], before[:, 5:8, 5:8])
    assert torch.equal(kept[:, 12:18, 12:18], after[:, 12:18, 12:18])


def test_label_argmax_is_torch_argmax_ties_included():
    from seggpt_model.refine import label_argmax

    scores = torch.rand(4, 30, 40)
    scores[:, :5] = 0.25  # ties: the first label wins
    scores[2, 10:12] = scores[1, 10:12]
    assert torch.equal(label_argmax(scores), scores.argmax(0).to(torch.int32))
