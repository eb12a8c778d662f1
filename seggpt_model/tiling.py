"""Scale-matched tiling: show SegGPT objects at the size it segments best, whatever the image size.

SegGPT paints one fixed canvas (448 px per half for ViT-L, 64 px for the demo model).  A 4000 px
photo shrinks 9x onto it and objects a few dozen pixels wide vanish.  Here the prompts' objects
set a working scale (a crop side in image pixels at which they land in the model's good range
on the canvas); prompts are cropped around their objects at that scale, the query is cut into
overlapping tiles of that side, and the tiles' per-label scores are blended with a cosine taper
at a bounded resolution, then upsampled and decoded once at full resolution (so an instance cut
by a tile border is still one region).

Geometry is in image pixels; boxes are ``(y, x, h, w)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .modeling import SegGPTConfig

Box = tuple[int, int, int, int]  # (y, x, h, w) in image pixels

VIT_L_IMAGE_SIZE = 448  # the released SegGPT's canvas half


@dataclass(frozen=True)
class TilingConfig:
    """Where a model segments well, and how much tiling to afford.

    ``min_object``..``max_object``: instance size (the longer side of a connected component's
    box) as a fraction of the canvas side, inside which the model segments well; below
    ``min_object`` a query is tiled, and a crop puts the prompts' median instance at ``target``
    (the range's geometric centre).  ``overlap``: share of a tile's side shared with its
    neighbour.  ``max_tiles``: tiles per query at most (the scale coarsens to fit, so huge images
    stay bounded).  ``max_prompts``: ensemble members at most once prompts are cropped (each
    prompt keeps at least one).

    ``for_model`` picks the defaults: DEMO_TILING (measured on the demo model: its range is where
    whole-image mIoU is at least 3/4 of its peak) or VIT_L_TILING (from the paper's training
    recipe).  ``overlap`` 0.25 and ``max_prompts`` 4 were measured on the high-res suite (20
    episodes, mIoU): max_prompts 1/2/4 gave 0.470/0.489/0.494 at 3.7/4.9/9.8 s per query;
    overlap 0.5 gave 0.470 (more tiles per pixel, so max_tiles coarsens the scale sooner);
    max_tiles 128 gave 0.500 at 71 instead of 60 tiles per query.
    """

    min_object: float
    max_object: float
    overlap: float = 0.25
    max_tiles: int = 64
    max_prompts: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.min_object <= self.max_object <= 1:
            raise ValueError(f"need 0 < min_object <= max_object <= 1, got {self.min_object}, {self.max_object}")
        if not 0 <= self.overlap < 0.75:
            raise ValueError(f"overlap must lie in [0, 0.75), got {self.overlap}")
        if self.max_tiles < 1 or self.max_prompts < 1:
            raise ValueError(f"max_tiles and max_prompts must be >= 1, got {self.max_tiles}, {self.max_prompts}")

    @property
    def target(self) -> float:
        return math.sqrt(self.min_object * self.max_object)

    @classmethod
    def for_model(cls, config: SegGPTConfig) -> "TilingConfig":
        """The released ViT-L's range for its 448 px canvas; the demo recipe's measured range otherwise.

        A checkpoint records shapes, not the object sizes it was trained on, so the range goes
        with the training recipe: small canvases in this project come from scripts/train_demo.py.
        """
        return VIT_L_TILING if config.image_size == VIT_L_IMAGE_SIZE else DEMO_TILING


# ViT-L, from the paper's training recipe (reference/seggpt.md §13.3-13.4), not measured here (no
# real weights offline): 448x448 random-resized crops (scale 0.3-1) of COCO, ADE20K, VOC, ...,
# where objects run from COCO's "small" bound (32 px in ~640 px images; 32 px = 2 patches of 16 on
# the 448 canvas) up to the whole image.
VIT_L_TILING = TilingConfig(min_object=32 / 448, max_object=1.0)
# The demo model, measured (200 held-out episodes per size, whole-image 1-shot mIoU against the
# prompts' median instance size on the 64 px canvas; the largest objects occlude each other, so
# their measured size stops growing near 0.5):
#     python benchmarks/quality.py --suite scale-sweep --episodes 200
#     on canvas  0.035  0.055  0.084  0.112  0.142  0.179  0.229  0.280  0.325  0.386  0.419  0.467  0.505
#     mIoU       0.000  0.046  0.176  0.283  0.363  0.456  0.526  0.558  0.586  0.600  0.591  0.575  0.546
# The range is where mIoU is at least 3/4 of its peak (0.600): 0.18 up to the largest size measured,
# 0.5 (objects drawn 0.85 of the scene still score 0.529).  Its centre, 0.30, scores 95 % of the peak.
DEMO_TILING = TilingConfig(min_object=0.18, max_object=0.5)


def instance_sizes(label_map: np.ndarray) -> np.ndarray:
    """Longer box side (px) of every 8-connected region of every label > 0, as float64."""
    sizes = []
    for label in np.unique(label_map):
        if label == 0:
            continue
        n, _, stats, _ = cv2.connectedComponentsWithStats((label_map == label).astype(np.uint8), connectivity=8)
        sizes.extend(np.maximum(stats[1:n, cv2.CC_STAT_WIDTH], stats[1:n, cv2.CC_STAT_HEIGHT]).tolist())
    return np.asarray(sizes, np.float64)


def object_size(label_maps: Sequence[np.ndarray]) -> float | None:
    """Median instance size (px) over all maps, or None when no map labels anything.

    The median, not the minimum: a stray labelled speck must not shrink the working scale.
    """
    sizes = np.concatenate([instance_sizes(m) for m in label_maps]) if label_maps else np.empty(0)
    return float(np.median(sizes)) if sizes.size else None


def in_range(size: float, side: int, config: TilingConfig) -> bool:
    """Whether objects of ``size`` px are at least ``min_object`` of the canvas when ``side`` px fill it."""
    return size / side >= config.min_object


def crop_side(size: float, canvas: int, config: TilingConfig) -> int:
    """The crop side (px) that puts ``size`` px objects at ``target`` on the canvas, never below the
    canvas side: zooming in past the image's own resolution adds no detail."""
    return max(canvas, int(round(size / config.target)))


def plan_query(size: float | None, shape: tuple[int, int], canvas: int, config: TilingConfig
               ) -> tuple[int | None, str]:
    """(tile side in px, or None for one whole-image tile; the reason) for an (H, W) query.

    One tile when the prompts labelled nothing (no size to match), when the image is no larger
    than the canvas, or when the objects already sit in range on the whole image.  Otherwise
    ``crop_side``, coarsened until ``max_tiles`` tiles cover the image.
    """
    longest = max(shape)
    if size is None:
        return None, "no labelled objects in the prompts"
    if longest <= canvas:
        return None, "image within canvas"
    if in_range(size, longest, config):
        return None, "objects in range"
    wanted = side = crop_side(size, canvas, config)
    while side < longest and len(tile_grid(shape, side, config.overlap)) > config.max_tiles:
        side = int(math.ceil(side * 1.05))
    if side >= longest:
        return None, "one tile within max_tiles"
    return side, "tiled" if side == wanted else "tiled, coarsened to max_tiles"


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    """Evenly spread starts of ``tile``-long windows covering ``length``, overlapping >= ``overlap``."""
    if tile >= length:
        return [0]
    n = math.ceil((length - tile) / (tile * (1 - overlap))) + 1
    return sorted({int(round(s)) for s in np.linspace(0, length - tile, n)})


def tile_grid(shape: tuple[int, int], side: int, overlap: float) -> list[Box]:
    """Row-major tiles of ``side`` (clipped to the image) covering an (H, W) image."""
    h, w = shape
    th, tw = min(side, h), min(side, w)
    return [(y, x, th, tw) for y in _starts(h, th, overlap) for x in _starts(w, tw, overlap)]


def crop_boxes(label_map: np.ndarray, side: int, max_crops: int) -> list[Box]:
    """Up to ``max_crops`` windows of ``side`` (clipped to the map) around labelled regions.

    Greedy: each window is centred on a region and chosen to hold the most labels, then the
    most regions, not yet shown whole by an earlier window; it stops when every region has been
    shown.  A map without labels gets one centred window (a negative example at scale).
    """
    h, w = label_map.shape
    ch, cw = min(side, h), min(side, w)
    regions = []  # (label, y0, x0, y1, x1)
    for label in np.unique(label_map):
        if label == 0:
            continue
        n, _, stats, _ = cv2.connectedComponentsWithStats((label_map == label).astype(np.uint8), connectivity=8)
        for x0, y0, bw, bh, _ in stats[1:n]:
            regions.append((int(label), int(y0), int(x0), int(y0 + bh), int(x0 + bw)))
    if not regions:
        return [((h - ch) // 2, (w - cw) // 2, ch, cw)]
    windows = []
    for _, y0, x0, y1, x1 in regions:
        y = min(max(0, (y0 + y1 - ch) // 2), h - ch)
        x = min(max(0, (x0 + x1 - cw) // 2), w - cw)
        windows.append((y, x, ch, cw))
    left, out = set(range(len(regions))), []
    while left and len(out) < max_crops:
        best, best_key, best_cover = None, (0, 0), set()
        for box in windows:
            y, x = box[0], box[1]
            cover = {i for i in left if regions[i][1] >= y and regions[i][2] >= x
                     and regions[i][3] <= y + ch and regions[i][4] <= x + cw}
            key = (len({regions[i][0] for i in cover}), len(cover))
            if key > best_key:
                best, best_key, best_cover = box, key, cover
        if best is None:  # regions larger than the window: show the first one's centre
            best, best_cover = windows[min(left)], {min(left)}
        out.append(best)
        left -= best_cover
    return out


def taper(length: int, ramp_start: int, ramp_end: int) -> np.ndarray:
    """(length,) weights: a half-Hann rise over ``ramp_start`` px, a fall over ``ramp_end`` px, 1 between.

    Every weight is > 0, so every pixel a tile covers keeps a share of it.
    """
    wgt = np.ones(length, np.float32)
    for n, sl in ((ramp_start, slice(None)), (ramp_end, slice(None, None, -1))):
        n = min(n, length)
        if n > 0:
            rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)
            wgt[sl][:n] = np.minimum(wgt[sl][:n], rise)
    return wgt


class ScoreBlender:
    """Accumulate tiles' per-label scores of an (H, W) image at a reduced working resolution.

    The working resolution is the canvas's (``canvas / side`` per image pixel), so its size is
    about ``tiles * canvas**2`` whatever the image's: no full-resolution map per tile.  Each
    tile is weighted by a cosine taper on the sides it shares with a neighbour (flat on the
    image border) and the sum is normalised by the summed weights.
    """

    def __init__(self, shape: tuple[int, int], boxes: Sequence[Box], canvas: int, side: int, channels: int) -> None:
        self.factor = min(1.0, canvas / side)
        h, w = shape
        self.work = (max(1, round(h * self.factor)), max(1, round(w * self.factor)))
        self.acc = torch.zeros(channels, *self.work)
        self.weight = torch.zeros(self.work)
        self.boxes = list(boxes)
        self._done = 0

    def _work_box(self, box: Box) -> tuple[int, int, int, int]:
        y, x, h, w = box
        f = self.factor
        y0, x0 = round(y * f), round(x * f)
        y1 = max(y0 + 1, min(self.work[0], round((y + h) * f)))
        x1 = max(x0 + 1, min(self.work[1], round((x + w) * f)))
        return y0, x0, y1, x1

    def add(self, scores: torch.Tensor) -> None:
        """(C, S, S) scores of the next tile (in the order of ``boxes``)."""
        y0, x0, y1, x1 = self._work_box(self.boxes[self._done])
        self._done += 1
        if scores.shape[-2:] != (y1 - y0, x1 - x0):
            scores = F.interpolate(scores[None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
        ramps = self._ramps(y0, x0, y1, x1)
        win = torch.from_numpy(np.outer(taper(y1 - y0, ramps[0], ramps[1]), taper(x1 - x0, ramps[2], ramps[3])))
        self.acc[:, y0:y1, x0:x1] += scores.float().cpu() * win
        self.weight[y0:y1, x0:x1] += win

    def _ramps(self, y0: int, x0: int, y1: int, x1: int) -> tuple[int, int, int, int]:
        """Taper widths (top, bottom, left, right): the overlap with the nearest neighbour on that side."""
        top = bottom = left = right = 0
        for b in self.boxes:
            oy0, ox0, oy1, ox1 = self._work_box(b)
            if (oy0, ox0, oy1, ox1) == (y0, x0, y1, x1) or oy1 <= y0 or oy0 >= y1 or ox1 <= x0 or ox0 >= x1:
                continue
            if oy0 < y0 < oy1:
                top = max(top, oy1 - y0)
            if oy0 < y1 < oy1:
                bottom = max(bottom, y1 - oy0)
            if ox0 < x0 < ox1:
                left = max(left, ox1 - x0)
            if ox0 < x1 < ox1:
                right = max(right, x1 - ox0)
        return top, bottom, left, right

    def result(self) -> torch.Tensor:
        """(C, h, w) blended scores at the working resolution."""
        if self._done != len(self.boxes):
            raise RuntimeError(f"blended {self._done} of {len(self.boxes)} tiles")
        return self.acc / self.weight.clamp_min(1e-12)
